"""Pillow's uint8 resize (``Image.resize`` of an RGB image), bit for bit, as tensor ops on any device.

The reference DINOv2 protocol resizes with Pillow. Pillow's 8-bit resampling is integer arithmetic: per output
pixel, ``clip8((2**21 + sum_k pixel[k] * coef[k]) >> 22)`` with coefficients rounded to 22 fractional bits,
one separable pass per axis and a uint8 intermediate (``libImaging/Resample.c``: ``precompute_coeffs``,
``normalize_coeffs_8bpc``, ``ImagingResampleInner``). Reproducing those integers exactly makes the resize a
pair of matrix products that can run on the GPU: the coefficients are computed here on the host in double
precision exactly as Pillow computes them, and each pass is a float64 matrix product whose terms and partial
sums are integers below 2**53, so every summation order gives the same exact result.

Why: decoding + Pillow resize of a 256x256 PNG costs ~2.7 ms of a CPU core, of which the resize is ~1.0 ms; doing
the resize on the device let the same DataLoader workers feed 1.4-1.6x more images per second (this 2-core
machine, ``benchmarks/bench_pipeline.py`` part 2), and lets :class:`fd_eval.FDMetric` keep a training loop's
batches on the GPU, with the reference
pixels. Cost, from the FLOP count (not yet measured on a GPU): 256 -> 224 is ~0.17 GFLOP of float64 per image,
~1 ms per 256-image batch on GPUs with full-rate float64 (A100, H100, H200), ~30 ms on consumer GPUs whose
float64 runs at 1/64 rate (~10% of a ViT-L batch there). On a CPU it is 5.5 ms per image against Pillow's 1.3 ms
(``python benchmarks/bench_resize.py --device cpu``), which is why CPU runs keep Pillow.

:func:`pil_resize_checked` also checks the first image of every new (device, size) against Pillow itself and
falls back to Pillow (with a warning) if they ever differ, so a platform quirk cannot change a number.
"""
from __future__ import annotations

import functools
import threading
import warnings

import numpy as np
import torch

PRECISION_BITS = 32 - 8 - 2  # Resample.c: 8-bit results, 2 bits of headroom for negative lobes


def _bicubic(x: float) -> float:
    a = -0.5  # Pillow's (and Keys') a
    if x < 0.0:
        x = -x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _bilinear(x: float) -> float:
    if x < 0.0:
        x = -x
    return 1.0 - x if x < 1.0 else 0.0


# name -> (filter, support), Resample.c's BICUBIC and BILINEAR; other Pillow filters are not used by any protocol
FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0)}


@functools.lru_cache(maxsize=64)
def coefficients(in_size: int, out_size: int, resize_filter: str = "bicubic") -> np.ndarray:
    """Pillow's fixed-point resampling matrix for one axis: int64 (out_size, in_size), rows = output pixels.

    Entry ``[o, i]`` is the integer weight (22 fractional bits) of input pixel ``i`` in output pixel ``o``, zero
    outside Pillow's window; the same doubles, in the same order, as ``precompute_coeffs`` with the box
    (0, in_size), then ``normalize_coeffs_8bpc``'s rounding.
    """
    fn, base_support = FILTERS[resize_filter]
    scale = in_size / out_size  # (double)(in1 - in0) / outSize; the float box edges are exact integers here
    filterscale = max(scale, 1.0)
    support = base_support * filterscale
    inv_filterscale = 1.0 / filterscale
    k = np.zeros((out_size, in_size), dtype=np.int64)
    one = 1 << PRECISION_BITS
    for xx in range(out_size):
        center = (xx + 0.5) * scale  # in0 + (xx + 0.5) * scale with in0 = 0
        xmin = max(int(center - support + 0.5), 0)  # C's (int) truncates toward zero, as int() does
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = [fn((x + xmin - center + 0.5) * inv_filterscale) for x in range(xmax)]
        ww = 0.0
        for v in w:  # summed in order, as the C loop does
            ww += v
        if ww != 0.0:
            w = [v / ww for v in w]
        for x, v in enumerate(w):
            k[xx, xmin + x] = int(-0.5 + v * one) if v < 0 else int(0.5 + v * one)
    return k


@functools.lru_cache(maxsize=64)
def _device_coefficients(in_size: int, out_size: int, resize_filter: str, device: torch.device) -> torch.Tensor:
    """:func:`coefficients` as float64 on ``device``, made once: a host-to-GPU copy per batch would block the
    host until the GPU has finished its queued work."""
    with torch.inference_mode(False):  # cached across calls, so an ordinary tensor even when first made in one
        return torch.from_numpy(coefficients(in_size, out_size, resize_filter)).to(device, torch.float64)


