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

import errno
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from .._version import __version__
from ..core.consumers import CONSUMER_METRICS
from ..core.moments import MomentAccumulator
from ..errors import CheckpointError, EmptySourceError, FDEvalError
from ..extractors import DEFAULT_EXTRACTOR, Extractor
from ..extractors.preprocess import DECODE_PIL_RGB, SourceTransform, source_transform
from ..outputs.stats import Stats, extraction_stats, save_stats
from ..run import engine
from ..run.distributed import barrier
from ..run.engine import (  # noqa: F401 - Unit, plan_units, DEFAULT_BLOCK: public here since 0.x
    DEFAULT_BLOCK,
    Unit,
    UnitFiles,
    UnitPlan,
    carry_error,
    decode_states,
    encode_states,
    plan_units,
    scan_units,
    share_units,
    skipped_items,
    wait_for_units,
)
from ..run.options import ResolvedRun, RunOptions, make_options
from ..run.pipeline import Extraction, UnitDone, check_decode, device_decode_spec, feature_consumers
from ..run.provenance import device_name
from ..run.streamed import index_first_for_ranks, known_total
from ..sources import SkippedItem, open_source
from ..util.io_utils import atomic_write

__all__ = ["UNIT_FORMAT", "DEFAULT_BLOCK", "Unit", "BuildPlan", "plan_units", "build_stats",
           "default_checkpoint_dir"]

UNIT_FORMAT = "fd-eval-build-unit/1"
MANIFEST = "build.json"
RESULT = "result.safetensors"
_META_KEY = "fd_eval_unit"
BuildPlan = UnitPlan  # the name before the unit engine (fd_eval.run.engine) took the plan


# --- identity -----------------------------------------------------------------------------------------------
def _identity(extractors: Sequence[Extractor], tf: SourceTransform | None, num: int | None, seed: int | None,
              plan: UnitPlan, decode: str = "pil") -> dict[str, Any]:
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
        # (a streamed plan's item count is known only after its shards are read; every unit's fingerprint holds
        # its shard's items)
        "plan": {"kind": plan.kind, "checkpoint_every": plan.checkpoint_every, "n_units": len(plan.units),
                 "n_items": None if plan.streamed else plan.n_items},
    }
    metrics = sorted(CONSUMER_METRICS)
    if metrics:  # registered consumer metrics: their states are in the unit files too
        ident["metrics"] = metrics
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
    if old.get("metrics", []) != new.get("metrics", []):
        out.append(f"consumer metrics: then {old.get('metrics', [])}, now {new.get('metrics', [])}")
    if old.get("plan") != new["plan"]:
        out.append(f"units: then {_plan_words(old.get('plan') or {})}, now {_plan_words(new['plan'])}")
    return out


def save_unit_file(path: Path, header: dict[str, Any], tensors: dict[str, torch.Tensor],
                   meta_key: str = _META_KEY) -> None:
    """Write one checkpoint unit atomically (:func:`fd_eval.run.engine.save_unit_file`; a name of its own here, looked
    up at each write, so a test can hook the writes of ``stats``)."""
    engine.save_unit_file(path, header, tensors, meta_key)


def _unit_files(ckpt: Path, identity: dict[str, Any]) -> UnitFiles:
    return UnitFiles(ckpt, UNIT_FORMAT, identity, meta_key=_META_KEY, diffs=_identity_diffs,
                     extra_names=(MANIFEST, RESULT), save_file=lambda p, h, t: save_unit_file(p, h, t))


def _read_header(path: Path) -> dict[str, Any]:
    """A unit file's JSON header (CheckpointError when damaged)."""
    return _unit_files(path.parent, {}).read_header(path)


def _features_check(keep_features: bool, fix: str) -> Callable[[Path, dict[str, Any], Unit], None]:
    def check(path: Path, header: dict[str, Any], unit: Unit) -> None:
        if keep_features and not header.get("features"):
            raise CheckpointError(f"{path}: cannot resume with --keep-features (keep_features=True): unit "
                                  f"{unit.index} was computed without feature rows; {fix}")
    return check


# --- computing units ----------------------------------------------------------------------------------------
def _numerics(dev: torch.device, batch_size: int) -> dict[str, Any]:
    """What changes features in their last bits (recorded per unit; differences are warned about)."""
    return {"batch_size": batch_size, "device": dev.type, "device_name": device_name(dev),
            "fd_eval": __version__, "torch": torch.__version__}


