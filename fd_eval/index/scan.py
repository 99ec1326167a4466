"""The exact scan: queries against the stored training rows, a blocked matrix-product stream with the top-K of
:mod:`fd_eval.metrics.copies` (the same packed (similarity, key) lists, so the same ranking and ties).

Similarity. A live ``copies --train`` pass compares the float64 unit query q with the training vector
r = ``F.normalize(x.double()).float()`` (the float32 unit vector of the extractor's output x) as
``float32(q . double(r))``; a float32 index stores exactly r, so a scan that computes the same float64 products
gives the same similarities and the same top-K, bit for bit (``tests/test_index.py`` checks the whole JSON).

Speed. The products that decide the ranking are computed in float32 (``scan_dtype``; BLAS on every core, or the
GPU): each block of rows gives every query its ``K + extra`` best float32 candidates, which are re-scored in
float64 and merged into the exact top-K state. The float32 value of a unit-vector dot product is within
``eps = (D + 8) 2^-24`` of the float64 one, so a row outside the candidates cannot reach the top K when the
last candidate's float32 score is below the K-th one's by more than ``2 eps``; a query row where that does not
hold (many near-ties, e.g. duplicated training images) is re-scored in float64 against the whole block. The
result is the exact top-K whatever the block size. ``scan_dtype=torch.float64`` skips the float32 stage.

Memory: the queries (float64 and float32), the top-K state (Q x K int64), one unit read ahead by a thread
(:meth:`TrainingIndex.iter_units`) and one similarity block of at most ``work`` elements (64 MiB by default):
flat in the number of rows.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..extractors.precision import ieee_cuda_matmul
from ..metrics.copies import EMPTY, TopKState, pack
from .store import IndexUnit, TrainingIndex

EXTRA = 27  # float32 candidates beyond K per query and block (K + 27 = 32 for K = 5)
WORK = 1 << 24  # elements of one similarity block (float32: 64 MiB)


class ExactScan:
    """Exact top-K of ``queries`` over blocks of unit-vector rows (the float32 rows of an index).

    Args:
        queries: (Q, D) features (normalised here in float64, as :class:`fd_eval.metrics.copies.TopKConsumer` does).
        k: neighbours kept per query.
        exclude: optional int64 (Q,) key per query never kept (AuthPct: a training row's own key).
        scan_dtype: float32 (the fast stage; exact after float64 re-scoring) or float64 (every product in float64).
        work: elements of one similarity block (bounds the memory).
    """

    def __init__(self, queries: torch.Tensor, k: int, *, exclude: torch.Tensor | None = None,
                 scan_dtype: torch.dtype = torch.float32, work: int = WORK):
        self.q64 = F.normalize(queries.double(), dim=1)
        self.q = self.q64.to(scan_dtype)
        self.k, self.work, self.scan_dtype = int(k), int(work), scan_dtype
        dev = queries.device
        self.exclude = None if exclude is None else exclude.to(dev, torch.int64)
        self.state = TopKState(torch.full((queries.shape[0], self.k), EMPTY, dtype=torch.int64, device=dev))
        d = queries.shape[1]
        self.eps = (d + 8) * 2.0**-24  # |float32 dot - float64 dot| for unit vectors (q rounded too)
        self.rescored_rows = 0  # query rows re-scored against a whole block (near-ties)

    def update(self, rows: torch.Tensor, keys: torch.Tensor) -> None:
        """Fold in a block of rows: unit vectors (B, D) float32/float16 and their int64 keys (B,)."""
        b = rows.shape[0]
        if b == 0:
            return
        dev = self.q64.device
        rows, keys = rows.to(dev, non_blocking=True), keys.to(dev, torch.int64, non_blocking=True)
        rs = rows.to(self.scan_dtype)  # float64 copies of the rows are made only where needed (exact values)
        step = max(1, self.work // b)
        for a in range(0, self.q64.shape[0], step):
            z = min(a + step, self.q64.shape[0])
            top = self._block_top(a, z, rs, keys)
            st = self.state.packed
            st[a:z] = torch.cat([st[a:z], top], 1).topk(self.k, dim=1).values
        self.state.n_seen += b

    def _exact(self, a: int, z: int, rs: torch.Tensor, keys: torch.Tensor,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        """Packed float64-scored similarities of queries a..z (or those ``rows`` of them) to the whole block."""
        q = self.q64[a:z] if rows is None else self.q64[a:z][rows]
        sims = (q @ rs.double().T).float()  # the live pass's product: float64, rounded once
        if self.exclude is not None:
            ex = self.exclude[a:z] if rows is None else self.exclude[a:z][rows]
            sims.masked_fill_(ex[:, None] == keys[None], float("-inf"))
        return pack(sims, keys)

    def _block_top(self, a: int, z: int, rs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Packed (z - a, <= K + EXTRA) lists that hold the exact top-K of rows a..z against this block."""
        b = rs.shape[0]
        kk = min(b, self.k + EXTRA)
        if self.scan_dtype == torch.float64 or kk == b:
            p = self._exact(a, z, rs, keys)
            return p if p.shape[1] <= self.k + EXTRA else p.topk(self.k, dim=1).values
        s = self.q[a:z] @ rs.T
        if self.exclude is not None:
            s.masked_fill_(self.exclude[a:z, None] == keys[None], float("-inf"))
        v, pos = s.topk(kk, dim=1)
        del s
        ck = keys[pos]  # (n, kk)
        exact = torch.empty(pos.shape, dtype=torch.float32, device=pos.device)
        sub = max(1, self.work // (2 * kk * rs.shape[1]))  # gathered float64 rows: at most ~one block's bytes
        for i in range(0, pos.shape[0], sub):
            g = rs[pos[i:i + sub]].double()  # (n', kk, D)
            exact[i:i + sub] = torch.einsum("nd,nkd->nk", self.q64[a + i:a + i + g.shape[0]], g).float()
        exact.masked_fill_(torch.isinf(v) & (v < 0), float("-inf"))
        out = pack(exact, ck)
        tight = v[:, kk - 1] >= v[:, self.k - 1] - 2 * self.eps - 2.0**-23  # candidates may miss a tie
        if bool(tight.any()):
            rows = torch.nonzero(tight).flatten()
            self.rescored_rows += int(rows.numel())
            out[rows] = self._exact(a, z, rs, keys, rows).topk(kk, dim=1).values
        return out


def scan_index(index: TrainingIndex, model: str, queries: torch.Tensor, k: int, *,
               exclude: torch.Tensor | None = None, units: Sequence[IndexUnit] | None = None,
               scan_dtype: torch.dtype = torch.float32, work: int = WORK, bar: Any = None,
               on_unit: Callable[[IndexUnit, torch.Tensor, torch.Tensor, Any], None] | None = None,
               norm: bool = False) -> ExactScan:
    """Scan ``units`` (default all) of ``index``'s ``model`` features with :class:`ExactScan`; every CPU core
    (torch's thread count is raised to the cores this process may use for the scan). ``on_unit(unit, features,
    keys, norms)`` sees each unit's rows too (C_T's cells)."""
    sc = ExactScan(queries, k, exclude=exclude, scan_dtype=scan_dtype, work=work)
    threads = torch.get_num_threads()
    if queries.device.type == "cpu":
        torch.set_num_threads(max(threads, _cpus()))
    try:
        with ieee_cuda_matmul():  # TF32's 10-bit products would break the eps bound
            for u, feats, keys, nrm in index.iter_units(model, units, norm=norm):
                sc.update(feats, keys)
                if on_unit is not None:
                    on_unit(u, feats, keys, nrm)
                if bar is not None:
                    bar.update(u.n_rows)
    finally:
        torch.set_num_threads(threads)
    return sc


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
