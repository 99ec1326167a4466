"""Exact, order-free top-K nearest neighbours by cosine similarity, as a streaming consumer.

A similarity (float32) and a key (int64 position in the searched source, < 2**32 - 1) are packed into one int64
whose order is (similarity descending, key ascending), so the kept lists are a pure function of the set of
(query, candidate) pairs seen: ties are broken by key, and :func:`merge_topk` of the lists of any partition of the
candidates (shards, torchrun ranks, resumed runs) equals one pass over all of them. Similarities are float64 dot
products of the unit vectors, rounded to float32, so they do not depend on how the candidates were batched.

Also here: :class:`FeatureCollector` (the queries' features, by position) and the saved-feature shards
(:class:`FeatureShardWriter`, :func:`read_feature_shards`) that let a second pass skip decoding. Used by
:mod:`fd_eval.metrics.copies`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from ..errors import EmptySourceError, FDEvalError, InputError
from ..util.io_utils import atomic_path
from .consumers import Consumer, merge_topk

MAX_KEY = 2**32 - 2  # keys use the low 32 bits of the packed int64; 2**32 - 1 marks an empty slot
EMPTY = torch.iinfo(torch.int64).min
_MASK32 = 0xFFFFFFFF
_WORK_ELEMENTS = 1 << 22  # rows x columns of one similarity block (float64 + int64: 64 MiB)

# --- packed (similarity, key) top-K -------------------------------------------------------------------------
def pack(sims: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """float32 similarities (..., B) and int64 keys (B,) or (..., B), 0 <= key <= MAX_KEY -> int64 (..., B) whose
    integer order is (similarity ascending, key descending); so ``topk`` keeps the highest similarities, the
    smallest key first among equal ones. -0.0 is taken as +0.0; NaN is not expected."""
    bits = (sims.float() + 0.0).view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: larger magnitude -> smaller int
    return (ordered.to(torch.int64) << 32) | (_MASK32 - keys)  # sign-extended: negative floats stay negative


def unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack`: (similarity float32, key int64, valid bool), each of ``packed``'s shape; empty slots
    (fewer training images than K, or excluded keys) are invalid with similarity NaN and key -1."""
    ordered = packed >> 32
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(torch.int32)
    sims = bits.view(torch.float32).clone()
    keys = _MASK32 - (packed & _MASK32)
    valid = (packed != EMPTY) & torch.isfinite(sims)
    return sims.masked_fill(~valid, float("nan")), keys.masked_fill(~valid, -1), valid


