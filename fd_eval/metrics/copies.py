"""Copy detection against the training set: nearest training images of every generated image, in one stream.

A model trained on GPIC's 100M training images can reproduce some of them, and FD cannot tell. The check
(:func:`find_copies`) extracts the generated images' features once, then streams the training images through a
nearest-neighbour consumer (:class:`CopiesConsumer`) that keeps, for each generated image, the top-K training
images by cosine similarity of L2-normalised features. Nothing about the training set is stored but those lists:
memory is O(N_gen * K) plus one batch, whatever the number of training images. The top-K is exact and order-free
(:mod:`fd_eval.core.topk`): any partition of the training set (units, ranks, resumed runs) merges to one pass's lists.

Also reported, per extractor: the distribution of top-1 similarity (quantiles, histogram), the number and
fraction above a copy threshold (default: SSCD's published operating point, 0.75), AuthPct (dgm-eval; a second,
cheap consumer pass over the training set) and C_T (Meehan et al. 2020, dgm-eval's ``compute_CTscore``) when a
held-out real set is given (``test=``) (:mod:`fd_eval.metrics.copy_metrics`). See docs/copies.md for the definitions.

The passes run on the unit engine (:mod:`fd_eval.run.engine`) over the units of :func:`fd_eval.run.engine.plan_units`
(one per tar shard, else blocks): each unit gets fresh consumers whose declared state is saved
(``checkpoint_dir``) and merged exactly, so a killed run resumes to the same result, and under torchrun each rank
takes every W-th unit and the states are merged over ranks by their declared rules.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.consumers import merge_over_ranks, merge_topk  # noqa: F401 - merge_topk: public here too
from ..core.topk import (  # noqa: F401 - re-exported: fd_eval.metrics.copies is where these were first public
    _WORK_ELEMENTS,
    EMPTY,
    MAX_KEY,
    FeatureCollector,
    FeatureShardWriter,
    TopKConsumer,
    TopKState,
    pack,
    read_feature_shards,
    unpack,
)
from ..errors import CheckpointError, EmptySourceError, FDEvalError, InputError
from ..extractors import Extractor
from ..run import engine
from ..run.engine import Unit, UnitFiles, carry_error, key_diffs, share_units, skipped_items
from ..run.options import ResolvedRun, RunOptions, make_options
from ..run.pipeline import FeatureConsumer  # noqa: F401 - the interface the consumers implement
from ..sources import ImageSource, SkippedItem, open_source
from .copies_result import (  # noqa: F401 - re-exported: fd_eval.metrics.copies is where these were first public
    HIST_EDGES,
    QUANTILES,
    CopiesResult,
    _model_result,
    _model_results,
    _provenance_and_inputs,
    _summary,
)
from .copy_metrics import (  # noqa: F401 - re-exported: fd_eval.metrics.copies is where these were first public
    CellModel,
    CellNNConsumer,
    CopiesConsumer,
    _gib,
    authpct,
    available_memory,
    ct_from_distances,
    fit_cells,
    kmeans,
    memory_needed,
    pair_distances,
)

# name -> published copy threshold (SSCD README, 90% precision DISC)
COPY_DETECTORS = {"sscd-disc-mixup": 0.75, "sscd-disc-mixup-short288": 0.75}
DEFAULT_MODELS = ("sscd-disc-mixup",)


# --- the passes: on the unit engine (checkpoint units, ranks, exact merges) ---------------------------------------
COPIES_FORMAT = "fd-eval-copies-unit/1"
_META = "fd_eval_copies"
_QUERIES = "queries.safetensors"
_WHAT = {"extractors": "models, weights or preprocessing", "gen": "GEN images", "test": "--test images",
         "train": "--train source or its units (--checkpoint-every)", "top_k": "--top", "authpct": "AuthPct on/off",
         "batch_size": "--batch-size", "device": "device type", "decode": "--decode", "precision": "--precision"}


@dataclass
class _Run:
    """What every pass of one :func:`find_copies` call shares: the resolved run and the checkpoint's identity."""

    extractors: list[Extractor]
    opts: ResolvedRun
    ckpt: Path | None
    identity: dict[str, Any]
    log: Any

    @property
    def device(self) -> torch.device:
        return self.opts.device

    @property
    def rank(self) -> int:
        return self.opts.rank

    @property
    def world(self) -> int:
        return self.opts.world_size

    @property
    def skip_bad(self) -> bool:
        return self.opts.skip_bad

    @property
    def progress(self) -> bool:
        return self.opts.progress

    def files(self, kind: str) -> UnitFiles | None:
        """The unit files of pass ``kind`` ("train", "authpct") in the checkpoint folder (None: no checkpoints)."""
        if self.ckpt is None:
            return None
        return UnitFiles(self.ckpt, COPIES_FORMAT, self.identity, meta_key=_META, prefix=f"{kind}-",
                         what="an fd-eval copies checkpoint", diffs=functools.partial(key_diffs, names=_WHAT),
                         extra_names=(_QUERIES,), save_file=lambda p, h, t: save_unit_file(p, h, t, _META))