def _unit_tensors(extractors: Sequence[Extractor], accs: Sequence[MomentAccumulator], mets: Sequence[dict[str, Any]],
                  keep_features: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A unit's states as unit-file tensors and header fields. Moments: ``{model}.mean``, ``{model}.m2`` (and
    ``{model}.features`` when kept and non-empty), ``n`` in the header (the format of fd-eval-build-unit/1);
    registered consumer metrics: their declared states (:func:`fd_eval.run.engine.encode_states`) as
    ``{model}.{metric}.{state}``, scalars under the header's ``states``."""
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {"n": accs[0].n}
    for ex, acc, m in zip(extractors, accs, mets):
        st = acc.state_dict()  # float64 mean/m2 on the CPU (the one host sync per unit)
        tensors[f"{ex.name}.mean"], tensors[f"{ex.name}.m2"] = st["mean"], st["m2"]
        if keep_features and acc.n:
            tensors[f"{ex.name}.features"] = st["features"]
        mt, ms = encode_states({f"{ex.name}.{name}": c for name, c in m.items()})
        tensors.update(mt)
        if ms:
            extra.setdefault("states", {}).update(ms)
    return tensors, extra


def _compute_units(plan: UnitPlan, units: Sequence[Unit], extractors: Sequence[Extractor],
                   tf: SourceTransform | None, run: ResolvedRun, keep_features: bool, files: UnitFiles,
                   bar: Any, on_saved: Callable[[Unit], None]) -> FDEvalError | None:
    """Extract ``units`` in one pass of the unit engine and save each unit's states as soon as its last batch is
    in (unit u's images run in batches of ``batch_size`` from its first image, exactly as ``pipeline.extract``
    on that unit alone would run them). Returns a unit's error under a process group (see
    :func:`fd_eval.run.engine.scan_units`)."""
    dev, numerics = run.device, _numerics(run.device, run.batch_size)
    made: dict[int, tuple[list[MomentAccumulator], list[dict[str, Any]]]] = {}

    def fresh(unit: Unit) -> list[list[Any]]:
        accs, mets = made[unit.index] = feature_consumers(extractors, dev, keep_features)
        return [[a, *m.values()] for a, m in zip(accs, mets)]

    def save(unit: Unit, done: UnitDone) -> None:
        accs, mets = made.pop(unit.index)
        tensors, extra = _unit_tensors(extractors, accs, mets, keep_features)
        header = {
            **extra, "unit": {"n_items": len(unit)}, "features": keep_features,
            "skipped": [s.to_dict() for s in done.skipped], "numerics": numerics, "seconds": done.seconds,
            "rank": run.rank, "decode": device_decode_spec(dev) if done.device_decoded else DECODE_PIL_RGB,
        }
        files.save(unit, header, tensors)
        on_saved(unit)

    return scan_units(plan.source, extractors, units, run, fresh=fresh, on_unit=save, image_transform=tf, bar=bar)


# --- merging ------------------------------------------------------------------------------------------------
def _merge(files: UnitFiles, plan: UnitPlan, extractors: Sequence[Extractor], keep_features: bool,
           skip_bad: bool) -> tuple[Extraction, float, list[dict[str, Any]]]:
    """Left fold of the unit states in unit order, on the CPU in float64 (deterministic)."""
    cpu = torch.device("cpu")
    accs, mets = feature_consumers(extractors, cpu, keep_features)
    skipped: list[SkippedItem] = []
    seconds = 0.0
    numerics: list[dict[str, Any]] = []
    for unit in plan.units:
        path = files.path(unit.index)
        if not path.exists():
            raise CheckpointError(f"{path}: unit {unit.index} ({unit.label}) is missing (removed while this run was "
                                  "going?); run the same command again to recompute it")
        header, t = files.read(path)
        files.check(path, header, plan.units, skip_bad=skip_bad)
        n = header.get("n")
        try:
            for ex, acc, m in zip(extractors, accs, mets):
                acc.merge(_moments_part(ex, t, n, len(unit), keep_features))
                part = {f"{ex.name}.{name}": c.fresh() for name, c in m.items()}
                decode_states(part, t, header.get("states"))
                for c, p in zip(m.values(), part.values()):
                    c.merge(p)
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: damaged unit file ({type(e).__name__}: {e}); delete it to recompute "
                                  "that unit") from None
        skipped += skipped_items(header)
        seconds += float(header.get("seconds", 0.0))
        numerics.append({**(header.get("numerics") or {}), "decode": header.get("decode", DECODE_PIL_RGB)})
    n = accs[0].n
    used = sorted({str(x.get("decode", DECODE_PIL_RGB)) for x in numerics} - {DECODE_PIL_RGB})
    ext = Extraction(accs, skipped, n, seconds, decode=used[0] if used else DECODE_PIL_RGB, metrics=mets)
    return ext, seconds, numerics


