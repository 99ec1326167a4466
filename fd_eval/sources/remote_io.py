"""Reading remote files as streams: ``hf://`` (the Hub's resolve URLs), ``http(s)://`` (the standard library) and
any installed fsspec protocol (``memory://``, ``s3://``, ...).

Nothing here downloads a whole file: :class:`StreamReader` reads a byte range sequentially from one request,
reconnects with a ``Range`` request from the byte it reached when a connection drops (bounded retries with
exponential backoff), reads ahead in a background thread (bounded), and raises :class:`RemoteReadError` naming the
file and the byte offset when it gives up. :class:`RemoteFile` is what a source keeps per file: the URL and its
fingerprint (size, ETag, revision), plain strings, so it pickles into DataLoader workers.

``hf://`` files are read through the Hub's ``resolve`` URLs with the token of ``hf auth login`` / ``HF_TOKEN``,
pinned to the commit the first request resolved (so a push during a run cannot mix revisions); an LFS redirect
is followed without the token, as ``huggingface_hub`` does. Listing (a glob in an ``hf://`` path) uses
``huggingface_hub.HfFileSystem``. fsspec's own HTTP filesystem needs aiohttp, which fd-eval does not depend on,
so ``http(s)://`` is read with ``urllib``.
"""
from __future__ import annotations

import glob as _glob
import hashlib
import http.client
import os
import queue
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

from .._version import __version__
from ..errors import RemoteReadError, SourceError
from .decode import one_line
from .discovery import expand_braces

URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
TIMEOUT = 60.0  # seconds without a byte before a connection counts as dropped
MAX_RETRIES = 5  # reconnects in a row (without 1 MiB of progress in between) before giving up
BACKOFF_S = 0.5  # first wait; doubled per retry, at most 8 s
PROGRESS_RESET = 1 << 20  # a reconnect after this much progress starts the retry count over
SEEK_SKIP = 1 << 20  # a forward jump up to this far reads through; farther, a new Range request
REWIND = 1 << 12  # bytes kept for small seeks back (tarfile looks back one 512-byte block at the end)
CHUNK = 1 << 18
DIRECT_TTL_S = 300.0  # how long a reader reuses the Hub's CDN location (signed URLs last longer)
RETRYABLE = (OSError, http.client.HTTPException, socket.timeout, ConnectionError)


def is_remote(spec: str) -> bool:
    """True for a URL with a scheme other than ``file://`` (``hf://``, ``http(s)://``, ``s3://``, ``memory://``...)."""
    m = URL_RE.match(spec)
    return bool(m) and m.group(1).lower() != "file"


def scheme(url: str) -> str:
    m = URL_RE.match(url)
    return m.group(1).lower() if m else ""


def env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, "") or default)
    except ValueError:
        return default


def read_error(url: str, offset: int, reason: str) -> RemoteReadError:
    return RemoteReadError(one_line(url), offset, one_line(reason))


# --- what a source keeps per file ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteFile:
    """One remote file and its fingerprint.

    Attributes:
        url: as given (after brace expansion), for messages.
        kind: ``"http"`` (``http(s)://`` and ``hf://``, read with urllib) or ``"fsspec"``.
        fetch_url: what is requested (``hf://``: the resolve URL pinned to ``revision``); fsspec: the URL.
        size: bytes. etag: the server's ETag (the Hub: the LFS sha256 or git blob id), "" when none.
        revision: the Hub commit, an fsspec modification time, or "".
        hf: send the Hub token (the ``hf://`` resolve URL only, never a redirect target).
    """

    url: str
    kind: str
    fetch_url: str
    size: int
    etag: str = ""
    revision: str = ""
    hf: bool = False

    @property
    def validated(self) -> bool:
        """Whether a change of content shows in the fingerprint without reading the file (ETag or revision)."""
        return bool(self.etag or self.revision)

    def part(self) -> bytes:
        """The fingerprint bytes: URL, size, ETag, revision."""
        return f"{self.url}\0{self.size}\0{self.etag}\0{self.revision}".encode("utf-8", "surrogateescape")


