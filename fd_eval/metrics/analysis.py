"""Beyond one FD: its bootstrap interval, FD-infinity, PRDC and MMD for a generated set, as one JSON-able record.

    spec = fd_eval.AnalysisSpec(ci=0.95, n_boot=100, fd_infinity=True, prdc=True, mmd=True, seed=0)
    gen = fd_eval.compute_stats("gen_dir", keep_features=True)["dinov2-vitl14"]
    ref = fd_eval.load_reference("gpic-test", features=True)   # PRDC/MMD need the reference's feature rows
    fd_eval.analyze(gen, ref, spec)
    # {"seed": 0, "n": ..., "n_ref": ..., "bootstrap": {...}, "fd_infinity": {...}, "prdc": {...}, "mmd": {...},
    #  "warnings": [...]}

``fd-eval compute GEN --ci 0.95 --bootstrap 100 --fd-infinity --prdc --mmd`` runs the same through
:func:`analyze_result` and adds the record to each model's entry of the ``--json`` document as ``"analysis"``.

The numbers come from :mod:`fd_eval.core.uncertainty` (bootstrap_fd, fd_infinity) and
:mod:`fd_eval.core.feature_metrics`
(prdc, mmd_subsets) called with their defaults and ``seed=spec.seed``; every section records its seed, so each
is reproduced by calling that function on the same feature rows. The bootstrap and FD-infinity use the generated
features and the reference's mean and covariance; PRDC and MMD also need the reference's feature rows (GPIC's
``dino_embeddings``, or statistics built with ``fd-eval stats --keep-features``).
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..api import EvalResult, reference_kind
from ..core import feature_metrics, uncertainty
from ..errors import InputError, MissingFeaturesError
from ..extractors import resolve_name
from ..outputs.stats import Stats, load_stats, sniff_format
from ..run.options import auto_device


@dataclass(frozen=True)
class AnalysisSpec:
    """Which analyses to run and how (defaults: the GPIC toolkit's PRDC/MMD settings).

    Attributes:
        ci: level of the bootstrap confidence interval for FD, in (0, 1); None: no bootstrap.
        n_boot: bootstrap replicates.
        fd_infinity: fit FD against 1/N and extrapolate (default sample sizes, 3 repetitions).
        prdc: precision, recall, density, coverage with k = ``nearest_k`` on seeded subsets of at most
            ``prdc_max`` real and generated rows.
        mmd: polynomial-kernel MMD^2 (degree 3, gamma = 1/D, coef0 = 1, unbiased), mean over ``mmd_subsets``
            seeded subsets of ``mmd_subset_size`` rows.
        seed: the seed of every draw (bootstrap resamples, FD-infinity permutations, PRDC and MMD subsets).
    """

    ci: float | None = None
    n_boot: int = 100
    fd_infinity: bool = False
    prdc: bool = False
    mmd: bool = False
    seed: int = 0
    nearest_k: int = 5
    prdc_max: int = feature_metrics.PRDC_MAX_SAMPLES
    mmd_subsets: int = 100
    mmd_subset_size: int = 1000

    def __post_init__(self) -> None:
        if self.ci is not None and not 0.0 < float(self.ci) < 1.0:
            raise InputError(f"--ci must be a level in (0, 1) such as 0.95, got {self.ci}")
        if int(self.n_boot) < 2:
            raise InputError(f"--bootstrap needs at least 2 replicates, got {self.n_boot}")
        if not 0 <= int(self.seed) < 2**32:  # MMD's RandomState takes 32-bit seeds
            raise InputError(f"the analysis seed must be in 0..2**32-1, got {self.seed}")

    @property
    def bootstrap(self) -> bool:
        return self.ci is not None

    @property
    def requested(self) -> bool:
        return self.bootstrap or self.fd_infinity or self.prdc or self.mmd

    @property
    def needs_reference_features(self) -> bool:
        return self.prdc or self.mmd

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- one model ----------------------------------------------------------------------------------------------
def _label(stats: Stats, default: str) -> str:
    return stats.origin if stats.origin and stats.origin != "<memory>" else default


def missing_reference_features_message(where: str, model: str) -> str:
    """The one-line explanation (and fixes) for a reference without feature rows."""
    return (f"{where} holds no {model} feature rows, which PRDC and MMD compare against; use a reference that "
            "stores them (GPIC's official *_stats.npz with dino_embeddings, or statistics built with "
            f"`fd-eval stats REF_IMAGES -o ref.safetensors -m {model} --keep-features`, passed as --ref "
            "ref.safetensors), or pass the reference images themselves as --ref")


def analyze(gen: Stats, ref: Stats, spec: AnalysisSpec, *, device: str | torch.device | None = None) -> dict[str, Any]:
    """Run the analyses of ``spec`` for one generated set against one reference.

    Args:
        gen: the generated set's statistics with ``features`` (N, D) (``compute_stats(..., keep_features=True)``).
        ref: the reference statistics (mean and covariance; ``features`` too for PRDC and MMD).
        device: where to compute (default CPU); results do not depend on it beyond float rounding.

    Returns:
        ``{"seed", "n", "n_ref", "warnings", ["bootstrap"], ["fd_infinity"], ["prdc"], ["mmd"]}``: bootstrap =
        :meth:`BootstrapResult.to_dict`, fd_infinity = :meth:`FDInfinityResult.to_dict`, prdc = the dict of
        :func:`fd_eval.prdc`, mmd = ``{"mmd", "std", "n_subsets", "subset_size", "subset_size_used", "degree",
        "gamma", "coef0", "seed", "estimator"}``.

    Raises:
        MissingFeaturesError: ``gen`` has no feature rows, or PRDC/MMD are asked for and ``ref`` has none (the
            message names the reference and how to get its features).
    """
    model = gen.name
    if gen.features is None:
        raise MissingFeaturesError(
            f"{_label(gen, 'the generated statistics')} hold no feature rows; compute them with "
            "compute_stats(..., keep_features=True) / compute_fd(..., keep_features=True) (fd-eval compute keeps "
            "them when an analysis option is given)")
    x = gen.features
    out: dict[str, Any] = {"seed": int(spec.seed), "n": int(gen.n),
                           "n_ref": None if ref.metadata.get("n_unknown") else int(ref.n), "warnings": []}
    if spec.bootstrap:
        b = uncertainty.bootstrap_fd(x, ref, n_boot=int(spec.n_boot), ci=float(spec.ci), seed=int(spec.seed),
                                     device=device)
        out["bootstrap"] = b.to_dict()
    if spec.fd_infinity:
        r = uncertainty.fd_infinity(x, ref, seed=int(spec.seed), device=device)
        out["fd_infinity"] = r.to_dict()
        out["warnings"] += [f"{model}: FD-infinity: {w}" for w in r.warnings]
    if spec.needs_reference_features:
        if ref.features is None:
            raise MissingFeaturesError(missing_reference_features_message(_label(ref, "the reference statistics"),
                                                                          model))
        real = ref.features
        if spec.prdc:
            out["prdc"] = feature_metrics.prdc(real, x, nearest_k=spec.nearest_k, max_real=spec.prdc_max,
                                               max_fake=spec.prdc_max, seed=int(spec.seed), device=device)
        if spec.mmd:
            values = feature_metrics.mmd_subsets(real, x, n_subsets=spec.mmd_subsets,
                                                 subset_size=spec.mmd_subset_size, seed=int(spec.seed),
                                                 device=device)
            d = int(x.shape[1])
            out["mmd"] = {
                "mmd": float(values.mean()),  # == fd_eval.mmd(real, x, seed=seed): the same subsets and arithmetic
                "std": float(values.std()),  # over subsets, ddof 0 (torch-fidelity's KID std)
                "n_subsets": int(spec.mmd_subsets), "subset_size": int(spec.mmd_subset_size),
                "subset_size_used": min(int(spec.mmd_subset_size), int(real.shape[0]), int(x.shape[0])),
                "degree": 3, "gamma": 1.0 / d, "coef0": 1.0, "seed": int(spec.seed),
                "estimator": "unbiased MMD^2 (Gretton et al. 2012, Eq. 3), polynomial kernel",
            }
    return out


# --- references ---------------------------------------------------------------------------------------------
def _file_has_features(path: Path, model: str) -> bool:
    """Whether the statistics file stores feature rows for ``model``, from its headers (no feature data read)."""
    st = load_stats(path, model=model, features=False)  # selects the section exactly as loading does
    if sniff_format(path) == "safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            return f"{st.name}.features" in f.keys()
    m = re.match(r"npz \((\w*)mu/", st.metadata.get("source_format", ""))  # npz (dino_mu/dino_sigma) -> dino_
    import zipfile

    with zipfile.ZipFile(path) as zf:
        return m is not None and f"{m.group(1)}embeddings.npy" in {n.rsplit("/", 1)[-1] for n in zf.namelist()}


def check_reference_features(ref: Any, models: str | Sequence[str], *, offline: bool | None = None) -> None:
    """Fail fast, before any extraction, when PRDC/MMD would find no reference feature rows.

    Reads only headers (a registry reference is fetched, as the FD computation would do next). An image-source
    reference passes: its features are extracted.

    Raises:
        MissingFeaturesError: naming the reference and how to get its features.
    """
    names = [resolve_name(m) for m in ([models] if isinstance(models, str) else models)]
    kind = reference_kind(ref)
    if kind == "stats":
        stats = {names[0]: ref} if isinstance(ref, Stats) else {resolve_name(k): v for k, v in ref.items()}
        for n, s in stats.items():
            if n in names and s.features is None:
                raise MissingFeaturesError(missing_reference_features_message(_label(s, "the reference statistics"),
                                                                              n))
    elif kind == "file":
        for n in names:
            if not _file_has_features(Path(ref), n):
                raise MissingFeaturesError(missing_reference_features_message(f"reference {os.fspath(ref)}", n))
    elif kind == "registry":
        from ..outputs.references import fetch_reference, load_reference

        for n in names:
            st = load_reference(os.fspath(ref), n, offline=offline, features=False)  # the checks FD would make
            if not _file_has_features(fetch_reference(os.fspath(ref), offline=offline), n):
                raise MissingFeaturesError(missing_reference_features_message(st.origin, n))


def analyze_result(result: EvalResult, spec: AnalysisSpec, *,
                   device: str | torch.device | None = None) -> dict[str, dict[str, Any]]:
    """:func:`analyze` for every model of a ``compute_fd(..., keep_features=True)`` result, against the
    reference statistics it was compared with (``result.ref_stats``; PRDC/MMD need them loaded with feature
    rows: ``compute_fd(..., ref_features=True)``). Returns {model: analysis record}."""
    dev = auto_device(device)
    return {name: analyze(gen, result.ref_stats[name], spec, device=dev) for name, gen in result.stats.items()}