def _moments_part(ex: Extractor, t: dict[str, torch.Tensor], n: Any, n_unit: int,
                  keep_features: bool) -> MomentAccumulator:
    d = ex.feature_dim
    part = MomentAccumulator(d, "cpu", keep_features=keep_features)
    state = {"n": n, "mean": t[f"{ex.name}.mean"], "m2": t[f"{ex.name}.m2"]}
    feats = None
    if keep_features:
        feats = t.get(f"{ex.name}.features", torch.zeros(0, d, dtype=torch.float32))
        state["features"] = feats
    ok = (isinstance(n, int) and 0 <= n <= n_unit and state["mean"].shape == (d,)
          and state["m2"].shape == (d, d) and state["mean"].dtype == torch.float64
          and state["m2"].dtype == torch.float64 and (feats is None or feats.shape == (n, d)))
    if not ok:
        raise ValueError(f"{ex.name} tensors do not match n = {n}, D = {d}")
    part.load_state_dict(state)
    return part


def _numerics_warning(numerics: list[dict[str, Any]]) -> str | None:
    keys = ("batch_size", "device", "fd_eval", "torch")
    seen = sorted({tuple(str(n.get(k)) for k in keys) for n in numerics})
    if len(seen) <= 1:
        return None
    kinds = "; ".join(", ".join(f"{k} {v}" for k, v in zip(keys, s)) for s in seen)
    return (f"the units were computed with different numerics ({kinds}): the statistics agree to float32 "
            "rounding but are not bit-identical to a single uninterrupted run")


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
            default, or ``"fast"``; :mod:`fd_eval.extractors.precision`) and ``decode`` (``"pil"`` or ``"gpu"``) are
            part of
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
    from ..api import resolve_extractors
    from ..run.preflight import check_outputs

    opts = make_options(options, kw, "build_stats")
    progress, skip_bad, decode = opts.progress, opts.skip_bad, opts.decode
    say = log or (_stderr if progress else (lambda msg: None))
    out = Path(out)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else default_checkpoint_dir(out)
    check_outputs({"SOURCE": source, "--weights": weights}, {"-o/--output": out}, {"--checkpoint-dir": ckpt})
    run = opts.resolve(collectives=False)  # ranks share the checkpoint folder; a process group is optional
    r, w, dev = run.rank, run.world_size, run.device
    # a missing or unknown source (or a remote one offline) fails before any weights load
    src = open_source(source, skip_bad=skip_bad, offline=opts.offline)
    exs = resolve_extractors(models, extractors, weights, run, dev)  # under opts.offline
    keep_features = _keeps_features(keep_features, exs)
    tf = source_transform(image_transform)
    check_decode(decode, exs, tf)
    index_first_for_ranks(src, run, say)  # (one process: remote shards are indexed from the pass's one read)
    plan = plan_units(src, checkpoint_every=checkpoint_every, num=num, seed=seed, streamed=True)
    identity = _identity(exs, tf, num, seed, plan, decode)

    files = _unit_files(ckpt, identity)
    done = files.scan(plan.units, skip_bad=skip_bad, check=_features_check(
        keep_features, f"rerun with the original settings, or delete {ckpt} to start over"))
    ckpt.mkdir(parents=True, exist_ok=True)
    _write_manifest(ckpt, identity, src, plan, rewrite=not done)
    done_set, mine = share_units(plan.units, set(done), run)
    where = f"rank {r} of {w}: " if w > 1 else ""
    if done_set:
        here = f", {len(mine)} to compute here" if w > 1 else ""
        say(f"{where}resuming from {ckpt}: {len(done_set)} of {len(plan.units)} units already done{here}")

    saved: list[Unit] = []
    try:
        with tqdm(total=known_total([u.indices for u in mine]), unit="img", desc=f"{where}stats", smoothing=0.1,
                  disable=not progress or r != 0) as bar:
            error = _compute_units(plan, mine, exs, tf, run, keep_features, files, bar, saved.append)
        carry_error(run, error)  # under a process group: every rank raises a failed unit's error
    except BaseException:
        if saved or done_set:
            say(f"{where}{len(done_set) + len(saved)} of {len(plan.units)} units are saved in {ckpt}; run the same "
                "command again to resume")
        raise

    if w > 1 and not _meet_ranks(files, plan, run, out, len(saved), wait_timeout, say):
        return None  # not rank 0: its units are saved for rank 0 to merge
    build = {"units": len(plan.units), "kind": plan.kind, "checkpoint_every": plan.checkpoint_every,
             "resumed_units": len(done_set), "world_size": w, "batch_size": run.batch_size}
    stats = _write_result(files, plan, exs, out, keep_features, skip_bad, say, build,
                          {"num": num, "seed": seed, "image_transform": tf.to_dict() if tf else None})
    files.cleanup()
    return stats


