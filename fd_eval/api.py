"""Short functional entry points: images in, statistics or FD out.

    fd_eval.compute_fd("gen_dir", ref="gpic-test")            # FD-DINOv2 against GPIC Test-1M
    fd_eval.compute_fd("gen.npz", ref="ref_dir", models=("dinov2-vitl14", "fid"))
    fd_eval.compute_stats("shards/gpic_test_{00000..00127}.tar", image_transform="center-crop-256")

A reference (``ref``) is a :class:`Stats`, a statistics file (fd-eval safetensors, GPIC / pytorch-fid /
clean-fid npz), a registry name (``fd-eval ref list``), or another image source, whose statistics are computed
with the same extractors and cached (keyed by the source's fingerprint and the extractor's identity).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .errors import FDEvalError, OutputError, StatsFormatError
from .extractors import DEFAULT_EXTRACTOR, Extractor, extractor_entry, load_extractor, resolve_name
from .extractors.precision import resolve_precision
from .extractors.preprocess import source_transform
from .metrics.cmmd import cmmd_between, wants_cmmd
from .outputs.stats import (
    Stats,
    check_compatible,
    compare_stats,
    extraction_stats,
    load_stats,
    save_stats,
    sniff_format,
)
from .run.options import RunOptions, make_options
from .run.pipeline import check_decode, extract
from .run.provenance import result_provenance
from .sources import ImageSource, open_source
from .util.download import offline_scope
from .util.io_utils import optional_cache_dir, warn_cache_unusable

PROTOCOL_N = 50_000  # GPIC: 50K generated images against Test-1M
ModelsArg = str | Sequence[str]
WeightsArg = str | os.PathLike | Mapping[str, str | os.PathLike] | None


@dataclass
class EvalResult:
    """FD per extractor, with provenance; ``to_dict()`` is the CLI's ``--json`` document.

    results[model] = {"fd", "fd_mean", "fd_cov", "n", "n_ref", "floor", "floor_fd_mean", "floor_fd_cov",
    "floor_relation", "floor_independent_estimate", "diagnostics"}. ``floor`` is the published real-vs-real FD at
    this N (None when none is published), ``floor_relation`` its relation to the reference ("subset": GPIC's
    Test-50K is part of Test-1M; "independent"; None), ``floor_independent_estimate`` the model estimate
    (:class:`fd_eval.outputs.references.FloorModel`) of what a perfect sample independent of the reference scores at
    this
    N: a generator's floor (GPIC FD-DINOv2 at 50K: published 7.44, estimate ~8.2). None without a registry
    reference.
    """

    results: dict[str, dict[str, Any]]
    provenance: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Stats] = field(default_factory=dict, repr=False)  # the generated set's statistics
    ref_stats: dict[str, Stats] = field(default_factory=dict, repr=False)  # what they were compared against
    # InputAccounting.to_dict() per side: "generated", and "reference" when the reference is an image source
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __getitem__(self, model: str) -> dict[str, Any]:
        return self.results[resolve_name(model)]

    def to_dict(self) -> dict[str, Any]:
        return {"results": self.results, "provenance": self.provenance, "warnings": self.warnings,
                "skipped": self.skipped, "inputs": self.inputs}


# --- extractors ---------------------------------------------------------------------------------------------
def load_extractors(models: ModelsArg = (DEFAULT_EXTRACTOR,), weights: WeightsArg = None,
                    device: str | torch.device | None = None, resize: str | None = None, *,
                    precision: str | None = None, compile: bool | None = None) -> list[Extractor]:
    """Extractors by name (aliases resolved, duplicates dropped). ``weights``: one path for a single model, or
    ``{model: path}``; ``resize``: DINOv2's "pil" (reference) or "torch"; ``precision``: "exact" (default) or
    "fast" (:mod:`fd_eval.extractors.precision`), ``compile``: torch.compile in fast mode (None: auto)."""
    resolve_precision(precision, compile)  # a bad mode fails before any download
    names = list(dict.fromkeys(resolve_name(m) for m in ([models] if isinstance(models, str) else models)))
    if not names:
        raise FDEvalError("no model given; pass at least one --model (e.g. dinov2-vitl14)")
    if weights is not None and not isinstance(weights, Mapping):
        if len(names) > 1:
            raise FDEvalError(f"one weights path for {len(names)} models; pass --weights MODEL=PATH for each")
        weights = {names[0]: weights}
    wmap = {resolve_name(k): v for k, v in (weights or {}).items()}
    unknown = set(wmap) - set(names)
    if unknown:
        raise FDEvalError(f"weights given for {', '.join(sorted(unknown))}, which is not among the models {names}")
    out = []
    for name in names:
        opts = {"resize": resize} if (resize and "resize" in extractor_entry(name).options) else {}
        out.append(load_extractor(name, weights=wmap.get(name), device=device, precision=precision, compile=compile,
                                  **opts))
    return out


def configure_extractors(extractors: Sequence[Extractor], precision: str | None = None,
                         compile: bool | None = None) -> list[Extractor]:
    """Already loaded extractors, switched to ``precision``/``compile`` when given (None keeps theirs)."""
    exs = list(extractors)
    if precision is not None or compile is not None:
        for ex in exs:
            ex.set_precision(precision or ex.precision.mode, compile)
    return exs


def offline_context(options: RunOptions) -> contextlib.AbstractContextManager:
    """``offline_scope(options.offline)`` when the options say (None keeps an enclosing scope or the environment)."""
    return contextlib.nullcontext() if options.offline is None else offline_scope(options.offline)


def resolve_extractors(models: ModelsArg, extractors: Sequence[Extractor] | None, weights: WeightsArg,
                       options: RunOptions, device: torch.device) -> list[Extractor]:
    """The extractors of a run: ``extractors`` (switched to the options' precision/compile when given), or
    ``models`` loaded with ``weights`` on ``device`` (the one place every entry point gets them from; weights
    download under the options' ``offline``)."""
    if extractors is not None:
        exs = configure_extractors(extractors, options.precision, options.compile)
        if not exs:
            raise FDEvalError("no extractor given; pass at least one Extractor (or models=...)")
        return exs
    with offline_context(options):
        return load_extractors(models, weights, device, options.resize, precision=options.precision,
                               compile=options.compile)


def run_provenance(extractors: Sequence[Extractor], device: torch.device, *,
                   preprocess: Mapping[str, Mapping[str, Any]] | None = None, **parts: Any) -> dict[str, Any]:
    """The ``provenance`` document of a result: :func:`fd_eval.run.provenance.result_provenance`, the one schema of
    every result (compute, FDMetric, ceiling, copies)."""
    return result_provenance(extractors, device, preprocess=preprocess, **parts)


def progress_label(side: str, spec: Any, extractors: Sequence[Extractor]) -> str:
    """A progress bar's label: which side, which source (its last 40 characters) and which extractors, e.g.
    ``reference B/ (dinov2-vitl14)``."""
    spec = str(spec)
    spec = spec if len(spec) <= 40 else "..." + spec[-37:]
    return " ".join(p for p in (side, spec, f"({', '.join(ex.name for ex in extractors)})") if p)


def _note(opts: RunOptions, msg: str) -> None:
    """One progress note on stderr (rank 0, only when progress is on; like the bars)."""
    if opts.progress and (opts.rank or 0) == 0:
        import sys

        print(msg, file=sys.stderr, flush=True)


# --- statistics ---------------------------------------------------------------------------------------------
def _select(source: ImageSource, num: int | None, seed: int | None) -> ImageSource:
    if num is None:
        return source
    if num > len(source):
        raise FDEvalError(f"{source.spec}: asked for {num} images but the source holds {len(source)}")
    return source.subset(num, seed=seed)


def compute_stats(
    source: str | os.PathLike | Any,
    models: ModelsArg = (DEFAULT_EXTRACTOR,),
    *,
    extractors: Sequence[Extractor] | None = None,
    weights: WeightsArg = None,
    num: int | None = None,
    seed: int | None = None,
    keep_features: bool = False,
    image_transform: str | None = None,
    label: str | None = None,
    options: RunOptions | None = None,
    **kw: Any,
) -> dict[str, Stats]:
    """Statistics of an image source under each extractor, from one decoding pass.

    Args:
        source: directory, .zip, tar shard(s) / glob / brace range, .npz (arr_0), .npy, uint8 NHWC array.
        extractors: already loaded extractors (then ``models``, ``weights`` and ``resize`` are ignored; the
            options' precision/compile switch them when given, None keeps their mode).
        num, seed: the first ``num`` images, or a seeded random ``num`` when ``seed`` is given.
        image_transform: a named source transform applied before the extractors ("center-crop-256" is GPIC's
            reference preprocessing, App. B.1).
        keep_features: also store the (N, D) float32 features (for PRDC, MMD, bootstrap).
        label: the progress bar's label (default: ``progress_label("", source, extractors)``).
        options, **kw: how the run executes, a :class:`fd_eval.RunOptions` and/or its fields as keywords
            (device, batch_size, num_workers, precision, compile, decode, resize, skip_bad, progress, rank,
            world_size, ...). precision: "exact" (default: float32, TF32 off; the protocol's numbers) or "fast"
            (DINOv2 bfloat16 autocast, Inception TF32; recorded, and refused against exact statistics unless
            allow_mismatch). decode: "pil" (default) or "gpu" (JPEGs decoded on the GPU; needs extractors that
            resize on the device). rank, world_size: unset = detect torch.distributed (an initialised process
            group, or torchrun's environment, whose group is then initialised): each rank extracts its block and
            every rank gets the merged statistics (every rank must call this). ``world_size=1`` forces a
            single-process run.
    Returns:
        {extractor name: Stats}; ``metadata["source"]`` records the source, its fingerprint, N and skipped items.
    """
    opts = make_options(options, kw, "compute_stats")
    # a bad path (or a remote source offline) fails before any weights load
    src = _select(open_source(source, skip_bad=opts.skip_bad, offline=opts.offline), num, seed)
    run = opts.resolve()
    exs = resolve_extractors(models, extractors, weights, run, run.device)
    tf = source_transform(image_transform)
    check_decode(run.decode, exs, tf)
    ext = extract(src, exs, run=run, keep_features=keep_features, image_transform=tf,
                  desc=label or progress_label("", src.spec, exs))
    info = {"fingerprint": src.fingerprint(), "num": num, "seed": seed, "world_size": run.world_size,
            "image_transform": tf.to_dict() if tf else None,
            "skipped_items": [s.to_dict() for s in ext.skipped], "seconds": ext.seconds,
            "images_per_s": ext.images_per_s}
    return extraction_stats(ext, exs, src, info)


# --- references ---------------------------------------------------------------------------------------------
@dataclass
class _Ref:
    stats: dict[str, Stats]
    identity: dict[str, Any]
    registry_name: str | None = None
    inputs: dict[str, Any] | None = None  # InputAccounting.to_dict() of an image-source reference


def _is_stats_file(path: Path) -> bool:
    fmt = sniff_format(path)
    if fmt == "safetensors":
        return True
    if fmt == "npz":
        import zipfile

        try:
            with zipfile.ZipFile(path) as zf:
                names = {n.rsplit("/", 1)[-1] for n in zf.namelist()}
        except zipfile.BadZipFile:
            return True  # let the stats loader report the damage
        return bool(names & {"mu.npy", "dino_mu.npy", "inception_mu.npy"})
    return False


def _ref_cache_key(src: ImageSource, ex: Extractor, tf: str | None, decode: str = "pil") -> str:
    ident = {"fingerprint": src.fingerprint(), "extractor": ex.metadata(), "image_transform": tf, "v": 1}
    if decode != "pil":
        ident["decode"] = decode
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]


def reference_kind(ref: Any) -> str:
    """"stats", "file", "registry" or "source": how :func:`resolve_reference` reads ``ref`` (checked without
    reading any statistics or images)."""
    if isinstance(ref, (Stats, Mapping)):
        return "stats"
    if isinstance(ref, ImageSource):
        return "source"
    spec = os.fspath(ref)
    path = Path(spec)
    if path.is_file() and _is_stats_file(path):
        return "file"
    if not path.exists() and not any(c in spec for c in "*?{[") and "/" not in spec:
        return "registry"
    return "source"


def open_reference(ref: Any, skip_bad: bool = False) -> Any:
    """``ref`` checked cheaply, before any weights load: a registry name must be known (UnknownReferenceError
    lists the names), a statistics file must exist, an image source is opened (SourceError for a missing path or
    unknown format) and returned as the :class:`ImageSource` to pass on to :func:`resolve_reference`."""
    kind = reference_kind(ref)
    if kind == "registry":
        from .outputs.references import get_reference

        get_reference(os.fspath(ref))
    elif kind == "source" and not isinstance(ref, ImageSource):
        return open_source(ref, skip_bad=skip_bad)
    return ref


def resolve_reference(
    ref: str | os.PathLike | Stats | Mapping[str, Stats] | ImageSource,
    extractors: Sequence[Extractor],
    *,
    ref_image_transform: str | None = None,
    keep_features: bool | Sequence[str] = False,
    cache: bool = True,
    options: RunOptions | None = None,
    **kw: Any,
) -> _Ref:
    """Reference statistics for each extractor, from whatever ``ref`` is (see the module docstring).

    ``keep_features``: also read (or extract) the reference's feature rows (True: every model's; a collection of
    names: those models'); a cached image-source entry without them counts as a miss and is rebuilt with them.
    ``options``/``kw``: :class:`fd_eval.RunOptions` (``offline``
    for registry references; the run options of an image-source reference's extraction, ``skip_bad`` included:
    skipped reference images are listed in its ``inputs``; a cached entry that skipped images is not used by a
    strict run). The cache is optional: when ``$FD_EVAL_CACHE`` is unusable the statistics are computed, not saved.
    """
    opts = make_options(options, kw, "resolve_reference")
    offline = opts.offline
    names = [ex.name for ex in extractors]
    if isinstance(keep_features, (set, frozenset, list, tuple)):  # the models whose rows are wanted
        wanted = set(keep_features)
        features_of = {n: n in wanted for n in names}
    else:
        features_of = {n: bool(keep_features) for n in names}
    features = any(features_of.values())
    kind = reference_kind(ref)
    if kind == "stats":
        if isinstance(ref, Stats):
            if len(names) != 1:
                raise FDEvalError("a single Stats reference given for several models; pass {model: Stats}")
            return _Ref({names[0]: ref}, {"kind": "stats", "origin": ref.origin})
        return _Ref({resolve_name(k): v for k, v in ref.items()}, {"kind": "stats"})
    spec = ref.spec if isinstance(ref, ImageSource) else os.fspath(ref)
    if kind == "file":
        from .util.io_utils import sha256_file_cached

        return _Ref({n: load_stats(spec, model=n, features=features_of[n]) for n in names},
                    {"kind": "file", "path": spec, "sha256": sha256_file_cached(spec)})
    if kind == "registry":
        from .outputs.references import get_reference, load_reference

        entry = get_reference(spec)  # raises UnknownReferenceError listing the known names
        stats = {n: load_reference(spec, n, offline=offline, features=features_of[n]) for n in names}
        from .outputs.references import cached_path

        _note(opts, f"reference {spec} ({', '.join(names)}): statistics file {cached_path(spec) or entry.location}")
        return _Ref(stats, {"kind": "registry", **stats[names[0]].metadata.get("reference", {"name": entry.name})},
                    registry_name=spec)
    # an image source: compute its statistics with the same extractors, cached by content and extractor
    src = open_source(ref, skip_bad=opts.skip_bad, offline=opts.offline)
    tf = ref_image_transform
    out: dict[str, Stats] = {}
    decode = opts.decode
    folder = optional_cache_dir("ref_stats") if cache else None  # None: compute without the cache, save nothing
    files = [None if folder is None else folder / f"{_ref_cache_key(src, ex, tf, decode)}.safetensors"
             for ex in extractors]
    for ex, f in zip(extractors, files):
        if f is not None and f.is_file():
            try:
                st = load_stats(f, model=ex.name, features=features_of[ex.name])
            except StatsFormatError:
                f.unlink(missing_ok=True)  # a damaged cache entry is rebuilt
                continue
            # an entry made without feature rows cannot serve them; one that skipped images cannot serve a strict run
            if (not features_of[ex.name] or st.features is not None) and (
                    opts.skip_bad or not st.metadata["source"].get("skipped")):
                out[ex.name] = st
    hits = [ex.name in out for ex in extractors]
    opts = opts.resolve()  # the source's statistics are computed (and merged over ranks) below
    world_size = opts.world_size
    if world_size > 1:
        # the computation below is collective: run it on every rank unless every rank found the cache entry
        # (nodes may not share a cache directory)
        from .run.distributed import all_true

        hits = all_true(hits)
    for ex, f, hit in zip(extractors, files, hits):
        if hit:
            _note(opts, f"reference {spec} ({ex.name}): from the cache, {f}")
    todo = [(ex, f) for ex, f, hit in zip(extractors, files, hits) if not hit]
    if todo:
        computed = compute_stats(src, extractors=[ex for ex, _ in todo], image_transform=tf, keep_features=features,
                                 label=progress_label("reference", spec, [ex for ex, _ in todo]),
                                 options=opts.replace(precision=None, compile=None))
        from .run.distributed import local_rank

        for ex, f in todo:
            out[ex.name] = computed[ex.name]
            if f is not None and (world_size == 1 or local_rank() == 0):  # one writer per node (atomic rename)
                try:
                    save_stats(f, [computed[ex.name]])
                except OutputError as e:  # disk full: the run finishes, the next one recomputes
                    warn_cache_unusable(str(e))
    inputs = out[extractors[0].name].metadata["source"].get("inputs")
    return _Ref(out, {"kind": "source", "spec": spec, "fingerprint": src.fingerprint(), "image_transform": tf},
                inputs=inputs)


# --- FD -----------------------------------------------------------------------------------------------------
def _recorded_spec(stats: Mapping[str, Stats], ex: Extractor) -> dict[str, Any]:
    """The preprocessing the statistics of ``ex`` record (with the decoder actually used)."""
    s = stats.get(ex.name)
    return dict(s.metadata["preprocess"]) if s is not None and s.metadata.get("preprocess") else \
        ex.preprocess_spec.to_dict()


def _floor(ref: _Ref, model: str, n: int) -> Any:
    if ref.registry_name is None:
        return None
    from .outputs.references import floor_for

    return floor_for(ref.registry_name, model, n)


def _floor_model(ref: _Ref, model: str) -> Any:
    if ref.registry_name is None:
        return None
    from .outputs.references import get_reference

    return get_reference(ref.registry_name).floor_model(model)


def evaluate_stats(gen: Mapping[str, Stats], ref: _Ref, *, allow_mismatch: bool = False,
                   device: str | torch.device | None = None) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """FD per model between generated and reference statistics, with floors and warnings."""
    results, warnings = {}, []
    for name, g in gen.items():
        r = ref.stats[name]
        res, w = compare_stats(g, r, allow_mismatch=allow_mismatch, device=device)
        warnings += w
        floor = _floor(ref, name, g.n)
        fm = _floor_model(ref, name)
        results[name] = {
            "fd": res.fd, "fd_mean": res.fd_mean, "fd_cov": res.fd_cov, "n": g.n,
            "n_ref": None if r.metadata.get("n_unknown") else r.n,
            "floor": floor.fd if floor else None,
            "floor_fd_mean": floor.fd_mean if floor else None,
            "floor_fd_cov": floor.fd_cov if floor else None,
            "floor_relation": floor.relation if floor else None,
            "floor_independent_estimate": fm.independent(g.n) if fm else None,
            "diagnostics": {k: v for k, v in res.to_dict().items() if k not in {"fd", "fd_mean", "fd_cov"}},
        }
        if g.metadata.get("metrics"):  # registered consumer metrics (fd_eval.core.consumers.ConsumerMetric)
            results[name]["metrics"] = g.metadata["metrics"]
        if ref.registry_name and ref.registry_name.startswith("gpic") and g.n != PROTOCOL_N:
            side = "below" if g.n < PROTOCOL_N else "above"
            shift = f" (estimated shift from sample size alone: {fm.shift(g.n):+.2f}, FD ~ c/N)" if fm else ""
            warnings.append(f"{name}: N = {g.n:,} is {side} the GPIC protocol's {PROTOCOL_N:,}; FD is biased "
                            f"{'upward' if g.n < PROTOCOL_N else 'downward'} relative to it{shift} and not "
                            "comparable to published numbers")
        if g.n <= g.dim:
            warnings.append(f"{name}: N = {g.n} is not above the feature dimension {g.dim}; the covariance is "
                            "rank-deficient and FD is dominated by sample-size bias")
        if wants_cmmd(name):
            if g.features is None or r.features is None:
                side = "generated set" if g.features is None else "reference"
                warnings.append(f"{name}: no CMMD: the {side} has no {name} embeddings (build the reference with "
                                f"`fd-eval stats SOURCE -o FILE -m {name}`, which keeps them)")
            else:
                res_c = cmmd_between(g, r, device=device)
                results[name]["cmmd"] = res_c.cmmd
                results[name]["cmmd_detail"] = res_c.to_dict()
    return results, warnings


def compute_fd(
    gen: str | os.PathLike | Any,
    ref: str | os.PathLike | Stats | Mapping[str, Stats] = "gpic-test",
    models: ModelsArg = (DEFAULT_EXTRACTOR,),
    *,
    weights: WeightsArg = None,
    num: int | None = None,
    seed: int | None = None,
    allow_mismatch: bool = False,
    ref_image_transform: str | None = None,
    keep_features: bool = False,
    ref_features: bool | None = None,
    options: RunOptions | None = None,
    **kw: Any,
) -> EvalResult:
    """FD of generated images against a reference, per extractor, with provenance (see :class:`EvalResult`).

    ``options``/``kw``: how the run executes (:class:`fd_eval.RunOptions`: device, batch_size, num_workers,
    precision, compile, decode, resize, skip_bad, progress, offline, rank, world_size). Under torch.distributed
    (see :func:`compute_stats`; every rank calls this) both the generated images and a reference given as an
    image source are sharded over the ranks; every rank returns the same result.

    ``precision="fast"`` statistics are refused against an exact reference (the GPIC ones are exact)
    unless ``allow_mismatch``; an image-source reference is computed in the same mode. ``decode="gpu"`` applies
    to both image sources. ``provenance["precision"]`` records the mode and its documented expected FD
    difference from exact.

    ``keep_features`` keeps the generated feature rows in ``result.stats`` (for :func:`fd_eval.analyze`);
    ``ref_features`` (default: ``keep_features``) also loads or extracts the reference's rows into
    ``result.ref_stats`` (PRDC and MMD need them; the bootstrap and FD-infinity do not).
    """
    t0 = time.perf_counter()
    opts = make_options(options, kw, "compute_fd")
    # cheap checks first: both inputs exist and have a known format before any weights load or extraction
    gen = open_source(gen, skip_bad=opts.skip_bad, offline=opts.offline)
    if num is not None and num > len(gen):
        raise FDEvalError(f"{gen.spec}: asked for {num} images but the source holds {len(gen)}")
    ref = open_reference(ref, skip_bad=opts.skip_bad)
    with offline_context(opts):  # --offline reaches the weights and the references
        return _compute_fd(t0, opts, gen, ref, models, weights, num, seed, allow_mismatch, ref_image_transform,
                           keep_features, ref_features)


@dataclass(frozen=True)
class _Named:
    """An extractor's name alone: all :func:`resolve_reference` needs of it for a registry name or a file."""

    name: str


def registry_reference_first(ref: Any, models: ModelsArg | None, opts: RunOptions, *,
                             extractors: Sequence[Extractor] | None = None, **ref_kw: Any) -> _Ref | None:
    """A registry reference read (access check, download) before any extractor loads: cheap before expensive, so
    that a gated reference without access fails before 1.2 GB of DINOv2-L weights are downloaded. None for every
    other kind of reference (read after the extractors, as :func:`resolve_reference` needs them)."""
    if reference_kind(ref) != "registry":
        return None
    if extractors is not None:
        names: Any = dict.fromkeys(ex.name for ex in extractors)
    else:
        names = dict.fromkeys(resolve_name(m) for m in ([models] if isinstance(models, str) else models or ()))
    return resolve_reference(ref, [_Named(n) for n in names], options=opts, **ref_kw)  # type: ignore[list-item]


def check_planned(gen: Any, exs: Sequence[Extractor], reference: _Ref) -> None:
    """Public name of :func:`_check_planned` (used by :mod:`fd_eval.metrics.ceiling`)."""
    _check_planned(gen, exs, reference)


def _check_planned(gen: ImageSource, exs: Sequence[Extractor], reference: _Ref) -> None:
    """:func:`fd_eval.outputs.stats.check_compatible` of the statistics the extraction would make (the extractors'
    metadata, the generated source as their origin) against a reference already read: StatsMismatchError before
    any image is decoded, naming both files. The decode used (``--decode gpu``) is only known afterwards."""
    for ex in exs:
        ref = reference.stats.get(ex.name)
        if ref is None:
            continue
        d = ex.feature_dim
        planned = Stats(np.zeros(d), np.zeros((d, d)), 2, ex.metadata(), origin=str(getattr(gen, "spec", gen)))
        check_compatible(planned, ref)


def _compute_fd(t0: float, opts: RunOptions, gen: ImageSource, ref: Any, models: ModelsArg, weights: WeightsArg,
                num: int | None, seed: int | None, allow_mismatch: bool, ref_image_transform: str | None,
                keep_features: bool, ref_features: bool | None) -> EvalResult:
    resolved = opts.resolve()
    dev, world_size = resolved.device, resolved.world_size
    # CMMD (CLIP extractors) needs both sides' embeddings: kept for those models whatever keep_features says
    cmmd_models = frozenset(n for n in (resolve_name(m) for m in ([models] if isinstance(models, str) else models))
                            if wants_cmmd(n))
    ref_keep = keep_features if ref_features is None else ref_features
    ref_kw = dict(ref_image_transform=ref_image_transform, keep_features=True if ref_keep else cmmd_models)
    t_ref = time.perf_counter()
    reference = None
    kind = reference_kind(ref)
    reference = registry_reference_first(ref, models, opts, **ref_kw)
    t_ref = time.perf_counter() - t_ref
    exs = resolve_extractors(models, None, weights, resolved, dev)
    check_decode(opts.decode, exs, source_transform(ref_image_transform))
    if reference is None and kind in ("file", "stats"):  # no extraction needed: read before the generated pass
        t_ref = time.perf_counter()
        reference = resolve_reference(ref, exs, options=opts, **ref_kw)
        t_ref = time.perf_counter() - t_ref
    if reference is not None and not allow_mismatch:  # refuse a mismatch (precision, weights) before extracting
        _check_planned(gen, exs, reference)
    # the extractors are loaded in the options' mode: the passes below keep it
    run = resolved.replace(precision=None, compile=None)
    if reference is None:
        t_ref = time.perf_counter()
        reference = resolve_reference(ref, exs, options=run, **ref_kw)
        t_ref = time.perf_counter() - t_ref
    gen_stats = compute_stats(gen, extractors=exs, num=num, seed=seed, keep_features=keep_features or bool(
                              cmmd_models), options=run,
                              label=progress_label("generated", getattr(gen, "spec", gen if isinstance(
                                  gen, (str, os.PathLike)) else "images"), exs))
    t_fd = time.perf_counter()
    results, warnings = evaluate_stats(gen_stats, reference, allow_mismatch=allow_mismatch)
    t_fd = time.perf_counter() - t_fd
    first = next(iter(gen_stats.values()))
    src_meta = first.metadata["source"]
    skipped = src_meta.get("skipped_items", [])
    if skipped:
        warnings.append(f"{len(skipped)} unreadable image(s) skipped (--skip-bad); N counts only the rest")
    ref_skipped = len((reference.inputs or {}).get("skipped", []))
    if ref_skipped:
        warnings.append(f"reference: {ref_skipped} unreadable image(s) skipped (--skip-bad); N ref counts only the "
                        "rest")
    provenance = run_provenance(
        exs, dev, preprocess={ex.name: _recorded_spec(gen_stats, ex) for ex in exs},
        decode={"requested": opts.decode, "used": first.metadata["preprocess"].get("decode")},
        reference=reference.identity,
        generated={"spec": src_meta["spec"], "fingerprint": src_meta["fingerprint"], "n": first.n,
                   "num": num, "seed": seed, "skipped": len(skipped)},
        seed=seed, world_size=world_size,
        timings={"total_s": time.perf_counter() - t0, "reference_s": t_ref, "extract_s": src_meta["seconds"],
                 "images_per_s": src_meta["images_per_s"], "fd_s": t_fd})
    inputs = {"generated": src_meta.get("inputs", {})}
    if reference.inputs is not None:
        inputs["reference"] = reference.inputs
    return EvalResult(results, provenance, warnings, skipped, gen_stats, reference.stats, inputs)