def hf_token() -> str | None:
    try:
        from huggingface_hub.utils import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - no token is a valid state (public repositories)
        return None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kw: Any) -> None:  # redirects are followed by hand (token handling)
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def _request(url: str, method: str, headers: dict[str, str], what: str, token: str | None) -> Any:
    """One request, redirects followed by hand (the token goes to the first host only). Returns
    ``(response, first_hop_headers)``; raises SourceError for HTTP errors, OSError for network failures."""
    first: Any = None
    hdrs = {"User-Agent": f"fd-eval/{__version__}", **headers}
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    origin = urlsplit(url)[:2]
    for _ in range(8):
        req = urllib.request.Request(url, headers=hdrs, method=method)
        try:
            resp = _OPENER.open(req, timeout=TIMEOUT)
        except urllib.error.HTTPError as e:
            if first is None:
                first = e.headers
            if e.code in (301, 302, 303, 307, 308) and e.headers.get("Location"):
                url = urljoin(url, e.headers["Location"])
                if urlsplit(url)[:2] != origin:
                    hdrs.pop("Authorization", None)
                continue
            if e.code == 416:
                return None, first
            raise _http_error(what, e) from None
        return resp, first if first is not None else resp.headers
    raise SourceError(f"{what}: too many redirects; check the URL")


def _http_error(what: str, e: urllib.error.HTTPError) -> Exception:
    code = e.code
    if code in (401, 403):
        err = SourceError(one_line(f"{what}: access refused (HTTP {code}); for a gated Hub dataset request access on "
                                   "its page and log in with `hf auth login` (or set HF_TOKEN)"))
    elif code == 404:
        err = SourceError(one_line(f"{what}: not found (HTTP 404); check the URL, the repository and the brace "
                                   "range"))
    elif code >= 500 or code == 429:
        return OSError(f"HTTP {code} {e.reason}")  # retryable
    else:
        err = SourceError(one_line(f"{what}: HTTP {code} {e.reason}; check the URL"))
    err.http_code = code  # type: ignore[attr-defined]
    return err


def _head(fetch: str, url: str, hf: bool) -> tuple[Any, int | None]:
    """The first hop's headers and the size. A server that refuses HEAD (405; a presigned URL, signed for GET
    only: 403) is asked for its first byte instead (``Range: bytes=0-0``, the size from ``Content-Range``)."""
    token = hf_token() if hf else None
    try:
        resp, first = _request(fetch, "HEAD", {}, url, token)
        ranged = False
    except SourceError as e:
        if hf or getattr(e, "http_code", None) not in (403, 405):
            raise
        resp, first = _request(fetch, "GET", {"Range": "bytes=0-0"}, url, None)
        ranged = True
    headers = resp.headers if resp is not None else first
    if resp is not None:
        resp.close()
    size = first.get("X-Linked-Size")
    if size is None and ranged:
        m = re.match(r"bytes \d+-\d+/(\d+)", headers.get("Content-Range", ""))
        size = m.group(1) if m else None
    if size is None and not ranged:
        size = headers.get("Content-Length")
    return first, None if size is None else int(size)


def _hf_url(url: str, revision: str | None = None) -> str:
    from ..util.download import DEFAULT_HF_ENDPOINT, HfLocation, hf_endpoint

    loc = HfLocation.parse(url)
    prefix = {"dataset": "datasets/", "space": "spaces/"}.get(loc.repo_type, "")
    rev = revision or loc.revision or "main"
    return (f"{hf_endpoint() or DEFAULT_HF_ENDPOINT}/{prefix}{loc.repo_id}/resolve/{quote(rev, safe='')}/"
            f"{quote(loc.filename)}")


def _fsspec(url: str) -> tuple[Any, str]:
    try:
        import fsspec

        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise SourceError(one_line(f"{url}: no filesystem for {scheme(url)}:// ({e}); install the fsspec package "
                                   "that provides it (e.g. s3fs, gcsfs), or use hf://, http(s):// or a local path"
                                   )) from None


