"""Statistics files: reading and writing :class:`~fd_eval.outputs.stats.Stats` (the type is in stats.py).

The native format is safetensors (no pickle, memory-mapped) holding one or more *sections*, one per extractor:
tensors ``{name}.mu`` (D,) float64, ``{name}.sigma`` (D, D) float64 and optionally ``{name}.features``
(N, D) float32, plus file-level extras (e.g. GPIC's ``key``/``tar_idx``); the header's ``fd_eval`` metadata
entry is JSON: ``{"format": "fd-eval-stats/1", "sections": {name: {"n": N, "extractor": ..., "preprocess":
{...}, "weights_sha256": ..., "source": {...}, "versions": {...}, "created": ...}}}``.

Also read, never unpickling anything: the official GPIC ``*_stats.npz`` (``dino_mu``, ``dino_sigma``, optional
``dino_embeddings``, ``key``, ``tar_idx``) and pytorch-fid / clean-fid / ADM ``.npz`` (``mu``, ``sigma``).

Damaged or crafted files are refused with one :class:`StatsFormatError` / :class:`InvalidStatsError` line naming
the file: metadata of the wrong JSON types, an ``n`` that is not one positive integer, and npz members whose
``.npy`` header claims more data than the zip member holds (checked before anything is allocated).
"""
from __future__ import annotations

import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from ..errors import InvalidStatsError, StatsFormatError, StatsMismatchError
from ..extractors.preprocess import PreprocessSpec
from ..util.io_utils import atomic_path, sniff_format  # noqa: F401 - re-exported: fd_eval.stats.sniff_format
from .stats import _UNKNOWN, Stats

FORMAT = "fd-eval-stats/1"
_META_KEY = "fd_eval"
# npz key prefixes of known layouts -> section name. GPIC's official files hold DINOv2 ViT-L/14 statistics
# under "dino_"; an unprefixed mu/sigma pair (pytorch-fid, clean-fid, ADM) has no recorded extractor.
_NPZ_PREFIXES = {"dino_": "dinov2-vitl14", "inception_": "inception-v3-pt", "": None}
# No npz member of a statistics file is larger (1M x 1024 float32 embeddings are 4 GiB); a header claiming more is
# refused before anything is allocated.
MAX_NPZ_MEMBER_BYTES = 1 << 36
# The widest feature dimension a statistics file may have (known extractors: at most 2048): mu/sigma/feature arrays
# are refused from their headers above it, before anything is allocated (a 4096-d sigma is 128 MiB of float64).
# $FD_EVAL_MAX_STATS_DIM raises it for a wider custom extractor.
DEFAULT_MAX_STATS_DIM = 4096
# The image count n of a statistics file, in either format: a positive whole number (an integral float such as 8.0
# counts) up to 2**53, beyond which a float64 cannot hold every integer and no image set is that large.
MAX_N = 1 << 53
# Deflate cannot expand more than ~1032:1, so a compressed member claiming more is damaged or crafted.
_DEFLATE_MAX_RATIO = 1032
# Float dtypes a covariance may have been stored in (the FD's rank threshold depends on it, see frechet._factor).
_STORAGE_DTYPES = ("float16", "float32", "float64")


# Called on each Stats saved with its feature rows, before it is written: a metric that stores something with a
# reference (CMMD's self-term) registers here, so this file layer never imports the metrics above it.
_SAVE_HOOKS: list[Callable[[Stats], Any]] = []


def register_save_hook(hook: Callable[[Stats], Any]) -> Callable[[Stats], Any]:
    """Run ``hook(stats)`` on each :class:`Stats` that :func:`save_stats` writes with feature rows (it may add to
    ``stats.metadata``). Registered once per function; returns it (usable as a decorator)."""
    if hook not in _SAVE_HOOKS:
        _SAVE_HOOKS.append(hook)
    return hook


