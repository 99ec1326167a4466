"""How much to trust one FD: its finite-sample bias (FD-infinity) and its sampling noise (bootstrap intervals).

FD estimated from N generated feature rows against fixed reference statistics is biased upwards: to first order
E[FD_N] = FD_inf + c / N, where FD_inf is the FD between the generator's feature distribution and the reference
and c > 0 depends on the distributions (4th moments, spectrum). Under the GPIC protocol (N = 50K, DINOv2) even
real test images score ~7.4, almost all of it this bias, more than many differences between models
(PROTOCOL.md).

* :func:`fd_infinity` estimates FD_inf (Chong & Forsyth 2020): FD at several sample sizes N, a least-squares line
  in 1/N, its intercept.
* :func:`bootstrap_fd` gives a confidence interval for E[FD_N] at the N of the sample (the protocol's quantity),
  or, with ``target="infinity"``, for FD_inf.

The reference statistics are treated as exact (their own finite-sample bias, ~c'/1M for GPIC's Test-1M, stays in
every number here). All sampling is seeded and recorded in the results. The reference covariance is factored
once per call and reused for every FD evaluated against it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any, Literal, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..util.threads import with_linalg_threads
from .frechet import CovFactor, as_f64, check_inputs, factor_covariance, pick_device, storage_eps
from .moments import MomentAccumulator

ArrayLike = Any  # numpy array or torch tensor
RefLike = Any  # fd_eval.Stats, or a (mu (D,), sigma (D, D)) pair

# Rows per moment update: bounds the float64 copy of a block to ~64 MB at D = 1024.
_BLOCK_ROWS = 8192


# --- shared pieces ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Reference:
    mu: torch.Tensor  # (D,) float64
    factor: CovFactor  # of the reference covariance, computed once


def _prepare_reference(ref: RefLike, device: torch.device) -> _Reference:
    if hasattr(ref, "mu") and hasattr(ref, "sigma"):
        # as stored (float32 files stay float32), so the rank threshold sees the storage precision as FD does
        mu, sigma = ref.mu, (ref.sigma_as_stored() if hasattr(ref, "sigma_as_stored") else ref.sigma)
    else:
        try:
            mu, sigma = ref
        except (TypeError, ValueError) as e:
            raise InputError("ref must be a fd_eval.Stats or a (mu, sigma) pair") from e
    m, s = as_f64(mu, device), as_f64(sigma, device)
    check_inputs(m, s, "reference statistics")
    return _Reference(m, factor_covariance(s, "reference statistics", storage_eps(sigma)))


def _fd_against(ref: _Reference, mu: torch.Tensor, sigma: torch.Tensor) -> float:
    """FD(mu, sigma; ref) with the arithmetic of ``frechet_distance(mu, sigma, ref_mu, ref_sigma)`` (the
    reference factor is reused instead of recomputed, so results are bit-identical to it)."""
    f = factor_covariance(sigma, "generated statistics")
    diff = mu - ref.mu
    fd_mean = float(diff @ diff)
    tr_sqrt = float(torch.linalg.svdvals(f.b.T @ ref.factor.b).sum()) if (f.rank and ref.factor.rank) else 0.0
    return fd_mean + max(float(f.trace) + float(ref.factor.trace) - 2.0 * tr_sqrt, 0.0)


def _features(x: ArrayLike, dim: int, device: torch.device, name: str, min_rows: int) -> torch.Tensor:
    """(N, D) rows on ``device`` in their own float dtype (float64 conversion happens per block)."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(np.asarray(x)))
    if t.ndim != 2 or t.shape[1] != dim:
        raise InputError(f"{name}: expected shape (N, {dim}) to match the reference, got {tuple(t.shape)}")
    if t.shape[0] < min_rows:
        raise InputError(f"{name}: needs at least {min_rows} rows, got {t.shape[0]}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    t = t.to(device)
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{name}: features contain NaN or Inf; recompute them")
    return t


def _accumulate(acc: MomentAccumulator, x: torch.Tensor, rows: torch.Tensor) -> None:
    for a in range(0, rows.shape[0], _BLOCK_ROWS):
        acc.update(x[rows[a:a + _BLOCK_ROWS]])


# --- FD-infinity ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FDInfinityResult:
    """FD against 1/N: the points, the least-squares line FD_N = fd_infinity + slope / N, and its quality."""

    fd_infinity: float  # intercept of the line at 1/N = 0
    slope: float  # c in FD_N ~ FD_inf + c / N (the bias at N is slope / N)
    r2: float  # coefficient of determination of the line on the per-N means
    ns: tuple[int, ...]  # sample sizes N, ascending
    fd_mean: tuple[float, ...]  # mean FD over the repetitions at each N
    fd_points: tuple[tuple[float, ...], ...]  # fd_points[i][r]: FD at ns[i] in repetition r
    residuals: tuple[float, ...]  # fd_mean - line, per N
    fd_full: float  # FD of all n_total rows (the usual FD)
    n_total: int
    n_reps: int
    seed: int
    sampling: str
    warnings: tuple[str, ...]

    def predict(self, n: float) -> float:
        """The fitted FD at sample size n."""
        return self.fd_infinity + self.slope / n

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ns"], d["fd_mean"], d["residuals"], d["warnings"] = (list(self.ns), list(self.fd_mean),
                                                                list(self.residuals), list(self.warnings))
        d["fd_points"] = [list(p) for p in self.fd_points]
        return d


