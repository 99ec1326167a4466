"""The unit engine: one resumable, rank-parallel pass over units of a source, below ``stats`` and ``copies``.

A pass over many images (1M test images, 100M training images) is split into *units* (:func:`plan_units`: one
per tar shard, else fixed blocks). Each unit gets fresh :class:`fd_eval.core.consumers.Consumer` objects, is run through
the one extraction loop (:func:`fd_eval.run.pipeline.run_units`; a unit's features depend only on its images and the
batch size) and, when a checkpoint folder is given, its consumers' declared states are saved atomically as one
safetensors *unit file* with a JSON header. A later run with the same settings reads the finished units back
instead of computing them (:meth:`UnitFiles.scan`) and refuses, with :class:`CheckpointError` naming what
differs, a folder made with other settings or data. The merged result is the fold of the unit states in unit
order, so a serial run, a resumed run and a run over W processes give the same bits.

The pieces, each small (``fd_eval.metrics.build`` and ``fd_eval.metrics.copies`` are the worked examples)::

    plan = plan_units(source, checkpoint_every=...)                 # Unit(index, indices, label, fingerprint)
    files = UnitFiles(folder, fmt="my-format/1", meta_key="my_key", identity={...})   # the checkpoint folder
    done = files.scan(plan, skip_bad=run.skip_bad)                   # {k: header} of valid finished units
    done, mine = share_units(plan.units, set(done), run)             # this rank's units (balanced under a group)
    error = scan_units(source, extractors, mine, run, fresh=..., on_unit=...)   # save each unit as it ends
    carry_error(run, error)                                          # every rank raises the first rank's error
    files.cleanup()                                                  # after the result is written

States go to and from unit files through :func:`encode_states` / :func:`decode_states` (tensor states as
``{prefix}.{name}`` tensors, scalars in the header), so a new consumer needs no checkpoint code of its own.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..errors import CheckpointError, FDEvalError
from ..extractors import Extractor
from ..sources import DirectorySource, ImageSource, SkippedItem, SubsetSource, TarSource
from ..sources.base import stat_part
from ..util.io_utils import atomic_path
from .options import ResolvedRun

__all__ = ["DEFAULT_BLOCK", "Unit", "UnitPlan", "plan_units", "UnitFiles", "save_unit_file", "share_units",
           "scan_units", "carry_error", "encode_states", "decode_states", "wait_for_units"]

DEFAULT_BLOCK = 10_000  # images per unit for sources that are not tar shards
_FINGERPRINT_SALT = "fd-eval-build-unit/1"  # part of every unit fingerprint: changing it invalidates checkpoints
_POLL_S = 1.0


# --- the plan -----------------------------------------------------------------------------------------------------
class Unit:
    """One checkpointed piece of the work.

    Attributes:
        index: position in the plan (merge order).
        indices: int64 (n,) ascending indices into the plan's ``source``; for a streamed plan a
            :class:`fd_eval.run.streamed.ShardItems` (whole remote shards, resolved when the unit runs).
        label: how messages name it (a shard path, or a range of items).
        fingerprint: hex sha256 of the unit's data (a tar unit: the shard's size, modification time and member
            headers plus the unit's positions in it; a folder: each file's path, size and modification time; any
            other source: the whole source's fingerprint plus the unit's indices). A streamed unit's is computed
            when first asked for (after the unit ran, or to check a finished unit's file: then its shard's index is
            read if it is not known).
    """

    __slots__ = ("index", "indices", "label", "_fingerprint")

    def __init__(self, index: int, indices: Any, label: str, fingerprint: "str | Callable[[], str]"):
        self.index, self.indices, self.label, self._fingerprint = index, indices, label, fingerprint

    @property
    def fingerprint(self) -> str:
        if callable(self._fingerprint):
            self._fingerprint = self._fingerprint()
        return self._fingerprint

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        return f"Unit(index={self.index}, label={self.label!r})"


@dataclass
class UnitPlan:
    """The units of a pass. ``selection`` is ``source`` or its ``num``/``seed`` subset (what the result covers)."""

    source: ImageSource
    selection: ImageSource
    units: list[Unit]
    kind: str  # "tar-shards" | "row-groups" | "blocks"
    checkpoint_every: int | None
    streamed: bool = False  # one unit per remote shard, empty ones included, resolved as they run

    @property
    def n_items(self) -> int:
        return sum(len(u) for u in self.units)

    def describe(self) -> str:
        what = {"tar-shards": "tar shard", "row-groups": "row group"}.get(self.kind, "block")
        every = f" of at most {self.checkpoint_every:,} images" if self.checkpoint_every else ""
        return f"{len(self.units)} units ({what}s{every}) over {self.n_items:,} images"


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256(_FINGERPRINT_SALT.encode())
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def _blocks(idx: np.ndarray, every: int | None) -> list[np.ndarray]:
    if not every or len(idx) <= every:
        return [idx]
    return [idx[s:s + every] for s in range(0, len(idx), every)]


def plan_units(source: ImageSource, checkpoint_every: int | None = None, num: int | None = None,
               seed: int | None = None, *, streamed: bool = False) -> UnitPlan:
    """Split ``source`` (or its ``num``/``seed`` subset, as :meth:`ImageSource.subset` picks it) into units.

    Tar shards (and other sharded sources: Parquet row groups): one unit per shard (empty shards have none), cut
    into blocks of at most ``checkpoint_every``
    images when given. Other sources: blocks of ``checkpoint_every`` (default :data:`DEFAULT_BLOCK`) images.

    ``streamed`` (remote tar shards, whole shards only: no ``checkpoint_every``, ``num``): one unit per shard, empty
    shards included, holding :class:`fd_eval.run.streamed.ShardItems`, so a pass reads a shard whose member index is
    not cached once (:mod:`fd_eval.run.streamed`) instead of indexing every shard first. Otherwise pending remote
    shards are indexed here (one read each, then the pass reads them again).
    """
    if streamed and checkpoint_every is None and num is None and callable(getattr(source, "register", None)):
        return _streamed_plan(source)
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
    return UnitPlan(source, selection, units, kind, every)


def _streamed_plan(source: Any) -> UnitPlan:
    from .streamed import ShardItems

    def fingerprint(s: int) -> Callable[[], str]:
        return lambda: _sha(b"tar", source.shard_part(s), np.arange(source.shard_count(s), dtype=np.int64).tobytes())

    units = [Unit(s, ShardItems(source, [s]), path, fingerprint(s)) for s, path in enumerate(source.shards)]
    return UnitPlan(source, source, units, "tar-shards", None, streamed=True)


# --- unit files ---------------------------------------------------------------------------------------------------
def save_unit_file(path: Path, header: dict[str, Any], tensors: dict[str, torch.Tensor],
                   meta_key: str = "fd_eval_unit") -> None:
    """Write one checkpoint unit atomically (temp file in the same folder, fsync, rename); ``header`` as JSON in
    the safetensors metadata under ``meta_key``."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={meta_key: json.dumps(header, sort_keys=True)})
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def key_diffs(old: Any, new: Mapping[str, Any], names: Mapping[str, str] | None = None) -> list[str]:
    """The identity keys that differ, named by ``names`` (default: the keys): ``["a, b differ"]`` or []."""
    if not isinstance(old, dict):
        return ["no readable settings recorded"]
    diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return [f"{', '.join((names or {}).get(k, k) for k in diffs)} differ"] if diffs else []


