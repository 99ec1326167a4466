"""fd_eval.core.consumers: declared states get reset, fresh copies, state dicts and exact merges from the base; the
ported consumers (moments, top-K, C_T cells) merge exactly as one pass over all the data."""
import pytest
import torch

from fd_eval.core.consumers import Consumer, state_header
from fd_eval.core.moments import MomentAccumulator
from fd_eval.metrics import copies as cp


class Stats4(Consumer):
    """Every merge rule once: count (int, sum), sum (tensor, sum), min, max, rows (cat), top-3 packed keys."""

    def __init__(self, dim=3):
        super().__init__("cpu")
        self.add_state("n", 0)
        self.add_state("total", torch.zeros(dim, dtype=torch.float64))
        self.add_state("lo", torch.full((dim,), float("inf"), dtype=torch.float64), merge="min")
        self.add_state("hi", torch.full((dim,), -float("inf"), dtype=torch.float64), merge="max")
        self.add_state("rows", torch.zeros(0, dim), merge="cat")
        self.add_state("best", torch.full((1, 3), torch.iinfo(torch.int64).min, dtype=torch.int64), merge="topk")
        self.add_state("seen", 0, merge=lambda a, b: a | b, as_tensor=True)

    def update(self, features, index):
        x = features.double()
        self.n += features.shape[0]
        self.total += x.sum(0)
        self.lo = torch.minimum(self.lo, x.min(0).values)
        self.hi = torch.maximum(self.hi, x.max(0).values)
        self.rows.append(features)
        self.best = torch.cat([self.best[0], index]).topk(3).values[None]
        self.seen |= 1


def _feed(c, x, idx, bs):
    for s in range(0, len(x), bs):
        c.update(x[s:s + bs], idx[s:s + bs])
    return c


def test_declared_rules_merge_like_one_pass():
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    idx = torch.arange(20, dtype=torch.int64) * 7 % 20
    one = _feed(Stats4(), x, idx, 20)
    a, b = _feed(Stats4(), x[:8], idx[:8], 3), _feed(Stats4(), x[8:], idx[8:], 5)
    merged = a.fresh().merge(a).merge(b)
    assert merged.n == 20 and torch.equal(merged.lo, one.lo) and torch.equal(merged.hi, one.hi)
    assert torch.equal(merged.cat_state("rows"), x) and torch.equal(merged.best, one.best)
    assert torch.allclose(merged.total, one.total, rtol=0, atol=1e-12)
    assert merged.best[0].tolist() == [19, 18, 17]
    # a state dict round-trips exactly, through a fresh copy; scalars stay JSON, as_tensor scalars are tensors
    sd = merged.state_dict()
    tensors, scalars = state_header(sd)
    assert scalars == {"n": 20} and tensors["seen"].tolist() == [1] and tensors["rows"].shape == (20, 3)
    back = Stats4()
    back.load_state_dict(sd)
    assert all(torch.equal(back.state_dict()[k], v) if isinstance(v, torch.Tensor) else back.state_dict()[k] == v
               for k, v in sd.items())
    back.reset()
    assert back.n == 0 and back.rows == [] and back.cat_state("rows").shape == (0, 3)


def test_load_state_dict_refuses_other_shapes_and_names():
    c = Stats4()
    sd = c.state_dict()
    with pytest.raises(ValueError, match="total"):
        c.load_state_dict({**sd, "total": torch.zeros(4, dtype=torch.float64)})
    with pytest.raises(ValueError, match="do not match"):
        c.load_state_dict({k: v for k, v in sd.items() if k != "lo"})


def test_moments_merge_bit_identical_to_chan_reference():
    """MomentAccumulator is a Consumer now; its merge and state dict are what they were (bit for bit)."""
    x = torch.randn(50, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    parts = [MomentAccumulator(4, keep_features=True).merge(MomentAccumulator(4)) for _ in range(2)]
    parts[0].update(x[:17])
    parts[1].update(x[17:])
    merged = parts[0].fresh().merge(parts[0]).merge(parts[1])
    # Chan's formula written out
    n1, n2 = 17, 33
    m1, m2 = x[:17].mean(0), x[17:].mean(0)
    c1, c2 = x[:17] - m1, x[17:] - m2
    d = m2 - m1
    assert torch.equal(merged.mean, m1 + d * (n2 / 50))
    assert torch.equal(merged.m2, c1.T @ c1 + c2.T @ c2 + torch.outer(d, d) * (n1 * n2 / 50))
    assert torch.equal(merged.features(), x.float()) and set(merged.state_dict()) == {"n", "mean", "m2", "features"}


def test_copies_consumer_state_names_and_merge():
    """The copies consumer's state dict (unit files) keeps its names; halves merged equal one pass."""
    g = torch.Generator().manual_seed(2)
    q, t, tq = torch.randn(6, 8, generator=g), torch.randn(30, 8, generator=g), torch.randn(9, 8, generator=g)
    cells = cp.CellNNConsumer(cp.fit_cells(tq, dims=4), torch.cat([tq, q]))
    base = cp.CopiesConsumer(q, 2, keep_top1_features=True, cells=cells)
    keys = torch.arange(30)
    one = _feed(base.fresh(), t, keys, 4)
    halves = [_feed(base.fresh(), t[:11], keys[:11], 4), _feed(base.fresh(), t[11:], keys[11:], 7)]
    merged = base.fresh().merge(halves[1]).merge(halves[0])
    sd, want = merged.state_dict(), one.state_dict()
    assert list(sd) == ["packed", "n_seen", "top1_features", "ct_dist", "ct_counts"]
    assert all(torch.equal(sd[k], want[k]) for k in want)
    assert torch.equal(base.load_state(sd).state_dict()["packed"], want["packed"])
