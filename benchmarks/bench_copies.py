"""Copy detection: memory flat in the number of training images, and the training pass's throughput.

    python benchmarks/bench_copies.py                                  # both parts, CPU-sized defaults
    python benchmarks/bench_copies.py --part memory --gen 1000 --rows 1000000 --dim 512 --top 10
    python benchmarks/bench_copies.py --part throughput --images 32 --models dinov2-vits14 sscd-disc-mixup

Part ``memory``: ``--rows`` synthetic unit feature rows (seeded, made batch by batch, never stored) stream through
:class:`fd_eval.metrics.copies.TopKConsumer` holding ``--gen`` queries; the process's resident memory (VmRSS) is read
after 1%, 10% and 100% of the rows, with the rows/s of the consumer alone. Flat RSS = no training state kept.

Part ``throughput``: ``--images`` 256x256 PNGs (GPIC's size) through the training pass (the extraction loop,
:func:`fd_eval.run.pipeline.run_units`, as :func:`fd_eval.find_copies` runs it) with a :class:`CopiesConsumer` of 100
generated features, per model, random weights in the real architecture; images/s of the whole pass and the
consumer's share of the time.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_utils import images, load_average, random_dinov2_official, sync, write_pngs  # noqa: E402

from fd_eval import open_source
from fd_eval.extractors import load_extractor  # noqa: E402
from fd_eval.metrics import copies as cp  # noqa: E402
from fd_eval.run.options import RunOptions  # noqa: E402
from fd_eval.run.pipeline import auto_device, run_units  # noqa: E402
from fd_eval.util.io_utils import atomic_write  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def part_memory(n_gen: int, rows: int, dim: int, k: int, batch: int, device: torch.device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    queries = torch.randn(n_gen, dim, generator=g).to(device)
    cons = cp.TopKConsumer(queries, k, keep_top1_features=True)
    marks, out, seconds = {rows // 100, rows // 10, rows}, [], 0.0
    done = 0
    while done < rows:
        b = min(batch, rows - done)
        f = torch.randn(b, dim, generator=g).to(device)
        idx = torch.arange(done, done + b, device=device)
        sync(device)
        t0 = time.perf_counter()
        cons.update(f, idx)
        sync(device)
        seconds += time.perf_counter() - t0
        done += b
        if any(done >= m > done - b for m in marks):
            out.append({"rows": done, "rss_mib": round(rss_mib(), 1),
                        "cuda_mib": round(torch.cuda.memory_allocated(device) / 2**20, 1)
                        if device.type == "cuda" else None})
            print(f"  {done:>9,} rows: RSS {out[-1]['rss_mib']:8.1f} MiB")
    return {"gen": n_gen, "dim": dim, "top": k, "batch": batch, "rows": rows, "marks": out,
            "consumer_rows_per_s": round(rows / seconds, 1),
            "state_mib": round(cons.state.packed.numel() * 8 / 2**20, 3)}


def part_throughput(models: list[str], n: int, batch: int, device: torch.device, workers: int) -> dict:
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_pngs(images(n, 256), Path(tmp) / "train")
        src = open_source(folder)
        for name in models:
            if name.startswith("dinov2"):
                ex = load_extractor(name, weights=random_dinov2_official(name, Path(tmp) / f"{name}.pth"),
                                    device=device)
            elif name == "sscd-disc-mixup":
                from fd_eval.extractors.sscd import SSCDNet

                torch.manual_seed(0)
                torch.save(SSCDNet().state_dict(), Path(tmp) / "sscd.pt")
                ex = load_extractor(name, weights=Path(tmp) / "sscd.pt", device=device)
            else:
                raise SystemExit(f"unknown model {name}")
            gen = torch.randn(100, ex.feature_dim, device=device)
            cons = cp.CopiesConsumer(gen, 10)
            spent = [0.0]

            class Timed:
                def update(self, f: torch.Tensor, i: torch.Tensor) -> None:
                    t0 = time.perf_counter()
                    cons.update(f, i)
                    sync(device)
                    spent[0] += time.perf_counter() - t0

            def one_pass() -> None:
                run_units(src, [ex], [np.arange(len(src))], lambda k: [[Timed()]],
                          RunOptions(device=device, batch_size=batch, num_workers=workers).resolve())

            one_pass()  # warm-up (also the first-batch allocations)
            spent[0] = 0.0
            t0 = time.perf_counter()
            one_pass()
            sync(device)
            dt = time.perf_counter() - t0
            res[name] = {"images": n, "images_per_s": round(n / dt, 2), "consumer_share": round(spent[0] / dt, 4)}
            print(f"  {name}: {n / dt:.2f} img/s, consumer {100 * spent[0] / dt:.2f}% of the pass")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=["memory", "throughput", "both"], default="both")
    ap.add_argument("--gen", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--row-batch", type=int, default=4096)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--models", nargs="+", default=["dinov2-vits14", "sscd-disc-mixup"])
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    dev = auto_device(a.device)
    out = {"device": str(dev), "threads": torch.get_num_threads(), "load_average": load_average()}
    if a.part in ("memory", "both"):
        print(f"memory: {a.rows:,} rows x {a.dim} through top-{a.top} of {a.gen:,} queries on {dev}")
        out["memory"] = part_memory(a.gen, a.rows, a.dim, a.top, a.row_batch, dev)
        print(f"  consumer: {out['memory']['consumer_rows_per_s']:,.0f} rows/s")
    if a.part in ("throughput", "both"):
        print(f"throughput: {a.images} images 256x256, batch {a.batch_size}, {a.workers} workers on {dev}")
        out["throughput"] = part_throughput(a.models, a.images, a.batch_size, dev, a.workers)
    if a.json:
        with atomic_write(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
