"""The copy-detection metrics beside top-K: C_T (Meehan et al. 2020) and AuthPct, as dgm-eval computes them, and
the per-extractor consumer of a training pass (:class:`CopiesConsumer`: top-K + C_T's in-cell distances).
Definitions and choices: docs/copies.md. Used by :mod:`fd_eval.metrics.copies`.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..core.consumers import Consumer
from ..core.topk import _WORK_ELEMENTS, FeatureShardWriter, TopKConsumer


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
