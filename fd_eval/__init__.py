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
from ._version import __version__
from .analysis import AnalysisSpec, analyze
from .api import EvalResult, compute_fd, compute_stats, load_extractors
from .build import build_stats
from .ceiling import CeilingResult, ceiling, split_half
from .clipscore import ClipDependencyError, ClipScoreResult, clip_score
from .cmmd import CMMDResult, cmmd
from .copies import CopiesResult, find_copies
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
from .feature_metrics import mmd, mmd_subsets, prdc
from .frechet import FDResult, frechet_distance, frechet_distance_breakdown
from .index import TrainingIndex, build_index, open_index
from .metric import FDMetric, evaluate_generator, to_uint8
from .moments import MomentAccumulator
from .options import RunOptions
from .pipeline import FeatureConsumer
from .preprocess import PreprocessSpec
from .prompts import evaluation_prompts, read_prompts, write_prompts
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
from .uncertainty import BootstrapResult, FDInfinityResult, bootstrap_fd, default_ns, fd_infinity

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
