"""Random FID-Inception checkpoints in the official file formats, for tests that cannot download weights.

Key names and shapes come from torchvision's ``Inception3(num_classes=1008, aux_logits=False)``, i.e. from
neither fd_eval nor the reference implementations, which is what pytorch-fid's release file
``pt_inception-2015-12-05-6726825d.pth`` holds (566 tensors, BatchNorm ``num_batches_tracked`` included).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

FORMATS = ("pytorch-fid", "pytorch-fid-module")


@functools.lru_cache(maxsize=1)
def _template() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    from torchvision.models.inception import Inception3

    with torch.device("meta"):
        m = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    return {k: (tuple(v.shape), v.dtype) for k, v in m.state_dict().items()}


def random_inception_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the release file's layout, scaled so activations neither vanish nor explode.

    Convs are He-normal (fan-in), BatchNorm affine/statistics are O(1) and varied, so the eval-mode network
    keeps O(1) activations through all 94 conv layers; pool3 features are O(1) and differ between photos by
    ~10-15% of their norm. Returns fresh tensors (safe to modify); each seed is generated once per process.
    """
    return {k: v.clone() for k, v in _random_state_dict(seed).items()}


@functools.lru_cache(maxsize=4)
def _random_state_dict(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, (shape, dtype) in _template().items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.zeros(shape, dtype=dtype)
        elif k.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            sd[k] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif k.endswith("bn.weight"):
            sd[k] = 0.5 + torch.rand(shape, generator=g)
        elif k.endswith("bn.running_var"):
            sd[k] = 0.5 + torch.rand(shape, generator=g)
        elif k.endswith(("bn.bias", "bn.running_mean")):
            sd[k] = 0.2 * torch.randn(shape, generator=g)
        elif k == "fc.weight":
            sd[k] = torch.randn(shape, generator=g) / shape[1] ** 0.5
        elif k == "fc.bias":
            sd[k] = 0.01 * torch.randn(shape, generator=g)
        else:  # a new torchvision tensor this helper does not know: fail loudly, not silently
            raise KeyError(f"unexpected Inception3 tensor {k}")
    return sd


def to_pytorch_fid_module_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Release-file names -> the names of pytorch-fid's ``InceptionV3([3])`` module state dict (no fc)."""
    blocks = {"Conv2d_1a_3x3": "0.0", "Conv2d_2a_3x3": "0.1", "Conv2d_2b_3x3": "0.2", "Conv2d_3b_1x1": "1.0",
              "Conv2d_4a_3x3": "1.1"}
    blocks |= {f"Mixed_{n}": f"2.{i}" for i, n in enumerate(["5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e"])}
    blocks |= {f"Mixed_{n}": f"3.{i}" for i, n in enumerate(["7a", "7b", "7c"])}
    out = {}
    for k, v in sd.items():
        head, rest = k.split(".", 1)
        if head != "fc":
            out[f"blocks.{blocks[head]}.{rest}"] = v
    return out


def save_inception_checkpoint(path: str | os.PathLike, seed: int = 0, fmt: str = "pytorch-fid") -> Path:
    """Write a random checkpoint; returns ``path``.

    fmt: ``"pytorch-fid"`` (the release file's layout: torchvision names + 1008-class fc; torch-fidelity's
    ``weights-inception-2015-12-05-6726825d.pth`` uses the same names) or ``"pytorch-fid-module"`` (a
    ``pytorch_fid.inception.InceptionV3([3]).state_dict()``: ``blocks.i.j.`` names, no fc).
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}")
    sd = random_inception_state_dict(seed)
    if fmt == "pytorch-fid-module":
        sd = to_pytorch_fid_module_keys(sd)
    path = Path(path)
    torch.save(sd, path)
    return path
