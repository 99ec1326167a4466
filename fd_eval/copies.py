"""Copy detection against the training set: nearest training images of every generated image, in one stream.

A model trained on GPIC's 100M training images can reproduce some of them, and FD cannot tell. The check
(:func:`find_copies`) extracts the generated images' features once, then streams the training images through a
nearest-neighbour consumer (:class:`CopiesConsumer`) that keeps, for each generated image, the top-K training
images by cosine similarity of L2-normalised features. Nothing about the training set is stored but those lists:
memory is O(N_gen * K) plus one batch, whatever the number of training images.

Exact and order-free top-K: a similarity (float32) and a training key (int64 position in the training source,
< 2**32 - 1) are packed into one int64 whose order is (similarity descending, key ascending), so the kept lists
are a pure function of the set of (image, training image) pairs seen: ties are broken by key, and
:func:`merge_topk` of the lists of any partition of the training set (shards, torchrun ranks, resumed runs)
equals one pass over all of it. Similarities are float64 dot products of the float32 unit vectors, rounded to
float32, so they do not depend on how the training images were batched.

Also reported, per extractor: the distribution of top-1 similarity (quantiles, histogram), the number and
fraction above a copy threshold (default: SSCD's published operating point, 0.75), AuthPct (dgm-eval; a second,
cheap consumer pass over the training set) and C_T (Meehan et al. 2020, dgm-eval's ``compute_CTscore``) when a
held-out real set is given (``test=``). See docs/copies.md for the definitions and the choices made.

The passes run through the one extraction loop (:func:`fd_eval.pipeline.run_units`, the consumers implement its
``FeatureConsumer``) over the units of :func:`fd_eval.build.plan_units` (one per tar shard, else blocks): each unit
gets fresh consumers whose state is saved (``checkpoint_dir``) and merged exactly, so a killed run resumes to the
same result, and under torchrun each rank takes every W-th unit and the states are merged over ranks.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ._version import __version__
from .build import save_unit_file
from .consumers import Consumer, merge_topk  # noqa: F401 - merge_topk: public here too
from .errors import CheckpointError, EmptySourceError, FDEvalError, InputError
from .extractors import Extractor
from .io_utils import atomic_path, atomic_write
from .options import ResolvedRun, RunOptions, make_options
from .pipeline import FeatureConsumer  # noqa: F401 - the interface the consumers below implement
from .provenance import environment
from .sources import ImageSource, SkippedItem, open_source

COPY_DETECTORS = {"sscd-disc-mixup": 0.75}  # name -> published copy threshold (SSCD README, 90% precision DISC)
DEFAULT_MODELS = ("sscd-disc-mixup",)
QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0)
HIST_EDGES = tuple(round(-1 + 0.025 * i, 3) for i in range(81))  # cosine similarity -1..1 in steps of 0.025
MAX_KEY = 2**32 - 2  # keys use the low 32 bits of the packed int64; 2**32 - 1 marks an empty slot
EMPTY = torch.iinfo(torch.int64).min
_MASK32 = 0xFFFFFFFF
_WORK_ELEMENTS = 1 << 22  # rows x columns of one similarity block (float64 + int64: 64 MiB)


# --- packed (similarity, key) top-K -------------------------------------------------------------------------
def pack(sims: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """float32 similarities (..., B) and int64 keys (B,) or (..., B), 0 <= key <= MAX_KEY -> int64 (..., B) whose
    integer order is (similarity ascending, key descending); so ``topk`` keeps the highest similarities, the
    smallest key first among equal ones. -0.0 is taken as +0.0; NaN is not expected."""
    bits = (sims.float() + 0.0).view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: larger magnitude -> smaller int
    return (ordered.to(torch.int64) << 32) | (_MASK32 - keys)  # sign-extended: negative floats stay negative


def unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack`: (similarity float32, key int64, valid bool), each of ``packed``'s shape; empty slots
    (fewer training images than K, or excluded keys) are invalid with similarity NaN and key -1."""
    ordered = packed >> 32
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(torch.int32)
    sims = bits.view(torch.float32).clone()
    keys = _MASK32 - (packed & _MASK32)
    valid = (packed != EMPTY) & torch.isfinite(sims)
    return sims.masked_fill(~valid, float("nan")), keys.masked_fill(~valid, -1), valid


