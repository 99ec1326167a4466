"""CMMD (Jayasumana et al., CVPR 2024, "Rethinking FID"): MMD² between CLIP embeddings with a Gaussian kernel.

Exactly google-research ``cmmd/distance.py``: with x the reference and y the generated L2-normalised CLIP
ViT-L/14@336 embeddings (``clip-vitl14-336``), ``k(a, b) = exp(-gamma ||a - b||²)``, ``gamma = 1 / (2 sigma²)``,
``sigma = 10``, squared distances expanded as ``-2 a.b + ||a||² + ||b||²`` (that order), and the biased
(minimum-variance, V-statistic) estimator of Gretton et al. (2012), Eq. 5 -- every mean includes the diagonal::

    CMMD = 1000 * (mean_ij k(x_i, x_j) + mean_ij k(y_i, y_j) - 2 mean_ij k(x_i, y_j))

Differences from the reference, all deliberate: float64 throughout (the reference: float32 in JAX); every image
is used (the reference drops the images after its last full batch of 32); the sums run by blocks of
``block`` rows (memory O(block x N), never the N x N kernel matrix), in a fixed order, so the result does not
depend on batch sizes or process counts.

Streaming and merging: the kernel sums are additive over blocks of rows, so the state of a partial computation is
(sum, count) pairs; the reference's self-term ``sum_ij k(x_i, x_j)`` is computed once and stored with the
reference statistics (:func:`annotate_reference`, JSON metadata ``cmmd``), the cross term runs against the
reference's stored (N, 768) embeddings.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..outputs.stats import register_save_hook

SIGMA = 10.0  # cmmd/distance.py _SIGMA
SCALE = 1000.0  # cmmd/distance.py _SCALE: "to make the metric more human readable"
BLOCK = 4096  # rows per block: a 4096 x 4096 float64 kernel block is 128 MiB
ESTIMATOR = "biased (Gretton et al. 2012 Eq. 5; V-statistic, diagonal included), as google-research cmmd"


def _rows(x: Any, name: str) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if t.ndim != 2 or t.shape[0] < 1:
        raise InputError(f"{name}: CMMD needs embeddings of shape (N >= 1, D), got {tuple(t.shape)}")
    t = t.to(dtype=torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{name}: embeddings contain NaN or Inf; recompute them")
    return t


def kernel_sum(x: Any, y: Any | None = None, sigma: float = SIGMA, block: int = BLOCK,
               device: str | torch.device | None = None) -> float:
    """``sum_ij exp(-||x_i - y_j||² / (2 sigma²))`` in float64, block by block (``y=None``: y = x, by symmetry:
    the blocks above the diagonal are computed once and counted twice).

    x: (N, D), y: (M, D) float rows (numpy or torch; converted to float64). Returns a Python float.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    xs = _rows(x, "x").to(dev)
    sym = y is None
    ys = xs if sym else _rows(y, "y").to(dev)
    if xs.shape[1] != ys.shape[1]:
        raise InputError(f"CMMD: embedding dimensions differ ({xs.shape[1]} and {ys.shape[1]})")
    gamma = 1.0 / (2.0 * sigma ** 2)
    xx = (xs * xs).sum(dim=1)
    yy = xx if sym else (ys * ys).sum(dim=1)
    total = torch.zeros((), dtype=torch.float64, device=dev)
    for i in range(0, xs.shape[0], block):
        a, aa = xs[i:i + block], xx[i:i + block]
        for j in range(i if sym else 0, ys.shape[0], block):
            d = a @ ys[j:j + block].T
            d.mul_(-2.0).add_(aa[:, None]).add_(yy[None, j:j + block])  # the reference's order of terms
            s = d.mul_(-gamma).exp_().sum()
            total += 2.0 * s if (sym and j != i) else s
    return float(total)


