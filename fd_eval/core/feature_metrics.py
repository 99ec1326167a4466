"""Precision, recall, density, coverage and polynomial-kernel MMD^2 between two sets of feature rows.

PRDC (Kynkäänniemi et al. 2019; Naeem et al. 2020) exactly as the clovaai ``prdc`` package 0.2 defines it, which
is what the GPIC toolkit (dgm-eval) runs. With real rows r_i (N of them), generated rows f_j (M), Euclidean
distances d(., .) and radius(r_i) = distance from r_i to its k-th nearest other real row (the (k+1)-th smallest
entry of its row of the real-real distance matrix, which includes the zero self-distance; likewise for f_j):

    precision = 1/M  sum_j  1[exists i: d(r_i, f_j) < radius(r_i)]
    recall    = 1/N  sum_i  1[exists j: d(r_i, f_j) < radius(f_j)]
    density   = 1/(k M) sum_j #{i: d(r_i, f_j) < radius(r_i)}
    coverage  = 1/N  sum_i  1[min_j d(r_i, f_j) < radius(r_i)]

All comparisons are strict. The reference gets its distances from ``sklearn.metrics.pairwise_distances``, which
for float32 inputs forms ||x||^2 - 2 x.y + ||y||^2 in float64, *rounds it to float32*, clips at 0, zeroes the
self-distances and takes a float32 square root (float64 inputs: the same in float64, no rounding). We compute the
squared distances the same way in float64 and round them to the same dtype before the square root, so the
counted comparisons (including exact ties: lattice-valued features, and distances that the float32 rounding
makes equal) are the reference's, not a different rounding of them. Only a float64 squared distance within
~1e-16 relative of a float32 rounding boundary could round differently (BLAS summation order), which does not
happen for practical purposes. One deliberate improvement: pairs of (near-)duplicate rows, where the expansion's
cancellation leaves sklearn with rounding noise instead of 0, are recomputed exactly (see :func:`_distances`).

Memory: the N x N, M x M and N x M distance matrices are never formed; rows are processed in chunks of about
``_CHUNK_ELEMS`` distances (a few hundred MB in float64), and only per-row/per-column reductions are kept.

MMD^2 with the polynomial kernel k(x, y) = (gamma <x, y> + coef0)^degree (KID; Binkowski et al. 2018), see
:func:`mmd`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..util.threads import with_linalg_threads
from .frechet import pick_device

ArrayLike = Any  # numpy array or torch tensor, (N, D)

PRDC_MAX_SAMPLES = 10_000
# Distances held at once per chunk (elements, float64): bounds the transient memory to ~128 MB plus masks.
_CHUNK_ELEMS = 1 << 24
# Kernel-matrix entries per MMD batch of subsets: small enough to stay cache-friendly on CPUs.
_MMD_BATCH_ELEMS = 1 << 21
# Squared distances below this fraction of the squared norms are recomputed from differences (see _distances).
_NEAR_REL = 1e-6


# --- inputs -----------------------------------------------------------------------------------------------
def _check_rows(x: ArrayLike, name: str, min_rows: int) -> tuple[int, int]:
    shape = tuple(x.shape)
    if len(shape) != 2:
        raise InputError(f"{name}: features must have shape (N, D), got {shape}")
    if shape[0] < min_rows:
        raise InputError(f"{name}: needs at least {min_rows} feature rows, got {shape[0]}; pass more samples")
    return shape[0], shape[1]


def _float_dtype(x: ArrayLike) -> str:
    """'float32' when the rows are float32 (numpy or torch), else 'float64' (sklearn's rule for distances)."""
    if isinstance(x, torch.Tensor):
        return "float32" if x.dtype == torch.float32 else "float64"
    return "float32" if np.asarray(x).dtype == np.float32 else "float64"


def _take_rows(x: ArrayLike, idx: np.ndarray | None, device: torch.device, name: str) -> torch.Tensor:
    """Rows ``idx`` (all when None) as float64 on ``device``; gathers on the host for numpy inputs, so a 1M-row
    memory-mapped reference never travels whole."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if idx is not None:
            t = t[torch.as_tensor(idx, device=t.device)]
        t = t.to(device=device, dtype=torch.float64)
    else:
        a = np.asarray(x)
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise InputError(f"{name}: features have dtype {a.dtype}, expected a float array")
        if idx is not None:
            a = a[idx]
        t = torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float64).to(device)
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{name}: features contain NaN or Inf; recompute them")
    return t


def _subset(n: int, cap: int, seed: int, stream: int) -> np.ndarray | None:
    """Sorted indices of a seeded uniform subset of size ``cap`` without replacement, or None (all rows) when
    n <= cap. Each set has its own stream (SeedSequence entropy [seed, stream]), so the real subset depends only
    on (seed, N): different generated sets are compared against the same real rows."""
    if cap < 1:
        raise InputError(f"subset cap must be >= 1, got {cap}")
    if n <= cap:
        return None
    rng = np.random.default_rng([int(seed), stream])
    return np.sort(rng.choice(n, size=cap, replace=False))


# --- distances --------------------------------------------------------------------------------------------
def _rows_per_chunk(n_cols: int, chunk_elems: int) -> int:
    return max(1, chunk_elems // max(n_cols, 1))


def _distances(x: torch.Tensor, xx: torch.Tensor, y: torch.Tensor, yy: torch.Tensor, out_dtype: torch.dtype,
               diag_offset: int | None = None) -> torch.Tensor:
    """Euclidean distances (c, M) the way sklearn computes them: float64 ``-2 x.y + ||x||^2 + ||y||^2`` (that
    order), rounded to ``out_dtype``, clipped at 0, self-distances zeroed, square root in ``out_dtype``.

    x: (c, D) float64, xx: (c,) its squared norms; y: (M, D), yy: (M,). ``diag_offset``: when x is rows
    [o, o + c) of y itself, the entries (i, o + i) are self-distances and set to exactly 0.

    One deliberate difference: the expansion loses ~eps (|x|^2 + |y|^2) to cancellation, so for duplicated rows
    sklearn returns rounding noise (0, or ~sqrt(eps) |x| ~ 1e-8 |x|) instead of 0, and a point with k duplicates
    could get a noise radius. Pairs with squared distance below _NEAR_REL (|x|^2 + |y|^2)_max (closer than
    ~1e-3 of the largest norm) are recomputed from their differences: exactly 0 for duplicates, full accuracy for
    near-duplicates. Elsewhere (all pairs of
    non-degenerate features) nothing changes.
    """
    d2 = x @ y.T
    d2.mul_(-2.0).add_(xx[:, None]).add_(yy[None, :])
    thr = _NEAR_REL * (float(xx.max()) + float(yy.max()))
    near = (d2 < thr).nonzero()
    step = max(1, _CHUNK_ELEMS // (8 * max(x.shape[1], 1)))
    for a in range(0, near.shape[0], step):
        i, j = near[a:a + step, 0], near[a:a + step, 1]
        d2[i, j] = (x[i] - y[j]).square_().sum(dim=1)
    d = d2.to(out_dtype).clamp_min_(0.0)
    if diag_offset is not None:
        rows = torch.arange(x.shape[0], device=x.device)
        d[rows, rows + diag_offset] = 0.0
    return d.sqrt_()


def _kth_radii(x: torch.Tensor, xx: torch.Tensor, k: int, out_dtype: torch.dtype, chunk_elems: int) -> torch.Tensor:
    """(N,) distance of each row to its k-th nearest other row: the (k+1)-th smallest of its distance row,
    self (0) included, as ``prdc.get_kth_value(..., k + 1)``."""
    n = x.shape[0]
    out = torch.empty(n, dtype=out_dtype, device=x.device)
    step = _rows_per_chunk(n, chunk_elems)
    for a in range(0, n, step):
        b = min(a + step, n)
        d = _distances(x[a:b], xx[a:b], x, xx, out_dtype, diag_offset=a)
        out[a:b] = torch.kthvalue(d, k + 1, dim=1).values
    return out


@with_linalg_threads
def prdc(
    real: ArrayLike,
    fake: ArrayLike,
    nearest_k: int = 5,
    max_real: int = PRDC_MAX_SAMPLES,
    max_fake: int = PRDC_MAX_SAMPLES,
    seed: int = 0,
    device: str | torch.device | None = None,
    *,
    chunk_elems: int = _CHUNK_ELEMS,
) -> dict[str, Any]:
    """Precision, recall, density and coverage (clovaai ``prdc`` 0.2 definitions) on seeded subsets.

    Args:
        real: (N, D) real/reference feature rows, numpy or torch (float32 as extracted; float64 accepted).
        fake: (M, D) generated feature rows.
        nearest_k: k of the k-NN radii (GPIC: 5). Each (sub)set needs at least k + 1 rows.
        max_real, max_fake: subset caps (GPIC: 10,000 each). A set larger than its cap is replaced by a seeded
            uniform subset without replacement (see :func:`_subset`); a smaller one is used whole.
        seed: seed of the subset draws.
        device: where to compute; default: the device of the first CUDA tensor among the inputs, else CPU.
        chunk_elems: distances materialised at once (memory bound; results do not depend on it).

    Returns:
        dict with ``precision``, ``recall``, ``density``, ``coverage`` (floats; density may exceed 1) and the
        record ``nearest_k``, ``n_real``, ``n_fake`` (rows used), ``n_real_total``, ``n_fake_total``,
        ``max_real``, ``max_fake``, ``seed``, ``distance_dtype``.

    With float32 inputs the counts equal ``prdc.compute_prdc(real_subset, fake_subset, nearest_k)`` exactly (see
    the module docstring for why); the subsets are ours (dgm-eval draws them with the unseeded global numpy RNG,
    which cannot be reproduced).
    """
    k = int(nearest_k)
    if k < 1:
        raise InputError(f"nearest_k must be >= 1, got {nearest_k}")
    n_real, d_real = _check_rows(real, "real features", k + 1)
    n_fake, d_fake = _check_rows(fake, "generated features", k + 1)
    if d_real != d_fake:
        raise InputError(f"real features are {d_real}-d but generated features are {d_fake}-d; "
                         "extract both with the same model")
    if min(int(max_real), int(max_fake)) < k + 1:
        raise InputError(f"max_real/max_fake must be >= nearest_k + 1 = {k + 1}")
    idx_r = _subset(n_real, int(max_real), seed, 0)
    idx_f = _subset(n_fake, int(max_fake), seed, 1)
    dev = pick_device(real, fake, device=device)
    # sklearn returns float32 distances only when both inputs are float32 (else it works in float64 throughout).
    out_dtype = torch.float32 if _float_dtype(real) == _float_dtype(fake) == "float32" else torch.float64
    r = _take_rows(real, idx_r, dev, "real features")
    f = _take_rows(fake, idx_f, dev, "generated features")
    rr = (r * r).sum(dim=1)
    ff = (f * f).sum(dim=1)

    radius_r = _kth_radii(r, rr, k, out_dtype, chunk_elems)
    radius_f = _kth_radii(f, ff, k, out_dtype, chunk_elems)

    nr, nf = r.shape[0], f.shape[0]
    inside_count = torch.zeros(nf, dtype=torch.int64, device=dev)  # #{i: d(r_i, f_j) < radius(r_i)}
    recall_hit = torch.empty(nr, dtype=torch.bool, device=dev)
    coverage_hit = torch.empty(nr, dtype=torch.bool, device=dev)
    step = _rows_per_chunk(nf, chunk_elems)
    for a in range(0, nr, step):
        b = min(a + step, nr)
        d = _distances(r[a:b], rr[a:b], f, ff, out_dtype)
        rad = radius_r[a:b, None]
        inside_count += (d < rad).sum(dim=0)
        recall_hit[a:b] = (d < radius_f[None, :]).any(dim=1)
        coverage_hit[a:b] = d.min(dim=1).values < radius_r[a:b]

    n_inside = int((inside_count > 0).sum())
    total_inside = int(inside_count.sum())
    # Same float operations as the reference: bool.mean() = count / n; density = (1/k) * (sum / M).
    return {
        "precision": n_inside / nf,
        "recall": int(recall_hit.sum()) / nr,
        "density": (1.0 / float(k)) * (total_inside / nf),
        "coverage": int(coverage_hit.sum()) / nr,
        "nearest_k": k,
        "n_real": nr,
        "n_fake": nf,
        "n_real_total": n_real,
        "n_fake_total": n_fake,
        "max_real": int(max_real),
        "max_fake": int(max_fake),
        "seed": int(seed),
        "distance_dtype": str(out_dtype).replace("torch.", ""),
    }


# --- MMD --------------------------------------------------------------------------------------------------
@with_linalg_threads
def mmd_subsets(
    real: ArrayLike,
    fake: ArrayLike,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    n_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """The per-subset unbiased MMD^2 estimates, (n_subsets,) float64; :func:`mmd` is their mean.

    See :func:`mmd` for the definition; the std of these values is KID's reported "std".
    """
    n_real, d = _check_rows(real, "real features", 2)
    n_fake, d_fake = _check_rows(fake, "generated features", 2)
    if d != d_fake:
        raise InputError(f"real features are {d}-d but generated features are {d_fake}-d; "
                         "extract both with the same model")
    if n_subsets < 1 or subset_size < 2:
        raise InputError(f"need n_subsets >= 1 and subset_size >= 2, got {n_subsets} and {subset_size}")
    m = min(int(subset_size), n_real, n_fake)
    g = 1.0 / d if gamma is None else float(gamma)
    dev = pick_device(real, fake, device=device)

    # The subset draws of torch-fidelity's KID: one legacy RandomState, per subset a real draw then a generated
    # draw, each without replacement. RandomState streams are frozen across numpy versions (NEP 19).
    rng = np.random.RandomState(int(seed))
    draws = [(rng.choice(n_real, m, replace=False), rng.choice(n_fake, m, replace=False)) for _ in range(n_subsets)]

    # The full sets stay where they are (host numpy or device tensor); subsets are gathered per batch.
    xr = real.detach() if isinstance(real, torch.Tensor) else np.asarray(real)
    xf = fake.detach() if isinstance(fake, torch.Tensor) else np.asarray(fake)
    out = np.empty(n_subsets, dtype=np.float64)
    batch = max(1, _MMD_BATCH_ELEMS // (m * m))
    for s0 in range(0, n_subsets, batch):
        ids = draws[s0:s0 + batch]
        x = torch.stack([_take_rows(xr, i, dev, "real features") for i, _ in ids])  # (B, m, D) float64
        y = torch.stack([_take_rows(xf, j, dev, "generated features") for _, j in ids])
        out[s0:s0 + len(ids)] = _mmd2_unbiased(x, y, degree, g, coef0).cpu().numpy()
    return out


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, degree: int, gamma: float, coef0: float) -> torch.Tensor:
    """(B,) unbiased MMD^2 of B pairs of equal-size sets x, y: (B, m, D) float64."""
    m = x.shape[1]

    def kernel_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.bmm(a, b.transpose(1, 2)).mul_(gamma).add_(coef0).pow_(degree)
        return k.sum(dim=(1, 2)), torch.diagonal(k, dim1=1, dim2=2).sum(dim=1)

    sxx, dxx = kernel_sums(x, x)
    syy, dyy = kernel_sums(y, y)
    sxy, _ = kernel_sums(x, y)
    return ((sxx - dxx) + (syy - dyy)) / (m * (m - 1)) - 2.0 * sxy / (m * m)


@with_linalg_threads
def mmd(
    real: ArrayLike,
    fake: ArrayLike,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    n_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> float:
    """Polynomial-kernel MMD^2 (KID / the GPIC toolkit's "KD"), mean over seeded subsets.

    Kernel k(x, y) = (gamma <x, y> + coef0)^degree with gamma = 1/D by default (GPIC: degree 3, coef0 1). For
    each of ``n_subsets`` subsets, m = min(subset_size, N, M) real rows X and m generated rows Y are drawn
    uniformly *without replacement* (independently for each subset, so subsets overlap each other), and

        MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m-1)) + sum_{i != j} k(y_i, y_j) / (m (m-1))
                  - 2 sum_{i, j} k(x_i, y_j) / m^2

    (Gretton et al. 2012, Eq. 3; the within-set sums skip the diagonal, the cross sum keeps it). It is unbiased
    for the population MMD^2 when the rows within a subset are distinct samples; drawing with replacement would
    put duplicates into the i != j sums (k(x, x) terms) and bias it upwards, which is why each subset is drawn
    without replacement. Its expectation does not depend on m (only its variance does), so clipping m to the set
    sizes keeps its meaning. Values slightly below 0 are valid (distributions very close).

    Same estimator, kernel and subset scheme as torch-fidelity's KID (``kid_features_to_metric``; with
    ``rng_seed=seed`` and real rows as ``features_1`` it draws the very same subsets) and as dgm-eval's
    ``compute_mmd`` (GPIC toolkit; unseeded global RNG there, m clipped the same way). Computed in float64 on
    ``device``: the estimator is a difference of sums of ~m^2 kernel values, so float32 (the peers' arithmetic for
    float32 features) loses ~1e-6 of the kernel scale; with float64 features the peers agree with us to
    rounding. (Papers often print KID x 1e3; this returns the unscaled value.)

    Args:
        real: (N, D), fake: (M, D) feature rows, numpy or torch.

    Returns:
        The mean of :func:`mmd_subsets` as a Python float.
    """
    return float(mmd_subsets(real, fake, degree, gamma, coef0, n_subsets, subset_size, seed, device).mean())
