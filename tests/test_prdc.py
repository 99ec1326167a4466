"""PRDC against the clovaai `prdc` package, and polynomial-kernel MMD^2 against numpy and torch-fidelity's KID."""
import contextlib
import inspect
import io

import numpy as np
import pytest
import torch
from prdc import compute_prdc
from scipy.spatial.distance import cdist

from fd_eval.core.feature_metrics import mmd, mmd_subsets, prdc
from fd_eval.errors import InputError

KEYS = ("precision", "recall", "density", "coverage")


# Small matrices: on 2 busy cores, thread hand-offs cost more than the arithmetic (10x measured).
pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(real, fake, k):
    with contextlib.redirect_stdout(io.StringIO()):  # compute_prdc prints the set sizes
        return {key: float(v) for key, v in compute_prdc(real, fake, k).items()}


def _ours(real, fake, k, **kw):
    res = prdc(real, fake, nearest_k=k, **kw)
    return {key: res[key] for key in KEYS}


# --- PRDC -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n_real, n_fake, dim, k, dtype",
    [(300, 250, 16, 5, np.float32), (257, 400, 64, 3, np.float64), (600, 500, 384, 5, np.float32),
     (120, 80, 2, 1, np.float32)],
)
def test_prdc_equals_reference_on_gaussians(n_real, n_fake, dim, k, dtype):
    rng = np.random.default_rng(dim)
    real = rng.standard_normal((n_real, dim)).astype(dtype)
    fake = (1.1 * rng.standard_normal((n_fake, dim)) + 0.15).astype(dtype)
    ref = _reference(real, fake, k)
    # A small chunk forces several row chunks in every pass (results must not depend on it).
    assert _ours(real, fake, k, chunk_elems=7 * max(n_real, n_fake)) == ref
    assert 0.0 < ref["precision"] < 1.0 and 0.0 < ref["coverage"] < 1.0  # not a degenerate case


def test_prdc_equals_reference_with_ties():
    """Lattice features: distances are exactly equal all over (radius 0 from >= k+1 duplicates, fake points at
    exactly the radius), so `<` versus `<=` and the k-th neighbour (self included) must match exactly."""
    rng = np.random.default_rng(3)
    real = rng.integers(0, 3, (400, 4)).astype(np.float32)
    fake = np.concatenate([rng.integers(0, 3, (250, 4)), real[:50]]).astype(np.float32)
    ref = _reference(real, fake, 5)
    assert _ours(real, fake, 5, chunk_elems=5000) == ref
    # The ties decide the answer: with `<=` every metric would be 1 or more here (all lattice points lie within
    # the radii), with `<` over half of the real radii are 0 and count nothing.
    assert max(ref.values()) < 0.8


def _exact_prdc(real, fake, k):
    """The definitions on distances from differences (scipy cdist, float64; duplicates exactly 0), rounded to
    float32 before the square root when both inputs are float32, as the reference's sklearn does."""
    f32 = real.dtype == np.float32 and fake.dtype == np.float32

    def dist(a, b):
        d2 = cdist(a.astype(np.float64), b.astype(np.float64), "sqeuclidean")
        return np.sqrt(d2.astype(np.float32)) if f32 else np.sqrt(d2)

    r_real = np.sort(dist(real, real), axis=1)[:, k]
    r_fake = np.sort(dist(fake, fake), axis=1)[:, k]
    d = dist(real, fake)
    inside = d < r_real[:, None]
    return {"precision": inside.any(0).mean(), "recall": (d < r_fake[None, :]).any(1).mean(),
            "density": inside.sum(0).mean() / k, "coverage": (d.min(1) < r_real).mean()}


def test_prdc_exact_duplicates():
    """Memorised samples: 20 real rows appear 7 times (radius exactly 0) and 50 generated rows copy real rows.
    sklearn's expansion leaves ~1e-6 of noise on copied pairs; ours gives exact zeros. Both agree here, and
    with the definitions evaluated on exact distances."""
    rng = np.random.default_rng(8)
    base = (3 * rng.standard_normal((300, 64)) + 5).astype(np.float32)
    real = np.concatenate([base, np.repeat(base[:20], 6, axis=0)])
    fake = np.concatenate([(3 * rng.standard_normal((200, 64)) + 5).astype(np.float32), base[:40], base[100:110]])
    ours = _ours(real, fake, 5)
    assert ours == _reference(real, fake, 5)
    assert ours == pytest.approx(_exact_prdc(real, fake, 5), abs=1e-15)


