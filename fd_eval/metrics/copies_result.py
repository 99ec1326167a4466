"""What :func:`fd_eval.metrics.copies.find_copies` returns: the result document (:class:`CopiesResult`), each model's
summary (top-1 similarity quantiles and histogram, copies above the threshold, AuthPct, C_T), its provenance in
the schema of every result, and the per-source input accounting."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..core.topk import unpack
from ..extractors import Extractor
from ..run.engine import DEFAULT_BLOCK, UnitPlan
from ..run.provenance import result_provenance
from ..sources import ImageSource, InputAccounting, SkippedItem
from ..util.io_utils import atomic_write
from .copy_metrics import CopiesConsumer, authpct, ct_from_distances

QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0)
HIST_EDGES = tuple(round(-1 + 0.025 * i, 3) for i in range(81))  # cosine similarity -1..1 in steps of 0.025


@dataclass
class CopiesResult:
    """What :func:`find_copies` found; :meth:`to_dict` is the JSON document (schema in docs/copies.md).

    ``inputs``: what happened to every candidate entry of each source (``generated``, ``train``, ``test``:
    :class:`fd_eval.sources.InputAccounting` dicts, found / used / skipped / ignored), as ``compute`` reports."""

    results: dict[str, dict[str, Any]]
    provenance: dict[str, Any]
    per_model_arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"results": self.results, "provenance": self.provenance, "inputs": self.inputs}

    def save_json(self, path: str | os.PathLike) -> None:
        with atomic_write(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1, allow_nan=False)


def _summary(sims: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, gen: ImageSource, gen_idx: np.ndarray,
             train: ImageSource, threshold: float) -> dict[str, Any]:
    top1 = sims[:, 0].double().cpu().numpy()
    per_image = []
    for r, gi in enumerate(gen_idx):
        nearest = [{"key": train.describe(int(kk)), "index": int(kk), "similarity": float(s)}
                   for s, kk, v in zip(sims[r].tolist(), keys[r].tolist(), valid[r].tolist()) if v]
        per_image.append({"index": int(gi), "name": gen.describe(int(gi)), "nearest": nearest})
    n_copies = int((top1 > threshold).sum())
    counts, _ = np.histogram(np.clip(top1, -1, 1), bins=np.array(HIST_EDGES))
    return {
        "per_image": per_image, "threshold": float(threshold), "n_copies": n_copies,
        "copy_fraction": n_copies / len(top1),
        "quantiles": {str(q): float(np.quantile(top1, q)) for q in QUANTILES},
        "histogram": {"edges": list(HIST_EDGES), "counts": counts.tolist()},
    }


def _model_result(c: CopiesConsumer, auth: torch.Tensor | None, test_feats: torch.Tensor | None,
                  gen_src: ImageSource, gen_idx: np.ndarray, train_src: ImageSource, threshold: float, top_k: int,
                  n_train: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One model's result dict and arrays (similarity, key, gen_index)."""
    sims, keys, valid = unpack(c.topk.state.packed)
    r = _summary(sims.cpu(), keys.cpu(), valid.cpu(), gen_src, gen_idx, train_src, threshold)
    r["authpct"] = authpct(sims[:, 0], auth) if auth is not None else None
    r["ct"] = None
    if c.cells is not None:
        nt = test_feats.shape[0]
        d, cl = c.cells.dist.cpu().numpy(), c.cells.cells.cpu().numpy()
        r["ct"] = ct_from_distances(d[:nt], cl[:nt], d[nt:], cl[nt:], c.cells.train_counts.cpu().numpy())
    r.update(top_k=top_k, n_gen=int(len(gen_idx)), n_train=int(n_train))
    return r, {"similarity": sims.cpu().numpy(), "key": keys.cpu().numpy(), "gen_index": gen_idx}


def _model_results(exs: Sequence[Extractor], consumers: list[CopiesConsumer], auth_sims: list[Any],
                   test_feats: list[torch.Tensor] | None, gen_src: ImageSource, gen_idx: Any, train_src: Any,
                   thresholds: dict[str, float], top_k: int, n_train: int,
                   search: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per extractor name: the result document and its arrays."""
    results, arrays = {}, {}
    for j, (ex, c) in enumerate(zip(exs, consumers)):
        results[ex.name], arrays[ex.name] = _model_result(
            c, auth_sims[j], test_feats[j] if test_feats is not None else None, gen_src, gen_idx, train_src,
            thresholds[ex.name], top_k, n_train)
        if search is not None and search.get(ex.name) is not None:
            results[ex.name]["search"] = search[ex.name]  # only an approximate search says so
    return results, arrays


def _provenance_and_inputs(exs: Sequence[Extractor], run: Any, srcs: dict[str, ImageSource | None],
                           q: dict[str, Any], n: dict[str, int], train_skipped: list[SkippedItem],
                           plan: UnitPlan, resumed: int, compute_authpct: bool
                           ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The result's provenance (the schema of every result, :func:`fd_eval.run.provenance.result_provenance`) and its
    per-source input accounting (found / used / skipped / ignored, as ``compute`` reports it)."""
    skipped = {"gen": q["skipped"]["gen"], "train": train_skipped, "test": q["skipped"]["test"]}
    sides = {"gen": "generated", "train": "train", "test": "test"}
    inputs = {sides[k]: (InputAccounting.build(src, skipped[k], n[k]) if isinstance(src, ImageSource) else
                         InputAccounting(str(src.spec), n[k] + len(skipped[k]), n[k],  # a training index
                                         [s.to_dict() for s in skipped[k]])).to_dict()
              for k, src in srcs.items() if src is not None}
    parts = {sides[k]: ({"spec": str(src.spec), "n": n[k], "skipped": len(skipped[k])} if src is not None else None)
             for k, src in srcs.items()}
    prov = result_provenance(
        exs, run.device, **parts,
        similarity="cosine of L2-normalised features; ties broken by the smaller training index",
        authpct="dgm-eval compute_authpct on L2-normalised features" if compute_authpct else None,
        ct="dgm-eval compute_CTscore; PCA and k-means fitted on the held-out set" if srcs["test"] else None,
        skipped={k: [s.to_dict() for s in v] for k, v in skipped.items()},
        run={"units": len(plan.units), "unit_kind": plan.kind,
             "checkpoint_every": plan.checkpoint_every or (None if plan.kind != "blocks" else DEFAULT_BLOCK),
             "resumed_units": resumed, "world_size": run.world, "batch_size": run.opts.batch_size})
    return prov, inputs
