"""The training index's scan: exact rows/s, memory flat in the rows, FAISS recall and speed-up, a GPU mode.

    python benchmarks/bench_index.py --part make   --dir /tmp/idx1m --rows 1000000     # random 512-d unit rows
    python benchmarks/bench_index.py --part exact  --dir /tmp/idx1m --queries 50000 --scan-rows 20000
    python benchmarks/bench_index.py --part memory --dir /tmp/idx1m --queries 1000
    python benchmarks/bench_index.py --part make   --dir /tmp/idx1m_c --rows 1000000 --clusters 4096
    python benchmarks/bench_index.py --part faiss  --dir /tmp/idx1m_c --queries 5000 --candidates 64 \
        --recall-sample 1000 --exact-rows-per-s 372.4
    python benchmarks/bench_index.py --part exact  --dir /tmp/idx1m --device cuda --queries 50000   # a GPU
    python benchmarks/bench_index.py --part float16 --dir /tmp/unused --queries 2000 --rows 10000  # float16 error

Part ``make``: an index folder of ``--rows`` seeded random unit vectors (float32, 10,000 rows per unit file), as
``fd-eval index build`` writes it (:func:`fd_eval.index.build.index_from_features`), made block by block.

Part ``exact``: :func:`fd_eval.index.scan.scan_index` (float32 BLAS stage on every core, float64 re-scoring,
next unit read ahead) of ``--queries`` queries (K = 5) over the first ``--scan-rows`` rows; reports rows/s at that
query count and extrapolates linearly in the rows (the scan's cost is Q x N x D) to the whole index, 1M, 10M and
100M rows. On a shared CPU run it on a reduced ``--scan-rows`` and say so (the JSON records both sizes).

Part ``memory``: resident memory (VmRSS) after 1%, 10% and 100% of the index's rows are scanned with
``--queries`` queries: flat = the scan holds one block, never the rows.

Part ``faiss``: the ``--approximate`` search (IVF trained on a sample, SQ8 codes, ``--nprobe`` cells,
``--candidates`` per query re-scored exactly from their gathered rows) of ``--queries`` queries, half of them
planted near-copies of random rows (cosine 0.5..0.95), half random; recall@1 against an exact scan of
``--recall-sample`` queries (overall and for pairs above 0.5), the FAISS index's memory, and the speed-up against
the exact scan's measured rows/s (extrapolated).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fd_eval.index import open_index, scan_index  # noqa: E402
from fd_eval.index.build import index_from_features  # noqa: E402
from fd_eval.util.io_utils import atomic_write  # noqa: E402

MODEL, DIM = "sscd-disc-mixup", 512
META = {"extractor": MODEL, "feature_dim": DIM, "weights_sha256": "random-unit-vectors", "preprocess": {},
        "precision": {}}


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def queries(n: int, dev: torch.device, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, DIM, generator=g).to(dev)


def part_make(d: Path, rows: int, unit: int, clusters: int = 0) -> dict:
    """Isotropic random unit vectors (``clusters`` 0: no structure at all, the worst case for an IVF), or a
    mixture: ``clusters`` random unit centres, each row its centre plus N(0, I/D) noise (cosine ~0.71 to its
    centre, ~0.5 to rows of its cluster), a crude stand-in for descriptors of real images, which cluster."""
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(max(1, clusters), DIM, generator=g), dim=1)
    feats = torch.empty(rows, DIM)
    for a in range(0, rows, 100_000):
        n = min(100_000, rows - a)
        x = torch.randn(n, DIM, generator=g)
        if clusters:
            x = centres[torch.randint(0, clusters, (n,), generator=g)] + x / DIM**0.5
        feats[a:a + n] = x
    what = f"{clusters} clusters" if clusters else "isotropic"
    idx = index_from_features(d, MODEL, META, feats, unit_rows=unit, source=f"random unit vectors ({what}, seed 0)")
    return {"rows": idx.n_rows, "units": len(idx.units), "clusters": clusters, "seconds": time.perf_counter() - t0,
            "bytes": idx.info()["extractors"][MODEL]["bytes"]}


def part_exact(d: Path, n_q: int, scan_rows: int | None, dev: torch.device) -> dict:
    idx = open_index(d)
    units, n = [], 0
    for u in idx.units:
        if scan_rows is not None and n >= scan_rows:
            break
        units.append(u)
        n += u.n_rows
    q = queries(n_q, dev)
    scan_index(idx, MODEL, q[:64], 5, units=units[:1])  # warm-up: BLAS threads, CUDA context
    sync(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    sc = scan_index(idx, MODEL, q, 5, units=units)
    sync(dev)
    s, cpu = time.perf_counter() - t0, time.process_time() - c0
    rate = n / s
    return {"queries": n_q, "rows_scanned": n, "index_rows": idx.n_rows, "k": 5, "seconds": s,
            "cpu_seconds": cpu, "load_average": open("/proc/loadavg").read().split()[:3],
            "rows_per_s": rate, "pairs_per_s": rate * n_q, "rescored_query_rows": sc.rescored_rows,
            "threads": torch.get_num_threads(),
            "extrapolated_seconds": {f"{r:,} rows": r / rate for r in (idx.n_rows, 1_000_000, 10_000_000,
                                                                       100_000_000)},
            "extrapolated": n < idx.n_rows,
            # issue 24's GPU targets, scaled linearly to 50K queries (the cost is Q x N x D)
            "targets_at_50k_queries": {"10M rows under 60 s": 1e7 / rate * 50_000 / n_q < 60,
                                       "100M rows under 600 s": 1e8 / rate * 50_000 / n_q < 600}}


def part_memory(d: Path, n_q: int, dev: torch.device) -> dict:
    idx = open_index(d)
    q = queries(n_q, dev)
    marks = {max(1, idx.n_rows // 100), idx.n_rows // 10, idx.n_rows}
    seen, out = 0, []
    base = rss_mib()

    def note(u, f, k, nrm) -> None:
        nonlocal seen
        before = seen
        seen += u.n_rows
        for m in sorted(marks):
            if before < m <= seen:
                out.append({"rows": seen, "rss_mib": rss_mib(),
                            "cuda_mib": torch.cuda.memory_allocated(dev) / 2**20 if dev.type == "cuda" else None})

    t0 = time.perf_counter()
    scan_index(idx, MODEL, q, 5, on_unit=note)
    return {"queries": n_q, "rss_before_mib": base, "marks": out, "seconds": time.perf_counter() - t0}


def part_faiss(d: Path, n_q: int, nlist: int | None, nprobe: int, sample: int, exact_rate: float | None,
               codec: str, exact_queries: int = 50_000, n_cand: int = 32) -> dict:
    from fd_eval.index.approx import load_or_build, recall_at_1, rescore
    from fd_eval.metrics.copies import unpack

    idx = open_index(d)
    g = torch.Generator().manual_seed(2)
    half = n_q // 2
    src = torch.randint(0, idx.n_rows, (half,), generator=g)
    rows = idx.rows(MODEL, src).double()
    noise = F.normalize(torch.randn(half, DIM, generator=g, dtype=torch.float64), dim=1)
    cos = 0.5 + 0.45 * torch.rand(half, 1, generator=g, dtype=torch.float64)  # planted pairs: cosine 0.5..0.95
    planted = cos * rows + (1 - cos**2).sqrt() * (noise - (noise * rows).sum(1, keepdim=True) * rows)
    q = torch.cat([planted, torch.randn(n_q - half, DIM, generator=g, dtype=torch.float64)]).float()
    rss0 = rss_mib()
    t0 = time.perf_counter()
    ivf = load_or_build(idx, MODEL, nlist=nlist, codec=codec)
    t_build = time.perf_counter() - t0
    rss_built = rss_mib()
    ivf.nprobe = nprobe
    t0 = time.perf_counter()
    qn = F.normalize(q.double(), dim=1).float().numpy()
    _, cand = ivf.search(np.ascontiguousarray(qn), n_cand)  # the candidates --approximate re-scores
    t_search = time.perf_counter() - t0
    t0 = time.perf_counter()
    packed = rescore(idx, MODEL, q, cand, 5)
    t_rescore = time.perf_counter() - t0
    t0 = time.perf_counter()
    rec = recall_at_1(idx, MODEL, q, packed, sample=sample)
    t_recall = time.perf_counter() - t0
    planted_hit = float((unpack(packed[:half, :1])[1][:, 0] == src).double().mean())
    total = t_search + t_rescore
    out = {"queries": n_q, "planted": half, "rows": idx.n_rows, "nlist": int(ivf.nlist), "nprobe": nprobe,
           "codec": codec, "candidates": n_cand, "load_average": open("/proc/loadavg").read().split()[:3],
           "build_seconds": t_build, "search_seconds": t_search, "rescore_seconds": t_rescore,
           "recall_seconds": t_recall, **rec, "planted_recall_at_1": planted_hit,
           "faiss_code_bytes": int(ivf.sa_code_size() * ivf.ntotal), "rss_mib_before": rss0,
           "rss_mib_after_build": rss_built, "rss_mib_end": rss_mib()}
    if exact_rate:
        exact_s = idx.n_rows / exact_rate * (n_q / exact_queries)
        out.update(exact_seconds_extrapolated=exact_s, speedup=exact_s / total)
    return out


def part_float16(n_q: int, rows: int, dim: int = 512, seed: int = 0) -> dict:
    """The similarity error a float16 index introduces: random unit rows (rows, dim) stored as float16 vs float32,
    against n_q queries (half near-copies of rows, half random), every pair, in float64; top-1 changes counted."""
    g = torch.Generator().manual_seed(seed)
    t = torch.nn.functional.normalize(torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=1)
    near = t[: n_q // 2] + 0.05 * torch.randn(n_q // 2, dim, generator=g, dtype=torch.float64)
    q = torch.nn.functional.normalize(torch.cat([near, torch.randn(n_q - n_q // 2, dim, generator=g,
                                                                    dtype=torch.float64)]), dim=1)
    s32 = q @ t.float().double().T  # (n_q, rows) float64 products of the stored rows
    s16 = q @ t.half().double().T
    err = (s32 - s16).abs()
    return {"pairs": int(err.numel()), "dim": dim, "max_abs_error": float(err.max()),
            "mean_abs_error": float(err.mean()), "top1_changed": int((s32.argmax(1) != s16.argmax(1)).sum()),
            "bound": 2.0 ** -11}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["make", "exact", "memory", "faiss", "float16"], required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--unit", type=int, default=10_000)
    ap.add_argument("--clusters", type=int, default=0, help="make: 0 isotropic rows, else a mixture of this many")
    ap.add_argument("--queries", type=int, default=50_000)
    ap.add_argument("--scan-rows", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--nlist", type=int, default=None)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--codec", default="sq8")
    ap.add_argument("--candidates", type=int, default=32, help="faiss: candidates per query re-scored exactly")
    ap.add_argument("--recall-sample", type=int, default=1000)
    ap.add_argument("--exact-rows-per-s", type=float, default=None,
                    help="faiss part: the exact scan's rows/s at --exact-queries queries, for the speed-up")
    ap.add_argument("--exact-queries", type=int, default=50_000)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    dev = torch.device(a.device)
    d = Path(a.dir)
    if a.part == "make":
        res = part_make(d, a.rows, a.unit, a.clusters)
    elif a.part == "exact":
        res = part_exact(d, a.queries, a.scan_rows, dev)
    elif a.part == "memory":
        res = part_memory(d, a.queries, dev)
    elif a.part == "float16":
        res = part_float16(a.queries, a.rows)
    else:
        res = part_faiss(d, a.queries, a.nlist, a.nprobe, a.recall_sample, a.exact_rows_per_s, a.codec,
                         a.exact_queries, a.candidates)
    out = {"part": a.part, "device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda"
           else platform.processor() or platform.machine(), "torch": torch.__version__, "result": res,
           "argv": sys.argv[1:], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(out, indent=1))
    if a.json:
        with atomic_write(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