def save_unit_file(path: Path, header: dict[str, Any], tensors: dict[str, torch.Tensor], meta_key: str = _META
                   ) -> None:
    """Write one checkpoint file atomically (:func:`fd_eval.run.engine.save_unit_file`; looked up at each write, so a
    test can hook the writes of ``copies``)."""
    engine.save_unit_file(path, header, tensors, meta_key)


def _collect(src: ImageSource, run: _Run, desc: str) -> tuple[list[torch.Tensor], np.ndarray, list[SkippedItem]]:
    """Features of every readable image of ``src`` (held in memory: the queries), per extractor, with their
    positions. Ranks extract units r, r + W, ... (the same units and batches as one process) and sum the
    zero-padded matrices (exact: each row is non-zero on one rank only)."""
    cols = [FeatureCollector(len(src), ex.feature_dim, run.device) for ex in run.extractors]
    skipped: list[SkippedItem] = []
    _, mine = share_units(engine.plan_units(src).units, set(), run.opts)
    with tqdm(total=sum(len(u) for u in mine), unit="img", desc=desc, disable=not run.progress or run.rank != 0) as bar:
        error = engine.scan_units(src, run.extractors, mine, run.opts, fresh=lambda u: cols, bar=bar,
                                  on_unit=lambda u, d: skipped.extend(d.skipped), n_planned=len(src))
    carry_error(run.opts, error)
    if run.world > 1:
        import torch.distributed as dist

        from ..run.distributed import all_gather_json, comm_device

        cd = comm_device(prefer=run.device)
        for c in cols:
            f, s = c.features.to(cd), c.seen.to(cd, torch.int32)
            dist.all_reduce(f)
            dist.all_reduce(s)
            c.features, c.seen = f.to(run.device), s.to(run.device) > 0
        skipped = [SkippedItem(**d) for part in all_gather_json([s.to_dict() for s in skipped]) for d in part]
    seen = cols[0].seen.cpu().numpy()
    if not seen.any():
        raise EmptySourceError(f"{src.spec}: no readable images ({len(skipped)} skipped)")
    return [c.features[c.seen] for c in cols], np.flatnonzero(seen), skipped


