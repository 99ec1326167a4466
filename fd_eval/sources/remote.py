"""Remote sources: tar shards streamed from the Hub, http(s) or any fsspec filesystem (and remote Parquet files).

How a streamed shard becomes an indexable source (the DataLoader asks for items by index):

1. Opening stats every shard (one HEAD request each: size, ETag, the Hub's commit) and takes its member index
   (names, offsets, sizes; what :func:`fd_eval.sources.discovery.scan_tar` gives for a local shard) from the tar
   index cache, keyed by URL, size, ETag and revision; nothing else is read. A shard not in the cache (or with no
   ETag or revision to key it by) is *pending*: a tar has no table of contents, so its item count is known only
   once it has been read.
2. A pass of the unit engine over whole shards in one process (``stats``/:func:`fd_eval.build_stats`,
   ``compute``/:func:`fd_eval.compute_stats` and ``index build``/``build_index`` without ``--num`` or
   ``--checkpoint-every``) reads each pending shard once: a background thread
   streams it into a local spool file (``$FD_EVAL_SPOOL_DIR``, else the temp folder) while building its index from
   the stream (headers as they pass; its sha256 on the way, checked against the Hub's LFS sha256), the index is
   cached, the shard's items get their indices, the decode workers read the members from the spool, and the spool
   is deleted once the shard's last item is in. The next pending shard is streamed meanwhile (read-ahead of one
   shard); the spool holds the shards of the DataLoader's prefetch window plus that one, whatever the number of
   shards (:mod:`fd_eval.run.streamed`).
3. A shard whose index is cached is read by member: one :class:`~fd_eval.sources.remote_io.StreamReader` per shard
   and process; the items of a shard are asked for in order (units are shards; the DataLoader hands each worker
   runs of consecutive items), so each worker's reads go forward through the shard on one connection, jumping
   ahead over the other workers' runs with a new ``Range`` request (after its first jump, closed ranges of about
   its run length, with no read-ahead: the bytes between its runs are not transferred); with no workers a shard is
   one sequential read. A sequential reader reads ahead (``$FD_EVAL_REMOTE_READAHEAD`` bytes, default 8 MiB) in a
   background thread, and the DataLoader's prefetch crosses into the next shard before the current one is done.

So every pass reads each shard once. Where the item count is needed before the pass (``len()``, ``--num``/
``--seed`` subsets, ``--checkpoint-every`` blocks, and the passes of ``ceiling --real`` and ``copies --train``), the
pending shards are indexed first (:meth:`RemoteTarSource.resolve`: one read each, four at a time) and the pass then
reads their members again: those first passes transfer every byte twice. ``torchrun`` ranks, which split the items
up front, index each pending shard once in all: rank ``r`` reads its share and the ranks exchange the indexes over
the process group (:mod:`fd_eval.run.rank_index`), then the pass reads the members: twice in all too, whatever the
number of ranks (ranks with no process group each read every shard first). A connection that drops is resumed at
the byte reached; one that keeps failing is one line naming the shard and the byte (or, with ``skip_bad``, the
shard is listed as unreadable, or its remaining items as skipped when it fails after its index was read).
"""
from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import OutputError, RemoteReadError, SourceError
from .base import TAR_INDEX_VERSION, ImageSource, SkippedItem, read_capped
from .decode import bad_image, one_line
from .discovery import load_cached_index, load_index, save_index, scan_tar_file, store_cached_index
from .registry import OpenOptions, SourceFormat, register_format
from .remote_io import RemoteFile, StreamReader, env_float, expand_remote, is_remote, stat_remote
from .tar import TarSource, parse_sidecar

READAHEAD = 8 << 20
INDEX_THREADS = 4  # shards indexed at once when opening (network-bound)


def check_online(spec: str, offline: bool | None) -> None:
    from ..util.download import offline_mode

    if offline or (offline is None and offline_mode()):
        raise SourceError(one_line(f"{spec}: a remote source, but offline mode is on (--offline, FD_EVAL_OFFLINE or "
                                   "HF_HUB_OFFLINE); copy the data to a local folder, or run without --offline"))


def stat_all(urls: Sequence[str]) -> list[RemoteFile]:
    with ThreadPoolExecutor(min(INDEX_THREADS, len(urls))) as pool:
        return list(pool.map(stat_remote, urls))


