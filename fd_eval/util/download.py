"""Downloads into the cache: resumable, locked against concurrent writers, sha256-verified, atomic.

``download_url`` handles plain http(s) URLs (model weights, mirrors of reference statistics). A partial
download is kept as ``{dest}.part`` and resumed with an HTTP Range request (within the call when the connection
drops mid-body, and by the next call after a failure or a kill); the finished file is verified and then renamed
into place, so the cache never holds a truncated or unverified file under its final name.

``download_hf`` handles ``hf://`` locations through ``huggingface_hub.hf_hub_download`` (the standard HF cache,
``HF_ENDPOINT``, the token from ``HF_TOKEN`` or ``hf auth login``, Xet storage). huggingface_hub >= 1.0 writes to
a process-unique temp file, resumes a dropped connection within the call (Range request, 5 tries) and renames
atomically; a killed process starts that file over. On top of it fd-eval takes its own lock, checks the sha256
(the expected one, and the Hub's own sha256 of LFS files, which the cache uses as the blob name) and deletes a
file that fails.

No network fails fast: huggingface_hub retries a refused connection or a DNS failure five times with backoff
(~25 s of "Retrying" lines), so :func:`download_hf` first opens one TCP connection to the endpoint and, when that
fails, serves the file from the cache or raises one :class:`DownloadError` line at once.
"""
from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import http.client
import os
import re
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from tqdm.auto import tqdm

from .._version import __version__
from ..errors import ChecksumError, DownloadError, GatedRepoError, OutputError
from .io_utils import CACHE_ENV, cache_root, file_lock, optional_cache_dir, sha256_file, sha256_file_cached

_CHUNK = 1 << 20
_RETRIES = 3  # extra attempts within one call after a connection drop that made progress
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
CONNECT_TIMEOUT = 10.0  # seconds for the reachability probe: no network means an error within seconds
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_OFFLINE: contextvars.ContextVar[bool | None] = contextvars.ContextVar("fd_eval_offline", default=None)


def offline_mode() -> bool:
    """True inside :func:`offline_scope` (``--offline``), or when ``FD_EVAL_OFFLINE`` or ``HF_HUB_OFFLINE`` is set
    to a true value (read at call time)."""
    if _OFFLINE.get() is not None:
        return bool(_OFFLINE.get())
    return any(os.environ.get(v, "").strip().lower() in {"1", "true", "yes", "on"}
               for v in ("FD_EVAL_OFFLINE", "HF_HUB_OFFLINE"))


@contextlib.contextmanager
def offline_scope(offline: bool | None = True) -> Iterator[None]:
    """Within the block, every download that is not given ``offline=`` explicitly (weights, references) uses
    ``offline`` (None: the environment decides). The CLI's ``--offline`` wraps a command in it."""
    token = _OFFLINE.set(offline)
    try:
        yield
    finally:
        _OFFLINE.reset(token)


