"""Reference statistics files: verified downloads (:func:`fetch_reference`), the local copy's record
(:func:`cached_copy`, :func:`cached_path`) and loading as :class:`fd_eval.Stats` (:func:`load_reference`).
The registry the names resolve in is :mod:`fd_eval.outputs.references`.
Integrity policy: a file is verified against the registry's sha256 when the entry has one. When it has none (the
official GPIC files: their digests are not published), the digest of the first download is *pinned* in a record in
``{cache_dir()}/references/`` and every later download or re-read of the file must match it, so a changed or
damaged file is never used silently (``fd-eval ref download NAME --repin`` accepts a new upstream file). For Hub LFS
files the Hub's own sha256 (the file's ETag) is checked on every download as well. The record also stores size
and mtime, so loading a verified file costs a ``stat`` (no re-hash, no network): after the first download
:func:`load_reference` works offline.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

from ..errors import (
    ChecksumError,
    DownloadError,
    FDEvalError,
    StatsFormatError,
    StatsMismatchError,
)
from ..util.download import download_hf, download_url, offline_mode
from ..util.io_utils import (
    atomic_write,
    cache_dir,
    file_lock,
    optional_cache_dir,
    sha256_file_cached,
    warn_cache_unusable,
)
from .references import _SPEC_LABELS, DEFAULT_MODEL, Reference, canonical_model, get_reference
from .stats import Stats, load_stats, sniff_format


# --- fetching ---------------------------------------------------------------------------------------------
def _record_path(ref: Reference) -> Path | None:
    """Where the verification record of ``ref`` lives; None (after one warning) when the cache is unusable: then
    nothing is pinned or remembered and every load re-hashes the file, but the run goes on."""
    folder = optional_cache_dir("references")
    key = hashlib.sha256(ref.location.encode()).hexdigest()[:24]
    return None if folder is None else folder / f"{key}.json"


def _read_record(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        rec = json.loads(path.read_text())
        return rec if isinstance(rec, dict) and isinstance(rec.get("sha256"), str) else None
    except (OSError, ValueError):
        return None


def _record_current(rec: dict[str, Any], ref: Reference) -> bool:
    """The recorded file is still there, unchanged since it was verified, and matches the registry's digest."""
    try:
        st = Path(rec["path"]).stat()
        same = rec["location"] == ref.location and (st.st_size, st.st_mtime_ns) == (rec["size"], rec["mtime_ns"])
    except (OSError, KeyError, TypeError):
        return False
    return same and (not ref.sha256 or rec["sha256"].startswith(ref.sha256))


def _url_dest(ref: Reference) -> Path:
    key = hashlib.sha256(ref.location.encode()).hexdigest()[:16]
    name = os.path.basename(ref.location.split("?", 1)[0].rstrip("/")) or "stats"
    return cache_dir("references", "url", key) / name


def cached_copy(name: str) -> dict[str, Any] | None:
    """``{"path", "sha256", "size"}`` of the verified local copy of reference ``name``, or None.

    Never touches the network and never hashes (the record of the last verification must still match the
    file's size and mtime).
    """
    ref = get_reference(name)
    rec = _read_record(_record_path(ref))
    if not rec or not _record_current(rec, ref):
        return None
    return {"path": Path(rec["path"]), "sha256": rec["sha256"], "size": rec["size"]}


def cached_path(name: str) -> Path | None:
    """The verified local copy of reference ``name``, or None (no network, no hashing)."""
    c = cached_copy(name)
    return c["path"] if c else None


def fetch_reference(name: str, offline: bool | None = None, force: bool = False, repin: bool = False,
                    progress: bool = True) -> Path:
    """A verified local copy of reference ``name``: downloaded on first use, then from the cache.

    Args:
        offline: use the cache only (default: true when ``FD_EVAL_OFFLINE`` or ``HF_HUB_OFFLINE`` is set).
        force: download again even if cached (repairs a damaged copy; still checked against the pin).
        repin: forget the digest pinned at the first download and pin the file fetched now (accepts a changed
            upstream file; the registry's own sha256, if any, still applies).
        progress: show a progress bar while downloading.

    Returns:
        The local path (for ``hf://`` a path in the Hugging Face cache, for URLs in ``{cache_dir()}/references``,
        for local entries the file itself).

    Raises:
        UnknownReferenceError, DownloadError (offline without a copy, network, not found), GatedRepoError,
        ChecksumError (the downloaded file is deleted), StatsFormatError (the file is not statistics; deleted if
        it was downloaded).
    """
    return _fetch(name, offline, force, repin, progress)[0]