def shard_key(rf: RemoteFile) -> str:
    """The tar index cache key of a remote shard (URL, size, ETag, revision)."""
    return hashlib.sha256(f"{TAR_INDEX_VERSION}\0remote\0".encode() + rf.part()).hexdigest()


class _SpoolingReader(StreamReader):
    """A :class:`StreamReader` that also writes every byte it receives to ``fd`` at its own offset (the spool)."""

    def __init__(self, rf: RemoteFile, fd: int, **kw: Any):
        super().__init__(rf, **kw)
        self._fd = fd

    def _net_read(self, n: int) -> bytes:
        at = self.net  # (pwrite at the offset: a reconnect after a seek back rewrites the same bytes)
        b = super()._net_read(n)
        view, done = memoryview(b), 0
        try:
            while done < len(b):
                done += os.pwrite(self._fd, view[done:], at + done)
        except OSError as e:  # (not a network error: no retry)
            err = OutputError(one_line(f"cannot write the spool of {self.rf.url} ({e.strerror or e}); free disk space "
                                       "or set FD_EVAL_SPOOL_DIR to a folder with room for two shards"))
            err.errno = e.errno
            raise err from None
        return b


def stream_index(rf: RemoteFile, *, spool: str | None = None, cancel: threading.Event | None = None,
                 skip_bad: bool = False) -> dict[str, Any]:
    """One sequential read of shard ``rf``: its member index (headers as they pass, :func:`scan_tar_file`), with
    its sha256 (checked against the Hub's LFS sha256) in ``info``; with ``spool`` every byte is also written to that
    local file on the way (the pass then reads the members from it). ``skip_bad``: a connection that keeps failing
    gives an empty index marked ``unreadable`` instead of :class:`RemoteReadError`."""
    if rf.size == 0:
        return {"empty": True}
    fd = os.open(spool, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) if spool else -1
    try:
        # tarfile's jumps over member data read through (max_skip), so the hash (and the spool) cover every byte
        reader = (_SpoolingReader(rf, fd, readahead=READAHEAD, max_skip=rf.size, cancel=cancel) if spool
                  else StreamReader(rf, readahead=READAHEAD, max_skip=rf.size, cancel=cancel))
        with reader as r:
            idx = scan_tar_file(r, rf.size, rf.url)
            r.seek(r.net)
            while r.read(1 << 20):  # the rest (end blocks), so the hash covers the whole file
                pass
            sha = r.sha256()
    except RemoteReadError as e:
        if not skip_bad:
            raise
        return {"empty": True, "unreadable": f"{e.reason} at byte {e.offset:,}"}
    finally:
        if fd >= 0:
            os.close(fd)
    lfs = rf.etag.lower()
    if sha and rf.hf and len(lfs) == 64 and all(c in "0123456789abcdef" for c in lfs) and lfs != sha:
        raise SourceError(one_line(f"{rf.url}: the bytes read hash to sha256 {sha[:16]}..., the Hub says "
                                   f"{lfs[:16]}...; run again (a proxy or the network changed the data)"))
    idx["info"]["sha256"] = sha or ""
    return idx