def _queries(gen_src: ImageSource, test_src: ImageSource | None, run: _Run) -> dict[str, Any]:
    """Generated (and held-out) features: extracted, or read back from the checkpoint folder on a resume (so
    a resumed run compares against exactly the same queries)."""
    names = [ex.name for ex in run.extractors]
    files = run.files("train")
    path = run.ckpt / _QUERIES if run.ckpt is not None else None
    have = path is not None and path.exists()
    if run.world > 1:
        from ..run.distributed import all_gather_json

        have = bool(all_gather_json(have)[0])  # rank 0's view (a shared folder)
    if have:
        header, t = files.read(path)
        files.check_identity(path, header)
        run.log(f"resuming from {run.ckpt}: generated{' and held-out' if test_src else ''} features read back")
        return {"gen": [t[f"{n}.gen"].to(run.device) for n in names], "gen_idx": t["gen_index"].numpy(),
                "test": [t[f"{n}.test"].to(run.device) for n in names] if test_src is not None else None,
                "skipped": {k: [SkippedItem(**d) for d in v] for k, v in header["skipped"].items()}}
    gen, gen_idx, gen_skipped = _collect(gen_src, run, "generated")
    test, test_skipped = None, []
    if test_src is not None:
        test, _, test_skipped = _collect(test_src, run, "held-out")
        if test[0].shape[0] < 3:
            raise InputError(f"{test_src.spec}: C_T needs at least 3 held-out images (3 k-means cells), got "
                             f"{test[0].shape[0]}; pass a larger held-out set or none")
    out = {"gen": gen, "gen_idx": gen_idx, "test": test, "skipped": {"gen": gen_skipped, "test": test_skipped}}
    if path is not None and run.rank == 0:
        tensors = {f"{n}.gen": f.cpu() for n, f in zip(names, gen)} | {"gen_index": torch.from_numpy(gen_idx)}
        if test is not None:
            tensors |= {f"{n}.test": f.cpu() for n, f in zip(names, test)}
        header = {"format": COPIES_FORMAT, "identity": files.identity,
                  "skipped": {k: [s.to_dict() for s in v] for k, v in out["skipped"].items()}}
        save_unit_file(path, header, tensors, _META)
    return out


@dataclass
class _Pass:
    """One training pass's running total on this rank (units folded in as they end, or read back)."""

    run: _Run
    base: list[CopiesConsumer]
    files: UnitFiles | None
    total: list[CopiesConsumer] = field(default_factory=list)
    skipped: list[SkippedItem] = field(default_factory=list)
    n_saved: int = 0

    def __post_init__(self) -> None:
        self.total = [b.fresh() for b in self.base]

    def finish(self, unit: Unit, cons: list[CopiesConsumer], bad: list[SkippedItem]) -> None:
        """A unit is complete: check its keys, close its writers, save its states, fold it into the total."""
        for c in cons:
            c.topk.check_keys()
            if c.writer is not None:
                c.writer.close()
        if self.files is not None:
            tensors, _ = engine.encode_states({ex.name: c for ex, c in zip(self.run.extractors, cons)})
            try:
                self.files.save(unit, {"rank": self.run.rank, "skipped": [s.to_dict() for s in bad]}, tensors)
            finally:  # counted once on disk, also when an interrupt lands right after the rename
                self.n_saved += self.files.path(unit.index).exists()
        for t, c in zip(self.total, cons):
            t.merge(c)
        self.skipped.extend(bad)

    def load(self, done: dict[int, dict[str, Any]], units: Sequence[Unit]) -> None:
        """Rank 0 folds in the units saved by earlier runs (checked by :meth:`UnitFiles.scan`)."""
        for k in sorted(done):
            path = self.files.path(k)
            header, t = self.files.read(path)
            self.files.check(path, header, units, skip_bad=self.run.skip_bad)
            parts = {ex.name: b.fresh() for ex, b in zip(self.run.extractors, self.base)}
            try:
                engine.decode_states(parts, t)
            except ValueError as e:
                raise CheckpointError(f"{path}: damaged checkpoint ({e}); delete it to recompute that unit") from None
            for tot, c in zip(self.total, parts.values()):
                tot.merge(c)
            self.skipped.extend(skipped_items(header))


