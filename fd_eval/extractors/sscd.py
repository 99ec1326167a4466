"""SSCD copy-detection descriptor (Pizzi et al., CVPR 2022): ``sscd-disc-mixup``, the model GPIC deduplicated with.

Network (facebookresearch/sscd-copy-detection ``sscd/models/model.py``, backbone ``TV_RESNET50``, dims 512,
pool_param 3): torchvision ResNet-50 whose ``avgpool`` is generalised-mean pooling with p = 3
(``x.clamp(min=1e-6).pow(3).mean over H*W, then .pow(1/3)``), whose ``fc`` projects 2048 -> 512, followed by L2
normalisation. Weights: the release's ``sscd_disc_mixup.torchvision.pt`` state dict (``backbone.*`` names, read
with ``torch.load(weights_only=True)``); the TorchScript archive of the same release is never loaded (loading it
executes code).

Preprocessing: the SSCD README ("Preprocessing") recommends ``transforms.Resize(288)`` (short edge to 288, the
DISC/Copydays evaluation default) or ``Resize([320, 320])``, then ``ToTensor`` and ImageNet ``Normalize``. A
batched pass needs one input size, so fd-eval resizes to exactly ``size x size`` (default 288) with Pillow's
bilinear filter (torchvision's ``Resize`` on a PIL image): for square images (GPIC's 256x256 images, generated
images) this is exactly ``Resize(288)``; other aspect ratios are squashed, as the README's square variant does.
``sscd-disc-mixup-short288`` is the README's ``Resize(288)`` for every image (short edge to 288, aspect ratio
kept; the pipeline runs each input size through the network separately).

Copy threshold: "For the ``sscd_disc_mixup`` model, DISC image pairs with embedding cosine similarity greater than
``0.75`` are copies with 90% precision" (SSCD README, "Using SSCD descriptors"): :data:`SSCD_COPY_THRESHOLD`.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet50

from ..errors import FDEvalError
from ..util.io_utils import sha256_file_cached
from .base import Extractor, register_extractor
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec
from .weights import WeightsSource, check_keys, load_state_dict, resolve_weights

FEATURE_DIM = 512
GEM_P = 3.0
DEFAULT_SIZE = 288
SSCD_COPY_THRESHOLD = 0.75  # cosine similarity; SSCD README: 90% precision on DISC2021 for sscd_disc_mixup

SSCD_WEIGHTS = WeightsSource(
    url="https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_mixup.torchvision.pt",
    filename="sscd_disc_mixup.torchvision.pt",
    sha256=None,  # not published by the authors; the file's digest is recorded in every result's provenance
    approx_mib=94,  # ResNet-50 trunk + 2048x512 projection: 24.6M float32 parameters
)


def preprocess_spec(size: int = DEFAULT_SIZE, short_edge: bool = False) -> PreprocessSpec:
    """The SSCD input: Pillow bilinear to (size, size) (``short_edge``: the short edge to ``size``, the aspect
    ratio kept: the README's ``Resize(size)`` exactly, for any image), ToTensor, ImageNet Normalize."""
    if short_edge:
        ref = (f"SSCD README 'Preprocessing': torchvision Resize({size}) on PIL (short edge to {size}, aspect ratio "
               "kept, no crop), ToTensor, Normalize(ImageNet)")
    else:
        ref = (f"SSCD README 'Preprocessing': torchvision Resize({size}) on PIL (= Resize(({size}, {size})) for "
               f"square images; non-square images are resized to {size}x{size}), ToTensor, Normalize(ImageNet)")
    return PreprocessSpec(
        resize_library="pil", resize_filter="bilinear", antialias=True, size=(size, size), scale=255.0,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, reference=ref,
        resize_mode="short-edge" if short_edge else "exact",
    )


class GeM(nn.Module):
    """Global generalised-mean pooling: float (N, C, H, W), non-negative -> (N, C), ``mean(x^p)^(1/p)``."""

    def __init__(self, p: float = GEM_P):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().flatten(2)  # pooled in float32 even under autocast: x^3 of bf16 activations loses digits
        return x.clamp(min=1e-6).pow(self.p).mean(dim=2).pow(1.0 / self.p)


class SSCDNet(nn.Module):
    """ResNet-50 trunk + GeM + Linear(2048, 512) + L2 norm: float32 (N, 3, H, W) -> float32 (N, 512), unit norm.

    ``backbone`` is a torchvision ResNet-50 (``fc`` = the 512-d projection), so the release's
    ``backbone.*`` keys load unchanged.
    """

    def __init__(self, dims: int = FEATURE_DIM) -> None:
        super().__init__()
        self.backbone = resnet50(num_classes=dims)
        self.backbone.avgpool = GeM(GEM_P)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.backbone(x).float())