def unreachable(url: str, timeout: float = CONNECT_TIMEOUT) -> str | None:
    """Why a TCP connection to ``url``'s host cannot be opened (refused, DNS failure, timeout), or None when it can
    or when a proxy is configured (then only the proxy knows)."""
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    u = urlsplit(url)
    try:
        port = u.port or (443 if u.scheme == "https" else 80)
        socket.create_connection((u.hostname or "", port), timeout=timeout).close()
    except (OSError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def verify_sha256(path: Path, expected: str | None, what: str) -> str:
    """Return the file's sha256; if it differs from ``expected`` (full hex or a prefix), delete it and raise."""
    actual = sha256_file(path)
    if expected and not actual.startswith(expected.lower()):
        path.unlink(missing_ok=True)
        raise ChecksumError(
            f"{what}: sha256 {actual[:16]}... does not match the expected {expected[:16]}...; the file was "
            "deleted. Retry the download; if it fails again the source has changed"
        )
    return actual


# --- plain http(s) ----------------------------------------------------------------------------------
def download_url(url: str, dest: str | os.PathLike, sha256: str | None = None, progress: bool = True,
                 offline: bool | None = None, hint: str = "") -> Path:
    """Fetch ``url`` to ``dest`` unless a verified copy is already there; returns ``dest``.

    Args:
        sha256: expected hex digest (or a prefix of it, as in torch hub file names); None skips the check.
        offline: refuse network access (default: :func:`offline_mode`).
        hint: appended to errors, e.g. "; or pass --weights PATH".

    Raises:
        DownloadError: offline without a cached copy, an HTTP error, or a connection that keeps failing (the
            partial file is kept and the next call resumes it).
        ChecksumError: the finished file has another sha256 (it is deleted).
    """
    dest = Path(dest)
    if dest.is_file():
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_error(dest, e, hint) from e
    offline = offline_mode() if offline is None else offline
    with file_lock(dest):
        if dest.is_file():  # another process finished it while we waited for the lock
            return dest
        if offline:
            raise DownloadError(f"{dest.name} is not in the cache ({dest.parent}) and offline mode is on; "
                                f"download {url} once with network access{hint}")
        part = dest.with_name(dest.name + ".part")
        for attempt in range(_RETRIES + 1):
            before = part.stat().st_size if part.exists() else 0
            try:
                _fetch(url, part, progress)
                break
            except urllib.error.HTTPError as e:  # a server answer, not a dropped connection: do not retry
                raise DownloadError(f"could not download {url} (HTTP {e.code} {e.reason}){hint}") from e
            except (urllib.error.URLError, OSError, http.client.HTTPException, TimeoutError) as e:
                if not isinstance(e, urllib.error.URLError) and getattr(e, "errno", None) in _LOCAL_ERRNOS:
                    raise _write_error(part, e, hint) from e  # disk full, read-only: retrying cannot help
                grew = part.exists() and part.stat().st_size > before
                if grew and attempt < _RETRIES:
                    continue  # resume right away with a Range request
                kept = part.stat().st_size if part.exists() else 0
                resume = f" ({kept} bytes kept in {part} to resume from)" if kept else ""
                raise DownloadError(f"could not download {url} ({type(e).__name__}: {e}){resume}; check the "
                                    f"network and run again{hint}") from e
        verify_sha256(part, sha256, url)
        os.replace(part, dest)
    return dest


_LOCAL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST,
                 errno.EISDIR}


def _write_error(path: Path, e: OSError, hint: str) -> OutputError:
    """One line for a download that cannot be written locally (names the path, and $FD_EVAL_CACHE when in it)."""
    root = cache_root().resolve()
    in_cache = root == path.resolve() or root in path.resolve().parents
    where = f" ({CACHE_ENV}={os.environ.get(CACHE_ENV) or 'unset'}: point it at a writable folder with space)" \
        if in_cache else ""
    err = OutputError(f"cannot write the download {path} ({errno.errorcode.get(e.errno or 0, 'error')}: "
                      f"{e.strerror or e}){where}{hint}")
    err.errno = e.errno
    return err


