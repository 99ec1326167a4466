"""Statistics files: float64 mean/covariance of features, with the metadata needed to trust them.

The native format is safetensors (no pickle, memory-mapped) holding one or more *sections*, one per extractor:
tensors ``{name}.mu`` (D,) float64, ``{name}.sigma`` (D, D) float64 and optionally ``{name}.features``
(N, D) float32, plus file-level extras (e.g. GPIC's ``key``/``tar_idx``); the header's ``fd_eval`` metadata
entry is JSON: ``{"format": "fd-eval-stats/1", "sections": {name: {"n": N, "extractor": ..., "preprocess":
{...}, "weights_sha256": ..., "source": {...}, "versions": {...}, "created": ...}}}``.

Also read, never unpickling anything: the official GPIC ``*_stats.npz`` (``dino_mu``, ``dino_sigma``, optional
``dino_embeddings``, ``key``, ``tar_idx``) and pytorch-fid / clean-fid / ADM ``.npz`` (``mu``, ``sigma``).
"""
from __future__ import annotations

import json
import os
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from .errors import InvalidStatsError, StatsFormatError, StatsMismatchError
from .frechet import FDResult, frechet_distance_breakdown
from .io_utils import atomic_path
from .preprocess import PreprocessSpec

FORMAT = "fd-eval-stats/1"
_META_KEY = "fd_eval"
# npz key prefixes of known layouts -> section name. GPIC's official files hold DINOv2 ViT-L/14 statistics
# under "dino_"; an unprefixed mu/sigma pair (pytorch-fid, clean-fid, ADM) has no recorded extractor.
_NPZ_PREFIXES = {"dino_": "dinov2-vitl14", "inception_": "inception-v3-pt", "": None}
_UNKNOWN = "unknown"
# Metadata fields that must agree before two statistics are compared; "reference" in the spec is a label.
_IGNORED_SPEC_FIELDS = {"reference"}