# --- writing ------------------------------------------------------------------------------------------
def save_stats(path: str | os.PathLike, stats: Iterable[Stats] | Mapping[str, Stats],
               include_features: bool = True) -> Path:
    """Write several statistics (one section per extractor) to one safetensors file, atomically.

    Sections saved with feature rows first go through every :func:`register_save_hook` hook: CMMD's
    (:func:`fd_eval.metrics.cmmd.annotate_reference`) stores the reference self-term of CLIP sections in metadata
    ``cmmd`` (N² kernel evaluations, once per file)."""
    from safetensors.numpy import save_file

    items = list(stats.values()) if isinstance(stats, Mapping) else list(stats)
    if include_features:
        for s in items:
            for hook in _SAVE_HOOKS:
                hook(s)
    tensors: dict[str, np.ndarray] = {}
    sections: dict[str, Any] = {}
    string_extras: set[str] = set()
    for s in items:
        s.validate()
        if s.name in sections:
            raise StatsFormatError(f"{path}: two statistics named {s.name!r}; one file holds one per extractor")
        sections[s.name] = {**s.metadata, "n": s.n}
        if s.storage_dtype in ("float16", "float32"):  # sigma is written as float64; remember its precision
            sections[s.name]["storage_dtype"] = s.storage_dtype
        tensors[f"{s.name}.mu"] = np.ascontiguousarray(s.mu, dtype=np.float64)
        tensors[f"{s.name}.sigma"] = np.ascontiguousarray(s.sigma, dtype=np.float64)
        if include_features and s.features is not None:
            tensors[f"{s.name}.features"] = np.ascontiguousarray(s.features, dtype=np.float32)
        for k, v in s.extras.items():
            v = np.asarray(v)
            if v.dtype.kind in "US":  # safetensors has no string dtype: store UTF-8 bytes, (N, L) uint8
                string_extras.add(k)
                v = _encode_strings(v)
            tensors.setdefault(f"extras.{k}", np.ascontiguousarray(v))
    header = {"format": FORMAT, "sections": sections, "string_extras": sorted(string_extras)}
    path = Path(path)
    try:
        text = json.dumps(header, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise StatsFormatError(f"{path}: metadata is not JSON-able ({e}); nothing was written") from e
    # an OSError (disk full, read-only folder) becomes one OutputError line naming the path; no partial file
    with atomic_path(path, what="statistics file") as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: text})
    return path


# --- reading ------------------------------------------------------------------------------------------
def load_all_stats(path: str | os.PathLike, features: bool = True) -> dict[str, Stats]:
    """Every section of a statistics file, by name. Never unpickles.

    ``features=False`` skips stored feature rows (1M x 1024 float32 is 4 GB) when only mu/sigma are needed.
    """
    path = Path(path)
    if not path.is_file():
        raise StatsFormatError(f"{path}: no such statistics file")
    fmt = sniff_format(path)
    if fmt == "safetensors":
        return _load_safetensors(path, features)
    if fmt == "npz":
        return _load_npz(path, features)
    if fmt == "pickle":
        raise StatsFormatError(
            f"{path}: is a pickle (e.g. a torch .pt or EDM2 .pkl); fd-eval never unpickles files. Convert it to "
            "an .npz with mu/sigma arrays or rebuild it with `fd-eval stats`"
        )
    if fmt == "npy":
        raise StatsFormatError(f"{path}: is a single .npy array, not statistics; expected .safetensors or .npz")
    raise StatsFormatError(f"{path}: unknown statistics format; expected fd-eval .safetensors or an .npz with mu/sigma")


def load_stats(path: str | os.PathLike, model: str | None = None, features: bool = True) -> Stats:
    """One section of a statistics file; ``model`` selects it when there are several."""
    sections = load_all_stats(path, features=features)
    if model is not None:
        if model in sections:
            return sections[model]
        if len(sections) == 1 and _UNKNOWN in sections:
            return sections[_UNKNOWN]  # the file does not say which extractor made it
        dino = sections.get(_NPZ_PREFIXES["dino_"])
        if (dino is not None and model.startswith("dinov2-")
                and dino.metadata.get("source_format", "").startswith("npz")):
            # GPIC-layout npz: "dino_" holds DINOv2 statistics; which size is the caller's (registry's) word.
            dino.metadata["extractor"] = model
            return dino
        raise StatsMismatchError(
            f"{path}: holds statistics for {sorted(sections)}, not {model!r}; build them with "
            f"`fd-eval stats SOURCE -o FILE --model {model}`"
        )
    if len(sections) != 1:
        raise StatsFormatError(f"{path}: holds statistics for {sorted(sections)}; choose one with model=/--model")
    return next(iter(sections.values()))


