"""sha256 digests of what the run engine writes, on fixed test fixtures (bit-identity across a refactor).

    python benchmarks/engine_digests.py [--json OUT] [--check EXPECTED.json]

Fixtures (made here, under a temp folder, with fixed modification times so fingerprints are reproducible):
12 photo crops as a PNG folder, as 4 GPIC-style tar shards (PNG/JPEG) and as a uint8 .npz; a copies set (gen =
JPEG re-encodes of training images + novel crops, train, held-out test). Extractors: DINOv2 ViT-S/14 with 2 blocks
and seeded random weights (tests/_checkpoints.py), and the test suite's 16x16 pixel extractor for copies.

Digested (first 16 hex digits of sha256):
  * ``compute_stats`` over folder / tar / npz: mu, sigma (float64 bytes), n, kept features;
  * ``build_stats`` over the tar shards (units of one shard, batch 2) and over the folder: the same, plus each
    unit file's tensors and its JSON header (volatile fields -- seconds, device name -- dropped, the temp root
    replaced by ``<ROOT>``), captured just before the engine removes them;
  * ``find_copies`` (top 3, C_T, AuthPct, units of 7, a checkpoint folder): the results JSON and the checkpoint
    unit files (tensors + normalised headers).
  * the statistics' metadata (normalised the same way), reported separately: provenance may be re-organised.

``--check``: compare with a previous ``--json`` output and exit 1 on any difference (prints each).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

VOLATILE = {"seconds", "images_per_s", "device_name", "timings", "total_s", "extract_s", "created", "date", "time",
            "hostname", "rank"}
MTIME = 1_700_000_000


def _h(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:16]


def _norm(x: Any, root: str) -> Any:
    if isinstance(x, dict):
        return {k: _norm(v, root) for k, v in sorted(x.items()) if k not in VOLATILE}
    if isinstance(x, (list, tuple)):
        return [_norm(v, root) for v in x]
    if isinstance(x, str):
        return x.replace(root, "<ROOT>")
    if isinstance(x, float) and x != x:
        return "nan"
    return x


def _tensor_digest(t: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(t):
        h.update(k.encode())
        h.update(str(t[k].dtype).encode() + str(tuple(t[k].shape)).encode())
        h.update(t[k].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _unit_digest(path: Path, root: str) -> dict[str, str]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    header = {k: _norm(json.loads(v), root) for k, v in meta.items()}
    return {"tensors": _tensor_digest(load_file(str(path))), "header": _h(json.dumps(header, sort_keys=True).encode())}


class _Capture:
    """Digest every checkpoint unit file just before it is removed (whatever module removes it)."""

    def __init__(self, root: str):
        self.root, self.seen, self._orig = root, {}, Path.unlink

    def __enter__(self):
        cap = self

        def unlink(p: Path, *a, **kw):
            if p.suffix == ".safetensors" and not p.name.startswith(".") and p.name != "result.safetensors" \
                    and p.exists():
                cap.seen[f"{p.parent.name}/{p.name}"] = _unit_digest(p, cap.root)
            return cap._orig(p, *a, **kw)

        Path.unlink = unlink  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc):
        Path.unlink = self._orig  # type: ignore[method-assign]


def _stats_digest(stats: dict, root: str, meta: dict[str, str], tag: str) -> dict[str, str]:
    out = {}
    for name, s in sorted(stats.items()):
        parts = [np.asarray(s.mu, dtype=np.float64).tobytes(), np.asarray(s.sigma, dtype=np.float64).tobytes(),
                 str(int(s.n)).encode()]
        feats = getattr(s, "features", None)
        if feats is not None:
            parts.append(np.asarray(feats).tobytes())
        out[f"{tag}/{name}"] = _h(b"|".join(parts))
        meta[f"{tag}/{name}"] = _h(json.dumps(_norm(s.metadata, root), sort_keys=True, default=str).encode())
    return out


def _fix_mtimes(folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        os.utime(p, (MTIME, MTIME))


def digests() -> tuple[dict[str, str], dict[str, str]]:
    import fd_eval
    import fd_eval.extractors.dinov2 as dv
    from _checkpoints import save_dinov2_checkpoint
    from _gpic_shards import make_shards
    from _images import photo_crops, save_images
    from test_copies import PixelExtractor, jpeg75

    out: dict[str, str] = {}
    meta: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp).resolve()
        os.environ["FD_EVAL_CACHE"] = str(root / "cache")
        w, _ = save_dinov2_checkpoint(root / "dinov2_vits14_pretrain.pth", "vits14", "official", seed=3, depth=2)
        ex = dv._build_extractor("vits14", False, weights=w, _depth=2)
        images = photo_crops(12, 64, 64, seed=7)
        folder = save_images(images, root / "folder")
        make_shards(root / "shards", images, 3)
        np.savez(root / "images.npz", images)
        for p in (folder, root / "shards", root / "images.npz"):
            _fix_mtimes(p) if p.is_dir() else os.utime(p, (MTIME, MTIME))
        tar = str(root / "shards" / "gpic_test_{00000..00003}.tar")
        run = dict(batch_size=2, num_workers=0, progress=False)
        for tag, src in (("folder", str(folder)), ("tar", tar), ("npz", str(root / "images.npz"))):
            st = fd_eval.compute_stats(src, extractors=[ex], keep_features=tag == "folder", **run)
            out.update(_stats_digest(st, str(root), meta, f"compute_stats/{tag}"))
        for tag, src, kw in (("tar", tar, {}), ("folder", str(folder), {"checkpoint_every": 5})):
            with _Capture(str(root)) as cap:
                st = fd_eval.build_stats(src, root / f"build-{tag}.safetensors", extractors=[ex],
                                         keep_features=True, **kw, **run)
            out.update(_stats_digest(st, str(root), meta, f"build_stats/{tag}"))
            for k, v in sorted(cap.seen.items()):
                out[f"build_stats/{tag}/unit/{k.split('/')[-1]}/tensors"] = v["tensors"]
                out[f"build_stats/{tag}/unit/{k.split('/')[-1]}/header"] = v["header"]
        train = photo_crops(40, 32, 32, seed=1)
        gen = np.concatenate([np.stack([jpeg75(a) for a in train[:12]]), photo_crops(40, 32, 32, seed=2)])
        sets = {k: save_images(v, root / "copies" / k) for k, v in
                (("gen", gen), ("train", train), ("test", photo_crops(30, 32, 32, seed=3)))}
        _fix_mtimes(root / "copies")
        with _Capture(str(root)) as cap:
            res = fd_eval.find_copies(str(sets["gen"]), str(sets["train"]), extractors=[PixelExtractor()],
                                      test=str(sets["test"]), top_k=3, threshold=0.9, checkpoint_every=7,
                                      checkpoint_dir=root / "copies-ckpt", num_workers=0, batch_size=3,
                                      progress=False)
        d = res.to_dict()
        out["copies/results"] = _h(json.dumps(_norm(d["results"], str(root)), sort_keys=True).encode())
        for k, v in sorted(cap.seen.items()):
            out[f"copies/unit/{k.split('/')[-1]}/tensors"] = v["tensors"]
            out[f"copies/unit/{k.split('/')[-1]}/header"] = v["header"]
        meta["copies/provenance"] = _h(json.dumps(_norm(d["provenance"], str(root)), sort_keys=True,
                                                  default=str).encode())
    return out, meta


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--check", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    res, meta = digests()
    for k, v in res.items():
        print(k, v)
    for k, v in meta.items():
        print("metadata", k, v)
    if a.json:
        Path(a.json).write_text(json.dumps({"data": res, "metadata": meta}, indent=1))
    if a.check:
        want = json.loads(Path(a.check).read_text())
        bad = [k for k in sorted(set(want["data"]) | set(res)) if want["data"].get(k) != res.get(k)]
        mbad = [k for k in sorted(set(want["metadata"]) | set(meta)) if want["metadata"].get(k) != meta.get(k)]
        for k in bad:
            print(f"DIFFERS: {k}: then {want['data'].get(k)}, now {res.get(k)}")
        for k in mbad:
            print(f"metadata differs: {k}: then {want['metadata'].get(k)}, now {meta.get(k)}")
        print(f"{len(res) - len(bad)} of {len(set(want['data']) | set(res))} data digests equal; "
              f"{len(mbad)} metadata digest(s) differ")
        sys.exit(1 if bad else 0)