def test_prdc_reproduces_the_float32_rounding_of_distances():
    """The reference rounds float64 squared distances to float32: 2^25 - 1 becomes 2^25, so the first fake point
    lies *on* the radius of real point 0 (not counted), although it is strictly inside in exact arithmetic.
    With float64 features the reference keeps float64 distances and counts it."""
    real = np.array([[0, 0, 0, 0, 0], [4096, 4096, 0, 0, 0], [-8192, -8192, 0, 0, 0]], dtype=np.float64)
    fake = np.array([[4096, 4095, 90, 9, 3], [100000, 0, 0, 0, 0], [0, 100000, 0, 0, 0]], dtype=np.float64)
    assert ((fake[0] - real[0]) ** 2).sum() == 2**25 - 1 and ((real[1] - real[0]) ** 2).sum() == 2**25
    r32 = _ours(real.astype(np.float32), fake.astype(np.float32), 1)
    r64 = _ours(real, fake, 1)
    assert r32 == _reference(real.astype(np.float32), fake.astype(np.float32), 1)
    assert r64 == _reference(real, fake, 1)
    assert r32["density"] == 1 / 3 and r64["density"] == 2 / 3


def test_prdc_torch_inputs_match_numpy():
    rng = np.random.default_rng(5)
    real = rng.standard_normal((200, 32)).astype(np.float32)
    fake = rng.standard_normal((150, 32)).astype(np.float32) + 0.1
    assert prdc(torch.from_numpy(real), torch.from_numpy(fake)) == prdc(real, fake)


def test_prdc_subsets_are_seeded_recorded_and_match_reference():
    rng = np.random.default_rng(11)
    real = rng.standard_normal((900, 24)).astype(np.float32)
    fake = (rng.standard_normal((700, 24)) * 0.9).astype(np.float32)
    res = prdc(real, fake, max_real=300, max_fake=200, seed=4)
    assert (res["n_real"], res["n_fake"], res["n_real_total"], res["n_fake_total"], res["seed"]) == (
        300, 200, 900, 700, 4)
    # The documented draw: sorted default_rng([seed, 0]) / [seed, 1] choices without replacement.
    idx_r = np.sort(np.random.default_rng([4, 0]).choice(900, 300, replace=False))
    idx_f = np.sort(np.random.default_rng([4, 1]).choice(700, 200, replace=False))
    assert {k: res[k] for k in KEYS} == _reference(real[idx_r], fake[idx_f], 5)
    assert prdc(real, fake, max_real=300, max_fake=200, seed=4) == res  # deterministic
    other = prdc(real, fake, max_real=300, max_fake=200, seed=5)
    assert {k: other[k] for k in KEYS} != {k: res[k] for k in KEYS}
    # The real subset depends only on (seed, N): a different generated set sees the same real rows.
    assert {k: v for k, v in prdc(real, fake[:650], max_real=300, max_fake=200, seed=4).items()
            if k == "n_real"} == {"n_real": 300}
    # Sets under the cap are used whole, whatever the seed.
    whole = prdc(real[:250], fake[:180], max_real=300, max_fake=200, seed=9)
    assert {k: whole[k] for k in KEYS} == _reference(real[:250], fake[:180], 5)


def test_prdc_defaults_are_gpic_k5_and_10k_caps():
    params = inspect.signature(prdc).parameters
    assert (params["nearest_k"].default, params["max_real"].default, params["max_fake"].default) == (5, 10_000, 10_000)


def test_prdc_rejects_bad_input():
    x = np.zeros((20, 8), np.float32)
    with pytest.raises(InputError, match="8-d"):
        prdc(x, np.zeros((20, 4), np.float32))
    with pytest.raises(InputError, match="at least 6"):
        prdc(x, x[:5])
    with pytest.raises(InputError, match="NaN"):
        prdc(np.full((20, 8), np.nan, np.float32), x)
    with pytest.raises(InputError, match=r"\(N, D\)"):
        prdc(x[0], x)


