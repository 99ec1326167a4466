"""Resumable, shard-parallel statistics building: ``fd-eval stats`` over 1M images that survives a kill.

The selected images are split into *units*: one per tar shard for tar sources (each shard cut further into
blocks of ``checkpoint_every`` images when that is given), fixed blocks of ``checkpoint_every`` images
(default :data:`DEFAULT_BLOCK`) otherwise. Each unit's exact float64 moment triple (n, mean, M2 per extractor,
plus its float32 feature rows with ``keep_features``) is saved atomically as ``unit-{k:06d}.safetensors`` in a
checkpoint directory (default ``OUT.partial/``). When every unit is there, the triples are merged in unit order
(Chan's formula, :meth:`MomentAccumulator.merge`, on the CPU), ``OUT`` is written atomically and the checkpoint
directory removed.

Bit-identical results. A unit's triple depends only on its images, the extractors and the batch size: its
images are run in batches of ``batch_size`` starting at the unit's first image (the last batch may be short),
never mixed with another unit's. The result is the left fold of the unit triples in unit order. So a serial
run, a run killed and resumed any number of times, and a run spread over W processes give bit-identical mu and
sigma, provided every unit ran with the same batch size on the same kind of device (float32 features change in
the last bits with either; a resume with another batch size or device is allowed, warned about and recorded).

Identity. Every unit file records the run's identity (checkpoint format, each extractor's name, feature
dimension, weights sha256 and preprocessing, the image transform, the ``num``/``seed`` selection and the unit
plan) and its unit's data fingerprint (a tar unit: the shard's size, modification time and member headers plus
the unit's positions in it; a folder: each file's path, size and modification time; any other source: the whole
source's fingerprint plus the unit's indices). A resume whose settings differ, or whose data changed under a
completed unit, is refused with :class:`CheckpointError` naming what differs (a changed shard can be recomputed by
deleting just its unit file). A unit computed with ``skip_bad`` that skipped images is refused by a strict
resume; a unit without feature rows is refused by a ``keep_features`` resume.

Parallelism. Under ``torchrun`` (``torch.distributed`` initialised, or ``RANK``/``WORLD_SIZE`` set) rank r of W
computes units r, r + W, r + 2W, ... into the shared checkpoint directory; a rank with CUDA uses
``cuda:LOCAL_RANK``. On a resume, units already done are skipped; with a process group the ranks first agree
(rank 0's view, broadcast) on the units left and take every W-th of those, so the work stays balanced. Rank 0
then waits for every unit file (a ``barrier`` when ``torch.distributed`` is initialised, else by polling the
directory: no store or network needed), merges and writes ``OUT``; the other ranks return ``None``. The plan does
not depend on W, so a run may be resumed with any number of processes.

Disk: one float64 D x D matrix per unit and extractor (8 MiB for DINOv2 ViT-L/14, 32 MiB for Inception), e.g.
1 GiB (+4 GiB with Inception) for GPIC's 128 test shards, plus the feature rows with ``keep_features``.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ._version import __version__
from .distributed import barrier
from .errors import CheckpointError, EmptySourceError, FDEvalError
from .extractors import DEFAULT_EXTRACTOR, Extractor
from .io_utils import atomic_path, atomic_write
from .moments import MomentAccumulator
from .options import ResolvedRun, RunOptions, make_options
from .pipeline import (
    Extraction,
    UnitDone,
    check_decode,
    device_decode_spec,
    extraction_stats,
    run_units,
)
from .preprocess import DECODE_PIL_RGB, SourceTransform, source_transform
from .provenance import device_name
from .sources import (
    DirectorySource,
    ImageSource,
    SkippedItem,
    SubsetSource,
    TarSource,
    open_source,
)
from .sources.base import stat_part
from .stats import Stats, save_stats

__all__ = ["UNIT_FORMAT", "DEFAULT_BLOCK", "Unit", "BuildPlan", "plan_units", "build_stats",
           "default_checkpoint_dir"]

UNIT_FORMAT = "fd-eval-build-unit/1"
DEFAULT_BLOCK = 10_000  # images per unit for sources that are not tar shards
MANIFEST = "build.json"
RESULT = "result.safetensors"
_META_KEY = "fd_eval_unit"
_UNIT_RE = re.compile(r"^unit-(\d{6,})\.safetensors$")
# temp files of our atomic writes inside the checkpoint directory (io_utils.atomic_path names them so)
_TMP_RE = re.compile(r"^\.(unit-\d+\.safetensors|build\.json|result\.safetensors)\..*\.tmp$")
_POLL_S = 1.0


# --- the plan -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """One checkpointed piece of the work.

    Attributes:
        index: position in the plan (merge order).
        indices: int64 (n,) ascending indices into the plan's ``source``.
        label: how messages name it (a shard path, or a range of items).
        fingerprint: hex sha256 of the unit's data (see the module docstring).
    """

    index: int
    indices: np.ndarray = field(repr=False)
    label: str
    fingerprint: str

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class BuildPlan:
    """The units of a build. ``selection`` is ``source`` or its ``num``/``seed`` subset (what the stats cover)."""

    source: ImageSource
    selection: ImageSource
    units: list[Unit]
    kind: str  # "tar-shards" | "row-groups" | "blocks"
    checkpoint_every: int | None

    @property
    def n_items(self) -> int:
        return sum(len(u) for u in self.units)

    def describe(self) -> str:
        what = {"tar-shards": "tar shard", "row-groups": "row group"}.get(self.kind, "block")
        every = f" of at most {self.checkpoint_every:,} images" if self.checkpoint_every else ""
        return f"{len(self.units)} units ({what}s{every}) over {self.n_items:,} images"


def _sha(*parts: bytes) -> str:
    import hashlib

    h = hashlib.sha256(UNIT_FORMAT.encode())
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def _blocks(idx: np.ndarray, every: int | None) -> list[np.ndarray]:
    if not every or len(idx) <= every:
        return [idx]
    return [idx[s:s + every] for s in range(0, len(idx), every)]


def plan_units(source: ImageSource, checkpoint_every: int | None = None, num: int | None = None,
               seed: int | None = None) -> BuildPlan:
    """Split ``source`` (or its ``num``/``seed`` subset, as :meth:`ImageSource.subset` picks it) into units.

    Tar shards: one unit per shard (empty shards have none), cut into blocks of at most ``checkpoint_every``
    images when given. Other sources: blocks of ``checkpoint_every`` (default :data:`DEFAULT_BLOCK`) images.
    """
    if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or int(checkpoint_every) < 1):
        raise FDEvalError(f"--checkpoint-every must be a positive number of images, got {checkpoint_every!r}")
    every = int(checkpoint_every) if checkpoint_every is not None else None
    selection = source if num is None else source.subset(num, seed=seed)
    positions = (selection.indices if isinstance(selection, SubsetSource)
                 else np.arange(len(source), dtype=np.int64))
    units: list[Unit] = []
    if isinstance(source, TarSource) or callable(getattr(source, "shard_part", None)):
        # sharded sources (tar shards, local or streamed; Parquet row groups): one unit per shard
        kind = "tar-shards" if isinstance(source, TarSource) else "row-groups"
        shard_of = source.shard_of(positions)
        cuts = np.flatnonzero(np.diff(shard_of)) + 1  # positions ascend, so each shard's items are contiguous
        for group in np.split(positions, cuts):
            s = int(source.shard_of(group[:1])[0])
            path, start = source.shards[s], int(source.shard_starts[s])
            shard_part = source.shard_part(s)
            blocks = _blocks(group, every)
            for b in blocks:
                local = b - start
                label = path if len(blocks) == 1 else f"{path} (samples {local[0]}..{local[-1]})"
                units.append(Unit(len(units), b, label, _sha(b"tar", shard_part, local.tobytes())))
    else:
        kind = "blocks"
        every = every or DEFAULT_BLOCK
        if isinstance(source, DirectorySource):
            def fingerprint(b: np.ndarray) -> str:
                return _sha(b"dir", *(stat_part(source.files[i], os.path.join(source.root, source.files[i]))
                                      for i in b.tolist()))
        else:
            whole = source.fingerprint().encode()

            def fingerprint(b: np.ndarray) -> str:
                return _sha(b"source", whole, b.tobytes())
        for b in _blocks(positions, every):
            label = f"items {b[0]}..{b[-1]} of {source.spec} ({source.describe(int(b[0]))} ...)"
            units.append(Unit(len(units), b, label, fingerprint(b)))
    return BuildPlan(source, selection, units, kind, every)


# --- identity -----------------------------------------------------------------------------------------------
def _identity(extractors: Sequence[Extractor], tf: SourceTransform | None, num: int | None, seed: int | None,
              plan: BuildPlan, decode: str = "pil") -> dict[str, Any]:
    """What every unit of one build must share (JSON-normalised, so it compares equal to a stored copy)."""
    exs = []
    for ex in extractors:
        m = ex.metadata()
        exs.append({k: m[k] for k in ("extractor", "feature_dim", "weights_sha256", "preprocess")})
    ident = {
        "format": UNIT_FORMAT,
        "extractors": exs,
        "image_transform": tf.to_dict() if tf else None,
        "selection": {"num": num, "seed": seed},
        "decode": decode,
        "plan": {"kind": plan.kind, "checkpoint_every": plan.checkpoint_every, "n_units": len(plan.units),
                 "n_items": plan.n_items},
    }
    return json.loads(json.dumps(ident))


def _short(x: Any) -> str:
    return f"{x[:12]}..." if isinstance(x, str) and len(x) > 16 else repr(x)


def _plan_words(p: dict[str, Any]) -> str:
    what = {"tar-shards": "one per tar shard", "row-groups": "one per Parquet row group"}.get(p.get("kind"), "blocks")
    every = f", at most {p['checkpoint_every']} images each" if p.get("checkpoint_every") else ""
    return f"{p.get('n_units')} units ({what}{every}) over {p.get('n_items')} images"


def _identity_diffs(old: Any, new: dict[str, Any]) -> list[str]:
    """``what: then X, now Y`` for each setting that differs between a stored and the current identity."""
    if not isinstance(old, dict):
        return ["no readable settings recorded"]
    out = []
    oe, ne = old.get("extractors") or [], new["extractors"]
    on, nn = [e.get("extractor") for e in oe], [e["extractor"] for e in ne]
    if on != nn:
        out.append(f"models: then {', '.join(map(str, on))}, now {', '.join(nn)}")
    else:
        for a, b in zip(oe, ne):
            name = b["extractor"]
            if a.get("weights_sha256") != b["weights_sha256"]:
                out.append(f"{name} weights sha256: then {_short(a.get('weights_sha256'))}, now "
                           f"{_short(b['weights_sha256'])}")
            if a.get("feature_dim") != b["feature_dim"]:
                out.append(f"{name} feature dimension: then {a.get('feature_dim')}, now {b['feature_dim']}")
            pa, pb = a.get("preprocess") or {}, b["preprocess"] or {}
            out += [f"{name} preprocess {k}: then {pa.get(k)!r}, now {pb.get(k)!r}"
                    for k in sorted(set(pa) | set(pb)) if pa.get(k) != pb.get(k)]
    ot, nt = old.get("image_transform"), new["image_transform"]
    if ot != nt:
        out.append(f"image transform: then {(ot or {}).get('name', 'none')}, now {(nt or {}).get('name', 'none')}")
    if old.get("decode", "pil") != new.get("decode", "pil"):
        out.append(f"--decode: then {old.get('decode', 'pil')}, now {new.get('decode', 'pil')}")
    if old.get("selection") != new["selection"]:
        o, n = old.get("selection") or {}, new["selection"]
        out.append(f"--num/--seed: then {o.get('num')}/{o.get('seed')}, now {n['num']}/{n['seed']}")
    if old.get("plan") != new["plan"]:
        out.append(f"units: then {_plan_words(old.get('plan') or {})}, now {_plan_words(new['plan'])}")
    return out


def _unit_path(ckpt: Path, k: int) -> Path:
    return ckpt / f"unit-{k:06d}.safetensors"


def _read_header(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})[_META_KEY])
        if not isinstance(header, dict):
            raise TypeError("not an object")
        return header
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: damaged or not an fd-eval unit file ({type(e).__name__}: {e}); delete it to "
                              "recompute that unit") from None


def _check_unit(path: Path, header: dict[str, Any], plan: BuildPlan, identity: dict[str, Any],
                keep_features: bool, skip_bad: bool, ckpt: Path) -> Unit:
    """Refuse a unit file that does not belong to this build; return the plan's unit it holds."""
    fix = f"rerun with the original settings, or delete {ckpt} to start over"
    if header.get("format") != UNIT_FORMAT:
        raise CheckpointError(f"{path}: cannot resume: written in checkpoint format {header.get('format')!r}, this "
                              f"fd-eval writes {UNIT_FORMAT!r}; delete {ckpt} to start over")
    diffs = _identity_diffs(header.get("identity"), identity)
    if diffs:
        raise CheckpointError(f"{ckpt}: cannot resume: the checkpoint was made with other settings "
                              f"({'; '.join(diffs)}); {fix}")
    info = header.get("unit") or {}
    k = int(_UNIT_RE.match(path.name).group(1))  # type: ignore[union-attr]
    if info.get("index") != k or not 0 <= k < len(plan.units):
        raise CheckpointError(f"{path}: damaged: it holds unit {info.get('index')!r} of {len(plan.units)}; delete it "
                              "to recompute that unit")
    unit = plan.units[k]
    if info.get("fingerprint") != unit.fingerprint or info.get("n_items") != len(unit):
        raise CheckpointError(
            f"{path}: cannot resume: the data of unit {k} ({unit.label}) changed since it was computed (files, sizes, "
            f"modification times or tar members differ); restore the original data, or delete {path} to recompute "
            f"that unit (or {ckpt} to start over)")
    if keep_features and not header.get("features"):
        raise CheckpointError(f"{path}: cannot resume with --keep-features (keep_features=True): unit {k} was computed "
                              f"without feature rows; {fix}")
    if header.get("skipped") and not skip_bad:
        raise CheckpointError(
            f"{path}: unit {k} ({unit.label}) skipped {len(header['skipped'])} unreadable image(s) under --skip-bad; "
            f"pass --skip-bad (skip_bad=True) again, or delete {path} to recompute that unit strictly")
    return unit