@dataclass
class TopKState:
    """A :class:`TopKConsumer`'s mergeable state.

    packed: int64 (Q, K), best first (:func:`unpack`). top1_features: float32 (Q, D) unit vectors of each row's
    current top-1 training image (for AuthPct), or None. n_seen: training images seen.
    """

    packed: torch.Tensor
    top1_features: torch.Tensor | None = None
    n_seen: int = 0

    def merge(self, other: "TopKState") -> "TopKState":
        """The state one pass over both parts would have (exact; any order of merging gives the same)."""
        packed = merge_topk(self.packed, other.packed)
        feats = None
        if self.top1_features is not None and other.top1_features is not None:
            from_other = (packed[:, 0] == other.packed[:, 0]) & (packed[:, 0] != self.packed[:, 0])
            feats = torch.where(from_other[:, None], other.top1_features, self.top1_features)
        return TopKState(packed, feats, self.n_seen + other.n_seen)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors for a safetensors shard checkpoint (resumable runs save one per training shard)."""
        d = {"packed": self.packed.cpu(), "n_seen": torch.tensor([self.n_seen], dtype=torch.int64)}
        if self.top1_features is not None:
            d["top1_features"] = self.top1_features.cpu()
        return d

    @classmethod
    def from_state_dict(cls, d: dict[str, torch.Tensor]) -> "TopKState":
        return cls(d["packed"], d.get("top1_features"), int(d["n_seen"][0]))


class TopKConsumer(Consumer):
    """Keeps, per query, the K training images of highest cosine similarity (ties: smallest key).

    Declared state: ``packed`` int64 (Q, K) (top-K merge; jointly with ``top1_features`` float32 (Q, D) when
    kept), ``n_seen`` (sum; saved as an int64 (1,) tensor). :attr:`state` is the same as a :class:`TopKState`.

    Args:
        queries: (Q, D) float features of the generated images (normalised here).
        k: list length K (>= 1).
        keep_top1_features: also keep each row's top-1 training feature (for :func:`authpct`).
        exclude: optional int64 (Q,) training key per query never to be kept (a training image's own key when
            the queries are training images).
    """

    def __init__(self, queries: torch.Tensor, k: int, *, keep_top1_features: bool = False,
                 exclude: torch.Tensor | None = None):
        if k < 1:
            raise InputError(f"top-K needs K >= 1, got {k}")
        super().__init__(queries.device)
        self.queries = F.normalize(queries.double(), dim=1)
        q, d = queries.shape
        self.k = int(k)
        self.add_state("packed", torch.full((q, self.k), EMPTY, dtype=torch.int64), merge="topk")
        self.add_state("n_seen", 0, merge="sum", as_tensor=True)
        if keep_top1_features:
            self.add_state("top1_features", torch.zeros(q, d))
            self.add_joint_merge(("packed", "top1_features"), _merge_top1)
        else:
            self.top1_features = None
        # checked in check_keys() after the pass: reading a device value in update would stall the loop on a GPU
        self.add_state("bad_keys", torch.zeros((), dtype=torch.bool), merge=torch.logical_or, persistent=False)
        self.exclude = None if exclude is None else exclude.to(queries.device, torch.int64)

    @property
    def state(self) -> TopKState:
        return TopKState(self.packed, self.top1_features, self.n_seen)

    @state.setter
    def state(self, st: TopKState) -> None:
        self.packed, self.top1_features, self.n_seen = st.packed, st.top1_features, st.n_seen

    def check_keys(self) -> None:
        """Raise if any training key fed was outside 0..MAX_KEY (checked once, after the pass)."""
        if bool(self.bad_keys):
            raise FDEvalError(f"training keys must lie in 0..{MAX_KEY} (positions in the training source); the "
                              "extraction loop passed others")

    def update(self, features: torch.Tensor, index: torch.Tensor) -> None:
        if features.shape[0] == 0:
            return
        keys = index.to(self.queries.device, torch.int64)
        self.bad_keys |= ((keys < 0) | (keys > MAX_KEY)).any()
        # the float32 unit vector (what a float32 training index stores), compared in float64
        f = F.normalize(features.to(self.queries.device).double(), dim=1).float().double()
        rows = max(1, _WORK_ELEMENTS // (f.shape[0] + self.k))
        for r0 in range(0, self.queries.shape[0], rows):
            r1 = min(r0 + rows, self.queries.shape[0])
            sims = (self.queries[r0:r1] @ f.T).float()  # float64 products and sums: batching-independent
            if self.exclude is not None:
                sims.masked_fill_(self.exclude[r0:r1, None] == keys[None], float("-inf"))
            cand = torch.cat([self.packed[r0:r1], pack(sims, keys)], 1)
            vals, pos = cand.topk(self.k, dim=1)
            if self.top1_features is not None:  # rows whose top-1 is in this batch take its feature (no host sync)
                in_batch = pos[:, :1] >= self.k
                self.top1_features[r0:r1] = torch.where(in_batch, f[(pos[:, 0] - self.k).clamp(min=0)].float(),
                                                        self.top1_features[r0:r1])
            self.packed[r0:r1] = vals
        self.n_seen += int(features.shape[0])


def _merge_top1(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    m = TopKState(a["packed"], a["top1_features"]).merge(TopKState(b["packed"].to(a["packed"].device),
                                                                   b["top1_features"].to(a["packed"].device)))
    return {"packed": m.packed, "top1_features": m.top1_features}


class FeatureCollector:
    """Stores the features of an ``n``-image source by position (the generated images: queries of the pass)."""

    def __init__(self, n: int, dim: int, device: torch.device):
        self.features = torch.zeros(n, dim, device=device)
        self.seen = torch.zeros(n, dtype=torch.bool, device=device)

    def update(self, features: torch.Tensor, index: torch.Tensor) -> None:
        self.features[index] = features.float()
        self.seen[index] = True


# --- saved training features ---------------------------------------------------------------------------------
class FeatureShardWriter:
    """Consumer that saves the training features for reuse: safetensors shards ``features-{k:06d}.safetensors``
    in ``folder`` holding ``features`` float32 (n, D) and ``index`` int64 (n,), ``rows`` rows each (the last
    shorter), written atomically, with the extractor's metadata as JSON in each header. Copies each batch to the
    host (a device sync: an opt-in cost). Call :meth:`close` after the pass."""

    def __init__(self, folder: str | os.PathLike, meta: dict[str, Any] | None = None, rows: int = 65536,
                 prefix: str = "features-", dim: int | None = None):
        self.folder, self.rows, self.meta = Path(folder), int(rows), json.dumps(meta or {}, sort_keys=True)
        self.dim = dim  # given: a series with no rows (every image skipped) still gets one empty shard
        self.prefix = prefix  # find_copies writes one series per checkpoint unit: features-{unit:06d}-{k:06d}
        self.folder.mkdir(parents=True, exist_ok=True)
        self._buf: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._n, self.shards = 0, 0

    def update(self, features: torch.Tensor, index: torch.Tensor) -> None:
        self._buf.append((features.float().cpu(), index.to(torch.int64).cpu()))
        self._n += features.shape[0]
        if self._n >= self.rows:
            self._flush(whole_only=True)

    def _flush(self, whole_only: bool = False) -> None:
        from safetensors.torch import save_file

        if not self._buf:
            return
        f, i = torch.cat([b[0] for b in self._buf]), torch.cat([b[1] for b in self._buf])
        end = (f.shape[0] // self.rows) * self.rows if whole_only else f.shape[0]
        for a in range(0, end, self.rows):
            with atomic_path(self.folder / f"{self.prefix}{self.shards:06d}.safetensors") as tmp:
                save_file({"features": f[a:min(a + self.rows, end)].contiguous(),
                           "index": i[a:min(a + self.rows, end)].contiguous()},
                          str(tmp), metadata={"fd_eval_extractor": self.meta})
            self.shards += 1
        self._buf = [(f[end:], i[end:])] if end < f.shape[0] else []
        self._n = f.shape[0] - end

    def close(self) -> None:
        self._flush()
        if self.shards == 0 and self.dim is not None:
            from safetensors.torch import save_file

            with atomic_path(self.folder / f"{self.prefix}000000.safetensors") as tmp:
                save_file({"features": torch.zeros(0, self.dim), "index": torch.zeros(0, dtype=torch.int64)},
                          str(tmp), metadata={"fd_eval_extractor": self.meta})
            self.shards = 1


def read_feature_shards(folder: str | os.PathLike, unit: int | None = None
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (features float32 (n, D), index int64 (n,)) from the shards :class:`FeatureShardWriter` wrote, in
    order; feed them to any consumer's ``update`` (no images decoded, no network run). ``unit``: only the shards
    of that checkpoint unit of :func:`find_copies` (``features-{unit:06d}-*``)."""
    from safetensors.torch import load_file

    pattern = "features-*.safetensors" if unit is None else f"features-{unit:06d}-*.safetensors"
    paths = sorted(Path(folder).glob(pattern))
    if not paths:
        raise EmptySourceError(f"{folder}: no saved feature shards ({pattern})")
    for p in paths:
        d = load_file(str(p))
        yield d["features"], d["index"]


