"""OpenAI CLIP ViT-L/14 image embeddings: ``clip-vitl14-336`` (CMMD's model) and ``clip-vitl14`` (CLIPScore's).

Reference network: OpenAI CLIP ``ViT-L/14@336px`` / ``ViT-L/14`` (``clip.model.VisionTransformer``; the same
computation as open_clip ``ViT-L-14-336`` / ``ViT-L-14`` with ``quick_gelu`` and transformers'
``CLIPVisionModelWithProjection``): patch embedding without bias, class token, position embedding, ``ln_pre``, 24
pre-norm blocks (width 1024, 16 heads, QuickGELU MLP of width 4096), ``ln_post`` of the class token, then the
projection to 768 (no bias). fd-eval's features are that projection, L2-normalised (float32 (N, 768), unit norm):
what CMMD's reference (google-research ``cmmd/embedding.py``, scenic CLIP ``vit_l14_336px``) and CLIPScore
(torchmetrics: ``get_image_features``, then ``/ norm``) use.

The network is timm's ``VisionTransformer`` (the ``vit_large_patch14_clip_quickgelu_336`` configuration,
``pretrained=False``) run by :class:`fd_eval.extractors.vit_runner.ViTRunner`, whose rows do not depend on the
batch they come in.

Preprocessing (:func:`preprocess_spec`): CMMD's ``io_util._center_crop_and_resize``: Pillow crop of the central
square of the short side (floor division), Pillow bicubic resize to 336x336, ``/ 255``, CLIP mean/std
(scenic ``normalize_image``). The reference then calls ``jax.image.resize`` to the same 336x336, an identity.

Weights (``weights=PATH``, format detected by its keys; never TorchScript: OpenAI's ``ViT-L-14-336px.pt`` is a
TorchScript archive and is refused like every one): open_clip's ``open_clip_pytorch_model.safetensors``
(``visual.*``; the text tower's keys are ignored here), Hugging Face ``openai/clip-vit-large-patch14-336``
``model.safetensors`` (``vision_model.*`` + ``visual_projection.weight``), or timm's format (its own module names,
``head`` = the projection).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FDEvalError, WeightsError
from ..util.io_utils import sha256_file_cached
from .base import Extractor, register_extractor
from .preprocess import CLIP_MEAN, CLIP_STD, PreprocessSpec
from .vit_runner import ROW_PAD, ViTRunner
from .weights import WeightsSource, check_keys, load_state_dict, resolve_weights

PATCH_SIZE = 14
WIDTH, DEPTH, HEADS, EMBED_DIM = 1024, 24, 16, 768


@dataclass(frozen=True)
class CLIPArch:
    """One OpenAI CLIP ViT-L/14 image tower."""

    name: str  # registry name
    image_size: int
    weights: WeightsSource
    hf_repo: str
    reference: str

    @property
    def grid(self) -> int:
        return self.image_size // PATCH_SIZE


# timm's Hub copies of the OpenAI weights (timm format, safetensors); their sha256 is not recorded here (the
# file's digest goes into every result's provenance).
ARCHS: dict[str, CLIPArch] = {
    "clip-vitl14-336": CLIPArch(
        "clip-vitl14-336", 336,
        WeightsSource(url="https://huggingface.co/timm/vit_large_patch14_clip_336.openai/resolve/main/"
                          "model.safetensors",
                      filename="clip_vit_large_patch14_336_openai.safetensors", approx_mib=1631),
        "openai/clip-vit-large-patch14-336",
        "google-research cmmd io_util._center_crop_and_resize (PIL crop of the central square, floor division; PIL "
        "bicubic to 336x336), /255, CLIP normalize (scenic normalize_image); OpenAI CLIP ViT-L/14@336px"),
    "clip-vitl14": CLIPArch(
        "clip-vitl14", 224,
        WeightsSource(url="https://huggingface.co/timm/vit_large_patch14_clip_224.openai/resolve/main/"
                          "model.safetensors",
                      filename="clip_vit_large_patch14_224_openai.safetensors", approx_mib=1631),
        "openai/clip-vit-large-patch14",
        "torchmetrics CLIPScore (transformers CLIPImageProcessor: bicubic, 224 centre crop, /255, CLIP normalize; "
        "here the central square is cropped before the resize: the same pixels for square images); OpenAI CLIP "
        "ViT-L/14"),
}


def preprocess_spec(arch: CLIPArch) -> PreprocessSpec:
    """Centre square (floor rule), Pillow bicubic to the model size, /255, CLIP mean/std."""
    s = arch.image_size
    return PreprocessSpec(resize_library="pil", resize_filter="bicubic", antialias=True, size=(s, s), scale=255.0,
                          mean=CLIP_MEAN, std=CLIP_STD, crop="center-square-floor", reference=arch.reference)


def build_model(arch: CLIPArch, depth: int | None = None, device: str | torch.device = "meta") -> nn.Module:
    """timm ``VisionTransformer`` with OpenAI CLIP ViT-L/14's image tower; ``head`` = the 768-d projection (its
    bias is zero in every OpenAI checkpoint). ``depth`` overrides the number of blocks (tests)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=arch.image_size, patch_size=PATCH_SIZE, embed_dim=WIDTH, depth=DEPTH if depth is None else depth,
        num_heads=HEADS, mlp_ratio=4.0, qkv_bias=True, pre_norm=True, norm_layer=partial(nn.LayerNorm, eps=1e-5),
        act_layer="quick_gelu", class_token=True, global_pool="token", num_classes=EMBED_DIM,
        dynamic_img_size=False, weight_init="skip", device=device,
    )


