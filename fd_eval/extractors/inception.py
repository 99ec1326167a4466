"""Inception-v3 (2015-12-05 TF graph) pool3 features for legacy FID, in its two published lineages.

Both lineages run the same network on the same weights (``pt_inception-2015-12-05-6726825d.pth``) and differ
only in how a uint8 image becomes the 299x299 network input:

* ``inception-v3-tf`` (TF-exact FID: TTUR, ADM evaluator, StyleGAN/EDM2, torch-fidelity, clean-fid
  ``legacy_tensorflow``): float 0..255 -> TF1 ``resize_bilinear`` (align_corners=False, no half-pixel
  centres, no antialias) to 299x299 -> (x - 128) / 128.
* ``inception-v3-pt`` (pytorch-fid, dgm-eval, the GPIC appendix): x / 255 -> ``F.interpolate(bilinear,
  align_corners=False)`` to 299x299 -> 2x - 1.

Even at 299x299 input, where neither resamples, the two differ: TF maps 0..255 to [-1, 127/128], pytorch-fid
to [-1, 1]. Their statistics are never comparable; the :class:`PreprocessSpec` saved with the statistics says
which is which.
"""
from __future__ import annotations

import functools
import os
from dataclasses import replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE

from ..errors import FDEvalError, InputRangeError, WeightsError
from ..util.io_utils import sha256_file_cached
from .base import Extractor, apply_spec, register_extractor
from .precision import Precision
from .preprocess import PreprocessSpec
from .weights import WeightsSource, check_keys, load_state_dict, resolve_weights

FEATURE_DIM = 2048
INPUT_SIZE = 299

# sha256 recorded for both the pytorch-fid release and torch-fidelity's copy (95,628,359 bytes, 566 tensors);
# the file name carries its first 8 hex digits, torch-hub style.
INCEPTION_WEIGHTS = WeightsSource(
    url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
        "pt_inception-2015-12-05-6726825d.pth",
    filename="pt_inception-2015-12-05-6726825d.pth",
    sha256="6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
    approx_mib=91,  # 23.9M float32 parameters (with the 1008-class logits layer FID does not use)
)

SPEC_TF = PreprocessSpec(
    resize_library="tf1",
    resize_filter="bilinear",
    antialias=False,
    size=(INPUT_SIZE, INPUT_SIZE),
    scale=1.0,
    mean=(128.0, 128.0, 128.0),
    std=(128.0, 128.0, 128.0),
    align_corners=False,
    reference="torch-fidelity 0.4.0 FeatureExtractorInceptionV3 '2048' (= TTUR/ADM/StyleGAN TF graph): "
              "float 0..255, TF1 resize_bilinear to 299x299 (align_corners=False, no half-pixel centres, "
              "no antialias), then (x - 128) / 128",
)

SPEC_PT = PreprocessSpec(
    resize_library="torch",
    resize_filter="bilinear",
    antialias=False,
    size=(INPUT_SIZE, INPUT_SIZE),
    scale=255.0,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    align_corners=False,
    reference="pytorch-fid 0.3.0 InceptionV3([3]) (= dgm-eval): ToTensor x / 255, F.interpolate(bilinear, "
              "align_corners=False, antialias=False) to 299x299 (also at 299x299), then 2x - 1",
)