# --- C_T (Meehan et al. 2020, as dgm-eval computes it) -------------------------------------------------------
@dataclass
class CellModel:
    """dgm-eval's C_T preprocessing, fitted on the held-out real set: PCA to 64 dims when D > 64 (mean (D,),
    components (D, P) float64) and k-means cells (centroids (k, P) float64)."""

    mean: torch.Tensor
    components: torch.Tensor | None
    centroids: torch.Tensor

    def project(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.mean.device, torch.float64)
        return x if self.components is None else (x - self.mean) @ self.components

    def cells(self, z: torch.Tensor) -> torch.Tensor:
        return pair_distances(z, self.centroids).argmin(1)


def pair_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (n, m) computed pair by pair: cdist's matrix-product shortcut rounds differently with
    the batch's shape, and a cell or nearest-neighbour choice must not depend on how images were batched."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def kmeans(x: np.ndarray, k: int = 3, n_init: int = 10, max_iter: int = 300, seed: int = 0) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding (scikit-learn's defaults: 10 inits, 300 iterations, best inertia).
    x: (n, d) float64 -> centroids (k, d)."""
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(n_init):
        c = [x[rng.integers(len(x))]]
        for _ in range(1, k):
            d2 = np.min(((x[:, None] - np.array(c)[None]) ** 2).sum(-1), 1)
            c.append(x[rng.choice(len(x), p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(len(x))])
        c = np.array(c)
        for _ in range(max_iter):
            lab = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
            new = np.array([x[lab == j].mean(0) if np.any(lab == j) else c[j] for j in range(k)])
            shift = ((new - c) ** 2).sum()
            c = new
            if shift <= 1e-4 * x.var(0).mean():  # scikit-learn's tol, relative to the data's variance
                break
        inertia = ((x[:, None] - c[None]) ** 2).sum(-1).min(1).sum()
        if inertia < best_inertia:
            best, best_inertia = c, inertia
    return best


def fit_cells(test_features: torch.Tensor, k: int = 3, dims: int = 64) -> CellModel:
    """PCA (when D > ``dims``) and k-means on the held-out real features (n, D) -> :class:`CellModel`."""
    x = test_features.double()
    mean = x.mean(0)
    comps = None
    if x.shape[1] > dims:
        comps = torch.linalg.svd(x - mean, full_matrices=False).Vh[:min(dims, x.shape[0])].T.contiguous()
    z = x if comps is None else (x - mean) @ comps
    cent = torch.from_numpy(kmeans(z.cpu().numpy(), k)).to(x.device)
    return CellModel(mean, comps, cent)


class CellNNConsumer(Consumer):
    """For each query (held-out real and generated images, projected), the Euclidean distance to its nearest
    training image in the same k-means cell (C_T's L(P_n), L(Q_m)); counts training images per cell.

    Declared state: ``dist`` float64 (Q,) (minimum), ``counts`` int64 (k,) (sum; also :attr:`train_counts`)."""

    def __init__(self, model: CellModel, queries: torch.Tensor):
        self.model = model
        self.z = model.project(queries)
        self.cells = model.cells(self.z)
        super().__init__(self.z.device)
        self.add_state("dist", torch.full((self.z.shape[0],), float("inf"), dtype=torch.float64), merge="min")
        self.add_state("counts", torch.zeros(model.centroids.shape[0], dtype=torch.int64), merge="sum")

    @property
    def train_counts(self) -> torch.Tensor:
        return self.counts

    @train_counts.setter
    def train_counts(self, v: torch.Tensor) -> None:
        self.counts = v

    def update(self, features: torch.Tensor, index: torch.Tensor) -> None:
        t = self.model.project(features)
        tc = self.model.cells(t)
        self.counts += F.one_hot(tc, self.counts.numel()).sum(0)  # bincount would sync on a GPU
        rows = max(1, _WORK_ELEMENTS // max(1, t.shape[0]))
        for r0 in range(0, self.z.shape[0], rows):
            d = pair_distances(self.z[r0:r0 + rows], t)
            d.masked_fill_(self.cells[r0:r0 + rows, None] != tc[None], float("inf"))
            self.dist[r0:r0 + rows] = torch.minimum(self.dist[r0:r0 + rows], d.min(1).values)


def ct_from_distances(l_test: np.ndarray, test_cells: np.ndarray, l_gen: np.ndarray, gen_cells: np.ndarray,
                      train_counts: np.ndarray) -> float | None:
    """dgm-eval's ``C_T`` from per-sample nearest-training distances and cell labels (tau = 20 / m): the test
    share-weighted mean over cells holding more than 20 generated images of the Z-scored Mann-Whitney U of
    (L(Q_m), L(P_n)) in the cell. None (with a warning) where a cell lacks training images. Negative values
    mean generated images lie closer to the training images than held-out real ones (data copying)."""
    from scipy.stats import mannwhitneyu

    k, m, n = len(train_counts), len(l_gen), len(l_test)
    if np.any(train_counts == 0):
        warnings.warn(f"C_T: a k-means cell holds no training image (cells: {train_counts.tolist()}); C_T not "
                      "computed", RuntimeWarning, stacklevel=2)
        return None
    qm = np.bincount(gen_cells, minlength=k) / m
    pn = np.bincount(test_cells, minlength=k) / n
    zu = np.zeros(k)
    for i in range(k):
        lq, lp = l_gen[gen_cells == i], l_test[test_cells == i]
        if len(lq) and len(lp):
            u = mannwhitneyu(lq, lp, alternative="less").statistic
            a, b = len(lp), len(lq)
            zu[i] = (u - (a * b / 2 - 0.5)) / math.sqrt(a * b * (a + b + 1) / 12)
    keep = qm > 20 / m
    if not np.any(keep) or pn[keep].sum() == 0:
        warnings.warn(f"C_T: no k-means cell holds more than 20 generated images (of {m}; cells: "
                      f"{np.bincount(gen_cells, minlength=k).tolist()}); C_T not computed", RuntimeWarning,
                      stacklevel=2)
        return None
    return float(pn[keep] @ zu[keep] / pn[keep].sum())


# --- AuthPct (dgm-eval) -------------------------------------------------------------------------------------
def authpct(top1_sim: torch.Tensor, train_nn_sim: torch.Tensor) -> float:
    """dgm-eval's AuthPct on unit vectors: a generated image is authentic when its nearest training image lies
    closer to another training image than to it (d2 < d1, i.e. cosine s2 > s1). Percent of generated images.
    top1_sim: (Q,) similarity to the nearest training image; train_nn_sim: (Q,) that training image's similarity
    to its nearest other training image."""
    return float(100.0 * (train_nn_sim.double() > top1_sim.double()).double().mean())


# --- the check ----------------------------------------------------------------------------------------------
class CopiesConsumer(Consumer):
    """The per-extractor consumer of a training pass: top-K lists (+ top-1 features for AuthPct) and, with a
    held-out real set, C_T's in-cell nearest-training distances (and optionally a feature-saving writer).

    Its state is its parts' (:meth:`Consumer.add_child`): ``packed``, ``n_seen``, ``top1_features`` of the
    top-K search, ``ct_dist``, ``ct_counts`` of the cell search. The training pass gives each checkpoint unit its
    own :meth:`fresh` copy (queries shared), saves its :meth:`state_dict`, and folds the units (and the ranks)
    together with :meth:`merge`: exact and order-free.
    """

    def __init__(self, gen_features: torch.Tensor | None, k: int = 1, *, keep_top1_features: bool = True,
                 cells: CellNNConsumer | None = None, writer: "FeatureShardWriter | None" = None,
                 topk: TopKConsumer | None = None):
        topk = topk if topk is not None else TopKConsumer(gen_features, k, keep_top1_features=keep_top1_features)
        super().__init__(topk.device)
        self.add_child("topk", topk, "")
        self.add_child("cells", cells, "ct_")
        self.writer = writer

    def update(self, features: torch.Tensor, index: torch.Tensor) -> None:
        if features.shape[0] == 0:  # e.g. a saved unit whose images were all skipped
            return
        self.topk.update(features, index)
        if self.cells is not None:
            self.cells.update(features, index)
        if self.writer is not None:
            self.writer.update(features, index)

    def fresh(self, writer: "FeatureShardWriter | None" = None) -> "CopiesConsumer":
        c = super().fresh()
        c.writer = writer
        return c

    def load_state(self, d: dict[str, torch.Tensor]) -> "CopiesConsumer":
        """This consumer's :meth:`fresh` copy holding the state ``d`` (a :meth:`state_dict`); ``ValueError`` when
        its names, shapes or dtypes are not this run's."""
        c = self.fresh()
        c.load_state_dict(d)
        return c


def memory_needed(n_gen: int, k: int, dim: int, n_test: int = 0) -> int:
    """Bytes a training pass holds per extractor: generated features (float32) and queries (float64), packed
    lists and top-1 features (float32) twice (the run's total and the current unit's), C_T queries and
    distances, and one similarity block."""
    return n_gen * (20 * dim + 16 * k) + n_test * (4 * dim + 8 * 66) + 16 * _WORK_ELEMENTS


def available_memory(device: torch.device) -> int:
    """Free bytes on ``device`` (CUDA: mem_get_info; CPU: MemAvailable, else unknown = a large number)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


@dataclass
class CopiesResult:
    """What :func:`find_copies` found; :meth:`to_dict` is the JSON document (schema in docs/copies.md)."""

    results: dict[str, dict[str, Any]]
    provenance: dict[str, Any]
    per_model_arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"results": self.results, "provenance": self.provenance}

    def save_json(self, path: str | os.PathLike) -> None:
        with atomic_write(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1, allow_nan=False)


def _summary(sims: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, gen: ImageSource, gen_idx: np.ndarray,
             train: ImageSource, threshold: float) -> dict[str, Any]:
    top1 = sims[:, 0].double().cpu().numpy()
    per_image = []
    for r, gi in enumerate(gen_idx):
        nearest = [{"key": train.describe(int(kk)), "index": int(kk), "similarity": float(s)}
                   for s, kk, v in zip(sims[r].tolist(), keys[r].tolist(), valid[r].tolist()) if v]
        per_image.append({"index": int(gi), "name": gen.describe(int(gi)), "nearest": nearest})
    n_copies = int((top1 > threshold).sum())
    counts, _ = np.histogram(np.clip(top1, -1, 1), bins=np.array(HIST_EDGES))
    return {
        "per_image": per_image, "threshold": float(threshold), "n_copies": n_copies,
        "copy_fraction": n_copies / len(top1),
        "quantiles": {str(q): float(np.quantile(top1, q)) for q in QUANTILES},
        "histogram": {"edges": list(HIST_EDGES), "counts": counts.tolist()},
    }


# --- the passes: checkpoint units, ranks, exact merges ---------------------------------------------------------
COPIES_FORMAT = "fd-eval-copies-unit/1"
_META = "fd_eval_copies"
_QUERIES = "queries.safetensors"
_CKPT_RE = re.compile(r"^(\.)?(train|authpct)-\d{6,}\.safetensors(\..*\.tmp)?$|^\.?queries\.safetensors(\..*\.tmp)?$")


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


def _read_unit_file(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})[_META])
        return header, load_file(str(path))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: damaged or not an fd-eval copies checkpoint ({type(e).__name__}: {e}); "
                              "delete it to recompute that unit") from None


def _check_identity(path: Path, header: dict[str, Any], identity: dict[str, Any], ckpt: Path) -> None:
    old = header.get("identity")
    if header.get("format") != COPIES_FORMAT or not isinstance(old, dict):
        raise CheckpointError(f"{path}: not a {COPIES_FORMAT} checkpoint file; delete {ckpt} to start over")
    diffs = [k for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k)]
    if diffs:
        what = {"extractors": "models, weights or preprocessing", "gen": "GEN images", "test": "--test images",
                "train": "--train source or its units (--checkpoint-every)", "top_k": "--top",
                "authpct": "AuthPct on/off", "batch_size": "--batch-size", "device": "device type",
                "decode": "--decode", "precision": "--precision"}
        raise CheckpointError(f"{ckpt}: cannot resume: the checkpoint was made with other settings "
                              f"({', '.join(what.get(k, k) for k in diffs)} differ); rerun with the original "
                              f"settings, or delete {ckpt} to start over")


def _all_ranks_raise(run: _Run, error: FDEvalError | None) -> None:
    if run.world > 1:
        from .distributed import raise_first_error

        raise_first_error(error)
    elif error is not None:
        raise error


def _collect(src: ImageSource, run: _Run, desc: str) -> tuple[list[torch.Tensor], np.ndarray, list[SkippedItem]]:
    """Features of every readable image of ``src`` (held in memory: the queries), per extractor, with their
    positions. Ranks extract units r, r + W, ... (the same units and batches as one process) and sum the
    zero-padded matrices (exact)."""
    from .build import plan_units
    from .pipeline import run_units

    units = plan_units(src).units
    cols = [FeatureCollector(len(src), ex.feature_dim, run.device) for ex in run.extractors]
    skipped: list[SkippedItem] = []
    error = None
    mine = units[run.rank::run.world]
    try:
        with tqdm(total=sum(len(u) for u in mine), unit="img", desc=desc,
                  disable=not run.progress or run.rank != 0) as bar:
            for u in run_units(src, run.extractors, [u.indices for u in mine], lambda k: cols, run.opts, bar=bar,
                               n_planned=len(src)):
                skipped += u.skipped
    except FDEvalError as e:
        if run.world == 1:
            raise
        error = e
    _all_ranks_raise(run, error)
    if run.world > 1:
        import torch.distributed as dist

        from .distributed import all_gather_json, comm_device

        cd = comm_device(prefer=run.device)
        for c in cols:  # each image's row is non-zero on exactly one rank: the sum is exact
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
    path = run.ckpt / _QUERIES if run.ckpt is not None else None
    have = path is not None and path.exists()
    if run.world > 1:
        from .distributed import all_gather_json

        have = bool(all_gather_json(have)[0])  # rank 0's view (a shared folder)
    if have:
        header, t = _read_unit_file(path)
        _check_identity(path, header, run.identity, run.ckpt)
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
        header = {"format": COPIES_FORMAT, "identity": run.identity,
                  "skipped": {k: [s.to_dict() for s in v] for k, v in out["skipped"].items()}}
        save_unit_file(path, header, tensors, _META)
    return out


def _training_pass(kind: str, train: ImageSource, units: Sequence[Any], base: list[CopiesConsumer], run: _Run,
                   *, save_features: Path | None = None, read_features: Path | None = None
                   ) -> tuple[list[CopiesConsumer], list[SkippedItem], int]:
    """One streaming pass over the training units (:func:`fd_eval.build.plan_units`) through the extraction
    loop (:func:`fd_eval.pipeline.run_units`), one fresh consumer per unit and extractor.

    Each finished unit's state is saved as ``{kind}-{k:06d}.safetensors`` in the checkpoint folder (when there is
    one) and folded into this rank's total; units already saved are read back instead (by rank 0). Ranks take
    every W-th unit left, then the totals are merged over ranks (exact: a broadcast per rank). Returns (merged
    consumers, skipped items, units resumed); the same on every rank.
    """
    from .pipeline import run_units

    exs, ckpt = run.extractors, run.ckpt
    done: dict[int, Path] = {}
    if ckpt is not None and ckpt.is_dir():
        for u in units:
            p = ckpt / f"{kind}-{u.index:06d}.safetensors"
            if p.exists():
                done[u.index] = p
    if run.world > 1:
        from .distributed import all_gather_json

        done = {k: ckpt / f"{kind}-{k:06d}.safetensors" for k in all_gather_json(sorted(done))[0]}  # type: ignore
    total = [b.fresh() for b in base]
    skipped: list[SkippedItem] = []
    error: FDEvalError | None = None
    mine = [u for u in units if u.index not in done][run.rank::run.world]

    n_saved = 0

    def finish(unit: Any, cons: list[CopiesConsumer], bad: list[SkippedItem]) -> None:
        nonlocal n_saved
        for c in cons:
            c.topk.check_keys()
            if c.writer is not None:
                c.writer.close()
        if ckpt is not None:
            tensors = {f"{ex.name}.{n}": v for ex, c in zip(exs, cons) for n, v in c.state_dict().items()}
            header = {"format": COPIES_FORMAT, "identity": run.identity, "rank": run.rank,
                      "unit": {"index": unit.index, "label": unit.label, "fingerprint": unit.fingerprint},
                      "skipped": [s.to_dict() for s in bad]}
            try:
                save_unit_file(ckpt / f"{kind}-{unit.index:06d}.safetensors", header, tensors, _META)
            finally:  # counted once on disk, also when an interrupt lands right after the rename
                n_saved += (ckpt / f"{kind}-{unit.index:06d}.safetensors").exists()
        for t_, c in zip(total, cons):
            t_.merge(c)
        skipped.extend(bad)

    def load_done() -> None:  # rank 0 folds in the units saved by earlier runs
        run.log(f"resuming from {ckpt}: {len(done)} of {len(units)} {kind} units already done")
        for k, p in sorted(done.items()):
            header, t = _read_unit_file(p)
            _check_identity(p, header, run.identity, ckpt)
            if header.get("unit", {}).get("fingerprint") != units[k].fingerprint:
                raise CheckpointError(f"{p}: cannot resume: the data of unit {k} ({units[k].label}) changed since it "
                                      f"was computed; restore it, or delete {p} to recompute that unit")
            if header["skipped"] and not run.skip_bad:
                raise CheckpointError(f"{p}: unit {k} skipped unreadable images under --skip-bad; pass --skip-bad "
                                      f"again, or delete {p} to recompute it strictly")
            try:
                for t_, b, ex in zip(total, base, exs):
                    t_.merge(b.load_state({n[len(ex.name) + 1:]: v for n, v in t.items()
                                           if n.startswith(ex.name + ".")}))
            except ValueError as e:
                raise CheckpointError(f"{p}: damaged checkpoint ({e}); delete it to recompute that unit") from None
            skipped.extend(SkippedItem(**d) for d in header["skipped"])

    def writers(unit: Any) -> list[FeatureShardWriter | None]:
        if save_features is None:
            return [None] * len(exs)
        return [FeatureShardWriter(save_features / ex.name, {**ex.metadata(), "source": train.spec},
                                   prefix=f"features-{unit.index:06d}-", dim=ex.feature_dim) for ex in exs]

    try:
        if run.rank == 0 and done:
            load_done()
        with tqdm(total=sum(len(u) for u in mine), unit="img", desc=f"training ({kind})",
                  disable=not run.progress or run.rank != 0) as bar:
            if read_features is not None:  # saved features: no decode, no network
                for u in mine:
                    cons = [b.fresh() for b in base]
                    for ex, c in zip(exs, cons):
                        for f, i in read_feature_shards(read_features / ex.name, unit=u.index):
                            c.update(f.to(run.device), i.to(run.device))
                    finish(u, cons, [])
                    bar.update(len(u))
            elif mine:
                def consumers(k: int) -> list[CopiesConsumer]:
                    return [b.fresh(w) for b, w in zip(base, writers(mine[k]))]

                def on_unit(d: Any) -> None:
                    finish(mine[d.k], [cs[0] for cs in d.consumers], d.skipped)

                run_units(train, exs, [u.indices for u in mine], consumers, run.opts, on_unit=on_unit, bar=bar,
                          n_planned=sum(len(u) for u in units))
    except FDEvalError as e:
        if run.world == 1:
            raise
        error = e
    except BaseException:
        if ckpt is not None and (n_saved or done):
            run.log(f"{len(done) + n_saved} of {len(units)} {kind} units are saved in {ckpt}; run the same command "
                    "again to resume")
        raise
    _all_ranks_raise(run, error)
    if run.world == 1:
        return total, sorted(skipped, key=_item_order), len(done)
    from .distributed import all_gather_json

    skipped = [SkippedItem(**d) for part in all_gather_json([s.to_dict() for s in skipped]) for d in part]
    return _merge_ranks(total, run), sorted(skipped, key=_item_order), len(done)


def _item_order(s: SkippedItem) -> tuple[int, str]:
    return (s.index if s.index is not None else -1, s.name)


def _merge_ranks(total: list[CopiesConsumer], run: _Run) -> list[CopiesConsumer]:
    """Collective: every rank's states merged by their declared rules, in rank order (the same on every rank)."""
    from .consumers import merge_over_ranks

    return merge_over_ranks(total, device=run.device)  # type: ignore[return-value]


