"""Random-weight CLIP checkpoints in the published formats, made locally (no download is possible in tests)."""
from __future__ import annotations

from pathlib import Path

import torch


def perturb_norms_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random LayerNorm scales/offsets (a fresh init has 1 and 0, which would hide a swapped ln_pre/ln_post)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def hf_vision_config(image_size: int = 336, depth: int = 2):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=depth, num_attention_heads=16,
                            image_size=image_size, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5)


def save_hf_vision(folder: Path, image_size: int = 336, depth: int = 2, seed: int = 0):
    """transformers CLIPVisionModelWithProjection, random, saved with save_pretrained; returns (model, file)."""
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    m = perturb_norms_(CLIPVisionModelWithProjection(hf_vision_config(image_size, depth)).eval(), seed)
    m.save_pretrained(folder, safe_serialization=True)
    return m, Path(folder) / "model.safetensors"


def open_clip_vision(image_size: int = 336, depth: int = 2, seed: int = 0) -> torch.nn.Module:
    """open_clip's image tower of ViT-L-14(-336) (QuickGELU, as OpenAI's), with ``depth`` blocks, random."""
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    torch.manual_seed(seed)
    cfg = CLIPVisionCfg(layers=depth, width=1024, head_width=64, patch_size=14, image_size=image_size)
    tower = _build_vision_tower(768, cfg, quick_gelu=True).eval()
    with torch.no_grad():  # open_clip initialises proj and the embeddings randomly; the norms too, here
        perturb_norms_(tower, seed)
    return tower


def save_safetensors(sd: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path
