"""Streamed tar shards (the loopback HTTP server the tests use as the Hub) against the same shards on disk.

    python benchmarks/bench_remote.py                  # ~1-2 minutes on a 2-core CPU
    python benchmarks/bench_remote.py --quick          # seconds

Parts (one JSON, default ``benchmarks/results/remote_cpu.json``):

1. **Throughput**, images/s of reading and decoding every image (``source.load(i)``: the bytes, then
   ``PIL.Image.open(f).convert("RGB")``) of the same GPIC-layout shards (256x256 JPEGs, quality 90, with their
   ``.json`` sidecars) on disk (:class:`TarSource`) and streamed over http from the loopback server
   (:class:`RemoteTarSource`, index already cached, so one streamed read per shard), in one process, interleaved
   rounds (disk, remote, disk, remote, ...) so a busy shared CPU slows both alike; the median round of each. Also
   the read alone (bytes, no decode) to show the transport's own cost. The goal: streamed within 10% of disk
   when decoding (the model then only widens the margin).
2. **Indexing**: opening the streamed shards the first time (each read once for its index) and again (from
   the index cache).
3. **Memory flat in shard count**: the resident memory (sampled every 5 ms) above its level after the imports, of
   a fresh process that opens S streamed shards and reads and decodes every image, for 8 and 32 shards
   of 40 images (the first 8 warm up the allocator and code paths; flat means 32 costs what 8 does).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
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
    """Run in a fresh process: open the streamed shards, read + decode every image, print the RSS figures (the
    resident memory sampled every 5 ms, above what it was after the imports)."""
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
    for i in range(len(src)):
        src.load(i)
    done.set()
    t.join()
    print(json.dumps({"n": len(src), "baseline_rss_mib": round(base, 1), "peak_rss_mib": round(peak[0], 1),
                      "growth_mib": round(peak[0] - base, 1),
                      "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def serve(folder: Path) -> None:
    """Run in a separate process (so its threads never hold the benchmark's GIL): serve ``folder``'s shards."""
    from _fake_hub import FakeHub

    with FakeHub() as hub:
        for p in sorted(folder.rglob("*.tar")):
            hub.add_mirror(p.relative_to(folder).as_posix(), p.read_bytes())
        print(hub.url, flush=True)
        sys.stdin.read()  # until the parent closes our stdin


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
        open_source(url_spec)  # no ETag from this server: indexed again; the Hub's ETag makes it a cache hit
        second_open = time.perf_counter() - t0
        disk = open_source(disk_spec)
        t0 = time.perf_counter()
        open_source(disk_spec)
        disk_open = time.perf_counter() - t0
        out["indexing_s"] = {"streamed_first_open": first_open, "streamed_reopen_without_etag": second_open,
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
    out["load_average_after"] = list(os.getloadavg())
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("images_per_s", "cpu_ms_per_image", "remote_over_disk", "indexing_s",
                                          "memory_by_shard_count")}, indent=1))


if __name__ == "__main__":
    main()