@dataclass
class UnitFiles:
    """A checkpoint folder of unit files ``{prefix}{k:06d}.safetensors`` (one per finished unit).

    Every header holds ``format`` and the run's ``identity`` (JSON-normalised: what every unit must share);
    ``diffs(old identity, new identity)`` says what differs, for the refusal message. ``what`` names the files in
    messages. ``extra_names``: other files of this pass in the folder (removed by :meth:`cleanup`).
    ``save_file(path, header, tensors)``: the writer (default :func:`save_unit_file` with ``meta_key``), for a
    command that keeps its own hookable name for it.
    """

    folder: Path
    fmt: str
    identity: dict[str, Any]
    meta_key: str = "fd_eval_unit"
    prefix: str = "unit-"
    what: str = "an fd-eval unit file"
    diffs: Callable[[Any, dict[str, Any]], list[str]] = key_diffs
    extra_names: tuple[str, ...] = ()
    save_file: Callable[[Path, dict[str, Any], dict[str, torch.Tensor]], None] | None = None  # default: ours

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        self.identity = json.loads(json.dumps(self.identity))
        self._re = re.compile(rf"^{re.escape(self.prefix)}(\d{{6,}})\.safetensors$")

    def path(self, k: int) -> Path:
        return self.folder / f"{self.prefix}{k:06d}.safetensors"

    def save(self, unit: Unit, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        """Save unit ``unit``'s file: ``header`` plus ``format``, ``identity`` and the unit's index/label/
        fingerprint (``header["unit"]`` extends them)."""
        info = {"index": unit.index, "label": unit.label, "fingerprint": unit.fingerprint, **header.get("unit", {})}
        header = {**header, "format": self.fmt, "identity": self.identity, "unit": info}
        if self.save_file is not None:
            self.save_file(self.path(unit.index), header, tensors)
        else:
            save_unit_file(self.path(unit.index), header, tensors, self.meta_key)

    def read_header(self, path: Path) -> dict[str, Any]:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {})[self.meta_key])
            if not isinstance(header, dict):
                raise TypeError("not an object")
            return header
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: damaged or not {self.what} ({type(e).__name__}: {e}); delete it to "
                                  "recompute that unit") from None

    def read(self, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(header, tensors) of a unit file; CheckpointError when it is damaged."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        header = self.read_header(path)
        try:
            return header, load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: damaged unit file ({type(e).__name__}: {e}); delete it to recompute "
                                  "that unit") from None

    def check_identity(self, path: Path, header: dict[str, Any]) -> None:
        """Refuse a file of another format or made with other settings (the message names what differs)."""
        if header.get("format") != self.fmt:
            raise CheckpointError(f"{path}: cannot resume: written in checkpoint format {header.get('format')!r}, "
                                  f"this fd-eval writes {self.fmt!r}; delete {self.folder} to start over")
        diffs = self.diffs(header.get("identity"), self.identity)
        if diffs:
            raise CheckpointError(f"{self.folder}: cannot resume: the checkpoint was made with other settings "
                                  f"({'; '.join(diffs)}); rerun with the original settings, or delete {self.folder} "
                                  "to start over")

    def check(self, path: Path, header: dict[str, Any], units: Sequence[Unit], *, skip_bad: bool) -> Unit:
        """Refuse a unit file that does not belong to this pass; return the unit it holds."""
        self.check_identity(path, header)
        info = header.get("unit") or {}
        m = self._re.match(path.name)
        k = int(m.group(1)) if m else -1
        if info.get("index") != k or not 0 <= k < len(units):
            raise CheckpointError(f"{path}: damaged: it holds unit {info.get('index')!r} of {len(units)}; delete "
                                  "it to recompute that unit")
        unit = units[k]
        if info.get("fingerprint") != unit.fingerprint or info.get("n_items", len(unit)) != len(unit):
            raise CheckpointError(
                f"{path}: cannot resume: the data of unit {k} ({unit.label}) changed since it was computed (files, "
                f"sizes, modification times or tar members differ); restore the original data, or delete {path} to "
                f"recompute that unit (or {self.folder} to start over)")
        if header.get("skipped") and not skip_bad:
            raise CheckpointError(
                f"{path}: unit {k} ({unit.label}) skipped {len(header['skipped'])} unreadable image(s) under "
                f"--skip-bad; pass --skip-bad (skip_bad=True) again, or delete {path} to recompute that unit strictly")
        return unit

    def scan(self, units: Sequence[Unit], *, skip_bad: bool,
             check: Callable[[Path, dict[str, Any], Unit], None] | None = None) -> dict[int, dict[str, Any]]:
        """Headers of the finished (and valid) units already in the folder, by unit index; ``check(path, header,
        unit)``: the caller's own refusals (e.g. a unit without the feature rows this run keeps)."""
        done: dict[int, dict[str, Any]] = {}
        if not self.folder.is_dir():
            return done
        for p in sorted(self.folder.iterdir()):
            if self._re.match(p.name):
                header = self.read_header(p)
                unit = self.check(p, header, units, skip_bad=skip_bad)
                if check is not None:
                    check(p, header, unit)
                done[unit.index] = header
        return done

    def owns(self, name: str) -> bool:
        """A file of this pass: a unit file, one of ``extra_names``, or a temp file of their atomic writes."""
        if self._re.match(name) or name in self.extra_names:
            return True
        if name.startswith(".") and name.endswith(".tmp"):  # io_utils.atomic_path: .{name}.{random}.tmp
            inner = name[1:].split(".safetensors")[0] + ".safetensors" if ".safetensors" in name else ""
            return bool(self._re.match(inner)) or any(name[1:].startswith(x + ".") for x in self.extra_names)
        return False

    def cleanup(self) -> None:
        """Remove this pass's files from the folder, then the folder if nothing else is left in it."""
        with contextlib.suppress(OSError):
            for p in self.folder.iterdir():
                if self.owns(p.name):
                    with contextlib.suppress(OSError):
                        p.unlink()
            self.folder.rmdir()