def _cleanup(ckpt: Path) -> None:
    """Remove this module's files from the checkpoint folder, then the folder if nothing else is left in it."""
    with contextlib.suppress(OSError):
        for p in ckpt.iterdir():
            if _CKPT_RE.match(p.name):
                with contextlib.suppress(OSError):
                    p.unlink()
        ckpt.rmdir()


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
        :class:`CopiesResult`. Raises :class:`EmptySourceError` for an empty training source, :class:`InputError`
        when the top-K lists of ``gen`` do not fit in memory (the message says how much is needed),
        :class:`CheckpointError` when ``checkpoint_dir`` belongs to other settings or data.
    """
    from .api import resolve_extractors
    from .build import DEFAULT_BLOCK, plan_units
    from .distributed import barrier

    opts = make_options(options, kw, "find_copies")
    from .preflight import check_outputs

    check_outputs({"GEN": gen, "--train": train, "--train-index": train_index, "--test": test, "--weights": weights},
                  {"--json": json_path, "--sheet": sheet},
                  {"--save-features": save_features, "--checkpoint-dir": checkpoint_dir})  # before any work
    if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1:
        raise InputError(f"--top must be a positive integer, got {top_k!r}")
    if threshold is not None and not -1 <= threshold <= 1:
        raise InputError(f"--threshold is a cosine similarity in [-1, 1], got {threshold!r}")
    say = log or ((lambda m: print(m, file=sys.stderr, flush=True)) if opts.progress else (lambda m: None))
    resolved = opts.resolve()
    rank, world, dev = resolved.rank, resolved.world_size, resolved.device
    skip_bad = opts.skip_bad
    gen_src = open_source(gen, skip_bad=skip_bad, offline=opts.offline)
    index = None
    if (train is None) == (train_index is None):
        raise InputError("pass the training images (--train SOURCE, train=) or a training index (--train-index DIR, "
                         "train_index=), one of the two")
    if save_features is not None and train_index is not None:
        raise InputError("--save-features saves the training features of a --train pass; with --train-index they "
                         "are already stored in the index")
    if approximate and train_index is None:
        raise InputError("--approximate searches a training index: pass --train-index DIR (fd-eval index build)")
    if train_index is not None:
        from .index import open_index
        from .index.copies_pass import IndexTrain

        index = open_index(train_index) if isinstance(train_index, (str, os.PathLike)) else train_index
        train_src = IndexTrain(index)
    else:
        try:
            train_src = open_source(train, skip_bad=skip_bad, offline=opts.offline)
        except EmptySourceError as e:
            raise EmptySourceError(f"training source (--train) is empty: {e}") from None
    test_src = open_source(test, skip_bad=skip_bad, offline=opts.offline) if test is not None else None
    if len(train_src) == 0:
        raise EmptySourceError(f"{train_src.spec}: the training source holds no images; --train must point at the "
                               "training images (or the reference test set for a leak check)")
    if len(train_src) > MAX_KEY + 1:
        raise InputError(f"{train_src.spec}: {len(train_src)} training images; the top-K keys hold at most "
                         f"{MAX_KEY + 1}; split --train into parts")
    if extractors is None:
        from .extractors import extractor_entry

        entries = [extractor_entry(m) for m in ([models] if isinstance(models, str) else list(models))]
        names, dims = [e.name for e in entries], [e.feature_dim for e in entries]
    else:
        names, dims = [ex.name for ex in extractors], [ex.feature_dim for ex in extractors]
    n_test = len(test_src) if test_src is not None else 0
    need = sum(memory_needed(len(gen_src), top_k, d, n_test) for d in dims)
    have = available_memory(dev)
    if need > have:  # before any weights download or image decode
        raise InputError(f"{gen_src.spec}: {len(gen_src)} generated images with top-K = {top_k} for "
                         f"{', '.join(names)} need {_gib(need)} on {dev}, {_gib(have)} free; "
                         "lower --top, use fewer models, or split GEN into parts")
    thresholds = {}
    for name in names:
        if threshold is None and name not in COPY_DETECTORS:
            warnings.warn(f"{name} is not a copy detector: the default copy threshold 0.75 is SSCD's operating "
                          f"point; pass --threshold (threshold=) calibrated for {name}", UserWarning, stacklevel=2)
        thresholds[name] = float(threshold if threshold is not None else COPY_DETECTORS.get(name, 0.75))
    plan = (plan_units(train_src, checkpoint_every=checkpoint_every) if index is None  # positions in the source
            else train_src.plan())
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    feats_dir = Path(save_features) if save_features is not None else None
    resuming = ckpt is not None and ((ckpt / _QUERIES).exists() or any(ckpt.glob("train-*.safetensors")))
    if feats_dir is not None and not resuming and any(feats_dir.glob("*/features-*.safetensors")):
        raise InputError(f"{feats_dir}: already holds saved features (features-*.safetensors) and no run is being "
                         "resumed; delete them or choose another --save-features folder")
    exs = resolve_extractors(models, extractors, weights, resolved, dev)
    if index is not None:  # before any image is decoded
        for ex in exs:
            index.check_extractor(ex.name, ex.metadata())
    bs = resolved.batch_size
    identity = json.loads(json.dumps({
        "extractors": [{k: ex.metadata()[k] for k in ("extractor", "feature_dim", "weights_sha256", "preprocess")}
                       for ex in exs],
        "precision": [ex.metadata().get("precision") for ex in exs],
        "gen": gen_src.fingerprint(), "test": test_src.fingerprint() if test_src is not None else None,
        "train": {"spec": str(train_src.spec), "kind": plan.kind, "checkpoint_every": plan.checkpoint_every,
                  "n_units": len(plan.units), "n_items": plan.n_items},
        "top_k": int(top_k), "authpct": bool(compute_authpct), "batch_size": bs, "device": dev.type,
        "decode": opts.decode}))
    run = _Run(exs, resolved, ckpt, identity, say if rank == 0 else (lambda m: None))
    if ckpt is not None and rank == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
    q = _queries(gen_src, test_src, run)
    gen_feats, gen_idx, test_feats = q["gen"], q["gen_idx"], q["test"]
    base = []
    for j in range(len(exs)):
        cells = None
        if test_feats is not None:
            cells = CellNNConsumer(fit_cells(test_feats[j]), torch.cat([test_feats[j], gen_feats[j]]))
        base.append(CopiesConsumer(gen_feats[j], top_k, keep_top1_features=compute_authpct, cells=cells))
    search = None
    if index is not None:
        from .index.copies_pass import index_search

        consumers, search = index_search(index, gen_feats, base, run, keep_top1_features=compute_authpct,
                                         approximate=approximate)
        train_skipped, resumed = [SkippedItem(**d) for d in index.skipped()], 0
    else:
        consumers, train_skipped, resumed = _training_pass("train", train_src, plan.units, base, run,
                                                           save_features=feats_dir)
    n_train = consumers[0].topk.state.n_seen
    if n_train == 0:
        raise EmptySourceError(f"{train_src.spec}: every training image was skipped as unreadable "
                               f"({len(train_skipped)})")
    auth_sims: list[torch.Tensor | None] = [None] * len(exs)
    if compute_authpct and n_train > 1 and index is not None:
        from .index.copies_pass import index_authpct_pass

        auth_sims = index_authpct_pass(index, consumers, run)  # type: ignore[assignment]
    elif compute_authpct and n_train > 1:
        second = []
        for c in consumers:
            _, keys, _ = unpack(c.topk.state.packed[:, :1])
            second.append(CopiesConsumer(None, topk=TopKConsumer(c.topk.state.top1_features, 1, exclude=keys[:, 0])))
        second, _, _ = _training_pass("authpct", train_src, plan.units, second, run, read_features=feats_dir)
        auth_sims = [unpack(s.topk.state.packed)[0][:, 0] for s in second]
    results, arrays = {}, {}
    for j, (ex, c) in enumerate(zip(exs, consumers)):
        sims, keys, valid = unpack(c.topk.state.packed)
        r = _summary(sims.cpu(), keys.cpu(), valid.cpu(), gen_src, gen_idx, train_src, thresholds[ex.name])
        r["authpct"] = authpct(sims[:, 0], auth_sims[j]) if auth_sims[j] is not None else None
        r["ct"] = None
        if c.cells is not None:
            nt = test_feats[j].shape[0]
            d, cl = c.cells.dist.cpu().numpy(), c.cells.cells.cpu().numpy()
            r["ct"] = ct_from_distances(d[:nt], cl[:nt], d[nt:], cl[nt:], c.cells.train_counts.cpu().numpy())
        r.update(top_k=top_k, n_gen=int(len(gen_idx)), n_train=int(n_train))
        if search is not None and search.get(ex.name) is not None:
            r["search"] = search[ex.name]  # only an approximate search says so (an exact scan equals --train)
        results[ex.name] = r
        arrays[ex.name] = {"similarity": sims.cpu().numpy(), "key": keys.cpu().numpy(), "gen_index": gen_idx}
    prov = {
        "fd_eval": __version__, "gen": gen_src.spec, "train": train_src.spec,
        **({"train_index": train_src.provenance()} if index is not None else {}),
        "test": test_src.spec if test_src is not None else None,
        "extractors": {ex.name: ex.metadata() for ex in exs},
        "similarity": "cosine of L2-normalised features; ties broken by the smaller training index",
        "authpct": "dgm-eval compute_authpct on L2-normalised features" if compute_authpct else None,
        "ct": "dgm-eval compute_CTscore; PCA and k-means fitted on the held-out set" if test_src is not None else None,
        "skipped": {"gen": [s.to_dict() for s in q["skipped"]["gen"]], "train": [s.to_dict() for s in train_skipped],
                    "test": [s.to_dict() for s in q["skipped"]["test"]]},
        "run": {"units": len(plan.units), "unit_kind": plan.kind,
                "checkpoint_every": plan.checkpoint_every or (None if plan.kind == "tar-shards" else DEFAULT_BLOCK),
                "resumed_units": resumed, "world_size": world, "batch_size": bs},
        **environment(dev),
    }
    out = CopiesResult(results, prov, arrays)
    if world > 1:
        barrier(dev)  # every rank is past the checkpoint files before rank 0 removes them
    if rank == 0:
        if json_path is not None:
            out.save_json(json_path)
        if sheet is not None:
            contact_sheet(out, gen_src, train_src, sheet, model=exs[0].name, rows=sheet_rows)
        if ckpt is not None:
            _cleanup(ckpt)
    return out


def contact_sheet(result: CopiesResult, gen: ImageSource, train: Any, path: str | os.PathLike, *,
                  model: str, rows: int = 16, thumb: int = 160) -> Path:
    """PNG grid of the ``rows`` most similar pairs, copies first, captions wrapped
    (:func:`fd_eval.contact_sheet.contact_sheet`)."""
    from .contact_sheet import contact_sheet as grid

    return grid(result, gen, train, path, model=model, rows=rows, thumb=thumb)