def _fetch(url: str, part: Path, progress: bool) -> None:
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": f"fd-eval/{__version__}",
                                               "Accept-Encoding": "identity"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: complete if the server's size is what we have
            size = _total_from_content_range(e.headers.get("Content-Range"))
            if size is None or size == have:
                return
            part.unlink()  # longer than the file, so not a prefix of it: start over
            return _fetch(url, part, progress)
        raise
    with resp:
        if have and resp.status != 206:
            have = 0  # server ignored the Range header and sends the whole file: start over
        elif have and _start_from_content_range(resp.headers.get("Content-Range")) != have:
            part.unlink()  # a range we did not ask for: appending it would corrupt the file
            raise OSError(f"server answered Range bytes={have}- with {resp.headers.get('Content-Range')}")
        total = resp.headers.get("Content-Length")
        total = int(total) + have if total is not None else None
        with open(part, "ab" if have else "wb") as f, tqdm(
            total=total, initial=have, unit="B", unit_scale=True, desc=part.name[:-5], disable=not progress
        ) as bar:
            try:
                for chunk in iter(lambda: resp.read(_CHUNK), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
            finally:  # keep what arrived, so the next attempt resumes from it
                f.flush()
                os.fsync(f.fileno())
        if total is not None and part.stat().st_size != total:
            raise OSError(f"connection closed after {part.stat().st_size} of {total} bytes")


def _start_from_content_range(value: str | None) -> int | None:
    m = re.match(r"bytes (\d+)-\d+/", value or "")
    return int(m.group(1)) if m else None


def _total_from_content_range(value: str | None) -> int | None:
    m = re.search(r"/(\d+)\s*$", value or "")
    return int(m.group(1)) if m else None


# --- Hugging Face Hub -------------------------------------------------------------------------------
_REPO_TYPE_PREFIXES = {"datasets": "dataset", "spaces": "space", "models": "model"}


@dataclass(frozen=True)
class HfLocation:
    """A file in a Hub repository: ``hf://[datasets/|spaces/]ORG/REPO[@REVISION]/PATH``.

    Attributes:
        repo_type: "dataset", "model" or "space".
        repo_id: "ORG/REPO".
        filename: path inside the repository, e.g. "reference_stats/test_stats.npz".
        revision: branch, tag or commit hash; None means "main".
    """

    repo_type: str
    repo_id: str
    filename: str
    revision: str | None = None

    @classmethod
    def parse(cls, location: str) -> "HfLocation":
        if not location.startswith("hf://"):
            raise DownloadError(f"{location}: not an hf:// location; expected hf://datasets/ORG/REPO/PATH")
        parts = location[len("hf://"):].split("/")
        repo_type = "model"
        if parts and parts[0] in _REPO_TYPE_PREFIXES:
            repo_type, parts = _REPO_TYPE_PREFIXES[parts[0]], parts[1:]
        if len(parts) < 3 or not all(parts):
            raise DownloadError(f"{location}: not a Hub file location; expected "
                                "hf://datasets/ORG/REPO[@REVISION]/PATH")
        repo, _, revision = parts[1].partition("@")
        return cls(repo_type, f"{parts[0]}/{repo}", "/".join(parts[2:]), revision or None)

    def __str__(self) -> str:
        prefix = {"dataset": "datasets/", "space": "spaces/"}.get(self.repo_type, "")
        org, repo = self.repo_id.split("/", 1)
        rev = f"@{self.revision}" if self.revision else ""
        return f"hf://{prefix}{org}/{repo}{rev}/{self.filename}"

    def page_url(self, endpoint: str | None = None) -> str:
        """The repository's web page (where gated repositories are requested)."""
        prefix = {"dataset": "datasets/", "space": "spaces/"}.get(self.repo_type, "")
        return f"{(endpoint or DEFAULT_HF_ENDPOINT).rstrip('/')}/{prefix}{self.repo_id}"


def hf_endpoint() -> str | None:
    """``HF_ENDPOINT`` read at call time (huggingface_hub reads it once, at import)."""
    return (os.environ.get("HF_ENDPOINT") or "").strip().rstrip("/") or None


def download_hf(location: str | HfLocation, sha256: str | None = None, offline: bool | None = None,
                force: bool = False, token: str | bool | None = None, progress: bool = True,
                access_url: str | None = None, hint: str = "") -> Path:
    """A Hub file in the local HF cache, downloaded on first use; returns its path (a snapshot path).

    Args:
        location: ``hf://datasets/ORG/REPO[@REVISION]/PATH`` or an :class:`HfLocation`.
        sha256: expected hex digest (or prefix); the Hub's own sha256 of an LFS file is checked as well.
        offline: use the cache only (default: :func:`offline_mode`).
        force: download again even if cached (to repair a damaged copy).
        token: HF token; None uses ``HF_TOKEN`` or the stored login.
        access_url: page where access to a gated repository is requested (default: the repo's page).
        hint: appended to errors.

    Raises:
        GatedRepoError: HTTP 401/403 (gated or private repository, missing or rejected token).
        DownloadError: offline and not cached, not found, network failure.
        ChecksumError: digest mismatch (the file is deleted from the cache).
    """
    loc = HfLocation.parse(location) if isinstance(location, str) else location
    offline = offline_mode() if offline is None else offline
    if force and offline:
        raise DownloadError(f"{loc}: a forced re-download needs the network, but offline mode is on{hint}")
    from huggingface_hub import hf_hub_download

    endpoint = hf_endpoint()
    folder = optional_cache_dir("locks")  # huggingface_hub locks its own files; ours only spares a double download
    lock = None if folder is None else folder / ("hf-" + hashlib.sha256(str(loc).encode()).hexdigest()[:24])
    down = None if offline else unreachable(endpoint or DEFAULT_HF_ENDPOINT)
    with file_lock(lock) if lock is not None else contextlib.nullcontext():
        try:
            path = Path(hf_hub_download(
                loc.repo_id, loc.filename, repo_type=loc.repo_type, revision=loc.revision, endpoint=endpoint,
                token=token, local_files_only=offline or down is not None, force_download=force,
                library_name="fd-eval", library_version=__version__,
                tqdm_class=None if progress else _SilentTqdm,
            ))
        except Exception as e:  # noqa: BLE001 - every Hub failure becomes one clear one-line error
            if down is not None:
                raise DownloadError(f"could not download {loc}: {endpoint or DEFAULT_HF_ENDPOINT} cannot be reached "
                                    f"({down}){'' if force else ' and the file is not in the cache'}; check the "
                                    "network or HF_ENDPOINT "
                                    f"and run again{hint}") from e
            raise _hf_error(e, loc, offline, endpoint, access_url, token, hint) from e
        blob = path.resolve()
        # The HF cache names a blob by its ETag, which for LFS files is the file's sha256 (a 40-hex git sha1
        # otherwise): a free, independent check of the transfer even when no digest is registered.
        hub_sha = blob.name if _SHA256_RE.fullmatch(blob.name) else None
        if sha256 or hub_sha:
            actual = sha256_file_cached(blob)
            for exp, whose in ((sha256, "expected"), (hub_sha, "Hub's")):
                if exp and not actual.startswith(exp.lower()):
                    for p in {path, blob}:
                        p.unlink(missing_ok=True)
                    raise ChecksumError(
                        f"{loc}: sha256 {actual[:16]}... does not match the {whose} {exp[:16]}...; the cached file "
                        f"{blob} was deleted. Retry the download; if it fails again the file on the Hub has changed"
                        f"{hint}"
                    )
    return path


class _SilentTqdm(tqdm):
    """A progress bar that never shows (``progress=False``), without touching huggingface_hub's global switch."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def _hf_error(e: BaseException, loc: HfLocation, offline: bool, endpoint: str | None, access_url: str | None,
              token: str | bool | None, hint: str) -> DownloadError:
    """Map a huggingface_hub / httpx exception (and its cause chain) to one fd-eval error."""
    from huggingface_hub import errors as hfe

    chain: list[BaseException] = []
    x: BaseException | None = e
    while x is not None and x not in chain:
        chain.append(x)
        x = x.__cause__ or x.__context__
    status = next((r.status_code for c in chain if isinstance(c, hfe.HfHubHTTPError)
                   and (r := getattr(c, "response", None)) is not None), None)
    if status in (401, 403) or any(isinstance(c, hfe.GatedRepoError) for c in chain):
        has_token = bool(token) or _have_hf_token()
        return GatedRepoError(
            f"{loc}: access refused (HTTP {status}); request access at {access_url or loc.page_url(endpoint)} "
            f"and log in with `hf auth login` or set HF_TOKEN "
            f"({'a token was sent' if has_token else 'no token was found'}){hint}"
        )
    if offline or any(isinstance(c, hfe.OfflineModeIsEnabled) for c in chain):
        return DownloadError(f"{loc} is not in the cache and offline mode is on (--offline, HF_HUB_OFFLINE or "
                             f"FD_EVAL_OFFLINE); download it once with network access{hint}")
    if status == 404 or any(isinstance(c, (hfe.RepositoryNotFoundError, hfe.RevisionNotFoundError,
                                           hfe.RemoteEntryNotFoundError)) for c in chain):
        return DownloadError(f"{loc}: not found on {endpoint or DEFAULT_HF_ENDPOINT} (HTTP {status or 404}); "
                             f"check the repository, revision and path{hint}")
    root = chain[-1]
    first = (str(root).strip().splitlines() or [""])[0][:200]
    return DownloadError(f"could not download {loc} from {endpoint or DEFAULT_HF_ENDPOINT} "
                         f"({type(root).__name__}: {first}); check the network or HF_ENDPOINT and run again{hint}")


def _have_hf_token() -> bool:
    try:
        from huggingface_hub.utils import get_token

        return get_token() is not None
    except Exception:  # noqa: BLE001 - only used to word an error message
        return False
