"""Tar shards in GPIC's WebDataset layout: ``{key}.json`` + ``{key}.jpg|png`` per sample, GPIC's JSON fields."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CAPTION_TYPES = ("tag", "short", "medium", "long")


@dataclass
class Sample:
    key: str
    data: bytes  # the encoded image, exactly as stored
    ext: str  # "jpg" | "png"
    meta: dict

    def decoded(self) -> Image.Image:
        return Image.open(io.BytesIO(self.data)).convert("RGB")


def encode(img: np.ndarray, ext: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG" if ext == "jpg" else "PNG", **({"quality": 90} if ext == "jpg" else {}))
    return buf.getvalue()


def gpic_sample(i: int, img: np.ndarray | None, ext: str = "png", split: str = "test", salt: str = "") -> Sample:
    """Sample ``i``: key = sha256 hex, caption "a photo number i", GPIC's JSON fields."""
    key = hashlib.sha256(f"{split}-{i}{salt}".encode()).hexdigest()
    h, w = (img.shape[:2] if img is not None else (0, 0))
    meta = {"retrieved_at": "2025-01-01T00:00:00Z", "license": "cc-by-4.0",
            "license_url": "https://creativecommons.org/licenses/by/4.0/", "attribution": f"author {i}",
            "key": key, "img_width": int(w), "img_height": int(h), "split": ["nano", "lite", "full"],
            "caption_type": CAPTION_TYPES[i % 4], "caption": f"a photo number {i} \u00e9t\u00e9 \u2014 \"quoted\""}
    return Sample(key, encode(img, ext) if img is not None else b"", ext, meta)


def write_shard(path: str | Path, samples: list[Sample]) -> Path:
    """Write ``samples`` (json member first, then the image, as GPIC's shards do)."""
    path = Path(path)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for s in samples:
            for name, data in ((f"{s.key}.json", json.dumps(s.meta).encode()), (f"{s.key}.{s.ext}", s.data)):
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime, ti.mode = len(data), 1_700_000_000, 0o644
                tf.addfile(ti, io.BytesIO(data))
    return path


def make_shards(root: str | Path, images: np.ndarray, per_shard: int, split: str = "test",
                start: int = 0) -> tuple[list[Path], list[Sample]]:
    """``gpic_{split}_{NNNNN}.tar`` shards of ``per_shard`` samples (alternating PNG / JPEG) from ``images``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    samples = [gpic_sample(i, im, "png" if i % 2 == 0 else "jpg", split) for i, im in enumerate(images)]
    paths = []
    for s in range(0, len(samples), per_shard):
        paths.append(write_shard(root / f"gpic_{split}_{start + s // per_shard:05d}.tar", samples[s:s + per_shard]))
    return paths, samples