def features_digest(x: Any) -> str:
    """sha256 of the float32 row bytes (ties a stored self-term to the rows it was computed from)."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


@dataclass(frozen=True)
class CMMDResult:
    """``cmmd`` = SCALE * (k_ref + k_gen - 2 k_cross), the three means as computed; ``n``/``n_ref`` rows."""

    cmmd: float
    k_ref: float
    k_gen: float
    k_cross: float
    n: int
    n_ref: int
    sigma: float = SIGMA
    scale: float = SCALE
    gen_kernel_sum: float = 0.0  # sum_ij k(gen_i, gen_j): what a saved generated set stores (metadata "cmmd")

    def to_dict(self) -> dict[str, Any]:
        return {"cmmd": self.cmmd, "k_ref_mean": self.k_ref, "k_gen_mean": self.k_gen, "k_cross_mean": self.k_cross,
                "n": self.n, "n_ref": self.n_ref, "sigma": self.sigma, "scale": self.scale, "estimator": ESTIMATOR,
                "images": "all (the reference implementation drops those after its last full batch)"}


def cmmd(gen: Any, ref: Any, *, ref_kernel_sum: float | None = None, gen_kernel_sum: float | None = None,
         sigma: float = SIGMA, scale: float = SCALE, block: int = BLOCK,
         device: str | torch.device | None = None) -> CMMDResult:
    """CMMD between generated rows ``gen`` (M, D) and reference rows ``ref`` (N, D), float64.

    ``ref_kernel_sum`` / ``gen_kernel_sum``: a side's stored self-term ``sum_ij k(x_i, x_j)`` (skips its N² work).
    """
    m, n = int(gen.shape[0]), int(ref.shape[0])
    s_rr = kernel_sum(ref, None, sigma, block, device) if ref_kernel_sum is None else float(ref_kernel_sum)
    s_gg = kernel_sum(gen, None, sigma, block, device) if gen_kernel_sum is None else float(gen_kernel_sum)
    s_gr = kernel_sum(gen, ref, sigma, block, device)
    k_ref, k_gen, k_cross = s_rr / (n * n), s_gg / (m * m), s_gr / (m * n)
    return CMMDResult(scale * (k_ref + k_gen - 2.0 * k_cross), k_ref, k_gen, k_cross, m, n, sigma, scale, s_gg)


# --- the reference side -----------------------------------------------------------------------------------
def wants_cmmd(model: str) -> bool:
    """Whether ``model``'s registry entry reports CMMD (the CLIP extractors)."""
    from ..errors import FDEvalError
    from ..extractors import extractor_entry

    try:
        return "cmmd" in extractor_entry(model).metrics
    except FDEvalError:
        return False


@register_save_hook  # fd_eval.save_stats calls it: a reference file carries its self-term
def annotate_reference(stats: Any, sigma: float = SIGMA, block: int = BLOCK) -> bool:
    """Store the self-term of ``stats.features`` in ``stats.metadata["cmmd"]`` (done by :func:`fd_eval.save_stats`
    for CMMD extractors, so a reference file carries it). Returns True when it computed one."""
    feats = stats.features
    if feats is None or not wants_cmmd(stats.name) or _stored_sum(stats, sigma) is not None:
        return False
    _store(stats, kernel_sum(feats, None, sigma, block), sigma)
    return True


def _store(stats: Any, total: float, sigma: float) -> None:
    feats = stats.features
    stats.metadata["cmmd"] = {"sigma": sigma, "kernel_sum": total, "n": int(feats.shape[0]),
                              "features_sha256": features_digest(feats), "estimator": ESTIMATOR}


def _stored_sum(stats: Any, sigma: float) -> float | None:
    """The stored self-term when it belongs to these rows and this sigma, else None."""
    meta = stats.metadata.get("cmmd")
    feats = stats.features
    if not isinstance(meta, dict) or feats is None or meta.get("sigma") != sigma or meta.get("n") != feats.shape[0]:
        return None
    if meta.get("features_sha256") != features_digest(feats):
        return None
    return float(meta["kernel_sum"])


def cmmd_between(gen: Any, ref: Any, sigma: float = SIGMA, device: str | torch.device | None = None) -> CMMDResult:
    """CMMD between two :class:`fd_eval.Stats` with feature rows (the reference's stored self-term used)."""
    for s, side in ((gen, "generated"), (ref, "reference")):
        if s.features is None:
            raise InputError(f"{s.origin}: CMMD needs the {side} set's {s.name} embeddings; build the statistics "
                             "with feature rows (fd-eval stats keeps them for CLIP models)")
    stored = _stored_sum(gen, sigma)
    res = cmmd(gen.features, ref.features, ref_kernel_sum=_stored_sum(ref, sigma), gen_kernel_sum=stored,
               sigma=sigma, device=device)
    if stored is None:  # kept with the generated statistics: saving them (--save-stats) does not sum again
        _store(gen, res.gen_kernel_sum, sigma)
    return res