def _load_safetensors(path: Path, features: bool = True) -> dict[str, Stats]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            keys = [k for k in f.keys() if features or not k.endswith(".features")]
            for k in keys:  # from the header, before any array is read
                _check_dims(path, k, tuple(f.get_slice(k).get_shape()))
            arrays = {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, ValueError) as e:
        raise StatsFormatError(f"{path}: corrupt or truncated safetensors file ({e}); download or rebuild it") from e
    header = _parse_metadata(path, meta)
    sections = header["sections"]
    extras = {k[len("extras."):]: v for k, v in arrays.items() if k.startswith("extras.")}
    for k in header.get("string_extras", []):
        if k in extras:
            try:
                extras[k] = _decode_strings(extras[k])
            except (UnicodeDecodeError, TypeError, ValueError) as e:
                raise StatsFormatError(f"{path}: string extra {k!r} is not UTF-8 text rows ({e}); the file is "
                                       "damaged") from e
    out = {}
    for name, smeta in sections.items():
        try:
            mu, sigma = arrays[f"{name}.mu"], arrays[f"{name}.sigma"]
        except KeyError as e:
            raise StatsFormatError(f"{path}: section {name!r} lacks tensor {e.args[0]!r}; the file is damaged") from e
        for key in (f"{name}.mu", f"{name}.sigma", f"{name}.features"):
            if key in arrays:
                _check_numeric(path, key, arrays[key])
        smeta = dict(smeta)
        n = valid_n(smeta.pop("n"))
        storage = smeta.pop("storage_dtype", None)
        out[name] = Stats(mu, sigma, n, smeta, features=arrays.get(f"{name}.features"), extras=dict(extras),
                          origin=str(path), storage_dtype=storage or sigma.dtype.name)
    return out


def _parse_metadata(path: Path, meta: Mapping[str, str]) -> dict[str, Any]:
    """The ``fd_eval`` header entry, with every field the loader and :func:`check_compatible` use type-checked."""

    def bad(what: str) -> StatsFormatError:
        return StatsFormatError(f"{path}: fd-eval metadata {what}; the file is damaged, rebuild it with "
                                "`fd-eval stats`")

    try:
        header = json.loads(meta[_META_KEY])
        if not isinstance(header, dict) or not str(header.get("format", "")).startswith("fd-eval-stats/"):
            raise KeyError("format")
    except (KeyError, TypeError, ValueError) as e:
        raise StatsFormatError(
            f"{path}: safetensors file without fd-eval statistics metadata (a weights file?); expected a file "
            "written by `fd-eval stats`"
        ) from e
    sections = header.get("sections")
    if not isinstance(sections, dict) or not sections:
        raise bad(f"'sections' is {type(sections).__name__}, expected a non-empty object {{name: {{...}}}}")
    extras = header.get("string_extras", [])
    if not isinstance(extras, list) or not all(isinstance(k, str) for k in extras):
        raise bad("'string_extras' must be a list of names")
    for name, sec in sections.items():
        if not isinstance(sec, dict):
            raise bad(f"section {name!r} is {type(sec).__name__}, expected an object")
        n = sec.get("n")
        if valid_n(n) is None:
            raise bad(f"section {name!r} has n = {n!r}, expected a whole number from 1 to 2**53")
        for key in ("extractor", "weights_sha256", "created"):
            if sec.get(key) is not None and not isinstance(sec[key], str):
                raise bad(f"section {name!r}: {key!r} must be a string, got {type(sec[key]).__name__}")
        if sec.get("storage_dtype") is not None and sec["storage_dtype"] not in _STORAGE_DTYPES:
            raise bad(f"section {name!r}: storage_dtype {sec['storage_dtype']!r} is not one of {_STORAGE_DTYPES}")
        for key in ("source", "versions", "precision"):
            if sec.get(key) is not None and not isinstance(sec[key], dict):
                raise bad(f"section {name!r}: {key!r} must be an object, got {type(sec[key]).__name__}")
        spec = sec.get("preprocess")
        if spec is not None:
            if not isinstance(spec, dict):
                raise bad(f"section {name!r}: 'preprocess' must be an object, got {type(spec).__name__}")
            try:
                PreprocessSpec.from_dict(spec)
            except (TypeError, ValueError) as e:
                raise bad(f"section {name!r}: 'preprocess' is not a preprocessing spec ({e})") from e
    return header


