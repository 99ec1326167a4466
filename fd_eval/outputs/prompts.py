"""GPIC's evaluation prompts: the captions of the samples a reference file names by ``key`` and ``tar_idx``.

The GPIC protocol generates one image per caption of a fixed 50K-sample subset of the test split; the official
statistics file names those samples (``key``: the sample's sha256 key, ``tar_idx``: the number of the test
shard holding it). :func:`evaluation_prompts` reads exactly those samples' ``{key}.json`` from the shards, in the
reference file's order, so a generator can be run on the protocol's prompts::

    fd-eval prompts gpic-test -o prompts.jsonl                       # shards from the Hub (gated: HF token)
    fd-eval prompts gpic-test -o prompts.jsonl --shards "gpic/test/gpic_test_{00000..00127}.tar"

Shards come from ``shards`` -- a folder, a glob, a brace range or one ``.tar`` (a shard's number is the last run
of digits in its file name, ``gpic_test_00042.tar`` -> 42), or a template with ``{NNNNN}`` standing for the
zero-padded number (a local path or an ``hf://`` location) -- or, by default, from the reference's own Hub
dataset (``hf://datasets/stanford-vision-lab/gpic/test/gpic_test_{NNNNN}.tar`` for ``gpic-test``). Only the shards
that ``tar_idx`` names are read (and downloaded); members are read in memory, never extracted.
"""
from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import FDEvalError, InputError, SourceError, StatsFormatError
from ..util.io_utils import atomic_write

__all__ = ["GPIC_REPO", "PROMPT_FIELDS", "evaluation_prompts", "write_prompts", "read_prompts", "shard_locator"]

GPIC_REPO = "stanford-vision-lab/gpic"
# The fields written per prompt, in this order ("index": position in the reference's key list).
PROMPT_FIELDS = ("index", "key", "tar_idx", "caption", "caption_type")
_MAX_JSON_BYTES = 1 << 20  # a sample's .json is ~1 KB; anything huge is not GPIC metadata
_TEMPLATE = re.compile(r"\{(N+)\}")
_SHARD_NUMBER = re.compile(r"(\d+)\D*\.tar$", re.IGNORECASE)
_WDS_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset: key = name up to the base name's first dot


# --- which samples ------------------------------------------------------------------------------------------
def _as_strings(a: np.ndarray) -> list[str]:
    return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in np.asarray(a).ravel().tolist()]


def _selection(reference: str | os.PathLike, offline: bool | None) -> tuple[list[str], np.ndarray, str, Any]:
    """(keys, tar_idx, how messages name the reference, registry entry or None)."""
    from .references import DEFAULT_MODEL, get_reference, load_reference
    from .stats import load_all_stats

    path = Path(reference)
    if path.is_file():
        sections = load_all_stats(path, features=False)
        extras = next(iter(sections.values())).extras
        label, entry = str(path), None
    else:
        entry = get_reference(str(reference))  # UnknownReferenceError lists the known names
        model = next(iter(entry.models), DEFAULT_MODEL)
        st = load_reference(entry.name, model, offline=offline, features=False)
        extras, label = st.extras, f"reference {entry.name!r} ({st.origin})"
    missing = [k for k in ("key", "tar_idx") if k not in extras]
    if missing:
        raise StatsFormatError(
            f"{label} has no {'/'.join(missing)} array naming the evaluation samples; prompts need a statistics file "
            "with key and tar_idx, such as GPIC's official reference_stats/test_stats.npz")
    keys = _as_strings(extras["key"])
    tar_idx = np.asarray(extras["tar_idx"]).ravel()
    if tar_idx.dtype.kind == "f" and np.all(np.isfinite(tar_idx)) and np.all(tar_idx == np.round(tar_idx)):
        tar_idx = tar_idx.astype(np.int64)
    if tar_idx.dtype.kind not in "iu" or len(tar_idx) != len(keys) or (len(tar_idx) and tar_idx.min() < 0):
        raise StatsFormatError(
            f"{label}: key ({len(keys)}) and tar_idx ({len(tar_idx)} {tar_idx.dtype}) must be equally long, tar_idx "
            "non-negative integers; the file is damaged or not an official statistics file")
    if not keys:
        raise StatsFormatError(f"{label}: key and tar_idx are empty; no evaluation samples to look up")
    return keys, tar_idx.astype(np.int64), label, entry