def _training_pass(kind: str, train: ImageSource, units: Sequence[Unit], base: list[CopiesConsumer], run: _Run,
                   *, save_features: Path | None = None, read_features: Path | None = None
                   ) -> tuple[list[CopiesConsumer], list[SkippedItem], int]:
    """One streaming pass over the training units on the unit engine, one fresh consumer per unit and extractor.

    Each finished unit's state is saved as ``{kind}-{k:06d}.safetensors`` in the checkpoint folder (when there is
    one) and folded into this rank's total; units already saved are read back instead (by rank 0). Ranks take
    every W-th unit left, then the totals are merged over ranks (exact, by the consumers' declared rules). Returns
    (merged consumers, skipped items, units resumed); the same on every rank.
    """
    exs, files = run.extractors, run.files(kind)
    found = files.scan(units, skip_bad=run.skip_bad) if files is not None and run.rank == 0 else {}
    done, mine = share_units(units, set(found), run.opts)
    p = _Pass(run, base, files)

    def writers(unit: Unit) -> list[FeatureShardWriter | None]:
        if save_features is None:
            return [None] * len(exs)
        return [FeatureShardWriter(save_features / ex.name, {**ex.metadata(), "source": train.spec},
                                   prefix=f"features-{unit.index:06d}-", dim=ex.feature_dim) for ex in exs]

    made: dict[int, list[CopiesConsumer]] = {}

    def fresh(unit: Unit) -> list[CopiesConsumer]:
        made[unit.index] = [b.fresh(w) for b, w in zip(base, writers(unit))]
        return made[unit.index]

    error = None
    try:
        if run.rank == 0 and found:
            run.log(f"resuming from {run.ckpt}: {len(found)} of {len(units)} {kind} units already done")
            p.load(found, units)
        with tqdm(total=sum(len(u) for u in mine), unit="img", desc=f"training ({kind})",
                  disable=not run.progress or run.rank != 0) as bar:
            if read_features is not None:  # saved features: no decode, no network
                for u in mine:
                    cons = [b.fresh() for b in base]
                    for ex, c in zip(exs, cons):
                        for f, i in read_feature_shards(read_features / ex.name, unit=u.index):
                            c.update(f.to(run.device), i.to(run.device))
                    p.finish(u, cons, [])
                    bar.update(len(u))
            else:
                error = engine.scan_units(train, exs, mine, run.opts, fresh=fresh, bar=bar,
                                          on_unit=lambda u, d: p.finish(u, made.pop(u.index), d.skipped),
                                          n_planned=sum(len(u) for u in units))
    except FDEvalError as e:
        if run.world == 1:
            raise
        error = e
    except BaseException:
        if files is not None and (p.n_saved or done):
            run.log(f"{len(done) + p.n_saved} of {len(units)} {kind} units are saved in {run.ckpt}; run the same "
                    "command again to resume")
        raise
    carry_error(run.opts, error)
    if run.world == 1:
        return p.total, sorted(p.skipped, key=_item_order), len(done)
    from ..run.distributed import all_gather_json

    skipped = [SkippedItem(**d) for part in all_gather_json([s.to_dict() for s in p.skipped]) for d in part]
    return _merge_ranks(p.total, run), sorted(skipped, key=_item_order), len(done)


def _item_order(s: SkippedItem) -> tuple[int, str]:
    return (s.index if s.index is not None else -1, s.name)


def _merge_ranks(total: list[CopiesConsumer], run: _Run) -> list[CopiesConsumer]:
    """Collective: every rank's states merged by their declared rules, in rank order (the same on every rank)."""
    return merge_over_ranks(total, device=run.device)  # type: ignore[return-value]


def _cleanup(ckpt: Path) -> None:
    """Remove this module's files from the checkpoint folder, then the folder if nothing else is left in it."""
    for kind in ("authpct", "train"):
        UnitFiles(ckpt, COPIES_FORMAT, {}, prefix=f"{kind}-", extra_names=(_QUERIES,)).cleanup()


