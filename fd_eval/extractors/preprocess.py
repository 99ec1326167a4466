"""Preprocessing as data: how a decoded RGB uint8 image becomes a model input.

A :class:`PreprocessSpec` is saved into every statistics file, and two statistics whose specs differ are not
compared (resizing differences are the most common reason numbers from two tools disagree).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from PIL import Image

from ..sources.decode import DECODE_PIL_RGB, pil_to_tensor  # noqa: F401 - re-exported: decoding is the inputs' layer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# OpenAI CLIP's normalisation (CLIP ``_transform``; open_clip OPENAI_DATASET_MEAN/STD; scenic ``normalize_image``)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


_PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class PreprocessSpec:
    """Decoded image -> model input, as data.

    The model input is ``(resize(image) / scale - mean) / std`` with the resize described by ``resize_library``
    ("pil": Pillow on the uint8 image, uint8 out; "torch": ``F.interpolate`` on float; "tf1": TensorFlow 1
    ``resize_bilinear`` semantics), ``resize_filter``, ``antialias`` and ``size`` = (H, W). ``crop`` is applied
    before the resize ("none" here; source-level crops such as GPIC's reference preprocessing are recorded in
    the statistics' source metadata). ``reference`` names the implementation this reproduces exactly.
    """

    resize_library: str  # "pil" | "torch" | "tf1"
    resize_filter: str  # "bicubic" | "bilinear"
    antialias: bool
    size: tuple[int, int]  # (H, W) of the model input
    scale: float  # divide uint8 values by this (255.0 or 1.0)
    mean: tuple[float, float, float]  # subtracted after scaling
    std: tuple[float, float, float]  # divided after subtracting the mean
    decode: str = DECODE_PIL_RGB
    crop: str = "none"
    align_corners: bool = False
    model_dtype: str = "float32"
    reference: str = ""
    scale_first: bool | None = None
    resize_mode: str = "exact"  # "exact": to ``size``; "short-edge": short edge to size[0], aspect kept

    def target_size(self, h: int, w: int) -> tuple[int, int]:
        """(H, W) the resize makes of an ``h x w`` image: ``size`` (``resize_mode`` "exact"), or with
        "short-edge" torchvision ``Resize(S)``'s size (S = ``size[0]``): the short edge to S, the long one to
        ``int(S * long / short)`` (so a resized image maps to itself)."""
        if self.resize_mode == "exact":
            return tuple(self.size)  # type: ignore[return-value]
        if self.resize_mode != "short-edge":
            raise ValueError(f"unknown resize mode {self.resize_mode!r}; choose one of {RESIZE_MODES}")
        return short_edge_size(h, w, int(self.size[0]))

    @property
    def scales_before_resize(self) -> bool:
        """Whether ``/ scale`` comes before a ``"torch"`` resize (see the class docstring)."""
        if self.scale_first is not None:
            return bool(self.scale_first)
        return self.resize_library == "torch" and not self.antialias

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["scale_first"] is None:  # the default rule: not written, so records made before the field agree
            del d["scale_first"]
        if d["resize_mode"] == "exact":  # likewise: records made before the field agree
            del d["resize_mode"]
        d["size"] = list(self.size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessSpec":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("size", "mean", "std"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)

    def differences(self, other: "PreprocessSpec | dict[str, Any]") -> list[str]:
        """Human-readable ``field: a != b`` entries; empty when the specs agree."""
        a = self.to_dict()
        b = other.to_dict() if isinstance(other, PreprocessSpec) else dict(other)
        return [f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """uint8 RGB (3, H, W) tensor -> PIL RGB image (copies to host memory)."""
    arr = x.detach().to("cpu").permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(arr, mode="RGB")


def pil_resize(img: Image.Image, size: tuple[int, int], resize_filter: str = "bicubic") -> Image.Image:
    """Pillow resize to exactly (H, W), as torchvision ``Resize((H, W))`` does on a PIL image.

    Pillow's uint8 path is antialiased (the kernel support scales with the downscale factor) and rounds
    after each of its two separable passes; no torch resize reproduces it bit for bit.
    """
    h, w = size
    return img.resize((w, h), _PIL_FILTERS[resize_filter])


CROPS = ("none", "center-square", "center-square-floor")
RESIZE_MODES = ("exact", "short-edge")


def short_edge_size(h: int, w: int, s: int) -> tuple[int, int]:
    """(H, W) of torchvision ``Resize(s)`` (an int) on an ``h x w`` image: the short edge to s, the long edge to
    ``int(s * long / short)`` (truncated, as torchvision does)."""
    if h <= w:
        return (s, int(s * w / h))
    return (int(s * h / w), s)


def crop_box(w: int, h: int, crop: str) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of ``crop`` (:data:`CROPS`) in a ``w x h`` image; None for ``"none"``.

    ``center-square``: torchvision ``CenterCrop`` rounding (``round((w - s) / 2)``); ``center-square-floor``:
    google-research cmmd ``io_util._center_crop_and_resize`` (``(w - s) // 2``). They differ by one pixel when
    ``w - s`` is odd.
    """
    if crop == "none":
        return None
    s = min(w, h)
    if crop == "center-square":
        left, top = int(round((w - s) / 2.0)), int(round((h - s) / 2.0))
    elif crop == "center-square-floor":
        left, top = (w - s) // 2, (h - s) // 2
    else:
        from ..errors import FDEvalError

        raise FDEvalError(f"unknown crop {crop!r}; choose one of {', '.join(CROPS)}")
    return left, top, left + s, top + s


def center_crop_square(img: Image.Image, crop: str = "center-square") -> Image.Image:
    """Crop the central square whose side is the shorter image side (GPIC App. B.1, torchvision rounding;
    ``crop="center-square-floor"``: cmmd's floor rule)."""
    box = crop_box(*img.size, crop)
    return img if box is None or box == (0, 0, *img.size) else img.crop(box)


def crop_tensor(x: torch.Tensor, crop: str) -> torch.Tensor:
    """:func:`center_crop_square` on a (..., H, W) tensor: the same pixels (a crop selects, it never computes)."""
    box = crop_box(x.shape[-1], x.shape[-2], crop)
    if box is None:
        return x
    left, top, right, bottom = box
    return x[..., top:bottom, left:right]


@dataclass(frozen=True)
class HostPrepare:
    """The per-image host step of an extractor, as a small picklable callable for DataLoader workers.

    PIL RGB image -> uint8 (3, H, W): the spec's crop (always on the host: it makes a batch's images one
    size), then Pillow resize to ``size`` when given (reference protocols that resize with Pillow), else the
    image otherwise unchanged (protocols that resize on the device).
    """

    size: tuple[int, int] | None
    resize_filter: str = "bicubic"
    crop: str = "none"
    short_edge: bool = False  # size[0] is the short edge's length, the aspect ratio is kept (Resize(S))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self.crop != "none":
            img = center_crop_square(img, self.crop)
        if self.size is not None:
            size = self.size
            if self.short_edge:
                w, h = img.size
                size = short_edge_size(h, w, self.size[0])
            img = pil_resize(img, size, self.resize_filter)
        return pil_to_tensor(img)


@dataclass(frozen=True)
class SourceTransform:
    """A named image transform applied to a source before any extractor (e.g. to reference images).

    ``center-crop-256`` is GPIC's reference preprocessing (paper App. B.1): centre crop to a square along the
    longer side, then Pillow bicubic to 256x256; the extractor's own preprocessing follows.
    """

    name: str
    crop: str = "none"  # "none" | "center-square"
    size: tuple[int, int] | None = None  # (H, W) Pillow resize after the crop
    resize_filter: str = "bicubic"

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.crop == "center-square":
            img = center_crop_square(img)
        if self.size is not None and img.size != (self.size[1], self.size[0]):
            img = pil_resize(img, self.size, self.resize_filter)
        return img

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "crop": self.crop, "size": list(self.size) if self.size else None,
                "resize_filter": self.resize_filter}


SOURCE_TRANSFORMS: dict[str, SourceTransform | None] = {
    "none": None,
    "center-crop-256": SourceTransform("center-crop-256", crop="center-square", size=(256, 256)),
}


def source_transform(name: str | None) -> SourceTransform | None:
    """Look up a named source transform ("none", "center-crop-256")."""
    from ..errors import FDEvalError

    if name is None:
        return None
    if name not in SOURCE_TRANSFORMS:
        raise FDEvalError(f"unknown image transform {name!r}; choose one of {', '.join(SOURCE_TRANSFORMS)}")
    return SOURCE_TRANSFORMS[name]