# --- checkpoint formats -----------------------------------------------------------------------------------
def detect_format(sd: dict[str, torch.Tensor]) -> str:
    """``"open_clip"`` (``visual.*``, OpenAI's names), ``"hf"`` (``vision_model.*``) or ``"timm"``."""
    if any(k.startswith("visual.") for k in sd):
        return "open_clip"
    if any(k.startswith("vision_model.") for k in sd):
        return "hf"
    return "timm"


def _open_clip_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    simple = {"conv1.weight": "patch_embed.proj.weight", "ln_pre.weight": "norm_pre.weight",
              "ln_pre.bias": "norm_pre.bias", "ln_post.weight": "norm.weight", "ln_post.bias": "norm.bias"}
    block = [(r"ln_1\.", "norm1."), (r"ln_2\.", "norm2."), (r"attn\.in_proj_weight", "attn.qkv.weight"),
             (r"attn\.in_proj_bias", "attn.qkv.bias"), (r"attn\.out_proj\.", "attn.proj."),
             (r"mlp\.c_fc\.", "mlp.fc1."), (r"mlp\.c_proj\.", "mlp.fc2.")]
    for k, v in sd.items():
        if not k.startswith("visual."):
            continue  # the text tower and logit_scale of a full CLIP checkpoint
        k = k[len("visual."):]
        if k in simple:
            out[simple[k]] = v
        elif k == "class_embedding":
            out["cls_token"] = v.reshape(1, 1, -1)
        elif k == "positional_embedding":
            out["pos_embed"] = v.unsqueeze(0)
        elif k == "proj":
            out["head.weight"] = v.t()
        else:
            m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)$", k)
            if m:
                rest = m.group(2)
                for pat, repl in block:
                    rest = re.sub("^" + pat, repl, rest)
                out[f"blocks.{m.group(1)}.{rest}"] = v
            else:
                out[k] = v  # reported as unexpected
    return out


def _hf_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    simple = {"embeddings.patch_embedding.weight": "patch_embed.proj.weight",
              "pre_layrnorm.weight": "norm_pre.weight", "pre_layrnorm.bias": "norm_pre.bias",
              "post_layernorm.weight": "norm.weight", "post_layernorm.bias": "norm.bias"}
    block = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj",
             "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k == "visual_projection.weight":
            out["head.weight"] = v
            continue
        if not k.startswith("vision_model."):
            continue  # the text tower of a full CLIPModel checkpoint
        k = k[len("vision_model."):]
        if k in simple:
            out[simple[k]] = v
        elif k == "embeddings.class_embedding":
            out["cls_token"] = v.reshape(1, 1, -1)
        elif k == "embeddings.position_embedding.weight":
            out["pos_embed"] = v.unsqueeze(0)
        elif k == "embeddings.position_ids":
            continue  # a buffer of older transformers versions: arange(num_positions)
        else:
            m = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", k)
            if m and m.group(2) in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)[10]] = v
            elif m and m.group(2) in block:
                out[f"blocks.{m.group(1)}.{block[m.group(2)]}.{m.group(3)}"] = v
            else:
                out[k] = v
    for (i, kind), parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        else:
            out.update({f"encoder.layers.{i}.self_attn.{p}_proj.{kind}": t for p, t in parts.items()})
    return out