@dataclass
class TopKState:
    """A :class:`TopKConsumer`'s mergeable state.

    packed: int64 (Q, K), best first (:func:`unpack`). top1_features: float32 (Q, D) unit vectors of each row's
    current top-1 training image (for AuthPct), or None. n_seen: training images seen.
    """

    packed: torch.Tensor
    top1_features: torch.Tensor | None = None
    n_seen: int = 0

    def merge(self, other: "TopKState") -> "TopKState":
        """The state one pass over both parts would have (exact; any order of merging gives the same)."""
        packed = merge_topk(self.packed, other.packed)
        feats = None
        if self.top1_features is not None and other.top1_features is not None:
            from_other = (packed[:, 0] == other.packed[:, 0]) & (packed[:, 0] != self.packed[:, 0])
            feats = torch.where(from_other[:, None], other.top1_features, self.top1_features)
        return TopKState(packed, feats, self.n_seen + other.n_seen)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors for a safetensors shard checkpoint (resumable runs save one per training shard)."""
        d = {"packed": self.packed.cpu(), "n_seen": torch.tensor([self.n_seen], dtype=torch.int64)}
        if self.top1_features is not None:
            d["top1_features"] = self.top1_features.cpu()
        return d

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> "TopKState":
        return cls(d["packed"], d.get("top1_features"), int(d["n_seen"][0]))


class TopKConsumer(Consumer):
    """Keeps, per query, the K training images of highest cosine similarity (ties: smallest key).

    Declared state: ``packed`` int64 (Q, K) (top-K merge; jointly with ``top1_features`` float32 (Q, D) when
    kept), ``n_seen`` (sum; saved as an int64 (1,) tensor). :attr:`state` is the same as a :class:`TopKState`.

    Args:
        queries: (Q, D) float features of the generated images (normalised here).
        k: list length K (>= 1).
        keep_top1_features: also keep each row's top-1 training feature (for :func:`authpct`).
        exclude: optional int64 (Q,) training key per query never to be kept (a training image's own key when
            the queries are training images).
    """

    def __init__(self, queries: torch.Tensor, k: int, *, keep_top1_features: bool = False,
                 exclude: torch.Tensor | None = None):
        if k < 1:
            raise InputError(f"top-K needs K >= 1, got {k}")
        super().__init__(queries.device)
        self.queries = F.normalize(queries.double(), dim=1)
        q, d = queries.shape
        self.k = int(k)
        self.add_state("packed", torch.full((q, self.k), EMPTY, dtype=torch.int64), merge="topk")
        self.add_state("n_seen", 0, merge="sum", as_tensor=True)
        if keep_top1_features:
            self.add_state("top1_features", torch.zeros(q, d))
            self.add_joint_merge(("packed", "top1_features"), _merge_top1)
        else:
            self.top1_features = None
        # checked in check_keys() after the pass: reading a device value in update would stall the loop on a GPU
        self.add_state("bad_keys", torch.zeros((), dtype=torch.bool), merge=torch.logical_or, persistent=False)
        self.exclude = None if exclude is None else exclude.to(queries.device, torch.int64)

    @property
    def state(self) -> TopKState:
        return TopKState(self.packed, self.top1_features, self.n_seen)

    @state.setter
    def state(self, st: TopKState) -> None:
        self.packed, self.top1_features, self.n_seen = st.packed, st.top1_features, st.n_seen

    def check_keys(self) -> None:
        """Raise if any training key fed was outside 0..MAX_KEY (checked once, after the pass)."""
        if bool(self.bad_keys):
            raise FDEvalError(f"training keys must lie in 0..{MAX_KEY} (positions in the training source); the "
                              "extraction loop passed others")

    def update(self, features: torch.Tensor, index: torch.Tensor) -> None:
        if features.shape[0] == 0:
            return
        keys = index.to(self.queries.device, torch.int64)
        self.bad_keys |= ((keys < 0) | (keys > MAX_KEY)).any()
        # the float32 unit vector (what a float32 training index stores), compared in float64
        f = F.normalize(features.to(self.queries.device).double(), dim=1).float().double()
        rows = max(1, _WORK_ELEMENTS // (f.shape[0] + self.k))
        for r0 in range(0, self.queries.shape[0], rows):
            r1 = min(r0 + rows, self.queries.shape[0])
            sims = (self.queries[r0:r1] @ f.T).float()  # float64 products and sums: batching-independent
            if self.exclude is not None:
                sims.masked_fill_(self.exclude[r0:r1, None] == keys[None], float("-inf"))
            cand = torch.cat([self.packed[r0:r1], pack(sims, keys)], 1)
            vals, pos = cand.topk(self.k, dim=1)
            if self.top1_features is not None:  # rows whose top-1 is in this batch take its feature (no host sync)
                in_batch = pos[:, :1] >= self.k
                self.top1_features[r0:r1] = torch.where(in_batch, f[(pos[:, 0] - self.k).clamp(min=0)].float(),
                                                        self.top1_features[r0:r1])
            self.packed[r0:r1] = vals
        self.n_seen += int(features.shape[0])


def _merge_top1(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    m = TopKState(a["packed"], a["top1_features"]).merge(TopKState(b["packed"].to(a["packed"].device),
                                                                   b["top1_features"].to(a["packed"].device)))
    return {"packed": m.packed, "top1_features": m.top1_features}


class FeatureCollector:
    """Stores the features of an ``n``-image source by position (the generated images: queries of the pass)."""

    def __init__(self, n: int, dim: int, device: torch.device):
        self.features = torch.zeros(n, dim, device=device)
        self.seen = torch.zeros(n, dtype=torch.bool, device=device)

    def update(self, features: torch.Tensor, index: torch.Tensor) -> None:
        self.features[index] = features.float()
        self.seen[index] = True


# --- saved training features ---------------------------------------------------------------------------------
class FeatureShardWriter:
    """Consumer that saves the training features for reuse: safetensors shards ``features-{k:06d}.safetensors``
    in ``folder`` holding ``features`` float32 (n, D) and ``index`` int64 (n,), ``rows`` rows each (the last
    shorter), written atomically, with the extractor's metadata as JSON in each header. Copies each batch to the
    host (a device sync: an opt-in cost). Call :meth:`close` after the pass."""

    def __init__(self, folder: str | os.PathLike, meta: dict[str, Any] | None = None, rows: int = 65536,
                 prefix: str = "features-", dim: int | None = None):
        self.folder, self.rows, self.meta = Path(folder), int(rows), json.dumps(meta or {}, sort_keys=True)
        self.dim = dim  # given: a series with no rows (every image skipped) still gets one empty shard
        self.prefix = prefix  # find_copies writes one series per checkpoint unit: features-{unit:06d}-{k:06d}
        self.folder.mkdir(parents=True, exist_ok=True)
        self._buf: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._n, self.shards = 0, 0

    def update(self, features: torch.Tensor, index: torch.Tensor) -> None:
        self._buf.append((features.float().cpu(), index.to(torch.int64).cpu()))
        self._n += features.shape[0]
        if self._n >= self.rows:
            self._flush(whole_only=True)

    def _flush(self, whole_only: bool = False) -> None:
        from safetensors.torch import save_file

        if not self._buf:
            return
        f, i = torch.cat([b[0] for b in self._buf]), torch.cat([b[1] for b in self._buf])
        end = (f.shape[0] // self.rows) * self.rows if whole_only else f.shape[0]
        for a in range(0, end, self.rows):
            with atomic_path(self.folder / f"{self.prefix}{self.shards:06d}.safetensors") as tmp:
                save_file({"features": f[a:min(a + self.rows, end)].contiguous(),
                           "index": i[a:min(a + self.rows, end)].contiguous()},
                          str(tmp), metadata={"fd_eval_extractor": self.meta})
            self.shards += 1
        self._buf = [(f[end:], i[end:])] if end < f.shape[0] else []
        self._n = f.shape[0] - end

    def close(self) -> None:
        self._flush()
        if self.shards == 0 and self.dim is not None:
            from safetensors.torch import save_file

            with atomic_path(self.folder / f"{self.prefix}000000.safetensors") as tmp:
                save_file({"features": torch.zeros(0, self.dim), "index": torch.zeros(0, dtype=torch.int64)},
                          str(tmp), metadata={"fd_eval_extractor": self.meta})
            self.shards = 1


def read_feature_shards(folder: str | os.PathLike, unit: int | None = None
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (features float32 (n, D), index int64 (n,)) from the shards :class:`FeatureShardWriter` wrote, in
    order; feed them to any consumer's ``update`` (no images decoded, no network run). ``unit``: only the shards
    of that checkpoint unit of :func:`find_copies` (``features-{unit:06d}-*``)."""
    from safetensors.torch import load_file

    pattern = "features-*.safetensors" if unit is None else f"features-{unit:06d}-*.safetensors"
    paths = sorted(Path(folder).glob(pattern))
    if not paths:
        raise EmptySourceError(f"{folder}: no saved feature shards ({pattern})")
    for p in paths:
        d = load_file(str(p))
        yield d["features"], d["index"]
