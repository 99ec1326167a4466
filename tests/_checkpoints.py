"""Random-weight checkpoints in every supported format, with the reference models that read them.

Everything here is built from the reference implementations themselves (the hub DINOv2 code of
``dinov2==0.0.1.dev2``, timm's own checkpoint converter, transformers' own loader), never from fd_eval, so that
a test comparing fd_eval against these references can fail.

    path, ref = save_dinov2_checkpoint(tmp_path / "w.pth", arch="vits14", fmt="official", seed=0, reg=False)
    ref(normalized_224px_batch) -> (N, D) CLS features of the reference model with the same weights

``ref`` is the hub ``DinoVisionTransformer`` (img_size=518, patch 14, init_values=1.0, block_chunks=0, as
hubconf builds it) for the models without registers. The pip copy of the hub code predates registers, so for
``reg=True`` it is transformers' ``Dinov2WithRegistersModel`` (whose position-embedding resampling -- exact size,
bicubic, antialiased -- is the hub's ``_reg`` rule), read by transformers' own loader from an HF-format file.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

# arch -> (hub constructor name, embed_dim, depth, heads, ffn_layer)
HUB_ARCHS = {
    "vits14": ("vit_small", 384, 12, 6, "mlp"),
    "vitb14": ("vit_base", 768, 12, 12, "mlp"),
    "vitl14": ("vit_large", 1024, 24, 16, "mlp"),
    "vitg14": ("vit_giant2", 1536, 40, 24, "swiglufused"),
}
TIMM_NAMES = {"vits14": "vit_small_patch14", "vitb14": "vit_base_patch14", "vitl14": "vit_large_patch14",
              "vitg14": "vit_giant_patch14"}


def hub_model(arch: str, depth: int | None = None) -> torch.nn.Module:
    """The hub's DINOv2 backbone as ``hubconf``/``_make_dinov2_model`` builds it (random init, eval mode)."""
    import logging

    logging.getLogger("dinov2").setLevel(logging.ERROR)  # "xFormers not available"
    from dinov2.layers import MemEffAttention, NestedTensorBlock
    from dinov2.models import vision_transformer as vits

    ctor, dim, full_depth, heads, ffn = HUB_ARCHS[arch]
    kw = dict(img_size=518, patch_size=14, init_values=1.0, ffn_layer=ffn, block_chunks=0)
    if depth is None:
        model = vits.__dict__[ctor](**kw)
    else:  # same width and block type, fewer blocks (vit_giant2 etc. fix the depth)
        model = vits.DinoVisionTransformer(embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=4,
                                           block_fn=functools.partial(NestedTensorBlock, attn_class=MemEffAttention),
                                           **kw)
    return model.eval().requires_grad_(False)


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Overwrite every parameter with seeded noise, so that no two tensors of a kind are interchangeable.

    (The hub init leaves biases 0, norms 1 and layer scales 1: swapped norms/biases would then go unnoticed.)
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.1 * noise)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif "norm" in name and name.endswith("bias"):
                p.copy_(0.05 * noise)
            else:  # linear/conv weights and biases, pos_embed, cls/mask tokens
                p.copy_(0.02 * noise)
    return model


@functools.lru_cache(maxsize=2)
def _random_official(arch: str, seed: int, reg: bool, depth: int | None):
    model = randomize_(hub_model(arch, depth), seed)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if reg:
        g = torch.Generator().manual_seed(seed + 1000)
        sd["register_tokens"] = 0.02 * torch.randn(1, 4, sd["cls_token"].shape[-1], generator=g)
    return sd, model


def random_official_state_dict(arch: str, seed: int = 0, reg: bool = False,
                               depth: int | None = None) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """(official hub-format state dict, hub model holding the same weights). ``reg`` adds ``register_tokens``.

    The state dict is a fresh copy (callers may edit it); the hub model is shared between calls with the same
    arguments (small ones are cached: tests build the same weights in several formats): do not modify it.
    """
    small = depth is not None or arch in ("vits14", "vitb14")  # keep no GB-sized model alive for the session
    sd, model = (_random_official if small else _random_official.__wrapped__)(arch, seed, reg, depth)
    return {k: v.clone() for k, v in sd.items()}, model