def _open_sources(gen: Any, train: Any, train_index: Any, test: Any, skip_bad: bool, offline: bool | None
                  ) -> tuple[ImageSource, Any, ImageSource | None, Any]:
    """GEN, --train (or --train-index) and --test opened and checked (before any weights load; a remote source
    offline fails). Returns (gen, train source, test, the opened training index or None)."""
    gen_src = open_source(gen, skip_bad=skip_bad, offline=offline)
    index = None
    if train_index is not None:
        from ..index import open_index
        from ..index.copies_pass import IndexTrain

        index = open_index(train_index) if isinstance(train_index, (str, os.PathLike)) else train_index
        train_src = IndexTrain(index)
    else:
        try:
            train_src = open_source(train, skip_bad=skip_bad, offline=offline)
        except EmptySourceError as e:
            raise EmptySourceError(f"training source (--train) is empty: {e}") from None
    test_src = open_source(test, skip_bad=skip_bad, offline=offline) if test is not None else None
    if len(train_src) == 0:
        raise EmptySourceError(f"{train_src.spec}: the training source holds no images; --train must point at the "
                               "training images (or the reference test set for a leak check)")
    if len(train_src) > MAX_KEY + 1:
        raise InputError(f"{train_src.spec}: {len(train_src)} training images; the top-K keys hold at most "
                         f"{MAX_KEY + 1}; split --train into parts")
    return gen_src, train_src, test_src, index


def _check_training_args(train: Any, train_index: Any, save_features: Any, approximate: bool) -> None:
    if (train is None) == (train_index is None):
        raise InputError("pass the training images (--train SOURCE, train=) or a training index (--train-index DIR, "
                         "train_index=), one of the two")
    if save_features is not None and train_index is not None:
        raise InputError("--save-features saves the training features of a --train pass; with --train-index they "
                         "are already stored in the index")
    if approximate and train_index is None:
        raise InputError("--approximate searches a training index: pass --train-index DIR (fd-eval index build)")


def _train(index: Any, train_src: Any, plan: engine.UnitPlan, base: list[CopiesConsumer], run: _Run,
           gen_feats: list[torch.Tensor], feats_dir: Path | None, compute_authpct: bool, approximate: bool
           ) -> tuple[list[CopiesConsumer], list[SkippedItem], int, Any, list[torch.Tensor | None]]:
    """The training side: a pass over the training images (unit engine), or a scan of a training index.
    Returns (merged consumers, skipped training items, units resumed, the index search record, AuthPct's
    similarities per model)."""
    search = None
    if index is not None:
        from ..index.copies_pass import index_authpct_pass, index_search

        consumers, search = index_search(index, gen_feats, base, run, keep_top1_features=compute_authpct,
                                         approximate=approximate)
        skipped, resumed = [SkippedItem(**d) for d in index.skipped()], 0
    else:
        consumers, skipped, resumed = _training_pass("train", train_src, plan.units, base, run,
                                                     save_features=feats_dir)
    n_train = consumers[0].topk.state.n_seen
    if n_train == 0:
        raise EmptySourceError(f"{train_src.spec}: every training image was skipped as unreadable ({len(skipped)})")
    auth: list[torch.Tensor | None] = [None] * len(consumers)
    if compute_authpct and n_train > 1:
        auth = (index_authpct_pass(index, consumers, run) if index is not None  # type: ignore[assignment]
                else _authpct_sims(consumers, train_src, plan, run, feats_dir))
    return consumers, skipped, resumed, search, auth


def _check_memory(models: Any, extractors: Sequence[Extractor] | None, gen_src: ImageSource, n_test: int,
                  top_k: int, dev: torch.device) -> list[str]:
    """The models' names; raises InputError when the top-K lists of GEN do not fit (before any weights load)."""
    if extractors is None:
        from ..extractors import extractor_entry

        entries = [extractor_entry(m) for m in ([models] if isinstance(models, str) else list(models))]
        names, dims = [e.name for e in entries], [e.feature_dim for e in entries]
    else:
        names, dims = [ex.name for ex in extractors], [ex.feature_dim for ex in extractors]
    need = sum(memory_needed(len(gen_src), top_k, d, n_test) for d in dims)
    have = available_memory(dev)
    if need > have:
        raise InputError(f"{gen_src.spec}: {len(gen_src)} generated images with top-K = {top_k} for "
                         f"{', '.join(names)} need {_gib(need)} on {dev}, {_gib(have)} free; "
                         "lower --top, use fewer models, or split GEN into parts")
    return names


