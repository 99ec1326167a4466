"""``--approximate``: FAISS search of a training index for CPU-only users at 100M scale (optional extra
``fd-eval[faiss]``, ``faiss-cpu`` from PyPI).

An inverted-file index (IVF, inner product on the stored unit vectors) is trained on a random sample of the stored
rows (``nlist`` = 4 sqrt(N) cells, 16 sample rows per cell), filled with every row (8-bit scalar-quantised codes by
default: D bytes per row, a quarter of the float32 index), and saved beside the index (``DIR/approx/``) for the
next run. A search visits ``nprobe`` (16) of the cells and returns ``candidates`` (max(8K, 64)) rows per query,
which are re-scored exactly (float64, as the exact scan) from rows gathered out of memory maps of the unit files (Q
x C rows read, never the whole index) and ranked with the same packed top-K: the similarities reported are exact,
only a neighbour the IVF missed can be missing. The JSON says so (``search``: method, parameters, memory) and gives
recall@1 measured against an exact scan of a random sample of the queries (overall, and for pairs above similarity
0.5).
"""
from __future__ import annotations

import json
import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..metrics.copies import CopiesConsumer, TopKState, pack, unpack
from ..util.io_utils import atomic_path, atomic_write
from .scan import scan_index
from .store import TrainingIndex

RECALL_SAMPLE = 1000  # queries checked against an exact scan
CODECS = ("sq8", "flat")


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise InputError("--approximate needs FAISS: pip install 'fd-eval[faiss]' (faiss-cpu)") from None
    return faiss


TRAIN_PER_CELL = 16  # k-means sample per cell (FAISS asks 39 and warns below; 16 loses no recall after re-scoring)
KMEANS_ITER = 10  # k-means iterations: the cells only propose candidates, a rough partition is enough


