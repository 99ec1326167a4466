"""CLIP ViT-L/14@336 (CMMD's extractor) against DINOv2 ViT-L/14 at 224 on this machine, and CMMD's kernel sums.

    python benchmarks/bench_clip.py [--images 8] [--cmmd-n 8192] [--out benchmarks/results/clip_cpu.json]

Part 1: images per second of the network on prepared inputs (``forward_prepared``: normalisation + network,
the host's Pillow resize excluded), exact mode, random weights in the real architectures, batches of 4 after one
warm-up batch, the two models alternating batch by batch; reported with the ratio CLIP-L/336 : DINOv2-L/224
(cost per image).
Part 2: CMMD between two n x 768 sets of unit rows in float64 (:func:`fd_eval.metrics.cmmd.cmmd`): the generated
self-term, the cross term and (for a new reference) the reference self-term, timed at ``--cmmd-n`` and extrapolated to
50K x 50K by the n^2 scaling of every term (each term is ~n^2 * 768 multiply-adds plus n^2 exponentials).
Timings are wall clock on a possibly shared machine; a benchmark, never a test.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in list(model.named_parameters()) + list(model.named_buffers()):
            noise = torch.randn(p.shape, generator=g)
            if "norm" in k and k.endswith("weight") or k.endswith("gamma"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.02 * noise)
    return model


def extractors() -> dict:
    from fd_eval.extractors import clip, dinov2

    arch = clip.ARCHS["clip-vitl14-336"]
    ex_clip = clip.CLIPExtractor(arch, _randomize(clip.build_model(arch, device="cpu")).eval(), None)
    darch = dinov2.ARCHS["vitl14"]
    ex_dino = dinov2.DINOv2Extractor("dinov2-vitl14", darch, _randomize(dinov2.build_model(darch, False,
                                                                                           device="cpu")).eval(),
                                     "pil", None)
    return {"clip-vitl14-336": ex_clip, "dinov2-vitl14": ex_dino}


def paired_images_per_s(exs: dict, rounds: int, batch: int = 4) -> dict:
    """Each round times one batch of every extractor back to back (the machine may be shared: pairing keeps a
    load change from landing on one model only); images/s from the median batch time."""
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(batch)]
    prepared = {name: torch.stack([ex.prepare(im) for im in imgs]) for name, ex in exs.items()}
    times: dict = {name: [] for name in exs}
    for r in range(rounds + 1):
        for name, ex in exs.items():
            t = time.perf_counter()
            ex.forward_prepared(prepared[name])
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - t)
    return {name: batch / float(np.median(ts)) for name, ts in times.items()}


def cmmd_times(n: int) -> dict:
    from fd_eval.metrics.cmmd import kernel_sum

    rng = np.random.default_rng(1)
    a, b = (rng.standard_normal((n, 768)) for _ in range(2))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    out = {}
    for name, args in (("self_term_s", (a,)), ("cross_term_s", (a, b))):
        t = time.perf_counter()
        kernel_sum(*args)
        out[name] = time.perf_counter() - t
    scale = (50_000 / n) ** 2
    out["n"] = n
    out["extrapolated_50k_compute_s"] = scale * (out["self_term_s"] + out["cross_term_s"])  # stored ref self-term
    out["extrapolated_50k_new_reference_s"] = scale * (2 * out["self_term_s"] + out["cross_term_s"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--cmmd-n", type=int, default=8192)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    exs = extractors()
    ips = paired_images_per_s(exs, max(1, a.images // 4))
    del exs
    res = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
           "torch": torch.__version__, "images_per_s": ips,
           "cost_ratio_clip336_to_dinov2l224": ips["dinov2-vitl14"] / ips["clip-vitl14-336"],
           "cmmd": cmmd_times(a.cmmd_n), "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
