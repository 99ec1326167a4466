"""torch.compile of DINOv2 in fast mode: the whole network against one transformer block at a time (regional).

    python benchmarks/bench_compile.py                       # ViT-L/14 on a GPU, ViT-S/14 on a CPU
    python benchmarks/bench_compile.py --model dinov2-vits14 --batch-size 16 --json out.json

Each configuration runs in a fresh process with its own inductor cache directory, twice: "cold" (empty cache: a
first run on a machine) and "warm" (the same directory again: a later run). Reports the first call's seconds
(tracing + code generation + the forward), the steady images/s on a ready float32 batch afterwards, and the
compiled features' largest difference from eager fast mode (relative to the largest feature). Random weights in
the official checkpoint layout.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_utils as bu  # noqa: E402

from fd_eval.run.pipeline import auto_device  # noqa: E402
from fd_eval.run.provenance import device_name, versions  # noqa: E402
from fd_eval.util.io_utils import atomic_write  # noqa: E402


def _child(model: str, weights: str, device: str, batch: int, regional: bool, steps: int) -> dict[str, Any]:
    import warnings

    from fd_eval.extractors.base import load_extractor

    warnings.simplefilter("ignore")
    dev = torch.device(device)
    ex = load_extractor(model, weights=weights, device=dev, precision="fast", compile=False)
    x = torch.randn(batch, 3, 224, 224, device=dev)
    eager = ex.forward_input(x)
    if not regional:
        ex.compile_regions = None  # the whole network as one graph
    ex.set_precision("fast", compile=True)
    t0 = time.perf_counter()
    out = ex.forward_input(x)
    bu.sync(dev)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        ex.forward_input(x)
    bu.sync(dev)
    ips = steps * batch / (time.perf_counter() - t0)
    rel = float((out - eager).abs().max() / eager.abs().max())
    return {"first_call_s": first, "images_per_s": ips, "max_rel_diff_vs_eager": rel,
            "compile": ex.compile_status()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default=None, help="default: dinov2-vitl14 on a GPU, dinov2-vits14 on a CPU")
    ap.add_argument("--batch-size", type=int, default=None, help="default 256 on a GPU, 16 on a CPU")
    ap.add_argument("--steps", type=int, default=None, help="timed calls after compiling (default 10 GPU / 3 CPU)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--_child", nargs=6, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        model, weights, device, batch, regional, steps = args._child
        print(json.dumps(_child(model, weights, device, int(batch), regional == "1", int(steps))))
        return {}
    dev = auto_device(args.device)
    gpu = dev.type == "cuda"
    model = args.model or ("dinov2-vitl14" if gpu else "dinov2-vits14")
    batch = args.batch_size or (256 if gpu else 16)
    steps = args.steps or (10 if gpu else 3)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = bu.random_dinov2_official(model, Path(tmp) / f"dinov2_{bu.arch_of(model)}_pretrain.pth")
        for regional in (False, True):
            cache = Path(tmp) / f"inductor_{int(regional)}"
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton")}
            for cache_state in ("cold", "warm"):
                cmd = [sys.executable, __file__, "--_child", model, str(weights), str(dev), str(batch),
                       str(int(regional)), str(steps)]
                r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                row = {"compiled": "per block (regional)" if regional else "whole network", "cache": cache_state,
                       **json.loads(r.stdout.strip().splitlines()[-1])}
                rows.append(row)
                print(f"  {row['compiled']:22s} {cache_state:4s} cache: first call {row['first_call_s']:6.1f} s, "
                      f"then {row['images_per_s']:8.1f} img/s, max rel diff vs eager "
                      f"{row['max_rel_diff_vs_eager']:.1e} ({row['compile']})", flush=True)
    doc = {"benchmark": "torch.compile of DINOv2, whole vs regional", "device": device_name(dev), "model": model,
           "batch_size": batch, "steps": steps, "rows": rows, "versions": versions()}
    if args.json:
        with atomic_write(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    return doc


if __name__ == "__main__":
    main()