def stat_remote(url: str) -> RemoteFile:
    """Size, ETag and revision of ``url`` (one HEAD request, or the fsspec ``info``); raises SourceError."""
    sch = scheme(url)
    if sch in ("http", "https", "hf"):
        hf = sch == "hf"
        fetch = _hf_url(url) if hf else url
        last: Exception | None = None
        for attempt in range(MAX_RETRIES + 1):
            try:
                first, size = _head(fetch, url, hf)
                break
            except OSError as e:  # refused, reset, timed out, 5xx: retried with backoff
                last = e
                if attempt < MAX_RETRIES:
                    time.sleep(min(env_float("FD_EVAL_REMOTE_BACKOFF", BACKOFF_S) * 2 ** attempt, 8.0))
        else:
            raise SourceError(one_line(f"{url}: cannot reach the server ({last}); check the network and the URL"))
        if size is None:
            raise SourceError(f"{url}: the server gives no size (Content-Length); a streamed source needs it")
        etag = (first.get("X-Linked-Etag") or first.get("ETag") or "").strip()
        etag = "" if etag.startswith("W/") else etag.strip('"')  # a weak ETag does not pin the bytes
        revision = first.get("X-Repo-Commit") or "" if hf else (first.get("Last-Modified") or "")
        if hf and revision:
            fetch = _hf_url(url, revision)
        return RemoteFile(url, "http", fetch, int(size), etag, revision, hf)
    fs, path = _fsspec(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise SourceError(f"{url}: no such file; check the URL and the brace range") from None
    except Exception as e:  # noqa: BLE001 - any filesystem's error becomes one line
        raise SourceError(one_line(f"{url}: cannot stat ({type(e).__name__}: {e}); check the URL and credentials"
                                   )) from None
    etag = next((str(info[k]) for k in ("ETag", "etag", "sha256", "md5", "checksum", "crc32c") if info.get(k)), "")
    rev = next((str(info[k]) for k in ("mtime", "LastModified", "last_modified", "updated", "created")
                if info.get(k)), "")
    return RemoteFile(url, "fsspec", url, int(info["size"]), etag.strip('"'), rev)


def expand_remote(spec: str) -> list[str]:
    """URLs named by a brace range and/or glob (globs: ``hf://`` through ``HfFileSystem``, other fsspec protocols
    through their filesystem; ``http(s)://`` takes brace ranges only), in expansion order, duplicates dropped."""
    out: list[str] = []
    for pat in expand_braces(spec):
        if not _glob.has_magic(pat.split("://", 1)[1]):
            out.append(pat)
            continue
        sch = scheme(pat)
        if sch in ("http", "https"):
            raise SourceError(f"{pat}: an http(s) URL cannot be listed; name the shards with a brace range "
                              "such as shard_{00000..00127}.tar")
        if sch == "hf":
            from huggingface_hub import HfFileSystem

            from ..util.download import hf_endpoint

            fs = HfFileSystem(token=hf_token(), endpoint=hf_endpoint())  # HF_ENDPOINT read now, not at import
            path = pat[len("hf://"):]
        else:
            fs, path = _fsspec(pat)
        try:
            hits = sorted(fs.glob(path))
        except Exception as e:  # noqa: BLE001 - any filesystem's error becomes one line
            raise SourceError(one_line(f"{pat}: cannot list ({type(e).__name__}: {e}); check the URL")) from None
        if not hits:
            raise SourceError(f"{pat}: matches no files; check the pattern (from {spec})")
        out += [f"{sch}://{h.split('://', 1)[-1]}" for h in hits]
    return list(dict.fromkeys(out))


# --- streaming ----------------------------------------------------------------------------------------------------
class _ReadAhead:
    """A background thread reading ``raw`` in chunks into a bounded queue (at most ``limit`` bytes ahead)."""

    def __init__(self, raw: Any, limit: int):
        self.raw, self.buf, self.off = raw, b"", 0  # the current chunk and how much of it was handed out
        self.q: queue.Queue = queue.Queue(maxsize=max(1, limit // CHUNK))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="fd-eval-readahead")
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                b = self.raw.read(CHUNK)
            except BaseException as e:  # noqa: BLE001 - handed to the reader, which retries or reports it
                b = e
            while not self.stop.is_set():
                try:
                    self.q.put(b, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not isinstance(b, bytes) or not b:
                return

    def read(self, n: int) -> bytes:
        if self.off >= len(self.buf):
            item = self.q.get()
            if isinstance(item, BaseException):
                raise item
            self.buf, self.off = item, 0
            if not item:
                self.q.put(b"")  # stay at EOF
                return b""
        out = self.buf[self.off:self.off + n]  # one copy of what is asked for, not of the rest of the chunk
        self.off += len(out)
        return out

    def close(self) -> None:
        self.stop.set()
        try:
            self.raw.close()
        except Exception:  # noqa: BLE001
            pass


class StreamReader:
    """A forward-reading binary file over a :class:`RemoteFile`, from byte ``start`` to the end.

    ``read(n)`` returns exactly ``n`` bytes unless the file ends. ``seek`` forward up to ``max_skip`` bytes
    (default :data:`SEEK_SKIP`) reads through, farther opens a new ``Range`` request; back within the last
    :data:`REWIND` bytes is served from memory, farther back opens a new request. A dropped connection
    reconnects at the byte reached (``Range``), at most :data:`MAX_RETRIES` times in a row
    (``$FD_EVAL_REMOTE_RETRIES``) with backoff, then :class:`RemoteReadError`. ``readahead`` bytes (0: none) are
    read ahead in a background thread. ``sha256()``: the hash of every byte read, when read contiguously from 0.
    """

    def __init__(self, rf: RemoteFile, start: int = 0, *, readahead: int = 0, max_skip: int = SEEK_SKIP,
                 cancel: threading.Event | None = None):
        self.rf, self.readahead, self.max_skip, self.cancel = rf, int(readahead), int(max_skip), cancel
        self.pos = self.net = int(start)  # logical position; position of the network stream
        self._raw: Any = None
        self._win = b""  # the last bytes read from the network, ending at self.net
        self._hash = hashlib.sha256() if start == 0 else None
        self._fails, self._fail_at = 0, -1
        self.retries = int(env_float("FD_EVAL_REMOTE_RETRIES", MAX_RETRIES))
        # One request asks for the rest of the file, until the reader jumps far: then it asks for windows of about
        # the run it read before the jump, without read-ahead (the bytes after a run belong to another reader,
        # e.g. another DataLoader worker, and are not transferred for nothing).
        self.window: int | None = None
        self._end, self._opened_at = self.rf.size, self.net
        self._direct: str | None = None  # hf://: the CDN location the resolve URL redirected to, reused a while
        self._direct_until = 0.0

    # --- file-like API ---------------------------------------------------------------------------------------
    def tell(self) -> int:
        return self.pos

    closed = False

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        pos = {0: pos, 1: self.pos + pos, 2: self.rf.size + pos}[whence]
        if self.net - len(self._win) <= pos <= self.net + self.max_skip:
            self.pos = pos
        else:  # far: a new request from there
            if self._raw is not None or self.net > self._opened_at:
                self.readahead = 0
                self.window = max(SEEK_SKIP, self.net - self._opened_at, self.window or 0)
            self._close()
            self.pos = self.net = pos
            self._win, self._hash = b"", None
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.rf.size if n is None or n < 0 else min(self.rf.size, self.pos + n)
        parts: list[bytes] = []
        if self.pos < self.net:  # served from the rewind window
            k = len(self._win) - (self.net - self.pos)
            take = self._win[k:k + (end - self.pos)]
            parts.append(take)
            self.pos += len(take)
        while self.net < self.pos:  # a short forward jump: read through
            if not self._net_read(min(CHUNK, self.pos - self.net)):
                break
        while self.pos < end:
            b = self._net_read(min(max(CHUNK, 1 << 16), end - self.pos))
            if not b:
                break
            parts.append(b)
            self.pos += len(b)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def sha256(self) -> str | None:
        """Hex sha256 of the whole file when it was read contiguously from byte 0 to its end, else None."""
        return self._hash.hexdigest() if self._hash is not None and self.net == self.rf.size else None

    def close(self) -> None:
        self._close()
        self._win = b""

    def __enter__(self) -> "StreamReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- the network side --------------------------------------------------------------------------------------
    def _close(self) -> None:
        if self._raw is not None:
            try:
                self._raw.close()
            except Exception:  # noqa: BLE001
                pass
            self._raw = None

    def _net_read(self, n: int) -> bytes:
        """Up to ``n`` bytes at ``self.net`` (b"" only at the end of the file), reconnecting on failure."""
        if self.net >= self.rf.size:
            return b""
        if self.cancel is not None and self.cancel.is_set():
            raise SourceError(f"{self.rf.url}: reading stopped (another shard failed, or Ctrl-C)")
        if self._raw is not None and self.net >= self._end:  # this window is done: the next one
            self._close()
        while True:
            try:
                if self._raw is None:
                    self._opened_at = self.net
                    self._raw = self._open(self.net)
                b = self._raw.read(min(n, self._end - self.net))
                if not b:
                    raise ConnectionError(f"connection closed early ({self.rf.size - self.net:,} bytes missing)")
                break
            except SourceError:
                self._close()
                raise
            except RETRYABLE as e:
                self._close()
                if self._fail_at < 0 or self.net - self._fail_at >= PROGRESS_RESET:
                    self._fails = 0
                self._fails += 1
                self._fail_at = self.net
                if self._fails > self.retries:
                    n = self.retries
                    raise read_error(self.rf.url, self.net, f"connection lost after {n} retr{'y' if n == 1 else 'ies'} "
                                     f"({type(e).__name__}: {e})") from None
                time.sleep(min(env_float("FD_EVAL_REMOTE_BACKOFF", BACKOFF_S) * 2 ** (self._fails - 1), 8.0))
        b = b[:self.rf.size - self.net]
        if self._hash is not None:
            self._hash.update(b)
        self.net += len(b)
        self._win = b[-REWIND:] if len(b) >= REWIND else (self._win + b)[-REWIND:]
        return b

    def _open(self, start: int) -> Any:
        rf = self.rf
        self._end = rf.size if self.window is None or rf.kind == "fsspec" else min(rf.size, start + self.window)
        if rf.kind == "fsspec":
            fs, path = _fsspec(rf.fetch_url)
            f = fs.open(path, "rb")
            f.seek(start)
            raw: Any = f
        else:
            last = "" if self._end >= rf.size else str(self._end - 1)
            rng = {"Range": f"bytes={start}-{last}"}
            direct = self._direct if self._direct and time.monotonic() < self._direct_until else None
            resp = None
            if direct:  # the Hub's CDN location from an earlier request of this reader: one request, not two
                try:
                    resp, first = _request(direct, "GET", rng, rf.url, None)
                except SourceError:  # expired signature or the like: resolve again
                    self._direct = None
            if resp is None:
                resp, first = _request(rf.fetch_url, "GET", rng, rf.url, hf_token() if rf.hf else None)
                direct = None
                if rf.hf and resp is not None and resp.geturl() != rf.fetch_url:
                    self._direct, self._direct_until = resp.geturl(), time.monotonic() + DIRECT_TTL_S
            if resp is None:  # 416: nothing left
                raise ConnectionError(f"the server has no bytes from {start} (HTTP 416): the file shrank")
            etag = (first.get("X-Linked-Etag") or first.get("ETag") or "").strip().strip('"')
            # (the CDN's own ETag is not the Hub's; the resolve URL is pinned to a commit anyway)
            if rf.etag and etag and etag != rf.etag and not etag.startswith("W/") and not direct:
                resp.close()
                raise SourceError(one_line(f"{rf.url}: changed during the run (ETag {rf.etag[:16]} -> {etag[:16]}); "
                                           "run again to read the new version"))
            if resp.status == 200 and start:  # the server ignored the Range: read up to the start
                _skip(resp, start)
            elif resp.status == 206:
                m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != start:
                    resp.close()
                    raise ConnectionError(f"the server answered a range request from {start} with "
                                          f"{resp.headers.get('Content-Range')!r}")
            raw = resp
        return _ReadAhead(raw, self.readahead) if self.readahead > 0 else raw


def _skip(resp: Any, n: int) -> None:
    while n > 0:
        b = resp.read(min(n, CHUNK))
        if not b:
            raise ConnectionError("connection closed early")
        n -= len(b)
