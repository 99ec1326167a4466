"""The batch plans of a pass, and streamed passes over remote tar shards whose member index is not known yet: one
read per shard.

A tar shard has no table of contents: its item count is known only once it has been read. A pass of the unit engine
over such *pending* shards (:attr:`fd_eval.sources.remote.RemoteTarSource.pending`) therefore does not plan item
indices up front. Its units hold :class:`ShardItems` (whole shards, resolved to item indices when they run), and
:func:`fd_eval.run.pipeline.run_units` feeds its DataLoader from :class:`StreamedBatches`, which, in shard order:

1. asks a :class:`ShardSpooler` for the shard: a background thread streams it once into a local spool file
   (``$FD_EVAL_SPOOL_DIR`` or the temp folder) while building its member index from the stream (the sha256 on the
   way), and streams the next pending shard while this one is being extracted (read-ahead of one shard);
2. registers the index with the source (cached in the tar index cache; published in the spool folder for the
   DataLoader workers, forked before it was known), which gives the shard's items their indices;
3. yields the model batches exactly as a planned pass would (a unit's images from its first, in ``chunk`` items);
4. once the loop has every batch that holds a shard's last item, the shard's spool is deleted (:meth:`release`).

So each pending shard is transferred once, and the spool holds at most the shards of the DataLoader's prefetch
window plus the one read ahead (disk independent of the number of shards; memory: the readers' read-ahead).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import OutputError

__all__ = ["PlannedBatches", "ShardItems", "ShardSpooler", "StreamedBatches", "index_first_for_ranks", "is_streamed",
           "known_total", "source_size_hint"]


class ShardItems:
    """The item indices of whole shards ``shards`` (ascending) of a sharded remote ``source``, known once each
    shard's member index is: ``len()`` and ``np.asarray()`` read a pending shard's index if they must (a second
    read of it; a streamed pass resolves them from its one read instead)."""

    def __init__(self, source: Any, shards: Sequence[int]):
        self.source, self.shards = source, [int(s) for s in shards]

    def known_len(self) -> int | None:
        """The number of items, or None while a shard is pending."""
        idx = self.source._idx
        if any(idx[s] is None for s in self.shards):
            return None
        return sum(self.source.shard_count(s) for s in self.shards)

    def __len__(self) -> int:
        return sum(self.source.shard_count(s) for s in self.shards)

    def resolve(self) -> np.ndarray:
        """int64 item indices (every shard up to the last of these must be indexed: :meth:`resolve` reads the
        pending ones)."""
        src = self.source
        if src.n_placed <= self.shards[-1]:
            for s in range(src.n_placed, self.shards[-1] + 1):
                src.index_shard(s)
        starts = src._starts_l
        parts = [np.arange(starts[s], starts[s + 1], dtype=np.int64) for s in self.shards]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = self.resolve()
        return a if dtype is None else a.astype(dtype)

    def __repr__(self) -> str:
        return f"ShardItems(shards {self.shards[0]}..{self.shards[-1]})" if self.shards else "ShardItems()"


def index_first_for_ranks(source: Any, run: Any, say: Any) -> bool:
    """Whether ``source`` still has pending remote shards for a pass to index from its one read of each. Ranks
    (``run.world_size > 1``) split the work up front, so they need every shard's item count: the pending shards are
    indexed here first, with a note through ``say``. With a process group (the run's, or torchrun's joined for
    this, :func:`fd_eval.run.rank_index.rank_group`) each shard is read by one rank and the indexes are exchanged
    (:func:`fd_eval.run.rank_index.index_across_ranks`): with the pass's read, two transfers of each shard in all.
    Ranks with no process group each read every pending shard."""
    pending = getattr(source, "pending", None)
    rank, world = run.rank, run.world_size
    if pending is None or world == 1:
        return bool(pending)
    from .rank_index import index_across_ranks, rank_group

    with rank_group(run) as group:
        if group:  # every rank joins, even with nothing pending here (another node's cache may lack a shard)
            if pending:
                say(f"rank {rank} of {world}: indexing the {len(pending)} remote shard(s) not in the tar index cache "
                    f"first, each read by one of the {world} ranks and the indexes shared (the pass then reads each "
                    "shard once more: two transfers in all; a single process reads each once)")
            index_across_ranks(source, rank, world)
            return False
    if pending:
        say(f"rank {rank} of {world}: indexing the {len(pending)} remote shard(s) not in the tar index cache first "
            f"(ranks with no process group each read every shard, then the pass reads them again: {world + 1} "
            "transfers in all; under torchrun each is read by one rank, two transfers in all; a single process reads "
            "each once)")
        source.resolve()
    return False


def is_streamed(units: Sequence[Any]) -> bool:
    return any(isinstance(u, ShardItems) for u in units)


def known_total(units: Sequence[Any]) -> int | None:
    """Items of ``units`` (index arrays or :class:`ShardItems`), or None while one is pending (a progress total)."""
    total = 0
    for u in units:
        n = u.known_len() if isinstance(u, ShardItems) else len(u)
        if n is None:
            return None
        total += n
    return total


def source_size_hint(source: Any) -> int | None:
    """Images a pass over ``source`` will see, as far as known before it (for :meth:`Extractor.plan_run`): the
    items of its placed shards, plus its pending shards' bytes at 100 KB an image."""
    files = getattr(source, "files", None)
    pending = getattr(source, "pending", None)
    if files is None or pending is None:
        return None
    starts = getattr(source, "_starts_l", [0])
    return int(starts[-1]) + sum(files[s].size for s in pending) // 100_000


