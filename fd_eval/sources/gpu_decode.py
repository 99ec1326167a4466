"""GPU decoding (``decode="gpu"``): the workers hand over encoded RGB JPEGs, :class:`DeviceDecoder` decodes them on
the device in batches (nvJPEG on CUDA); every other image is decoded with PIL in the workers (see
:mod:`fd_eval.run.pipeline`)."""
from __future__ import annotations

import io
import warnings
from typing import Any, Sequence

import torch
from PIL import Image

from ..errors import BadImageError
from . import SkippedItem, decode_image
from .decode import DECODE_PIL_RGB, pil_to_tensor
from .loader import Batch, ExtractorDataset, collate, h2d

# Device types on which decode="gpu" decodes JPEGs in the main process (tests add "cpu" to exercise the path
# with torchvision's CPU decoder, whose pixels equal Pillow's).
DEVICE_DECODE_TYPES: tuple[str, ...] = ("cuda",)
JPEG_SOI = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"


def device_decodes(decode: str, device: torch.device) -> bool:
    """Whether ``decode`` makes this pass decode JPEGs on ``device`` (False: PIL in the workers)."""
    return decode == "gpu" and device.type in DEVICE_DECODE_TYPES


def device_decode_spec(device: torch.device) -> str:
    """What statistics record as ``preprocess.decode`` when JPEGs were decoded on ``device``."""
    return (f"torchvision.io.decode_jpeg(mode=RGB, device='{device.type}') for RGB JPEGs (nvJPEG on CUDA); "
            f"{DECODE_PIL_RGB} for other images and JPEGs it rejects")


def device_decodable(data: bytes, max_pixels: int | None) -> bool:
    """A complete YCbCr JPEG within the pixel limit, from its header and its end (CMYK, grayscale, oversized
    and cut-off files go through PIL, whose conversions and errors are the reference's: a GPU decoder is not
    known to refuse truncated data, so a file must end with the EOI marker, give or take trailing padding)."""
    if not data.startswith(JPEG_SOI) or JPEG_EOI not in data[-64:]:
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
            img, err = src.load_or_error(i)
        elif device_decodable(data, src.max_image_pixels):
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
            return h2d(x, self.device, stream), []
        enc = [k for k, t in enumerate(x) if t.ndim == 1]
        out: list[torch.Tensor | None] = [None] * len(x)
        for k, t in enumerate(x):
            if t.ndim != 1:
                out[k] = h2d(t, self.device, stream)
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
                out[k] = h2d(pil_to_tensor(pil), self.device, stream)
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

