"""One pass over a source: decode once, feed every extractor, accumulate float64 moments on the device.

Exact path (default, ``decode="pil"``): DataLoader workers decode (``PIL.Image.open(f).convert("RGB")``) and run
each extractor's host step (the reference Pillow resize) in parallel; batches of uint8 pixels travel to the
device through pinned memory with non-blocking copies, on a CUDA side stream so that the copy of batch i + 1
overlaps the network's work on batch i; features go straight into :class:`MomentAccumulator`s that live on the
device. Nothing in the loop reads a device value back, so the host never waits for the GPU until the end.
On a GPU the workers hand over small items (:func:`loader_chunk`) that :class:`BatchRunner` joins into model
batches, so the GPU starts after a few images per worker; in fast mode the Pillow resize itself runs on the GPU
with Pillow's integer arithmetic (:mod:`fd_eval.pil_resize`, same pixels) and the workers only decode.

GPU decode (``decode="gpu"``, for extractors that resize on the device: Inception, DINOv2 with
``resize="torch"``): workers only read the files; RGB JPEGs travel as their encoded bytes and are decoded on the
GPU in batches (``torchvision.io.decode_jpeg(device="cuda")``, nvJPEG), every other image is decoded with PIL in
the workers (PNG decoding is lossless, so those pixels are the exact path's). A JPEG nvJPEG rejects is decoded
with PIL instead. nvJPEG's pixels are not libjpeg-turbo's (IDCT and chroma upsampling differ), so statistics
record the decoder used (``preprocess.decode``) and are refused against PIL-decoded ones unless
``allow_mismatch``. Without a CUDA device ``decode="gpu"`` falls back to the exact PIL decode in the workers.
"""
from __future__ import annotations

import io
import os
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .errors import BadImageError, EmptySourceError, FDEvalError
from .extractors import Extractor
from .moments import MomentAccumulator
from .preprocess import DECODE_PIL_RGB, pil_to_tensor
from .provenance import environment
from .sources import Batch, ExtractorDataset, ImageSource, SkippedItem, SubsetSource, collate, decode_image
from .stats import Stats

