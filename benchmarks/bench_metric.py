"""FDMetric.update throughput (images/s) on whatever device is present, per resize path and input dtype.

    python benchmarks/bench_metric.py                      # ViT-L/14 on a GPU, ViT-S/14 on a CPU
    python benchmarks/bench_metric.py --model dinov2-vitl14 --batch-size 256 --batches 20 --json out.json

Random weights in the real architecture (built here, saved in timm's key format, loaded through the normal
weights path), random 256x256 images made on the device (GPIC's generated size), a dummy reference. Measures, per
configuration, the wall time of ``--batches`` update() calls after one warm-up call, with a device synchronise
before the clock stops (update itself never waits for the GPU on the torch path), and the model alone
(``forward_prepared`` on 224x224 uint8) as the ceiling. ``pil-host`` is the reference protocol done by Pillow
(copy to the host, Pillow resize in a thread pool); ``pil-device`` the same pixels computed on the device
(:mod:`fd_eval.extractors.pil_resize`; fast mode's default on a GPU); ``torch`` is EDM2's device resize (another
protocol).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fd_eval import Stats
from fd_eval.extractors import load_extractor
from fd_eval.extractors.dinov2 import ARCHS, build_model
from fd_eval.metrics.metric import FDMetric
from fd_eval.run.pipeline import auto_device
from fd_eval.run.provenance import device_name, versions
from fd_eval.util.io_utils import atomic_write


def random_weights(name: str, path: Path, seed: int = 0) -> Path:
    """A random checkpoint of ``dinov2-vit?14`` in timm's key format (pos_embed already on the 16x16 grid)."""
    from safetensors.torch import save_file

    arch = ARCHS[name.removeprefix("dinov2-").removesuffix("-reg")]
    model = build_model(arch, reg=name.endswith("-reg"), device="cpu")
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in model.state_dict().items():
        noise = torch.randn(v.shape, generator=g)
        sd[k] = (1.0 + 0.1 * noise) if (k.endswith("gamma") or ("norm" in k and k.endswith("weight"))) else 0.02 * noise
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench(metric: FDMetric, batches: list[torch.Tensor]) -> float:
    """Images per second of update() over ``batches`` (after one warm-up call)."""
    metric.reset()
    metric.update(batches[0])
    _sync(metric.device)
    t0 = time.perf_counter()
    for x in batches[1:]:
        metric.update(x)
    _sync(metric.device)
    return sum(len(x) for x in batches[1:]) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: dinov2-vitl14 on a GPU, dinov2-vits14 on a CPU")
    ap.add_argument("--weights", default=None, help="a checkpoint (default: random weights made here)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=None, help="default 256 on a GPU, 16 on a CPU")
    ap.add_argument("--batches", type=int, default=None, help="timed update() calls (default 20 GPU / 3 CPU)")
    ap.add_argument("--size", type=int, default=256, help="input image side (GPIC generates 256x256)")
    ap.add_argument("--resize", nargs="+", default=["torch", "pil-host", "pil-device"],
                    choices=["torch", "pil-host", "pil-device"])
    ap.add_argument("--precision", nargs="+", default=["exact", "fast"], choices=["exact", "fast"])
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    dev = auto_device(args.device)
    gpu = dev.type == "cuda"
    name = args.model or ("dinov2-vitl14" if gpu else "dinov2-vits14")
    bs = args.batch_size or (256 if gpu else 16)
    nb = args.batches or (20 if gpu else 3)
    torch.backends.cuda.matmul.allow_tf32 = False  # fd-eval's float32 default; TF32 convs are PyTorch's default
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights or random_weights(name, Path(tmp) / "w.safetensors")
        g = torch.Generator(device=dev).manual_seed(0)
        u8 = [torch.randint(0, 256, (bs, 3, args.size, args.size), dtype=torch.uint8, device=dev, generator=g)
              for _ in range(nb + 1)]
        f32 = [x.float() / 127.5 - 1 for x in u8]
        rows = []
        for precision in args.precision:
            for resize in args.resize:
                ex = load_extractor(name, weights=weights, device=dev, resize=resize.split("-")[0],
                                    precision=precision).set_pil_resize_on(resize.split("-")[-1]
                                                                           if "-" in resize else "auto")
                ref = Stats(np.zeros(ex.feature_dim), np.eye(ex.feature_dim), 2, ex.metadata(), origin="dummy")
                m = FDMetric(extractors=[ex], ref=ref, value_range=(-1, 1), distributed=False)
                for kind, batches in (("uint8", u8), ("float [-1,1]", f32)):
                    ips = bench(m, batches)
                    rows.append({"precision": precision, "resize": resize, "input": kind,
                                 "validate": "eager" if m._eager(False) else "deferred", "images_per_s": ips})
                    print(f"{name} {precision:5s} resize={resize:10s} input={kind:12s} {ips:9.1f} img/s", flush=True)
                t0 = time.perf_counter()
                m.compute()
                rows[-1]["compute_s"] = time.perf_counter() - t0
        ex = load_extractor(name, weights=weights, device=dev)
        # the model alone on 224x224 uint8 (no resize, no conversion): the ceiling for update()
        x224 = torch.randint(0, 256, (bs, 3, 224, 224), dtype=torch.uint8, device=dev, generator=g)
        ex.forward_prepared(x224)
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(nb):
            ex.forward_prepared(x224)
        _sync(dev)
        model_ips = nb * bs / (time.perf_counter() - t0)
        print(f"{name} exact model alone (224x224 uint8) {model_ips:9.1f} img/s")
    doc = {"benchmark": "FDMetric.update throughput", "model": name, "device": device_name(dev), "batch_size": bs,
           "batches": nb, "image_size": args.size, "random_weights": args.weights is None, "results": rows,
           "model_only_images_per_s": model_ips, "versions": versions()}
    if args.json:
        with atomic_write(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
