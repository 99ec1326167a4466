"""fd-eval: exact, fast FD-DINOv2 and FID for the GPIC benchmark.

Entry points::

    fd_eval.compute_fd("gen_dir", ref="gpic-test")             # images in, FD out (EvalResult)
    fd_eval.compute_stats(source, models=...) / build_stats(...)  # images in, statistics out
    fd_eval.FDMetric(ref="gpic-test", value_range=(-1, 1))     # training loops, torch.distributed
    fd_eval.frechet_distance(mu1, sigma1, mu2, sigma2) -> float
    fd_eval.Stats.load(path) / Stats.save(path)
    fd_eval.load_extractor("dinov2-vitl14")
    fd_eval.find_copies("gen_dir", train="train_shards/{000..099}.tar")  # nearest training images (SSCD)
"""
import sys as _sys

from . import _compat  # first: installs the finder for the old flat module paths
from ._version import __version__
from .api import EvalResult, compute_fd, compute_stats, load_extractors
from .core.feature_metrics import mmd, mmd_subsets, prdc
from .core.frechet import FDResult, frechet_distance, frechet_distance_breakdown
from .core.moments import MomentAccumulator
from .core.uncertainty import BootstrapResult, FDInfinityResult, bootstrap_fd, default_ns, fd_infinity
from .errors import (
    BadArrayError,
    BadImageError,
    CheckpointError,
    ChecksumError,
    DownloadError,
    EmptySourceError,
    FDEvalError,
    GatedRepoError,
    InputError,
    InputRangeError,
    InvalidStatsError,
    MissingFeaturesError,
    SourceError,
    StatsError,
    StatsFormatError,
    StatsMismatchError,
    TooFewImagesError,
    UnknownReferenceError,
    WeightsError,
)
from .extractors import Extractor, list_extractors, load_extractor
from .extractors.preprocess import PreprocessSpec
from .index import TrainingIndex, build_index, open_index
from .metrics.analysis import AnalysisSpec, analyze
from .metrics.build import build_stats
from .metrics.ceiling import CeilingResult, ceiling, split_half
from .metrics.clipscore import ClipDependencyError, ClipScoreResult, clip_score
from .metrics.cmmd import CMMDResult, cmmd
from .metrics.copies import CopiesResult, find_copies
from .metrics.metric import FDMetric, evaluate_generator, to_uint8
from .outputs.prompts import evaluation_prompts, read_prompts, write_prompts
from .outputs.references import (
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
from .outputs.stats import Stats, check_compatible, compare_stats, load_all_stats, load_stats, save_stats
from .run.options import RunOptions
from .run.pipeline import FeatureConsumer
from .sources import ImageSource, SkippedItem, open_source

# The flat layout's module paths (fd_eval.moments, fd_eval.build, ...) stay importable: docs/development.md.
_compat.bind_loaded(_sys.modules[__name__])

__all__ = [
    "__version__",
    # errors
    "BadArrayError", "BadImageError", "CheckpointError", "ChecksumError", "DownloadError", "EmptySourceError",
    "FDEvalError", "GatedRepoError", "InputError", "InputRangeError", "InvalidStatsError", "MissingFeaturesError",
    "SourceError", "StatsError", "StatsFormatError", "StatsMismatchError", "TooFewImagesError",
    "UnknownReferenceError", "WeightsError",
    # images -> numbers
    "EvalResult", "compute_fd", "compute_stats", "load_extractors", "build_stats", "RunOptions", "FeatureConsumer",
    "FDMetric", "evaluate_generator", "to_uint8",
    "clip_score", "ClipScoreResult", "ClipDependencyError", "cmmd", "CMMDResult",
    "Extractor", "list_extractors", "load_extractor", "PreprocessSpec",
    "ImageSource", "SkippedItem", "open_source",
    # numbers
    "FDResult", "frechet_distance", "frechet_distance_breakdown", "MomentAccumulator",
    "Stats", "check_compatible", "compare_stats", "load_all_stats", "load_stats", "save_stats",
    "AnalysisSpec", "analyze", "CeilingResult", "ceiling", "split_half", "CopiesResult", "find_copies",
    "build_index", "open_index", "TrainingIndex",
    "mmd", "mmd_subsets", "prdc", "BootstrapResult", "FDInfinityResult", "bootstrap_fd", "default_ns", "fd_infinity",
    # references
    "Floor", "Reference", "add_reference", "fetch_reference", "floor_for", "get_reference", "list_references",
    "load_reference", "remove_reference", "evaluation_prompts", "read_prompts", "write_prompts",
]
