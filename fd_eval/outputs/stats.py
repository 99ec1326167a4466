"""The :class:`Stats` type: float64 mean/covariance of features with the metadata needed to trust them, and the
checks that two of them may be compared (:func:`check_compatible`, :func:`compare_stats`).

Reading and writing statistics files (safetensors, GPIC/pytorch-fid/clean-fid ``.npz``) is
:mod:`fd_eval.outputs.stats_files`; its names (``load_stats``, ``save_stats``, ``load_all_stats``,
``sniff_format``, ...) are re-exported here, so ``fd_eval.stats.load_stats`` keeps working.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from ..core.frechet import FDResult, frechet_distance_breakdown
from ..errors import InvalidStatsError, StatsMismatchError
from ..extractors.preprocess import DECODE_PIL_RGB, PreprocessSpec
from ..run.provenance import environment
from ..sources import ImageSource, InputAccounting

if TYPE_CHECKING:
    from ..extractors import Extractor
    from ..run.pipeline import Extraction

_UNKNOWN = "unknown"
# Metadata fields that must agree before two statistics are compared; "reference" in the spec is a label.
_IGNORED_SPEC_FIELDS = {"reference"}
# Relative per-dimension variance below which features are considered constant (broken or wrong weights).
NEAR_ZERO_VARIANCE = 1e-10



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
        storage_dtype: the float dtype sigma was stored in before the float64 cast ("float32" for most npz files;
            default: sigma's dtype as given). The FD treats eigenvalues below that dtype's rounding as zero
            (:func:`compare_stats` passes it on), which keeps the reported rank right for float32 files.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    metadata: dict[str, Any] = field(default_factory=dict)
    features: np.ndarray | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    origin: str = "<memory>"
    storage_dtype: str | None = None

    def __post_init__(self) -> None:
        self.storage_dtype = _float_dtype_name(self.storage_dtype or getattr(self.sigma, "dtype", None), self.origin)
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        self.n = int(self.n)
        self.validate()

    def sigma_as_stored(self) -> np.ndarray:
        """sigma in :attr:`storage_dtype` (exact: the float64 copy was cast from it); pass this to
        :func:`fd_eval.frechet_distance_breakdown` so its rank threshold sees the storage precision."""
        return self.sigma if self.storage_dtype == "float64" else self.sigma.astype(self.storage_dtype)

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
        """From a :class:`fd_eval.core.moments.MomentAccumulator` (copies to host)."""
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


def _float_dtype_name(dtype: Any, origin: str) -> str:
    """numpy name of a float dtype (numpy, torch or a name); integer or unknown input counts as float64."""
    name = str(dtype).replace("torch.", "") if dtype is not None else "float64"
    if name == "bfloat16":
        return "float16"  # numpy has no bfloat16; float16 is the nearest coarse precision
    try:
        dt = np.dtype(name)
    except TypeError:
        raise InvalidStatsError(f"{origin}: storage dtype {name!r} is not a float dtype") from None
    return dt.name if dt.kind == "f" else "float64"


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
        from ..extractors.precision import is_exact, mode_of

        for s, other in ((a, b), (b, a)):
            if not is_exact(s.metadata) and not other.metadata.get("preprocess"):
                problems.append(f"precision: {s.origin} was computed with --precision {mode_of(s.metadata)} but "
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
    """The mismatch line for statistics computed in different precision modes (see fd_eval.extractors.precision)."""
    from ..extractors.precision import expected_difference, is_exact, mode_of

    ma, mb = mode_of(a.metadata), mode_of(b.metadata)
    reduced, mode = (a, ma) if not is_exact(a.metadata) else (b, mb)
    exp = expected_difference(mode, reduced.name).get("fd_rel_mixed_max")
    size = f" (measured up to {100 * exp:.2g}% with random weights; trained weights may differ)" if exp else ""
    return (f"precision: {a.origin} is {ma} ({(a.preprocess.model_dtype if a.preprocess else '?')}), {b.origin} is "
            f"{mb} ({(b.preprocess.model_dtype if b.preprocess else '?')}); mixing --precision {mode} with exact "
            f"statistics shifts FD{size}: use --precision exact for the protocol's numbers")


def compare_stats(a: Stats, b: Stats, allow_mismatch: bool = False,
                  device: str | torch.device | None = None) -> tuple[FDResult, list[str]]:
    """FD between two statistics after :func:`check_compatible`; returns (result, warnings).

    Each sigma is passed in its :attr:`Stats.storage_dtype`, so eigenvalues below float32 rounding of a float32
    file are treated as zero (the reported rank is right). Statistics of (near-)constant features, as broken or
    wrong weights give, add a warning: their FD is ~0 or only the mean term, and says nothing about images.
    """
    warnings = check_compatible(a, b, allow_mismatch=allow_mismatch)
    warnings += [w for w in (near_constant_warning(s) for s in (a, b)) if w]
    warnings += [w for w in (coarse_storage_warning(s) for s in (a, b)) if w]
    try:
        res = frechet_distance_breakdown(a.mu, a.sigma_as_stored(), b.mu, b.sigma_as_stored(), device=device)
    except InvalidStatsError as e:
        raise InvalidStatsError(f"{a.origin} vs {b.origin}: {e}") from e
    return res, warnings


def coarse_storage_warning(s: Stats) -> str | None:
    """A warning for a sigma stored as float16 (either format; bfloat16 counts): about 3 significant digits, so FD
    can move in its second decimal. Such files are used (the rank threshold follows the storage precision), never
    silently."""
    if s.storage_dtype != "float16":
        return None
    return (f"{s.origin}: sigma is stored as float16 (about 3 significant digits); FD from it can differ from a "
            "float32/float64 file in the second decimal: re-save the statistics as float32 or float64")


def near_constant_warning(s: Stats, rel: float = NEAR_ZERO_VARIANCE) -> str | None:
    """A warning when the features barely vary: mean per-dimension variance <= ``rel`` x the mean squared feature
    value (or exactly zero), else None. Typical features vary by ~1e-2 to 1 of their magnitude."""
    var = float(np.trace(s.sigma)) / s.dim
    scale = float(s.mu @ s.mu) / s.dim + max(var, 0.0)
    if var > rel * scale and var > 0:
        return None
    return (f"{s.origin}: the features are (nearly) constant (mean variance per dimension {var:.3g} vs mean square "
            f"{scale:.3g}); the extractor's weights are probably broken or wrong, so this FD is meaningless")


# --- from a finished pass -------------------------------------------------------------------------------------
def extraction_stats(extraction: Extraction, extractors: Sequence[Extractor], source: ImageSource,
                     source_info: dict[str, Any] | None = None) -> dict[str, Stats]:
    """Statistics per extractor name, with full provenance metadata (``preprocess.decode``: the decoder used)."""
    env = environment(extractors[0].device if extractors else None)
    src = {"spec": source.spec, "n": extraction.n_images, "skipped": len(extraction.skipped),
           **(source_info or {})}
    # what happened to every candidate entry (found / used / skipped / ignored): no input is dropped unlisted
    acc_in = InputAccounting.build(source, extraction.skipped, extraction.n_images)
    src["inputs"] = acc_in.to_dict()
    files = getattr(getattr(source, "parent", None) or source, "provenance", None)
    if callable(files):  # remote files: URL, size, ETag, revision (the Hub commit), sha256 when read
        src["files"] = files()
    if extraction.n_images < 2 and extractors:  # before the covariance's bare "needs at least 2 samples"
        from ..errors import TooFewImagesError

        fix = "fix or replace the skipped files listed with this error" if extraction.skipped else "add images"
        raise TooFewImagesError(f"{acc_in.summary()}; statistics need at least 2 images: {fix}",
                                {str(source.spec): src["inputs"]})
    out = {}
    metrics = extraction.metrics or [{} for _ in extractors]
    for ex, acc, mets in zip(extractors, extraction.accumulators, metrics):
        meta = {**ex.metadata(), "source": src, **env}
        if extraction.decode != DECODE_PIL_RGB:
            meta["preprocess"] = {**meta["preprocess"], "decode": extraction.decode}
        if mets:
            from ..core.consumers import metric_results

            meta["metrics"] = metric_results(mets)
        if not (bool(torch.isfinite(acc.mean).all()) and bool(torch.isfinite(acc.m2).all())):
            from ..errors import InvalidStatsError

            raise InvalidStatsError(f"{source.spec}: the {ex.name} features of these images hold NaN or Inf; the "
                                    "weights or the precision mode are at fault, not the images: check --weights "
                                    "and use --precision exact")
        st = Stats.from_accumulator(acc, meta)
        st.origin = str(source.spec)  # mismatch messages name the images, not "<memory>"
        out[ex.name] = st
    return out


# The file formats live in stats_files (imported last: it builds Stats objects); re-exported for old callers.
from .stats_files import (  # noqa: E402
    DEFAULT_MAX_STATS_DIM,  # noqa: F401
    FORMAT,  # noqa: F401
    MAX_N,  # noqa: F401
    MAX_NPZ_MEMBER_BYTES,  # noqa: F401
    load_all_stats,  # noqa: F401
    load_stats,
    max_stats_dim,  # noqa: F401
    npz_members,  # noqa: F401
    register_save_hook,  # noqa: F401
    save_stats,
    sniff_format,  # noqa: F401
    valid_n,  # noqa: F401
)