def _features_folder(save_features: str | os.PathLike | None, ckpt: Path | None) -> Path | None:
    """``--save-features``: refused when it already holds features and no run is being resumed."""
    feats_dir = Path(save_features) if save_features is not None else None
    resuming = ckpt is not None and ((ckpt / _QUERIES).exists() or any(ckpt.glob("train-*.safetensors")))
    if feats_dir is not None and not resuming and any(feats_dir.glob("*/features-*.safetensors")):
        raise InputError(f"{feats_dir}: already holds saved features (features-*.safetensors) and no run is being "
                         "resumed; delete them or choose another --save-features folder")
    return feats_dir


def _thresholds(names: Sequence[str], threshold: float | None) -> dict[str, float]:
    out = {}
    for name in names:
        if threshold is None and name not in COPY_DETECTORS:
            warnings.warn(f"{name} is not a copy detector: the default copy threshold 0.75 is SSCD's operating "
                          f"point; pass --threshold (threshold=) calibrated for {name}", UserWarning, stacklevel=3)
        out[name] = float(threshold if threshold is not None else COPY_DETECTORS.get(name, 0.75))
    return out


def _identity(exs: Sequence[Extractor], gen_src: ImageSource, test_src: ImageSource | None,
              train_src: ImageSource, plan: engine.UnitPlan, top_k: int, compute_authpct: bool,
              run: ResolvedRun) -> dict[str, Any]:
    """What every checkpoint file of one copies run must share (JSON-normalised)."""
    return json.loads(json.dumps({
        "extractors": [{k: ex.metadata()[k] for k in ("extractor", "feature_dim", "weights_sha256", "preprocess")}
                       for ex in exs],
        "precision": [ex.metadata().get("precision") for ex in exs],
        "gen": gen_src.fingerprint(), "test": test_src.fingerprint() if test_src is not None else None,
        "train": {"spec": str(train_src.spec), "kind": plan.kind, "checkpoint_every": plan.checkpoint_every,
                  "n_units": len(plan.units), "n_items": plan.n_items},
        "top_k": int(top_k), "authpct": bool(compute_authpct), "batch_size": run.batch_size,
        "device": run.device.type, "decode": run.decode}))


def _authpct_sims(consumers: list[CopiesConsumer], train_src: ImageSource, plan: engine.UnitPlan, run: _Run,
                  feats_dir: Path | None) -> list[torch.Tensor | None]:
    """AuthPct's second pass: each generated image's top-1 training image against every other training image."""
    second = []
    for c in consumers:
        _, keys, _ = unpack(c.topk.state.packed[:, :1])
        second.append(CopiesConsumer(None, topk=TopKConsumer(c.topk.state.top1_features, 1, exclude=keys[:, 0])))
    second, _, _ = _training_pass("authpct", train_src, plan.units, second, run, read_features=feats_dir)
    return [unpack(s.topk.state.packed)[0][:, 0] for s in second]