# --- where the shards are -----------------------------------------------------------------------------------
def _default_shards(entry: Any, label: str) -> str:
    from ..util.download import HfLocation

    hint = ("; pass --shards (shards=) with the test shards, e.g. "
            "\"gpic/test/gpic_test_{00000..00127}.tar\"")
    if entry is None or entry.kind != "hf" or not entry.split:
        raise FDEvalError(f"{label}: no shard location known for it{hint}")
    loc = HfLocation.parse(entry.location)
    if loc.repo_id != GPIC_REPO:
        raise FDEvalError(f"{label}: not in the GPIC dataset, so its shard location is unknown{hint}")
    split = entry.split
    prefix = {"dataset": "datasets/", "space": "spaces/"}.get(loc.repo_type, "")
    rev = f"@{loc.revision}" if loc.revision else ""
    return f"hf://{prefix}{loc.repo_id}{rev}/{split}/gpic_{split}_{{NNNNN}}.tar"


def shard_locator(shards: str | os.PathLike) -> Callable[[int], str]:
    """``tar_idx -> shard`` (a local path or an ``hf://`` location) for a ``shards`` spec (module docstring).

    A shard the spec does not name raises :class:`SourceError` when it is asked for.
    """
    spec = os.fspath(shards)
    m = _TEMPLATE.search(spec)
    if m:
        width = len(m.group(1))
        return lambda t: spec[:m.start()] + str(int(t)).zfill(width) + spec[m.end():]
    if spec.startswith("hf://"):
        raise FDEvalError(f"{spec}: an hf:// shard location needs a {{NNNNN}} placeholder for the shard number, e.g. "
                          "hf://datasets/stanford-vision-lab/gpic/test/gpic_test_{NNNNN}.tar")
    from ..sources import expand_shards

    if os.path.isdir(spec):
        paths = sorted(glob.glob(os.path.join(glob.escape(spec), "*.tar")))
        if not paths:
            raise SourceError(f"{spec}: the folder holds no .tar shards; check --shards")
    else:
        paths = expand_shards(spec)  # raises SourceError naming a missing file of a range
    by_number: dict[int, str] = {}
    for p in paths:
        num = _SHARD_NUMBER.search(os.path.basename(p))
        if not num:
            raise SourceError(f"{p}: no shard number in the file name (expected e.g. gpic_test_00042.tar); check "
                              "--shards")
        t = int(num.group(1))
        if t in by_number:
            raise SourceError(f"{p} and {by_number[t]} both look like shard {t}; --shards must name each shard once")
        by_number[t] = p

    def locate(t: int) -> str:
        if int(t) not in by_number:
            raise SourceError(f"--shards {spec} has no shard number {int(t)} (it names {len(by_number)} shards, e.g. "
                              f"{next(iter(by_number.values()))}); point it at all the shards of the split")
        return by_number[int(t)]

    return locate


# --- reading ------------------------------------------------------------------------------------------------
def _read_samples(path: str, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """Parsed ``{key}.json`` of the ``wanted`` keys in one shard (stops once all are found)."""
    found: dict[str, dict[str, Any]] = {}
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            while len(found) < len(wanted):
                ti = tf.next()
                if ti is None:
                    break
                tf.members.clear()  # tarfile keeps every header otherwise (~15K per GPIC shard)
                m = _WDS_KEY.match(ti.name)
                if not ti.isreg() or not m or m.group(2).lower() != "json":
                    continue
                key = m.group(1)
                if key not in wanted:
                    key = key.rsplit("/", 1)[-1]  # a sample stored under a folder inside the tar
                    if key not in wanted:
                        continue
                if ti.size > _MAX_JSON_BYTES:
                    raise InputError(f"{path}:{ti.name}: {ti.size} bytes is too large for sample metadata; "
                                     "re-download the shard")
                data = tf.extractfile(ti).read()  # type: ignore[union-attr]
                try:
                    meta = json.loads(data.decode("utf-8"))
                except (UnicodeDecodeError, ValueError) as e:
                    raise InputError(f"{path}:{ti.name}: not valid UTF-8 JSON ({e}); re-download the shard") from None
                if not isinstance(meta, dict):
                    raise InputError(f"{path}:{ti.name}: not a JSON object; re-download the shard")
                found[key] = meta
    except FileNotFoundError:
        raise SourceError(f"{path}: no such shard; check --shards") from None
    except (tarfile.TarError, EOFError) as e:
        raise SourceError(f"{path}: not a readable tar shard ({e}); re-download it") from None
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror or e}); check the file") from None
    return found