class RemoteTarSource(TarSource):
    """Tar shards at URLs (``hf://``, ``http(s)://``, fsspec), streamed; otherwise exactly :class:`TarSource`
    (same member rule, order, sidecars, accounting). See the module docstring for how items are read.

    Opened with ``lazy=True``, shards whose member index is not cached stay *pending* (:attr:`pending`): whatever
    needs the item count (``len``, :attr:`shard_starts`, ``subset``, ...) indexes them first (:meth:`resolve`: one
    read each, then a second read for the data), while a streamed pass of the unit engine indexes each one from
    the single read that also spools it (:meth:`register`), and ranks register the indexes they exchanged.
    """

    kind = "remote-tar"

    def __init__(self, files: Sequence[RemoteFile], *, spec: str | None = None, lazy: bool = False, **kw: Any):
        self.files = list(files)
        urls = [f.url for f in self.files]
        ImageSource.__init__(self, spec or (urls[0] if len(urls) == 1 else f"{len(urls)} tar shards"), **kw)
        self.shards = urls
        self._sha: dict[str, str] = {}
        self._failed: dict[int, str] = {}
        self._failed_pid = os.getpid()
        self._shard_info: list[dict[str, Any]] = []  # of the placed shards (in order)
        self._idx: list[dict[str, Any] | None] = [self._cached(f) for f in self.files]  # None: pending
        self._starts_l = [0]  # item index of each placed shard's first item (a worker may know more: _refresh)
        self._starts_np: np.ndarray | None = None
        self._spool: dict[int, str] = {}  # shard -> local spool file (streamed by this pass)
        self.spool_dir: str | None = None  # where a streamed pass publishes its shards (read by DataLoader workers)
        self._place()
        if not lazy:
            self.resolve()

    # --- indexes ----------------------------------------------------------------------------------------------------
    def _cached(self, rf: RemoteFile) -> dict[str, Any] | None:
        if rf.size == 0:
            return {"empty": True}
        return load_cached_index(shard_key(rf)) if rf.validated else None  # (no validator: read every time)

    @property
    def pending(self) -> list[int]:
        """Shards whose member index is not known yet (not in the tar index cache, not read in this process)."""
        return [s for s, idx in enumerate(self._idx) if idx is None]

    @property
    def n_placed(self) -> int:
        """Shards whose items have their indices: every shard before the first pending one."""
        return len(self._shard_info)

    def _place(self) -> None:
        """Give items indices, shard after shard, up to the first pending one."""
        while self.n_placed < len(self.shards) and self._idx[self.n_placed] is not None:
            s = self.n_placed
            path, idx = self.shards[s], self._idx[s]
            assert idx is not None
            if idx.get("unreadable"):
                self.ignored.append(SkippedItem(None, one_line(path), "unreadable remote shard", idx["unreadable"]))
                idx = {"empty": True, "why": f"{path}: {idx['unreadable']}; listed as skipped (--skip-bad), no "
                                             "samples used"}
            elif "sha256" in idx.get("info", {}):
                self._sha[path] = idx["info"]["sha256"]
            n = self._take_index(path, idx)
            if len(self._starts_l) == s + 1:
                self._starts_l.append(self._starts_l[-1] + n)
            self._starts_np = None
        if self.n_placed == len(self.shards) and self._starts_l[-1] == 0:
            raise self._no_images()

    def _store(self, s: int, idx: dict[str, Any]) -> None:
        rf = self.files[s]
        if rf.validated and not idx["empty"]:
            store_cached_index(shard_key(rf), idx)
        self._idx[s] = idx

    def index_shard(self, s: int) -> dict[str, Any]:
        """Shard ``s``'s member index: known, or read now (one sequential read; then cached)."""
        idx = self._idx[s]
        if idx is None:
            self._store(s, stream_index(self.files[s], skip_bad=self.skip_bad))
            idx = self._idx[s]
            self._place()
        assert idx is not None
        return idx

    def resolve(self) -> None:
        """Index every pending shard now (a few at a time), so that every item has its index."""
        todo = self.pending
        if len(todo) > 1:
            cancel = threading.Event()
            pool = ThreadPoolExecutor(min(INDEX_THREADS, len(todo)))
            try:
                futures = [pool.submit(stream_index, self.files[s], cancel=cancel, skip_bad=self.skip_bad)
                           for s in todo]
                for s, fu in zip(todo, futures):
                    self._store(s, fu.result())
            except BaseException:  # an error or Ctrl-C: the other reads stop at their next chunk
                cancel.set()
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        for s in todo:
            self.index_shard(s)
        self._place()

    def register(self, s: int, idx: dict[str, Any], spool: str | None) -> None:
        """A streamed pass read shard ``s`` (index ``idx``; its bytes in the local file ``spool``): cache the index,
        give the items indices, and publish both for the DataLoader workers (``spool_dir``)."""
        self._store(s, idx)
        if spool:
            self._spool[s] = spool
        self._place()
        if self.spool_dir is not None:
            if spool:
                save_index(os.path.join(self.spool_dir, f"{s:06d}.npz"), idx, what="spooled shard index")
            np.save(os.path.join(self.spool_dir, ".starts.npy"), np.asarray(self._starts_l, np.int64))
            os.replace(os.path.join(self.spool_dir, ".starts.npy"), os.path.join(self.spool_dir, "starts.npy"))

    def release(self, s: int) -> None:
        """The pass is done with shard ``s``: delete its spool (later reads of it, if any, stream again)."""
        path = self._spool.pop(s, None)
        if path is not None:
            h = self._handles.pop(("spool", s), None) if self._handles_pid == os.getpid() else None
            if h is not None:
                os.close(h)
            for p in (path, path[:-len(".tar")] + ".npz"):
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass

    def shard_count(self, s: int) -> int:
        """Items in shard ``s`` (reads its index if pending)."""
        idx = self.index_shard(s)
        return 0 if idx["empty"] or idx.get("unreadable") else len(idx["img_off"])

    def _refresh(self, i: int) -> None:
        """A DataLoader worker (forked before the pass indexed later shards): learn the item indices the main
        process published since, and the spooled shards' indexes as they are needed."""
        if self.spool_dir is None:
            return
        try:
            starts = np.load(os.path.join(self.spool_dir, "starts.npy")).tolist()
        except (OSError, ValueError):
            return
        if len(starts) > len(self._starts_l):
            self._starts_l, self._starts_np = [int(x) for x in starts], None

    # --- items ------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        if self.n_placed < len(self.shards):
            self.resolve()
        return int(self._starts_l[-1])

    @property
    def shard_starts(self) -> np.ndarray:
        len(self)
        return self._starts_array()

    def _starts_array(self) -> np.ndarray:
        if self._starts_np is None or len(self._starts_np) != len(self._starts_l):
            self._starts_np = np.asarray(self._starts_l, dtype=np.int64)
        return self._starts_np

    def shard_of(self, indices: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.shard_starts, indices, side="right").astype(np.int64) - 1

    def _check_index(self, i: int) -> int:
        i = int(i)
        if 0 <= i < self._starts_l[-1]:
            return i
        if i >= 0:
            self._refresh(i)
            if i < self._starts_l[-1]:
                return i
        return super()._check_index(i)

    def _member(self, i: int) -> tuple[int, int, dict[str, Any]]:
        """(shard, position in it, its index) of item ``i`` (already checked)."""
        starts = self._starts_array()
        s = int(np.searchsorted(starts, i, side="right") - 1)
        idx = self._idx[s]
        if idx is None:  # a worker: a shard the main process spooled after this worker started
            assert self.spool_dir is not None
            idx = self._idx[s] = load_index(os.path.join(self.spool_dir, f"{s:06d}.npz"))
            self._spool[s] = os.path.join(self.spool_dir, f"{s:06d}.tar")
        return s, i - int(starts[s]), idx

    def _locate(self, i: int) -> tuple[int, str]:
        s, j, idx = self._member(i)
        ends = idx["name_ends"]
        a = int(ends[j - 1]) if j > 0 else 0
        return s, idx["names_blob"][a:int(ends[j])].tobytes().decode("utf-8", "surrogateescape")

    def _read(self, i: int) -> bytes:
        def item() -> str:
            return self.describe(i)

        s, j, idx = self._member(i)
        size = int(idx["img_size"][j])
        read_capped(item, size, self.max_item_bytes)
        return self._pread(s, int(idx["img_off"][j]), size, item)

    def _read_head(self, i: int, n: int) -> bytes | None:
        s, j, idx = self._member(i)
        size = int(idx["img_size"][j])
        if not n < size <= self.max_item_bytes:
            return None
        return self._pread(s, int(idx["img_off"][j]), n, lambda: self.describe(i))

    def meta(self, i: int) -> dict[str, Any] | None:
        i = self._check_index(i)
        s, j, idx = self._member(i)
        size = int(idx["json_size"][j])
        if size < 0:
            return None
        item = one_line(f"{self.shards[s]}:{self._locate(i)[1]}'s .json sidecar")
        read_capped(item, size, self.max_item_bytes)
        return parse_sidecar(item, self._pread(s, int(idx["json_off"][j]), size, item))

    # --- reading ----------------------------------------------------------------------------------------------------
    def _pread(self, s: int, offset: int, size: int, item: "str | Callable[[], str]") -> bytes:
        if self._failed_pid != os.getpid():
            self._failed, self._failed_pid = {}, os.getpid()
        spool = self._spool.get(s)
        if spool is not None:  # streamed by this pass: read from the local spool
            try:
                fd = self._handle(("spool", s), lambda: os.open(spool, os.O_RDONLY), self._closer)
                data = os.pread(fd, size, offset)
                if len(data) == size:
                    return data
            except FileNotFoundError:  # released: read it from the network again
                self._spool.pop(s, None)
        if s in self._failed:  # one failure per shard and process: its other items are skipped at once
            raise bad_image(item, f"remote shard unreadable ({self._failed[s]})", "check the network and run again")
        try:
            r = self._handles.get(("stream", s)) if self._handles_pid == os.getpid() else None
            if r is None:  # first read of this shard in this process (the LRU keeps the previous shard's reader)
                readahead = int(env_float("FD_EVAL_REMOTE_READAHEAD", READAHEAD))
                r = self._handle(("stream", s), lambda: StreamReader(self.files[s], offset, readahead=readahead),
                                 self._closer, limit=2)
            r.seek(offset)
            data = r.read(size)
        except (RemoteReadError, SourceError) as e:
            self._failed[s] = getattr(e, "reason", None) and f"{e.reason} at byte {e.offset:,}" or str(e)
            raise bad_image(item, f"remote shard unreadable ({self._failed[s]})",
                            "check the network and run again") from None
        if len(data) < size:
            raise bad_image(item, f"member data truncated ({len(data)} of {size} bytes present)",
                            "the shard changed or ends early; run again")
        return data

    def shard_header_digest(self, s: int) -> str:
        idx = self.index_shard(s)
        return "" if idx["empty"] or idx.get("unreadable") else str(idx["info"]["header_digest"])

    def shard_part(self, s: int) -> bytes:
        rf = self.files[s]
        digest = self.shard_header_digest(s)  # (reads the shard if pending: the sha256 is known after)
        sha = "" if rf.validated else str((self._idx[s] or {}).get("info", {}).get("sha256", ""))
        return rf.part() + b"\0" + sha.encode() + b"\0" + digest.encode()

    def _fingerprint_parts(self, content: bool) -> Iterable[bytes]:
        for s in range(len(self.files)):
            yield self.shard_part(s)

    def provenance(self) -> list[dict[str, Any]]:
        """Per shard: URL, size, ETag, revision (the Hub commit), sha256 when read for the index."""
        return [{"url": f.url, "size": f.size, "etag": f.etag, "revision": f.revision,
                 "sha256": self._sha.get(f.url, "")} for f in self.files]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, shards={len(self.shards)})"


