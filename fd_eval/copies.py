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

``FeatureConsumer`` is the interface of the extraction loop's pluggable consumers. Until that loop takes
consumers, :func:`run_pass` (marked TEMPORARY DRIVER) feeds them from the existing dataset/loader helpers.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ._version import __version__
from .errors import EmptySourceError, FDEvalError, InputError
from .extractors import Extractor, load_extractor
from .io_utils import atomic_path, atomic_write
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


class FeatureConsumer(Protocol):
    """What the extraction loop feeds, per extractor."""

    def update(self, features: torch.Tensor, index: torch.Tensor) -> None:
        """features: (B, D) float32 on the run's device (one extractor's output for B images); index: (B,) int64
        positions of those images in the source being iterated, on the same device."""


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


def merge_topk(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact merge of two packed top-K lists (Q, K) kept over disjoint parts of the training set -> (Q, K), as one
    pass over both parts would have kept (sorted: best first)."""
    if a.shape != b.shape:
        raise FDEvalError(f"cannot merge top-K lists of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.cat([a, b], 1).topk(a.shape[1], dim=1).values


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


class TopKConsumer:
    """Keeps, per query, the K training images of highest cosine similarity (ties: smallest key).

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
        self.queries = F.normalize(queries.double(), dim=1)
        q, d = queries.shape
        self.k = int(k)
        self.state = TopKState(torch.full((q, self.k), EMPTY, dtype=torch.int64, device=queries.device),
                               torch.zeros(q, d, device=queries.device) if keep_top1_features else None)
        self.exclude = None if exclude is None else exclude.to(queries.device, torch.int64)
        self._bad_keys = torch.zeros((), dtype=torch.bool, device=queries.device)

    def check_keys(self) -> None:
        """Raise if any training key fed was outside 0..MAX_KEY (checked once, after the pass)."""
        if bool(self._bad_keys):
            raise FDEvalError(f"training keys must lie in 0..{MAX_KEY} (positions in the training source); the "
                              "extraction loop passed others")

    def update(self, features: torch.Tensor, index: torch.Tensor) -> None:
        if features.shape[0] == 0:
            return
        keys = index.to(self.queries.device, torch.int64)
        # checked in check_keys() after the pass: reading a device value here would stall the loop on a GPU
        self._bad_keys |= ((keys < 0) | (keys > MAX_KEY)).any()
        f = F.normalize(features.to(self.queries.device).double(), dim=1)
        st = self.state
        rows = max(1, _WORK_ELEMENTS // (f.shape[0] + self.k))
        for r0 in range(0, self.queries.shape[0], rows):
            r1 = min(r0 + rows, self.queries.shape[0])
            sims = (self.queries[r0:r1] @ f.T).float()  # float64 products and sums: batching-independent
            if self.exclude is not None:
                sims.masked_fill_(self.exclude[r0:r1, None] == keys[None], float("-inf"))
            cand = torch.cat([st.packed[r0:r1], pack(sims, keys)], 1)
            vals, pos = cand.topk(self.k, dim=1)
            if st.top1_features is not None:  # rows whose top-1 is in this batch take its feature (no host sync)
                in_batch = pos[:, :1] >= self.k
                st.top1_features[r0:r1] = torch.where(in_batch, f[(pos[:, 0] - self.k).clamp(min=0)].float(),
                                                      st.top1_features[r0:r1])
            st.packed[r0:r1] = vals
        st.n_seen += int(features.shape[0])


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

    def __init__(self, folder: str | os.PathLike, meta: dict[str, Any] | None = None, rows: int = 65536):
        self.folder, self.rows, self.meta = Path(folder), int(rows), json.dumps(meta or {}, sort_keys=True)
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
            with atomic_path(self.folder / f"features-{self.shards:06d}.safetensors") as tmp:
                save_file({"features": f[a:min(a + self.rows, end)].contiguous(),
                           "index": i[a:min(a + self.rows, end)].contiguous()},
                          str(tmp), metadata={"fd_eval_extractor": self.meta})
            self.shards += 1
        self._buf = [(f[end:], i[end:])] if end < f.shape[0] else []
        self._n = f.shape[0] - end

    def close(self) -> None:
        self._flush()


def read_feature_shards(folder: str | os.PathLike) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (features float32 (n, D), index int64 (n,)) from the shards :class:`FeatureShardWriter` wrote, in
    order; feed them to any consumer's ``update`` (no images decoded, no network run)."""
    from safetensors.torch import load_file

    paths = sorted(Path(folder).glob("features-*.safetensors"))
    if not paths:
        raise EmptySourceError(f"{folder}: no saved feature shards (features-*.safetensors)")
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


class CellNNConsumer:
    """For each query (held-out real and generated images, projected), the Euclidean distance to its nearest
    training image in the same k-means cell (C_T's L(P_n), L(Q_m)); counts training images per cell."""

    def __init__(self, model: CellModel, queries: torch.Tensor):
        self.model = model
        self.z = model.project(queries)
        self.cells = model.cells(self.z)
        self.dist = torch.full((self.z.shape[0],), float("inf"), dtype=torch.float64, device=self.z.device)
        self.train_counts = torch.zeros(model.centroids.shape[0], dtype=torch.int64, device=self.z.device)

    def merge(self, other: "CellNNConsumer") -> None:
        """Fold in the same consumer's state from another part of the training set (exact: a minimum and a sum)."""
        self.dist = torch.minimum(self.dist, other.dist.to(self.dist.device))
        self.train_counts += other.train_counts.to(self.train_counts.device)

    def update(self, features: torch.Tensor, index: torch.Tensor) -> None:
        t = self.model.project(features)
        tc = self.model.cells(t)
        self.train_counts += F.one_hot(tc, self.train_counts.numel()).sum(0)  # bincount would sync on a GPU
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
        return None
    return float(pn[keep] @ zu[keep] / pn[keep].sum())


# --- AuthPct (dgm-eval) -------------------------------------------------------------------------------------
def authpct(top1_sim: torch.Tensor, train_nn_sim: torch.Tensor) -> float:
    """dgm-eval's AuthPct on unit vectors: a generated image is authentic when its nearest training image lies
    closer to another training image than to it (d2 < d1, i.e. cosine s2 > s1). Percent of generated images.
    top1_sim: (Q,) similarity to the nearest training image; train_nn_sim: (Q,) that training image's similarity
    to its nearest other training image."""
    return float(100.0 * (train_nn_sim.double() > top1_sim.double()).double().mean())


# --- TEMPORARY DRIVER ---------------------------------------------------------------------------------------
def run_pass(source: ImageSource, extractors: Sequence[Extractor], consumers: Sequence[FeatureConsumer], *,
             device: torch.device, batch_size: int | None = None, num_workers: int | None = None,
             skip_bad: bool | None = None, progress: bool = True, desc: str = "features"
             ) -> tuple[int, list[SkippedItem]]:
    """TEMPORARY DRIVER, until the extraction loop (fd_eval.pipeline) takes per-extractor consumers: one decoding
    pass over ``source`` feeding ``consumers[i].update(features, index)`` with extractor i's features. Uses the
    pipeline's public dataset/loader helpers (same decode and host preprocessing); no GPU overlap tricks.
    Returns (images fed, skipped items)."""
    from tqdm.auto import tqdm

    from .pipeline import default_batch_size, default_num_workers, make_dataset, make_loader

    for ex in extractors:
        ex.to(device)
        ex.plan_run(len(source))
    bs = batch_size or default_batch_size(device)
    workers = default_num_workers(device) if num_workers is None else num_workers
    ds, collate_fn = make_dataset(source, extractors, device, skip_bad=skip_bad)
    loader = make_loader(ds, collate_fn, device, workers, batch_size=bs)
    n, skipped = 0, []
    with tqdm(total=len(source), unit="img", desc=desc, disable=not progress) as bar:
        for batch in loader:
            skipped += ds.check(batch)
            if len(batch):
                idx = batch.indices.to(device)
                for ex, cons, x in zip(extractors, consumers, batch.inputs):
                    if isinstance(x, torch.Tensor):
                        feats = ex.forward_prepared(x.to(device))
                    else:  # mixed sizes (device-resizing protocols): one image at a time
                        feats = torch.cat([ex.forward_prepared(t[None].to(device)) for t in x])
                    cons.update(feats, idx)
                n += len(batch)
            bar.update(len(batch) + len(batch.skipped))
    return n, skipped


# --- the check ----------------------------------------------------------------------------------------------
class CopiesConsumer:
    """The per-extractor consumer of the training pass: top-K lists (+ top-1 features for AuthPct) and, with a
    held-out real set, C_T's in-cell nearest-training distances. What the extraction loop will be given."""

    def __init__(self, gen_features: torch.Tensor, k: int, *, keep_top1_features: bool = True,
                 cells: CellNNConsumer | None = None, writer: "FeatureShardWriter | None" = None):
        self.topk = TopKConsumer(gen_features, k, keep_top1_features=keep_top1_features)
        self.cells = cells
        self.writer = writer

    def update(self, features: torch.Tensor, index: torch.Tensor) -> None:
        self.topk.update(features, index)
        if self.cells is not None:
            self.cells.update(features, index)
        if self.writer is not None:
            self.writer.update(features, index)


def memory_needed(n_gen: int, k: int, dim: int, n_test: int = 0) -> int:
    """Bytes a training pass holds per extractor: generated features (float32) and queries (float64), packed
    lists, top-1 features (float32), C_T queries and distances, and one similarity block."""
    return n_gen * (16 * dim + 8 * k) + n_test * (4 * dim + 8 * 66) + 16 * _WORK_ELEMENTS


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


def find_copies(
    gen: "str | os.PathLike | np.ndarray | ImageSource",
    train: "str | os.PathLike | np.ndarray | ImageSource",
    *,
    models: Sequence[str] | str = DEFAULT_MODELS,
    top_k: int = 5,
    threshold: float | None = None,
    test: "str | os.PathLike | np.ndarray | ImageSource | None" = None,
    compute_authpct: bool = True,
    save_features: str | os.PathLike | None = None,
    weights: dict[str, str] | None = None,
    extractors: Sequence[Extractor] | None = None,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    skip_bad: bool = False,
    json_path: str | os.PathLike | None = None,
    sheet: str | os.PathLike | None = None,
    sheet_rows: int = 16,
    progress: bool = True,
) -> CopiesResult:
    """Find the training images nearest to each generated image, per extractor.

    Args:
        gen: the generated images (any image source; its features are held in memory).
        train: the training images, streamed once (any source: folders, tar shard ranges, hf:// templates); the
            reference test set for a leak check.
        models: extractor names (default SSCD ``sscd-disc-mixup``; any DINOv2 works too).
        top_k: training neighbours kept per generated image.
        threshold: copy threshold on top-1 cosine similarity (default SSCD's 0.75; required in spirit for other
            models: a warning says the default is SSCD's).
        test: held-out real images (e.g. the reference test set) for C_T; None: ``ct`` is null.
        compute_authpct: AuthPct needs a second pass over the training set (features only, no images kept).
        save_features: folder where the training features are saved as shards (``<folder>/<model>/``,
            :class:`FeatureShardWriter`); AuthPct's second pass then reads them instead of re-extracting.
        weights: local weights file per model name. ``extractors``: ready extractors instead of ``models``.
        json_path / sheet: write the JSON document / a contact sheet PNG of the top suspected copies.

    Returns:
        :class:`CopiesResult`. Raises :class:`EmptySourceError` for an empty training source, :class:`InputError`
        when the top-K lists of ``gen`` do not fit in memory (the message says how much is needed).
    """
    from .pipeline import auto_device

    if int(top_k) != top_k or top_k < 1:
        raise InputError(f"--top must be a positive integer, got {top_k!r}")
    if threshold is not None and not -1 <= threshold <= 1:
        raise InputError(f"--threshold is a cosine similarity in [-1, 1], got {threshold!r}")
    dev = auto_device(device)
    gen_src = open_source(gen, skip_bad=skip_bad)
    try:
        train_src = open_source(train, skip_bad=skip_bad)
    except EmptySourceError as e:
        raise EmptySourceError(f"training source (--train) is empty: {e}") from None
    test_src = open_source(test, skip_bad=skip_bad) if test is not None else None
    if len(train_src) == 0:
        raise EmptySourceError(f"{train_src.spec}: the training source holds no images; --train must point at the "
                               "training images (or the reference test set for a leak check)")
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
    if extractors is None:
        extractors = [load_extractor(m, weights=(weights or {}).get(m), device=dev) for m in names]
    exs = list(extractors)
    kw = dict(device=dev, batch_size=batch_size, num_workers=num_workers, skip_bad=skip_bad, progress=progress)

    def collect(src: ImageSource, desc: str) -> tuple[list[torch.Tensor], np.ndarray, list[SkippedItem]]:
        cols = [FeatureCollector(len(src), ex.feature_dim, dev) for ex in exs]
        n, skipped = run_pass(src, exs, cols, desc=desc, **kw)
        if n == 0:
            raise EmptySourceError(f"{src.spec}: no readable images ({len(skipped)} skipped)")
        seen = cols[0].seen.cpu().numpy()
        return [c.features[c.seen] for c in cols], np.flatnonzero(seen), skipped

    gen_feats, gen_idx, gen_skipped = collect(gen_src, "generated")
    test_feats, test_skipped = None, []
    if test_src is not None:
        test_feats, _, test_skipped = collect(test_src, "held-out")
        if test_feats[0].shape[0] < 3:
            raise InputError(f"{test_src.spec}: C_T needs at least 3 held-out images (3 k-means cells), got "
                             f"{test_feats[0].shape[0]}; pass a larger held-out set or none")
    consumers = []
    for j, ex in enumerate(exs):
        cells = None
        if test_feats is not None:
            model = fit_cells(test_feats[j])
            cells = CellNNConsumer(model, torch.cat([test_feats[j], gen_feats[j]]))
        writer = None if save_features is None else FeatureShardWriter(Path(save_features) / ex.name,
                                                                        {**ex.metadata(), "source": train_src.spec})
        consumers.append(CopiesConsumer(gen_feats[j], top_k, keep_top1_features=compute_authpct, cells=cells,
                                        writer=writer))
    n_train, train_skipped = run_pass(train_src, exs, consumers, desc="training", **kw)
    for c in consumers:
        if c.writer is not None:
            c.writer.close()
    if n_train == 0:
        raise EmptySourceError(f"{train_src.spec}: every training image was skipped as unreadable "
                               f"({len(train_skipped)})")
    for c in consumers:
        c.topk.check_keys()
    auth_sims: list[torch.Tensor | None] = [None] * len(exs)
    if compute_authpct and n_train > 1:
        second = []
        for c in consumers:
            _, keys, _ = unpack(c.topk.state.packed[:, :1])
            second.append(TopKConsumer(c.topk.state.top1_features, 1, exclude=keys[:, 0]))
        if save_features is not None:  # the saved features: no second decode and network pass
            for ex, s2 in zip(exs, second):
                for f, i in read_feature_shards(Path(save_features) / ex.name):
                    s2.update(f.to(dev), i.to(dev))
        else:
            run_pass(train_src, exs, second, desc="training (AuthPct)", **kw)
        auth_sims = [unpack(s.state.packed)[0][:, 0] for s in second]
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
        results[ex.name] = r
        arrays[ex.name] = {"similarity": sims.cpu().numpy(), "key": keys.cpu().numpy(), "gen_index": gen_idx}
    prov = {
        "fd_eval": __version__, "gen": gen_src.spec, "train": train_src.spec,
        "test": test_src.spec if test_src is not None else None,
        "extractors": {ex.name: ex.metadata() for ex in exs},
        "similarity": "cosine of L2-normalised features; ties broken by the smaller training index",
        "authpct": "dgm-eval compute_authpct on L2-normalised features" if compute_authpct else None,
        "ct": "dgm-eval compute_CTscore; PCA and k-means fitted on the held-out set" if test_src is not None else None,
        "skipped": {"gen": [s.to_dict() for s in gen_skipped], "train": [s.to_dict() for s in train_skipped],
                    "test": [s.to_dict() for s in test_skipped]},
        **environment(dev),
    }
    out = CopiesResult(results, prov, arrays)
    if json_path is not None:
        out.save_json(json_path)
    if sheet is not None:
        contact_sheet(out, gen_src, train_src, sheet, model=exs[0].name, rows=sheet_rows)
    return out


def contact_sheet(result: CopiesResult, gen: ImageSource, train: ImageSource, path: str | os.PathLike, *,
                  model: str, rows: int = 16, thumb: int = 160) -> Path:
    """PNG of the ``rows`` generated images with the highest top-1 similarity, each beside its nearest training
    image, with the similarity (and 'COPY' above the threshold) printed below."""
    from PIL import Image, ImageDraw

    r = result.results[model]
    order = sorted(r["per_image"], key=lambda p: -(p["nearest"][0]["similarity"] if p["nearest"] else -9))[:rows]
    pad, text_h = 6, 28
    sheet = Image.new("RGB", (2 * thumb + 3 * pad, max(1, len(order)) * (thumb + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, p in enumerate(order):
        y = pad + i * (thumb + text_h + pad)
        pair = [gen.load(p["index"])] + ([train.load(p["nearest"][0]["index"])] if p["nearest"] else [])
        for j, im in enumerate(pair):
            im = im.convert("RGB")
            im.thumbnail((thumb, thumb))
            sheet.paste(im, (pad + j * (thumb + pad), y))
        if p["nearest"]:
            s = p["nearest"][0]["similarity"]
            flag = "COPY " if s > r["threshold"] else ""
            names = f"{os.path.basename(p['name'])} ~ {os.path.basename(p['nearest'][0]['key'])}"
            draw.text((pad, y + thumb + 2), f"{flag}cos={s:.4f} ({model})\n{names}"[:120],
                      fill="red" if flag else "black")
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return Path(path)
