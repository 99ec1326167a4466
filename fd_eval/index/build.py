"""``fd-eval index build``: the training images' features, extracted once, stored for every later copy check.

One pass over the training images through the extraction loop (:func:`fd_eval.run.pipeline.run_units`) over the
units of :func:`fd_eval.metrics.build.plan_units` (one per tar shard, else blocks of ``checkpoint_every`` images): as
soon
as a unit's last image is in, its rows are written atomically as ``units/unit-{k:06d}.safetensors``
(:mod:`fd_eval.index.store`). A killed build resumes: the same command keeps every unit file whose settings and
data fingerprint match and computes the rest. Under torchrun each rank takes every W-th unit left (rank 0's view
of what is done), all ranks wait at a barrier, and rank 0 writes the manifest. ``append=True`` adds the images
of another source as a new part (no rebuild).
"""
from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._version import __version__
from ..errors import EmptySourceError, InputError
from ..extractors import Extractor
from ..run.options import RunOptions, make_options
from ..sources import ImageSource, SkippedItem, open_source
from ..util.io_utils import atomic_write
from .store import (
    DTYPES,
    INDEX_FORMAT,
    MANIFEST,
    META_KEY,
    IndexUnit,
    TrainingIndex,
    extractor_identity,
    identity_difference,
    read_manifest,
    unit_path,
)

DEFAULT_INDEX_MODELS = ("sscd-disc-mixup",)
MAX_KEY = 2**32 - 2  # the packed top-K keys of fd_eval.metrics.copies


class RowCollector:
    """Consumer of one unit and extractor: keeps its feature rows (float32 (n, D), on the CPU) and keys."""

    def __init__(self) -> None:
        self.features: list[torch.Tensor] = []
        self.keys: list[torch.Tensor] = []

    def update(self, features: torch.Tensor, index: torch.Tensor) -> None:
        self.features.append(features.float().cpu())
        self.keys.append(index.to(torch.int64).cpu())

    def rows(self, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.features:
            return torch.zeros(0, dim), torch.zeros(0, dtype=torch.int64)
        return torch.cat(self.features), torch.cat(self.keys)


def unit_tensors(name: str, features: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    """``{name}.features`` (unit vectors in ``dtype``) and ``{name}.norm`` (float64) of raw float32 rows (n, D).
    The unit vector is normalised in float64 and rounded once: float32 rows are exactly the training vectors of a
    live ``copies --train`` pass."""
    x = features.double()
    return {f"{name}.features": F.normalize(x, dim=1).to(DTYPES[dtype]).contiguous(),
            f"{name}.norm": x.norm(dim=1).contiguous()}


def _part_identity(exs: Sequence[Extractor], dtype: str, spec: str, plan: Any, offset: int) -> dict[str, Any]:
    return json.loads(json.dumps({
        "format": INDEX_FORMAT, "dtype": dtype, "extractors": [extractor_identity(ex.metadata()) for ex in exs],
        "source": spec, "offset": offset,
        "plan": {"kind": plan.kind, "checkpoint_every": plan.checkpoint_every, "n_units": len(plan.units),
                 "n_items": None if plan.streamed else plan.n_items}}))


def _read_unit_header(path: Path) -> dict[str, Any] | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})[META_KEY])
    except (SafetensorError, OSError, ValueError, KeyError):
        return None  # a damaged unit is recomputed


def _start_part(root: Path, manifest: dict[str, Any] | None, exs: Sequence[Extractor], dtype: str, spec: str,
                append: bool) -> tuple[dict[str, Any], int]:
    """The manifest to build on and the part (index into ``parts``) this call builds: a new one, or the
    unfinished last one (a resume)."""
    models = {ex.name: extractor_identity(ex.metadata()) for ex in exs}
    if manifest is None:
        return {"format": INDEX_FORMAT, "dtype": dtype, "extractors": models, "parts": [], "units": [],
                "fd_eval": __version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}, 0
    if manifest.get("dtype") != dtype:
        raise InputError(f"{root}: the index stores {manifest.get('dtype')} features; pass --dtype "
                         f"{manifest.get('dtype')} to add to it")
    have = manifest.get("extractors") or {}
    if sorted(have) != sorted(models):
        raise InputError(f"{root}: the index holds {', '.join(sorted(have))}; build it with the same models "
                         f"(-m {' -m '.join(sorted(have))}), or into another folder")
    for name, ident in models.items():
        diff = identity_difference(have[name], ident)
        if diff:
            raise InputError(f"{root}: the index's {name} features were made with another {diff}; use the same "
                             "weights and preprocessing, or build into another folder")
    parts = manifest["parts"]
    if parts and not parts[-1].get("complete"):
        if parts[-1]["source"] != spec:
            raise InputError(f"{root}: an unfinished build of {parts[-1]['source']} is in this folder; run that "
                             f"command again to finish it before adding {spec}")
        return manifest, len(parts) - 1
    if not append:
        raise InputError(f"{root}: already holds an index of {', '.join(p['source'] for p in parts)}; pass "
                         "--append (append=True) to add these images to it, or choose another folder")
    return manifest, len(parts)


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    with atomic_write(root / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)


