"""sha256 digests of extractor features on fixed random inputs and random weights (bit-identity checks).

    python benchmarks/feature_digests.py [--json OUT]

Prints one line per configuration (DINOv2 ViT-S/14 depth 2 in both resize modes, Inception-v3 tf/pt, exact,
on the CPU): the digest of the float32 feature bytes. Used to show that a refactor leaves statistics bit-identical.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def digests() -> dict[str, str]:
    import fd_eval.extractors.dinov2 as d
    from _checkpoints import save_dinov2_checkpoint  # tests/ helpers: the reference-format random checkpoints
    from _inception_utils import save_inception_checkpoint
    from fd_eval.extractors import load_extractor

    rng = np.random.default_rng(0)
    imgs = [torch.from_numpy(rng.integers(0, 256, (4, 3, h, w), dtype=np.uint8)) for h, w in ((224, 224), (300, 257))]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FD_EVAL_CACHE"] = tmp
        path, _ = save_dinov2_checkpoint(Path(tmp) / "w.pth", "vits14", "official", seed=0, depth=2)
        for resize in ("pil", "torch"):
            ex = d._build_extractor("vits14", False, weights=path, resize=resize, _depth=2)
            for i, x in enumerate(imgs):
                out[f"dinov2-vits14-d2-{resize}-{i}"] = hashlib.sha256(ex(x).numpy().tobytes()).hexdigest()[:16]
        ipath = save_inception_checkpoint(Path(tmp) / "pt_inception.pth", seed=0)
        for name in ("inception-v3-tf", "inception-v3-pt"):
            ex = load_extractor(name, weights=str(ipath))
            for i, x in enumerate(imgs):
                out[f"{name}-{i}"] = hashlib.sha256(ex(x).numpy().tobytes()).hexdigest()[:16]
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    res = digests()
    for k, v in res.items():
        print(k, v)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
