"""Pillow's resize by Pillow (one image at a time on the host) against fd_eval.extractors.pil_resize (a batch on the
device).

    python benchmarks/bench_resize.py                        # the device present (cuda, else cpu)
    python benchmarks/bench_resize.py --device cpu --n 256 --json out.json

Photo-crop 256x256 uint8 images, bicubic to 224x224 (the DINOv2 protocol). Prints images/s of each path and
checks that every output pixel is equal (the device path must be bit-identical to Pillow).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_utils as bu  # noqa: E402

from fd_eval.extractors.pil_resize import pil_resize_host, pil_resize_tensor  # noqa: E402
from fd_eval.run.pipeline import auto_device  # noqa: E402
from fd_eval.run.provenance import device_name, versions  # noqa: E402
from fd_eval.util.io_utils import atomic_write  # noqa: E402


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--n", type=int, default=256, help="images per timed pass (one batch)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = auto_device(args.device)
    x = torch.from_numpy(bu.images(args.n, args.size, seed=0)).permute(0, 3, 1, 2).contiguous()
    xd = x.to(dev)
    pil = pil_resize_host(x, (224, 224))
    ours = pil_resize_tensor(xd, (224, 224))  # warm-up: coefficients, kernels
    identical = bool(torch.equal(ours.cpu(), pil))
    t_pil = _best(lambda: pil_resize_host(x, (224, 224)), args.repeats)

    def device_pass() -> None:
        pil_resize_tensor(xd, (224, 224))
        bu.sync(dev)

    t_dev = _best(device_pass, args.repeats)
    doc = {"benchmark": "Pillow resize: Pillow on the host vs fd_eval.extractors.pil_resize",
           "device": device_name(dev),
           "images": args.n, "size": args.size, "bit_identical": identical,
           "pillow_images_per_s": args.n / t_pil, "pil_resize_tensor_images_per_s": args.n / t_dev,
           "versions": versions()}
    print(f"device: {doc['device']}; {args.n} {args.size}x{args.size} images -> 224x224 bicubic")
    print(f"  Pillow, one image at a time, 1 thread   {args.n / t_pil:10.1f} img/s ({1e3 * t_pil / args.n:.3f} ms/img)")
    print(f"  fd_eval.extractors.pil_resize on {dev.type:4s}             {args.n / t_dev:10.1f} img/s "
          f"({1e3 * t_dev / args.n:.3f} ms/img)")
    print(f"  bit-identical: {identical}")
    if args.json:
        with atomic_write(args.json, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    if not identical:
        raise SystemExit("fd_eval.extractors.pil_resize differs from Pillow on this device")
    return doc


if __name__ == "__main__":
    main()