def build_index(
    train: "str | os.PathLike | np.ndarray | ImageSource",
    out: str | os.PathLike,
    models: Sequence[str] | str = DEFAULT_INDEX_MODELS,
    *,
    dtype: str = "float32",
    append: bool = False,
    weights: Any = None,
    extractors: Sequence[Extractor] | None = None,
    checkpoint_every: int | None = None,
    log: Callable[[str], None] | None = None,
    options: RunOptions | None = None,
    **kw: Any,
) -> TrainingIndex | None:
    """Extract the training images' features once into the index folder ``out`` (see :mod:`fd_eval.index`).

    Args:
        train: the training images (any image source).
        out: the index folder (created). The same call after a kill resumes; ``append=True`` adds ``train`` to a
            finished index as a new part.
        models: extractor names (default SSCD). ``weights`` / ``extractors``: as for :func:`fd_eval.find_copies`.
        dtype: "float32" (default: ``copies --train-index`` then equals ``copies --train`` bit for bit) or
            "float16" (half the disk; a similarity moves by at most 4.9e-4, see docs/copies.md).
        checkpoint_every: images per unit (default one unit per tar shard, else 10,000).
        options, **kw: run options (:class:`fd_eval.RunOptions`); under torchrun each rank takes every W-th unit.

    Returns:
        The opened :class:`TrainingIndex` on rank 0; None on the other ranks.
    """
    from ..api import resolve_extractors
    from ..metrics.build import plan_units
    from ..run.engine import carry_error, scan_units, share_units
    from ..run.streamed import index_first_for_ranks, known_total
    from .store import open_index

    opts = make_options(options, kw, "build_index")
    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    say = log or ((lambda m: print(m, file=sys.stderr, flush=True)) if opts.progress else (lambda m: None))
    resolved = opts.resolve()
    rank, dev = resolved.rank, resolved.device
    root = Path(out)
    src = open_source(train, skip_bad=opts.skip_bad, offline=opts.offline)
    # remote shards not indexed yet: indexed from the pass's one read of each (fd_eval.run.streamed)
    streamed = index_first_for_ranks(src, resolved, say) and checkpoint_every is None
    if not streamed and len(src) == 0:
        raise EmptySourceError(f"{src.spec}: no training images to index")
    exs = resolve_extractors(models, extractors, weights, resolved, dev)
    manifest, part_no = _start_part(root, read_manifest(root), exs, dtype, str(src.spec), append)
    offset = sum(p["n_items"] for p in manifest["parts"][:part_no])
    if not streamed and offset + len(src) > MAX_KEY + 1:
        raise InputError(f"{root}: {offset + len(src)} images; an index holds at most {MAX_KEY + 1}; start another")
    first_unit = sum(p["n_units"] for p in manifest["parts"][:part_no])
    plan = plan_units(src, checkpoint_every=checkpoint_every, streamed=True)
    ident = _part_identity(exs, dtype, str(src.spec), plan, offset)
    part = {"source": str(src.spec), "fingerprint": None if streamed else src.fingerprint(), "offset": offset,
            "n_items": None if streamed else len(src),  # (a streamed part's: when it is complete)
            "n_units": len(plan.units), "first_unit": first_unit, "unit_kind": plan.kind,
            "checkpoint_every": plan.checkpoint_every, "complete": False}
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if part_no == len(manifest["parts"]):
            manifest["parts"].append(part)
            _write_manifest(root, manifest)  # the folder now says a build is under way (and of what)

    def is_done(u: Any) -> bool:
        h = _read_unit_header(unit_path(root, first_unit + u.index))
        return bool(h and h.get("identity") == ident and h["unit"]["fingerprint"] == u.fingerprint)

    found = {u.index for u in plan.units if is_done(u)} if rank == 0 else set()
    done, mine = share_units(plan.units, found, resolved)  # the unit engine: rank 0's view, balanced shares
    if done:
        say(f"resuming the index build in {root}: {len(done)} of {len(plan.units)} units already done")

    def save(u: Any, d: Any) -> None:
        rows = [cs[0].rows(ex.feature_dim) for ex, cs in zip(exs, d.consumers)]
        keys = rows[0][1]
        tensors = {"index": (keys + offset).contiguous()}
        for ex, (f, _) in zip(exs, rows):
            tensors |= unit_tensors(ex.name, f, dtype)
        header = {"format": INDEX_FORMAT, "identity": ident, "rank": rank,
                  "unit": {"index": u.index, "label": u.label, "fingerprint": u.fingerprint, "n_items": len(u)},
                  "names": [src.describe(int(i)) for i in keys.tolist()],
                  "skipped": [dict(s.to_dict(), index=None if s.index is None else s.index + offset)
                              for s in d.skipped]}
        _save_unit(unit_path(root, first_unit + u.index), header, tensors)

    try:
        with tqdm(total=known_total([u.indices for u in mine]), unit="img", desc="index", smoothing=0.1,
                  disable=not opts.progress or rank != 0) as bar:
            error = scan_units(src, exs, mine, resolved, fresh=lambda u: [RowCollector() for _ in exs],
                               on_unit=save, bar=bar, n_planned=None if streamed else plan.n_items)
        carry_error(resolved, error)  # a failed unit's error reaches every rank (none waits at the barrier)
    except BaseException:
        if rank == 0:
            say(f"the units finished so far are saved in {root}; run the same command again to resume")
        raise
    _complete_part(root, manifest, part_no, plan, first_unit, ident, resolved)
    return open_index(root) if rank == 0 else None