def default_ns(n_total: int, dim: int, num: int = 10) -> list[int]:
    """Default sample sizes: ``num`` sizes evenly spaced in 1/N from N_min = max(n_total // 5, min(8 * dim,
    n_total // 2)) to n_total (50K rows of 1024-d DINOv2 features: 10,000 ... 50,000).

    Why: the line in 1/N is the first term of an expansion whose next term is relative O(d_eff / N); fits that
    reach down to N ~ 2 d are visibly biased (PROTOCOL.md: 2K-10K at d = 1024); fits on N >= 10K recover the
    limit (+0.003 +- 0.004 for a perfect 1024-d generator, PROTOCOL.md). The points are spaced evenly in 1/N (the
    regressor), not in N as dgm-eval does (5K..50K),
    which would crowd them at small 1/N and let the smallest N dominate the slope.
    """
    if n_total < 4:
        raise InputError(f"FD-infinity needs at least 4 generated rows, got {n_total}")
    n_min = max(n_total // 5, min(8 * dim, n_total // 2), 2)
    inv = np.linspace(1.0 / n_min, 1.0 / n_total, num)
    ns = sorted({int(round(1.0 / v)) for v in inv})
    ns[-1] = n_total
    return ns


@with_linalg_threads
def fd_infinity(
    gen_features: ArrayLike,
    ref: RefLike,
    ns: Sequence[int] | None = None,
    n_reps: int = 3,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> FDInfinityResult:
    """Extrapolate FD to infinitely many generated samples (Chong & Forsyth 2020).

    For each repetition r, one seeded random permutation of the rows is drawn and FD is evaluated on its prefixes
    of lengths ``ns`` (each prefix is a uniform subsample without replacement; prefixes are nested, so one pass
    over the rows with exact streaming moments serves all N). The per-N means over repetitions are fitted by
    ordinary least squares FD_N = a + b / N; ``fd_infinity`` = a.

    Subsampling *without* replacement from the n_total rows keeps the line's intercept at FD_inf: the covariance of
    a subsample of N out of n_total has sampling variance ~ (1/N - 1/n_total) around the full-set covariance, which
    itself is ~1/n_total from the population, so E[FD_N] = FD_inf + c/N again. (Resampling with replacement would
    add the full set's c/n_total once more and bias the intercept.)

    Args:
        gen_features: (n_total, D) generated feature rows, numpy or torch.
        ref: reference statistics (fd_eval.Stats or (mu, sigma)), treated as exact.
        ns: sample sizes (each 2..n_total); default :func:`default_ns`.
        n_reps: permutations averaged at each N (the N = n_total point is the same in all of them).
        seed: seed of the permutations (numpy ``default_rng(seed)``).
        device: where to compute; default the device of the features when they are a CUDA tensor, else CPU.

    Returns:
        :class:`FDInfinityResult`, with ``warnings`` when N_min < 5 D (curvature: the intercept may be biased) or
        R^2 < 0.9 (noise comparable to the bias: the intercept is no more precise than FD itself).
    """
    if n_reps < 1:
        raise InputError(f"n_reps must be >= 1, got {n_reps}")
    dev = pick_device(gen_features, device=device)
    reference = _prepare_reference(ref, dev)
    dim = int(reference.mu.shape[0])
    x = _features(gen_features, dim, dev, "generated features", 4)
    n_total = int(x.shape[0])
    grid = default_ns(n_total, dim) if ns is None else sorted({int(n) for n in ns})
    if len(grid) < 3:
        raise InputError(f"FD-infinity needs at least 3 distinct sample sizes, got {grid}")
    if grid[0] < 2 or grid[-1] > n_total:
        raise InputError(f"sample sizes must lie in [2, {n_total}] (the number of generated rows), got {grid}")

    rng = np.random.default_rng(int(seed))
    points = np.empty((len(grid), n_reps), dtype=np.float64)
    fd_full = None
    for r in range(n_reps):
        perm = torch.as_tensor(rng.permutation(n_total), device=dev)
        acc = MomentAccumulator(dim, device=dev)
        done = 0
        for i, n in enumerate(grid):
            _accumulate(acc, x, perm[done:n])
            done = n
            if n == n_total and fd_full is not None:
                points[i, r] = fd_full  # the full set does not depend on the permutation
                continue
            points[i, r] = _fd_against(reference, acc.mean, acc.covariance())
            if n == n_total:
                fd_full = points[i, r]
    if fd_full is None:
        acc = MomentAccumulator(dim, device=dev)
        _accumulate(acc, x, torch.arange(n_total, device=dev))
        fd_full = _fd_against(reference, acc.mean, acc.covariance())

    means = points.mean(axis=1)
    inv_n = 1.0 / np.asarray(grid, dtype=np.float64)
    design = np.stack([np.ones_like(inv_n), inv_n], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, means, rcond=None)
    resid = means - (a + b * inv_n)
    ss_tot = float(((means - means.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0

    warnings = []
    if grid[0] < 5 * dim:
        warnings.append(f"smallest N ({grid[0]}) is below 5 x the feature dimension ({5 * dim}); FD is not yet "
                        "linear in 1/N there and FD-infinity may be biased; use more samples")
    if r2 < 0.9:
        warnings.append(f"the line explains little of FD's variation with N (R^2 = {r2:.3f}): sampling noise is "
                        "comparable to the finite-N bias, so FD-infinity is no more precise than FD itself")
    return FDInfinityResult(
        fd_infinity=float(a), slope=float(b), r2=r2, ns=tuple(grid), fd_mean=tuple(float(v) for v in means),
        fd_points=tuple(tuple(float(v) for v in row) for row in points), residuals=tuple(float(v) for v in resid),
        fd_full=float(fd_full), n_total=n_total, n_reps=int(n_reps), seed=int(seed),
        sampling="nested prefixes of numpy default_rng(seed).permutation(n_total), one per repetition",
        warnings=tuple(warnings),
    )


# --- bootstrap --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BootstrapResult:
    """An FD with a bootstrap confidence interval [low, high] for ``target`` (see :func:`bootstrap_fd`)."""

    fd: float  # FD of all n rows: the reported number
    low: float
    high: float
    ci: float  # nominal coverage, e.g. 0.95
    n_boot: int
    seed: int
    method: str  # "normal" or "basic"
    target: str  # "n": E[FD_n] at this n; "infinity": FD_inf
    n: int
    fd_plugin: float  # FD of the empirical distribution (covariance normalised by n): the bootstrap world's truth
    boot_mean: float  # mean of the bootstrap FDs
    boot_std: float  # their standard deviation (ddof=1): the standard error of FD_n
    bias: float  # bootstrap estimate of the finite-sample bias E[FD_n] - FD_inf: boot_mean - fd_plugin
    fd_values: tuple[float, ...]  # the n_boot bootstrap FDs, in draw order

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fd_values"] = list(self.fd_values)
        return d


@with_linalg_threads
def bootstrap_fd(
    gen_features: ArrayLike,
    ref: RefLike,
    n_boot: int = 100,
    ci: float = 0.95,
    seed: int = 0,
    *,
    target: Literal["n", "infinity"] = "n",
    method: Literal["normal", "basic"] = "normal",
    device: str | torch.device | None = None,
) -> BootstrapResult:
    """Bootstrap confidence interval for the FD of generated features against fixed reference statistics.

    What is covered. The reported number FD_n is computed from n generated rows. Its expectation over draws of n
    images, E[FD_n], is the protocol's quantity (GPIC fixes n = 50K and every model pays its c/n bias at that n),
    so by default (``target="n"``) the interval covers E[FD_n]: it says how far the reported number would move
    with another sample of the same size. ``target="infinity"`` covers FD_inf, the bias-free distance (see
    :func:`fd_infinity`); that interval sits about the bias c/n lower and usually excludes FD_n.

    Resampling. Replicate b draws n rows with replacement (numpy ``default_rng(seed).integers(0, n, n)``, one
    call per replicate, in order) and computes FD from their float64 moments. The replicates FD*_b centre near
    FD_n + c/n, not near FD_n: a resample's covariance is as noisy around the sample's as the sample's is around
    the population's, so the duplicates add the bias a second time. The plain percentile interval
    [q_lo(FD*), q_hi(FD*)] therefore covers neither target once c/n is comparable to the spread (at GPIC's scale
    the bias is ~7.4 and the spread far smaller). What the bootstrap does estimate well is the spread (the
    standard error sd(FD*)) and the bias, ``bias`` = mean(FD*) - FD(empirical distribution); the intervals use
    only those:

    * ``method="normal"`` (default): FD_n +- z sd(FD*) for target "n"; (FD_n - bias) +- z sd(FD*) for "infinity"
      (first-order bias correction), z the standard normal (1 + ci)/2 quantile. With the default n_boot = 100
      this is the stable choice: sd(FD*) is estimated to ~7% while 2.5%/97.5% quantiles from 100 values are
      noisy (Efron & Tibshirani: ~50-200 replicates for a standard error, >= 1000 for quantiles).
    * ``method="basic"``: quantile pivots, for many replicates or visibly skewed FD*: target "n":
      [FD_n - (q_hi - mean(FD*)), FD_n - (q_lo - mean(FD*))]; "infinity": the same minus ``bias``.

    Measured on 16-d Gaussians, n = 1000 (bias ~2x the spread), 1000 experiments of 100 replicates, ci = 0.95:
    coverage of E[FD_n] 0.951 (normal) / 0.939 (basic), of FD_inf 0.952 / 0.940; the percentile interval 0.46
    and 0.01. For a near-perfect generator (FD_inf ~ 0, no first-order term) sd(FD*) overstates the spread and
    the intervals are conservative (~0.99). The bias correction assumes n well above the feature dimension. The
    reference is treated as exact: its own sampling noise is not included.

    Args:
        gen_features: (n, D) generated feature rows, numpy or torch.
        ref: reference statistics (fd_eval.Stats or (mu, sigma)).
        n_boot: bootstrap replicates (>= 2).
        ci: nominal coverage in (0, 1).
        seed: seed of the resampling.
        target: "n" or "infinity" (above).
        method: "normal" or "basic" (above).
        device: where to compute; default the device of the features when they are a CUDA tensor, else CPU.

    Cost: n_boot times (weighted D x D Gram of the ~63% distinct drawn rows + one D x D factorisation and SVD),
    in float64; the reference covariance is factored once.
    """
    if not 0.0 < ci < 1.0:
        raise InputError(f"ci must be in (0, 1), got {ci}")
    if n_boot < 2:
        raise InputError(f"n_boot must be >= 2, got {n_boot}")
    if target not in ("n", "infinity"):
        raise InputError(f"target must be 'n' or 'infinity', got {target!r}")
    if method not in ("normal", "basic"):
        raise InputError(f"method must be 'normal' or 'basic', got {method!r}")
    dev = pick_device(gen_features, device=device)
    reference = _prepare_reference(ref, dev)
    dim = int(reference.mu.shape[0])
    x = _features(gen_features, dim, dev, "generated features", 3)
    n = int(x.shape[0])

    acc = MomentAccumulator(dim, device=dev)
    _accumulate(acc, x, torch.arange(n, device=dev))
    fd_n = _fd_against(reference, acc.mean, acc.covariance())
    fd_plugin = _fd_against(reference, acc.mean, acc.m2 / n)

    rng = np.random.default_rng(int(seed))
    values = np.empty(n_boot, dtype=np.float64)
    for b in range(n_boot):
        counts = np.bincount(rng.integers(0, n, size=n), minlength=n)
        mean, cov = _weighted_moments(x, counts, dev)
        values[b] = _fd_against(reference, mean, cov)

    boot_mean, boot_std = float(values.mean()), float(values.std(ddof=1))
    bias = boot_mean - fd_plugin
    shift = bias if target == "infinity" else 0.0
    if method == "normal":
        half = NormalDist().inv_cdf(0.5 + ci / 2.0) * boot_std
        low, high = fd_n - shift - half, fd_n - shift + half
    else:
        q_lo, q_hi = np.quantile(values, [(1.0 - ci) / 2.0, (1.0 + ci) / 2.0])
        low, high = fd_n - shift - (q_hi - boot_mean), fd_n - shift - (q_lo - boot_mean)
    # FD is a squared distance: an interval reaching below 0 only says "indistinguishable from 0" there.
    low, high = max(low, 0.0), max(high, 0.0)
    return BootstrapResult(
        fd=fd_n, low=float(low), high=float(high), ci=float(ci), n_boot=int(n_boot), seed=int(seed),
        method=method, target=target, n=n, fd_plugin=fd_plugin, boot_mean=boot_mean, boot_std=boot_std, bias=bias,
        fd_values=tuple(float(v) for v in values),
    )


def _weighted_moments(x: torch.Tensor, counts: np.ndarray, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D), float64, of the multiset holding row i counts[i] times.

    Only rows drawn at least once (~63%) are touched; the Gram matrix is formed from sqrt(count)-scaled centred
    rows, block by block, so it is symmetric and memory stays O(block x D)."""
    nz = np.flatnonzero(counts)
    idx = torch.as_tensor(nz, device=dev)
    w = torch.as_tensor(counts[nz], dtype=torch.float64, device=dev)
    n = float(counts.sum())
    d = x.shape[1]
    mean = torch.zeros(d, dtype=torch.float64, device=dev)
    for a in range(0, idx.shape[0], _BLOCK_ROWS):
        mean += w[a:a + _BLOCK_ROWS] @ x[idx[a:a + _BLOCK_ROWS]].to(torch.float64)
    mean /= n
    gram = torch.zeros(d, d, dtype=torch.float64, device=dev)
    for a in range(0, idx.shape[0], _BLOCK_ROWS):
        xc = (x[idx[a:a + _BLOCK_ROWS]].to(torch.float64) - mean) * w[a:a + _BLOCK_ROWS, None].sqrt()
        gram += xc.T @ xc
    return mean, gram / (n - 1.0)
