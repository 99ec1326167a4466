"""The DINOv2 forward pass as fd-eval runs it: timm's ViT computation, only the work the CLS feature needs.

:class:`ViTRunner` reads (never changes) a timm ``VisionTransformer`` built by :func:`fd_eval.extractors.dinov2.
build_model` and computes ``model(x)`` (final-norm CLS token) with two differences:

* the last block computes its attention output, MLP and the final norm for the CLS token only (keys and values
  still for every token): its query/projection/MLP work on 1 of 257 tokens saves ~3% of ViT-L's FLOPs
  (~2/3 of one block of 24), in every precision mode;
* every Linear layer (and, on the split path, the patch embedding as a matmul over 14x14x3 patches) goes through
  a :class:`fd_eval.core.splitmm.PreparedLinear` of one matmul path: ``ieee`` (``F.linear``, what the model's
  modules compute), ``split3`` (float32-accurate 3xTF32) or ``fp8``.

Attention is ``F.scaled_dot_product_attention`` on float32 (or autocast bfloat16) q, k, v as in timm. On CUDA,
float32 SDPA has no flash or cuDNN kernel (both are 16-bit only): PyTorch picks the memory-efficient kernel
(xformers' CUTLASS FMHA), whose ``DefaultGemmType`` for float on sm80+ is ``OpClassTensorOp`` with
``OpMultiplyAddFastF32`` -- CUTLASS's 3xTF32, float32-accurate, independent of the TF32 flags (PyTorch's
``aten/src/ATen/native/transformers/cuda/mem_eff_attention/gemm_kernel_utils.h``). The split path's numerics
context (:func:`fd_eval.extractors.precision.split_numerics`) allows TF32 for cuBLAS and therefore restricts SDPA to
that
kernel, so the math fallback (plain matmuls, which would then be TF32) cannot run silently. To be confirmed on a
GPU with the profiler (``benchmarks/bench_gpu.py`` records the kernel names).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..core.splitmm import PreparedLinear

ROW_PAD = 16  # the CLS-only last block runs its B rows padded to a multiple of this (see RunBlock.forward)
QUERY_ROWS = 32  # ... and attends with this many queries (the CLS token's row is kept; see RunBlock.forward)


class RunBlock(torch.nn.Module):
    """One timm ``Block`` (pre-norm attention + MLP with layer scales), its Linear layers as ``make_linear``
    gives them. ``cls_only``: the output is (B, 1, C), the CLS token's, from keys/values of every token."""

    def __init__(self, blk: torch.nn.Module, make_linear: Callable[[torch.nn.Module], torch.nn.Module],
                 cls_only: bool = False):
        super().__init__()
        attn, mlp = blk.attn, blk.mlp
        if getattr(attn, "gate", None) is not None:  # guard against a timm config this code does not mirror
            raise ValueError("gated attention is not a DINOv2 block")
        self.norm1, self.ls1, self.norm2, self.ls2 = blk.norm1, blk.ls1, blk.norm2, blk.ls2
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.q_norm, self.k_norm, self.attn_norm = attn.q_norm, attn.k_norm, attn.norm
        self.qkv, self.proj = make_linear(attn.qkv), make_linear(attn.proj)
        self.fc1, self.fc2, self.act, self.mlp_norm = make_linear(mlp.fc1), make_linear(mlp.fc2), mlp.act, mlp.norm
        self.glu = hasattr(mlp, "gate_last")  # timm GluMlp (SwiGLUPacked: act(first half) * second half)
        self.gate_last = bool(getattr(mlp, "gate_last", False))
        self.cls_only = cls_only

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.glu:
            x1, x2 = x.chunk(2, dim=-1)
            x = x1 * self.act(x2) if self.gate_last else self.act(x1) * x2
        else:
            x = self.act(x)
        return self.fc2(self.mlp_norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, C), or (B, 1, C) with ``cls_only``."""
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.cls_only:
            # QUERY_ROWS queries, not 1: PyTorch's CPU attention kernel takes another path for 1 or 2 queries,
            # whose rounding depends on the batch size (measured); with a full query block the CLS row is
            # bit-identical to the all-token computation. Costs 32/257 of one block's attention.
            q, x, n = q[:, :, :QUERY_ROWS], x[:, :1], 1
        a = F.scaled_dot_product_attention(q, k, v)[:, :, :n]
        a = a.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        if self.cls_only:
            # B rows only: pad them to a multiple of ROW_PAD so that every batch size takes the GEMM kernels of
            # the full-token blocks (measured on oneDNN: fewer than 8 rows take other kernels, other roundings),
            # which keeps each row's result independent of the batch it came in.
            pad = -b % ROW_PAD
            a, x = (torch.cat([t.reshape(b, -1), t.new_zeros(pad, t.shape[-1])]) for t in (a, x))
        x = x + self.ls1(self.proj(self.attn_norm(a)))
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x[:b].reshape(b, 1, -1) if self.cls_only else x


class ViTRunner(torch.nn.Module):
    """uint8-free float32 (B, 3, 224, 224) model input -> (B, D) final-norm CLS features of ``model``.

    Args:
        model: the timm ``VisionTransformer`` (shared, not copied: its parameters are read, never written).
        path: matmul path of every Linear (``"ieee"``, ``"split3"``, ``"fp8"``; see :mod:`fd_eval.core.splitmm`).
        emulate: split3/fp8 by float32 CPU arithmetic (tests and CPU runs).
        form: split3 as one concatenated matmul (``"cat"``) or three (``"sum"``).

    ``blocks`` is a ``Sequential`` of all blocks but the last (identical graphs: compiled one by one by
    :class:`fd_eval.extractors.precision.LazyCompiled` with ``regions="blocks"``); ``last`` is the CLS-only last block.
    On the split path the patch embedding is a matmul over (B, 256, 588) patches, so it is split too; on the
    others it is the model's own convolution.
    """

    def __init__(self, model: torch.nn.Module, path: str = "ieee", emulate: bool = False, form: str = "cat"):
        super().__init__()

        def make_linear(m: torch.nn.Module) -> PreparedLinear:
            return PreparedLinear(m.weight, m.bias, path, emulate, form)

        pe = model.patch_embed
        self.patch_embed = pe
        self.patch_size = tuple(pe.proj.kernel_size)
        self.patch_linear = None
        if path == "split3":
            w = pe.proj.weight
            self.patch_linear = PreparedLinear(w.reshape(w.shape[0], -1), pe.proj.bias, path, emulate, form)
        self.cls_token, self.reg_token, self.pos_embed = model.cls_token, model.reg_token, model.pos_embed
        self.no_embed_class = bool(model.no_embed_class)
        self.norm_pre, self.norm = model.norm_pre, model.norm
        blocks = list(model.blocks)
        self.blocks = torch.nn.Sequential(*[RunBlock(b, make_linear) for b in blocks[:-1]])
        self.last = RunBlock(blocks[-1], make_linear, cls_only=True)
        self.matmul = make_linear(blocks[0].attn.qkv).describe()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, prefix + patches, D) tokens with position embeddings (timm's ``_pos_embed``)."""
        if self.patch_linear is None:
            x = self.patch_embed(x)
        else:
            b, c, h, w = x.shape
            ph, pw = self.patch_size
            x = x.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * ph * pw)
            x = self.patch_embed.norm(self.patch_linear(x))
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:
            x = torch.cat(prefix + [x + self.pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + self.pos_embed
        return self.norm_pre(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.embed(x))
        return self.norm(self.last(x))[:, 0]
