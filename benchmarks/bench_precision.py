"""How much FD moves between precision modes (and between DINOv2's PIL and torch resize), on the same images.

    python benchmarks/bench_precision.py                          # CPU: vits14, both Inception lineages
    python benchmarks/bench_precision.py --models dinov2-vitl14 --n 48
    python benchmarks/bench_precision.py --quick                  # tiny (used by the tests)

Random weights in the real architectures (official checkpoint layouts, written to a temp dir); image sets:
photo crops A and B (same distribution) and degraded versions of B (blur, noise, JPEG q=20, desaturated), each
scored against A. For each model and mode it reports, per pair, |FD_mode - FD_exact| / FD_exact with

* ``same``: both sides computed in the mode (a reference built in fast mode, e.g. from an image source);
* ``mixed``: the generated side in the mode, the reference in exact (``--precision fast --allow-mismatch``
  against GPIC's exact statistics);

and the features' relative RMS error. Modes: ``fast`` (fd-eval's fast mode as it runs on this device: bfloat16
autocast for DINOv2; for Inception TF32, which CPUs do not have, so on a CPU it measures channels_last only),
``bf16`` (bfloat16 autocast forced, for the families whose fast mode is not bfloat16), ``tf32`` (emulated: the
inputs and weights of every Linear/Conv2d rounded to TF32's 10-bit mantissa, round-to-nearest-even, float32
accumulation, which is what TF32 tensor cores compute; attention matmuls stay float32), ``tf32-conv`` (DINOv2:
the same for convolutions only, i.e. the patch embedding: what the reference codes compute by default on Ampere+
GPUs, where PyTorch enables TF32 for cuDNN but not for matmuls; for Inception that is ``tf32``), and for DINOv2
``torch-resize`` (exact numerics, F.interpolate bicubic+antialias on the device instead of Pillow), ``fp8``
(DINOv2: e4m3 Linear layers with row-wise scales, emulated on a CPU) and ``split3`` (exact's 3xTF32 Linear
layers, emulated on a CPU: should equal exact to ~1e-6).
On a CPU the bfloat16 kernels are oneDNN's, not cuBLAS/flash attention's: same rounding of inputs and activations,
float32 accumulation in both, so the error size carries over; trained weights may behave differently.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import _bench_utils as bu
import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

from fd_eval import frechet_distance, load_extractor
from fd_eval.core.splitmm import round_tf32  # TF32 emulation: nearest, ties to even (see its docstring)
from fd_eval.extractors import precision
from fd_eval.run.provenance import device_name, versions
from fd_eval.util.io_utils import atomic_write


# --- image sets ---------------------------------------------------------------------------------------------
def _degrade(arr: np.ndarray, kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for im in arr:
        p = Image.fromarray(im)
        if kind == "blur":
            p = p.filter(ImageFilter.GaussianBlur(1.5))
        elif kind == "noise":
            a = np.asarray(p).astype(np.float32) + rng.normal(0, 12, im.shape)
            p = Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))
        elif kind == "jpeg20":
            import io

            b = io.BytesIO()
            p.save(b, format="JPEG", quality=20)
            p = Image.open(io.BytesIO(b.getvalue())).convert("RGB")
        elif kind == "desaturate":
            p = ImageEnhance.Color(p).enhance(0.4)
        out.append(np.asarray(p))
    return np.stack(out)


def image_sets(n: int, size: int = 256) -> dict[str, np.ndarray]:
    a, b = bu.images(n, size, seed=1), bu.images(n, size, seed=2)
    sets = {"A": a, "B": b}
    for k, kind in enumerate(("blur", "noise", "jpeg20", "desaturate")):
        sets[f"B-{kind}"] = _degrade(b, kind, seed=10 + k)
    return sets


# --- TF32 emulation -----------------------------------------------------------------------------------------
def tf32_model(model: torch.nn.Module, kinds: tuple = (torch.nn.Linear, torch.nn.Conv2d)) -> torch.nn.Module:
    """A copy whose Linear/Conv2d (``kinds``) weights are TF32-rounded and whose inputs are rounded before each
    call."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, kinds):
            with torch.no_grad():
                mod.weight.copy_(round_tf32(mod.weight))
            mod.register_forward_pre_hook(lambda _m, args: (round_tf32(args[0].float()), *args[1:]))
    return m


# --- features -----------------------------------------------------------------------------------------------
def features(ex, arr: np.ndarray, batch: int) -> np.ndarray:
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    return torch.cat([ex(x[s:s + batch]).cpu() for s in range(0, len(x), batch)]).double().numpy()


def fd(f1: np.ndarray, f2: np.ndarray) -> float:
    return frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))


