"""FD-infinity and bootstrap intervals on synthetic Gaussians with closed-form FDs."""
import numpy as np
import pytest
import torch

from fd_eval import Stats, frechet_distance
from fd_eval.core.uncertainty import _fd_against, _prepare_reference, bootstrap_fd, default_ns, fd_infinity
from fd_eval.errors import InputError

# Thousands of FDs of 8- to 128-d matrices: on 2 busy cores thread hand-offs cost more than the work.
pytestmark = pytest.mark.usefixtures("one_thread")


def _orth(d, rng):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _gaussians(d, rng, power=0.5):
    """Reference N(0, S_r) with a power-law spectrum; generator N(mu_g, S_g) differing in mean and covariance."""
    eig = np.arange(1, d + 1) ** -power
    q = _orth(d, rng)
    s_r = (q * eig) @ q.T
    q2 = _orth(d, rng)
    s_g = 0.6 * s_r + 0.4 * (q2 * (1.3 * eig)) @ q2.T
    mu_g = 0.2 * rng.standard_normal(d) / np.sqrt(d)
    return np.zeros(d), s_r, mu_g, 0.5 * (s_g + s_g.T)


def _fd_of_rows(x, mu_r, s_r):
    return frechet_distance(x.mean(0), np.cov(x, rowvar=False), mu_r, s_r)


# --- the shared FD path ----------------------------------------------------------------------------------
def test_prepared_reference_fd_is_bit_identical_to_frechet_distance():
    rng = np.random.default_rng(0)
    mu_r, s_r, mu_g, s_g = _gaussians(48, rng)
    x = rng.standard_normal((300, 48)) @ np.linalg.cholesky(s_g).T + mu_g
    mu, s = x.mean(0), np.cov(x, rowvar=False)
    ref = _prepare_reference(Stats(mu_r, s_r, 10**6), torch.device("cpu"))
    got = _fd_against(ref, torch.from_numpy(mu), torch.from_numpy(s))
    assert got == frechet_distance(mu, s, mu_r, s_r)
    # Rank-deficient generated covariance (N < D) takes the eigh path in both.
    mu2, s2 = x[:20].mean(0), np.cov(x[:20], rowvar=False)
    assert _fd_against(ref, torch.from_numpy(mu2), torch.from_numpy(s2)) == frechet_distance(mu2, s2, mu_r, s_r)


# --- FD-infinity ------------------------------------------------------------------------------------------
def test_default_grid():
    ns = default_ns(50_000, 1024)
    assert ns[0] == 10_000 and ns[-1] == 50_000 and len(ns) == 10
    np.testing.assert_allclose(np.diff(1.0 / np.array(ns)), -(1 / 10_000 - 1 / 50_000) / 9, rtol=1e-3)
    assert default_ns(5000, 1024)[0] == 2500  # few samples: the grid keeps at least a factor 2 in N


def test_fd_infinity_points_are_the_recorded_subsamples():
    rng = np.random.default_rng(1)
    mu_r, s_r, mu_g, s_g = _gaussians(12, rng)
    x = (rng.standard_normal((900, 12)) @ np.linalg.cholesky(s_g).T + mu_g).astype(np.float32)
    res = fd_infinity(x, (mu_r, s_r), ns=[100, 300, 600, 900], n_reps=2, seed=5)
    perms = np.random.default_rng(5)
    for r in range(2):
        perm = perms.permutation(900)  # one permutation per repetition; FD_N uses its first N rows
        for i, n in enumerate(res.ns):
            expected = _fd_of_rows(x[perm[:n]].astype(np.float64), mu_r, s_r)
            assert res.fd_points[i][r] == pytest.approx(expected, rel=1e-10)
    assert res.fd_full == pytest.approx(_fd_of_rows(x.astype(np.float64), mu_r, s_r), rel=1e-10)
    assert res.fd_points[-1][0] == res.fd_points[-1][1] == res.fd_full
    assert (res.n_total, res.n_reps, res.seed) == (900, 2, 5)
    # The fit is ordinary least squares of the per-N means on 1/N.
    slope, intercept = np.polyfit(1.0 / np.array(res.ns), res.fd_mean, 1)
    assert res.fd_infinity == pytest.approx(intercept, rel=1e-9) and res.slope == pytest.approx(slope, rel=1e-9)
    np.testing.assert_allclose(res.residuals, np.array(res.fd_mean) - [res.predict(n) for n in res.ns], atol=1e-12)
    assert fd_infinity(x, (mu_r, s_r), ns=[100, 300, 600, 900], n_reps=2, seed=5) == res