def _fetch(name: str, offline: bool | None, force: bool = False, repin: bool = False,
           progress: bool = True) -> tuple[Path, str]:
    """:func:`fetch_reference`, also returning the file's sha256."""
    ref = get_reference(name)
    offline = offline_mode() if offline is None else bool(offline)
    if force and offline:
        raise DownloadError(f"reference {name!r}: --force downloads again, which offline mode forbids")
    rec_path = _record_path(ref)
    # One lock per location: a second process waits, then finds the record of the first one's download.
    with file_lock(rec_path) if rec_path is not None else contextlib.nullcontext():
        rec = None if repin else _read_record(rec_path)
        if rec is not None and rec.get("location") != ref.location:
            rec = None
        if rec is not None and not force and _record_current(rec, ref):
            return Path(rec["path"]), rec["sha256"]
        pinned = rec["sha256"] if rec else None
        if ref.sha256 and pinned and not pinned.startswith(ref.sha256):
            pinned = None  # the registry's digest supersedes an older pin
        expected = ref.sha256 or pinned
        try:
            if ref.kind == "hf":
                path = download_hf(ref.location, sha256=expected, offline=offline, force=force, progress=progress,
                                   access_url=ref.access_url)
            elif ref.kind == "url":
                dest = _url_dest(ref)
                if force:
                    dest.unlink(missing_ok=True)
                path = download_url(ref.location, dest, sha256=expected, progress=progress, offline=offline,
                                    hint=f"; or download it yourself and `fd-eval ref add {name} FILE --overwrite`")
            else:
                path = Path(ref.location).expanduser()
                if not path.is_file():
                    raise DownloadError(f"file {path} does not exist; restore it or point the entry elsewhere with "
                                        f"`fd-eval ref add {name} FILE --overwrite`")
        except DownloadError as e:  # same class (ChecksumError, GatedRepoError, ...), message names the reference
            how = f" (`fd-eval ref download {name}`)" if offline and ref.kind != "local" else ""
            if isinstance(e, ChecksumError) and expected and not ref.sha256:
                how = (f"; the expected digest was pinned at the first download: if the upstream file changed on "
                       f"purpose, accept it with `fd-eval ref download {name} --repin`")
            raise type(e)(f"reference {name!r}: {e}{how}") from e
        owned = ref.kind != "local"
        digest = sha256_file_cached(path)
        if expected and not digest.startswith(expected):
            whose = "registry's" if ref.sha256 else "pinned (first download's)"
            if owned:
                _discard(path)
            raise ChecksumError(
                f"reference {name!r}: {path} has sha256 {digest[:16]}..., not the {whose} {expected[:16]}...; "
                + ("the file was deleted. Download it again; if this repeats the source changed (accept it with "
                   f"`fd-eval ref download {name} --repin`)" if owned else
                   "the file was changed after it was registered; restore it or re-add it with --overwrite")
            )
        problem = _structure_problem(path, ref.format)
        if problem:
            if owned:
                _discard(path)
            raise StatsFormatError(
                f"{path}: reference {name!r} from {ref.location} is not a statistics file of format {ref.format} "
                f"({problem})" + ("; the file was deleted, download it again" if owned else "; fix the file or entry")
            )
        st = path.stat()
        if rec_path is not None:
            try:
                with atomic_write(rec_path, "w", what="reference record") as f:
                    json.dump({"name": name, "location": ref.location, "path": str(path), "sha256": digest,
                               "size": st.st_size, "mtime_ns": st.st_mtime_ns}, f, indent=1)
            except OSError as e:  # disk full: the file is verified, only the record (and so the pin) is missing
                warn_cache_unusable(str(e))
        return path, digest


def _discard(path: Path) -> None:
    """Delete a downloaded file; for an HF-cache snapshot link also the blob it points to."""
    blob = path.resolve()
    for p in {path, blob}:
        p.unlink(missing_ok=True)


def _structure_problem(path: Path, fmt: str) -> str | None:
    """A cheap check (file header and zip directory, no array data) that the file is statistics of ``fmt``."""
    kind = sniff_format(path)
    if kind == "npz":
        try:
            with zipfile.ZipFile(path) as zf:
                names = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
        except (zipfile.BadZipFile, OSError) as e:
            return f"corrupt or truncated zip: {e}"
        if fmt == "gpic-npz" and not {"dino_mu", "dino_sigma"} <= names:
            return f"no dino_mu/dino_sigma arrays (found {sorted(names)[:6]})"
        if fmt in ("npz", "auto") and not any(n.endswith("mu") and n[:-2] + "sigma" in names for n in names):
            return f"no mu/sigma arrays (found {sorted(names)[:6]})"
        if fmt == "fd-eval":
            return "an .npz, but the entry says fd-eval safetensors"
        return None
    if kind == "safetensors":
        return None if fmt in ("fd-eval", "auto") else f"a safetensors file, but the entry says {fmt}"
    with open(path, "rb") as f:
        head = f.read(12)
    return f"starts with {head!r}: {'a pickle' if kind == 'pickle' else kind + ' format'}"