def find_copies(
    gen: "str | os.PathLike | np.ndarray | ImageSource",
    train: "str | os.PathLike | np.ndarray | ImageSource | None" = None,
    *,
    train_index: "str | os.PathLike | Any | None" = None,
    approximate: bool = False,
    models: Sequence[str] | str = DEFAULT_MODELS,
    top_k: int = 5,
    threshold: float | None = None,
    test: "str | os.PathLike | np.ndarray | ImageSource | None" = None,
    compute_authpct: bool = True,
    save_features: str | os.PathLike | None = None,
    weights: "str | dict[str, str] | None" = None,
    extractors: Sequence[Extractor] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    json_path: str | os.PathLike | None = None,
    sheet: str | os.PathLike | None = None,
    sheet_rows: int = 16,
    log: Any = None,
    options: RunOptions | None = None,
    **kw: Any,
) -> CopiesResult:
    """Find the training images nearest to each generated image, per extractor.

    Args:
        gen: the generated images (any image source; its features are held in memory).
        train: the training images, streamed once (any source: folders, tar shard ranges, hf:// templates); the
            reference test set for a leak check.
        train_index: instead of ``train``, a training index folder (:func:`fd_eval.build_index`, or an opened
            :class:`fd_eval.index.TrainingIndex`): no training image is decoded; the same result (bit-identical
            top-K and similarities for a float32 index). Refused when made with another extractor, weights or
            preprocessing. ``approximate``: search it with FAISS (IVF, candidates re-scored exactly; the result
            records ``search.recall_at_1`` measured against an exact scan of a sample of the queries).
        models: extractor names (default SSCD ``sscd-disc-mixup``; any DINOv2 works too).
        top_k: training neighbours kept per generated image.
        threshold: copy threshold on top-1 cosine similarity (default SSCD's 0.75; required in spirit for other
            models: a warning says the default is SSCD's).
        test: held-out real images (e.g. the reference test set) for C_T; None: ``ct`` is null.
        compute_authpct: AuthPct needs a second pass over the training set (features only, no images kept).
        save_features: folder where the training features are saved as shards (``<folder>/<model>/``,
            :class:`FeatureShardWriter`, one series per unit); AuthPct's second pass then reads them.
        weights: local weights (a path for one model, or {model: path}). ``extractors``: ready extractors.
        checkpoint_dir: where each finished training unit's top-K state is saved (resumable: the same call
            continues where a killed one stopped, with a bit-identical result); removed when done. None: no
            checkpoints. ``checkpoint_every``: images per unit (default one per tar shard, else 10,000).
        json_path / sheet: write the JSON document / a contact sheet PNG of the top suspected copies (rank 0).
        log: where one-line notes go (resume); default stderr when ``progress``.
        options, **kw: how the run executes (:class:`fd_eval.RunOptions`: device, batch_size, num_workers,
            precision, decode, skip_bad, progress, ...). Under torchrun each rank takes every W-th unit and the
            states are merged exactly over ranks; every rank gets the result.

    Returns:
        :class:`CopiesResult` (with per-source ``inputs`` accounting). Raises :class:`EmptySourceError` for an
        empty training source, :class:`InputError` when the top-K lists of ``gen`` do not fit in memory (the
        message says how much is needed), :class:`CheckpointError` when ``checkpoint_dir`` belongs to other
        settings or data.
    """
    opts = make_options(options, kw, "find_copies")
    from ..run.preflight import check_outputs

    check_outputs({"GEN": gen, "--train": train, "--train-index": train_index, "--test": test, "--weights": weights},
                  {"--json": json_path, "--sheet": sheet},
                  {"--save-features": save_features, "--checkpoint-dir": checkpoint_dir})  # before any work
    _check_limits(top_k, threshold)
    say = log or ((lambda m: print(m, file=sys.stderr, flush=True)) if opts.progress else (lambda m: None))
    resolved = opts.resolve()
    _check_training_args(train, train_index, save_features, approximate)
    gen_src, train_src, test_src, index = _open_sources(gen, train, train_index, test, opts.skip_bad, opts.offline)
    names = _check_memory(models, extractors, gen_src, len(test_src) if test_src is not None else 0, top_k,
                          resolved.device)
    thresholds = _thresholds(names, threshold)
    plan = (engine.plan_units(train_src, checkpoint_every=checkpoint_every) if index is None  # positions in train
            else train_src.plan())
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    feats_dir = _features_folder(save_features, ckpt)
    run = _start_run(models, extractors, weights, resolved, index, gen_src, test_src, train_src, plan, top_k,
                     compute_authpct, ckpt, say)
    exs = run.extractors
    q = _queries(gen_src, test_src, run)
    gen_feats, gen_idx, test_feats = q["gen"], q["gen_idx"], q["test"]
    base = _copies_consumers(gen_feats, test_feats, top_k, compute_authpct)
    consumers, train_skipped, resumed, search, auth_sims = _train(index, train_src, plan, base, run, gen_feats,
                                                                  feats_dir, compute_authpct, approximate)
    n_train = consumers[0].topk.state.n_seen
    results, arrays = _model_results(exs, consumers, auth_sims, test_feats, gen_src, gen_idx, train_src, thresholds,
                                     top_k, n_train, search)
    n = {"gen": len(gen_idx), "train": int(n_train), "test": int(test_feats[0].shape[0]) if test_feats else 0}
    prov, inputs = _provenance_and_inputs(exs, run, {"gen": gen_src, "train": train_src, "test": test_src}, q, n,
                                          train_skipped, plan, resumed, compute_authpct)
    if index is not None:
        prov["train_index"] = train_src.provenance()
    out = CopiesResult(results, prov, arrays, inputs)
    _finish(out, run, gen_src, train_src, json_path, sheet, sheet_rows)
    return out