def npz_members(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every ``.npy`` member of an npz, from the headers alone, checked against the zip directory.

    A header must describe exactly the bytes its member holds (uncompressed size in the zip directory), a deflated
    member cannot claim more than deflate can expand, and no member may exceed :data:`MAX_NPZ_MEMBER_BYTES`: so a
    crafted 588-byte file claiming a 100000 x 100000 sigma is refused before anything is allocated.

    Raises:
        StatsFormatError: corrupt zip, unreadable header, object (pickled) arrays, or a size that does not add up.
    """
    path = Path(path)
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                key = info.filename[:-4]
                where = f"{path}: array {key!r}"
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise StatsFormatError(f"{where} uses zip compression method {info.compress_type}; save it "
                                           "with np.savez or np.savez_compressed")
                if info.file_size > MAX_NPZ_MEMBER_BYTES or (
                        info.compress_type == zipfile.ZIP_DEFLATED
                        and info.file_size > _DEFLATE_MAX_RATIO * info.compress_size + 4096):
                    raise StatsFormatError(f"{where} claims {info.file_size} bytes uncompressed from "
                                           f"{info.compress_size} stored; the file is damaged or crafted")
                with zf.open(info) as f:
                    try:
                        version = np.lib.format.read_magic(f)
                        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                else np.lib.format.read_array_header_2_0)
                        shape, _, dtype = read(f)
                    except (ValueError, TypeError, SyntaxError, EOFError) as e:
                        raise StatsFormatError(f"{where} has no valid .npy header ({e}); the file is damaged") from e
                    header_len = f.tell()
                if dtype.hasobject:
                    raise StatsFormatError(f"{where} holds pickled Python objects; fd-eval never unpickles. Save it "
                                           "as a plain numeric/string array")
                _check_dims(path, key, tuple(shape))
                nbytes = math.prod(int(d) for d in shape) * dtype.itemsize
                if header_len + nbytes != info.file_size:
                    raise StatsFormatError(f"{where}: its header claims shape {tuple(shape)} {dtype} ({nbytes} bytes) "
                                           f"but the member holds {info.file_size - header_len} bytes; the file is "
                                           "damaged or crafted")
                out[key] = (tuple(int(d) for d in shape), dtype)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError) as e:
        raise StatsFormatError(f"{path}: corrupt zip/npz file ({type(e).__name__}: {e}); download or rebuild it") from e
    return out


def valid_n(v: Any) -> int | None:
    """The image count ``n`` under the one rule of both formats (safetensors metadata, npz arrays): an int, or a
    float holding a whole number (8.0), from 1 to :data:`MAX_N`; None for anything else (bool, NaN, 2.5, 1e30)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, float) and not (math.isfinite(v) and v.is_integer()):
        return None
    return int(v) if 1 <= v <= MAX_N else None


def max_stats_dim() -> int:
    """The feature-dimension limit of statistics files: ``$FD_EVAL_MAX_STATS_DIM`` or :data:`DEFAULT_MAX_STATS_DIM`
    (0: no limit)."""
    from ..sources.base import env_int

    v = env_int("FD_EVAL_MAX_STATS_DIM")
    return DEFAULT_MAX_STATS_DIM if v is None else (v or 1 << 62)


def _check_dims(path: Path, key: str, shape: tuple[int, ...]) -> None:
    """Refuse, from a header's shape, a statistics array wider than :func:`max_stats_dim` (mu: (D,), sigma: (D, D),
    features/embeddings: (N, D))."""
    name = key.rsplit(".", 1)[-1].rsplit("_", 1)[-1]
    dims = shape if name in ("mu", "sigma") else shape[1:] if name in ("features", "embeddings") else ()
    cap = max_stats_dim()
    if any(int(d) > cap for d in dims):
        raise StatsFormatError(f"{path}: array {key!r} has shape {tuple(shape)}: a feature dimension above the limit "
                               f"of {cap}; the file is damaged or crafted (for a wider extractor set "
                               "FD_EVAL_MAX_STATS_DIM=N, 0 = no limit)")


def _npz_n(path: Path, key: str, a: np.ndarray) -> int:
    """The image count stored as an npz array: exactly one number obeying :func:`valid_n`."""
    v = a.reshape(-1)[0].item() if a.size == 1 and a.ndim <= 1 and a.dtype.kind in "iuf" else None
    n = valid_n(v)
    if n is None:
        got = f"shape {a.shape} {a.dtype}" if v is None else repr(v)
        raise StatsFormatError(f"{path}: array {key!r} must hold the number of images as one whole number from 1 to "
                               f"2**53, got {got}; fix or remove it")
    return n


