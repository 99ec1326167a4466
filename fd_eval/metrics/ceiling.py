"""The best FD a perfect generator can reach: real images scored like generated ones.

FD from N samples is biased upwards by roughly c / N (PROTOCOL.md: real GPIC test images score 7.44 FD-DINOv2
against Test-1M at N = 50K, almost all of it covariance bias), so a score means little without the score of real
data at the same N. Two checks:

* :func:`ceiling` -- a real sample of size n (GPIC val, a held-out test subset, ...) against the reference: the
  statistics of the sample against the reference's, exactly how the GPIC paper defines its Table 2 rows (e.g.
  "Test-50K vs Test-1M", where the 50K are a subset of the 1M). A generator indistinguishable from the real data
  scores about this at this n when the sample is independent of the reference; a sample drawn from the reference
  itself scores lower (c(1/n - 1/M) instead of c(1/n + 1/M), docs/floors.md), and the result says which it is
  when it can tell (``overlap``). The registry's published floors are reported beside it.

      fd_eval.ceiling("gpic/val/gpic_val_{00000..00031}.tar", ref="gpic-test", n=50_000,
                      image_transform="center-crop-256")

* :func:`split_half` -- real against real for one source, no reference needed: two disjoint seeded halves of n
  images each. Both sides are now finite samples, so its bias is about twice the one-sided bias of
  :func:`ceiling` at the same n (against a much larger reference); use it to judge a metric on your own data.

Both reuse :mod:`fd_eval.api` (extraction, reference resolution, FD) and return a :class:`CeilingResult` whose
``to_dict()`` is the ``fd-eval ceiling --json`` document.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..api import (
    PROTOCOL_N,
    ModelsArg,
    WeightsArg,
    check_planned,
    compute_stats,
    evaluate_stats,
    open_reference,
    progress_label,
    registry_reference_first,
    resolve_extractors,
    resolve_reference,
    run_provenance,
)
from ..errors import InputError
from ..extractors import DEFAULT_EXTRACTOR, Extractor, resolve_name
from ..extractors.preprocess import source_transform
from ..outputs.stats import Stats
from ..run.options import RunOptions, make_options
from ..run.pipeline import check_decode
from ..sources import SubsetSource, open_source

# How the halves of split_half are drawn (recorded in the results).
SPLIT_SAMPLING = ("p = numpy.random.RandomState(seed).permutation(len(source)); half a = sorted(p[:n]) "
                  "(= source.subset(n, seed)), half b = sorted(p[n:2n])")


@dataclass
class CeilingResult:
    """Real-vs-reference (``mode="reference"``) or real-vs-real (``mode="split-half"``) FD per extractor.

    results[model] = {"fd", "fd_mean", "fd_cov", "n", "n_ref", "floor", "floor_fd_mean", "floor_fd_cov",
    "floors", "diagnostics"}: ``n`` is the size of the real sample (of each half for split-half), ``n_ref`` that of
    the reference (of the other half); ``floor*`` is the published floor at exactly this n (None when the registry
    has none), ``floors`` every published floor of the reference for this model (``[{n, fd, fd_mean, fd_cov,
    label, source, relation}]``; empty for references outside the registry and for split-half), ``overlap``
    whether the real sample is part of the reference (:func:`sample_overlap`; split-half: disjoint halves,
    "independent"); ``floor_relation`` / ``floor_independent_estimate`` as in :class:`fd_eval.EvalResult`.
    """

    mode: str
    results: dict[str, dict[str, Any]]
    provenance: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Stats] = field(default_factory=dict, repr=False)  # the real sample's (half a's) statistics
    # InputAccounting.to_dict() per side: "real" (split-half: "real_a", "real_b"), "reference" for an image source
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __getitem__(self, model: str) -> dict[str, Any]:
        return self.results[resolve_name(model)]

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "results": self.results, "provenance": self.provenance,
                "warnings": self.warnings, "skipped": self.skipped, "inputs": self.inputs}


def _item_key(name: str) -> str:
    """The sample key of an item name (``shard.tar:KEY.png``, ``dir/KEY.jpg``): the file name without extension."""
    base = name.rsplit(":", 1)[-1].replace("\\", "/").rsplit("/", 1)[-1]
    return base.split(".", 1)[0]


def sample_overlap(real: Any, n: int | None, seed: int | None, ref: Stats,
                   ref_identity: dict[str, Any]) -> dict[str, Any]:
    """Whether the real sample is part of the reference set, when that can be told.

    Two ways: the reference records the keys of its images (GPIC's npz ``key``): the sample's item keys (file
    names without extension, WebDataset keys for tar shards) are looked up in them; or the reference was computed
    from an image source whose fingerprint equals the real source's (the same files): the sample is a subset.

    Returns ``{"relation": "subset" | "independent" | "partial" | None, "method": "keys" | "fingerprint" | None,
    "in_reference": int | None, "n": int | None}`` (``in_reference`` of the ``n`` sample items are in the
    reference; None when it cannot tell: a statistics file without keys or fingerprint).
    """
    unknown = {"relation": None, "method": None, "in_reference": None, "n": None}
    if not isinstance(real, (str, os.PathLike)):
        return unknown
    src = open_source(os.fspath(real), skip_bad=True)
    sample = src if n is None else src.subset(min(int(n), len(src)), seed=seed)
    keys = ref.extras.get("key")
    if keys is not None and len(keys):
        ref_keys = {str(k) for k in np.asarray(keys).reshape(-1)}
        hits = sum(_item_key(sample.describe(i)) in ref_keys for i in range(len(sample)))
        rel = "subset" if hits == len(sample) else "independent" if hits == 0 else "partial"
        return {"relation": rel, "method": "keys", "in_reference": int(hits), "n": len(sample)}
    fps = {ref_identity.get("fingerprint"), (ref.metadata.get("source") or {}).get("fingerprint")} - {None}
    if fps and src.fingerprint() in fps:
        return {"relation": "subset", "method": "fingerprint", "in_reference": len(sample), "n": len(sample)}
    return unknown


def _first_n(stats: dict[str, Stats]) -> int:
    return next(iter(stats.values())).n


def _skipped(stats: dict[str, Stats]) -> list[dict[str, Any]]:
    return list(next(iter(stats.values())).metadata["source"].get("skipped_items", []))


def ceiling(
    real: str | os.PathLike | Any,
    ref: str | os.PathLike | Stats | dict[str, Stats] = "gpic-test",
    models: ModelsArg = (DEFAULT_EXTRACTOR,),
    *,
    n: int | None = PROTOCOL_N,
    seed: int | None = 0,
    extractors: Sequence[Extractor] | None = None,
    weights: WeightsArg = None,
    image_transform: str | None = None,
    ref_image_transform: str | None = None,
    allow_mismatch: bool = False,
    options: RunOptions | None = None,
    **kw: Any,
) -> CeilingResult:
    """FD of n real images against the reference: the score of a perfect generator at this n (GPIC Table 2).

    Args:
        real: an image source of real images (any format :func:`fd_eval.open_source` reads).
        ref: as in :func:`fd_eval.compute_fd` (registry name, statistics file, ``Stats``, or an image source).
        n: sample size (default 50,000, GPIC's protocol); None: the whole source.
        seed: the sample is ``source.subset(n, seed)``, i.e. ``RandomState(seed).permutation(len)[:n]`` sorted;
            None takes the first n items (use it when the source order is already random).
        image_transform: a named transform for the real images ("center-crop-256" = how GPIC's reference images
            were made, App. B.1: pass it for raw GPIC shards).
        extractors: already loaded extractors (then ``models``, ``weights``, ``resize`` are ignored).
        options, **kw: how the run executes (:class:`fd_eval.RunOptions`), as in :func:`fd_eval.compute_fd`
            (the floor of a fast evaluation is measured in fast mode too).

    Returns:
        :class:`CeilingResult` with ``mode="reference"``.
    """
    t0 = time.perf_counter()
    opts = make_options(options, kw, "ceiling")
    real = open_source(real, skip_bad=opts.skip_bad, offline=opts.offline)  # cheap checks before any weights load
    ref = open_reference(ref, skip_bad=opts.skip_bad)
    resolved = opts.resolve()
    dev = resolved.device
    # a registry reference (access check, download) before any weights: cheap before expensive
    reference = registry_reference_first(ref, models, opts, extractors=extractors,
                                         ref_image_transform=ref_image_transform)
    exs = resolve_extractors(models, extractors, weights, resolved, dev)
    check_decode(opts.decode, exs, source_transform(image_transform) or source_transform(ref_image_transform))
    run = resolved.replace(precision=None, compile=None)  # the extractors are in the options' mode now
    if reference is None:
        reference = resolve_reference(ref, exs, ref_image_transform=ref_image_transform, options=run)
    if not allow_mismatch:  # a mismatch is refused before any real image is decoded
        check_planned(real, exs, reference)
    real_stats = compute_stats(real, extractors=exs, num=n, seed=seed if n is not None else None,
                               image_transform=image_transform, options=run, label=progress_label(
                                   "real", real if isinstance(real, (str, os.PathLike)) else "images", exs))
    results, warnings = evaluate_stats(real_stats, reference, allow_mismatch=allow_mismatch, device=dev)
    overlap = sample_overlap(real, n, seed if n is not None else None, next(iter(reference.stats.values())),
                             reference.identity)
    for name, r in results.items():
        r["floors"] = list(reference.stats[name].metadata.get("floors") or [])
        r["overlap"] = overlap
    if reference.registry_name and reference.registry_name.startswith("gpic") and image_transform is None:
        warnings.append(f"{reference.registry_name}'s images were centre-cropped and resized to 256x256 before "
                        "feature extraction (GPIC App. B.1); if the real images are raw GPIC samples, pass "
                        "--transform center-crop-256 (image_transform=) or the FD measures the crop, not the data")
    src = next(iter(real_stats.values())).metadata["source"]
    skipped = _skipped(real_stats)
    if skipped:
        warnings.append(f"{len(skipped)} unreadable image(s) skipped (--skip-bad); N counts only the rest")
    prov = run_provenance(exs, dev, reference=reference.identity, real={
        "spec": src["spec"], "fingerprint": src["fingerprint"], "n": next(iter(real_stats.values())).n,
        "num": n, "seed": src["seed"], "image_transform": src.get("image_transform"),
        "sampling": "source.subset(n, seed): sorted(numpy.random.RandomState(seed).permutation(len(source))[:n])"
                    if src["seed"] is not None else ("the first n items" if n is not None else "every item"),
        "skipped": len(skipped)}, timings={"total_s": time.perf_counter() - t0})
    inputs = {"real": src.get("inputs", {}), **({"reference": reference.inputs} if reference.inputs else {})}
    return CeilingResult("reference", results, prov, warnings, skipped, real_stats, inputs)


def split_indices(total: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint sorted index sets of size n from range(total) (see ``SPLIT_SAMPLING``); int64."""
    if not 0 <= int(seed) < 2**32:
        raise InputError(f"seed must be in 0..2**32-1, got {seed}")
    perm = np.random.RandomState(int(seed)).permutation(total)
    return np.sort(perm[:n]).astype(np.int64), np.sort(perm[n:2 * n]).astype(np.int64)


def split_half(
    real: str | os.PathLike | Any,
    models: ModelsArg = (DEFAULT_EXTRACTOR,),
    *,
    n: int | None = None,
    seed: int = 0,
    extractors: Sequence[Extractor] | None = None,
    weights: WeightsArg = None,
    image_transform: str | None = None,
    options: RunOptions | None = None,
    **kw: Any,
) -> CeilingResult:
    """FD between two disjoint seeded halves of one real source (real vs real; no reference needed).

    Args:
        real: an image source with at least 2 n images.
        n: images per half; default min(50,000, len(source) // 2).
        seed: seed of the split (``SPLIT_SAMPLING``; half a equals ``source.subset(n, seed)``).
        options, **kw: how the run executes (:class:`fd_eval.RunOptions`).

    Returns:
        :class:`CeilingResult` with ``mode="split-half"``: results[model]["fd"] is FD(half a, half b), ``n`` and
        ``n_ref`` the sizes of half a and half b (after skipped items).
    """
    t0 = time.perf_counter()
    opts = make_options(options, kw, "split_half")
    src = open_source(real, skip_bad=opts.skip_bad, offline=opts.offline)
    total = len(src)
    if n is None:
        n = min(PROTOCOL_N, total // 2)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise InputError(f"{src.spec}: split-half needs at least 2 images per half, got n = {n!r}"
                         + (f" (the source holds {total})" if total < 4 else ""))
    if 2 * n > total:
        raise InputError(f"{src.spec}: split-half needs 2 x {n} = {2 * n} images but the source holds {total}; "
                         f"lower -n to at most {total // 2}")
    resolved = opts.resolve()
    dev = resolved.device
    exs = resolve_extractors(models, extractors, weights, resolved, dev)
    check_decode(opts.decode, exs, source_transform(image_transform))
    idx_a, idx_b = split_indices(total, int(n), seed)
    run = resolved.replace(precision=None, compile=None)
    half_a, half_b = (compute_stats(SubsetSource(src, idx), extractors=exs, image_transform=image_transform,
                                    options=run, label=progress_label(f"half {h}", src.spec, exs))
                      for h, idx in (("a", idx_a), ("b", idx_b)))
    results, warnings = evaluate_stats(half_a, resolve_reference(half_b, exs), device=dev)
    for r in results.values():
        r["floors"] = []
        r["overlap"] = {"relation": "independent", "method": "split", "in_reference": 0, "n": _first_n(half_a)}
    skipped = _skipped(half_a) + _skipped(half_b)
    if skipped:
        warnings.append(f"{len(skipped)} unreadable image(s) skipped (--skip-bad); the halves count only the rest")
    first_a, first_b = next(iter(half_a.values())), next(iter(half_b.values()))
    prov = run_provenance(exs, dev, reference={"kind": "split-half"}, real={
        "spec": src.spec, "fingerprint": src.fingerprint(), "total": total, "n": int(n),
        "n_a": first_a.n, "n_b": first_b.n, "seed": int(seed), "image_transform": image_transform,
        "sampling": SPLIT_SAMPLING, "skipped": len(skipped)}, timings={"total_s": time.perf_counter() - t0})
    inputs = {"real_a": first_a.metadata["source"].get("inputs", {}),
              "real_b": first_b.metadata["source"].get("inputs", {})}
    return CeilingResult("split-half", results, prov, warnings, skipped, half_a, inputs)