def evaluation_prompts(reference: str | os.PathLike = "gpic-test", shards: str | os.PathLike | None = None, *,
                       offline: bool | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """The evaluation captions named by ``reference``'s ``key``/``tar_idx``, in the reference's order.

    Args:
        reference: a registry name (``gpic-test``) or a statistics file holding ``key`` and ``tar_idx``.
        shards: where the split's tar shards are (module docstring); default: the reference's Hub dataset.
        offline: use cached files only (reference and Hub shards).
    Returns:
        One dict per sample: ``index`` (position in the reference's list), ``key``, ``tar_idx``, ``caption``,
        ``caption_type`` (None when the sample's JSON has none).
    Raises:
        SourceError: a shard is missing or unreadable, or a key is not in the shard ``tar_idx`` names (the message
            names the shard and the key). StatsFormatError: the reference has no key/tar_idx.
        DownloadError, GatedRepoError: Hub shards that cannot be fetched.
    """
    from tqdm.auto import tqdm

    keys, tar_idx, label, entry = _selection(reference, offline)
    locate = shard_locator(shards if shards is not None else _default_shards(entry, label))
    order = np.argsort(tar_idx, kind="stable")
    numbers, starts = np.unique(tar_idx[order], return_index=True)
    groups = np.split(order, starts[1:])
    captions: list[dict[str, Any] | None] = [None] * len(keys)
    for t, rows in tqdm(list(zip(numbers.tolist(), groups)), desc="shards", unit="shard", disable=not progress):
        where = locate(t)
        if where.startswith("hf://"):
            from ..util.download import download_hf

            path = str(download_hf(where, offline=offline, progress=progress,
                                   hint="; or pass --shards with a local copy of the shards"))
        else:
            path = where
        wanted = {keys[i] for i in rows.tolist()}
        found = _read_samples(path, wanted)
        absent = [keys[i] for i in rows.tolist() if keys[i] not in found]
        if absent:
            more = f" and {len(absent) - 1} more of its {len(wanted)} keys" if len(absent) > 1 else ""
            raise SourceError(
                f"{where}: no sample with key {absent[0]}{more}, which {label} places in shard {t} (tar_idx); the "
                "shard is incomplete or not the right split's shard: re-download it or check --shards")
        for i in rows.tolist():
            meta = found[keys[i]]
            caption = meta.get("caption")
            if not isinstance(caption, str):
                raise InputError(f"{where}:{keys[i]}.json: no text 'caption' field (found {sorted(meta)[:8]}); "
                                 "re-download the shard")
            captions[i] = {"index": i, "key": keys[i], "tar_idx": t, "caption": caption,
                           "caption_type": meta.get("caption_type")}
    return captions  # type: ignore[return-value]


def write_prompts(out: str | os.PathLike, reference: str | os.PathLike = "gpic-test",
                  shards: str | os.PathLike | None = None, *, offline: bool | None = None,
                  progress: bool = True) -> list[dict[str, Any]]:
    """:func:`evaluation_prompts` written as JSON lines (UTF-8, one object per line, fields
    :data:`PROMPT_FIELDS`) to ``out``, atomically; returns the prompts."""
    prompts = evaluation_prompts(reference, shards, offline=offline, progress=progress)
    with atomic_write(out, "wb") as f:
        for p in prompts:
            f.write(json.dumps(p, ensure_ascii=False).encode("utf-8") + b"\n")
    return prompts


def read_prompts(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The prompts of a ``prompts.jsonl`` file (for generation scripts)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
