"""Reference statistics by name: the registry (built-in and user entries, floors). Verified downloads and
loading as :class:`fd_eval.Stats` are :mod:`fd_eval.outputs.reference_fetch` (re-exported here).

Built-in entries (``gpic-test``, ``gpic-val``) live in the package data file ``fd_eval/reference_stats/registry.json``;
a user's own entries in ``{config_dir()}/references.json`` (same schema, written atomically by
:func:`add_reference` / :func:`remove_reference`). An entry says where the file lives (``hf://``, ``https://`` or a
local path), its format, which extractors' statistics it holds and with which preprocessing, N, the split, its
sha256 when known, and the published real-vs-real floors by model and sample size.

Integrity policy (verification, pinning of first downloads): :mod:`fd_eval.outputs.reference_fetch`.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import (
    ChecksumError,
    StatsMismatchError,
    UnknownReferenceError,
)
from ..extractors.preprocess import PreprocessSpec
from ..util.download import HfLocation
from ..util.io_utils import (
    atomic_write,
    config_dir,
    file_lock,
    sha256_file_cached,
)
from .stats import load_all_stats, load_stats, sniff_format

REGISTRY_VERSION = 1
DEFAULT_MODEL = "dinov2-vitl14"
FORMATS = ("gpic-npz", "npz", "fd-eval", "auto")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_HEX_RE = re.compile(r"[0-9a-f]{8,64}")
# Fields of a PreprocessSpec that label rather than define it (ignored when two specs are compared).
_SPEC_LABELS = {"reference"}


RELATIONS = ("subset", "independent")
PROTOCOL_N = 50_000  # GPIC's generated-set size


@dataclass(frozen=True)
class Floor:
    """A published real-vs-real FD: N real images against the reference (what a perfect generator scores).

    ``fd`` = ``fd_mean`` + ``fd_cov`` (mean and covariance terms; None where the paper gives only the total).
    ``relation``: "subset" when the N real images are part of the reference set (GPIC's Test-50K of Test-1M),
    "independent" when they are another sample (Val-200K vs Test-1M), None when not known. A subset scores lower
    than an independent sample of the same size (see :class:`FloorModel`).
    """

    model: str
    n: int
    fd: float
    fd_mean: float | None = None
    fd_cov: float | None = None
    label: str = ""
    source: str = ""
    relation: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "fd": self.fd, "fd_mean": self.fd_mean, "fd_cov": self.fd_cov, "label": self.label,
                "source": self.source, "relation": self.relation}


@dataclass(frozen=True)
class FloorModel:
    """Finite-sample model of the real-vs-real FD: N x E[FD] ~= c for an n-image set against an M-image reference.

    A subset of the reference scores c (1/n - 1/M) (it shares the reference's sampling noise), an independent
    sample c (1/n + 1/M). ``c`` (FD x images) is fitted, least squares through the origin, to the published floors
    of one relation (subset floors when there are any, the reference's own protocol); GPIC's 7.44 FD-DINOv2 at
    n = 50K of M = 1M gives c ~= 3.9e5, so an independent perfect 50K sample scores ~= 8.2, not 7.44.
    """

    c: float
    m: int  # reference size M

    @classmethod
    def fit(cls, floors: tuple[Floor, ...] | list[Floor], m: int) -> "FloorModel | None":
        """From floors with a known relation (None without any, or without M)."""
        for rel in RELATIONS:  # subset floors first: the published protocol's own numbers
            rows = [(f.fd, 1 / f.n + (1 / m if rel == "independent" else -1 / m)) for f in floors if f.relation == rel]
            den = sum(k * k for _, k in rows)
            if rows and m and den > 0:  # a subset floor with n = M (the whole reference) carries no information
                return cls(sum(fd * k for fd, k in rows) / den, int(m))
        return None

    def subset(self, n: int) -> float:
        """Expected FD of a perfect n-image subset of the reference: c (1/n - 1/M)."""
        return self.c * (1 / n - 1 / self.m)

    def independent(self, n: int) -> float:
        """Expected FD of a perfect n-image sample independent of the reference: c (1/n + 1/M)."""
        return self.c * (1 / n + 1 / self.m)

    def shift(self, n: int, n_protocol: int = PROTOCOL_N) -> float:
        """Estimated FD(n) - FD(n_protocol) of a generator from sampling bias alone: c (1/n - 1/n_protocol)
        (negative above the protocol's N: at 100K a generator scores ~3.9 FD-DINOv2 lower than at 50K)."""
        return self.c * (1 / n - 1 / n_protocol)

    @property
    def reference_bias(self) -> float:
        """c / M: the reference's own finite-sample share of every FD (~0.39 FD-DINOv2 for GPIC's 1M test set);
        what remains of an FD-infinity extrapolated in the generated N only."""
        return self.c / self.m

    def to_dict(self) -> dict[str, Any]:
        return {"c": self.c, "m": self.m, "reference_bias": self.reference_bias}


@dataclass(frozen=True)
class ModelInfo:
    """What a reference file holds for one extractor.

    Attributes:
        preprocess: :class:`PreprocessSpec` fields the statistics were made with (None: not recorded).
        weights_sha256: sha256 of the extractor weights used (None: not recorded).
        optional: the file may lack this model's statistics (e.g. Inception in the official GPIC files).
    """

    name: str
    preprocess: dict[str, Any] | None = None
    weights_sha256: str | None = None
    optional: bool = False

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.preprocess is not None:
            d["preprocess"] = self.preprocess
        if self.weights_sha256:
            d["weights_sha256"] = self.weights_sha256
        if self.optional:
            d["optional"] = True
        return d


@dataclass(frozen=True)
class Reference:
    """One registry entry. ``location``: ``hf://...``, ``http(s)://...`` or an absolute local path."""

    name: str
    location: str
    description: str = ""
    format: str = "auto"
    split: str | None = None
    n: int | None = None
    sha256: str | None = None
    access_url: str | None = None
    models: dict[str, ModelInfo] = field(default_factory=dict)
    floors: dict[str, tuple[Floor, ...]] = field(default_factory=dict)
    builtin: bool = False

    @property
    def kind(self) -> str:
        """"hf", "url" or "local"."""
        if self.location.startswith("hf://"):
            return "hf"
        if re.match(r"https?://", self.location):
            return "url"
        return "local"

    def preprocess_spec(self, model: str = DEFAULT_MODEL) -> PreprocessSpec | None:
        info = self.models.get(canonical_model(model))
        return PreprocessSpec.from_dict(info.preprocess) if info and info.preprocess else None

    def floor(self, model: str, n: int) -> Floor | None:
        return next((f for f in self.floors.get(canonical_model(model), ()) if f.n == int(n)), None)

    def floor_model(self, model: str) -> FloorModel | None:
        """The :class:`FloorModel` fitted to this reference's published floors for ``model`` (None: none known)."""
        return FloorModel.fit(self.floors.get(canonical_model(model), ()), self.n or 0)

    def to_dict(self) -> dict[str, Any]:
        """The registry JSON form (without the name)."""
        return {
            "description": self.description, "location": self.location, "format": self.format,
            "split": self.split, "n": self.n, "sha256": self.sha256, "access_url": self.access_url,
            "models": {m: i.to_dict() for m, i in self.models.items()},
            "floors": {m: [f.to_dict() for f in fl] for m, fl in self.floors.items()},
        }

    @classmethod
    def from_dict(cls, name: str, d: Any, builtin: bool, where: str) -> "Reference":
        """Parse and validate one entry (data only); errors name the registry file and the entry."""

        def bad(msg: str) -> UnknownReferenceError:
            return UnknownReferenceError(f"{where}: reference {name!r}: {msg}; fix or remove the entry")

        if not isinstance(d, dict):
            raise bad("entry is not a JSON object")
        for key in ("description", "split", "access_url"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise bad(f"{key!r} must be a string, got {type(d[key]).__name__}")
        loc = d.get("location")
        if not isinstance(loc, str) or not loc:
            raise bad("'location' must be an hf://, https:// URL or a file path")
        fmt = d.get("format") or "auto"
        if fmt not in FORMATS:
            raise bad(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
        n = d.get("n")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise bad(f"'n' must be a positive integer, got {n!r}")
        sha = d.get("sha256")
        if sha is not None and (not isinstance(sha, str) or not _HEX_RE.fullmatch(sha.lower())):
            raise bad(f"'sha256' must be a hex digest (8-64 hex digits), got {sha!r}")
        models_raw = d.get("models") or {}
        if not isinstance(models_raw, dict):
            raise bad("'models' must be an object {model: {...}}")
        models = {}
        for m, info in models_raw.items():
            info = info or {}
            if not isinstance(info, dict):
                raise bad(f"models.{m} must be an object")
            wsha = info.get("weights_sha256")
            if wsha is not None and (not isinstance(wsha, str) or not _HEX_RE.fullmatch(wsha.lower())):
                raise bad(f"models.{m}.weights_sha256 must be a hex digest or null, got {wsha!r}")
            if not isinstance(info.get("optional", False), bool):
                raise bad(f"models.{m}.optional must be true or false, got {info['optional']!r}")
            spec = info.get("preprocess")
            if spec is not None and not isinstance(spec, dict):
                raise bad(f"models.{m}.preprocess must be an object, got {type(spec).__name__}")
            if spec is not None:
                try:
                    PreprocessSpec.from_dict(spec)
                except (TypeError, ValueError) as e:
                    raise bad(f"models.{m}.preprocess is not a preprocessing spec ({e})") from e
            models[m] = ModelInfo(m, spec, info.get("weights_sha256"), bool(info.get("optional", False)))
        floors_raw = d.get("floors") or {}
        if not isinstance(floors_raw, dict):
            raise bad("'floors' must be an object {model: [{n, fd, ...}]}")
        floors = {}
        for m, rows in floors_raw.items():
            if not isinstance(rows, list):
                raise bad(f"floors.{m} must be a list of {{n, fd, fd_mean, fd_cov, label, source, relation}}")
            floors[m] = tuple(_floor(m, i, r, bad) for i, r in enumerate(rows))
        return cls(name=name, location=loc, description=str(d.get("description") or ""), format=fmt,
                   split=d.get("split"), n=n, sha256=sha.lower() if sha else None, access_url=d.get("access_url"),
                   models=models, floors=floors, builtin=builtin)


def _floor(model: str, i: int, r: Any, bad: Any) -> Floor:
    """One floors row, type-checked (``bad(msg)`` makes the error naming the registry and entry)."""
    where = f"floors.{model}[{i}]"
    if not isinstance(r, dict):
        raise bad(f"{where} must be an object {{n, fd, ...}}, got {type(r).__name__}")
    n = r.get("n")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise bad(f"{where}.n must be a positive integer, got {n!r}")
    nums = {}
    for key in ("fd", "fd_mean", "fd_cov"):
        x = r.get(key)
        if (x is None and key != "fd") or (isinstance(x, (int, float)) and not isinstance(x, bool)
                                           and math.isfinite(x) and x >= 0):
            nums[key] = None if x is None else float(x)
        else:
            raise bad(f"{where}.{key} must be a finite number >= 0{'' if key == 'fd' else ' or null'}, got {x!r}")
    for key in ("label", "source"):
        if not isinstance(r.get(key, ""), str):
            raise bad(f"{where}.{key} must be a string, got {type(r[key]).__name__}")
    rel = r.get("relation")
    if rel is not None and rel not in RELATIONS:
        raise bad(f"{where}.relation must be one of {', '.join(RELATIONS)} or null, got {rel!r}")
    return Floor(model, n, nums["fd"], nums["fd_mean"], nums["fd_cov"], r.get("label", ""), r.get("source", ""), rel)


def canonical_model(model: str) -> str:
    """Extractor name with aliases resolved ("dinov2" -> "dinov2-vitl14"; "fid" -> "inception-v3-tf")."""
    from ..extractors.base import ALIASES

    return ALIASES.get(model, model)


# --- registry files -------------------------------------------------------------------------------------
def user_registry_path() -> Path:
    """``{config_dir()}/references.json``: the user's own entries. Raises :class:`UnknownReferenceError` (one line)
    when the configuration folder is a file or the registry file a folder."""
    folder = config_dir()
    where = "set by FD_EVAL_CONFIG" if os.environ.get("FD_EVAL_CONFIG") else "the default configuration folder"
    if folder.exists() and not folder.is_dir():
        raise UnknownReferenceError(f"{folder} ({where}) is a file, not a folder; the user reference registry lives "
                                    "in a folder: point FD_EVAL_CONFIG at a folder (or move the file away)")
    path = folder / "references.json"
    if path.is_dir():
        raise UnknownReferenceError(f"{path} is a folder; the user reference registry is a JSON file: remove or "
                                    "rename that folder")
    return path


@lru_cache(maxsize=1)
def _builtin_entries() -> dict[str, Reference]:
    text = resources.files("fd_eval.reference_stats").joinpath("registry.json").read_text(encoding="utf-8")
    return _parse_registry(text, "fd_eval/reference_stats/registry.json", builtin=True)


def _parse_registry(text: str, where: str, builtin: bool) -> dict[str, Reference]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise UnknownReferenceError(f"{where}: not valid JSON ({e}); fix or delete the file") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("references", {}), dict):
        raise UnknownReferenceError(f"{where}: expected {{\"version\": 1, \"references\": {{...}}}}; fix or delete it")
    version = doc.get("version", REGISTRY_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise UnknownReferenceError(f"{where}: \"version\" must be an integer, got {version!r}; fix or delete it")
    if version > REGISTRY_VERSION:
        raise UnknownReferenceError(f"{where}: registry version {doc['version']} is newer than this fd-eval "
                                    f"understands ({REGISTRY_VERSION}); upgrade fd-eval")
    return {name: Reference.from_dict(name, d, builtin, where) for name, d in doc.get("references", {}).items()}


def _user_entries() -> dict[str, Reference]:
    path = user_registry_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as e:  # unreadable (permissions, I/O): one line, not a traceback
        raise UnknownReferenceError(f"{path}: cannot read the user reference registry ({e.strerror or e}); fix its "
                                    "permissions or point FD_EVAL_CONFIG at another folder") from None
    return _parse_registry(text, str(path), builtin=False)


def _write_user_entries(entries: dict[str, Reference]) -> None:
    doc = {"version": REGISTRY_VERSION, "references": {n: r.to_dict() for n, r in sorted(entries.items())}}
    with atomic_write(user_registry_path(), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


def list_references() -> list[Reference]:
    """Built-in entries (registry order), then the user's (by name)."""
    builtin = _builtin_entries()
    user = _user_entries()
    return list(builtin.values()) + [user[n] for n in sorted(user) if n not in builtin]


def get_reference(name: str) -> Reference:
    """The entry called ``name`` (built-in or the user's); :class:`UnknownReferenceError` lists the known names."""
    builtin = _builtin_entries()
    if name in builtin:
        return builtin[name]
    user = _user_entries()
    if name in user:
        return user[name]
    known = ", ".join(r.name for r in list_references())
    raise UnknownReferenceError(
        f"unknown reference {name!r}; known references: {known}. Add your own with `fd-eval ref add NAME FILE|URL`"
    )


def floor_for(name: str, model: str, n: int) -> Floor | None:
    """The published real-vs-real floor of reference ``name`` for ``model`` at sample size ``n``, or None.

    ``Floor.relation`` says whether the published real set was a subset of the reference or independent of it.
    """
    return get_reference(name).floor(model, n)


def floor_model(name: str, model: str) -> FloorModel | None:
    """The finite-sample model fitted to the published floors of reference ``name`` for ``model`` (or None)."""
    return get_reference(name).floor_model(model)


def independent_floor_estimate(name: str, model: str, n: int) -> float | None:
    """Model estimate of what a perfect n-image sample *independent* of reference ``name`` scores: c (1/n + 1/M).

    GPIC at n = 50K: ~8.2 FD-DINOv2, ~0.75 FD-Inception (the published 7.44 / 0.68 are for a subset of the
    reference, which shares its sampling noise). A generator's images are independent of the reference, so this is
    its floor. None when the reference has no floors with a known relation.
    """
    fm = floor_model(name, model)
    return None if fm is None else fm.independent(int(n))


def finite_n_shift(name: str, model: str, n: int, n_protocol: int = PROTOCOL_N) -> float | None:
    """Estimated FD(n) - FD(n_protocol) from finite-sample bias alone (FD ~= c / N): a run with n != 50K images is
    not comparable with published numbers; at 100K a generator scores ~3.9 FD-DINOv2 lower. None: no model."""
    fm = floor_model(name, model)
    return None if fm is None else fm.shift(int(n), n_protocol)


def reference_bias(name: str, model: str) -> float | None:
    """c / M, the reference's own finite-sample bias (~0.39 FD-DINOv2 for GPIC's 1M test set): an FD-infinity
    extrapolated in the generated N only still contains it. None: no model."""
    fm = floor_model(name, model)
    return None if fm is None else fm.reference_bias


# --- user entries -------------------------------------------------------------------------------------------
def add_reference(name: str, file_or_url: str | os.PathLike, model: str | None = None, sha256: str | None = None,
                  n: int | None = None, description: str = "", split: str | None = None, format: str = "auto",
                  preprocess: PreprocessSpec | dict[str, Any] | None = None, overwrite: bool = False) -> Reference:
    """Add (or with ``overwrite`` replace) a user entry in ``{config_dir()}/references.json``; returns it.

    Args:
        file_or_url: a local statistics file (stored as an absolute path, hashed now and pinned), an
            ``https://`` URL or an ``hf://`` location (downloaded on first use).
        model: extractor the statistics belong to. Default: for a local file the extractors it records (a file
            that records none, e.g. a pytorch-fid ``.npz``, needs ``model``); for URLs ``dinov2-vitl14``.
        sha256: expected digest (recommended for URLs; computed for local files when omitted).
        n: number of images behind the statistics (default: what a local file records).
        preprocess: the :class:`PreprocessSpec` the statistics were made with, if the file does not record it.
    """
    if not _NAME_RE.fullmatch(name):
        raise UnknownReferenceError(f"invalid reference name {name!r}; use letters, digits, '.', '_', '+', '-'")
    if name in _builtin_entries():
        raise UnknownReferenceError(f"{name!r} is a built-in reference; choose another name for your entry")
    if format not in FORMATS:
        raise UnknownReferenceError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    location = str(file_or_url)
    if location.startswith("hf://"):
        HfLocation.parse(location)  # validates
    if location.startswith("hf://") or re.match(r"https?://", location):
        models = [canonical_model(model or DEFAULT_MODEL)]
    else:
        path = Path(location).expanduser().resolve()
        location = str(path)
        if not path.is_file():
            raise UnknownReferenceError(f"{path}: no such statistics file; check the path")
        sections = load_all_stats(path, features=False)  # refuses pickles and non-statistics clearly
        recorded = [s for s in sections if s != "unknown"]
        if model is None and not recorded:
            raise UnknownReferenceError(
                f"{path} does not record which extractor made it; pass --model (model=), e.g. inception-v3-pt for "
                "pytorch-fid files or dinov2-vitl14 for dgm-eval/GPIC files"
            )
        models = [canonical_model(model)] if model else recorded
        if len(models) == 1:
            # raises StatsMismatchError naming the file when it holds no statistics for the model
            sec = load_stats(path, model=models[0], features=False)
            # safetensors record N; an npz only through an "n" array (embeddings may be a subset)
            if sniff_format(path) != "npz" or sec.metadata.get("n_from") == "n":
                if n is not None and n != sec.n:
                    raise StatsMismatchError(f"{path} records N = {sec.n}, not {n}; drop --n or correct it")
                n = sec.n
        digest = sha256_file_cached(path)
        if sha256 and not digest.startswith(sha256.lower()):
            raise ChecksumError(f"{path}: sha256 {digest[:16]}... does not match the given {sha256[:16]}...; "
                                "check the file or the digest")
        sha256 = digest
    if preprocess is not None and len(models) != 1:
        raise UnknownReferenceError(f"preprocess= needs exactly one model for {name!r}; pass model= too")
    spec = preprocess.to_dict() if isinstance(preprocess, PreprocessSpec) else preprocess
    entry = {
        "description": description, "location": location, "format": format, "split": split, "n": n,
        "sha256": sha256.lower() if sha256 else None,
        "models": {m: ({"preprocess": spec} if spec else {}) for m in models}, "floors": {},
    }
    ref = Reference.from_dict(name, entry, builtin=False, where=str(user_registry_path()))
    with file_lock(user_registry_path()):
        entries = _user_entries()
        if name in entries and not overwrite:
            raise UnknownReferenceError(f"reference {name!r} already exists ({entries[name].location}); pass "
                                        "--overwrite to replace it or `fd-eval ref remove` it first")
        entries[name] = ref
        _write_user_entries(entries)
    return ref


def remove_reference(name: str) -> Reference:
    """Remove a user entry (built-in entries cannot be removed); returns the removed entry.

    Downloaded copies stay in the cache (for ``hf://`` the Hugging Face cache, ``hf cache`` manages it).
    """
    if name in _builtin_entries():
        raise UnknownReferenceError(f"{name!r} is a built-in reference and cannot be removed")
    with file_lock(user_registry_path()):
        entries = _user_entries()
        if name not in entries:
            get_reference(name)  # raises with the list of known names
        ref = entries.pop(name)
        _write_user_entries(entries)
    return ref


# Downloads and loading (imported last: they resolve names in this registry); re-exported for old callers.
from .reference_fetch import (  # noqa: E402
    _discard,  # noqa: F401
    cached_copy,  # noqa: F401
    cached_path,  # noqa: F401
    fetch_reference,  # noqa: F401
    load_reference,  # noqa: F401
)
