"""Fréchet distance between two Gaussians, in float64, without complex arithmetic.

    FD = ||mu1 - mu2||^2 + Tr S1 + Tr S2 - 2 Tr (S1^1/2 S2 S1^1/2)^1/2

For any factors with S1 = B1 B1^T and S2 = B2 B2^T, the eigenvalues of S1^1/2 S2 S1^1/2 are the squared
singular values of B1^T B2, so the trace term is the nuclear norm ||B1^T B2||_*. Singular values come with
absolute error ~eps * ||B1^T B2||, whereas square roots of computed near-zero eigenvalues (scipy.linalg.sqrtm,
torch eigvals of S1 S2) turn eps-sized noise into sqrt(eps)-sized errors, complex parts and NaN. Each factor
is a Cholesky factor when the covariance is numerically positive definite (one cheap O(d^3/3) step); otherwise
(N < d, rank-deficient, slightly indefinite) it is V diag(sqrt(w)) from a symmetric eigendecomposition, with
eigenvalues below d * eps * max(w) treated as zero and the negative ones clipped and reported.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InvalidStatsError
from ..util.threads import linalg_threads

ArrayLike = Any  # numpy array or torch tensor

# Relative asymmetry max|S - S^T| / max|S| above which a "covariance" is refused rather than symmetrised.
ASYMMETRY_TOL = 1e-4
# Negative eigenvalues below -PSD_TOL * max eigenvalue mean the matrix is not a covariance at all
# (float32 storage of a rank-deficient covariance gives ~1e-7).
PSD_TOL = 1e-4


@dataclass(frozen=True)
class FDResult:
    """FD with its two terms and numerical diagnostics (all float64 arithmetic)."""

    fd: float  # fd_mean + fd_cov, >= 0
    fd_mean: float  # ||mu1 - mu2||^2
    fd_cov: float  # Tr S1 + Tr S2 - 2 Tr (S1^1/2 S2 S1^1/2)^1/2, >= 0
    trace1: float
    trace2: float
    trace_sqrt: float  # Tr (S1^1/2 S2 S1^1/2)^1/2
    dim: int
    rank1: int  # numerical rank of S1 (d when its Cholesky factorisation succeeded)
    rank2: int
    clipped1: float  # sum of |negative eigenvalues| of S1 set to zero (0 on the Cholesky path)
    clipped2: float
    asymmetry1: float  # max|S - S^T| / max|S| of the input before symmetrisation
    asymmetry2: float
    method1: str  # "cholesky" or "eigh"
    method2: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CovFactor:
    """A covariance S factored as B B^T (:func:`factor_covariance`); shared with :mod:`fd_eval.core.uncertainty`."""

    b: torch.Tensor  # (D, r) float64 with B B^T = PSD part of S
    trace: torch.Tensor  # () float64, trace of the PSD part
    rank: int
    clipped: float
    method: str


def as_f64(x: ArrayLike, device: torch.device) -> torch.Tensor:
    """``x`` (array or tensor) as a float64 tensor on ``device`` (detached)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device=device, dtype=torch.float64)
    return torch.as_tensor(np.asarray(x), dtype=torch.float64, device=device)


def storage_eps(x: ArrayLike) -> float:
    """Machine epsilon of the dtype the covariance was stored in (float32 files are common)."""
    dt = x.dtype if isinstance(x, torch.Tensor) else np.asarray(x).dtype
    if isinstance(dt, torch.dtype):
        return torch.finfo(dt).eps if dt.is_floating_point else 0.0
    return float(np.finfo(dt).eps) if np.issubdtype(dt, np.floating) else 0.0


def pick_device(*xs: ArrayLike, device: str | torch.device | None) -> torch.device:
    """``device`` when given, else the first non-CPU tensor's device among ``xs``, else the CPU."""
    if device is not None:
        return torch.device(device)
    for x in xs:
        if isinstance(x, torch.Tensor) and x.device.type != "cpu":
            return x.device
    return torch.device("cpu")


def check_inputs(mu: torch.Tensor, sigma: torch.Tensor, which: str) -> float:
    """Validate shapes/finiteness; return relative asymmetry of sigma."""
    if mu.ndim != 1:
        raise InvalidStatsError(f"{which}: mu must be a vector (D,), got shape {tuple(mu.shape)}")
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise InvalidStatsError(
            f"{which}: sigma has shape {tuple(sigma.shape)} but mu has D={d}; expected ({d}, {d})"
        )
    if not bool(torch.isfinite(mu).all()) or not bool(torch.isfinite(sigma).all()):
        raise InvalidStatsError(f"{which}: mu or sigma contains NaN or Inf; recompute the statistics")
    scale = float(sigma.abs().max())
    asym = float((sigma - sigma.T).abs().max()) / scale if scale > 0 else 0.0
    if asym > ASYMMETRY_TOL:
        raise InvalidStatsError(
            f"{which}: sigma is not symmetric (max|S - S^T| / max|S| = {asym:.2e} > {ASYMMETRY_TOL:g}); "
            "it is not a covariance matrix"
        )
    return asym


