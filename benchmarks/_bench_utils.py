"""Shared pieces of the benchmarks: random weights in the official checkpoint formats, the hub-style reference
model that reads them, and image sets. Nothing here is timed.

Random weights, never downloaded ones: the architectures are the real ones, so speed is representative;
feature values are not (the precision measurements say so wherever they are reported).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
HUB_CTORS = {"vits14": "vit_small", "vitb14": "vit_base", "vitl14": "vit_large", "vitg14": "vit_giant2"}


def arch_of(name: str) -> str:
    """``dinov2-vitl14`` -> ``vitl14`` (registers are not used by the benchmarks)."""
    return name.removeprefix("dinov2-").removesuffix("-reg")


def random_dinov2_official(name: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """A random ``dinov2_vit*14_pretrain.pth`` in the official (hub) key layout: timm's keys at 224 px plus
    ``mask_token`` and the 37x37 (518 px) position grid, as ``torch.hub``'s file holds them.

    Scales follow the tests' recipe (linear weights 0.02 N(0, 1), layer scales and norm weights 1 + 0.1 N(0, 1))
    so activations stay O(1) through every block.
    """
    from fd_eval.extractors.dinov2 import ARCHS, build_model

    arch = ARCHS[arch_of(name)]
    model = build_model(arch, reg=False, device="cpu")
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in sorted(model.state_dict().items()):
        noise = torch.randn(v.shape, generator=g)
        if k.endswith("gamma") or ("norm" in k and k.endswith("weight")):
            sd[k] = 1.0 + 0.1 * noise
        elif "norm" in k and k.endswith("bias"):
            sd[k] = 0.05 * noise
        else:
            sd[k] = 0.02 * noise
    sd["pos_embed"] = 0.02 * torch.randn(1, 1 + 37 * 37, arch.embed_dim, generator=g)
    sd["mask_token"] = torch.zeros(1, arch.embed_dim)
    path = Path(path)
    torch.save(sd, path)
    return path


def hub_dinov2(name: str, path: str | os.PathLike) -> torch.nn.Module | None:
    """The torch.hub DINOv2 backbone (``dinov2`` pip package: the hub code) with the checkpoint loaded strictly,
    as gpic-eval / dgm-eval build it (img_size=518, patch 14, init_values=1.0, block_chunks=0); None when the
    package is not installed."""
    try:
        import logging

        logging.getLogger("dinov2").setLevel(logging.ERROR)  # "xFormers not available"
        from dinov2.models import vision_transformer as vits
    except ImportError:
        return None
    model = vits.__dict__[HUB_CTORS[arch_of(name)]](img_size=518, patch_size=14, init_values=1.0,
                                                    ffn_layer="mlp", block_chunks=0)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval().requires_grad_(False)


def random_inception(path: str | os.PathLike, seed: int = 0) -> Path:
    """A random ``pt_inception-2015-12-05`` file (torchvision Inception3 names + 1008-class fc): He-normal convs,
    varied O(1) BatchNorm statistics, so eval-mode activations stay O(1) through the 94 convolutions."""
    from torchvision.models.inception import Inception3

    with torch.device("meta"):
        template = Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in template.items():
        shape = tuple(v.shape)
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.zeros(shape, dtype=v.dtype)
        elif k.endswith("conv.weight"):
            sd[k] = torch.randn(shape, generator=g) * (2.0 / (shape[1] * shape[2] * shape[3])) ** 0.5
        elif k.endswith(("bn.weight", "bn.running_var")):
            sd[k] = 0.5 + torch.rand(shape, generator=g)
        elif k.endswith(("bn.bias", "bn.running_mean")):
            sd[k] = 0.2 * torch.randn(shape, generator=g)
        else:  # fc
            sd[k] = torch.randn(shape, generator=g) / shape[-1] ** 0.5
    path = Path(path)
    torch.save(sd, path)
    return path


def images(n: int, size: int = 256, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8 photo-like images: crops of scikit-image's sample photos when it is installed
    (a test dependency), else smooth random fields (low-frequency noise, upsampled), which PNG compresses
    about as well as photos."""
    try:
        sys.path.insert(0, str(ROOT / "tests"))
        from _images import photo_crops  # type: ignore

        return photo_crops(n, size, size, seed=seed)
    except Exception:  # noqa: BLE001 - no skimage: synthetic content
        rng = np.random.default_rng(seed)
        small = rng.uniform(0, 255, (n, 3, size // 16, size // 16)).astype(np.float32)
        x = torch.nn.functional.interpolate(torch.from_numpy(small), size=(size, size), mode="bicubic")
        x = x + torch.from_numpy(rng.normal(0, 6, x.shape).astype(np.float32))
        return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    finally:
        if sys.path and sys.path[0] == str(ROOT / "tests"):
            sys.path.pop(0)


def write_pngs(arr: np.ndarray, folder: str | os.PathLike, fmt: str = "png") -> Path:
    """Save each (H, W, 3) uint8 image as ``{i:06d}.png`` (or .jpg, quality 90) in ``folder``, on all cores
    (Pillow's encoders release the GIL; a 256x256 PNG takes ~17 ms on one core, so 10K would take minutes)."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def save(i: int) -> None:
        if fmt == "png":
            Image.fromarray(arr[i]).save(folder / f"{i:06d}.png")
        else:
            Image.fromarray(arr[i]).save(folder / f"{i:06d}.jpg", quality=90)

    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        list(pool.map(save, range(len(arr))))
    return folder


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