def _complete_part(root: Path, manifest: dict[str, Any], part_no: int, plan: Any, first_unit: int,
                   ident: dict[str, Any], run: Any) -> None:
    """After every rank's share: rank 0 checks the units and marks the part complete; every rank returns once the
    manifest is complete (a scan may follow at once), or raises rank 0's error."""
    from ..run.distributed import barrier, raise_first_error

    world = run.world_size
    if world > 1:
        barrier(run.device)
    error = None
    if run.rank == 0:
        try:
            _finish_part(root, manifest, part_no, plan, first_unit, ident)
        except InputError as e:
            if world == 1:
                raise
            error = e
    if world > 1:
        raise_first_error(error)


def _save_unit(path: Path, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    from ..metrics.build import save_unit_file

    save_unit_file(path, header, tensors, META_KEY)


def _finish_part(root: Path, manifest: dict[str, Any], part_no: int, plan: Any, first_unit: int,
                 ident: dict[str, Any]) -> None:
    """Rank 0: check every unit file of the part, list them (and the skipped images: the source's open-time skips,
    e.g. null Parquet images, then the units') in the manifest, mark the part complete and write the manifest
    atomically."""
    units, skipped = [], [s.to_dict() for s in getattr(plan.source, "skipped_at_open", [])]
    for u in plan.units:
        p = unit_path(root, first_unit + u.index)
        h = _read_unit_header(p)
        if not h or h.get("identity") != ident or h["unit"]["fingerprint"] != u.fingerprint:
            raise InputError(f"{p}: missing or from another build (a rank failed, or the folder is not shared by "
                             "all ranks); run the same command again to compute it")
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            keys = f.get_tensor("index")
        n = int(keys.numel())
        units.append(IndexUnit(first_unit + u.index, part_no, u.label, u.fingerprint, len(u), n,
                               int(keys[0]) if n else -1, int(keys[-1]) if n else -1).to_dict())
        skipped += h.get("skipped", [])
    part = manifest["parts"][part_no]
    if part.get("n_items") is None:  # a streamed part: its images are counted now that every shard was read
        n_items = len(plan.source)
        if part["offset"] + n_items > MAX_KEY + 1:
            raise InputError(f"{root}: {part['offset'] + n_items} images; an index holds at most {MAX_KEY + 1}; "
                             "start another")
        part.update(n_items=n_items, fingerprint=plan.source.fingerprint())
    part.update(complete=True, n_rows=sum(u["n_rows"] for u in units), skipped=skipped,
                finished=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    manifest["units"] = [u for u in manifest["units"] if u["part"] != part_no] + units
    _write_manifest(root, manifest)


def skipped_items(index: TrainingIndex) -> list[SkippedItem]:
    return [SkippedItem(**s) for s in index.skipped()]


def index_from_features(out: str | os.PathLike, model: str, identity: dict[str, Any], features: torch.Tensor, *,
                        names: Sequence[str] | None = None, unit_rows: int = 10_000, dtype: str = "float32",
                        source: str = "features") -> TrainingIndex:
    """An index folder from features already in memory (float (N, D), raw or unit; keys 0..N-1): for benchmarks,
    tests and features extracted elsewhere. ``identity``: the extractor's metadata (``Extractor.metadata()``)."""
    from .store import open_index

    root = Path(out)
    if read_manifest(root) is not None:
        raise InputError(f"{root}: already holds an index; choose another folder")
    n = features.shape[0]
    manifest, _ = _start_part(root, None, [], dtype, source, False)
    manifest["extractors"] = {model: extractor_identity(identity)}
    units = []
    for k, a in enumerate(range(0, n, unit_rows)):
        z = min(n, a + unit_rows)
        keys = torch.arange(a, z, dtype=torch.int64)
        header = {"format": INDEX_FORMAT, "identity": {"source": source}, "rank": 0,
                  "unit": {"index": k, "label": f"rows {a}..{z - 1}", "fingerprint": "", "n_items": z - a},
                  "names": list(names[a:z]) if names is not None else [f"{source}[{i}]" for i in range(a, z)],
                  "skipped": []}
        _save_unit(unit_path(root, k), header, {"index": keys, **unit_tensors(model, features[a:z], dtype)})
        units.append(IndexUnit(k, 0, header["unit"]["label"], "", z - a, z - a, a, z - 1).to_dict())
    manifest["parts"] = [{"source": source, "fingerprint": "", "offset": 0, "n_items": n, "n_units": len(units),
                          "first_unit": 0, "unit_kind": "rows", "checkpoint_every": unit_rows, "complete": True,
                          "n_rows": n, "skipped": []}]
    manifest["units"] = units
    root.mkdir(parents=True, exist_ok=True)
    _write_manifest(root, manifest)
    return open_index(root)