# --- MMD --------------------------------------------------------------------------------------------------
def _numpy_mmd2(x, y, degree, gamma, coef0):
    """Unbiased MMD^2 written out from its definition (float64)."""
    m = len(x)
    off = ~np.eye(m, dtype=bool)
    kxx = (gamma * x @ x.T + coef0) ** degree
    kyy = (gamma * y @ y.T + coef0) ** degree
    kxy = (gamma * x @ y.T + coef0) ** degree
    return kxx[off].mean() + kyy[off].mean() - 2.0 * kxy.mean()


def test_mmd_equals_numpy_formula_on_the_same_subsets():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((500, 20)).astype(np.float32)
    fake = (rng.standard_normal((450, 20)) * 1.2 + 0.1).astype(np.float32)
    vals = mmd_subsets(real, fake, n_subsets=7, subset_size=60, seed=3)
    draws = np.random.RandomState(3)
    expected = []
    for _ in range(7):  # the documented draws: real then generated, without replacement, per subset
        i = draws.choice(500, 60, replace=False)
        j = draws.choice(450, 60, replace=False)
        expected.append(_numpy_mmd2(real[i].astype(np.float64), fake[j].astype(np.float64), 3, 1 / 20, 1.0))
    np.testing.assert_allclose(vals, expected, rtol=1e-12, atol=1e-14)
    assert mmd(real, fake, n_subsets=7, subset_size=60, seed=3) == pytest.approx(np.mean(expected), rel=1e-12)
    # Other kernel parameters go through.
    v2 = mmd_subsets(real, fake, degree=2, gamma=0.3, coef0=0.5, n_subsets=1, subset_size=60, seed=3)
    draws = np.random.RandomState(3)
    i, j = draws.choice(500, 60, replace=False), draws.choice(450, 60, replace=False)
    assert v2[0] == pytest.approx(_numpy_mmd2(real[i].astype(np.float64), fake[j].astype(np.float64), 2, 0.3, 0.5),
                                  rel=1e-12)


def test_mmd_equals_torch_fidelity_kid():
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.default_rng(1)
    real = rng.standard_normal((400, 32))
    fake = rng.standard_normal((300, 32)) * 1.05 + 0.05
    kid = kid_features_to_metric(torch.from_numpy(real), torch.from_numpy(fake), kid_subsets=10, kid_subset_size=100,
                                 rng_seed=7, verbose=False, kid_kernel="poly", kid_kernel_poly_degree=3,
                                 kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1)
    vals = mmd_subsets(real, fake, n_subsets=10, subset_size=100, seed=7)
    assert vals.mean() == pytest.approx(kid["kernel_inception_distance_mean"], rel=1e-12)
    assert vals.std() == pytest.approx(kid["kernel_inception_distance_std"], rel=1e-10)


def test_mmd_sanity_same_and_shifted_distributions():
    rng = np.random.default_rng(2)
    d = 16
    a = rng.standard_normal((3000, d)).astype(np.float32)
    b = rng.standard_normal((3000, d)).astype(np.float32)
    vals = mmd_subsets(a, b, n_subsets=50, subset_size=200)
    spread = vals.std()
    assert abs(vals.mean()) < 0.5 * spread  # same distribution: ~0, either sign
    shifted = mmd(a, b + 0.5, n_subsets=50, subset_size=200)
    assert shifted > 20 * spread
    # Unbiased: with the linear kernel E[MMD^2] = gamma ||mu_a - mu_b||^2 exactly; the biased (V-statistic)
    # estimator would add gamma (tr S_a + tr S_b) / m = 2 / 50 = 0.04 here.
    lin = mmd(a, b + 0.25, degree=1, coef0=0.0, n_subsets=200, subset_size=50)
    assert lin == pytest.approx(0.25**2 * d / d, abs=0.01)


def test_mmd_subset_size_is_clipped_and_inputs_checked():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((40, 4)), rng.standard_normal((30, 4))
    # subset_size is clipped to the smaller set (as dgm-eval does); all 30 generated rows are in every subset.
    v = mmd_subsets(a, b, n_subsets=3, subset_size=1000, seed=0)
    draws = np.random.RandomState(0)
    i, j = draws.choice(40, 30, replace=False), draws.choice(30, 30, replace=False)
    assert v[0] == pytest.approx(_numpy_mmd2(a[i], b[j], 3, 0.25, 1.0), rel=1e-12)
    with pytest.raises(InputError, match="4-d"):
        mmd(a, rng.standard_normal((30, 5)))
    with pytest.raises(InputError, match="NaN"):
        mmd(np.full((40, 4), np.inf), b)