def _scan(ckpt: Path, plan: BuildPlan, identity: dict[str, Any], keep_features: bool,
          skip_bad: bool) -> dict[int, dict[str, Any]]:
    """Headers of the completed (and valid) units already in ``ckpt``, by unit index."""
    done = {}
    if not ckpt.is_dir():
        return done
    for p in sorted(ckpt.iterdir()):
        if _UNIT_RE.match(p.name):
            header = _read_header(p)
            unit = _check_unit(p, header, plan, identity, keep_features, skip_bad, ckpt)
            done[unit.index] = header
    return done


# --- ranks ---------------------------------------------------------------------------------------------------
def _agree_done(done: set[int], n_units: int, rank: int, dev: torch.device) -> set[int]:
    """Collective: rank 0's view of the completed units, on every rank (a uint8 mask; nothing pickled)."""
    import torch.distributed as dist

    comm = dev if dist.get_backend() == "nccl" else torch.device("cpu")
    mask = torch.zeros(n_units, dtype=torch.uint8, device=comm)
    if rank == 0 and done:
        mask[torch.tensor(sorted(done), dtype=torch.int64, device=comm)] = 1
    dist.broadcast(mask, src=0)
    return set(torch.nonzero(mask).flatten().cpu().tolist())


# --- computing units ----------------------------------------------------------------------------------------
def _numerics(dev: torch.device, batch_size: int) -> dict[str, Any]:
    """What changes features in their last bits (recorded per unit; differences are warned about)."""
    return {"batch_size": batch_size, "device": dev.type, "device_name": device_name(dev),
            "fd_eval": __version__, "torch": torch.__version__}