# --- TF1 resize_bilinear ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _tf1_taps(in_size: int, out_size: int, device: torch.device,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source taps of TF1 ``resize_bilinear`` (align_corners=False) along one axis.

    TF1 maps output index i to source coordinate ``i * (in / out)`` (no half-pixel offset) with the scale
    rounded to float32; the left tap is its floor, the right tap the next pixel clamped to the border, and
    the weight the fractional part. Returns (lo, hi) int64 (out_size,) and frac (out_size,) of ``dtype``.
    """
    # Cached across calls, so made as ordinary tensors even when first needed under inference_mode.
    with torch.inference_mode(False):
        # In float32 this is TF1's float32 product; torch-fidelity's 'slow' path computes it the same way.
        src = torch.arange(out_size, dtype=dtype, device=device) * torch.tensor(
            in_size / out_size, dtype=torch.float32, device=device)
        lo = src.long()  # src >= 0, so truncation is floor
        hi = (lo + 1).clamp_max(in_size - 1)
        return lo, hi, src - lo.to(dtype)


def resize_bilinear_tf1(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """TensorFlow 1.x ``tf.image.resize_bilinear(x, size, align_corners=False)`` on a float NCHW tensor.

    Bit-identical on CPU (float32 and float64) to torch-fidelity's ``interpolate_bilinear_2d_like_tensorflow1x``:
    the same float32 coordinates and the same ``a + (b - a) * t`` interpolation, first along the width, then
    along the height. Unlike ``F.interpolate(align_corners=False)`` there is no half-pixel shift, so a
    downscale by an integer factor k samples every k-th pixel, an upscale by k keeps the source pixels at
    every k-th output position and repeats the last source pixel at the bottom/right border.

    Args:
        x: (N, C, H, W) float tensor (any value range; 0..255 for FID).
        size: (H', W') output size.

    Returns:
        (N, C, H', W') tensor of x's dtype, on x's device.
    """
    if not x.is_floating_point() or x.ndim != 4:
        raise InputRangeError(f"resize_bilinear_tf1 expects a float (N, C, H, W) tensor, got {x.dtype} "
                              f"{tuple(x.shape)}")
    (h, w), (oh, ow) = x.shape[-2:], size
    ylo, yhi, dy = _tf1_taps(h, oh, x.device, x.dtype)
    xlo, xhi, dx = _tf1_taps(w, ow, x.device, x.dtype)
    # Gather the two source rows of every output row once, then interpolate along the width for both.
    rows = x.index_select(2, torch.cat([ylo, yhi]))
    left, right = rows.index_select(3, xlo), rows.index_select(3, xhi)
    horiz = left + (right - left) * dx
    top, bottom = horiz[:, :, :oh], horiz[:, :, oh:]
    return top + (bottom - top) * dy.view(oh, 1)


def resize_bilinear_torch(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear",
                          align_corners: bool = False, antialias: bool = False) -> torch.Tensor:
    """pytorch-fid's resize: ``F.interpolate(bilinear, align_corners=False)``, no antialias, NCHW-contiguous
    (``mode``, ``align_corners``, ``antialias``: as the preprocessing spec says; these defaults are pytorch-fid's).

    The input is made NCHW-contiguous first, as pytorch-fid's ToTensor/collate batches are: the CPU kernel
    for channels-last inputs is a different code path.
    """
    return F.interpolate(x.contiguous(), size=size, mode=mode, align_corners=align_corners, antialias=antialias)


# --- network -----------------------------------------------------------------------------------------------
def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TF's SAME-padded average pool divides by the number of real pixels under the window (torchvision's
    # Inception3 counts the zero padding).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class _InceptionA(InceptionA):
    """torchvision's InceptionA with the 2015-12-05 graph's pool branch (padding excluded from the average)."""

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_tf_avg_pool(x)),
        ]


class _InceptionC(InceptionC):
    """torchvision's InceptionC with the 2015-12-05 graph's pool branch (padding excluded from the average)."""

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            d = conv(d)
        return [self.branch1x1(x), b7, d, self.branch_pool(_tf_avg_pool(x))]


class _InceptionE(InceptionE):
    """torchvision's InceptionE with the 2015-12-05 graph's pool branch.

    ``pool`` is the pooling before the pool-branch 1x1 conv: the graph's ``mixed_9`` (Mixed_7b) averages
    without padding, its ``mixed_10`` (Mixed_7c) takes a 3x3 max (where the paper has an average).
    """

    def __init__(self, in_channels: int, pool: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(in_channels)
        self._pool = pool

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return [
            self.branch1x1(x),
            torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1),
            torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1),
            self.branch_pool(self._pool(x)),
        ]


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 up to pool3: (N, 3, 299, 299) float32 in [-1, 1] -> (N, 2048) float32.

    Submodule names are torchvision's ``Inception3`` names, so the checkpoint's keys load unchanged; the
    1008-class ``fc`` of the checkpoint is not part of the feature path and is not kept.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = _InceptionA(192, pool_features=32)
        self.Mixed_5c = _InceptionA(256, pool_features=64)
        self.Mixed_5d = _InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = _InceptionC(768, channels_7x7=128)
        self.Mixed_6c = _InceptionC(768, channels_7x7=160)
        self.Mixed_6d = _InceptionC(768, channels_7x7=160)
        self.Mixed_6e = _InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = _InceptionE(1280, pool=_tf_avg_pool)
        self.Mixed_7c = _InceptionE(2048, pool=_max_pool_3x3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # ... (N, 2048, 8, 8)
        # pool3 in float32 even if the blocks ran under bfloat16 autocast (not a mode fd-eval uses for Inception,
        # but bench_precision measures it), so the features are not rounded to bf16 at the very end; a no-op in
        # float32.
        return torch.flatten(F.adaptive_avg_pool2d(x.float(), (1, 1)), 1)  # pool3: (N, 2048)


# --- checkpoints -------------------------------------------------------------------------------------------
# pytorch-fid's InceptionV3 module (blocks.i.j) -> torchvision names, for state dicts saved from that module.
_PYTORCH_FID_MODULE_PREFIXES = {
    "blocks.0.0.": "Conv2d_1a_3x3.", "blocks.0.1.": "Conv2d_2a_3x3.", "blocks.0.2.": "Conv2d_2b_3x3.",
    "blocks.1.0.": "Conv2d_3b_1x1.", "blocks.1.1.": "Conv2d_4a_3x3.",
    **{f"blocks.2.{i}.": f"Mixed_{n}." for i, n in enumerate(["5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e"])},
    **{f"blocks.3.{i}.": f"Mixed_{n}." for i, n in enumerate(["7a", "7b", "7c"])},
}
_FC_SHAPES = {"fc.weight": (1008, FEATURE_DIM), "fc.bias": (1008,)}


def checkpoint_format(keys: set[str]) -> str:
    """'torchvision' (pytorch-fid release file, torch-fidelity's copy) or 'pytorch-fid-module' (blocks.*)."""
    return "pytorch-fid-module" if any(k.startswith("blocks.") for k in keys) else "torchvision"


def _to_torchvision_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        for old, new in _PYTORCH_FID_MODULE_PREFIXES.items():
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


def load_inception(path: str | os.PathLike) -> FIDInceptionV3:
    """Build :class:`FIDInceptionV3` from a checkpoint, refusing missing, unexpected or misshapen tensors.

    Accepts the pytorch-fid release file (torchvision ``Inception3`` names + 1008-class ``fc``; torch-fidelity's
    ``weights-inception-2015-12-05-6726825d.pth`` has the same names) and state dicts of pytorch-fid's
    ``InceptionV3`` module (``blocks.i.j.`` names, no ``fc``). BatchNorm ``num_batches_tracked`` counters
    (unused in eval mode) may be present or not; float tensors are loaded as float32.
    """
    sd = load_state_dict(path)
    if checkpoint_format(set(sd)) == "pytorch-fid-module":
        sd = _to_torchvision_names(sd)
    with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
        model = FIDInceptionV3()
    expected = model.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")} | set(_FC_SHAPES)
    check_keys(path, set(expected) - optional, set(sd) - optional)
    for k, shape in _FC_SHAPES.items():
        if k in sd and tuple(sd[k].shape) != shape:
            raise WeightsError(f"{path}: {k} has shape {tuple(sd[k].shape)}, expected {shape} (1008 classes); "
                               "this is not the FID Inception (2015-12-05) checkpoint")
    for k, ref in expected.items():
        if k in sd and sd[k].shape != ref.shape:
            raise WeightsError(f"{path}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(ref.shape)}; "
                               "is it the FID Inception (2015-12-05) checkpoint?")
    state = {}
    for k, ref in expected.items():
        v = sd.get(k)
        if v is None:  # an absent num_batches_tracked counter
            v = torch.zeros((), dtype=torch.long)
        state[k] = v.to(torch.float32) if v.is_floating_point() else v.to(ref.dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model


# --- extractors --------------------------------------------------------------------------------------------
class InceptionExtractor(Extractor):
    """uint8 RGB (N, 3, H, W) of any size -> float32 (N, 2048) pool3 features, resized on the device.

    Precision: the resize and scaling (:meth:`model_input`) always run in float32 NCHW, in the reference's op
    order; the network runs through ``self.forward_model`` in the mode's numerics (:meth:`forward_input`):
    ``exact`` float32 with TF32 off (every convolution: cuDNN would use TF32 by default on Ampere+), ``fast``
    TF32 with the network and its input in ``channels_last`` (cuDNN's fast NHWC kernels). Not bfloat16: with
    random weights it moved FID by up to 1% (5.8% against an exact reference), TF32 by 0.14% (0.7%)
    (``benchmarks/bench_precision.py``). Both resizes are device ops, so GPU JPEG decoding (``decode="gpu"``) is
    always available.
    """

    fast_compute = "tf32"

    def __init__(self, name: str, spec: PreprocessSpec, model: FIDInceptionV3, weights_sha256: str | None,
                 device: str | torch.device | None = None):
        super().__init__(name, FEATURE_DIM, spec, model, weights_sha256, device)

    def _apply_precision(self) -> None:
        if self.precision.mode == "fp8":  # no FP8 path for convolutions: refuse before anything runs
            self.precision = Precision()
            self.preprocess_spec = replace(self.preprocess_spec, model_dtype="float32")
            raise FDEvalError(f"{self.name}: --precision fp8 is for DINOv2 only (its Linear layers); use fast "
                              "(TF32) or exact for Inception")
        self.channels_last = self.precision.fast
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model.to(memory_format=fmt)

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float32 (N, 3, 299, 299) network input, in the reference's exact op order.

        Every value comes from ``self.preprocess_spec`` (what the statistics record is what ran): ``tf1``:
        TF1 bilinear on 0..255 values, then ``(x / scale - mean) / std``; ``torch``: ``x / scale`` (ToTensor),
        ``F.interpolate(filter, align_corners, antialias)``, then ``(x - mean) / std``. With the registered
        specs this is ``(x - 128) / 128`` and ``2 x - 1`` bit for bit (scaling by 2 and 1/2 is exact in floats).
        """
        if self.preprocess_spec.resize_library not in ("tf1", "torch"):
            raise FDEvalError(f"{self.name}: resize library {self.preprocess_spec.resize_library!r} is not 'tf1' or "
                              "'torch'")
        return apply_spec(x, self.preprocess_spec, self.name)


def _build(name: str, spec: PreprocessSpec, weights: str | os.PathLike | None, device: Any,
           options: dict[str, Any]) -> InceptionExtractor:
    if options:
        raise FDEvalError(f"{name} takes no options, got {', '.join(sorted(options))}")
    path = resolve_weights(weights, INCEPTION_WEIGHTS, name)
    model = load_inception(path)
    return InceptionExtractor(name, spec, model, sha256_file_cached(path), device)


@register_extractor("inception-v3-tf", FEATURE_DIM,
                    "FID Inception-v3 pool3, TF-exact (TTUR/ADM/StyleGAN/torch-fidelity): TF1 bilinear, "
                    "(x-128)/128", weights=INCEPTION_WEIGHTS)
def inception_v3_tf(weights: str | os.PathLike | None = None, device: str | torch.device | None = None,
                    **options: Any) -> InceptionExtractor:
    """TF-exact FID features (alias ``fid``); ``weights``: a local checkpoint, else the official download."""
    return _build("inception-v3-tf", SPEC_TF, weights, device, options)


@register_extractor("inception-v3-pt", FEATURE_DIM,
                    "FID Inception-v3 pool3 as pytorch-fid/dgm-eval: torch bilinear, 2x-1", weights=INCEPTION_WEIGHTS)
def inception_v3_pt(weights: str | os.PathLike | None = None, device: str | torch.device | None = None,
                    **options: Any) -> InceptionExtractor:
    """pytorch-fid/dgm-eval FID features; ``weights``: a local checkpoint, else the official download."""
    return _build("inception-v3-pt", SPEC_PT, weights, device, options)
