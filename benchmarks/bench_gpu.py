"""Every GPU speed figure of the protocol's numerics in one run (issue 16): rows of images/s, ratio, FD change.

    python benchmarks/bench_gpu.py                          # GPU: ViT-L/14, 50K end to end, ~8 min on an H200
    python benchmarks/bench_gpu.py --dry-run                # CPU: ViT-S/14, 64 images, every row, seconds
    bash benchmarks/run_gpu.sh                              # this script first, then the older benchmarks

Writes ``benchmarks/results/gpu_<card>.json`` (``cpu_dryrun.json`` for a CPU run) after every row, so a run cut
short keeps what it measured. Random weights in the real architecture (official checkpoint layout); photo-crop
PNGs written once (``--unique``) and read repeatedly (page cache) to make the larger passes.

Rows (``name``, ``images_per_s``, ``ratio_to_baseline`` = rate / the dgm-eval-style loop's, ``fd_rel_change``
= |FD - FD(IEEE float32)| / FD(IEEE float32) on two parity sets, ``feature_rel_rms`` against IEEE):

* ``baseline (dgm-eval-style loop)``: the hub model, torchvision transforms in DataLoader workers, float32;
* network alone (a ready 224x224 batch on the device): ``hub network fp32``, ``exact (IEEE fp32)``,
  ``exact (3xTF32 cat|sum)``, ``exact (3xTF32) compiled``, ``fast eager``, ``fast compiled``, ``fp8``;
  compiled rows also record the first call's seconds (compile; a second run reads the inductor cache under
  ``$FD_EVAL_CACHE/inductor``: run the script twice to see the warm start);
* ``decode-only worker scaling`` (benchmarks/bench_pipeline.py's part 2: host decode, no model);
* ``end to end``: ``load_extractor`` + ``compute_stats`` over ``--e2e-n`` images in exact mode (the protocol's
  default), model load included; and ``gpu_busy_share`` = (images / network-alone rate) / wall time (1 minus it
  is the GPU's idle share).

Also recorded: which SDPA kernel runs for float32 attention (profiler kernel names) and how cuBLAS rounds
float32 inputs to TF32 (nearest or truncation, from a matmul whose result tells them apart).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_utils as bu  # noqa: E402

from fd_eval import frechet_distance, load_extractor, open_source  # noqa: E402
from fd_eval.core.splitmm import round_tf32, trunc_tf32  # noqa: E402
from fd_eval.extractors import precision as prec  # noqa: E402
from fd_eval.run.provenance import device_name, versions  # noqa: E402
from fd_eval.sources import SubsetSource  # noqa: E402
from fd_eval.util.io_utils import atomic_write  # noqa: E402


# --- facts about the GPU's arithmetic -------------------------------------------------------------------------
def cublas_tf32_rounding(dev: torch.device) -> str:
    """``"nearest"``, ``"truncate"`` or ``"undetermined ..."``: how a TF32 cuBLAS matmul rounds float32 inputs.

    A (256, 256) x (256, 256) product (large enough for a tensor-core kernel) of inputs in [1, 2), against
    both emulations computed in float64 (exact sums of exact TF32 products): the rounding mode moves results by
    ~1e-4 relative, float32 accumulation order by ~1e-7. "n/a" without CUDA."""
    if dev.type != "cuda":
        return "n/a (no CUDA)"
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(256, 256, generator=g) + 1, torch.rand(256, 256, generator=g) + 1
    with prec.fast_numerics("cuda", "tf32"):
        got = (a.to(dev) @ b.to(dev)).double().cpu()
    out = {}
    for name, fn in (("nearest", round_tf32), ("truncate", trunc_tf32)):
        want = fn(a).double() @ fn(b).double()
        out[name] = float(((got - want).abs() / want.abs()).max())
    best = min(out, key=out.get)
    other = max(out.values())
    return best if out[best] * 10 < other else f"undetermined {out}"


def sdpa_kernels(dev: torch.device, dim: int, heads: int) -> dict[str, Any]:
    """The kernels a float32 SDPA call launches (plain and inside exact's split numerics)."""
    if dev.type != "cuda":
        return {"note": "n/a (no CUDA)"}
    from torch.profiler import ProfilerActivity, profile

    q, k, v = (torch.randn(8, heads, 257, dim // heads, device=dev) for _ in range(3))
    out = {}
    for name, ctx in (("exact numerics", prec.exact_numerics), ("split numerics", lambda: prec.split_numerics("cuda"))):
        with ctx(), profile(activities=[ProfilerActivity.CUDA]) as p:
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
            torch.cuda.synchronize()
        out[name] = sorted({e.name for e in p.events() if e.device_type.name == "CUDA"})[:8]
    return out


# --- measurements ---------------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any], dev: torch.device) -> float:
    bu.sync(dev)
    t0 = time.perf_counter()
    fn()
    bu.sync(dev)
    return time.perf_counter() - t0


def network_rate(ex, dev: torch.device, batch: int, batches: int) -> tuple[float, float]:
    """(images/s of ``ex.forward_input`` on a ready batch, seconds of the first call: warm-up or compile)."""
    x = torch.randn(batch, 3, 224, 224, device=dev)
    first = timed(lambda: ex.forward_input(x), dev)
    ex.forward_input(x)
    t = timed(lambda: [ex.forward_input(x) for _ in range(batches)], dev)
    return batches * batch / t, first


def features(ex, sets: list[torch.Tensor], batch: int) -> list[np.ndarray]:
    return [torch.cat([ex(s[i:i + batch]).cpu() for i in range(0, len(s), batch)]).double().numpy() for s in sets]


def fd(f: list[np.ndarray]) -> float:
    return frechet_distance(f[0].mean(0), np.cov(f[0], rowvar=False), f[1].mean(0), np.cov(f[1], rowvar=False))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dry-run", action="store_true", help="CPU, ViT-S/14, tiny sizes: checks the script runs")
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--batches", type=int, default=None, help="timed batches per network-alone row")
    ap.add_argument("--parity-n", type=int, default=None, help="images per parity set (2 sets)")
    ap.add_argument("--unique", type=int, default=None, help="distinct PNG files written")
    ap.add_argument("--baseline-n", type=int, default=None)
    ap.add_argument("--e2e-n", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--skip", nargs="*", default=[], help="row name prefixes to skip")
    ap.add_argument("--json", default=None, help="default: OUT_DIR/gpu_<card>.json (cpu_dryrun.json on a CPU)")
    ap.add_argument("--out-dir", default="benchmarks/results")
    a = ap.parse_args(argv)
    dev = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if a.device == "auto" else a.device))
    gpu = dev.type == "cuda" and not a.dry_run
    model = a.model or ("dinov2-vitl14" if gpu else "dinov2-vits14")
    bs = a.batch_size or (256 if gpu else 8)
    batches = a.batches or (10 if gpu else 1)
    parity_n = a.parity_n or (256 if gpu else 16)
    unique = a.unique or (4096 if gpu else 32)
    base_n = a.baseline_n or (8000 if gpu else 64)
    e2e_n = a.e2e_n or (50_000 if gpu else 64)
    workers = a.workers if a.workers is not None else (min(16, len(os.sched_getaffinity(0))) if gpu else 2)
    card = re.sub(r"[^a-z0-9]+", "_", device_name(dev).lower()).strip("_") if dev.type == "cuda" else "cpu"
    out_json = a.json or f"{a.out_dir}/{'cpu_dryrun' if not gpu else 'gpu_' + card}.json"
    torch.manual_seed(0)
    doc: dict[str, Any] = {"benchmark": "bench_gpu.py: GPU speed of the protocol's numerics (issue 16)",
                           "dry_run_on_cpu": not gpu, "device": device_name(dev), "model": model,
                           "batch_size": bs, "random_weights": True, "versions": versions(), "rows": [],
                           "load_average_start": bu.load_average()}

    def save() -> None:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(out_json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")

    def row(name: str, rate: float | None, **extra: Any) -> None:
        base = doc.get("baseline_images_per_s")
        r = {"name": name, "images_per_s": rate, "ratio_to_baseline": rate / base if rate and base else None,
             **extra}
        doc["rows"].append(r)
        fdc = extra.get("fd_rel_change")
        print(f"  {name:34s} {rate or 0:9.1f} img/s  x{r['ratio_to_baseline'] or 0:5.2f}"
              + (f"  FD rel change {fdc:.2e}" if fdc is not None else ""), flush=True)
        save()

    def skip(name: str) -> bool:
        return any(name.startswith(s) for s in a.skip)

    doc["cublas_tf32_input_rounding"] = cublas_tf32_rounding(dev)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        w = bu.random_dinov2_official(model, tmp / f"dinov2_{bu.arch_of(model)}_pretrain.pth")
        folder = bu.write_pngs(bu.images(unique, 256, seed=0), tmp / "png")
        files = sorted(str(p) for p in folder.iterdir())
        sets = [torch.from_numpy(bu.images(parity_n, 224, seed=s)).permute(0, 3, 1, 2).contiguous() for s in (1, 2)]
        ex = load_extractor(model, weights=w, device=dev)
        doc["sdpa_float32_kernels"] = sdpa_kernels(dev, ex.feature_dim, ex.arch.num_heads)

        # 1. the dgm-eval-style loop (the ratio's denominator)
        import bench_pipeline

        hub = bu.hub_dinov2(model, w)
        if hub is not None and not skip("baseline"):
            hub = hub.to(dev)
            rep = (files * (base_n // len(files) + 1))[:base_n]
            with prec.exact_numerics():
                t, _, _ = bench_pipeline.baseline(rep, hub, dev, bs, workers)
            doc["baseline_images_per_s"] = base_n / t
            row("baseline (dgm-eval-style loop)", base_n / t, n=base_n, num_workers=workers)
            with prec.exact_numerics(), torch.no_grad():
                x = torch.randn(bs, 3, 224, 224, device=dev)
                hub(x)
                t = timed(lambda: [hub(x) for _ in range(batches)], dev)
            row("hub network fp32 (network alone)", batches * bs / t)
            del hub

        # 2. network alone + FD change, per mode
        configs: list[tuple[str, str, bool | None, dict[str, str]]] = [
            ("exact (IEEE fp32)", "fp32", False, {}),
            ("exact (3xTF32 cat)", "exact", False, {prec.MATMUL_ENV: "split3", prec.SPLIT3_FORM_ENV: "cat"}),
            ("exact (3xTF32 sum)", "exact", False, {prec.MATMUL_ENV: "split3", prec.SPLIT3_FORM_ENV: "sum"}),
            ("exact (3xTF32) compiled", "exact", True, {prec.MATMUL_ENV: "split3"}),
            ("fast eager", "fast", False, {}),
            ("fast compiled", "fast", True, {}),
            ("fp8", "fp8", False, {}),
        ]
        ref_feats = None
        rates: dict[str, float] = {}
        for name, mode, comp, env in configs:
            if skip(name):
                continue
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                ex.set_precision(mode, compile=comp)
                rate, first = network_rate(ex, dev, bs, batches)
                f = features(ex, sets, bs)
                if ref_feats is None:
                    ref_feats = f
                fd_ref, fd_mode = fd(ref_feats), fd(f)
                allf, allr = np.concatenate(f), np.concatenate(ref_feats)
                rms = float(np.sqrt(((allf - allr) ** 2).mean() / (allr ** 2).mean()))
                rates[name] = rate
                row(name + " (network alone)", rate, fd=fd_mode, fd_rel_change=abs(fd_mode - fd_ref) / fd_ref,
                    feature_rel_rms=rms, matmul=ex.matmul_description(), compile=ex.compile_status(),
                    first_call_seconds=first, parity_n=parity_n)
            except Exception as e:  # noqa: BLE001 - a mode this GPU lacks (fp8 before Hopper) must not stop the rest
                row(name + " (network alone)", None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            finally:
                for k, v in saved.items():
                    os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
                ex.set_precision("exact")
        doc["inductor_cache_dir"] = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        del ex

        # 3. host decode scaling, no model (bench_pipeline part 2)
        if not skip("decode"):
            ns = argparse.Namespace(n=unique, decode_images=min(unique, 2048 if gpu else 32), feature_dim=16,
                                    repeats=1, quick=not gpu)
            doc["decode_only_worker_scaling"] = bench_pipeline.decode_resize(ns, tmp)
            save()

        # 4. 50K end to end in exact mode, model load included
        if not skip("end to end"):
            from fd_eval import compute_stats

            src = SubsetSource(open_source(str(folder)), np.resize(np.arange(len(files)), e2e_n))
            t0 = time.perf_counter()
            e = load_extractor(model, weights=w, device=dev)
            s = compute_stats(src, extractors=[e], device=dev, batch_size=bs, num_workers=workers, progress=False,
                              world_size=1)[e.name]
            bu.sync(dev)
            t = time.perf_counter() - t0
            net = rates.get("exact (3xTF32 cat)" if dev.type == "cuda" else "exact (IEEE fp32)")
            busy = (e2e_n / net) / t if net else None
            row(f"end to end exact {e2e_n} images (incl. model load)", e2e_n / t, seconds=t,
                matmul=s.metadata.get("precision", {}).get("matmul"), num_workers=workers,
                gpu_busy_share=busy, gpu_idle_share=None if busy is None else max(0.0, 1 - busy))
    doc["load_average_end"] = bu.load_average()
    save()
    print(f"wrote {out_json}")
    return doc


if __name__ == "__main__":
    main()