DECODES = ("pil", "gpu")
# Device types on which decode="gpu" decodes JPEGs in the main process (tests add "cpu" to exercise the path
# with torchvision's CPU decoder, whose pixels equal Pillow's).
_DEVICE_DECODE_TYPES: tuple[str, ...] = ("cuda",)
_JPEG_SOI = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_num_workers(device: torch.device) -> int:
    """Decode workers: all cores but one on a GPU machine (the model runs elsewhere; PIL decodes+resizes about
    500 256x256 PNGs/s per core, so 8 workers feed ~4,000 img/s); on a CPU the model competes for the same
    cores, so half of them."""
    cpus = available_cpus()
    if device.type == "cuda":
        return max(1, min(cpus - 1, 32))
    return max(1, cpus // 2)


def default_batch_size(device: torch.device) -> int:
    """256 images on a GPU with >= 20 GiB (ViT-L/14 at 224 px is compute-bound well below that), 128 on smaller
    GPUs; 32 on a CPU."""
    if device.type == "cuda":
        try:
            total = torch.cuda.get_device_properties(device).total_memory
        except (RuntimeError, AssertionError):
            total = 0
        return 256 if total >= 20 * 2**30 else 128
    return 32


def auto_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> cuda when available (``cuda:LOCAL_RANK`` under torchrun), else cpu."""
    if device is None or str(device) == "auto":
        from .distributed import default_device, launched_distributed

        if launched_distributed():
            return default_device()
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Extraction:
    """What one pass produced: one accumulator per extractor (same order), and the skipped items.

    ``decode``: the decoder the statistics should record (``preprocess.decode``); ``device_decoded``: images
    decoded on the device (``decode="gpu"``).
    """

    accumulators: list[MomentAccumulator]
    skipped: list[SkippedItem] = field(default_factory=list)
    n_images: int = 0
    seconds: float = 0.0
    decode: str = DECODE_PIL_RGB
    device_decoded: int = 0

    @property
    def images_per_s(self) -> float:
        return self.n_images / self.seconds if self.seconds > 0 else float("nan")


# --- decode modes -------------------------------------------------------------------------------------------
def check_decode(decode: str, extractors: Sequence[Extractor], image_transform: Any = None) -> None:
    """Raise :class:`FDEvalError` for a decode mode the extractors (or a source transform) cannot use."""
    if decode not in DECODES:
        raise FDEvalError(f"unknown decode mode {decode!r}; choose 'pil' (PIL in the workers: the reference) or "
                          "'gpu' (JPEGs decoded on the GPU with nvJPEG)")
    if decode == "pil":
        return
    host = [ex.name for ex in extractors if ex.resizes_on_host]
    if host:
        raise FDEvalError(f"--decode gpu needs extractors that resize on the device, but {', '.join(host)} resize "
                          "with Pillow on the host here (the exact mode's default, and any CPU run's); on a GPU add "
                          "--precision fast or set FD_EVAL_PIL_RESIZE_ON=device (Pillow's pixels, computed on the "
                          "GPU), or add --resize torch (EDM2's resize, not the GPIC protocol), or use --decode pil")
    if image_transform is not None:
        name = getattr(image_transform, "name", "a source transform")
        raise FDEvalError(f"--decode gpu cannot be combined with the image transform {name!r} (a Pillow crop and "
                          "resize on the host); use --decode pil")


def device_decodes(decode: str, device: torch.device) -> bool:
    """Whether ``decode`` makes this pass decode JPEGs on ``device`` (False: PIL in the workers)."""
    return decode == "gpu" and device.type in _DEVICE_DECODE_TYPES


def device_decode_spec(device: torch.device) -> str:
    """What statistics record as ``preprocess.decode`` when JPEGs were decoded on ``device``."""
    return (f"torchvision.io.decode_jpeg(mode=RGB, device='{device.type}') for RGB JPEGs (nvJPEG on CUDA); "
            f"{DECODE_PIL_RGB} for other images and JPEGs it rejects")


def _device_decodable(data: bytes, max_pixels: int | None) -> bool:
    """A complete YCbCr JPEG within the pixel limit, from its header and its end (CMYK, grayscale, oversized
    and cut-off files go through PIL, whose conversions and errors are the reference's: a GPU decoder is not
    known to refuse truncated data, so a file must end with the EOI marker, give or take trailing padding)."""
    if not data.startswith(_JPEG_SOI) or _JPEG_EOI not in data[-64:]:
        return False
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            w, h = im.size
            limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else (max_pixels or None)
            return im.format == "JPEG" and im.mode == "RGB" and (limit is None or w * h <= limit)
    except Exception:  # noqa: BLE001 - let PIL's full decode report it
        return False


class EncodedDataset(ExtractorDataset):
    """``decode="gpu"``: item ``i`` is ``(i, [x])`` with x the encoded bytes of an RGB JPEG as a 1-D uint8 tensor
    (decoded on the device), or the PIL-decoded image as uint8 (3, H, W) (not resized: every extractor of a
    GPU-decode pass resizes on the device), or a :class:`SkippedItem`."""

    def __getitem__(self, i: int) -> "tuple[int, list[torch.Tensor]] | SkippedItem":
        src = self.source
        try:
            data = src.read_encoded(i)
        except BadImageError as e:
            return SkippedItem(int(i), getattr(e, "item", src.describe(i)), getattr(e, "reason", str(e)), str(e))
        if data is None:  # decoded pixels (arrays): the ordinary path
            img, err = src._load_or_error(i)
        elif _device_decodable(data, src.max_image_pixels):
            return int(i), [torch.frombuffer(bytearray(data), dtype=torch.uint8)]
        else:
            try:
                img, err = decode_image(data, lambda: src.describe(i), max_image_pixels=src.max_image_pixels), None
            except BadImageError as e:
                img, err = None, e
        if err is not None:
            return SkippedItem(int(i), getattr(err, "item", src.describe(i)), getattr(err, "reason", str(err)),
                               str(err))
        return int(i), [pil_to_tensor(img)]


def collate_encoded(items: Sequence["tuple[int, list[torch.Tensor]] | SkippedItem"]) -> Batch:
    """:func:`fd_eval.sources.collate` that never stacks encoded bytes (1-D tensors stay a list)."""
    ok = [it for it in items if not isinstance(it, SkippedItem)]
    if ok and any(t[0].ndim == 1 for _, t in ok):
        skipped = [it for it in items if isinstance(it, SkippedItem)]
        return Batch(torch.tensor([i for i, _ in ok], dtype=torch.int64), [[t[0] for _, t in ok]], skipped)
    return collate(items)


class DeviceDecoder:
    """Decodes the encoded JPEGs of a ``decode="gpu"`` batch on the device, in one batched call; on failure one
    by one, and a JPEG the device decoder rejects with PIL (the reference decoder; its errors name the item)."""

    def __init__(self, device: torch.device):
        from torchvision.io import ImageReadMode, decode_jpeg

        def decode(data: Any, mode: Any, device: torch.device) -> Any:
            with warnings.catch_warnings():
                # torchvision >= 0.29 warns on every call that its codecs are deprecated in favour of TorchCodec
                # (not a dependency of fd-eval); decode_jpeg still works and this path is opt-in
                warnings.simplefilter("ignore", DeprecationWarning)
                return decode_jpeg(data, mode=mode, device=device)

        self.device = device
        self._decode, self._mode = decode, ImageReadMode.RGB
        self.n_device = 0
        self.n_fallback = 0

    def _one(self, data: torch.Tensor) -> torch.Tensor | None:
        try:
            return self._decode(data, mode=self._mode, device=self.device)
        except Exception:  # noqa: BLE001 - nvJPEG's refusal of one file: PIL decides
            return None

    def __call__(self, batch: Batch, ds: ExtractorDataset, stream: "torch.cuda.Stream | None"
                 ) -> tuple[list[torch.Tensor] | torch.Tensor, list[SkippedItem]]:
        x = batch.inputs[0]
        if isinstance(x, torch.Tensor):  # every item decoded by PIL in the workers
            return _h2d(x, self.device, stream), []
        enc = [k for k, t in enumerate(x) if t.ndim == 1]
        out: list[torch.Tensor | None] = [None] * len(x)
        for k, t in enumerate(x):
            if t.ndim != 1:
                out[k] = _h2d(t, self.device, stream)
        decoded: list[torch.Tensor | None]
        try:
            decoded = list(self._decode([x[k] for k in enc], mode=self._mode, device=self.device))
        except Exception:  # noqa: BLE001 - one bad file fails the batched call: retry one by one
            decoded = [self._one(x[k]) for k in enc]
        bad: list[SkippedItem] = []
        for k, img in zip(enc, decoded):
            if img is None:
                index = int(batch.indices[k])
                try:
                    pil = decode_image(x[k].numpy().tobytes(), lambda: ds.source.describe(index),
                                       max_image_pixels=ds.source.max_image_pixels)
                except BadImageError as e:
                    bad.append(SkippedItem(index, getattr(e, "item", ds.source.describe(index)),
                                           getattr(e, "reason", str(e)), str(e)))
                    continue
                out[k] = _h2d(pil_to_tensor(pil), self.device, stream)
                self.n_fallback += 1
            else:
                out[k] = img
                self.n_device += 1
        if bad and not ds.skip_bad:
            s = bad[0]
            err = BadImageError(s.message or f"{s.name}: {s.reason}")
            err.item, err.reason = s.name, s.reason  # type: ignore[attr-defined]
            raise err
        kept = [t for t in out if t is not None]
        return kept, bad


def make_dataset(source: ImageSource, extractors: Sequence[Extractor], device: torch.device, *, decode: str = "pil",
                 skip_bad: bool | None = None, image_transform: Any = None) -> tuple[ExtractorDataset, Callable]:
    """The DataLoader dataset and collate function of a pass (see the module docstring)."""
    check_decode(decode, extractors, image_transform)
    if device_decodes(decode, device):
        return EncodedDataset(source, [], skip_bad=skip_bad), collate_encoded
    return (ExtractorDataset(source, [ex.host_transform() for ex in extractors], skip_bad=skip_bad,
                             image_transform=image_transform), collate)


def make_loader(ds: ExtractorDataset, collate_fn: Callable, device: torch.device, num_workers: int, *,
                batch_size: int | None = None, batch_sampler: Any = None) -> torch.utils.data.DataLoader:
    """DataLoader with pinned memory on a GPU and a prefetch depth that keeps the model fed without holding
    too many decoded items in shared memory (2 items per worker on big machines, 4 on small ones)."""
    kw: dict[str, Any] = {"batch_sampler": batch_sampler} if batch_sampler is not None else {
        "batch_size": batch_size, "shuffle": False}
    return torch.utils.data.DataLoader(
        ds, num_workers=num_workers, collate_fn=collate_fn, pin_memory=device.type == "cuda",
        prefetch_factor=(4 if num_workers < 8 else 2) if num_workers > 0 else None, **kw)


# --- the device side ----------------------------------------------------------------------------------------
def _h2d(x: torch.Tensor, device: torch.device, stream: "torch.cuda.Stream | None") -> torch.Tensor:
    """Non-blocking copy to ``device``; on a CUDA side stream when given, so it overlaps the compute already
    queued on the current stream (which then waits for the copy, and owns the memory: record_stream)."""
    if stream is None or x.device.type != "cpu":
        return x.to(device, non_blocking=True)
    with torch.cuda.stream(stream):
        y = x.to(device, non_blocking=True)
    current = torch.cuda.current_stream(device)
    current.wait_stream(stream)
    y.record_stream(current)
    return y


def _model_input(ex: Extractor, x: torch.Tensor | list[torch.Tensor], device: torch.device,
                 stream: "torch.cuda.Stream | None" = None) -> torch.Tensor:
    """The float32 network input (B, 3, H, W) of one collated input on ``device``. A list (mixed image sizes,
    resized on the device) is converted run by run of equal size, then concatenated."""
    with torch.inference_mode():
        if isinstance(x, torch.Tensor):
            return ex.model_input(_h2d(x, device, stream))
        runs, run = [], [x[0]]
        for t in x[1:]:
            if t.shape == run[0].shape:
                run.append(t)
            else:
                runs.append(run)
                run = [t]
        runs.append(run)
        return torch.cat([ex.model_input(_h2d(torch.stack(r), device, stream)) for r in runs])


def loader_chunk(batch_size: int, device: torch.device) -> int:
    """Images per DataLoader item on ``device``: 32 on a GPU, whatever the model batch.

    A worker turns out one item at a time, so the first model batch waits for one worker to decode a whole item:
    with 256-image items that is ~0.5-1 s of an idle GPU at the start of every pass (and as long again for the
    tail at the end), a quarter of a 10K-image evaluation in fast mode. :class:`BatchRunner` joins the items
    into model batches of ``batch_size`` on the device. On a CPU the model shares the cores with the workers
    and there is nothing to overlap, so items are model batches.
    """
    return min(batch_size, 32) if device.type == "cuda" else batch_size


class BatchRunner:
    """Collated items through every extractor into its accumulator (shared by :func:`extract` and the resumable
    builder).

    Each item's images are converted to network inputs on the device at once (:func:`_model_input`; on a CUDA
    side stream); the network runs on model batches of exactly ``batch_size`` images, joined from consecutive
    items (None: one model batch per item). :meth:`flush` runs what is left. Calls return the item's skipped
    entries (positions in the dataset) and the number of images taken.
    """

    def __init__(self, ds: ExtractorDataset, extractors: Sequence[Extractor], device: torch.device, decode: str,
                 batch_size: int | None = None):
        self.ds, self.extractors, self.device = ds, list(extractors), device
        self.batch_size = batch_size
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.decoder = DeviceDecoder(device) if device_decodes(decode, device) else None
        self._queued: list[list[torch.Tensor]] = [[] for _ in self.extractors]  # network inputs, per extractor
        self.n_queued = 0

    def __call__(self, batch: Batch, accs: Sequence[MomentAccumulator]) -> tuple[int, list[SkippedItem]]:
        skipped = list(self.ds.check(batch))  # raises the one-line BadImageError unless skip_bad
        if not len(batch):
            return 0, skipped
        if self.decoder is not None:
            images, bad = self.decoder(batch, self.ds, self.stream)
            skipped += bad
            n = len(batch) - len(bad)
            inputs = [images] * len(self.extractors)
        else:
            n, inputs = len(batch), batch.inputs
        if n:
            for q, ex, x in zip(self._queued, self.extractors, inputs):
                q.append(_model_input(ex, x, self.device, self.stream))
            self.n_queued += n
            while self.n_queued >= (self.batch_size or self.n_queued):
                self._run(accs, self.batch_size or self.n_queued)
        return n, skipped

    def flush(self, accs: Sequence[MomentAccumulator]) -> None:
        """Run the queued images (fewer than a model batch) through the networks."""
        if self.n_queued:
            self._run(accs, self.n_queued)

    def _run(self, accs: Sequence[MomentAccumulator], m: int) -> None:
        for j, (ex, acc) in enumerate(zip(self.extractors, accs)):
            q = self._queued[j]
            x = q[0] if len(q) == 1 else torch.cat(q)
            acc.update(ex.forward_input(x[:m]))
            self._queued[j] = [x[m:]] if x.shape[0] > m else []
        self.n_queued -= m

    @property
    def device_decoded(self) -> int:
        return self.decoder.n_device if self.decoder is not None else 0


def shard_indices(n: int, rank: int, world_size: int) -> np.ndarray:
    """Contiguous block ``rank`` of ``world_size`` nearly equal blocks of range(n) (sizes differ by <= 1)."""
    bounds = np.linspace(0, n, world_size + 1).round().astype(np.int64)
    return np.arange(bounds[rank], bounds[rank + 1], dtype=np.int64)


def extract(
    source: ImageSource,
    extractors: Sequence[Extractor],
    *,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    keep_features: bool = False,
    skip_bad: bool | None = None,
    image_transform: Callable[[Image.Image], Image.Image] | None = None,
    decode: str = "pil",
    progress: bool = True,
    desc: str = "features",
    rank: int = 0,
    world_size: int = 1,
) -> Extraction:
    """Run every extractor over ``source`` (this rank's block of it) in one decoding pass.

    ``decode``: ``"pil"`` (default, the reference) or ``"gpu"`` (see the module docstring; needs extractors that
    resize on the device and no ``image_transform``). The extractors' precision modes are theirs
    (:meth:`Extractor.set_precision`).

    Returns the per-extractor float64 moment accumulators (on ``device``), merged over ranks when
    ``world_size > 1`` (a collective on the default process group, see :mod:`fd_eval.distributed`: every rank
    must call it; every rank gets the merged result; an :class:`FDEvalError` on any rank is raised on all).
    """
    dev = auto_device(device)
    for ex in extractors:  # first: where an extractor resizes (host or device) depends on its device
        ex.to(dev)
        ex.plan_run(len(source))
    check_decode(decode, extractors, image_transform)
    if len(source) == 0:
        raise EmptySourceError(f"{source.spec}: no images to evaluate")
    part = source if world_size == 1 else SubsetSource(source, shard_indices(len(source), rank, world_size))
    workers = default_num_workers(dev) if num_workers is None else num_workers
    bs = batch_size or default_batch_size(dev)
    ds, collate_fn = make_dataset(part, extractors, dev, decode=decode, skip_bad=skip_bad,
                                  image_transform=image_transform)
    loader = make_loader(ds, collate_fn, dev, workers, batch_size=loader_chunk(bs, dev))
    accs = [MomentAccumulator(ex.feature_dim, dev, keep_features=keep_features) for ex in extractors]
    runner = BatchRunner(ds, extractors, dev, decode, batch_size=bs)
    result = Extraction(accs)
    t0 = time.perf_counter()
    error: FDEvalError | None = None
    with tqdm(total=len(part), unit="img", desc=desc, disable=not progress or rank != 0, smoothing=0.1) as bar:
        try:
            for batch in loader:
                n, skipped = runner(batch, accs)
                result.skipped += skipped
                result.n_images += n
                bar.update(len(batch) + len(batch.skipped))
            runner.flush(accs)
        except FDEvalError as e:
            if world_size == 1:
                raise
            error = e  # the other ranks are about to wait for this one in the merge: tell them instead
    result.device_decoded = runner.device_decoded
    if world_size > 1:
        from .distributed import all_gather_json, merge_extraction

        # skipped indices are positions in this rank's block; report them as indices into the source
        result.skipped = [replace(s, index=None if s.index is None else int(part.indices[s.index]))
                          for s in result.skipped]
        merge_extraction(result, error=error)
        if decode == "gpu":  # same argument on every rank, so every rank joins this collective
            result.device_decoded = sum(all_gather_json(result.device_decoded))
    if result.device_decoded:
        result.decode = device_decode_spec(dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    result.seconds = time.perf_counter() - t0
    if result.n_images == 0:
        raise EmptySourceError(f"{source.spec}: every image was skipped as unreadable ({len(result.skipped)})")
    return result


def extraction_stats(extraction: Extraction, extractors: Sequence[Extractor], source: ImageSource,
                     source_info: dict[str, Any] | None = None) -> dict[str, Stats]:
    """Statistics per extractor name, with full provenance metadata (``preprocess.decode``: the decoder used)."""
    env = environment(extractors[0].device if extractors else None)
    src = {"spec": source.spec, "n": extraction.n_images, "skipped": len(extraction.skipped),
           **(source_info or {})}
    out = {}
    for ex, acc in zip(extractors, extraction.accumulators):
        meta = {**ex.metadata(), "source": src, **env}
        if extraction.decode != DECODE_PIL_RGB:
            meta["preprocess"] = {**meta["preprocess"], "decode": extraction.decode}
        out[ex.name] = Stats.from_accumulator(acc, meta)
    return out