def _check_limits(top_k: Any, threshold: float | None) -> None:
    """``--top`` and ``--threshold`` before any work."""
    if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1:
        raise InputError(f"--top must be a positive integer, got {top_k!r}")
    if threshold is not None and not -1 <= threshold <= 1:
        raise InputError(f"--threshold is a cosine similarity in [-1, 1], got {threshold!r}")


def _start_run(models: Any, extractors: Sequence[Extractor] | None, weights: Any, resolved: ResolvedRun,
               index: Any, gen_src: ImageSource, test_src: ImageSource | None, train_src: Any,
               plan: engine.UnitPlan, top_k: int, compute_authpct: bool, ckpt: Path | None, say: Any) -> _Run:
    """The extractors (checked against a training index before any image is decoded), the run's identity and its
    checkpoint folder (created by rank 0)."""
    from ..api import resolve_extractors

    exs = resolve_extractors(models, extractors, weights, resolved, resolved.device)
    for ex in exs if index is not None else []:  # before any image is decoded
        index.check_extractor(ex.name, ex.metadata())
    identity = _identity(exs, gen_src, test_src, train_src, plan, top_k, compute_authpct, resolved)
    run = _Run(exs, resolved, ckpt, identity, say if resolved.is_main else (lambda m: None))
    if ckpt is not None and resolved.is_main:
        ckpt.mkdir(parents=True, exist_ok=True)
    return run


def _copies_consumers(gen_feats: list[torch.Tensor], test_feats: list[torch.Tensor] | None, top_k: int,
                      compute_authpct: bool) -> list[CopiesConsumer]:
    """Per extractor: the top-K search of the generated features (and C_T's cells when a test set is given)."""
    return [CopiesConsumer(gen_feats[j], top_k, keep_top1_features=compute_authpct,
                           cells=None if test_feats is None else CellNNConsumer(
                               fit_cells(test_feats[j]), torch.cat([test_feats[j], gen_feats[j]])))
            for j in range(len(gen_feats))]


def _finish(out: CopiesResult, run: _Run, gen_src: ImageSource, train_src: Any, json_path: Any, sheet: Any,
            sheet_rows: int) -> None:
    """Rank 0 writes the JSON and the contact sheet and removes the checkpoint folder (after every rank is done
    with it)."""
    from ..run.distributed import barrier

    if run.world > 1:
        barrier(run.device)  # every rank is past the checkpoint files before rank 0 removes them
    if run.opts.is_main:
        if json_path is not None:
            out.save_json(json_path)
        if sheet is not None:
            contact_sheet(out, gen_src, train_src, sheet, model=run.extractors[0].name, rows=sheet_rows)
        if run.ckpt is not None:
            _cleanup(run.ckpt)


def contact_sheet(result: CopiesResult, gen: ImageSource, train: Any, path: str | os.PathLike, *,
                  model: str, rows: int = 16, thumb: int = 160) -> Path:
    """PNG grid of the ``rows`` most similar pairs, copies first, captions wrapped
    (:func:`fd_eval.outputs.contact_sheet.contact_sheet`)."""
    from ..outputs.contact_sheet import contact_sheet as grid

    return grid(result, gen, train, path, model=model, rows=rows, thumb=thumb)
