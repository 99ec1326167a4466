"""Streaming float64 moments of feature rows with an exact parallel merge (Chan et al. 1979).

The state is the triple (n, mean, M2) with M2 = sum_i (x_i - mean)(x_i - mean)^T. Each batch is centred on
its own mean before the outer product, so nothing like sum(x x^T) - n mean mean^T cancels catastrophically;
merging two triples is exact algebra, so batch size, batch order and the number of shards or processes change
the result only at rounding level. Memory is O(D^2) whatever N is. The state lives on the device of the
features; ``update`` performs no host synchronisation (n is a Python int known from shapes).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..errors import InputError
from .consumers import Consumer


class MomentAccumulator(Consumer):
    """Running count, mean (D,) and centred second moment M2 (D, D), all float64 on ``device``.

    Optionally keeps the float32 feature rows (``keep_features=True``) for PRDC/MMD/bootstrap. A
    :class:`fd_eval.core.consumers.Consumer` (``update(features, index)``; the index is not needed) whose declared
    state is (n, mean, M2), merged jointly by Chan's update, plus the rows (``"cat"``) when kept.
    """

    uses_index = False  # the extraction loop need not move source indices to the device for this consumer

    def __init__(self, dim: int, device: str | torch.device | None = None, keep_features: bool = False):
        super().__init__(device)
        self.dim = int(dim)
        self.keep_features = keep_features
        self.add_state("n", 0)  # a Python int known from shapes: no host sync
        self.add_state("mean", torch.zeros(self.dim, dtype=torch.float64))
        self.add_state("m2", torch.zeros(self.dim, self.dim, dtype=torch.float64))
        self.add_joint_merge(("n", "mean", "m2"), _chan)
        if keep_features:
            self.add_state("feature_rows", torch.zeros(0, self.dim, dtype=torch.float32), merge="cat")
        else:
            self.feature_rows: list[torch.Tensor] = []

    @property
    def _features(self) -> list[torch.Tensor]:
        return self.feature_rows

    @_features.setter
    def _features(self, rows: list[torch.Tensor]) -> None:
        self.feature_rows = rows

    def reset(self) -> None:
        super().reset()
        if not self.keep_features:
            self.feature_rows = []

    def update(self, x: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Add a batch of feature rows x: (B, D), any float dtype, on ``self.device``. ``index`` (the rows'
        source positions, as the extraction loop passes them) is ignored: moments do not depend on order."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise InputError(f"features must have shape (B, {self.dim}), got {tuple(x.shape)}")
        b = x.shape[0]
        if b == 0:
            return
        if self.keep_features:
            self._features.append(x.detach().to(torch.float32))
        xb = x.detach().to(torch.float64)
        mb = xb.mean(dim=0)
        xc = xb - mb
        self.merge_moments(b, mb, xc.T @ xc)

    def merge_moments(self, nb: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        """Fold the triple (nb, mean_b (D,), M2_b (D, D)), float64 on ``self.device``, into the state (Chan)."""
        merged = _chan({"n": self.n, "mean": self.mean, "m2": self.m2}, {"n": nb, "mean": mean_b, "m2": m2_b})
        self.n, self.mean, self.m2 = merged["n"], merged["mean"], merged["m2"]

    def merge(self, other: "MomentAccumulator") -> "MomentAccumulator":  # type: ignore[override]
        """Fold ``other`` into ``self`` (in place; returns self). Merge order is the caller's choice."""
        if other.dim != self.dim:
            raise InputError(f"cannot merge moments of dimension {other.dim} into {self.dim}")
        self.merge_moments(other.n, other.mean.to(self.device), other.m2.to(self.device))
        if self.keep_features:
            self._features.extend(f.to(self.device) for f in other._features)
        return self

    def add_features(self, rows: torch.Tensor) -> None:
        """Append kept feature rows (N, D) float32 (their moments are merged separately; no-op unless
        ``keep_features``)."""
        if self.keep_features:
            self._features.append(rows.to(self.device))

    def covariance(self) -> torch.Tensor:
        """Unbiased covariance M2 / (n - 1), (D, D) float64, like ``np.cov(x, rowvar=False)``."""
        if self.n < 2:
            raise InputError(f"a covariance needs at least 2 samples, got {self.n}")
        return self.m2 / (self.n - 1)

    def features(self) -> torch.Tensor | None:
        """The kept float32 feature rows (N, D), or None when ``keep_features`` is off."""
        if not self.keep_features:
            return None
        return self.cat_state("feature_rows")

    def state_dict(self) -> dict[str, Any]:
        """A checkpointable copy of the state (tensors on CPU; ``n`` as a Python int; ``features`` when kept)."""
        state = super().state_dict()
        if self.keep_features:
            state["features"] = state.pop("feature_rows")
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mean = torch.as_tensor(state["mean"], dtype=torch.float64)
        if mean.shape != (self.dim,):
            raise InputError(f"state has dimension {mean.shape[0]}, accumulator has {self.dim}")
        self.n = int(state["n"])
        self.mean = mean.to(self.device)
        self.m2 = torch.as_tensor(state["m2"], dtype=torch.float64).to(self.device)
        feats = state.get("features")
        self._features = [torch.as_tensor(feats).to(self.device)] if (self.keep_features and feats is not None) else []


def _chan(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Chan et al.'s exact merge of two (n, mean (D,), M2 (D, D)) float64 triples (b's tensors on a's device)."""
    nb = b["n"]
    if nb == 0:
        return dict(a)
    if a["n"] == 0:
        return {"n": nb, "mean": b["mean"].to(a["mean"].device).clone(), "m2": b["m2"].to(a["m2"].device).clone()}
    n = a["n"] + nb
    delta = b["mean"].to(a["mean"].device) - a["mean"]
    return {"n": n, "mean": a["mean"] + delta * (nb / n),
            "m2": a["m2"] + b["m2"].to(a["m2"].device) + torch.outer(delta, delta) * (a["n"] * nb / n)}
