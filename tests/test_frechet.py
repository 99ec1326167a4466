"""Fréchet distance: closed forms, high-precision references, and the cases where sqrtm-based peers break."""
import mpmath
import numpy as np
import pytest
import torch

from fd_eval import InvalidStatsError, frechet_distance, frechet_distance_breakdown


def _rand_orth(d, rng):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _cov_from_spectrum(eigs, rng):
    q = _rand_orth(len(eigs), rng)
    s = (q * eigs) @ q.T
    return 0.5 * (s + s.T)


def _mp_psd_sqrt(m):
    """Symmetric PSD square root at mpmath precision, clipping negative eigenvalues (the PSD projection)."""
    e, q = mpmath.eigsy(m)
    d = mpmath.diag([mpmath.sqrt(max(x, 0)) for x in e])
    return q * d * q.T


def _mp_fd(mu1, s1, mu2, s2, dps=60):
    """Trusted FD of the symmetrised, PSD-projected inputs, computed with `dps` decimal digits."""
    with mpmath.workdps(dps):
        a = mpmath.matrix((np.asarray(s1, np.float64) + np.asarray(s1, np.float64).T).tolist()) / 2
        b = mpmath.matrix((np.asarray(s2, np.float64) + np.asarray(s2, np.float64).T).tolist()) / 2
        ah = _mp_psd_sqrt(a)
        bh = _mp_psd_sqrt(b)
        m = ah * b * ah
        e, _ = mpmath.eigsy((m + m.T) / 2)
        tr_sqrt = mpmath.fsum(mpmath.sqrt(max(x, 0)) for x in e)
        tr1 = mpmath.fsum((ah * ah)[i, i] for i in range(a.rows))
        tr2 = mpmath.fsum((bh * bh)[i, i] for i in range(b.rows))
        diff = [mpmath.mpf(float(x)) - mpmath.mpf(float(y)) for x, y in zip(mu1, mu2)]
        return float(mpmath.fsum(x * x for x in diff) + tr1 + tr2 - 2 * tr_sqrt)


def _tol(s1, s2):
    return 1e-6 * (np.trace(s1) + np.trace(s2))


# --- closed forms ------------------------------------------------------------------------------------------
def test_identical_gaussians_give_zero():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 64))
    mu, s = x.mean(0), np.cov(x, rowvar=False)
    res = frechet_distance_breakdown(mu, s, mu, s)
    assert res.fd_mean == 0.0
    assert 0.0 <= res.fd < 1e-10 * np.trace(s)


def test_diagonal_covariances_closed_form():
    rng = np.random.default_rng(1)
    d = 256
    a, b = rng.uniform(0.1, 5, d), rng.uniform(0.1, 5, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    res = frechet_distance_breakdown(mu1, np.diag(a), mu2, np.diag(b))
    assert res.fd == pytest.approx(expected, rel=1e-12)
    assert res.fd_mean == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-14)