# --- loading ----------------------------------------------------------------------------------------------
def load_reference(name: str, model: str = DEFAULT_MODEL, offline: bool | None = None,
                   features: bool = True) -> Stats:
    """Reference statistics as :class:`Stats`, with the registry's metadata attached.

    ``metadata`` gains ``extractor``, ``preprocess`` (so :func:`fd_eval.check_compatible` refuses generated
    statistics made with another protocol), ``weights_sha256`` when known, ``reference`` (name, location, sha256,
    split, n, format) and ``floors`` (published floors for this model). ``n`` is the registry's N when the file
    does not record it (GPIC npz files hold no N; their optional ``dino_embeddings`` may be a subset, kept as
    ``features`` with ``metadata["features_n"]``). ``extras`` keeps GPIC's ``key``/``tar_idx``.

    Raises:
        StatsMismatchError: the reference holds no statistics for ``model``, or the file contradicts the registry.
        StatsFormatError: the file is damaged or not statistics (names the file).
        plus everything :func:`fetch_reference` raises.
    """
    ref = get_reference(name)
    model = canonical_model(model)
    if ref.models and model not in ref.models:
        raise StatsMismatchError(
            f"reference {name!r} holds statistics for {', '.join(ref.models)}, not {model!r}; choose one of those "
            f"models, or build statistics for {model} with `fd-eval stats` and add them with `fd-eval ref add`"
        )
    path, digest = _fetch(name, offline)
    info = ref.models.get(model)
    try:
        st = load_stats(path, model=model, features=features)
    except StatsMismatchError as e:
        maybe = " (the official file may not include them)" if info and info.optional else ""
        raise StatsMismatchError(
            f"reference {name!r} ({path}) has no {model} statistics{maybe}; build them with `fd-eval stats` over "
            f"the {ref.split or 'reference'} images and add them with `fd-eval ref add`"
        ) from e
    except StatsFormatError as e:
        raise StatsFormatError(f"{e}; reference {name!r}: fetch a fresh copy with `fd-eval ref download {name} "
                               "--force`") from e
    except FDEvalError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:  # e.g. a bad CRC inside an npz member
        raise StatsFormatError(
            f"{path}: reference {name!r} cannot be read ({type(e).__name__}: {e}); the file is damaged, fetch a "
            f"fresh copy with `fd-eval ref download {name} --force`"
        ) from e

    meta = dict(st.metadata)
    origin = f"reference {name!r} ({path})"
    if info is not None and info.preprocess is not None:
        recorded = meta.get("preprocess")
        if recorded:
            diffs = [k for k in sorted(set(recorded) | set(info.preprocess))
                     if k not in _SPEC_LABELS and recorded.get(k) != info.preprocess.get(k)]
            if diffs:
                raise StatsMismatchError(
                    f"{origin}: the file records preprocessing that differs from the registry entry in "
                    f"{', '.join(diffs)}; fix the entry (fd-eval ref add --overwrite) or rebuild the file"
                )
        else:
            meta["preprocess"] = dict(info.preprocess)
    if info is not None and info.weights_sha256 and not meta.get("weights_sha256"):
        meta["weights_sha256"] = info.weights_sha256
    meta["extractor"] = model

    n = st.n
    n_unknown = bool(meta.pop("n_unknown", False))
    if sniff_format(path) == "npz":
        # npz files record no N, only optional embeddings (possibly a subset) or rarely an "n" array: the
        # registry says how many images mu/sigma were computed from.
        n_from_file = meta.pop("n_from", None) == "n"
        if st.features is not None:
            meta["features_n"] = int(st.features.shape[0])
        if ref.n is not None:
            if n_from_file and st.n != ref.n:
                raise StatsMismatchError(f"{origin}: the file records N = {st.n} but the registry entry says "
                                         f"N = {ref.n}; fix the entry (--n {st.n} --overwrite) or the file")
            n = ref.n
        elif n_unknown:
            meta["n_unknown"] = True
    elif ref.n is not None and ref.n != st.n:
        raise StatsMismatchError(
            f"{origin}: the file records N = {st.n} but the registry entry says N = {ref.n}; fix the entry "
            f"(fd-eval ref add {name} ... --n {st.n} --overwrite) or the file"
        )
    meta["reference"] = {"name": name, "location": ref.location, "sha256": digest,
                         "split": ref.split, "n": ref.n, "format": ref.format, "builtin": ref.builtin}
    meta["floors"] = [f.to_dict() for f in ref.floors.get(model, ())]
    return Stats(st.mu, st.sigma, n, meta, features=st.features, extras=dict(st.extras), origin=origin,
                 storage_dtype=st.storage_dtype)