def load_sscd(path: str | os.PathLike) -> SSCDNet:
    """Build :class:`SSCDNet` from a torchvision-format SSCD state dict (``backbone.*`` keys; bare ResNet keys are
    accepted too), refusing missing, unexpected or misshapen tensors. ``num_batches_tracked`` may be absent."""
    sd = load_state_dict(path)
    if not any(k.startswith("backbone.") for k in sd):
        sd = {f"backbone.{k}": v for k, v in sd.items()}
    with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
        model = SSCDNet()
    expected = model.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    check_keys(path, set(expected) - optional, set(sd) - optional)
    state = {}
    for k, ref in expected.items():
        v = sd.get(k)
        if v is None:
            v = torch.zeros((), dtype=torch.long)
        elif v.shape != ref.shape:
            raise FDEvalError(f"{path}: {k} has shape {tuple(v.shape)}, expected {tuple(ref.shape)}; is it "
                              "sscd_disc_mixup.torchvision.pt (ResNet-50, 512-d)?")
        state[k] = v.to(torch.float32) if v.is_floating_point() else v.to(ref.dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


class SSCDExtractor(Extractor):
    """uint8 RGB (N, 3, H, W) -> float32 (N, 512) L2-normalised SSCD descriptors.

    Precision: ``exact`` float32 with TF32 off; ``fast`` TF32 convolutions in channels_last (GeM and the
    normalisation stay float32).
    """

    fast_compute = "tf32"

    def __init__(self, model: SSCDNet, size: int, weights_sha256: str | None,
                 device: str | torch.device | None = None, *, short_edge: bool = False,
                 name: str = "sscd-disc-mixup"):
        super().__init__(name, FEATURE_DIM, preprocess_spec(size, short_edge), model, weights_sha256, device)

    def _apply_precision(self) -> None:
        self.channels_last = self.precision.fast
        self.model.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    # model_input: the base interpreter of the spec (ToTensor + Normalize op for op; Pillow's resize on the device
    # first when the host did not resize). GeM pools any spatial size, so short-edge inputs of any aspect run.


@register_extractor("sscd-disc-mixup", FEATURE_DIM,
                    "SSCD copy detector sscd_disc_mixup (ResNet-50, GeM p=3, 512-d, L2-normalised), 288x288",
                    weights=SSCD_WEIGHTS)
def sscd_disc_mixup(weights: str | os.PathLike | None = None, device: str | torch.device | None = None,
                    size: int = DEFAULT_SIZE, **options: Any) -> SSCDExtractor:
    """SSCD ``sscd_disc_mixup``; ``weights``: a local ``.torchvision.pt``/safetensors file, else the official
    download. ``size``: the square input side (288: the README's small-edge size; 320: its square variant)."""
    if options:
        raise FDEvalError(f"sscd-disc-mixup takes only the option 'size', got {', '.join(sorted(options))}")
    path = resolve_weights(weights, SSCD_WEIGHTS, "sscd-disc-mixup")
    return SSCDExtractor(load_sscd(path), int(size), sha256_file_cached(path), device)


@register_extractor("sscd-disc-mixup-short288", FEATURE_DIM,
                    "SSCD sscd_disc_mixup with the README's Resize(288): short edge to 288, aspect ratio kept",
                    weights=SSCD_WEIGHTS)
def sscd_disc_mixup_short288(weights: str | os.PathLike | None = None, device: str | torch.device | None = None,
                             **options: Any) -> SSCDExtractor:
    """SSCD ``sscd_disc_mixup`` on inputs resized as the README's ``Resize(288)`` (no squash of non-square
    images: each image keeps its aspect ratio, so a batch runs one network pass per input size). Same weights
    and copy threshold as ``sscd-disc-mixup``; its features differ for non-square images, so an index or
    statistics made with one are refused for the other."""
    if options:
        raise FDEvalError(f"sscd-disc-mixup-short288 takes no options, got {', '.join(sorted(options))}")
    path = resolve_weights(weights, SSCD_WEIGHTS, "sscd-disc-mixup")
    return SSCDExtractor(load_sscd(path), DEFAULT_SIZE, sha256_file_cached(path), device, short_edge=True,
                         name="sscd-disc-mixup-short288")