def save_unit_file(path: Path, header: dict[str, Any], tensors: dict[str, torch.Tensor],
                   meta_key: str = _META_KEY) -> None:
    """Write one checkpoint unit atomically (temp file in the same folder, fsync, rename); ``header`` as JSON in
    the safetensors metadata under ``meta_key`` (also used by :mod:`fd_eval.copies`)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={meta_key: json.dumps(header, sort_keys=True)})
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _compute_units(plan: BuildPlan, units: Sequence[Unit], extractors: Sequence[Extractor],
                   tf: SourceTransform | None, run: ResolvedRun, keep_features: bool, ckpt: Path,
                   identity: dict[str, Any], bar: Any, on_saved: Callable[[Unit], None]) -> None:
    """Extract ``units`` in one pass of :func:`fd_eval.pipeline.run_units` and save each unit's triple as soon as
    its last batch is in (unit u's images run in batches of ``batch_size`` from its first image, exactly as
    ``pipeline.extract`` on that unit alone would run them)."""
    dev, rank = run.device, run.rank
    numerics = _numerics(dev, run.batch_size)

    def consumers(k: int) -> list[MomentAccumulator]:
        return [MomentAccumulator(ex.feature_dim, dev, keep_features=keep_features) for ex in extractors]

    def save(done: UnitDone) -> None:
        unit = units[done.k]
        accs = [cs[0] for cs in done.consumers]
        tensors: dict[str, torch.Tensor] = {}
        for ex, acc in zip(extractors, accs):
            st = acc.state_dict()  # float64 mean/m2 on the CPU (the one host sync per unit)
            tensors[f"{ex.name}.mean"], tensors[f"{ex.name}.m2"] = st["mean"], st["m2"]
            if keep_features and acc.n:
                tensors[f"{ex.name}.features"] = st["features"]
        header = {
            "format": UNIT_FORMAT, "identity": identity,
            "unit": {"index": unit.index, "label": unit.label, "fingerprint": unit.fingerprint, "n_items": len(unit)},
            "n": accs[0].n, "features": keep_features, "skipped": [s.to_dict() for s in done.skipped],
            "numerics": numerics, "seconds": done.seconds, "rank": rank,
            "decode": device_decode_spec(dev) if done.device_decoded else DECODE_PIL_RGB,
        }
        save_unit_file(_unit_path(ckpt, unit.index), header, tensors)
        on_saved(unit)

    run_units(plan.source, extractors, [u.indices for u in units], consumers, run, image_transform=tf, on_unit=save,
              bar=bar)


# --- merging ------------------------------------------------------------------------------------------------
def _wait_for_units(ckpt: Path, plan: BuildPlan, timeout: float | None, log: Callable[[str], None],
                    after_barrier: bool) -> None:
    """Rank 0: wait until every unit file exists (written by the other ranks)."""
    t0 = last_note = time.monotonic()
    while True:
        missing = [u.index for u in plan.units if not _unit_path(ckpt, u.index).exists()]
        if not missing:
            return
        waited = time.monotonic() - t0
        if timeout is not None and waited > timeout:
            why = ("every rank has finished, so " + str(ckpt) + " is probably not on a filesystem all ranks share"
                   if after_barrier else "a rank may have died; run the same command again to resume")
            raise CheckpointError(f"{ckpt}: units {missing[:5]}{' ...' if len(missing) > 5 else ''} missing after "
                                  f"waiting {waited:.0f} s ({why})")
        if time.monotonic() - last_note > 300:
            log(f"rank 0: waiting for {len(missing)} unit(s) from the other ranks (e.g. unit {missing[0]})")
            last_note = time.monotonic()
        time.sleep(_POLL_S)


def _merge(ckpt: Path, plan: BuildPlan, extractors: Sequence[Extractor], identity: dict[str, Any],
           keep_features: bool, skip_bad: bool) -> tuple[list[MomentAccumulator], list[SkippedItem], float,
                                                         list[dict[str, Any]]]:
    """Left fold of the unit triples in unit order, on the CPU in float64 (deterministic)."""
    from safetensors import SafetensorError, safe_open

    accs = [MomentAccumulator(ex.feature_dim, "cpu", keep_features=keep_features) for ex in extractors]
    skipped: list[SkippedItem] = []
    seconds = 0.0
    numerics: list[dict[str, Any]] = []
    for unit in plan.units:
        path = _unit_path(ckpt, unit.index)
        if not path.exists():
            raise CheckpointError(f"{path}: unit {unit.index} ({unit.label}) is missing (removed while this run was "
                                  "going?); run the same command again to recompute it")
        header = _read_header(path)
        _check_unit(path, header, plan, identity, keep_features, skip_bad, ckpt)
        n = header.get("n")
        try:
            with safe_open(str(path), framework="pt") as f:
                names = set(f.keys())
                for ex, acc in zip(extractors, accs):
                    d = ex.feature_dim
                    part = MomentAccumulator(d, "cpu", keep_features=keep_features)
                    state = {"n": n, "mean": f.get_tensor(f"{ex.name}.mean"), "m2": f.get_tensor(f"{ex.name}.m2")}
                    feats = None
                    if keep_features:
                        feats = (f.get_tensor(f"{ex.name}.features") if f"{ex.name}.features" in names
                                 else torch.zeros(0, d, dtype=torch.float32))
                        state["features"] = feats
                    ok = (isinstance(n, int) and 0 <= n <= len(unit) and state["mean"].shape == (d,)
                          and state["m2"].shape == (d, d) and state["mean"].dtype == torch.float64
                          and state["m2"].dtype == torch.float64 and (feats is None or feats.shape == (n, d)))
                    if not ok:
                        raise ValueError(f"{ex.name} tensors do not match n = {n}, D = {d}")
                    part.load_state_dict(state)
                    acc.merge(part)
        except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: damaged unit file ({type(e).__name__}: {e}); delete it to recompute "
                                  "that unit") from None
        skipped += [SkippedItem(**s) for s in header.get("skipped", [])]
        seconds += float(header.get("seconds", 0.0))
        numerics.append({**(header.get("numerics") or {}), "decode": header.get("decode", DECODE_PIL_RGB)})
    return accs, skipped, seconds, numerics


def _numerics_warning(numerics: list[dict[str, Any]]) -> str | None:
    keys = ("batch_size", "device", "fd_eval", "torch")
    seen = sorted({tuple(str(n.get(k)) for k in keys) for n in numerics})
    if len(seen) <= 1:
        return None
    kinds = "; ".join(", ".join(f"{k} {v}" for k, v in zip(keys, s)) for s in seen)
    return (f"the units were computed with different numerics ({kinds}): the statistics agree to float32 "
            "rounding but are not bit-identical to a single uninterrupted run")


def _cleanup(ckpt: Path) -> None:
    """Remove our files from the checkpoint folder, then the folder if nothing else is left in it."""
    with contextlib.suppress(OSError):
        for p in ckpt.iterdir():
            if _UNIT_RE.match(p.name) or _TMP_RE.match(p.name) or p.name in (MANIFEST, RESULT):
                with contextlib.suppress(OSError):
                    p.unlink()
        ckpt.rmdir()


def default_checkpoint_dir(out: str | os.PathLike) -> Path:
    """``OUT.partial`` beside the output file."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- the entry point ----------------------------------------------------------------------------------------
