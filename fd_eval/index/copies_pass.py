"""``find_copies(train_index=...)``: the training pass and AuthPct's pass of :mod:`fd_eval.metrics.copies` as scans of a
stored index (:mod:`fd_eval.index.scan`), no training image decoded.

The passes fill the same :class:`fd_eval.metrics.copies.CopiesConsumer` states as the live passes (packed top-K lists,
top-1 training features, C_T's in-cell distances and cell counts), so everything after them (the summary, the
JSON, the contact sheet, the merge over torchrun ranks) is shared. Under torchrun rank r scans units r, r + W, ...
and the states are merged exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..metrics.copies import CopiesConsumer, TopKState, unpack
from .scan import scan_index
from .store import TrainingIndex


@dataclass
class IndexPlan:
    """What :func:`fd_eval.metrics.copies.find_copies` records about the training units of an index."""

    units: list[Any]
    n_items: int
    kind: str = "index-units"
    checkpoint_every: int | None = None


class IndexTrain:
    """The training side of :func:`fd_eval.metrics.copies.find_copies` when it is an index: keys, names and (for the
    contact sheet) the images, read from the source each part was built from while it is still reachable."""

    def __init__(self, index: TrainingIndex):
        self.index = index
        self.spec = str(index.root)
        self._sources: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.index.n_items

    def describe(self, i: int) -> str:
        return self.index.describe(i)

    def plan(self) -> IndexPlan:
        return IndexPlan(list(self.index.units), self.index.n_items)

    def load(self, i: int) -> Any:
        """Training image ``i`` from its part's source (raises :class:`fd_eval.errors.FDEvalError` when that
        source is gone: the sheet then shows the key alone)."""
        from ..sources import open_source

        parts = self.index.parts
        p = max(j for j, part in enumerate(parts) if part["offset"] <= i)
        if p not in self._sources:
            self._sources[p] = open_source(parts[p]["source"])
        return self._sources[p].load(i - parts[p]["offset"])

    def provenance(self) -> dict[str, Any]:
        info = self.index.info()
        return {"path": info["path"], "dtype": info["dtype"], "n_rows": info["n_rows"],
                "sources": self.index.sources(), "created": info["created"]}


def index_search(index: TrainingIndex, gen_features: Sequence[torch.Tensor], base: list[CopiesConsumer], run: Any,
                 *, keep_top1_features: bool, approximate: bool = False
                 ) -> tuple[list[CopiesConsumer], dict[str, Any] | None]:
    """The training pass over an index: exact (:func:`index_training_pass`), or with FAISS
    (:func:`fd_eval.index.approx.approximate_pass`); returns the consumers and, when approximate, each model's
    ``search`` record for the JSON."""
    if not approximate:
        return index_training_pass(index, gen_features, base, run, keep_top1_features=keep_top1_features), None
    from .approx import approximate_pass

    return approximate_pass(index, gen_features, base, run, keep_top1_features=keep_top1_features)


def _top1_rows(index: TrainingIndex, model: str, packed: torch.Tensor) -> torch.Tensor:
    """float32 (Q, D): the stored row of each query's top-1 key (zeros where the list is empty)."""
    _, keys, valid = unpack(packed[:, :1].cpu())
    out = torch.zeros(packed.shape[0], index.models[model]["feature_dim"])
    ok = valid[:, 0]
    if bool(ok.any()):
        out[ok] = index.rows(model, keys[ok, 0])
    return out.to(packed.device)


def index_training_pass(index: TrainingIndex, gen_features: Sequence[torch.Tensor], base: list[CopiesConsumer],
                        run: Any, *, keep_top1_features: bool) -> list[CopiesConsumer]:
    """The top-K (and C_T) pass over the index's rows for each extractor of ``run``; merged over ranks."""
    from ..metrics.copies import _merge_ranks

    mine = index.units[run.rank::run.world]
    total = []
    with tqdm(total=sum(u.n_rows for u in mine) * len(base), unit="row", desc="training (index scan)",
              disable=not run.opts.progress or run.rank != 0) as bar:
        for ex, b, q in zip(run.extractors, base, gen_features):
            c = b.fresh()
            cells = c.cells

            def feed_cells(u: Any, feats: torch.Tensor, keys: torch.Tensor, nrm: Any, cells: Any = cells) -> None:
                if len(keys):  # C_T compares raw features: the unit vector times its norm
                    cells.update((feats.double() * nrm[:, None]).to(run.device), keys.to(run.device))

            sc = scan_index(index, ex.name, q, b.topk.k, units=mine, bar=bar, norm=cells is not None,
                            on_unit=feed_cells if cells is not None else None)
            top1 = _top1_rows(index, ex.name, sc.state.packed) if keep_top1_features else None
            c.topk.state = TopKState(sc.state.packed, top1, sc.state.n_seen)
            total.append(c)
    return _merge_ranks(total, run) if run.world > 1 else total


def index_authpct_pass(index: TrainingIndex, consumers: list[CopiesConsumer], run: Any) -> list[torch.Tensor]:
    """For each extractor: (Q,) float32 similarity of each query's top-1 training row to its nearest *other* row
    (AuthPct's d2), by a scan of the index with the top-1 rows as queries (each distinct row scanned once)."""
    import torch.distributed as dist

    out = []
    mine = index.units[run.rank::run.world]
    for ex, c in zip(run.extractors, consumers):
        _, keys, valid = unpack(c.topk.state.packed[:, :1])
        uniq, inv = torch.unique(keys[:, 0], return_inverse=True)
        first = torch.full((len(uniq),), len(inv), dtype=torch.int64, device=inv.device)
        first.scatter_reduce_(0, inv, torch.arange(len(inv), device=inv.device), reduce="amin")
        feats = c.topk.state.top1_features[first]
        sc = scan_index(index, ex.name, feats, 1, exclude=uniq, units=mine)
        packed = sc.state.packed
        if run.world > 1:
            from ..metrics.copies import merge_topk
            from ..run.distributed import comm_device

            cd = comm_device(prefer=run.device)
            merged = packed
            for r in range(run.world):
                buf = packed.to(cd) if r == run.rank else torch.empty_like(packed, device=cd)
                dist.broadcast(buf, src=r)
                merged = merge_topk(merged, buf.to(packed.device)) if r != run.rank else merged
            packed = merged
        sims = unpack(packed)[0][:, 0]
        out.append(sims[inv].masked_fill(~valid[:, 0], float("nan")))
    return out