def default_nlist(n_rows: int) -> int:
    """IVF cells: ~4 sqrt(N) (FAISS's 4-16 sqrt(N)): small cells, so a search visits few rows per probe; at
    least 1, at most N / 39 (39 rows per cell on small indexes)."""
    return int(max(1, min(4 * math.sqrt(n_rows), n_rows // 39, 262144)))


def train_sample(index: TrainingIndex, model: str, n: int, seed: int = 0) -> np.ndarray:
    """float32 (<= n, D): a uniform random sample of the stored rows (each unit read once)."""
    rng = np.random.default_rng(seed)
    take = set(rng.choice(index.n_rows, size=min(n, index.n_rows), replace=False).tolist())
    out, start = [], 0
    for u, feats, _, _ in index.iter_units(model):
        mine = [i - start for i in range(start, start + u.n_rows) if i in take]
        if mine:
            out.append(feats[mine].float().numpy())
        start += u.n_rows
    return np.concatenate(out) if out else np.zeros((0, index.models[model]["feature_dim"]), np.float32)


def build_faiss(index: TrainingIndex, model: str, *, nlist: int | None = None, codec: str = "sq8",
                seed: int = 0) -> Any:
    """A trained and filled FAISS IVF index over ``model``'s rows (ids = the rows' keys)."""
    faiss = _faiss()
    if codec not in CODECS:
        raise InputError(f"unknown FAISS codec {codec!r}; choose {', '.join(CODECS)}")
    d = index.models[model]["feature_dim"]
    nlist = nlist or default_nlist(index.n_rows)
    quant = faiss.IndexFlatIP(d)
    if codec == "flat":
        ivf = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        ivf = faiss.IndexIVFScalarQuantizer(quant, d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                            faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed, ivf.cp.niter = seed, KMEANS_ITER
    ivf.train(train_sample(index, model, max(TRAIN_PER_CELL * nlist, 20_000), seed))
    for _, feats, keys, _ in index.iter_units(model):
        if len(keys):
            ivf.add_with_ids(np.ascontiguousarray(feats.float().numpy()), keys.numpy())
    return ivf


def load_or_build(index: TrainingIndex, model: str, *, nlist: int | None = None, codec: str = "sq8",
                  log: Any = None) -> Any:
    """The saved FAISS index of ``DIR/approx/`` when it matches the index (rows, creation, parameters), else a
    new one (saved there when the folder is writable)."""
    faiss = _faiss()
    nlist = nlist or default_nlist(index.n_rows)
    tag = {"n_rows": index.n_rows, "n_units": len(index.units), "created": index.manifest.get("created"),
           "nlist": nlist, "codec": codec}
    path = index.root / "approx" / f"{model}-ivf{nlist}-{codec}.faiss"
    side = path.with_suffix(".json")
    if path.exists() and side.exists():
        try:
            if json.loads(side.read_text()) == tag:
                return faiss.read_index(str(path))
        except (OSError, ValueError, RuntimeError):
            pass
    if log:
        log(f"training a FAISS IVF index ({nlist} cells, {codec}) on {index.root}'s {model} rows")
    ivf = build_faiss(index, model, nlist=nlist, codec=codec)
    try:
        with atomic_path(path) as tmp:
            faiss.write_index(ivf, str(tmp))
        with atomic_write(side, "w") as f:
            json.dump(tag, f)
    except OSError:
        pass  # a read-only index folder: the IVF index is rebuilt next time
    return ivf


RESCORE_WORK = 1 << 22  # float64 elements of gathered candidate rows per block (32 MiB)


def rescore(index: TrainingIndex, model: str, queries: torch.Tensor, cand: np.ndarray, k: int) -> torch.Tensor:
    """Packed exact top-K (Q, K) of the candidate keys ``cand`` (Q, C; -1 = none) of each query.

    Only the candidates' rows are read (:meth:`TrainingIndex.rows` gathers them from memory maps of the unit
    files), in query blocks of ~``RESCORE_WORK`` float64 elements: the cost is Q x C rows, never a pass over the
    index. Each similarity is the exact scan's: ``float32(q64 . double(row))``."""
    q64 = F.normalize(queries.double().cpu(), dim=1)
    n_q, n_c = cand.shape
    d = q64.shape[1]
    out = torch.full((n_q, k), torch.iinfo(torch.int64).min, dtype=torch.int64)
    step = max(1, RESCORE_WORK // max(1, n_c * d))
    for a in range(0, n_q, step):
        c = torch.from_numpy(np.ascontiguousarray(cand[a:a + step])).to(torch.int64).sort(dim=1).values
        ok = c >= 0
        ok[:, 1:] &= c[:, 1:] != c[:, :-1]  # a key listed twice counts once
        if bool(ok.all()):  # the usual case: no padding, no repeats
            rows = index.rows(model, c.flatten()).view(*c.shape, d).double()
        else:
            rows = torch.zeros(*c.shape, d, dtype=torch.float64)
            rows[ok] = index.rows(model, c[ok]).double()
        sims = torch.einsum("qd,qcd->qc", q64[a:a + step], rows).float().masked_fill(~ok, float("-inf"))
        packed = pack(sims, c.clamp(min=0)).masked_fill(~ok, torch.iinfo(torch.int64).min)
        kk = min(k, n_c)
        out[a:a + len(c), :kk] = packed.topk(kk, dim=1).values
    return out


def approximate_pass(index: TrainingIndex, gen_features: Sequence[torch.Tensor], base: list[CopiesConsumer],
                     run: Any, *, keep_top1_features: bool, nprobe: int = 16, candidates: int | None = None,
                     codec: str = "sq8", seed: int = 0) -> tuple[list[CopiesConsumer], dict[str, Any]]:
    """The training pass of :func:`fd_eval.find_copies` with FAISS; every rank runs it whole (same result)."""
    from .copies_pass import _top1_rows

    out, search = [], {}
    for ex, b, q in zip(run.extractors, base, gen_features):
        ivf = load_or_build(index, ex.name, codec=codec, log=run.log)
        ivf.nprobe = min(nprobe, ivf.nlist)
        k = b.topk.k
        n_cand = candidates or max(8 * k, 64)  # re-scoring is cheap (gathered rows): room for SQ8's errors
        qn = F.normalize(q.double().cpu(), dim=1).float().numpy()
        _, cand = ivf.search(np.ascontiguousarray(qn), min(n_cand, index.n_rows))
        packed = rescore(index, ex.name, q, cand, k).to(q.device)
        c = b.fresh()
        top1 = _top1_rows(index, ex.name, packed) if keep_top1_features else None
        c.topk.state = TopKState(packed, top1, index.n_rows)
        if c.cells is not None:  # C_T needs every row's distance: one read of the index, no products
            cells = c.cells
            for _, feats, keys, nrm in index.iter_units(ex.name, norm=True):
                if len(keys):
                    cells.update((feats.double() * nrm[:, None]).to(run.device), keys.to(run.device))
        search[ex.name] = {"approximate": True, "method": f"faiss IVF{ivf.nlist},{codec} inner product",
                           "nprobe": int(ivf.nprobe), "candidates": int(min(n_cand, index.n_rows)),
                           "faiss_bytes": int(ivf.sa_code_size() * ivf.ntotal + ivf.nlist * ivf.d * 4),
                           **recall_at_1(index, ex.name, q, packed, seed=seed)}
        out.append(c)
    return out, search


def recall_at_1(index: TrainingIndex, model: str, queries: torch.Tensor, packed: torch.Tensor, *,
                sample: int = RECALL_SAMPLE, seed: int = 0) -> dict[str, Any]:
    """recall@1 of the approximate lists ``packed`` against an exact scan of a random sample of the queries:
    the fraction whose approximate top-1 is the exact top-1 (overall, and among exact top-1 similarities > 0.5)."""
    n = queries.shape[0]
    pick = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(n, size=min(n, sample), replace=False)))
    exact = scan_index(index, model, queries[pick.to(queries.device)], 1).state.packed.cpu()
    es, ek, _ = unpack(exact[:, :1])
    _, ak, _ = unpack(packed.cpu()[pick][:, :1])
    hit = (ek[:, 0] == ak[:, 0])
    out: dict[str, Any] = {"recall_sample": int(len(pick)), "recall_at_1": float(hit.double().mean())}
    for t in (0.5, 0.75):  # pairs that matter: above 0.5, and copies at SSCD's threshold
        high = es[:, 0] > t
        out[f"recall_at_1_above_{t}"] = float(hit[high].double().mean()) if bool(high.any()) else None
        out[f"n_above_{t}"] = int(high.sum())
    return out