# --- consumer states in unit files ----------------------------------------------------------------------------------
def encode_states(parts: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``{prefix: consumer}`` -> (tensors ``{prefix}.{name}``, scalars ``{prefix: {name: value}}``) of their
    declared states (:meth:`fd_eval.core.consumers.Consumer.state_dict`)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for prefix, c in parts.items():
        for name, v in c.state_dict().items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}.{name}"] = v
            else:
                scalars.setdefault(prefix, {})[name] = v
    return tensors, scalars


def decode_states(parts: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                  scalars: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Inverse of :func:`encode_states`: load each ``{prefix: consumer}``'s state (``ValueError`` when the names,
    dtypes or shapes are not the consumer's)."""
    for prefix, c in parts.items():
        state = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        state.update((scalars or {}).get(prefix, {}))
        c.load_state_dict(state)


# --- ranks ----------------------------------------------------------------------------------------------------------
def _agree_done(done: set[int], n_units: int, run: ResolvedRun) -> set[int]:
    """Collective: rank 0's view of the finished units, on every rank (a uint8 mask; nothing pickled)."""
    import torch.distributed as dist

    comm = run.device if dist.get_backend() == "nccl" else torch.device("cpu")
    mask = torch.zeros(n_units, dtype=torch.uint8, device=comm)
    if run.rank == 0 and done:
        mask[torch.tensor(sorted(done), dtype=torch.int64, device=comm)] = 1
    dist.broadcast(mask, src=0)
    return set(torch.nonzero(mask).flatten().cpu().tolist())


def share_units(units: Sequence[Unit], done: set[int], run: ResolvedRun) -> tuple[set[int], list[Unit]]:
    """(the finished units every rank agrees on, this rank's units to compute).

    With a process group the ranks agree on rank 0's view and take every W-th unit left (balanced: a resume whose
    remaining units all belong to one rank's r::W share would otherwise keep the others waiting for it). Without
    one (ranks sharing only a folder), a fixed share r, r + W, ... minus the finished units: no communication.
    """
    r, w = run.rank, run.world_size
    if run.group and w > 1:
        done = _agree_done(done, len(units), run)
        return done, [u for u in units if u.index not in done][r::w]
    return set(done), [u for u in units[r::w] if u.index not in done]


def carry_error(run: ResolvedRun, error: BaseException | None) -> None:
    """After a rank's share: with a process group, a collective where every rank raises the first failing rank's
    error (none waits for a dead rank until a timeout); alone, raise ``error`` if there is one."""
    if run.group and run.world_size > 1:
        from .distributed import raise_first_error

        raise_first_error(error)
    elif error is not None:
        raise error


def wait_for_units(files: UnitFiles, units: Sequence[Unit], timeout: float | None, log: Callable[[str], None],
                   after_barrier: bool) -> None:
    """Rank 0 of ranks sharing a folder: wait until every unit file exists (written by the other ranks)."""
    t0 = last_note = time.monotonic()
    while True:
        missing = [u.index for u in units if not files.path(u.index).exists()]
        if not missing:
            return
        waited = time.monotonic() - t0
        if timeout is not None and waited > timeout:
            why = ("every rank has finished, so " + str(files.folder) + " is probably not on a filesystem all ranks "
                   "share" if after_barrier else "a rank may have died; run the same command again to resume")
            raise CheckpointError(f"{files.folder}: units {missing[:5]}{' ...' if len(missing) > 5 else ''} missing "
                                  f"after waiting {waited:.0f} s ({why})")
        if time.monotonic() - last_note > 300:
            log(f"rank 0: waiting for {len(missing)} unit(s) from the other ranks (e.g. unit {missing[0]})")
            last_note = time.monotonic()
        time.sleep(_POLL_S)


# --- the scan -------------------------------------------------------------------------------------------------------
def scan_units(source: ImageSource, extractors: Sequence[Extractor], units: Sequence[Unit], run: ResolvedRun, *,
               fresh: Callable[[Unit], Sequence[Any]], on_unit: Callable[[Unit, Any], None],
               image_transform: Any = None, bar: Any = None, n_planned: int | None = None) -> FDEvalError | None:
    """Run ``units`` (this rank's share) through the extraction loop in one pass: ``fresh(unit)`` gives the unit's
    consumers when it starts (per extractor: a list, or one consumer), ``on_unit(unit, done)`` gets its
    :class:`fd_eval.run.pipeline.UnitDone` as soon as its last image is in (save it there).

    Returns the :class:`FDEvalError` of a failed unit instead of raising it when the ranks share a process group
    (pass it to :func:`carry_error` after the share, so every rank raises it); raises it otherwise.
    """
    from .pipeline import run_units

    if not units:
        return None
    try:
        run_units(source, extractors, [u.indices for u in units], lambda k: fresh(units[k]), run,
                  image_transform=image_transform, bar=bar, n_planned=n_planned,
                  on_unit=lambda d: on_unit(units[d.k], d))
    except FDEvalError as e:
        if not (run.group and run.world_size > 1):
            raise
        return e  # the other ranks are about to wait for this one: tell them instead
    return None


def skipped_items(header: Mapping[str, Any]) -> list[SkippedItem]:
    """The skipped items a unit file's header lists."""
    return [SkippedItem(**s) for s in header.get("skipped", [])]
