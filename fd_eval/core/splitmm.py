"""Matmul paths for Linear layers: IEEE float32, float32-accurate split TF32 ("3xTF32"), and FP8 (e4m3).

``split3`` computes ``x @ W.T`` on TF32 tensor cores with float32 accuracy: ``x = x_hi + x_lo`` with ``x_hi``
the nearest TF32 value of ``x`` and ``x_lo`` the TF32 rounding of the remainder (likewise ``W``, split once when
prepared), then ``y = x_hi W_hi + x_hi W_lo + x_lo W_hi`` with float32 accumulation, as ONE matmul over the
concatenated inner dimension ``[x_hi | x_hi | x_lo] @ [W_hi | W_lo | W_hi].T`` (``form="cat"``) or as three
accumulated matmuls (``form="sum"``: no 3x-wide activation copy). The dropped ``x_lo W_lo`` term is ~2^-22
relative: the result is as accurate as an IEEE float32 GEMM (which has its own ~2^-24 sqrt(K) rounding).

Every operand is TF32-representable before the matmul, so a TF32 tensor core multiplies it exactly (11-bit x
11-bit significands fit float32) whatever rounding cuBLAS applies to its inputs. Open question, for a GPU check
(``benchmarks/bench_gpu.py`` measures it): whether cuBLAS/cuDNN TF32 rounds float32 inputs to nearest (as
:func:`round_tf32` here; CUTLASS's 3xTF32 kernels use ``cvt.rna.tf32.f32``, round-to-nearest ties-away) or
truncates the 13 low mantissa bits (:func:`trunc_tf32`); it matters only for emulating plain TF32 (fast mode
estimates), not for ``split3``. On a CPU there are no tensor cores: ``emulate=True`` runs the same split with an
IEEE float32 matmul, whose products of TF32 operands are exact too -- the GPU computation up to the order of the
float32 accumulation.

``fp8``: per-output-channel weight scales (once), per-row dynamic activation scales, e4m3 operands,
``torch._scaled_mm`` (Hopper+, bfloat16 output) on CUDA; emulated on a CPU (cast to ``float8_e4m3fn`` and back,
float32 matmul). Shapes the FP8 kernel cannot take (inner or output dimension not a multiple of 16) fall back to
the bfloat16 of fast mode.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MATMUL_PATHS = ("ieee", "split3", "fp8")
SPLIT3_FORMS = ("cat", "sum")
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_MANT_DROP = 13  # float32 has 23 explicit mantissa bits, TF32 10


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 -> the nearest TF32 value (10 explicit mantissa bits, ties to even), as float32, same shape.

    Integer bit operations on the float32 pattern (bit-exact, any device): add half an ulp of TF32 (minus one
    unless the kept last bit is odd), clear the 13 dropped bits. A carry into the exponent is the correct
    rounding up (to infinity above TF32's largest finite value, as RNE does); Inf and NaN pass unchanged.
    """
    x = x.contiguous().to(torch.float32)
    u = x.view(torch.int32)
    r = (u + (0xFFF + ((u >> _MANT_DROP) & 1))) & ~0x1FFF  # int32 wraps like the uint32 pattern it is
    special = (u & 0x7F800000) == 0x7F800000
    return torch.where(special, u, r).view(torch.float32)


def trunc_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 -> TF32 by truncation (the 13 low mantissa bits cleared), for the rounding-mode question above."""
    return (x.contiguous().to(torch.float32).view(torch.int32) & ~0x1FFF).view(torch.float32)


def split_tf32(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)``: ``hi = round_tf32(x)``, ``lo = round_tf32(x - hi)`` (the subtraction is exact); both float32
    holding TF32 values, ``hi + lo`` equal to ``x`` within ~2^-22 relative."""
    hi = round_tf32(x)
    return hi, round_tf32(x - hi)


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> (e4m3 (M, K), float32 (M, 1) scales) with ``x ~= q.float() * scale`` per row (amax -> 448).

    All-zero rows get scale 1 (their codes are zero)."""
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


class PreparedLinear(torch.nn.Module):
    """``y = x W^T + b`` of one ``nn.Linear``-like weight by a matmul path; weights prepared once.

    Args:
        weight: float32 (N, K); bias: float32 (N,) or None. Not copied for ``ieee`` (the model's own tensors).
        path: ``"ieee"`` (``F.linear``), ``"split3"`` or ``"fp8"`` (module docstring).
        emulate: run split3/fp8 with float32 CPU arithmetic (bit-level TF32 / e4m3 rounding, float32 products).
        form: ``split3`` as one concatenated matmul (``"cat"``) or three accumulated ones (``"sum"``).

    ``forward``: (..., K) -> (..., N), float32 (ieee/split3; the caller's numerics context must allow TF32 for
    split3 on CUDA, see :func:`fd_eval.extractors.precision.split_numerics`); ``fp8``: bfloat16 on CUDA, float32
    emulated.
    The prepared tensors are buffers of this module, not of the model: the model's state dict never changes.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, path: str = "ieee",
                 emulate: bool = False, form: str = "cat"):
        super().__init__()
        if path not in MATMUL_PATHS or form not in SPLIT3_FORMS:
            raise ValueError(f"unknown matmul path {path!r} / form {form!r}")
        self.path, self.emulate, self.form = path, emulate, form
        self.out_features, self.in_features = weight.shape
        self.bias = bias
        if path == "fp8" and (self.in_features % 16 or self.out_features % 16) and not emulate:
            self.path = path = "bf16"  # _scaled_mm needs multiples of 16: this layer stays in fast mode's dtype
        if path in ("ieee", "bf16"):
            self.weight = weight
        elif path == "split3":
            hi, lo = split_tf32(weight.detach())
            if form == "cat":
                self.register_buffer("w3", torch.cat([hi, lo, hi], dim=1), persistent=False)  # (N, 3K)
            else:
                self.register_buffer("w_hi", hi, persistent=False)
                self.register_buffer("w_lo", lo, persistent=False)
        else:
            q, s = quantize_fp8_rows(weight.detach())
            self.register_buffer("w_q", q, persistent=False)  # (N, K) e4m3; .t() is the column-major operand
            self.register_buffer("w_scale", s.t().contiguous(), persistent=False)  # (1, N)

    def describe(self) -> str:
        return {"ieee": "ieee-fp32", "bf16": "bf16", "split3": f"3xtf32-{self.form}", "fp8": "fp8-e4m3-rowwise"
                }[self.path] + ("-emulated" if self.emulate and self.path in ("split3", "fp8") else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.path in ("ieee", "bf16"):
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.path == "split3":
            xh, xl = split_tf32(x2)
            if self.form == "cat":
                y = F.linear(torch.cat([xh, xh, xl], dim=1), self.w3, self.bias)
            else:
                y = F.linear(xh, self.w_hi, self.bias)
                y = y.addmm_(xh, self.w_lo.t()).addmm_(xl, self.w_hi.t())
            return y.reshape(*lead, self.out_features)
        q, s = quantize_fp8_rows(x2)
        if self.emulate:
            with torch.autocast(x.device.type, enabled=False):
                y = F.linear(q.float() * s, self.w_q.float() * self.w_scale.t(),
                             None if self.bias is None else self.bias.float())
        else:
            y = torch._scaled_mm(q, self.w_q.t(), scale_a=s, scale_b=self.w_scale, out_dtype=torch.bfloat16)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)