def build_stats(
    source: str | os.PathLike | Any,
    out: str | os.PathLike,
    models: str | Sequence[str] = (DEFAULT_EXTRACTOR,),
    *,
    extractors: Sequence[Extractor] | None = None,
    weights: Any = None,
    num: int | None = None,
    seed: int | None = None,
    keep_features: bool = False,
    image_transform: str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    wait_timeout: float | None = None,
    log: Callable[[str], None] | None = None,
    options: RunOptions | None = None,
    **kw: Any,
) -> dict[str, Stats] | None:
    """Build a statistics file (one section per extractor) resumably, optionally across processes.

    Same images, extractors and options as :func:`fd_eval.compute_stats`; see the module docstring for units,
    identity checks and the parallel protocol. Running the same call again after a crash or kill continues from
    the last completed unit and writes bit-identical statistics.

    Args:
        source: directory, .zip, tar shard(s) / glob / brace range, .npz, .npy, uint8 NHWC array, ImageSource.
        out: the statistics file to write (safetensors), atomically.
        checkpoint_dir: where unit files go (default ``OUT.partial``; must be shared by all ranks). Removed
            after ``out`` is written.
        checkpoint_every: images per unit (default: one unit per tar shard, else :data:`DEFAULT_BLOCK`); tar
            shards are cut into blocks of at most this many images.
        options, **kw: how the run executes (:class:`fd_eval.RunOptions`). ``precision`` (``"exact"``, the
            default, or ``"fast"``; :mod:`fd_eval.precision`) and ``decode`` (``"pil"`` or ``"gpu"``) are part of
            the build's identity, so a resume in another mode is refused. ``rank``, ``world_size``: override
            torch.distributed / ``RANK``/``WORLD_SIZE``.
        wait_timeout: seconds rank 0 waits for the other ranks' units (default: forever when polling, 10 min
            after a ``torch.distributed`` barrier, for the shared filesystem to show them).
        log: where one-line notes go (resume, waiting); default stderr when ``progress``.
    Returns:
        {extractor name: Stats} (what ``out`` holds) on rank 0; None on the other ranks.
    Raises:
        CheckpointError: the checkpoint belongs to other settings or data, or is damaged (names what differs).
        plus what :func:`fd_eval.compute_stats` raises (BadImageError, EmptySourceError, ...).
    """
    from .api import resolve_extractors
    from .preflight import check_outputs

    opts = make_options(options, kw, "build_stats")
    progress, skip_bad, decode = opts.progress, opts.skip_bad, opts.decode
    say = log or (_stderr if progress else (lambda msg: None))
    out = Path(out)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else default_checkpoint_dir(out)
    check_outputs({"SOURCE": source, "--weights": weights}, {"-o/--output": out}, {"--checkpoint-dir": ckpt})
    run = opts.resolve(collectives=False)  # ranks share the checkpoint folder; a process group is optional
    r, w, dist_on, dev = run.rank, run.world_size, run.group, run.device
    # a missing or unknown source (or a remote one offline) fails before any weights load
    src = open_source(source, skip_bad=skip_bad, offline=opts.offline)
    exs = resolve_extractors(models, extractors, weights, run, dev)  # under opts.offline
    from .cmmd import wants_cmmd

    # a CMMD reference (CLIP) is its embeddings: kept whatever keep_features says (and resumed as such)
    keep_features = keep_features or any(wants_cmmd(ex.name) for ex in exs)
    tf = source_transform(image_transform)
    check_decode(decode, exs, tf)
    plan = plan_units(src, checkpoint_every=checkpoint_every, num=num, seed=seed)
    identity = _identity(exs, tf, num, seed, plan, decode)

    done = _scan(ckpt, plan, identity, keep_features, skip_bad)
    ckpt.mkdir(parents=True, exist_ok=True)
    files = src.provenance() if callable(getattr(src, "provenance", None)) else None  # remote: ETag, revision
    manifest = {"identity": identity, "source": str(src.spec), "units": [u.label for u in plan.units], "files": files,
                "note": "fd-eval stats checkpoint: run the same command again to resume; removed when done"}
    if not (ckpt / MANIFEST).exists() or not done:
        with atomic_write(ckpt / MANIFEST, "w") as fh:
            json.dump(manifest, fh, indent=1)
    if dist_on and w > 1:
        # With a process group the ranks can agree on what is left and share it evenly: a resume whose
        # remaining units all belong to one rank's r::W share would otherwise keep the others waiting at the
        # barrier for that rank's whole share (and past the process group's timeout on big builds).
        done_set = _agree_done(set(done), len(plan.units), r, dev)
        mine = [u for u in plan.units if u.index not in done_set][r::w]
    else:  # no communication: a fixed share, r, r + W, ..., that needs none (done units skipped)
        done_set = set(done)
        mine = [u for u in plan.units[r::w] if u.index not in done_set]
    where = f"rank {r} of {w}: " if w > 1 else ""
    if done_set:
        here = f", {len(mine)} to compute here" if w > 1 else ""
        say(f"{where}resuming from {ckpt}: {len(done_set)} of {len(plan.units)} units already done{here}")

    bs = run.batch_size
    saved: list[Unit] = []
    try:
        with tqdm(total=sum(len(u) for u in mine), unit="img", desc=f"{where}stats", smoothing=0.1,
                  disable=not progress or r != 0) as bar:
            _compute_units(plan, mine, exs, tf, run, keep_features, ckpt, identity, bar, saved.append)
    except BaseException:
        if saved or done_set:
            say(f"{where}{len(done_set) + len(saved)} of {len(plan.units)} units are saved in {ckpt}; run the same "
                "command again to resume")
        raise

    if w > 1:
        if dist_on:
            barrier(dev)
        if r != 0:
            say(f"rank {r} of {w}: computed {len(saved)} unit(s); rank 0 merges them into {out}")
            return None
        _wait_for_units(ckpt, plan, wait_timeout if wait_timeout is not None else (600.0 if dist_on else None),
                        say, after_barrier=dist_on)

    accs, skipped, seconds, numerics = _merge(ckpt, plan, exs, identity, keep_features, skip_bad)
    n = accs[0].n
    if n == 0:
        raise EmptySourceError(f"{src.spec}: every image was skipped as unreadable ({len(skipped)})")
    warnings = [w_ for w_ in [_numerics_warning(numerics)] if w_]
    for w_ in warnings:
        say(f"warning: {w_}")
    info = {
        "fingerprint": plan.selection.fingerprint(), "num": num, "seed": seed,
        "image_transform": tf.to_dict() if tf else None,
        "skipped_items": [s.to_dict() for s in skipped], "seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else float("nan"),
        "build": {"units": len(plan.units), "kind": plan.kind, "checkpoint_every": plan.checkpoint_every,
                  "resumed_units": len(done_set), "world_size": w, "batch_size": bs, "warnings": warnings},
    }
    used = sorted({str(x.get("decode", DECODE_PIL_RGB)) for x in numerics} - {DECODE_PIL_RGB})
    ext = Extraction(accs, skipped, n, seconds, decode=used[0] if used else DECODE_PIL_RGB)
    stats = extraction_stats(ext, exs, plan.selection, info)
    # Written inside the checkpoint folder first, so a kill at any moment leaves nothing half-written beside OUT.
    tmp_result = ckpt / RESULT
    save_stats(tmp_result, list(stats.values()))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp_result, out)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        save_stats(out, list(stats.values()))  # checkpoint folder on another filesystem
    _cleanup(ckpt)
    return stats
