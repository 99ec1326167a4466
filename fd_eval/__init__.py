"""fd-eval: exact, fast FD-DINOv2 and FID for the GPIC benchmark.

Entry points::

    fd_eval.frechet_distance(mu1, sigma1, mu2, sigma2) -> float
    fd_eval.Stats.load(path) / Stats.save(path)
    fd_eval.load_extractor("dinov2-vitl14")
"""
from ._version import __version__
from .errors import (
    BadArrayError,
    BadImageError,
    ChecksumError,
    DownloadError,
    EmptySourceError,
    FDEvalError,
    GatedRepoError,
    InputError,
    InputRangeError,
    InvalidStatsError,
    SourceError,
    StatsError,
    StatsFormatError,
    StatsMismatchError,
    UnknownReferenceError,
    WeightsError,
)
from .api import EvalResult, compute_fd, compute_stats, load_extractors
from .extractors import Extractor, list_extractors, load_extractor
from .frechet import FDResult, frechet_distance, frechet_distance_breakdown
from .moments import MomentAccumulator
from .preprocess import PreprocessSpec
from .references import (
    Floor,
    Reference,
    add_reference,
    fetch_reference,
    floor_for,
    get_reference,
    list_references,
    load_reference,
    remove_reference,
)
from .sources import ImageSource, SkippedItem, open_source
from .stats import Stats, check_compatible, compare_stats, load_all_stats, load_stats, save_stats

__all__ = [
    "__version__",
    "BadArrayError", "BadImageError", "ChecksumError", "DownloadError", "EmptySourceError", "FDEvalError",
    "GatedRepoError", "InputError", "InputRangeError", "InvalidStatsError", "SourceError", "StatsError",
    "StatsFormatError", "StatsMismatchError", "UnknownReferenceError", "WeightsError",
    "EvalResult", "compute_fd", "compute_stats", "load_extractors",
    "Floor", "Reference", "add_reference", "fetch_reference", "floor_for", "get_reference", "list_references",
    "load_reference", "remove_reference",
    "ImageSource", "SkippedItem", "open_source",
    "Extractor", "list_extractors", "load_extractor",
    "FDResult", "frechet_distance", "frechet_distance_breakdown",
    "MomentAccumulator", "PreprocessSpec",
    "Stats", "check_compatible", "compare_stats", "load_all_stats", "load_stats", "save_stats",
]
