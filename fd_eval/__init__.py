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
    StatsError,
    StatsFormatError,
    StatsMismatchError,
    UnknownReferenceError,
    WeightsError,
)
from .extractors import Extractor, list_extractors, load_extractor
from .frechet import FDResult, frechet_distance, frechet_distance_breakdown
from .moments import MomentAccumulator
from .preprocess import PreprocessSpec
from .stats import Stats, check_compatible, compare_stats, load_all_stats, load_stats, save_stats

__all__ = [
    "__version__",
    "BadArrayError", "BadImageError", "ChecksumError", "DownloadError", "EmptySourceError", "FDEvalError",
    "GatedRepoError", "InputError", "InputRangeError", "InvalidStatsError", "StatsError", "StatsFormatError",
    "StatsMismatchError", "UnknownReferenceError", "WeightsError",
    "Extractor", "list_extractors", "load_extractor",
    "FDResult", "frechet_distance", "frechet_distance_breakdown",
    "MomentAccumulator", "PreprocessSpec",
    "Stats", "check_compatible", "compare_stats", "load_all_stats", "load_stats", "save_stats",
]
