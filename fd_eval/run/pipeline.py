"""One pass over a source: decode once, feed every extractor, accumulate float64 moments on the device.

Exact path (default, ``decode="pil"``): DataLoader workers decode (``PIL.Image.open(f).convert("RGB")``) and run
each extractor's host step (the reference Pillow resize) in parallel; batches of uint8 pixels travel to the
device through pinned memory with non-blocking copies, on a CUDA side stream so that the copy of batch i + 1
overlaps the network's work on batch i; features go straight into :class:`MomentAccumulator`s that live on the
device. Nothing in the loop reads a device value back, so the host never waits for the GPU until the end.
On a GPU the workers hand over small items (:func:`loader_chunk`) that :class:`BatchRunner` joins into model
batches, so the GPU starts after a few images per worker; in fast mode the Pillow resize itself runs on the GPU
with Pillow's integer arithmetic (:mod:`fd_eval.extractors.pil_resize`, same pixels) and the workers only decode.

GPU decode (``decode="gpu"``, for extractors that resize on the device: Inception, DINOv2 with
``resize="torch"``): workers only read the files; RGB JPEGs travel as their encoded bytes and are decoded on the
GPU in batches (``torchvision.io.decode_jpeg(device="cuda")``, nvJPEG), every other image is decoded with PIL in
the workers (PNG decoding is lossless, so those pixels are the exact path's). A JPEG nvJPEG rejects is decoded
with PIL instead. nvJPEG's pixels are not libjpeg-turbo's (IDCT and chroma upsampling differ), so statistics
record the decoder used (``preprocess.decode``) and are refused against PIL-decoded ones unless
``allow_mismatch``. Without a CUDA device ``decode="gpu"`` falls back to the exact PIL decode in the workers.
One loop (:func:`run_units`) serves :func:`extract` and the resumable builder (:mod:`fd_eval.metrics.build`): a plan of
units (index arrays into the source), per unit and extractor a list of :class:`FeatureConsumer` objects (the moment
accumulator, feature rows, a nearest-neighbour search, ...) fed ``(features, index)`` model batch by model
batch, and a callback when a unit's last image is in.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..core.moments import MomentAccumulator
from ..errors import EmptySourceError, FDEvalError
from ..extractors import Extractor
from ..extractors.preprocess import DECODE_PIL_RGB
from ..sources import ImageSource, SkippedItem, SubsetSource
from ..sources.gpu_decode import (  # noqa: F401 - re-exported: the pipeline's public GPU-decode names
    DeviceDecoder,
    EncodedDataset,
    collate_encoded,
    device_decode_spec,
    device_decodes,
)
from ..sources.loader import Batch, ExtractorDataset, collate, h2d, worker_init
from .options import (  # noqa: F401 - re-exported: the machine-dependent defaults live with the options
    DECODES,
    ResolvedRun,
    RunOptions,
    auto_device,
    available_cpus,
    default_batch_size,
    default_num_workers,
)
from .streamed import PlannedBatches, StreamedBatches, index_first_for_ranks, is_streamed, known_total, source_size_hint


@runtime_checkable
class FeatureConsumer(Protocol):
    """What the extraction loop feeds, per extractor: :class:`MomentAccumulator`, feature rows, a top-K search...

    ``update(features, index)``: features (B, D) float32 on the run's device, one extractor's output for B images;
    index (B,) int64 positions of those images in the source being iterated (the full source, also under a
    rank's shard or a build unit), on the same device. Calls come in source order within a unit.
    """

    def update(self, features: torch.Tensor, index: torch.Tensor) -> None: ...




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
    metrics: list[dict[str, Any]] = field(default_factory=list)  # per extractor: {metric name: Consumer}

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


# --- where each extractor runs, and where its Pillow resize runs (the one place that decides) -----------------
def place_extractors(extractors: Sequence[Extractor], device: torch.device, n_images: int | None, *,
                     streaming: bool = False) -> None:
    """Move the extractors to ``device`` and plan the pass (``compile=None`` resolved for ``n_images``).

    Where a Pillow-resizing protocol resizes (same pixels either way, :meth:`Extractor.set_pil_resize_on`):
    left to the extractor ("auto": the device in fast mode on a GPU, else the DataLoader workers) for a pass
    over a source; for ``streaming`` input (:class:`fd_eval.FDMetric`: batches already on the GPU) on the
    device whenever it is a GPU, unless placed explicitly, since a host resize would make every update wait.
    """
    for ex in extractors:  # first: where an extractor resizes (host or device) depends on its device
        ex.to(device)
        ex.plan_run(n_images)
    place_pil_resize(extractors, device, streaming=streaming)


def place_pil_resize(extractors: Sequence[Extractor], device: torch.device, *, streaming: bool) -> None:
    """The placement rule of :func:`place_extractors` alone (extractors placed explicitly keep their choice)."""
    if streaming and device.type == "cuda":
        for ex in extractors:
            if ex.pil_resize_on == "auto":
                ex.set_pil_resize_on("device")


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
        prefetch_factor=(4 if num_workers < 8 else 2) if num_workers > 0 else None, **kw,
        worker_init_fn=worker_init)  # a SIGTERM sent to every process of a job ends the workers quietly


# --- the device side ----------------------------------------------------------------------------------------
def model_input(ex: Extractor, x: torch.Tensor | list[torch.Tensor], device: torch.device,
                stream: "torch.cuda.Stream | None" = None) -> list[torch.Tensor]:
    """The float32 network inputs of one collated input on ``device``: runs (B_i, 3, H_i, W_i) in image order.
    A list (mixed image sizes) is converted run by run of equal size; runs whose network inputs come out one
    size (a resize to a fixed size) are joined, so with fixed-size preprocessing there is one run. A
    preprocessing that keeps the aspect ratio (SSCD's short-edge resize) leaves several sizes: the network
    then runs them one by one (:meth:`BatchRunner._run`)."""
    with torch.inference_mode():
        if isinstance(x, torch.Tensor):
            return [ex.model_input(h2d(x, device, stream))]
        runs, run = [], [x[0]]
        for t in x[1:]:
            if t.shape == run[0].shape:
                run.append(t)
            else:
                runs.append(run)
                run = [t]
        runs.append(run)
        return _join([ex.model_input(h2d(torch.stack(r), device, stream)) for r in runs])


def _join(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive tensors of one shape (but the batch dimension) concatenated: the fewest runs, in order."""
    out: list[list[torch.Tensor]] = []
    for x in xs:
        if out and out[-1][0].shape[1:] == x.shape[1:]:
            out[-1].append(x)
        else:
            out.append([x])
    return [r[0] if len(r) == 1 else torch.cat(r) for r in out]


def _take(queue: list[torch.Tensor], m: int) -> list[torch.Tensor]:
    """The first ``m`` images of ``queue`` (runs of network inputs), removed from it."""
    taken, n = [], 0
    while n < m:
        x = queue.pop(0)
        if x.shape[0] > m - n:
            queue.insert(0, x[m - n:])
            x = x[:m - n]
        taken.append(x)
        n += x.shape[0]
    return taken


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
    """Collated items through every extractor into its consumers (the engine of :func:`run_units`).

    Each item's images are converted to network inputs on the device at once (:func:`model_input`; on a CUDA
    side stream); the network runs on model batches of exactly ``batch_size`` images, joined from consecutive
    items (None: one model batch per item), their source indices joined alongside (``index_map``: dataset
    position -> source index; None: the same). :meth:`flush` runs what is left. Calls return the number of
    images taken and the item's skipped entries (positions in the dataset).
    """

    def __init__(self, ds: ExtractorDataset, extractors: Sequence[Extractor], device: torch.device, decode: str,
                 batch_size: int | None = None, index_map: np.ndarray | None = None):
        self.ds, self.extractors, self.device = ds, list(extractors), device
        self.batch_size = batch_size
        self.index_map = None if index_map is None else torch.from_numpy(np.asarray(index_map, dtype=np.int64))
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.decoder = DeviceDecoder(device) if device_decodes(decode, device) else None
        self.queued: list[list[torch.Tensor]] = [[] for _ in self.extractors]  # network inputs, per extractor
        self.queued_index: list[torch.Tensor] = []  # int64 source indices of the queued images (CPU)
        self.n_queued = 0
        self.bar: Any = None  # a progress bar counting images embedded (updated as each model batch runs)

    def __call__(self, batch: Batch, consumers: Sequence[Any]) -> tuple[int, list[SkippedItem]]:
        """``consumers``: per extractor a list of :class:`FeatureConsumer` (or one consumer)."""
        per_ex = _per_extractor(consumers)
        skipped = list(self.ds.check(batch))  # raises the one-line BadImageError unless skip_bad
        if not len(batch):
            return 0, skipped
        positions = batch.indices
        if self.decoder is not None:
            images, bad = self.decoder(batch, self.ds, self.stream)
            skipped += bad
            if bad:
                gone = {s.index for s in bad}
                positions = torch.tensor([i for i in batch.indices.tolist() if i not in gone], dtype=torch.int64)
            n = len(batch) - len(bad)
            inputs = [images] * len(self.extractors)
        else:
            n, inputs = len(batch), batch.inputs
        if n:
            for q, ex, x in zip(self.queued, self.extractors, inputs):
                q.extend(model_input(ex, x, self.device, self.stream))
            self.queued_index.append(positions if self.index_map is None else self.index_map[positions])
            self.n_queued += n
            while self.n_queued >= (self.batch_size or self.n_queued):
                self._run(per_ex, self.batch_size or self.n_queued)
        return n, skipped

    def flush(self, consumers: Sequence[Any]) -> None:
        """Run the queued images (fewer than a model batch) through the networks."""
        if self.n_queued:
            self._run(_per_extractor(consumers), self.n_queued)

    def _run(self, consumers: list[list[FeatureConsumer]], m: int) -> None:
        qi = self.queued_index
        idx = qi[0] if len(qi) == 1 else torch.cat(qi)
        self.queued_index = [idx[m:]] if idx.shape[0] > m else []
        idx, on_device = idx[:m], None
        for j, (ex, cs) in enumerate(zip(self.extractors, consumers)):
            runs = _join(_take(self.queued[j], m))  # one run unless the inputs differ in size (see model_input)
            feats = ex.forward_input(runs[0]) if len(runs) == 1 else torch.cat([ex.forward_input(r) for r in runs])
            on_device = feed(cs, feats, idx, self.device, on_device)
        self.n_queued -= m
        if self.bar is not None:
            self.bar.update(m)

    @property
    def device_decoded(self) -> int:
        return self.decoder.n_device if self.decoder is not None else 0


def feed(consumers: Sequence[FeatureConsumer], features: torch.Tensor, index: torch.Tensor, device: torch.device,
         index_on_device: torch.Tensor | None = None) -> torch.Tensor | None:
    """One extractor's features (B, D) float32 on ``device`` into each of its consumers, with the images' int64
    source indices (B,): moved to the device once, and only for consumers that use them (``uses_index``).
    The one feeding step of the file pipeline and of :class:`fd_eval.FDMetric`. Returns the index on the device
    (None if no consumer needed it), for the next extractor's consumers."""
    for c in consumers:
        if getattr(c, "uses_index", True):  # moments need no index: no copy to the device for them
            if index_on_device is None:
                index_on_device = index.to(device, non_blocking=True)
            c.update(features, index_on_device)
        else:
            c.update(features, index)
    return index_on_device


def feature_consumers(extractors: Sequence[Extractor], device: torch.device, keep_features: bool = False,
                      keep_features_of: Any = ()) -> tuple[list[MomentAccumulator], list[dict[str, Any]]]:
    """The consumers every pass feeds, per extractor: its :class:`MomentAccumulator` (float64 moments, plus the
    feature rows with ``keep_features`` or when its name is in ``keep_features_of``) and the registered
    consumer metrics (:func:`fd_eval.core.consumers.register_consumer_metric`) that apply to it. The file pipeline,
    the resumable build and :class:`fd_eval.FDMetric` all start from this list."""
    from ..core.consumers import metric_consumers

    accs = [MomentAccumulator(ex.feature_dim, device, keep_features=keep_features or ex.name in keep_features_of)
            for ex in extractors]
    return accs, metric_consumers(extractors, device)


def _per_extractor(consumers: Sequence[Any]) -> list[list[FeatureConsumer]]:
    return [list(c) if isinstance(c, (list, tuple)) else [c] for c in consumers]


def shard_indices(n: int, rank: int, world_size: int) -> np.ndarray:
    """Contiguous block ``rank`` of ``world_size`` nearly equal blocks of range(n) (sizes differ by <= 1)."""
    bounds = np.linspace(0, n, world_size + 1).round().astype(np.int64)
    return np.arange(bounds[rank], bounds[rank + 1], dtype=np.int64)


@dataclass
class UnitDone:
    """What :func:`run_units` hands ``on_unit`` when unit ``k`` is complete: its consumers (per extractor), its
    skipped items (source indices), images taken, images decoded on the device, and seconds since it started."""

    k: int
    consumers: list[list[FeatureConsumer]]
    skipped: list[SkippedItem]
    n_images: int
    device_decoded: int
    seconds: float


def run_units(
    source: ImageSource,
    extractors: Sequence[Extractor],
    units: Sequence[np.ndarray],
    consumers: Callable[[int], Sequence[Any]],
    run: ResolvedRun | None = None,
    *,
    image_transform: Callable[[Image.Image], Image.Image] | None = None,
    on_unit: Callable[[UnitDone], None] | None = None,
    bar: Any = None,
    n_planned: int | None = None,
    **legacy: Any,
) -> list[UnitDone]:
    """The extraction loop: every unit of ``units`` (int64 index arrays into ``source``) through every extractor.

    One DataLoader over all units keeps the decode workers busy across unit boundaries. Batches never straddle
    units: a unit's images run in model batches of ``batch_size`` from its first image (the last may be short),
    so a unit's features, and anything accumulated from them, depend only on its images and the batch size.
    ``consumers(k)`` gives unit k's consumers when it starts (per extractor: a list, or one consumer);
    ``on_unit`` is called as soon as its last image is in. ``n_planned``: the images of the whole pass (over
    all ranks; default: these units'), for :meth:`Extractor.plan_run`. ``run``: device, batch size, workers,
    decode mode and ``skip_bad`` (:meth:`fd_eval.RunOptions.resolve`; code written before it may still pass
    ``device``, ``batch_size``, ``num_workers``, ``decode``, ``skip_bad`` keywords instead). Returns the
    :class:`UnitDone` of every unit.
    """
    if run is None:
        unknown = set(legacy) - {"device", "batch_size", "num_workers", "decode", "skip_bad"}
        if unknown:
            raise TypeError(f"run_units() got unexpected keyword argument(s) {sorted(unknown)}")
        sb = legacy.pop("skip_bad", None)
        run = RunOptions(**legacy, skip_bad=source.skip_bad if sb is None else bool(sb), world_size=1).resolve()
    elif legacy:
        raise TypeError(f"run_units(): pass run= or the keywords {sorted(legacy)}, not both")
    device, batch_size, decode = run.device, run.batch_size, run.decode
    if not units:
        return []
    chunk = loader_chunk(batch_size, device)
    if is_streamed(units):  # remote shards indexed as they are read (fd_eval.run.streamed): source indices
        plan: Any = StreamedBatches(source, units, chunk)
        all_idx, whole = None, True
        n_pass = n_planned or known_total(units) or source_size_hint(source)
    else:
        units = [np.asarray(u, dtype=np.int64) for u in units]
        all_idx = np.concatenate(units)
        whole = len(all_idx) == len(source) and bool(np.array_equal(all_idx, np.arange(len(source))))
        plan, n_pass = PlannedBatches.of(units, chunk), n_planned or len(all_idx)
    try:
        place_extractors(extractors, device, n_pass)
        ds, collate_fn = make_dataset(source if whole else SubsetSource(source, all_idx), extractors, device,
                                      decode=decode, skip_bad=run.skip_bad, image_transform=image_transform)
        loader = make_loader(ds, collate_fn, device, run.num_workers, batch_sampler=plan)
        runner = BatchRunner(ds, extractors, device, decode, batch_size=batch_size,
                             index_map=None if whole else all_idx)
        runner.bar = bar
        return _loop(loader, runner, plan, consumers, on_unit, bar, None if whole else all_idx, len(units))
    finally:
        if isinstance(plan, StreamedBatches):
            plan.close()


def _loop(loader: Any, runner: BatchRunner, plan: Any, consumers: Callable[[int], Sequence[Any]],
          on_unit: Callable[[UnitDone], None] | None, bar: Any, index_map: np.ndarray | None,
          n_units: int) -> list[UnitDone]:
    """The loop of :func:`run_units`: batches in, each unit's :class:`UnitDone` out as its last batch is in (and a
    unit with no items in its place in the order)."""
    done: list[UnitDone] = []
    cs: list[list[FeatureConsumer]] = []
    skipped: list[SkippedItem] = []
    n = decoded_before = 0
    t0 = time.perf_counter()
    emitted = 0  # units before this one are done (empty units included)

    def finish(unit: UnitDone) -> None:
        done.append(unit)
        if on_unit is not None:
            on_unit(unit)

    def empties(upto: int) -> None:
        nonlocal emitted
        for k in sorted(e for e in plan.empty if emitted <= e < upto):
            finish(UnitDone(k, _per_extractor(consumers(k)), [], 0, 0, 0.0))
        emitted = max(emitted, upto)

    for i, batch in enumerate(loader):
        k = plan.owner[i]
        if not cs:
            empties(k)
            cs = _per_extractor(consumers(k))
        took, bad = runner(batch, cs)  # raises the one-line BadImageError unless skip_bad
        n += took
        skipped += [s if index_map is None or s.index is None else replace(s, index=int(index_map[s.index]))
                    for s in bad]
        if bar is not None:  # images embedded are counted when the network has run (BatchRunner); the rest now
            bar.update(len(batch) + len(batch.skipped) - took)
        if plan.frees is not None:
            for s in plan.frees[i]:  # every item of these shards is in: their spool files go
                plan.source.release(s)
        if i != plan.last.get(k):
            continue
        runner.flush(cs)  # the unit's last, partial model batch
        unit = UnitDone(k, cs, skipped, n, runner.device_decoded - decoded_before, time.perf_counter() - t0)
        decoded_before = runner.device_decoded
        finish(unit)
        emitted = k + 1
        cs, skipped, n, t0 = [], [], 0, time.perf_counter()
    empties(n_units)
    return done


def extract(
    source: ImageSource,
    extractors: Sequence[Extractor],
    *,
    run: ResolvedRun | None = None,
    keep_features: bool = False,
    image_transform: Callable[[Image.Image], Image.Image] | None = None,
    desc: str = "features",
    consumers: Sequence[Sequence[FeatureConsumer]] | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    skip_bad: bool | None = None,
    decode: str = "pil",
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> Extraction:
    """Run every extractor over ``source`` (this rank's block of it) in one decoding pass.

    ``run``: how (:meth:`fd_eval.RunOptions.resolve`; the API passes it). Without it, the keywords ``device``,
    ``batch_size``, ``num_workers``, ``skip_bad`` (None: the source's), ``decode``, ``progress``, ``rank``,
    ``world_size`` make one (same defaults). ``decode="gpu"`` needs extractors that resize on the device and no
    ``image_transform``. The extractors' precision modes are theirs (:meth:`Extractor.set_precision`).

    ``consumers``: per extractor, more :class:`FeatureConsumer` objects fed beside its moment accumulator (with the
    images' indices into ``source``).

    Returns the per-extractor float64 moment accumulators (on the run's device), merged over ranks when
    ``world_size > 1`` (a collective on the default process group, see :mod:`fd_eval.run.distributed`: every rank
    must call it; every rank gets the merged result; an :class:`FDEvalError` on any rank is raised on all).
    """
    if run is None:
        run = RunOptions(device=device, batch_size=batch_size, num_workers=num_workers, decode=decode,
                         skip_bad=source.skip_bad if skip_bad is None else bool(skip_bad), progress=progress,
                         rank=rank, world_size=world_size).resolve()
    dev, world_size = run.device, run.world_size
    if world_size > 1:  # ranks split the items up front: pending remote shards are indexed first, each by one rank
        index_first_for_ranks(source, run, lambda msg: None)
    streamed = world_size == 1 and bool(getattr(source, "pending", None))  # remote shards indexed as they are read
    n_source = source_size_hint(source) if streamed else len(source)
    place_extractors(extractors, dev, n_source)
    check_decode(run.decode, extractors, image_transform)
    mine: Any
    if streamed:
        from .streamed import ShardItems

        mine = ShardItems(source, range(len(source.shards)))  # one unit: batches as over the items of a list
        total = None
    else:
        if len(source) == 0:
            raise EmptySourceError(f"{source.spec}: no images to evaluate")
        mine = shard_indices(len(source), run.rank, world_size)
        total = len(mine)
    accs, mets = feature_consumers(extractors, dev, keep_features)
    extra = [list(c) for c in consumers] if consumers is not None else [[] for _ in extractors]
    if len(extra) != len(extractors):
        raise FDEvalError(f"consumers: one list per extractor ({len(extractors)}), got {len(extra)}")
    result = Extraction(accs, metrics=mets)
    every = [[a, *m.values(), *e] for a, m, e in zip(accs, mets, extra)]
    t0 = time.perf_counter()
    error: FDEvalError | None = None
    device_decoded = 0
    with tqdm(total=total, unit="img", desc=desc, disable=not run.progress or not run.is_main,
              smoothing=0.1) as bar:
        try:
            # skipped indices come back as indices into the source (also under a rank's block)
            for u in run_units(source, extractors, [mine], lambda k: every, run,
                               image_transform=image_transform, bar=bar, n_planned=n_source):
                result.skipped += u.skipped
                result.n_images += u.n_images
                device_decoded += u.device_decoded
        except FDEvalError as e:
            if world_size == 1:
                raise
            error = e  # the other ranks are about to wait for this one in the merge: tell them instead
    result.device_decoded = device_decoded
    if world_size > 1:
        from .distributed import all_gather_json, merge_extraction

        merge_extraction(result, error=error)
        if run.decode == "gpu":  # same argument on every rank, so every rank joins this collective
            result.device_decoded = sum(all_gather_json(result.device_decoded))
    if result.device_decoded:
        result.decode = device_decode_spec(dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    result.seconds = time.perf_counter() - t0
    if result.n_images == 0:
        raise EmptySourceError(f"{source.spec}: every image was skipped as unreadable ({len(result.skipped)})")
    return result