class ShardSpooler:
    """A background thread that streams pending shards, in order, into spool files while indexing them; at most
    one shard ahead of the one asked for (:meth:`get`)."""

    def __init__(self, source: Any, shards: Sequence[int], folder: str):
        self.source, self.shards, self.folder = source, list(shards), folder
        self._cond = threading.Condition()
        self._wanted = -1  # position in ``shards`` the pass waits for
        self._done: dict[int, tuple[dict[str, Any] | None, str | None, BaseException | None]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fd-eval-spool")
        self._thread.start()

    def path(self, s: int) -> str:
        return os.path.join(self.folder, f"{s:06d}.tar")

    def _run(self) -> None:
        from ..sources.remote import stream_index

        for j, s in enumerate(self.shards):
            with self._cond:
                while j > self._wanted + 1 and not self._stop.is_set():  # read ahead one shard, no more
                    self._cond.wait(0.5)
            if self._stop.is_set():
                return
            path, idx, err = self.path(s), None, None
            try:
                idx = stream_index(self.source.files[s], spool=path, cancel=self._stop,
                                   skip_bad=self.source.skip_bad)
            except BaseException as e:  # noqa: BLE001 - handed to the pass, which raises it
                err = e
            if err is not None or idx is None or idx["empty"]:
                _unlink(path)  # nothing to read from it (empty, unreadable, or failed)
                path = None
            with self._cond:
                self._done[j] = (idx, path, err)
                self._cond.notify_all()
            if err is not None:
                return

    def get(self, j: int) -> tuple[dict[str, Any], str | None]:
        """(index, spool file or None) of ``shards[j]``, waiting for it; raises the error that stopped it."""
        with self._cond:
            self._wanted = max(self._wanted, j)
            self._cond.notify_all()
            while j not in self._done:
                self._cond.wait(0.5)
            idx, path, err = self._done.pop(j)
        if err is not None:
            raise err
        assert idx is not None
        return idx, path

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=60)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@dataclass
class PlannedBatches:
    """The DataLoader items of units planned up front (lists of dataset positions, ``chunk`` at most, never across
    units), each item's unit (``owner``), each unit's last item (``last``), the units with no items (``empty``);
    what :class:`StreamedBatches` records as it goes."""

    batches: list[list[int]]
    owner: list[int]
    last: dict[int, int]
    empty: list[int] = field(default_factory=list)
    frees: list[list[int]] | None = None  # (nothing to release)

    @classmethod
    def of(cls, units: Sequence[np.ndarray], chunk: int) -> "PlannedBatches":
        batches: list[list[int]] = []  # DataLoader items (loader_chunk images); the runner joins them
        owner: list[int] = []  # the unit of each item
        off = 0
        for k, u in enumerate(units):
            for s in range(0, len(u), chunk):
                batches.append(list(range(off + s, off + min(s + chunk, len(u)))))
                owner.append(k)
            off += len(u)
        empty = [k for k, u in enumerate(units) if not len(u)]
        return cls(batches, owner, {k: i for i, k in enumerate(owner)}, empty)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class StreamedBatches:
    """The DataLoader's ``batch_sampler`` for units that hold :class:`ShardItems` (or index arrays into the whole
    ``source``): batches of source indices, unit after unit, resolved as they are reached. It records, batch by
    batch, the unit (``owner``), each unit's final batch (``last``), units with no items (``empty``, in order, for
    the loop to report) and the shards whose last item a batch holds (``frees``, released once it is in)."""

    source: Any
    units: Sequence[Any]
    chunk: int
    owner: list[int] = field(default_factory=list)
    last: dict[int, int] = field(default_factory=dict)
    empty: list[int] = field(default_factory=list)
    frees: list[list[int]] = field(default_factory=list)
    folder: str | None = None
    spooler: ShardSpooler | None = None

    def __post_init__(self) -> None:
        pending = set(getattr(self.source, "pending", []))
        self.streamed = [s for u in self.units if isinstance(u, ShardItems) for s in u.shards if s in pending]
        if self.streamed:
            base = os.environ.get("FD_EVAL_SPOOL_DIR") or None
            try:
                if base:
                    os.makedirs(base, exist_ok=True)
                self.folder = tempfile.mkdtemp(prefix="fd-eval-spool-", dir=base)
            except OSError as e:
                where = base or tempfile.gettempdir()
                err = OutputError(f"cannot make a spool folder for the remote shards in {where} ({e.strerror or e}); "
                                  "set FD_EVAL_SPOOL_DIR to a writable folder")
                err.errno = e.errno
                raise err from None
            self.source.spool_dir = self.folder  # before the DataLoader forks its workers

    def __iter__(self) -> Iterator[list[int]]:
        if self.streamed and self.spooler is None:  # started here: after the workers forked
            assert self.folder is not None
            self.spooler = ShardSpooler(self.source, self.streamed, self.folder)
        order = {s: j for j, s in enumerate(self.streamed)}
        for k, u in enumerate(self.units):
            # A batch is held back until the next one is cut (or the unit ends), so that the loop knows a unit's
            # final batch when it gets it (a later shard of the unit may hold no items).
            buf: list[np.ndarray] = []
            ends: list[tuple[int, int]] = []  # (shard, items of this unit up to its end)
            held: np.ndarray | None = None
            n_buf = n_unit = sent = 0
            for s, items in self._parts(u, order):
                buf.append(items)
                n_buf += len(items)
                n_unit += len(items)
                ends.append((s, n_unit))
                while n_buf >= self.chunk or (n_buf and s == -1):
                    batch, buf, n_buf = _cut(buf, min(self.chunk, n_buf))
                    if held is not None:
                        sent += len(held)
                        yield self._emit(k, held, ends, sent, final=False)
                    held = batch
            if n_buf:
                batch, buf, n_buf = _cut(buf, n_buf)
                if held is not None:
                    sent += len(held)
                    yield self._emit(k, held, ends, sent, final=False)
                held = batch
            if held is not None:
                yield self._emit(k, held, ends, sent + len(held), final=True)
            else:
                self.empty.append(k)
                for s, _ in ends:
                    if s >= 0:
                        self.source.release(s)

    def _parts(self, u: Any, order: dict[int, int]) -> Iterator[tuple[int, np.ndarray]]:
        if not isinstance(u, ShardItems):
            yield -1, np.asarray(u, dtype=np.int64)
            return
        for s in u.shards:
            if s in order and self.source._idx[s] is None:
                idx, path = self.spooler.get(order[s])  # type: ignore[union-attr]
                self.source.register(s, idx, path)
            yield s, ShardItems(self.source, [s]).resolve()

    def _emit(self, k: int, batch: np.ndarray, ends: list[tuple[int, int]], sent: int, final: bool) -> list[int]:
        done = [s for s, e in ends if e <= sent or final]
        ends[:] = [(s, e) for s, e in ends if not (e <= sent or final)]
        self.owner.append(k)
        self.frees.append([s for s in done if s >= 0])
        if final:
            self.last[k] = len(self.owner) - 1
        return batch.tolist()

    def close(self) -> None:
        """Stop the spooler and delete the spool folder (after the pass, or an error)."""
        if self.spooler is not None:
            self.spooler.close()
        if self.folder is not None:
            self.source.spool_dir = None
            for s in list(getattr(self.source, "_spool", {})):
                self.source.release(s)
            shutil.rmtree(self.folder, ignore_errors=True)


def _cut(buf: list[np.ndarray], m: int) -> tuple[np.ndarray, list[np.ndarray], int]:
    """The first ``m`` items of ``buf`` (and what is left, and its length)."""
    allv = np.concatenate(buf) if len(buf) > 1 else buf[0]
    rest = allv[m:]
    return allv[:m], ([rest] if len(rest) else []), len(rest)
