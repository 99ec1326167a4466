"""A consumer-based metric in one file plus its registration (what issue 22 asks a new metric to be): the
feature-norm statistics of a set. Nothing in fd_eval knows it; ``register()`` makes every path run it."""
from __future__ import annotations

import torch

from fd_eval.core.consumers import Consumer, ConsumerMetric, register_consumer_metric, unregister_consumer_metric

NAME = "norms"


class NormStats(Consumer):
    """Count, float64 sum and maximum of the rows' L2 norms, and the largest source index seen (``uses_index``:
    the loop passes it on the device)."""

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.add_state("n", 0)                                                      # Python int: sum
        self.add_state("total", torch.zeros((), dtype=torch.float64))             # sum
        self.add_state("top", torch.full((), -1.0, dtype=torch.float64), merge="max")
        self.add_state("max_index", torch.full((), -1, dtype=torch.int64), merge="max")

    def update(self, features: torch.Tensor, index: torch.Tensor) -> None:
        norms = features.double().norm(dim=1)
        self.n += features.shape[0]
        self.total = self.total + norms.sum()
        self.top = torch.maximum(self.top, norms.max())
        self.max_index = torch.maximum(self.max_index, index.max())


def result(c: NormStats) -> dict:
    return {"n": c.n, "mean_norm": float(c.total) / max(c.n, 1), "max_norm": float(c.top),
            "max_index": int(c.max_index)}


METRIC = ConsumerMetric(NAME, lambda ex, device: NormStats(device), result)


def register() -> None:
    register_consumer_metric(METRIC)


def unregister() -> None:
    unregister_consumer_metric(NAME)
