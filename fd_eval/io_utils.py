"""Atomic writes, checksums, cache locations and cross-process locks."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

import filelock

_CHUNK = 1 << 20


def cache_dir(*parts: str) -> Path:
    """``$FD_EVAL_CACHE`` (default ``~/.cache/fd_eval``) joined with ``parts``; created on demand."""
    root = Path(os.environ.get("FD_EVAL_CACHE") or Path.home() / ".cache" / "fd_eval")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


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
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Write ``path`` through a temp file in the same directory, fsync, then rename over it.

    A crash, Ctrl-C or exception leaves the old file (or nothing) in place, never half a file.
    """
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed to ``path``, else removed.

    For writers that insist on a file name (safetensors, np.savez).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


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
    record = cache_dir("sha256") / (hashlib.sha1(str(path).encode()).hexdigest() + ".json")
    try:
        rec = json.loads(record.read_text())
        if (rec["path"], rec["size"], rec["mtime_ns"], rec["inode"]) == key and len(rec["sha256"]) == 64:
            _SHA256_MEMO[key] = rec["sha256"]
            return rec["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = sha256_file(path)
    _SHA256_MEMO[key] = digest
    with contextlib.suppress(OSError):
        with atomic_write(record, "w") as f:
            json.dump({"path": key[0], "size": key[1], "mtime_ns": key[2], "inode": key[3], "sha256": digest}, f)
    return digest


_SHA256_MEMO: dict[tuple[str, int, int, int], str] = {}