def official_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hub names -> the names of the ``facebook/dinov2-*`` Hub safetensors (q/k/v split from qkv)."""
    out = {}
    top = {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
           "pos_embed": "embeddings.position_embeddings", "register_tokens": "embeddings.register_tokens",
           "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
           "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    sub = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.output.dense", "mlp.fc1": "mlp.fc1",
           "mlp.fc2": "mlp.fc2", "mlp.w12": "mlp.weights_in", "mlp.w3": "mlp.weights_out"}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
            continue
        _, i, rest = k.split(".", 2)
        pre = f"encoder.layer.{i}."
        mod, leaf = rest.rsplit(".", 1)
        if mod == "attn.qkv":
            for part, t in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                out[f"{pre}attention.attention.{part}.{leaf}"] = t.clone()
        elif mod in ("ls1", "ls2"):
            out[f"{pre}layer_scale{mod[-1]}.lambda1"] = v
        else:
            out[f"{pre}{sub[mod]}.{leaf}"] = v
    return out


def official_to_timm(sd: dict[str, torch.Tensor], arch: str, reg: bool,
                     depth: int | None = None) -> dict[str, torch.Tensor]:
    """timm's format, made by timm's own ``checkpoint_filter_fn`` for a 518-px model (so: no resampling)."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    name = TIMM_NAMES[arch] + ("_reg4_dinov2" if reg else "_dinov2")
    kw = {} if depth is None else {"depth": depth}
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, img_size=518, num_classes=0, **kw)
    return {k: v.clone() for k, v in checkpoint_filter_fn(dict(sd), model).items()}


def timm_model(arch: str, reg: bool, img_size: int = 518, depth: int | None = None) -> torch.nn.Module:
    """timm's own DINOv2 model (random init) of the matching architecture, eval mode."""
    import timm

    name = TIMM_NAMES[arch] + ("_reg4_dinov2" if reg else "_dinov2")
    kw = {} if depth is None else {"depth": depth}
    return timm.create_model(name, pretrained=False, img_size=img_size, num_classes=0, **kw).eval()


def hf_config(arch: str, reg: bool, depth: int | None = None, image_size: int = 518):
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    _, dim, full_depth, heads, ffn = HUB_ARCHS[arch]
    cls = Dinov2WithRegistersConfig if reg else Dinov2Config
    return cls(hidden_size=dim, num_hidden_layers=full_depth if depth is None else depth, num_attention_heads=heads,
               mlp_ratio=4, image_size=image_size, patch_size=14, layerscale_value=1.0,
               use_swiglu_ffn=ffn != "mlp", layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True)


class HFCLS(torch.nn.Module):
    """transformers Dinov2(WithRegisters)Model -> final-layernorm CLS token (``pooler_output``)."""

    def __init__(self, hf: torch.nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=x).pooler_output


def load_hf_reference(hf_file: str | os.PathLike, arch: str, reg: bool, depth: int | None = None,
                      image_size: int = 518) -> HFCLS:
    """transformers' own loader (``from_pretrained``, with its key conversions) on an HF-format safetensors file."""
    import logging

    from transformers import Dinov2Model, Dinov2WithRegistersModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf_file = Path(hf_file)
    d = hf_file.parent / f"{hf_file.stem}.hf-model"
    d.mkdir(exist_ok=True)
    link = d / "model.safetensors"
    if not link.exists():
        os.symlink(hf_file.resolve(), link)
    (d / "config.json").write_text(json.dumps(hf_config(arch, reg, depth, image_size).to_dict()))
    cls = Dinov2WithRegistersModel if reg else Dinov2Model
    model = cls.from_pretrained(str(d), attn_implementation="eager")
    return HFCLS(model).eval().requires_grad_(False)


def save_state_dict(sd: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """``.safetensors`` suffix -> safetensors, anything else -> ``torch.save``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in sd.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


def save_dinov2_checkpoint(path: str | os.PathLike, arch: str = "vits14", fmt: str = "official", seed: int = 0,
                           reg: bool = False, depth: int | None = None) -> tuple[Path, torch.nn.Module]:
    """Write random DINOv2 weights in ``fmt`` ("official" .pth, "hf" safetensors, "timm") to ``path``.

    The same (arch, seed, reg, depth) gives the same weights in every format. Returns (path, reference), the
    reference taking normalised (N, 3, H, W) float input and returning (N, D) CLS features (see module doc).
    ``depth`` builds a shallower network of the same width (the giant mapping without 1.1B parameters).
    """
    sd, hub = random_official_state_dict(arch, seed, reg, depth)
    if fmt == "official":
        out = sd
    elif fmt == "hf":
        out = official_to_hf(sd)
    elif fmt == "timm":
        out = official_to_timm(sd, arch, reg, depth)
    else:
        raise ValueError(fmt)
    path = save_state_dict(out, path)
    if not reg:
        return path, hub
    hf_file = path if fmt == "hf" else save_state_dict(official_to_hf(sd),
                                                       path.with_name(path.stem + ".hf.safetensors"))
    return path, load_hf_reference(hf_file, arch, reg, depth)
