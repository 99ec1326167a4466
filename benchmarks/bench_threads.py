"""FD time at d = 384, 1024, 2048 with 0 and 4 CPU-burning processes beside it: torch's default thread count vs
every fixed count vs the count fd-eval chooses (fd_eval.util.threads), in one run, on the same matrices.

    python benchmarks/bench_threads.py [--dims 384 1024 2048] [--burners 0 4] [--reps 2] [--json out.json]

Each FD is ``fd_eval.frechet_distance`` (Cholesky/eigh factors, one SVD); a fixed count is forced with
``FD_EVAL_LINALG_THREADS=N`` (0 = torch's default), "chosen" leaves it unset. The burners are plain Python loops
(one core each), started before and killed after each block. Times are medians over ``--reps`` (one run when a
setting takes longer than ``--slow`` seconds). The criterion: chosen is never slower than 1 thread and within
10% of the best fixed count.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fd_eval import frechet_distance
from fd_eval.run.provenance import versions
from fd_eval.util.threads import choose_threads, usable_cores

sys.path.insert(0, str(Path(__file__).parent))
from bench_frechet import _covs  # noqa: E402  (same matrices as the FD benchmark)


def _once(args: tuple, threads: int | None) -> float:
    if threads is None:
        os.environ.pop("FD_EVAL_LINALG_THREADS", None)
    else:
        os.environ["FD_EVAL_LINALG_THREADS"] = str(threads)
    try:
        t = time.perf_counter()
        frechet_distance(*args)
        return time.perf_counter() - t
    finally:
        os.environ.pop("FD_EVAL_LINALG_THREADS", None)


def _interleaved(args: tuple, settings: dict[str, int | None], reps: int, slow: float) -> dict[str, list[float]]:
    """Times per setting, the settings alternating within each round (the load drifts; a block per setting would
    compare different moments); a setting slower than ``slow`` seconds runs once."""
    times: dict[str, list[float]] = {k: [] for k in settings}
    for _ in range(reps):
        for name, threads in settings.items():
            if times[name] and times[name][-1] > slow:
                continue
            times[name].append(_once(args, threads))
    return times


def _load() -> str:
    with open("/proc/loadavg") as f:
        return f.read().strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[384, 1024, 2048])
    ap.add_argument("--burners", type=int, nargs="+", default=[0, 4])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--slow", type=float, default=8.0, help="one run only for settings slower than this (s)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    cores = usable_cores()
    counts = list(range(1, min(cores, torch.get_num_threads()) + 1))
    mats = {d: _covs(d) for d in a.dims}
    rows = []
    for nb in a.burners:
        procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(nb)]
        try:
            time.sleep(1.0 if nb else 0.0)
            for d in a.dims:
                row: dict = {"dim": d, "burners": nb, "loadavg_before": _load(), "chosen_threads": choose_threads(d)}
                # torch's default is one of the fixed counts (all usable cores): timed once, under both names
                settings = {"threads_1": 1, "chosen": None, "default": 0,
                            **{f"threads_{n}": n for n in counts if n not in (1, torch.get_num_threads())}}
                times = _interleaved(mats[d], settings, a.reps, a.slow)
                for k, v in times.items():
                    row[f"{k}_s"], row[f"{k}_runs"] = statistics.median(v), v
                row[f"threads_{torch.get_num_threads()}_s"] = row["default_s"]
                best = min(row[f"threads_{n}_s"] for n in counts)
                row["chosen_vs_1_thread"] = row["chosen_s"] / row["threads_1_s"]
                row["chosen_vs_best"] = row["chosen_s"] / best
                rows.append(row)
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                                  if not k.endswith("_runs")}), flush=True)
        finally:
            for p in procs:
                p.kill()
                p.wait()
    out = {"benchmark": "bench_threads", "cores": cores, "torch_default_threads": torch.get_num_threads(),
           "cpu": _cpu_name(), "versions": versions(), "rows": rows,
           "note": "shared 2-core machine: other users' processes run beside every block ('0 burners' is not idle)"}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {a.json}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "?"


if __name__ == "__main__":
    np.random.seed(0)
    main()
