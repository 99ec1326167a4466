"""Photo-like uint8 test images: seeded crops of scikit-image's bundled sample photographs."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    import skimage.data as d

    return tuple(np.ascontiguousarray(f()) for f in (
        d.astronaut, d.coffee, d.chelsea, d.rocket, d.hubble_deep_field, d.immunohistochemistry, d.retina))


def photo_crops(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """(n, height, width, 3) uint8: crops at seeded positions from photos large enough to hold them."""
    rng = np.random.default_rng(seed)
    pool = [p for p in _photos() if p.shape[0] >= height and p.shape[1] >= width]
    if not pool:
        raise ValueError(f"no sample photo is {height}x{width} or larger")
    out = np.empty((n, height, width, 3), dtype=np.uint8)
    for i in range(n):
        p = pool[rng.integers(len(pool))]
        y = rng.integers(p.shape[0] - height + 1)
        x = rng.integers(p.shape[1] - width + 1)
        out[i] = p[y:y + height, x:x + width]
    return out


def save_images(arr: np.ndarray, folder: "str | Path", ext: str = "png", **save_kw) -> Path:
    """Write each (H, W, 3) uint8 image of ``arr`` as ``folder/{i:03d}.{ext}`` (folder created); returns it."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True)
    for i, im in enumerate(arr):
        Image.fromarray(im).save(folder / f"{i:03d}.{ext}", **save_kw)
    return folder