@dataclass
class Stats:
    """Feature statistics of one image set under one extractor.

    Attributes:
        mu: (D,) float64 mean.
        sigma: (D, D) float64 unbiased covariance (N - 1 denominator).
        n: number of images N.
        metadata: JSON-able provenance: ``extractor``, ``weights_sha256``, ``preprocess`` (a
            :class:`PreprocessSpec` dict), ``source``, ``versions``, ``created``.
        features: optional (N, D) float32 feature rows (for PRDC, MMD, bootstrap).
        extras: optional named arrays carried along (GPIC's ``key``, ``tar_idx``).
        origin: where it was loaded from, for error messages.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    metadata: dict[str, Any] = field(default_factory=dict)
    features: np.ndarray | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    origin: str = "<memory>"

    def __post_init__(self) -> None:
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        self.n = int(self.n)
        self.validate()

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def from_features(cls, features: np.ndarray | torch.Tensor, metadata: dict[str, Any] | None = None,
                      keep_features: bool = False) -> "Stats":
        """Mean and ``np.cov`` (float64, N - 1) of (N, D) feature rows."""
        x = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
        if x.ndim != 2 or x.shape[0] < 2:
            raise InvalidStatsError(f"features must be (N >= 2, D), got shape {x.shape}")
        x64 = x.astype(np.float64)
        return cls(x64.mean(axis=0), np.cov(x64, rowvar=False), x.shape[0], dict(metadata or {}),
                   features=x.astype(np.float32) if keep_features else None)

    @classmethod
    def from_accumulator(cls, acc: Any, metadata: dict[str, Any] | None = None) -> "Stats":
        """From a :class:`fd_eval.moments.MomentAccumulator` (copies to host)."""
        feats = acc.features()
        return cls(acc.mean.cpu().numpy(), acc.covariance().cpu().numpy(), acc.n, dict(metadata or {}),
                   features=None if feats is None else feats.cpu().numpy())

    # --- identity -------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @property
    def name(self) -> str:
        """Section name: the extractor name, or "unknown" for files that do not record it."""
        return self.metadata.get("extractor") or _UNKNOWN

    @property
    def preprocess(self) -> PreprocessSpec | None:
        spec = self.metadata.get("preprocess")
        return PreprocessSpec.from_dict(spec) if spec else None

    def validate(self) -> None:
        """Raise :class:`InvalidStatsError` on bad shapes, NaN/Inf or a feature count mismatch."""
        where = self.origin
        if self.mu.ndim != 1:
            raise InvalidStatsError(f"{where}: mu must have shape (D,), got {self.mu.shape}")
        d = self.mu.shape[0]
        if self.sigma.shape != (d, d):
            raise InvalidStatsError(f"{where}: sigma has shape {self.sigma.shape}, expected ({d}, {d}) to match mu")
        if not (np.isfinite(self.mu).all() and np.isfinite(self.sigma).all()):
            raise InvalidStatsError(f"{where}: mu or sigma contains NaN or Inf; rebuild the statistics file")
        if self.n < 1:
            raise InvalidStatsError(f"{where}: n = {self.n}; statistics need at least one image")
        if self.features is not None:
            if self.features.ndim != 2 or self.features.shape[1] != d:
                raise InvalidStatsError(f"{where}: features have shape {self.features.shape}, expected (N, {d})")

    # --- files ------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, include_features: bool = True) -> Path:
        """Write a single-section safetensors file atomically; returns the path."""
        return save_stats(path, [self], include_features=include_features)

    @classmethod
    def load(cls, path: str | os.PathLike, model: str | None = None) -> "Stats":
        """Read one section (``model`` selects it when the file holds several)."""
        return load_stats(path, model=model)


# --- writing ------------------------------------------------------------------------------------------
def save_stats(path: str | os.PathLike, stats: Iterable[Stats] | Mapping[str, Stats],
               include_features: bool = True) -> Path:
    """Write several statistics (one section per extractor) to one safetensors file, atomically."""
    from safetensors.numpy import save_file

    items = list(stats.values()) if isinstance(stats, Mapping) else list(stats)
    tensors: dict[str, np.ndarray] = {}
    sections: dict[str, Any] = {}
    string_extras: set[str] = set()
    for s in items:
        s.validate()
        if s.name in sections:
            raise StatsFormatError(f"{path}: two statistics named {s.name!r}; one file holds one per extractor")
        sections[s.name] = {**s.metadata, "n": s.n}
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
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(header, sort_keys=True)})
    return path


# --- reading ------------------------------------------------------------------------------------------
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
        if dino is not None and model.startswith("dinov2-") and dino.metadata.get("source_format", "").startswith("npz"):
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
            arrays = {k: f.get_tensor(k) for k in f.keys() if features or not k.endswith(".features")}
    except (SafetensorError, OSError, ValueError) as e:
        raise StatsFormatError(f"{path}: corrupt or truncated safetensors file ({e}); download or rebuild it") from e
    try:
        header = json.loads(meta[_META_KEY])
        sections = header["sections"]
        if not str(header.get("format", "")).startswith("fd-eval-stats/"):
            raise KeyError("format")
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise StatsFormatError(
            f"{path}: safetensors file without fd-eval statistics metadata (a weights file?); expected a file "
            "written by `fd-eval stats`"
        ) from e
    extras = {k[len("extras."):]: v for k, v in arrays.items() if k.startswith("extras.")}
    for k in header.get("string_extras", []):
        if k in extras:
            extras[k] = _decode_strings(extras[k])
    out = {}
    for name, smeta in sections.items():
        try:
            mu, sigma = arrays[f"{name}.mu"], arrays[f"{name}.sigma"]
        except KeyError as e:
            raise StatsFormatError(f"{path}: section {name!r} lacks tensor {e.args[0]!r}; the file is damaged") from e
        smeta = dict(smeta)
        n = smeta.pop("n", None)
        if not isinstance(n, int):
            raise StatsFormatError(f"{path}: section {name!r} has no integer 'n'; the file is damaged")
        out[name] = Stats(mu, sigma, n, smeta, features=arrays.get(f"{name}.features"), extras=dict(extras),
                          origin=str(path))
    return out


def _load_npz(path: Path, features: bool = True) -> dict[str, Stats]:
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
        keys = set(npz.files)

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
            try:
                with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as f:
                    major, _ = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if major == 1
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, _ = read_header(f)
                return int(shape[0])
            except (zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as e:
                raise StatsFormatError(f"{path}: array {key!r} is corrupt ({e}); download or rebuild the file") from e

        out: dict[str, Stats] = {}
        for prefix, name in _NPZ_PREFIXES.items():
            if f"{prefix}mu" in keys and f"{prefix}sigma" in keys:
                meta: dict[str, Any] = {"source_format": f"npz ({prefix}mu/{prefix}sigma)"}
                if name:
                    meta["extractor"] = name
                has_feats = f"{prefix}embeddings" in keys
                feats = get(f"{prefix}embeddings") if (has_feats and features) else None
                mu, sigma = get(f"{prefix}mu"), get(f"{prefix}sigma")
                if "n" in keys or f"{prefix}n" in keys:
                    n = int(get(f"{prefix}n" if f"{prefix}n" in keys else "n"))
                    meta["n_from"] = "n"
                elif has_feats:  # N of the embeddings; a registry entry may know the N of mu/sigma better
                    n = int(feats.shape[0]) if feats is not None else rows(f"{prefix}embeddings")
                    meta["n_from"] = "embeddings"
                else:
                    n = 0  # unrecorded; set below
                extras = {k: get(k) for k in ("key", "tar_idx") if k in keys}
                _check_numeric(path, f"{prefix}mu", mu)
                _check_numeric(path, f"{prefix}sigma", sigma)
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
    if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.integer):
        raise InvalidStatsError(f"{path}: array {key!r} has dtype {a.dtype}, expected float")


# --- comparing ------------------------------------------------------------------------------------------
def check_compatible(a: Stats, b: Stats, allow_mismatch: bool = False) -> list[str]:
    """Refuse to compare statistics made differently; return warnings for what cannot be checked.

    Raises:
        StatsMismatchError: different dimension (always), or different extractor, weights or preprocessing
            (unless ``allow_mismatch``).
    """
    if a.dim != b.dim:
        raise StatsMismatchError(
            f"{a.origin} has {a.dim}-d features but {b.origin} has {b.dim}-d; they come from different extractors"
        )
    problems, warnings = [], []
    ea, eb = a.metadata.get("extractor"), b.metadata.get("extractor")
    if ea and eb and ea != eb:
        problems.append(f"extractor: {ea!r} != {eb!r}")
    wa, wb = a.metadata.get("weights_sha256"), b.metadata.get("weights_sha256")
    if wa and wb and wa != wb:
        problems.append(f"weights sha256: {wa[:12]} != {wb[:12]}")
    pa, pb = a.metadata.get("preprocess"), b.metadata.get("preprocess")
    if pa and pb:
        da = {k: v for k, v in pa.items() if k not in _IGNORED_SPEC_FIELDS}
        db = {k: v for k, v in pb.items() if k not in _IGNORED_SPEC_FIELDS}
        if da.get("model_dtype", "float32") != db.get("model_dtype", "float32"):
            problems.append(_precision_problem(a, b))
        problems += [f"preprocess {k}: {da.get(k)!r} != {db.get(k)!r}"
                     for k in sorted(set(da) | set(db)) if k != "model_dtype" and da.get(k) != db.get(k)]
    else:
        # Statistics that do not record their preprocessing (pytorch-fid/clean-fid/GPIC npz files) were made in
        # float32 by every tool that writes them: fast-mode statistics are not comparable with them either.
        from .precision import mode_of

        for s, other in ((a, b), (b, a)):
            if mode_of(s.metadata) == "fast" and not other.metadata.get("preprocess"):
                problems.append(f"precision: {s.origin} was computed with --precision fast but "
                                f"{other.origin} does not record its precision (such files are float32); use "
                                "--precision exact")
    for s in (a, b):
        missing = [k for k in ("extractor", "preprocess") if not s.metadata.get(k)]
        if missing:
            warnings.append(f"{s.origin} does not record its {' and '.join(missing)}; assuming it matches")
    if problems and not allow_mismatch:
        raise StatsMismatchError(
            f"{a.origin} and {b.origin} were made differently ({'; '.join(problems)}); rebuild one with the "
            "other's settings, or pass --allow-mismatch / allow_mismatch=True to compare anyway"
        )
    return warnings + [f"compared despite a mismatch: {p}" for p in problems]


def _precision_problem(a: Stats, b: Stats) -> str:
    """The mismatch line for statistics computed in different precision modes (see fd_eval.precision)."""
    from .precision import expected_difference, mode_of

    ma, mb = mode_of(a.metadata), mode_of(b.metadata)
    fast = a if ma == "fast" else b
    exp = expected_difference("fast", fast.name).get("fd_rel_mixed_max")
    size = f" (measured up to {100 * exp:.2g}% with random weights; trained weights may differ)" if exp else ""
    return (f"precision: {a.origin} is {ma} ({(a.preprocess.model_dtype if a.preprocess else '?')}), {b.origin} is "
            f"{mb} ({(b.preprocess.model_dtype if b.preprocess else '?')}); mixing --precision fast with exact "
            f"statistics shifts FD{size}: use --precision exact for the protocol's numbers")


def compare_stats(a: Stats, b: Stats, allow_mismatch: bool = False,
                  device: str | torch.device | None = None) -> tuple[FDResult, list[str]]:
    """FD between two statistics after :func:`check_compatible`; returns (result, warnings)."""
    warnings = check_compatible(a, b, allow_mismatch=allow_mismatch)
    try:
        res = frechet_distance_breakdown(a.mu, a.sigma, b.mu, b.sigma, device=device)
    except InvalidStatsError as e:
        raise InvalidStatsError(f"{a.origin} vs {b.origin}: {e}") from e
    return res, warnings