def _keeps_features(keep_features: bool, exs: Sequence[Extractor]) -> bool:
    """Whether unit files keep feature rows: asked for, or a CMMD extractor's (a CMMD reference (CLIP) is its
    embeddings: kept whatever ``keep_features`` says, and resumed as such)."""
    from .cmmd import wants_cmmd

    return keep_features or any(wants_cmmd(ex.name) for ex in exs)


def _write_manifest(ckpt: Path, identity: dict[str, Any], src: Any, plan: UnitPlan, rewrite: bool) -> None:
    """The checkpoint folder's manifest (what is being built, from which files); written when missing, or
    ``rewrite`` (no unit done yet)."""
    remote = src.provenance() if callable(getattr(src, "provenance", None)) else None  # remote: ETag, revision
    manifest = {"identity": identity, "source": str(src.spec), "units": [u.label for u in plan.units], "files": remote,
                "note": "fd-eval stats checkpoint: run the same command again to resume; removed when done"}
    if not (ckpt / MANIFEST).exists() or rewrite:
        with atomic_write(ckpt / MANIFEST, "w") as fh:
            json.dump(manifest, fh, indent=1)


def _meet_ranks(files: UnitFiles, plan: UnitPlan, run: ResolvedRun, out: Path, n_saved: int,
                wait_timeout: float | None, say: Callable[[str], None]) -> bool:
    """Several ranks, after this one's share: True on rank 0 once every unit file is there (it merges them), False
    on the others."""
    dist_on = run.group
    if dist_on:
        barrier(run.device)
    if run.rank != 0:
        say(f"rank {run.rank} of {run.world_size}: computed {n_saved} unit(s); rank 0 merges them into {out}")
        return False
    wait_for_units(files, plan.units, wait_timeout if wait_timeout is not None else (600.0 if dist_on else None),
                   say, after_barrier=dist_on)
    return True


def _write_result(files: UnitFiles, plan: UnitPlan, exs: Sequence[Extractor], out: Path, keep_features: bool,
                  skip_bad: bool, say: Callable[[str], None], build: dict[str, Any],
                  selection: dict[str, Any]) -> dict[str, Stats]:
    """Rank 0: merge every unit, write ``out`` atomically (through the checkpoint folder), return the stats."""
    ext, seconds, numerics = _merge(files, plan, exs, keep_features, skip_bad)
    n = ext.n_images
    if n == 0:
        raise EmptySourceError(f"{plan.source.spec}: every image was skipped as unreadable ({len(ext.skipped)})")
    warnings = [w_ for w_ in [_numerics_warning(numerics)] if w_]
    for w_ in warnings:
        say(f"warning: {w_}")
    info = {
        "fingerprint": plan.selection.fingerprint(), "num": selection["num"], "seed": selection["seed"],
        "image_transform": selection["image_transform"],
        "skipped_items": [s.to_dict() for s in ext.skipped], "seconds": seconds,
        "images_per_s": n / seconds if seconds > 0 else float("nan"),
        "build": {**build, "warnings": warnings},
    }
    stats = extraction_stats(ext, exs, plan.selection, info)
    # Written inside the checkpoint folder first, so a kill at any moment leaves nothing half-written beside OUT.
    tmp_result = files.folder / RESULT
    save_stats(tmp_result, list(stats.values()))
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp_result, out)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        save_stats(out, list(stats.values()))  # checkpoint folder on another filesystem
    return stats