def test_fd_infinity_recovers_the_closed_form_limit():
    """Generator and reference share a power-law covariance and differ in mean, so FD_inf = ||mu_g - mu_r||^2
    = 0.25. At N = 8000 (62 x D) FD is biased by ~0.075, 20 x the spread of FD-infinity (~0.0036 across
    datasets); FD-infinity must land within 0.012 (1/6 of the bias) of the limit."""
    d, n = 128, 8000
    rng = np.random.default_rng(7)
    eig = np.arange(1, d + 1) ** -0.5
    q = _orth(d, rng)
    s = (q * eig) @ q.T
    mu_g = np.full(d, 0.5 / np.sqrt(d))
    true = frechet_distance(mu_g, s, np.zeros(d), s)
    assert true == pytest.approx(0.25, rel=1e-12)
    x = rng.standard_normal((n, d)) @ np.linalg.cholesky(s).T + mu_g
    res = fd_infinity(torch.from_numpy(x), Stats(np.zeros(d), s, 10**6), seed=0)
    assert res.ns == tuple(default_ns(n, d)) and not res.warnings
    bias = res.fd_full - true
    assert bias > 0.05  # visibly biased at finite N
    assert abs(res.fd_infinity - true) < 0.012
    assert res.r2 > 0.98 and res.slope > 0
    assert res.predict(n) == pytest.approx(res.fd_full, abs=0.01)


def test_fd_infinity_warns_and_rejects():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 64))
    ref = (np.zeros(64), np.eye(64))
    res = fd_infinity(x, ref, n_reps=1)
    assert any("5 x the feature dimension" in w for w in res.warnings)
    with pytest.raises(InputError, match="at least 3 distinct"):
        fd_infinity(x, ref, ns=[100, 300])
    with pytest.raises(InputError, match=r"\[2, 300\]"):
        fd_infinity(x, ref, ns=[100, 200, 400])
    with pytest.raises(InputError, match="to match the reference"):
        fd_infinity(x[:, :10], ref)


# --- bootstrap --------------------------------------------------------------------------------------------
def test_bootstrap_replicates_are_the_recorded_resamples():
    rng = np.random.default_rng(3)
    mu_r, s_r, mu_g, s_g = _gaussians(10, rng)
    x = (rng.standard_normal((400, 10)) @ np.linalg.cholesky(s_g).T + mu_g).astype(np.float32)
    res = bootstrap_fd(x, (mu_r, s_r), n_boot=20, seed=11)
    draws = np.random.default_rng(11)
    for b in range(3):
        idx = draws.integers(0, 400, size=400)
        assert res.fd_values[b] == pytest.approx(_fd_of_rows(x[idx].astype(np.float64), mu_r, s_r), rel=1e-10)
    x64 = x.astype(np.float64)
    assert res.fd == pytest.approx(_fd_of_rows(x64, mu_r, s_r), rel=1e-10)
    plugin_cov = np.cov(x64, rowvar=False, bias=True)
    assert res.fd_plugin == pytest.approx(frechet_distance(x64.mean(0), plugin_cov, mu_r, s_r), rel=1e-10)
    assert (res.n, res.n_boot, res.seed, res.ci, res.target, res.method) == (400, 20, 11, 0.95, "n", "normal")
    assert res.boot_std == pytest.approx(np.std(res.fd_values, ddof=1)) and res.bias == pytest.approx(
        np.mean(res.fd_values) - res.fd_plugin)
    assert res.bias > 0  # resamples are biased upwards like samples
    assert bootstrap_fd(x, (mu_r, s_r), n_boot=20, seed=11) == res
    assert bootstrap_fd(x, (mu_r, s_r), n_boot=20, seed=12).fd_values != res.fd_values

    # The four intervals, from the same resamples (docstring formulas).
    z = 1.959963984540054
    q_lo, q_hi = np.quantile(res.fd_values, [0.025, 0.975])
    expected = {
        ("n", "normal"): (res.fd - z * res.boot_std, res.fd + z * res.boot_std),
        ("infinity", "normal"): (res.fd - res.bias - z * res.boot_std, res.fd - res.bias + z * res.boot_std),
        ("n", "basic"): (res.fd - (q_hi - res.boot_mean), res.fd - (q_lo - res.boot_mean)),
        ("infinity", "basic"): (res.fd - res.bias - (q_hi - res.boot_mean), res.fd - res.bias - (q_lo - res.boot_mean)),
    }
    for (target, method), (lo, hi) in expected.items():
        got = bootstrap_fd(x, (mu_r, s_r), n_boot=20, seed=11, target=target, method=method)
        assert got.fd_values == res.fd_values
        assert (got.low, got.high) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))