def _pass(x: torch.Tensor, k: torch.Tensor, dim: int) -> torch.Tensor:
    """One resampling pass along ``dim`` (-1: width, -2: height) of integer-valued float64 (..., H, W).

    float64 keeps the sums exact (|terms| < 2**31, at most in_size of them), so the device's summation order
    cannot matter; the result is Pillow's ``clip8``: arithmetic shift right by 22 bits, clamped to 0..255.
    """
    if dim == -1:
        s = torch.matmul(x, k.T)
    else:
        s = torch.matmul(k, x)
    return torch.floor((s + float(1 << (PRECISION_BITS - 1))) * (1.0 / (1 << PRECISION_BITS))).clamp_(0, 255)


def pil_resize_tensor(x: torch.Tensor, size: tuple[int, int], resize_filter: str = "bicubic",
                      chunk: int | None = None, max_bytes: int = 512 * 2**20) -> torch.Tensor:
    """``Image.fromarray(img).resize((w, h), filter)`` for every image of a batch, on ``x``'s device.

    Args:
        x: uint8 (N, C, H, W), values 0..255, any device.
        size: (h, w) of the output.
        resize_filter: "bicubic" or "bilinear".
        chunk: images per float64 block; None: as many as fit in ``max_bytes`` of temporaries (~16 bytes per input
            pixel and channel; at least one image), so that large photos do not exhaust the GPU's memory.

    Returns:
        uint8 (N, C, h, w), equal to Pillow's output (``x`` itself when the size is unchanged, where Pillow copies).
    """
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"pil_resize_tensor expects uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
    if resize_filter not in FILTERS:
        raise ValueError(f"resize filter {resize_filter!r} is not implemented; choose one of {', '.join(FILTERS)}")
    (in_h, in_w), (out_h, out_w) = x.shape[-2:], size
    need_h, need_v = out_w != in_w, out_h != in_h
    if not (need_h or need_v):
        return x
    # Resample.c: the vertical pass goes first when the height shrinks more than twice as much as the width.
    # The uint8 rounding between passes makes the order part of the result.
    horizontal_first = not (in_h - out_h > 0 and in_h - out_h > (in_w - out_w) * 2)
    kh = _device_coefficients(in_w, out_w, resize_filter, x.device) if need_h else None
    kv = _device_coefficients(in_h, out_h, resize_filter, x.device) if need_v else None
    passes = [(kh, -1), (kv, -2)] if horizontal_first else [(kv, -2), (kh, -1)]
    if chunk is None:
        per_image = 16 * x.shape[1] * max(in_h, out_h) * max(in_w, out_w)
        chunk = max(1, min(x.shape[0], max_bytes // per_image))
    out = torch.empty((x.shape[0], x.shape[1], out_h, out_w), dtype=torch.uint8, device=x.device)
    for i in range(0, x.shape[0], chunk):
        y = x[i:i + chunk].to(torch.float64)
        for k, dim in passes:
            if k is not None:
                y = _pass(y, k, dim)
        out[i:i + chunk] = y.to(torch.uint8)
    return out


def pil_resize_host(x: torch.Tensor, size: tuple[int, int], resize_filter: str = "bicubic") -> torch.Tensor:
    """The same resize done by Pillow itself (image by image on the host); uint8 (N, 3, h, w) on ``x``'s device."""
    from .preprocess import pil_resize, pil_to_tensor, tensor_to_pil

    out = torch.stack([pil_to_tensor(pil_resize(tensor_to_pil(im), size, resize_filter)) for im in x.cpu()])
    return out.to(x.device)


_checked: dict[tuple, bool] = {}
_lock = threading.Lock()


def pil_resize_checked(x: torch.Tensor, size: tuple[int, int], resize_filter: str = "bicubic") -> torch.Tensor:
    """:func:`pil_resize_tensor`, with the first image of each new (device type, input size, size, filter)
    compared against Pillow; on a difference (never seen; a guard against a platform's float64 arithmetic) this
    key warns once and is resized by Pillow on the host from then on. RGB uint8 (N, 3, H, W) in and out."""
    key = (x.device.type, tuple(x.shape[-2:]), tuple(size), resize_filter)
    ok = _checked.get(key)
    if ok is False:
        return pil_resize_host(x, size, resize_filter)
    y = pil_resize_tensor(x, size, resize_filter)
    if ok is None and x.shape[0] > 0:
        same = torch.equal(y[:1].cpu(), pil_resize_host(x[:1], size, resize_filter).cpu())
        with _lock:
            _checked[key] = same
        if not same:
            warnings.warn(f"fd-eval: the device Pillow-resize of {tuple(x.shape[-2:])} -> {tuple(size)} images on "
                          f"{x.device.type} differs from Pillow's; resizing those with Pillow on the host instead "
                          "(slower, same numbers); please report this", RuntimeWarning, stacklevel=2)
            return pil_resize_host(x, size, resize_filter)
    return y

