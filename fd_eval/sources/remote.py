"""Remote sources: tar shards streamed from the Hub, http(s) or any fsspec filesystem (and remote Parquet files).

How a streamed shard becomes an indexable source (the DataLoader asks for items by index):

1. Opening stats every shard (one HEAD request each: size, ETag, the Hub's commit) and takes its member index
   (names, offsets, sizes; what :func:`fd_eval.sources.discovery.scan_tar` gives for a local shard) from the tar
   index cache, keyed by URL, size, ETag and revision. A shard not in the cache is read once, sequentially, to
   build its index from the stream (headers as they pass; its sha256 on the way, checked against the Hub's LFS
   sha256), then cached; nothing but that index and hash is kept.
2. A pass reads member bytes through one :class:`~fd_eval.sources.remote_io.StreamReader` per shard and process:
   the items of a shard are asked for in order (units are shards; the DataLoader hands each worker runs of
   consecutive items), so each worker's reads go forward through the shard on one connection, jumping ahead over
   the other workers' runs with a new ``Range`` request (after its first jump, closed ranges of about its run
   length, with no read-ahead: the bytes between its runs are not transferred); with no workers a shard is one
   sequential read. A sequential reader reads ahead (``$FD_EVAL_REMOTE_READAHEAD`` bytes, default 8 MiB) in a
   background thread, and the DataLoader's prefetch crosses into the next shard before the current one is done.

So the first pass over an uncached shard set reads every byte twice (index, then data); later passes, and every
resume, read each member once. A connection that drops is resumed at the byte reached; one that keeps failing is
one line naming the shard and the byte (or, with ``skip_bad``, its remaining items are listed as skipped).
"""
from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Sequence

from ..errors import RemoteReadError, SourceError
from .base import TAR_INDEX_VERSION, ImageSource, SkippedItem
from .decode import bad_image, one_line
from .discovery import cached_index, scan_tar_file
from .registry import OpenOptions, SourceFormat, register_format
from .remote_io import RemoteFile, StreamReader, env_float, expand_remote, is_remote, stat_remote
from .tar import TarSource

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


class RemoteTarSource(TarSource):
    """Tar shards at URLs (``hf://``, ``http(s)://``, fsspec), streamed; otherwise exactly :class:`TarSource`
    (same member rule, order, sidecars, accounting). See the module docstring for how items are read."""

    kind = "remote-tar"

    def __init__(self, files: Sequence[RemoteFile], *, spec: str | None = None, **kw: Any):
        self.files = list(files)
        self._by_url = {f.url: f for f in self.files}
        self._sha: dict[str, str] = {}
        self._failed: dict[int, str] = {}
        self._failed_pid = os.getpid()
        self._prefetched: dict[str, dict[str, Any]] = {}
        skip_bad = bool(kw.get("skip_bad", False))
        self._cancel: threading.Event | None = threading.Event()
        if len(self.files) > 1:  # index the uncached shards a few at a time (each read is one stream)
            pool = ThreadPoolExecutor(min(INDEX_THREADS, len(self.files)))
            try:
                futures = [pool.submit(self._remote_index, f, skip_bad) for f in self.files]
                self._prefetched = {f.url: fu.result() for f, fu in zip(self.files, futures)}
            except BaseException:  # an error or Ctrl-C: the other reads stop at their next chunk
                self._cancel.set()
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        super().__init__([f.url for f in self.files], spec=spec, **kw)
        self._prefetched, self._cancel = {}, None  # (an Event does not pickle into DataLoader workers)

    # --- indexing -------------------------------------------------------------------------------------------------
    def _index(self, path: str) -> dict[str, Any]:
        idx = self._prefetched.get(path) or self._remote_index(self._by_url[path], self.skip_bad)
        if idx.get("unreadable"):
            self.ignored.append(SkippedItem(None, one_line(path), "unreadable remote shard", idx["unreadable"]))
            return {"empty": True, "why": f"{path}: {idx['unreadable']}; listed as skipped (--skip-bad), no "
                                          "samples used"}
        if "sha256" in idx.get("info", {}):
            self._sha[path] = idx["info"]["sha256"]
        return idx

    def _remote_index(self, rf: RemoteFile, skip_bad: bool) -> dict[str, Any]:
        if rf.size == 0:
            return {"empty": True}

        def scan() -> dict[str, Any]:
            # one sequential read: tarfile's jumps over member data read through, so the hash covers every byte
            with StreamReader(rf, readahead=READAHEAD, max_skip=rf.size, cancel=self._cancel) as r:
                idx = scan_tar_file(r, rf.size, rf.url)
                r.seek(r.net)
                while r.read(1 << 20):  # the rest (end blocks), so the hash covers the whole file
                    pass
                sha = r.sha256()
            lfs = rf.etag.lower()
            if sha and rf.hf and len(lfs) == 64 and all(c in "0123456789abcdef" for c in lfs) and lfs != sha:
                raise SourceError(one_line(f"{rf.url}: the bytes read hash to sha256 {sha[:16]}..., the Hub says "
                                           f"{lfs[:16]}...; run again (a proxy or the network changed the data)"))
            idx["info"]["sha256"] = sha or ""
            return idx

        try:
            if not rf.validated:  # nothing to tell a changed file by: index it afresh (its sha256 is the fingerprint)
                return scan()
            key = hashlib.sha256(f"{TAR_INDEX_VERSION}\0remote\0".encode() + rf.part()).hexdigest()
            return cached_index(key, scan)
        except RemoteReadError as e:
            if not skip_bad:
                raise
            return {"empty": True, "unreadable": f"{e.reason} at byte {e.offset:,}"}

    # --- reading ----------------------------------------------------------------------------------------------------
    def _pread(self, s: int, offset: int, size: int, item: "str | Callable[[], str]") -> bytes:
        if self._failed_pid != os.getpid():
            self._failed, self._failed_pid = {}, os.getpid()
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

    def shard_part(self, s: int) -> bytes:
        rf = self.files[s]
        extra = b"" if rf.validated else self._sha.get(rf.url, "").encode()
        return rf.part() + b"\0" + extra + b"\0" + self.shard_header_digest(s).encode()

    def _fingerprint_parts(self, content: bool) -> Iterable[bytes]:
        for s in range(len(self.files)):
            yield self.shard_part(s)

    def provenance(self) -> list[dict[str, Any]]:
        """Per shard: URL, size, ETag, revision (the Hub commit), sha256 when read for the index."""
        return [{"url": f.url, "size": f.size, "etag": f.etag, "revision": f.revision,
                 "sha256": self._sha.get(f.url, "")} for f in self.files]


# --- the registered format ----------------------------------------------------------------------------------------
def open_remote(spec: str, o: OpenOptions) -> ImageSource:
    """A remote spec: tar shards, or Parquet files (a ``.parquet`` URL, a glob of them, or ``hf://datasets/ORG/NAME``
    for a Hub dataset's Parquet files)."""
    check_online(spec, o.offline)
    urls = expand_remote(spec)
    low = [u.lower().split("?", 1)[0] for u in urls]
    if all(u.endswith(".tar") for u in low):
        return RemoteTarSource(stat_all(urls), spec=spec if len(urls) > 1 else None, **o.common)
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