def to_model_state_dict(sd: dict[str, torch.Tensor], model: nn.Module, arch: CLIPArch,
                        path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Any supported checkpoint -> float32 state dict of :func:`build_model`'s model; and the detected format."""
    fmt = detect_format(sd)
    sd = {"open_clip": _open_clip_to_timm, "hf": _hf_to_timm}.get(fmt, dict)(sd)
    expected = model.state_dict()
    if "head.bias" in expected and "head.bias" not in sd and "head.weight" in sd:
        sd["head.bias"] = torch.zeros(sd["head.weight"].shape[0])  # OpenAI's projection has no bias
    check_keys(path, expected, sd)
    sd = {k: v.float().contiguous() for k, v in sd.items()}
    for k, t in expected.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            hint = ""
            if k == "pos_embed":
                n = sd[k].shape[1] - 1
                side = int(round(n ** 0.5)) * PATCH_SIZE
                hint = f" (a {side}x{side} model: use {'clip-vitl14' if side == 224 else 'clip-vitl14-336'})"
            raise WeightsError(f"{path}: {k} has shape {tuple(sd[k].shape)} but {arch.name} needs "
                               f"{tuple(t.shape)}{hint}; is it OpenAI CLIP ViT-L/14?")
    return sd, fmt


def load_model(arch: CLIPArch, path: str | os.PathLike, depth: int | None = None) -> tuple[nn.Module, str]:
    """Build the network and load ``path`` into it (CPU, float32, eval); returns (model, detected format)."""
    model = build_model(arch, depth=depth)
    sd, fmt = to_model_state_dict(load_state_dict(path), model, arch, path)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False), fmt


class CLIPImageTower(nn.Module):
    """float32 (N, 3, S, S) normalised images -> float32 (N, 768) unit-norm CLIP image embeddings.

    ``vit`` holds the parameters (timm module names); ``runner`` computes with them (no copies)."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.runner = ViTRunner(vit, "ieee")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = self.runner(x)  # (B, 1024), final-norm class token
        # the projection's B rows padded to a multiple of ROW_PAD, as the runner's last block does: small row
        # counts take other GEMM kernels (other roundings), and a row must not depend on its batch
        b = cls.shape[0]
        cls = torch.cat([cls, cls.new_zeros(-b % ROW_PAD, cls.shape[1])])
        return F.normalize(self.vit.head(cls)[:b].float(), dim=-1)


class CLIPExtractor(Extractor):
    """uint8 RGB (N, 3, H, W) -> float32 (N, 768) L2-normalised CLIP image embeddings.

    The model input is :func:`fd_eval.extractors.base.apply_spec` of :func:`preprocess_spec` (crop and Pillow
    resize on the host, or the resize on the device with Pillow's integers). Precision: ``exact`` float32 (TF32
    off), ``fast`` bfloat16 autocast; no FP8 path.
    """

    def __init__(self, arch: CLIPArch, model: nn.Module, weights_sha256: str | None,
                 device: str | torch.device | None = None):
        super().__init__(arch.name, EMBED_DIM, preprocess_spec(arch), CLIPImageTower(model), weights_sha256, device)
        self.arch = arch

    def _apply_precision(self) -> None:
        if self.precision.mode == "fp8":
            from dataclasses import replace

            from .precision import Precision

            self.precision = Precision()
            self.preprocess_spec = replace(self.preprocess_spec, model_dtype="float32")
            raise FDEvalError(f"{self.name}: --precision fp8 is for DINOv2 only; use fast (bfloat16) or exact")

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.preprocess_spec
        if tuple(spec.size) != (self.arch.image_size,) * 2:
            raise FDEvalError(f"{self.name}: preprocess size {tuple(spec.size)} is not supported; the network "
                              f"takes {self.arch.image_size}x{self.arch.image_size}")
        return super().model_input(x)


def _build(name: str, weights: str | os.PathLike | None, device: Any, options: dict[str, Any],
           _depth: int | None = None) -> CLIPExtractor:
    if options:
        raise FDEvalError(f"{name} takes no options, got {', '.join(sorted(options))}")
    arch = ARCHS[name]
    path = resolve_weights(weights, arch.weights, name)
    model, _ = load_model(arch, path, depth=_depth)
    return CLIPExtractor(arch, model, sha256_file_cached(path), device)


@register_extractor("clip-vitl14-336", EMBED_DIM,
                    "OpenAI CLIP ViT-L/14@336 image embedding (768-d, L2-normalised), CMMD's protocol: centre "
                    "square, PIL bicubic 336", weights=ARCHS["clip-vitl14-336"].weights, metrics=("fd", "cmmd"))
def clip_vitl14_336(weights: str | os.PathLike | None = None, device: str | torch.device | None = None,
                    **options: Any) -> CLIPExtractor:
    """CMMD's CLIP (``weights``: open_clip / Hugging Face / timm safetensors, else the official download)."""
    return _build("clip-vitl14-336", weights, device, options)


@register_extractor("clip-vitl14", EMBED_DIM,
                    "OpenAI CLIP ViT-L/14 (224) image embedding (768-d, L2-normalised), CLIPScore's default model",
                    weights=ARCHS["clip-vitl14"].weights, metrics=("fd", "cmmd"))
def clip_vitl14(weights: str | os.PathLike | None = None, device: str | torch.device | None = None,
                **options: Any) -> CLIPExtractor:
    """torchmetrics CLIPScore's image tower (``openai/clip-vit-large-patch14``) at 224x224."""
    return _build("clip-vitl14", weights, device, options)