def test_bootstrap_intervals_cover_at_the_nominal_rate():
    """200 synthetic experiments (16-d Gaussians, n = 1000, 100 replicates each). Targets: E[FD_n] (Monte Carlo,
    2000 draws) and FD_inf (closed form). The normal and basic intervals for either target must cover at 95%
    within 3 binomial standard deviations (+-0.046); the naive percentile interval, centred near FD_n + bias,
    must not."""
    d, n, trials = 16, 1000, 200
    rng = np.random.default_rng(123)
    mu_r, s_r, mu_g, s_g = _gaussians(d, rng)
    chol = np.linalg.cholesky(s_g)
    fd_inf = frechet_distance(mu_g, s_g, mu_r, s_r)
    e_fd_n = np.mean([_fd_of_rows(rng.standard_normal((n, d)) @ chol.T + mu_g, mu_r, s_r) for _ in range(2000)])
    assert e_fd_n - fd_inf > 0.03  # the bias is about twice the spread of FD_n (~0.017)

    hits = {"normal-n": 0, "normal-inf": 0, "basic-n": 0, "basic-inf": 0, "percentile-n": 0}
    for t in range(trials):
        x = rng.standard_normal((n, d)) @ chol.T + mu_g
        res = bootstrap_fd(x, (mu_r, s_r), n_boot=100, ci=0.95, seed=t)
        hits["normal-n"] += res.low <= e_fd_n <= res.high
        hits["normal-inf"] += res.low - res.bias <= fd_inf <= res.high - res.bias  # = target="infinity"
        q_lo, q_hi = np.quantile(res.fd_values, [0.025, 0.975])
        basic_lo, basic_hi = res.fd - (q_hi - res.boot_mean), res.fd - (q_lo - res.boot_mean)  # = method="basic"
        hits["basic-n"] += basic_lo <= e_fd_n <= basic_hi
        hits["basic-inf"] += basic_lo - res.bias <= fd_inf <= basic_hi - res.bias
        hits["percentile-n"] += q_lo <= e_fd_n <= q_hi
    coverage = {k: v / trials for k, v in hits.items()}
    tol = 3 * np.sqrt(0.95 * 0.05 / trials)
    for key in ("normal-n", "normal-inf", "basic-n", "basic-inf"):
        assert abs(coverage[key] - 0.95) < tol, coverage
    assert coverage["percentile-n"] < 0.8, coverage


def test_bootstrap_rejects_bad_arguments():
    x = np.random.default_rng(0).standard_normal((50, 4))
    ref = (np.zeros(4), np.eye(4))
    with pytest.raises(InputError, match="ci"):
        bootstrap_fd(x, ref, ci=95)
    with pytest.raises(InputError, match="target"):
        bootstrap_fd(x, ref, target="50k")
    with pytest.raises(InputError, match="method"):
        bootstrap_fd(x, ref, method="percentile")
    with pytest.raises(InputError, match="to match the reference"):
        bootstrap_fd(x[:, :3], ref)
    with pytest.raises(InputError, match="Stats or a"):
        bootstrap_fd(x, "gpic-test")