def test_commuting_covariances_closed_form():
    rng = np.random.default_rng(2)
    d = 512
    q = _rand_orth(d, rng)
    a, b = rng.uniform(0.01, 3, d), rng.uniform(0.01, 3, d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(np.zeros(d), s1, np.zeros(d), s2) == pytest.approx(expected, abs=1e-9 * np.sum(a + b))


@pytest.mark.parametrize("c", [0.0, 0.3, 1.0, 2.5, 10.0])
def test_scaled_covariance_closed_form(c):
    rng = np.random.default_rng(3)
    d = 128
    x = rng.standard_normal((400, d)) @ rng.standard_normal((d, d))
    s1 = np.cov(x, rowvar=False)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + (1 - c) ** 2 * np.trace(s1)
    got = frechet_distance(mu1, s1, mu2, c * c * s1)
    assert got == pytest.approx(expected, abs=1e-9 * np.trace(s1) * (1 + c * c))


# --- high-precision references on the hard cases -------------------------------------------------------------
def _hard_cases():
    rng = np.random.default_rng(4)
    d = 16
    cases = {}
    # general full-rank pair
    x1, x2 = rng.standard_normal((200, d)), rng.standard_normal((200, d)) * 1.3 + 0.2
    cases["full-rank"] = (x1.mean(0), np.cov(x1, rowvar=False), x2.mean(0), np.cov(x2, rowvar=False))
    # rank-deficient: N < d on both sides
    y1, y2 = rng.standard_normal((7, d)), rng.standard_normal((10, d))
    cases["rank-deficient"] = (y1.mean(0), np.cov(y1, rowvar=False), y2.mean(0), np.cov(y2, rowvar=False))
    # condition number 1e16 on both sides, different eigenbases
    e = np.logspace(0, -16, d)
    cases["cond-1e16"] = (np.zeros(d), _cov_from_spectrum(e, rng), np.zeros(d), _cov_from_spectrum(e[::-1] * 3, rng))
    # float32-stored rank-deficient covariances (slightly indefinite after rounding)
    cases["float32-rank-deficient"] = tuple(np.asarray(v, np.float32) for v in cases["rank-deficient"])
    # slightly non-symmetric (as a float32 GEMM may leave it)
    s1 = np.cov(x1, rowvar=False)
    noise = rng.standard_normal((d, d)) * 1e-7 * np.abs(s1).max()
    cases["non-symmetric"] = (x1.mean(0), s1 + noise, x2.mean(0), np.cov(x2, rowvar=False))
    # tiny FD: S2 a small perturbation of S1, traces ~ 1000
    base = _cov_from_spectrum(rng.uniform(10, 120, d), rng)
    pert = _cov_from_spectrum(rng.uniform(0, 1e-3, d), rng)
    cases["tiny-fd"] = (np.zeros(d), base, np.full(d, 1e-3), base + pert)
    # large FD
    cases["large-fd"] = (np.zeros(d), base, np.full(d, 100.0), 1e4 * _cov_from_spectrum(rng.uniform(0, 1, d), rng))
    return cases


@pytest.mark.parametrize("name", list(_hard_cases()))
def test_matches_mpmath_on_hard_cases(name):
    cases = _hard_cases()
    mu1, s1, mu2, s2 = cases[name]
    # Statistics stored in float32 should still give the FD of the float64 originals.
    trusted = _mp_fd(*cases["rank-deficient"]) if name == "float32-rank-deficient" else _mp_fd(mu1, s1, mu2, s2)
    res = frechet_distance_breakdown(mu1, s1, mu2, s2)
    assert np.isfinite(res.fd) and res.fd >= 0
    assert abs(res.fd - trusted) <= _tol(np.asarray(s1, np.float64), np.asarray(s2, np.float64)), (res, trusted)
    if name == "tiny-fd":  # relative accuracy is what matters for a 0.01-sized FD
        assert 0 < trusted < 0.1
        assert res.fd == pytest.approx(trusted, rel=1e-6)


def test_rank_deficient_1024d_matches_feature_route():
    """500 images in 1024-d: the trusted value comes from the features (nuclear norm of X1c X2c^T)."""
    rng = np.random.default_rng(5)
    d, n1, n2 = 1024, 500, 400
    w = rng.standard_normal((d, d)) / np.sqrt(d) * (np.arange(1, d + 1) ** -0.5)
    x1 = rng.standard_normal((n1, d)) @ w.T
    x2 = rng.standard_normal((n2, d)) @ w.T * 1.1 + 0.05
    c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)
    s1, s2 = c1.T @ c1 / (n1 - 1), c2.T @ c2 / (n2 - 1)
    tr_sqrt = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    trusted = np.sum((x1.mean(0) - x2.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    for dtype in (np.float64, np.float32):
        res = frechet_distance_breakdown(x1.mean(0), s1.astype(dtype), x2.mean(0), s2.astype(dtype))
        if dtype is np.float64:  # centring removes one dimension: rank N - 1
            assert (res.rank1, res.rank2) == (n1 - 1, n2 - 1)
        assert abs(res.fd - trusted) <= _tol(s1, s2), (dtype, res.fd, trusted)


def test_condition_1e16_1024d_closed_form():
    rng = np.random.default_rng(6)
    d = 1024
    q = _rand_orth(d, rng)
    a = np.logspace(2, -14, d)
    b = a * rng.uniform(0.5, 2.0, d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert abs(frechet_distance(np.zeros(d), s1, np.zeros(d), s2) - expected) <= _tol(s1, s2)


def test_agrees_with_pytorch_fid_when_well_conditioned():
    from pytorch_fid.fid_score import calculate_frechet_distance

    rng = np.random.default_rng(7)
    d = 64
    x1, x2 = rng.standard_normal((5000, d)), rng.standard_normal((5000, d)) * 0.9 + 0.1
    args = (x1.mean(0), np.cov(x1, rowvar=False), x2.mean(0), np.cov(x2, rowvar=False))
    assert frechet_distance(*args) == pytest.approx(calculate_frechet_distance(*args), rel=1e-9)


def test_torch_inputs_and_float32_give_the_float64_result():
    rng = np.random.default_rng(8)
    x1, x2 = rng.standard_normal((300, 32)), rng.standard_normal((300, 32)) + 0.5
    args = [x1.mean(0), np.cov(x1, rowvar=False), x2.mean(0), np.cov(x2, rowvar=False)]
    ref = frechet_distance(*args)
    assert frechet_distance(*[torch.from_numpy(a) for a in args]) == ref
    assert frechet_distance(*args, device="cpu") == ref
    f32 = [torch.from_numpy(a.astype(np.float32)) for a in args]
    assert frechet_distance(*f32) == pytest.approx(_mp_fd(*[a.numpy() for a in f32]), abs=_tol(args[1], args[3]))


def test_breakdown_terms_sum_and_never_negative():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((50, 8))
    s = np.cov(x, rowvar=False)
    res = frechet_distance_breakdown(x.mean(0), s, x.mean(0), s * (1 + 1e-15))
    assert res.fd >= 0 and res.fd_cov >= 0
    assert res.fd == res.fd_mean + res.fd_cov
    assert res.method1 == "cholesky"


# --- refusals ----------------------------------------------------------------------------------------------
def test_bad_inputs_are_refused():
    d = 4
    mu, s = np.zeros(d), np.eye(d)
    with pytest.raises(InvalidStatsError, match="NaN"):
        frechet_distance(mu, np.full((d, d), np.nan), mu, s)
    with pytest.raises(InvalidStatsError, match="shape"):
        frechet_distance(mu, np.eye(d + 1), mu, s)
    with pytest.raises(InvalidStatsError, match="dimensions differ"):
        frechet_distance(np.zeros(d + 1), np.eye(d + 1), mu, s)
    asym = np.eye(d)
    asym[0, 1] = 0.5
    with pytest.raises(InvalidStatsError, match="not symmetric"):
        frechet_distance(mu, asym, mu, s)
    with pytest.raises(InvalidStatsError, match="positive semi-definite"):
        frechet_distance(mu, np.diag([1.0, 1.0, 1.0, -0.5]), mu, s)


def test_zero_covariance_is_a_point_mass():
    d = 8
    s = np.diag(np.arange(1.0, d + 1))
    res = frechet_distance_breakdown(np.zeros(d), np.zeros((d, d)), np.ones(d), s)
    assert res.fd == pytest.approx(d + np.trace(s), rel=1e-14)
    assert res.rank1 == 0
