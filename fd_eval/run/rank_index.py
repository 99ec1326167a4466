"""The first pass of ranks over remote tar shards whose member index is not known yet: each shard indexed once in all.

Ranks split a pass's units up front, so they need every shard's item count before the pass. Rather than every rank
reading every pending shard (W reads of each, then the pass's read), :func:`index_across_ranks` has rank ``r`` index
its share of them (position ``k`` in the agreed list of pending shards with ``k % W == r``; one sequential read each,
:func:`fd_eval.sources.remote.stream_index`, sha256 checked), then the ranks exchange the indexes over the process
group, one round of at most one shard per rank at a time (memory: W indexes in flight), and every rank registers
every shard's index with its source (:meth:`fd_eval.sources.remote.RemoteTarSource.register`, as a cached index is
loaded; cached in the tar index cache on every node). All ranks then hold identical indexes and plan identical units;
the pass reads each shard once more: two transfers of each shard in all, whatever the number of ranks.

An index travels as bytes (no pickle): its shard number and length, then the index in the .npz form of the tar index
cache (:func:`fd_eval.sources.discovery.index_bytes`: arrays, ``info`` as JSON), in a uint8 tensor
(:func:`fd_eval.run.distributed.all_gather_bytes`: sizes first). An indexing failure on one rank
(:class:`~fd_eval.errors.RemoteReadError`, a shard that is not a tar, ...) ends the exchange on every rank at the
same round and every rank raises that one-line error (:func:`fd_eval.run.distributed.raise_first_error`); with
``skip_bad`` an unreadable shard's index says so and it is listed the same on every rank.
"""
from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator, Sequence

from ..sources.discovery import index_bytes, index_from_bytes

__all__ = ["decode_indexes", "encode_indexes", "index_across_ranks", "rank_group"]


def encode_indexes(items: Sequence[tuple[int, dict[str, Any]]]) -> bytes:
    """``[(shard, index)]`` -> bytes: per shard its number and its index's length (8 bytes each, little-endian),
    then the index as .npz bytes (:func:`fd_eval.sources.discovery.index_bytes`, uncompressed)."""
    out = []
    for s, idx in items:
        data = index_bytes(idx, compress=False)
        out += [int(s).to_bytes(8, "little"), len(data).to_bytes(8, "little"), data]
    return b"".join(out)


def decode_indexes(data: bytes) -> list[tuple[int, dict[str, Any]]]:
    """Inverse of :func:`encode_indexes`."""
    at, out = 0, []
    while at < len(data):
        s, n = int.from_bytes(data[at:at + 8], "little"), int.from_bytes(data[at + 8:at + 16], "little")
        out.append((s, index_from_bytes(data[at + 16:at + 16 + n])))
        at += 16 + n
    return out


def _agree_pending(source: Any) -> list[int]:
    """The shards pending on any rank, ascending (a node whose cache holds one still sends it: no read)."""
    from .distributed import all_gather_json

    return sorted({int(s) for part in all_gather_json(source.pending) for s in part})


def index_across_ranks(source: Any, rank: int, world: int, threads: int = 4) -> int:
    """Collective over the default process group: every pending shard of ``source`` indexed by one rank, exchanged,
    registered on every rank. Returns the number of shards this rank read. Raises on every rank the first failing
    rank's error (lowest rank of the first round that had one)."""
    from ..errors import FDEvalError
    from ..sources.decode import one_line
    from ..sources.remote import stream_index
    from .distributed import all_gather_bytes, raise_first_error

    todo = _agree_pending(source)
    mine = [s for k, s in enumerate(todo) if k % world == rank and source._idx[s] is None]
    cancel = threading.Event()
    pool = ThreadPoolExecutor(max(1, min(threads, len(mine))), thread_name_prefix="fd-eval-index")
    futures: dict[int, Future] = {s: pool.submit(stream_index, source.files[s], cancel=cancel,
                                                 skip_bad=source.skip_bad) for s in mine}
    error: BaseException | None = None
    try:
        for j in range(0, len(todo), world):
            payload = b""
            if error is None and j + rank < len(todo):
                s = todo[j + rank]
                try:
                    idx = futures.pop(s).result() if s in futures else source._idx[s]
                    payload = encode_indexes([(s, idx)])
                except Exception as e:  # noqa: BLE001 - every rank raises it (below), none waits for this one
                    error = e if isinstance(e, FDEvalError) else FDEvalError(one_line(f"{source.files[s].url}: {e}"))
                    cancel.set()
            parts = all_gather_bytes(b"E" if error is not None else b"I" + payload)
            if any(p[:1] == b"E" for p in parts):
                break
            for p in parts:
                for s, idx in decode_indexes(p[1:]) if len(p) > 1 else []:
                    source.register(s, idx, None)
    except BaseException:
        cancel.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    raise_first_error(error)
    return len(mine)


@contextlib.contextmanager
def rank_group(run: Any) -> Iterator[bool]:
    """Whether the ranks of ``run`` can exchange indexes over a process group: the run's own (``run.group``), else,
    under torchrun (``MASTER_ADDR``/``MASTER_PORT`` and a ``RANK``/``WORLD_SIZE`` that are the run's), one joined
    for the exchange and left after it (``stats`` ranks otherwise share only their checkpoint folder). False for
    ranks with no rendezvous (``rank=``/``world_size=`` given, or ``RANK``/``WORLD_SIZE`` alone)."""
    from .distributed import destroy, env_world, init_distributed, is_initialized

    if run.group:
        yield True
        return
    env = env_world()
    if (is_initialized() or env != (run.rank, run.world_size) or not os.environ.get("MASTER_ADDR")
            or not os.environ.get("MASTER_PORT")):
        yield False
        return
    created = init_distributed(run.device)
    try:
        yield created
    finally:
        if created:
            destroy()