class _Bf16:
    """The network under bfloat16 autocast, whatever the family's fast mode is."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.model(x)


def measure(name: str, weights: Path, sets: dict[str, np.ndarray], batch: int, modes: list[str],
            device: str = "cpu") -> dict:
    feats: dict[str, dict[str, np.ndarray]] = {}
    seconds: dict[str, float] = {}
    ex = load_extractor(name, weights=weights, device=device)
    runs = [("exact", ex, None)]
    if "fast" in modes:
        runs.append(("fast", None, None))
    if "bf16" in modes and ex.fast_compute != "bfloat16":
        runs.append(("bf16", None, _Bf16(ex.model)))
    if "tf32" in modes:
        runs.append(("tf32", None, tf32_model(ex.model)))
    if "tf32-conv" in modes and name.startswith("dinov2"):
        runs.append(("tf32-conv", None, tf32_model(ex.model, (torch.nn.Conv2d,))))
    if "fp8" in modes and name.startswith("dinov2"):
        runs.append(("fp8", None, None))
    if "split3" in modes and name.startswith("dinov2"):
        runs.append(("split3", None, None))
    if "torch-resize" in modes and name.startswith("dinov2"):
        runs.append(("torch-resize", load_extractor(name, weights=weights, resize="torch", device=device), None))
    for mode, other, model in runs:
        e = other or ex
        if mode in ("fast", "fp8"):
            e.set_precision(mode)
        elif mode == "split3":  # exact's 3xTF32 path (emulated on a CPU)
            os.environ[precision.MATMUL_ENV] = "split3"
            e.set_precision("exact")
        elif mode in ("tf32", "tf32-conv", "bf16"):
            e.set_precision("exact")
            e.forward_model = model  # exact numerics around the TF32-rounded copy / the autocast wrapper
        t0 = time.perf_counter()
        feats[mode] = {k: features(e, v, batch) for k, v in sets.items()}
        seconds[mode] = time.perf_counter() - t0
        if mode == "split3":
            os.environ.pop(precision.MATMUL_ENV, None)
        if mode in ("fast", "tf32", "tf32-conv", "bf16", "fp8", "split3"):
            ex.set_precision("exact")  # back to the plain model
        print(f"  {name} {mode:12s} {sum(len(v) for v in sets.values()) / seconds[mode]:7.1f} img/s", flush=True)
    pairs = [k for k in sets if k != "A"]
    out: dict = {"model": name, "n_per_set": int(len(sets["A"])), "pairs": {}, "modes": {}}
    exact = feats["exact"]
    for k in pairs:
        out["pairs"][k] = {"fd_exact": fd(exact[k], exact["A"])}
    for mode in feats:
        if mode == "exact":
            continue
        f = feats[mode]
        rows = {}
        for k in pairs:
            ref = out["pairs"][k]["fd_exact"]
            same, mixed = fd(f[k], f["A"]), fd(f[k], exact["A"])
            rows[k] = {"fd_same": same, "fd_mixed": mixed, "rel_same": abs(same - ref) / ref,
                       "rel_mixed": abs(mixed - ref) / ref}
        allf = np.concatenate([f[k] for k in sets])
        alle = np.concatenate([exact[k] for k in sets])
        err = float(np.sqrt(((allf - alle) ** 2).mean() / (alle ** 2).mean()))
        out["modes"][mode] = {
            "pairs": rows,
            "fd_rel_same_max": max(r["rel_same"] for r in rows.values()),
            "fd_rel_mixed_max": max(r["rel_mixed"] for r in rows.values()),
            "fd_rel_same_median": float(np.median([r["rel_same"] for r in rows.values()])),
            "fd_rel_mixed_median": float(np.median([r["rel_mixed"] for r in rows.values()])),
            "feature_rel_rms_error": err,
            "images_per_s": sum(len(v) for v in sets.values()) / seconds[mode],
        }
    out["images_per_s_exact"] = sum(len(v) for v in sets.values()) / seconds["exact"]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["dinov2-vits14", "inception-v3-tf", "inception-v3-pt"])
    ap.add_argument("--n", type=int, default=128, help="images per set (6 sets)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--modes", nargs="+", default=["fast", "bf16", "tf32", "tf32-conv", "torch-resize"])
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: GPU kernels (cuBLAS/cuDNN, flash "
                    "attention) in every mode; the tf32 modes stay emulated so they mean the same on both")
    ap.add_argument("--quick", action="store_true", help="dinov2-vits14 only, 3 images per set, fast mode only")
    ap.add_argument("--json", default="benchmarks/results/precision.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.n, args.modes = ["dinov2-vits14"], 3, ["fast"]
    torch.manual_seed(0)
    sets = image_sets(args.n)
    results = []
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if name.startswith("dinov2"):
                w = bu.random_dinov2_official(name, Path(tmp) / f"dinov2_{bu.arch_of(name)}_pretrain.pth")
            else:
                w = bu.random_inception(Path(tmp) / "pt_inception-2015-12-05.pth")
            r = measure(name, w, sets, args.batch_size, args.modes, args.device)
            results.append(r)
            for mode, m in r["modes"].items():
                print(f"{name:16s} {mode:12s} FD rel. diff: same-mode max {m['fd_rel_same_max']:.2e} (median "
                      f"{m['fd_rel_same_median']:.2e}), mixed max {m['fd_rel_mixed_max']:.2e} (median "
                      f"{m['fd_rel_mixed_median']:.2e}); feature rel. RMS error {m['feature_rel_rms_error']:.2e}",
                      flush=True)
            print(f"{name:16s} FD exact per pair: " + ", ".join(f"{k} {v['fd_exact']:.4g}"
                                                               for k, v in r["pairs"].items()))
    doc = {"benchmark": "precision modes: FD differences", "device": device_name(torch.device(args.device)),
           "random_weights": True,
           "n_per_set": args.n, "sets": list(sets), "results": results, "load_average": bu.load_average(),
           "versions": versions()}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return doc


if __name__ == "__main__":
    main()
