"""Streamed tar shards (the loopback HTTP server the tests use as the Hub) against the same shards on disk.

    python benchmarks/bench_remote.py                  # ~5 minutes on a 2-core CPU
    python benchmarks/bench_remote.py --quick          # seconds

Parts (one JSON, default ``benchmarks/results/remote_cpu.json``):

1. **Throughput**, images/s of reading and decoding every image (``source.load(i)``: the bytes, then
   ``PIL.Image.open(f).convert("RGB")``) of the same GPIC-layout shards (256x256 JPEGs, quality 90, with their
   ``.json`` sidecars) on disk (:class:`TarSource`) and streamed over http from the loopback server
   (:class:`RemoteTarSource`, index already cached, so one streamed read per shard), in one process, interleaved
   rounds (disk, remote, disk, remote, ...) so a busy shared CPU slows both alike; the median round of each. Also
   the read alone (bytes, no decode) to show the transport's own cost. The goal: streamed within 10% of disk
   when decoding (the model then only widens the margin).
2. **Indexing**: opening the streamed shards (one HEAD request each, nothing read) and counting their items
   (``len()``: each shard read once for its index, as a pass that needs the counts up front does).
3. **Memory flat in shard count**: the resident memory (sampled every 5 ms) above its level after the imports, of
   a fresh process that runs a streamed first pass (:func:`engine_pass`: every shard read once into a spool,
   indexed from the stream, every image decoded) over S shards, for 8 and 32 shards of 40 images (the first 8
   warm up the allocator and code paths; flat means 32 costs what 8 does).
4. **Passes of the engine's data path** (:func:`engine_pass`: the DataLoader of
   :func:`fd_eval.run.pipeline.run_units` with two decode workers, the model left out): the same shards on disk,
   streamed from the loopback "Hub" (``hf://`` with ETags) on a first pass (cold tar index cache: each shard
   streamed once into a spool, indexed from the stream), on a cached pass (index cached: members streamed once),
   and the way a pass that needs the counts first goes (``len()`` first: index read, then members read again);
   images/s (median of interleaved rounds) and the bytes the server sent per pass, over the shards' total size.
5. **Statistics with the model** (what a user waits for): :func:`fd_eval.build_stats` with DINOv2 ViT-S/14
   (random weights in the official format, float32, batch 32, two decode workers) over the first 4 shards on disk,
   streamed on a first pass (cold index cache) and streamed with the index cached; images/s (median of
   interleaved rounds), and whether the three statistics files are bit-identical.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def write_shards(folder: Path, n_shards: int, per_shard: int) -> list[Path]:
    from _bench_utils import images
    from PIL import Image

    imgs = images(per_shard * 2, 256, seed=1)  # reused across shards: content does not matter for speed
    enc = []
    for _k, im in enumerate(imgs):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, "JPEG", quality=90)
        enc.append(buf.getvalue())
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        p = folder / f"shard_{s:05d}.tar"
        with tarfile.open(p, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(per_shard):
                key = f"{s:05d}{i:06d}"
                for name, data in ((f"{key}.json", json.dumps({"key": key, "caption": "x" * 200}).encode()),
                                   (f"{key}.jpg", enc[(s * 7 + i) % len(enc)])):
                    ti = tarfile.TarInfo(name)
                    ti.size, ti.mtime = len(data), 1_700_000_000
                    tf.addfile(ti, io.BytesIO(data))
        paths.append(p)
    return paths


def rate(src, decode: bool) -> tuple[float, float]:
    """(images/s wall-clock, CPU ms per image of this process: every thread, the read-ahead included)."""
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(len(src)):
        if decode:
            src.load(i)
        else:
            src.read_encoded(i)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    src.close()
    return len(src) / dt, 1000 * dc / len(src)


def rss_mib() -> float:
    """This process's resident memory now (Linux /proc; ru_maxrss cannot see below the peak of the imports)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child_memory(url_spec: str) -> None:
    """Run in a fresh process: a streamed first pass over the shards (spooled, indexed from the stream, every image
    decoded), print the RSS figures (the resident memory sampled every 5 ms, above what it was after the imports)."""
    import threading

    import fd_eval  # noqa: F401 - imported before the baseline
    from fd_eval.sources import open_source

    base, peak, done = rss_mib(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    src = open_source(url_spec)
    n = engine_pass(src, workers=0)
    done.set()
    t.join()
    print(json.dumps({"n": n, "baseline_rss_mib": round(base, 1), "peak_rss_mib": round(peak[0], 1),
                      "growth_mib": round(peak[0] - base, 1),
                      "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


class _Decode:
    """A map-style dataset: item i decoded (what the engine's workers do before the model's host transform)."""

    def __init__(self, src):
        self.src = src

    def __getitem__(self, i: int) -> int:
        return self.src.load(i).size[0]


def engine_pass(src, workers: int = 2, chunk: int = 32) -> int:
    """The data path of one pass of :func:`fd_eval.run.pipeline.run_units` over every shard of ``src`` (one unit
    per shard), without the model: the same batch plan (streamed: :class:`fd_eval.run.streamed.StreamedBatches`,
    spooling and releasing shards), DataLoader and decode. Returns the number of images decoded."""
    import numpy as np
    import torch

    from fd_eval.run.streamed import ShardItems, StreamedBatches

    if getattr(src, "pending", None) is not None:
        units: list = [ShardItems(src, [s]) for s in range(len(src.shards))]
    else:
        units = [np.arange(a, b) for a, b in zip(src.shard_starts[:-1], src.shard_starts[1:])]
    plan = StreamedBatches(src, units, chunk)
    n = 0
    try:
        loader = torch.utils.data.DataLoader(_Decode(src), batch_sampler=plan, num_workers=workers,
                                             collate_fn=len, prefetch_factor=4 if workers else None)
        for i, m in enumerate(loader):
            n += m
            for s in plan.frees[i]:
                src.release(s)
    finally:
        plan.close()
    return n


def serve(folder: Path) -> None:
    """Run in a separate process (so its threads never hold the benchmark's GIL): serve ``folder``'s shards (as
    mirror files and as an ``hf://datasets/bench/shards`` repository with ETags); a line ``served`` on stdin is
    answered with the body bytes sent so far."""
    from _fake_hub import FakeHub

    with FakeHub() as hub:
        for p in sorted(folder.rglob("*.tar")):
            data = p.read_bytes()
            hub.add_mirror(p.relative_to(folder).as_posix(), data)
            hub.add_file("bench/shards", p.relative_to(folder).as_posix(), data)
        print(hub.url, flush=True)
        for line in sys.stdin:  # until the parent closes our stdin
            if line.strip() == "served":
                print(sum(hub.served.values()), flush=True)


def passes(url: str, disk_spec: str, n_shards: int, paths: list[Path], server, rounds: int) -> dict:
    """Part 4: engine passes over the shards on disk, streamed first (cold index cache), streamed cached, and
    indexed first (``len()``, then the pass); img/s (median of interleaved rounds) and bytes sent per pass."""
    from fd_eval.sources import open_source

    os.environ["HF_ENDPOINT"] = url
    hf_spec = f"hf://datasets/bench/shards/shard_{{00000..{n_shards - 1:05d}}}.tar"
    total = sum(p.stat().st_size for p in paths)
    cache = os.environ["FD_EVAL_CACHE"]

    def served() -> int:
        server.stdin.write("served\n")
        server.stdin.flush()
        return int(server.stdout.readline())

    def first() -> object:
        os.environ["FD_EVAL_CACHE"] = tempfile.mkdtemp(prefix="cold_", dir=cache)  # a cold tar index cache
        return open_source(hf_spec)

    def counted_first() -> object:
        src = first()
        len(src)  # (what a pass that needs the counts up front does: every shard indexed first)
        return src

    kinds = {"disk": lambda: open_source(disk_spec), "streamed_first_pass": first,
             "streamed_cached_pass": lambda: open_source(hf_spec), "streamed_indexed_first": counted_first}
    engine_pass(kinds["streamed_first_pass"]())  # warm up (and cache the index for the cached pass)
    res: dict[str, list[float]] = {k: [] for k in kinds}
    sent: dict[str, list[int]] = {k: [] for k in kinds}
    for r in range(rounds):
        for k in list(kinds)[::1 if r % 2 == 0 else -1]:
            b0, t0 = served(), time.perf_counter()
            src = kinds[k]()
            n = engine_pass(src)
            res[k].append(n / (time.perf_counter() - t0))
            sent[k].append(served() - b0)
    os.environ["FD_EVAL_CACHE"] = cache
    med = {k: statistics.median(v) for k, v in res.items()}
    return {"images": n, "shards_total_bytes": total, "decode_workers": 2, "rounds": rounds,
            "images_per_s": {k: round(v, 1) for k, v in med.items()},
            "over_disk": {k: round(v / med["disk"], 3) for k, v in med.items()},
            "bytes_sent_over_shard_bytes": {k: round(statistics.median(v) / total, 3) for k, v in sent.items()},
            "rounds_images_per_s": {k: [round(x, 1) for x in v] for k, v in res.items()}}


def with_model(url: str, disk_spec: str, n_shards: int, tmp: Path, rounds: int) -> dict:
    """Part 5: ``build_stats`` with DINOv2 ViT-S/14 on disk, streamed first (cold index cache), streamed cached."""
    import hashlib

    from _bench_utils import random_dinov2_official

    import fd_eval

    os.environ["HF_ENDPOINT"] = url
    hf_spec = f"hf://datasets/bench/shards/shard_{{00000..{n_shards - 1:05d}}}.tar"
    weights = random_dinov2_official("dinov2-vits14", tmp / "vits14.pth")
    opts = fd_eval.RunOptions(device="cpu", batch_size=32, num_workers=2, progress=False)
    cache = os.environ["FD_EVAL_CACHE"]
    digests: dict[str, set[str]] = {}

    def run(kind: str) -> float:
        if kind == "streamed_first_pass":
            os.environ["FD_EVAL_CACHE"] = tempfile.mkdtemp(prefix="cold_", dir=cache)
        out = tmp / f"stats_{kind}.safetensors"
        out.unlink(missing_ok=True)
        t0 = time.perf_counter()
        st = fd_eval.build_stats(disk_spec if kind == "disk" else hf_spec, out, "dinov2-vits14",
                                 weights={"dinov2-vits14": str(weights)}, options=opts)
        dt = time.perf_counter() - t0
        os.environ["FD_EVAL_CACHE"] = cache
        s = st["dinov2-vits14"]
        digests.setdefault(kind, set()).add(hashlib.sha256(s.mu.tobytes() + s.sigma.tobytes()).hexdigest())
        return s.n / dt

    kinds = ["disk", "streamed_first_pass", "streamed_cached_pass"]
    run("streamed_first_pass")  # warm up (model load paths; caches the index for the cached pass)
    res: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(rounds):
        for k in kinds[::1 if r % 2 == 0 else -1]:
            res[k].append(run(k))
    med = {k: statistics.median(v) for k, v in res.items()}
    return {"model": "dinov2-vits14 (random weights), float32, batch 32, 2 decode workers",
            "images_per_s": {k: round(v, 2) for k, v in med.items()},
            "over_disk": {k: round(v / med["disk"], 3) for k, v in med.items()},
            "stats_bit_identical": len(set().union(*digests.values())) == 1,
            "rounds_images_per_s": {k: [round(x, 2) for x in v] for k, v in res.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "remote_cpu.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child_memory(a.child)
    if a.serve:
        return serve(Path(a.serve))
    if a.quick:
        a.shards, a.per_shard, a.rounds = 3, 30, 1
    os.environ.pop("FD_EVAL_OFFLINE", None)
    os.environ.pop("HF_HUB_OFFLINE", None)
    import fd_eval
    from fd_eval.sources import open_source

    tmp = Path(tempfile.mkdtemp(prefix="fd_eval_bench_remote_"))
    os.environ["FD_EVAL_CACHE"] = str(tmp / "cache")  # a cold index cache of our own
    large = a.shards
    paths = write_shards(tmp / "shards", large, a.per_shard)
    mem_counts = (4, 16) if a.quick else (8, 32)  # small shards for part 3: many of them in little time
    write_shards(tmp / "shards" / "mem", mem_counts[1], 10 if a.quick else 40)
    disk_spec = str(tmp / "shards" / f"shard_{{00000..{large - 1:05d}}}.tar")
    out: dict = {"benchmark": "bench_remote.py: streamed tar shards (loopback http) vs the same shards on disk",
                 "device": f"cpu ({platform.machine()}, {os.cpu_count()} threads)", "shards": large,
                 "images_per_shard": a.per_shard, "shard_mib": round(paths[0].stat().st_size / 2**20, 2),
                 "versions": {"fd_eval": fd_eval.__version__, "python": platform.python_version()},
                 "load_average_before": list(os.getloadavg())}
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(tmp / "shards")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        url_spec = f"{url}/mirror/shard_{{00000..{large - 1:05d}}}.tar"
        t0 = time.perf_counter()
        remote = open_source(url_spec)
        first_open = time.perf_counter() - t0
        t0 = time.perf_counter()
        len(remote)  # the counts: each shard read once for its index (no ETag here: not cached)
        first_count = time.perf_counter() - t0
        disk = open_source(disk_spec)
        t0 = time.perf_counter()
        open_source(disk_spec)
        disk_open = time.perf_counter() - t0
        out["indexing_s"] = {"streamed_open": first_open, "streamed_len_indexes_every_shard": first_count,
                             "disk_open_cached": disk_open}
        res: dict[str, list[tuple[float, float]]] = {f"{w}_{m}": [] for m in ("read", "decode")
                                                     for w in ("disk", "remote")}
        rate(disk, False), rate(remote, False)  # warm the page cache and the connections' code paths
        for r in range(a.rounds):
            order = (("disk", disk), ("remote", remote))[::1 if r % 2 == 0 else -1]  # alternate who goes first
            for mode in ("read", "decode"):
                for name, src in order:
                    res[f"{name}_{mode}"].append(rate(src, mode == "decode"))
        med = {k: statistics.median(x[0] for x in v) for k, v in res.items()}
        cpu = {k: statistics.median(x[1] for x in v) for k, v in res.items()}
        out["images_per_s"] = {k: round(v, 1) for k, v in med.items()}
        out["cpu_ms_per_image"] = {k: round(v, 4) for k, v in cpu.items()}
        out["rounds_images_per_s"] = {k: [round(x[0], 1) for x in v] for k, v in res.items()}
        out["remote_over_disk"] = {
            "decode_images_per_s": round(med["remote_decode"] / med["disk_decode"], 3),
            "decode_cpu_per_image": round(cpu["remote_decode"] / cpu["disk_decode"], 3),
            "read_only_images_per_s": round(med["remote_read"] / med["disk_read"], 3)}
        out["engine_pass"] = passes(url, disk_spec, large, paths, server, max(3, a.rounds // 3))
        m = min(4, large)  # the first shards: the network makes each pass ~20 s on a 2-core CPU
        out["stats_with_model"] = with_model(url, str(tmp / "shards" / f"shard_{{00000..{m - 1:05d}}}.tar"), m, tmp,
                                             1 if a.quick else 3)
        mem = {}
        for s in mem_counts:
            spec = f"{url}/mirror/mem/shard_{{00000..{s - 1:05d}}}.tar"
            r = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True,
                               env={**os.environ}, timeout=600)
            if r.returncode:
                raise SystemExit(r.stderr)
            mem[str(s)] = json.loads(r.stdout.strip().splitlines()[-1])
        out["memory_by_shard_count"] = mem
    finally:
        server.stdin.close()
        server.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)
    out["load_average_after"] = list(os.getloadavg())
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("images_per_s", "cpu_ms_per_image", "remote_over_disk", "indexing_s",
                                          "engine_pass", "stats_with_model", "memory_by_shard_count")}, indent=1))


if __name__ == "__main__":
    main()
