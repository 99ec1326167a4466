"""Streaming float64 moments: equal to np.mean/np.cov whatever the batching, order or sharding."""
import numpy as np
import pytest
import torch

from fd_eval import MomentAccumulator, Stats


def _feats(n=1000, d=48, seed=0):
    rng = np.random.default_rng(seed)
    # Large common offset: a naive sum(x x^T) - n mu mu^T would lose ~8 digits here.
    return (rng.standard_normal((n, d)) * rng.uniform(0.1, 3, d) + 1e3).astype(np.float32)


def _accumulate(x, batch, order=None):
    acc = MomentAccumulator(x.shape[1])
    idx = np.arange(0, len(x), batch)
    for i in (idx if order is None else idx[order(len(idx))]):
        acc.update(torch.from_numpy(x[i:i + batch]))
    return acc


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("batch", [1, 7, 64, 1000])
def test_matches_numpy_for_any_batch_size(batch):
    x = _feats()
    acc = _accumulate(x, batch)
    x64 = x.astype(np.float64)
    assert acc.n == len(x)
    assert _rel(acc.mean.numpy(), x64.mean(0)) <= 1e-14
    assert _rel(acc.covariance().numpy(), np.cov(x64, rowvar=False)) <= 1e-12


def test_batch_order_and_sharding_change_only_rounding():
    x = _feats(n=999, seed=1)
    ref = _accumulate(x, 999)
    rng = np.random.default_rng(0)
    shuffled = _accumulate(x, 13, order=lambda k: rng.permutation(k))
    # shards merged as a tree, in two different orders
    shards = [_accumulate(x[i:i + 111], 5) for i in range(0, 999, 111)]
    left = MomentAccumulator(x.shape[1])
    for s in shards:
        left.merge(s)
    pairs = [MomentAccumulator(x.shape[1]).merge(shards[i]).merge(shards[i + 1]) for i in range(0, 8, 2)]
    tree = pairs[3].merge(pairs[1]).merge(pairs[0]).merge(shards[8]).merge(pairs[2])
    for acc in (shuffled, left, tree):
        assert acc.n == 999
        assert _rel(acc.mean.numpy(), ref.mean.numpy()) <= 1e-12
        assert _rel(acc.covariance().numpy(), ref.covariance().numpy()) <= 1e-12


def test_state_dict_round_trip_and_features():
    x = _feats(n=100, d=8, seed=2)
    acc = MomentAccumulator(8, keep_features=True)
    acc.update(torch.from_numpy(x[:40]))
    state = acc.state_dict()
    resumed = MomentAccumulator(8, keep_features=True)
    resumed.load_state_dict(state)
    for a in (acc, resumed):
        a.update(torch.from_numpy(x[40:]))
    assert torch.equal(acc.mean, resumed.mean) and torch.equal(acc.m2, resumed.m2)
    np.testing.assert_array_equal(resumed.features().numpy(), x)
    st = Stats.from_accumulator(resumed, {"extractor": "test"})
    np.testing.assert_allclose(st.sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12, atol=1e-9)
    assert st.n == 100 and st.features.shape == (100, 8)


def test_memory_is_independent_of_n():
    acc = MomentAccumulator(16)
    for _ in range(50):
        acc.update(torch.randn(100, 16))
    assert acc.n == 5000 and acc.m2.shape == (16, 16) and acc._features == []


def test_bad_shapes_and_too_few_samples():
    acc = MomentAccumulator(4)
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        acc.update(torch.zeros(3, 5))
    acc.update(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="at least 2"):
        acc.covariance()
