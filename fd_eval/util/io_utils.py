"""Atomic writes, checksums, cache locations, cross-process locks and what kind of file a path holds
(:func:`sniff_format`, shared by statistics and weights files).

Failure policy: an output that cannot be written (disk full, read-only folder, a file where a folder should be) is
one :class:`~fd_eval.errors.OutputError` line naming the path, and nothing partial is left behind. The cache is
optional where it only saves work (hash records, reference-statistics caches: :func:`optional_cache_dir` warns once
and returns None) and required where a file must live there (downloaded weights: :func:`cache_dir` raises
:class:`~fd_eval.errors.CacheError` naming the path and ``$FD_EVAL_CACHE``).
"""
from __future__ import annotations

import contextlib
import errno as _errno
import hashlib
import json
import os
import struct
import tempfile
import warnings
from pathlib import Path
from typing import IO, Iterator

import filelock

from ..errors import CacheError, FDEvalError, OutputError

_CHUNK = 1 << 20
CACHE_ENV = "FD_EVAL_CACHE"


def cache_root() -> Path:
    """``$FD_EVAL_CACHE``, default ``~/.cache/fd_eval`` (not created)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fd_eval")


def _cache_origin() -> str:
    """How the cache root was chosen, for error messages."""
    env = os.environ.get(CACHE_ENV)
    return f"{CACHE_ENV}={env}" if env else f"default cache, {CACHE_ENV} unset"


def cache_dir(*parts: str) -> Path:
    """``$FD_EVAL_CACHE`` (default ``~/.cache/fd_eval``) joined with ``parts``; created on demand.

    Raises:
        CacheError: the folder cannot be created or written (the cache root is a file, read-only, ...); the message
            names the folder and the variable.
    """
    path = cache_root().joinpath(*parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(_errno.EACCES, "not writable")
    except OSError as e:
        err = CacheError(f"cache folder {path} is unusable ({_os_reason(e)}; {_cache_origin()}); point "
                         f"{CACHE_ENV} at a writable folder")
        err.errno = e.errno
        raise err from e
    return path


_WARNED_CACHES: set[str] = set()


def optional_cache_dir(*parts: str) -> Path | None:
    """:func:`cache_dir` for caches that only save work (hash records, reference statistics, tar indexes).

    Returns None, after one warning per process and cache root, when the folder cannot be created or written;
    the caller then computes without the cache and the run finishes.
    """
    try:
        return cache_dir(*parts)
    except CacheError as e:
        warn_cache_unusable(str(e))
        return None


def warn_cache_unusable(detail: str) -> None:
    """One warning per process and cache root that the cache is skipped (``detail`` says why)."""
    root = str(cache_root())
    if root not in _WARNED_CACHES:
        _WARNED_CACHES.add(root)
        warnings.warn(f"fd-eval: continuing without the cache: {detail}", RuntimeWarning, stacklevel=3)


def _os_reason(e: OSError) -> str:
    """``"ENOSPC: No space left on device"`` style, one line."""
    name = _errno.errorcode.get(e.errno or 0)
    text = e.strerror or str(e) or type(e).__name__
    return f"{name}: {text}" if name else text


def config_dir() -> Path:
    """``$FD_EVAL_CONFIG`` (default ``$XDG_CONFIG_HOME/fd_eval`` or ``~/.config/fd_eval``)."""
    env = os.environ.get("FD_EVAL_CONFIG")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "fd_eval"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", what: str = "output") -> Iterator[IO]:
    """Write ``path`` through a temp file in the same directory, fsync, then rename over it.

    A crash, Ctrl-C or exception leaves the old file (or nothing) in place, never half a file; an OS error (disk
    full, read-only folder) becomes one :class:`OutputError` line naming ``path`` (``what`` words it).
    """
    with atomic_path(path, what=what) as tmp:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, what: str = "output") -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed to ``path``, else removed.

    For writers that insist on a file name (safetensors, np.savez). Any :class:`OSError` (from the writer too)
    becomes an :class:`OutputError` (still an OSError, with the original ``errno``) naming ``path``.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file a normal file's mode
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        os_error = e if isinstance(e, OSError) else _serialiser_os_error(e)
        if os_error is not None and not isinstance(e, FDEvalError):
            err = OutputError(f"cannot write {what} {path} ({_os_reason(os_error)}); nothing was written. Free "
                              "space or choose a writable location")
            err.errno = os_error.errno
            raise err from e
        raise


# What serialisers that do their own I/O (safetensors' Rust writer raises SafetensorError, not OSError) say for the
# OS errors a write meets; mapped back to the errno so the message and ``OutputError.errno`` are the usual ones.
_IO_MESSAGES = {"no space left on device": _errno.ENOSPC, "read-only file system": _errno.EROFS,
                "permission denied": _errno.EACCES, "disk quota exceeded": _errno.EDQUOT,
                "file too large": _errno.EFBIG, "input/output error": _errno.EIO}


def _serialiser_os_error(e: BaseException) -> OSError | None:
    """The OSError a serialiser's own exception stands for (safetensors' SafetensorError with "No space left on
    device"), or None when it is not an I/O failure."""
    if type(e).__name__ != "SafetensorError":
        return None
    text = str(e).lower()
    code = next((c for m, c in _IO_MESSAGES.items() if m in text), _errno.EIO)
    return OSError(code, os.strerror(code))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_lock(path: str | os.PathLike, timeout: float = -1) -> filelock.FileLock:
    """A cross-process lock guarding ``path`` (lock file ``path + '.lock'``)."""
    return filelock.FileLock(str(path) + ".lock", timeout=timeout)


def sha256_file_cached(path: str | os.PathLike) -> str:
    """:func:`sha256_file`, remembered per (absolute path, size, mtime, inode) so big weights are hashed once.

    The digest is kept in memory and in a small JSON record under ``cache_dir("sha256")``; a changed size,
    mtime or inode (a file replaced by rename) means the file is hashed again. A cache that cannot be written
    only costs the re-hash.
    """
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key in _SHA256_MEMO:
        return _SHA256_MEMO[key]
    folder = optional_cache_dir("sha256")
    record = None if folder is None else folder / (hashlib.sha1(str(path).encode()).hexdigest() + ".json")
    if record is not None:
        try:
            rec = json.loads(record.read_text())
            if (rec["path"], rec["size"], rec["mtime_ns"], rec["inode"]) == key and len(rec["sha256"]) == 64:
                _SHA256_MEMO[key] = rec["sha256"]
                return rec["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    digest = sha256_file(path)
    _SHA256_MEMO[key] = digest
    if record is not None:
        try:
            with atomic_write(record, "w", what="cache record") as f:
                json.dump({"path": key[0], "size": key[1], "mtime_ns": key[2], "inode": key[3], "sha256": digest}, f)
        except OutputError as e:  # disk full: the next run hashes again
            warn_cache_unusable(str(e))
    return digest


_SHA256_MEMO: dict[tuple[str, int, int, int], str] = {}


# --- what a file is (statistics and weights files alike) -------------------------------------------------
def sniff_format(path: str | os.PathLike) -> str:
    """"safetensors", "npz", "npy", "pickle" or "unknown", from the file's first bytes (not its name)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "npz"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n < 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return "pickle"
    return "unknown"