def _load_npz(path: Path, features: bool = True) -> dict[str, Stats]:
    members = npz_members(path)  # refuses headers that do not match their members before np.load allocates
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile as e:
        raise StatsFormatError(f"{path}: corrupt zip/npz file ({e}); download or rebuild it") from e
    if any(n.endswith(".pkl") or n.endswith("data.pkl") for n in names):
        raise StatsFormatError(f"{path}: is a zipped pickle (torch checkpoint); fd-eval never unpickles files")
    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise StatsFormatError(f"{path}: not a readable .npz ({e})") from e
    with npz:
        keys = set(npz.files) & set(members)

        def get(key: str) -> np.ndarray:
            try:
                return npz[key]
            except ValueError as e:
                if "allow_pickle" in str(e) or "Object arrays" in str(e):
                    raise StatsFormatError(
                        f"{path}: array {key!r} holds pickled Python objects; fd-eval never unpickles. Save it "
                        "as a plain numeric/string array"
                    ) from e
                raise StatsFormatError(f"{path}: array {key!r} is damaged ({e}); download or rebuild the file") from e
            except (zipfile.BadZipFile, OSError, EOFError) as e:  # bad CRC, truncated member
                raise StatsFormatError(f"{path}: array {key!r} is corrupt ({e}); download or rebuild the file") from e

        def rows(key: str) -> int:
            """Leading dimension of a member, from its .npy header only (no 4 GB read for 1M embeddings)."""
            shape = members[key][0]
            if len(shape) != 2:
                raise InvalidStatsError(f"{path}: array {key!r} has shape {shape}, expected (N, D)")
            return int(shape[0])

        out: dict[str, Stats] = {}
        for prefix, name in _NPZ_PREFIXES.items():
            if f"{prefix}mu" in keys and f"{prefix}sigma" in keys:
                meta: dict[str, Any] = {"source_format": f"npz ({prefix}mu/{prefix}sigma)"}
                if name:
                    meta["extractor"] = name
                has_feats = f"{prefix}embeddings" in keys
                feats = get(f"{prefix}embeddings") if (has_feats and features) else None
                if feats is not None:
                    _check_numeric(path, f"{prefix}embeddings", feats)
                mu, sigma = get(f"{prefix}mu"), get(f"{prefix}sigma")
                _check_numeric(path, f"{prefix}mu", mu)
                _check_numeric(path, f"{prefix}sigma", sigma)
                if "n" in keys or f"{prefix}n" in keys:
                    n_key = f"{prefix}n" if f"{prefix}n" in keys else "n"
                    n = _npz_n(path, n_key, get(n_key))
                    meta["n_from"] = "n"
                elif has_feats:  # N of the embeddings; a registry entry may know the N of mu/sigma better
                    n = int(feats.shape[0]) if feats is not None and feats.ndim == 2 else rows(f"{prefix}embeddings")
                    meta["n_from"] = "embeddings"
                else:
                    n = 0  # unrecorded; set below
                extras = {k: get(k) for k in ("key", "tar_idx") if k in keys}
                if n == 0:
                    meta["n_unknown"] = True
                    n = 1
                out[name or _UNKNOWN] = Stats(mu, sigma, n, meta, features=feats, extras=extras, origin=str(path))
        if not out:
            raise StatsFormatError(
                f"{path}: .npz without statistics keys (found {sorted(keys)[:8]}); expected mu/sigma "
                "(pytorch-fid, clean-fid, ADM) or dino_mu/dino_sigma (GPIC)"
            )
        return out


def _encode_strings(a: np.ndarray) -> np.ndarray:
    enc = [str(x).encode("utf-8") for x in a.ravel()]
    width = max((len(e) for e in enc), default=0)
    out = np.zeros((len(enc), max(width, 1)), dtype=np.uint8)
    for i, e in enumerate(enc):
        out[i, :len(e)] = np.frombuffer(e, dtype=np.uint8)
    return out


def _decode_strings(a: np.ndarray) -> np.ndarray:
    return np.array([bytes(row).rstrip(b"\0").decode("utf-8") for row in a])


def _check_numeric(path: Path, key: str, a: np.ndarray) -> None:
    if a.dtype.kind not in "fiu":  # bool, complex, strings, bytes, datetimes are not statistics
        raise InvalidStatsError(f"{path}: array {key!r} has dtype {a.dtype}, expected float")