def factor_covariance(sigma: torch.Tensor, which: str, storage_eps: float = 0.0) -> CovFactor:
    """Factor the symmetrised sigma as B B^T; see the module docstring for the choice of method.

    On the eigh path, eigenvalues below max(d * eps64, storage_eps) * max(w) are indistinguishable from
    rounding (of the eigensolver, or of float32 storage of the matrix) and are treated as zero: keeping
    them would add sqrt(noise)-sized terms to the trace (measured: 1.3e-4 error for N=500 in 1024-d stored
    as float32, vs 4e-7 with the storage-aware threshold).
    """
    s = 0.5 * (sigma + sigma.T)
    d = s.shape[0]
    chol, info = torch.linalg.cholesky_ex(s)
    if int(info) == 0:
        return CovFactor(chol, torch.diagonal(s).sum(), d, 0.0, "cholesky")
    w, v = torch.linalg.eigh(s)
    wmin, wmax = float(w[0]), float(w[-1])  # eigh sorts ascending
    if wmin < -PSD_TOL * max(wmax, 0.0):
        raise InvalidStatsError(
            f"{which}: sigma is not positive semi-definite (min eigenvalue {wmin:.3e}, max {wmax:.3e}); "
            "it is not a covariance matrix"
        )
    if wmax <= 0:  # the zero matrix: a point mass
        return CovFactor(s.new_zeros((d, 0)), s.new_zeros(()), 0, 0.0, "eigh")
    clipped = float(-w[w < 0].sum())
    keep = w > max(d * torch.finfo(torch.float64).eps, storage_eps) * wmax
    b = v[:, keep] * torch.sqrt(w[keep])
    return CovFactor(b, w.clamp_min(0).sum(), int(keep.sum()), clipped, "eigh")


def frechet_distance_breakdown(
    mu1: ArrayLike,
    sigma1: ArrayLike,
    mu2: ArrayLike,
    sigma2: ArrayLike,
    *,
    device: str | torch.device | None = None,
) -> FDResult:
    """Fréchet distance with its mean and covariance terms and diagnostics.

    Args:
        mu1, mu2: (D,) means; numpy arrays or torch tensors of any float dtype.
        sigma1, sigma2: (D, D) covariances (symmetric PSD; slight asymmetry and tiny negative eigenvalues from
            float32 storage are tolerated and reported).
        device: where to compute; default: the device of the first CUDA tensor among the inputs, else CPU.

    Returns:
        FDResult; ``fd`` is never negative, NaN or complex.

    Raises:
        InvalidStatsError: mismatched shapes, NaN/Inf, a clearly non-symmetric or non-PSD sigma.
    """
    dev = pick_device(mu1, sigma1, mu2, sigma2, device=device)
    # threads for the problem size and the cores free now (fd_eval.util.threads): never slower than one thread
    with linalg_threads(int(np.shape(mu1)[-1]) if np.ndim(mu1) else 0, dev):
        m1, s1, m2, s2 = (as_f64(x, dev) for x in (mu1, sigma1, mu2, sigma2))
        a1 = check_inputs(m1, s1, "statistics 1")
        a2 = check_inputs(m2, s2, "statistics 2")
        if m1.shape != m2.shape:
            raise InvalidStatsError(
                f"feature dimensions differ: {m1.shape[0]} vs {m2.shape[0]}; both statistics must come from the "
                "same extractor"
            )
        f1 = factor_covariance(s1, "statistics 1", storage_eps(sigma1))
        f2 = factor_covariance(s2, "statistics 2", storage_eps(sigma2))
        diff = m1 - m2
        fd_mean = float(diff @ diff)
        if f1.rank and f2.rank:
            tr_sqrt = float(torch.linalg.svdvals(f1.b.T @ f2.b).sum())
        else:
            tr_sqrt = 0.0
        tr1, tr2 = float(f1.trace), float(f2.trace)
        # The Bures term is >= 0 in exact arithmetic; rounding may leave ~-1e-13 when S1 == S2.
        fd_cov = max(tr1 + tr2 - 2.0 * tr_sqrt, 0.0)
        return FDResult(
            fd=fd_mean + fd_cov,
            fd_mean=fd_mean,
            fd_cov=fd_cov,
            trace1=tr1,
            trace2=tr2,
            trace_sqrt=tr_sqrt,
            dim=int(m1.shape[0]),
            rank1=f1.rank,
            rank2=f2.rank,
            clipped1=f1.clipped,
            clipped2=f2.clipped,
            asymmetry1=a1,
            asymmetry2=a2,
            method1=f1.method,
            method2=f2.method,
        )


def frechet_distance(
    mu1: ArrayLike,
    sigma1: ArrayLike,
    mu2: ArrayLike,
    sigma2: ArrayLike,
    *,
    device: str | torch.device | None = None,
) -> float:
    """Fréchet distance ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) as a Python float.

    Shapes: mu (D,), sigma (D, D); numpy or torch, computed in float64 (see
    :func:`frechet_distance_breakdown` for the terms and diagnostics).
    """
    return frechet_distance_breakdown(mu1, sigma1, mu2, sigma2, device=device).fd