# --- the registered format ----------------------------------------------------------------------------------------
def open_remote(spec: str, o: OpenOptions) -> ImageSource:
    """A remote spec: tar shards, or Parquet files (a ``.parquet`` URL, a glob of them, or ``hf://datasets/ORG/NAME``
    for a Hub dataset's Parquet files)."""
    check_online(spec, o.offline)
    urls = expand_remote(spec)
    low = [u.lower().split("?", 1)[0] for u in urls]
    if all(u.endswith(".tar") for u in low):
        return RemoteTarSource(stat_all(urls), spec=spec if len(urls) > 1 else None, lazy=True, **o.common)
    if all(u.endswith(".parquet") for u in low):
        from .parquet import ParquetSource

        return ParquetSource(stat_all(urls), spec=spec, image_column=o.image_column, key_column=o.key_column,
                             **o.common)
    if len(urls) == 1 and spec.startswith("hf://datasets/") and spec.rstrip("/").count("/") <= 4:
        return open_remote(spec.rstrip("/") + "/**/*.parquet", o)  # a Hub dataset: its Parquet files
    raise SourceError(one_line(f"{spec}: a remote source must name .tar shards or .parquet files (got "
                               f"{len(urls)} URL(s), e.g. {urls[0]}); e.g. hf://datasets/ORG/NAME/shard_{{00000..00127}}"
                               ".tar"))


register_format(SourceFormat("remote", is_remote, open_remote, order=10,
                             describe="hf://, http(s):// or fsspec URLs of .tar shards or .parquet files"))
