"""DINOv2 extractors: the official torch.hub model's ``model(x)`` (CLS token after the final norm) at 224x224.

Reference: ``torch.hub.load("facebookresearch/dinov2", "dinov2_vitl14")`` (ViT-S/B/L/g, patch 14, trained at
518 px with a 37x37 position-embedding grid, layer scale, no registers), fed as dgm-eval / the GPIC toolkit do:
``PIL.Image.convert("RGB")`` -> torchvision ``Resize((224, 224), BICUBIC)`` on the PIL image -> ``ToTensor()``
-> ``Normalize(ImageNet mean, std)``. The ``-reg`` names are the hub's ``dinov2_vit*14_reg`` models (4 register
tokens).

The network is timm's ``VisionTransformer`` (same blocks as the hub code; attention through
``F.scaled_dot_product_attention``, which agrees with the hub's explicit softmax to ~1e-6 relative), run by
:class:`fd_eval.extractors.vit_runner.ViTRunner`: the last block for the CLS token only, Linear layers by the
precision mode's matmul path (IEEE float32, 3xTF32 on CUDA in exact mode, FP8), the parameters untouched. The model
input is always 224x224, so the hub's per-forward position-embedding interpolation is done once, at load time,
with the hub's own rule (:func:`resample_pos_embed`). timm's and transformers' default rules differ from it for the
models without registers (FD changes of 0.08%-0.6%), which is why they are not used.

Checkpoints (``weights=PATH``, format detected by its keys): the official ``dinov2_vit*14*_pretrain.pth``
(hub key names), Hugging Face ``facebook/dinov2-*`` / ``facebook/dinov2-with-registers-*`` safetensors (the Hub
file names, or the renamed ones of a transformers>=5 ``state_dict()``), or timm's ``vit_*_patch14*_dinov2``
format. Without ``weights`` the official file is downloaded once into ``$FD_EVAL_CACHE/weights``.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import FDEvalError, WeightsError
from ..util.io_utils import sha256_file_cached
from . import precision as precision_modes
from .base import Extractor, apply_spec, register_extractor
from .precision import LazyCompiled, exact_matmul_path, split3_form, split_numerics
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec
from .vit_runner import ViTRunner
from .weights import WeightsSource, check_keys, load_state_dict, resolve_weights

IMG_SIZE = 224  # every input is resized to this (H = W)
PATCH_SIZE = 14
GRID = IMG_SIZE // PATCH_SIZE  # 16x16 patch tokens
NUM_REGISTERS = 4
BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"


@dataclass(frozen=True)
class DINOv2Arch:
    """One hub backbone: ``vit_small`` / ``vit_base`` / ``vit_large`` / ``vit_giant2`` with patch 14."""

    key: str  # "vits14", ...
    embed_dim: int
    depth: int
    num_heads: int
    swiglu: bool = False  # giant: SwiGLU FFN ("swiglufused"), hidden (int(4 D * 2/3) + 7) // 8 * 8

    @property
    def ffn_hidden(self) -> int:
        """FFN hidden width (for SwiGLU: the width of each of the two packed halves)."""
        hidden = 4 * self.embed_dim
        return (int(hidden * 2 / 3) + 7) // 8 * 8 if self.swiglu else hidden


ARCHS: dict[str, DINOv2Arch] = {
    "vits14": DINOv2Arch("vits14", 384, 12, 6),
    "vitb14": DINOv2Arch("vitb14", 768, 12, 12),
    "vitl14": DINOv2Arch("vitl14", 1024, 24, 16),
    "vitg14": DINOv2Arch("vitg14", 1536, 40, 24, swiglu=True),
}
RESIZE_MODES = ("pil", "torch")


def extractor_name(arch: str, reg: bool) -> str:
    return f"dinov2-{arch}{'-reg' if reg else ''}"


def weights_source(arch: str, reg: bool) -> WeightsSource:
    """The official checkpoint (the file torch.hub's ``dinov2_{arch}[_reg]`` loads)."""
    filename = f"dinov2_{arch}{'_reg4' if reg else ''}_pretrain.pth"
    return WeightsSource(url=f"{BASE_URL}/dinov2_{arch}/{filename}", filename=filename, approx_mib=APPROX_MIB[arch])


# float32 parameters x 4 bytes (21.6M, 85.7M, 303M, 1.13B parameters; the registers add < 0.01%)
APPROX_MIB = {"vits14": 83, "vitb14": 327, "vitl14": 1157, "vitg14": 4329}


def preprocess_spec(resize: str) -> PreprocessSpec:
    """``pil``: the dgm-eval/GPIC reference; ``torch``: EDM2's default (float resize on the device)."""
    if resize == "pil":
        return PreprocessSpec(
            resize_library="pil", resize_filter="bicubic", antialias=True, size=(IMG_SIZE, IMG_SIZE), scale=255.0,
            mean=IMAGENET_MEAN, std=IMAGENET_STD,
            reference="dgm-eval / GPIC: torchvision Resize((224, 224), BICUBIC) on PIL, ToTensor, Normalize; "
                      "torch.hub facebookresearch/dinov2",
        )
    if resize == "torch":
        return PreprocessSpec(
            resize_library="torch", resize_filter="bicubic", antialias=True, size=(IMG_SIZE, IMG_SIZE), scale=255.0,
            mean=IMAGENET_MEAN, std=IMAGENET_STD,
            reference="EDM2 calculate_metrics.py DINOv2 resize_mode='torch': F.interpolate(float 0..255, bicubic, "
                      "antialias=True), /255, Normalize; torch.hub facebookresearch/dinov2",
        )
    raise FDEvalError(f"unknown DINOv2 resize mode {resize!r}; choose 'pil' (reference) or 'torch' (EDM2's fast one)")


# --- the network -------------------------------------------------------------------------------------------
def build_model(arch: DINOv2Arch, reg: bool, depth: int | None = None,
                device: str | torch.device = "meta") -> torch.nn.Module:
    """timm ``VisionTransformer`` with the hub architecture at 224x224 (16x16 grid), uninitialised on ``meta``.

    ``depth`` overrides the number of blocks (tests of the giant key mapping without 1.1B parameters).
    The register variant uses timm's layout: the class token's position embedding is folded into ``cls_token``
    and ``pos_embed`` covers the patches only (what the hub computes, in the same order of float operations).
    """
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer

    kw: dict = {}
    if arch.swiglu:
        # timm sizes fc1 as int(D * mlp_ratio) = both packed halves; the 0.5 guards against int() rounding down.
        packed = 2 * arch.ffn_hidden
        kw.update(mlp_ratio=(packed + 0.5) / arch.embed_dim, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)
        assert int(arch.embed_dim * kw["mlp_ratio"]) == packed
    else:
        kw.update(mlp_ratio=4.0, act_layer=torch.nn.GELU)
    return VisionTransformer(
        img_size=IMG_SIZE, patch_size=PATCH_SIZE, embed_dim=arch.embed_dim,
        depth=arch.depth if depth is None else depth, num_heads=arch.num_heads, qkv_bias=True, init_values=1.0,
        class_token=True, reg_tokens=NUM_REGISTERS if reg else 0, no_embed_class=reg, global_pool="token",
        num_classes=0, dynamic_img_size=False, weight_init="skip", device=device, **kw,
    )


def resample_pos_embed(patch_pos_embed: torch.Tensor, reg: bool, grid: int = GRID) -> torch.Tensor:
    """The hub's ``interpolate_pos_encoding`` for a ``grid x grid`` input, on the patch part only.

    Args:
        patch_pos_embed: (1, M*M, D) position embeddings of the M x M training grid (M = 37 for 518 px).
        reg: the register models' rule (``interpolate_offset=0, interpolate_antialias=True``: resize to the
            exact size with antialiasing) instead of the original one (bicubic with
            ``scale_factor = (grid + 0.1) / M`` and no antialiasing, where the scale factor -- not the output
            size -- places the samples).
        grid: the output grid side (16 for 224 px).

    Returns:
        (1, grid*grid, D) float32. The hub skips interpolation when M == grid; so does this.
    """
    n, dim = patch_pos_embed.shape[1], patch_pos_embed.shape[2]
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"position embedding has {n} patch positions, not a square grid")
    x = patch_pos_embed.float()
    if m == grid:
        return x
    x = x.reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if reg:
        x = F.interpolate(x, size=(grid, grid), mode="bicubic", antialias=True)
    else:
        s = float(grid + 0.1) / m
        x = F.interpolate(x, scale_factor=(s, s), mode="bicubic", antialias=False)
    if tuple(x.shape[-2:]) != (grid, grid):
        raise ValueError(f"resampling a {m}x{m} position grid gave {tuple(x.shape[-2:])}, not {grid}x{grid}")
    return x.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)


# --- checkpoint formats -----------------------------------------------------------------------------------
_L = r"^encoder\.layer\.(\d+)\."
# Hugging Face names (Hub files, and the renamed modules of transformers>=5) -> hub names.
_HF_RENAMES: list[tuple[str, str]] = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.mask_token$", "mask_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.register_tokens$", "register_tokens"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (_L + r"norm([12])\.", r"blocks.\1.norm\2."),
    (_L + r"attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (_L + r"attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (_L + r"layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (_L + r"mlp\.fc([12])\.", r"blocks.\1.mlp.fc\2."),
    (_L + r"mlp\.weights_in\.", r"blocks.\1.mlp.w12."),
    (_L + r"mlp\.weights_out\.", r"blocks.\1.mlp.w3."),
    (_L + r"mlp\.down_proj\.", r"blocks.\1.mlp.w3."),
    (r"^layernorm\.", "norm."),
]
# Split HF tensors fused (concatenated along dim 0, in this order) into one hub tensor.
_HF_FUSED: list[tuple[str, tuple[str, ...], str]] = [
    (_L + r"attention\.attention\.(query|key|value)\.(weight|bias)$", ("query", "key", "value"),
     "blocks.{0}.attn.qkv.{2}"),
    (_L + r"attention\.(q_proj|k_proj|v_proj)\.(weight|bias)$", ("q_proj", "k_proj", "v_proj"),
     "blocks.{0}.attn.qkv.{2}"),
    # hub SwiGLU: x1, x2 = w12(x).chunk(2); silu(x1) * x2 -- the gate is the first half
    (_L + r"mlp\.(gate_proj|up_proj)\.(weight|bias)$", ("gate_proj", "up_proj"), "blocks.{0}.mlp.w12.{2}"),
]


def detect_format(sd: dict[str, torch.Tensor]) -> str:
    """``"hf"``, ``"official"`` (hub key names) or ``"timm"``, from the key names.

    Without registers and SwiGLU, timm's format is the official one minus ``mask_token``.
    """
    if any(k.startswith(("embeddings.", "encoder.layer.")) for k in sd):
        return "hf"
    if "mask_token" in sd or "register_tokens" in sd or any(".mlp.w12." in k for k in sd):
        return "official"
    return "timm"


def hf_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face key names -> hub key names; q|k|v (and SwiGLU gate|up) concatenated along dim 0.

    Keys that match nothing are kept as they are (reported as unexpected later); so are the pieces of an
    incomplete q/k/v group (its fused tensor is then reported missing).
    """
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    orders: dict[str, tuple[str, ...]] = {}
    for k, v in sd.items():
        for pat, order, target in _HF_FUSED:
            m = re.match(pat, k)
            if m:
                name = target.format(*m.groups())
                groups.setdefault(name, {})[m.group(2)] = (k, v)
                orders[name] = order
                break
        else:
            for pat, repl in _HF_RENAMES:
                new, n = re.subn(pat, repl, k)
                if n:
                    out[new] = v
                    break
            else:
                out[k] = v
    for name, parts in groups.items():
        if set(parts) == set(orders[name]):
            out[name] = torch.cat([parts[p][1] for p in orders[name]], dim=0)
        else:
            out.update(dict(parts.values()))
    return out


def official_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hub key names -> timm's (drop ``mask_token``; SwiGLU ``w12``/``w3`` -> ``fc1``/``fc2``; registers:
    ``register_tokens`` -> ``reg_token`` with the class position embedding folded into ``cls_token``)."""
    out = {k: v for k, v in sd.items() if k != "mask_token"}
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        if "cls_token" in out and "pos_embed" in out:
            pos = out["pos_embed"]
            # the hub adds pos_embed[:, 0] to the class token in float32 (cat, then + pos); same op here
            out["cls_token"] = out["cls_token"].float() + pos[:, :1].float()
            out["pos_embed"] = pos[:, 1:]
    renamed = {}
    for k, v in out.items():
        k = re.sub(r"^(blocks\.\d+\.mlp\.)w12\.", r"\1fc1.", k)
        k = re.sub(r"^(blocks\.\d+\.mlp\.)w3\.", r"\1fc2.", k)
        renamed[k] = v
    return renamed


def _guess_name(sd: dict[str, torch.Tensor]) -> str | None:
    """Which extractor a converted (timm-named) state dict looks like, for error messages."""
    w = sd.get("patch_embed.proj.weight")
    if w is None:
        return None
    arch = next((a.key for a in ARCHS.values() if a.embed_dim == w.shape[0]), None)
    return extractor_name(arch, "reg_token" in sd) if arch else None


def to_model_state_dict(sd: dict[str, torch.Tensor], model: torch.nn.Module, reg: bool, name: str,
                        path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Any supported checkpoint -> float32 state dict for :func:`build_model`'s model at 224 px; and the format.

    Raises:
        WeightsError: missing/unexpected keys, wrong shapes, a non-square position grid (all naming ``path``).
    """
    fmt = detect_format(sd)
    sd = hf_to_official(sd) if fmt == "hf" else dict(sd)
    sd = official_to_timm(sd)
    expected = model.state_dict()
    guess = _guess_name(sd)
    hint = f" (it looks like a {guess} checkpoint)" if guess and guess != name else ""
    try:
        check_keys(path, expected, sd)
    except WeightsError as e:
        raise WeightsError(f"{e}{hint}") from None
    sd = {k: v.float().contiguous() for k, v in sd.items()}
    pos = sd["pos_embed"]
    n_prefix = 0 if reg else 1  # the register layout keeps no class position in pos_embed
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise WeightsError(f"{path}: pos_embed has shape {tuple(pos.shape)}, expected (1, N, D){hint}")
    try:
        patch = resample_pos_embed(pos[:, n_prefix:], reg)
    except ValueError as e:
        raise WeightsError(f"{path}: {e}; is it a DINOv2 checkpoint?{hint}") from None
    sd["pos_embed"] = torch.cat([pos[:, :n_prefix], patch], dim=1)
    for k, t in expected.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise WeightsError(f"{path}: {k} has shape {tuple(sd[k].shape)} but {name} needs {tuple(t.shape)}; "
                               f"is it the right checkpoint?{hint}")
    return sd, fmt


def load_model(arch: DINOv2Arch, reg: bool, path: str | os.PathLike, name: str,
               depth: int | None = None) -> tuple[torch.nn.Module, str]:
    """Build the network and load ``path`` into it (CPU, float32, eval); returns (model, detected format)."""
    model = build_model(arch, reg, depth=depth)
    sd, fmt = to_model_state_dict(load_state_dict(path), model, reg, name, path)
    model.load_state_dict(sd, strict=True, assign=True)  # replaces the meta tensors; no random init spent
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # cannot happen with strict loading; guard against a timm change adding state
        raise WeightsError(f"{path}: {name} has state the checkpoint does not provide: {', '.join(leftover[:3])}")
    return model.eval().requires_grad_(False), fmt


# --- the extractor -----------------------------------------------------------------------------------------
def check_spec(spec: PreprocessSpec, name: str) -> None:
    """Raise :class:`FDEvalError` for a spec this network cannot run (the model input is fixed at 224x224)."""
    if tuple(spec.size) != (IMG_SIZE, IMG_SIZE):
        raise FDEvalError(f"{name}: preprocess size {tuple(spec.size)} is not supported; the position embedding "
                          f"is resampled for {IMG_SIZE}x{IMG_SIZE} inputs")
    if spec.resize_library not in RESIZE_MODES:
        raise FDEvalError(f"{name}: resize library {spec.resize_library!r} is not one of {RESIZE_MODES}")
    if spec.resize_library == "pil" and not spec.antialias:
        raise FDEvalError(f"{name}: Pillow resizes with antialiasing only; set antialias=True or resize 'torch'")
    if len(spec.mean) != 3 or len(spec.std) != 3 or not spec.scale:
        raise FDEvalError(f"{name}: preprocess needs 3 means, 3 stds and a non-zero scale, got {spec}")


class DINOv2Extractor(Extractor):
    """DINOv2 CLS features (float32 (N, D)) from uint8 RGB images.

    ``resize="pil"``: Pillow's bicubic resize to exactly 224x224 (no crop), by :meth:`prepare` on the host or,
    with :meth:`set_pil_resize_on` (default: in fast mode on a GPU), by :meth:`forward_prepared` on the device
    with the same integer arithmetic (:mod:`fd_eval.extractors.pil_resize`; bit-identical pixels). ``resize="torch"``:
    images of any size go to the device and are resized there in float (EDM2).

    Precision: :meth:`forward_prepared` = :meth:`forward_input` (``self.forward_model`` in the precision mode's
    numerics) of :meth:`normalize` (always float32). The network runs as :class:`ViTRunner` (the model's
    computation; the last block for the CLS token only) with the matmul path of :meth:`matmul_path`:
    ``exact``: float32-accurate -- on CUDA 3xTF32 split matmuls on tensor cores (``$FD_EVAL_MATMUL`` =
    ``ieee`` forces IEEE float32), elsewhere IEEE float32; ``fp32``: IEEE float32 with TF32 off everywhere;
    ``fast``: bfloat16 autocast, fused SDPA attention; ``fp8``: fast with e4m3 Linear layers. Optionally
    ``torch.compile`` of each transformer block (``forward_model`` is then a
    :class:`fd_eval.extractors.precision.LazyCompiled` with ``regions="blocks"``). The output is float32 in any case.

    Speed paths: ``resize="torch"`` resizes on the device (no Pillow resize in the workers) and is what GPU JPEG
    decoding (``decode="gpu"``) requires; it is EDM2's protocol, not GPIC's: with random ViT-S/14 weights its
    features differ from the Pillow path by ~1e-3 of the feature scale (README, "Precision modes and speed").
    """

    compile_regions = "blocks"  # timm's Sequential of transformer blocks: one graph, compiled once

    def __init__(self, name: str, arch: DINOv2Arch, model: torch.nn.Module, resize: str,
                 weights_sha256: str | None, device: str | torch.device | None = None):
        self._runner: tuple[tuple, ViTRunner] | None = None
        super().__init__(name, arch.embed_dim, preprocess_spec(resize), model, weights_sha256, device)
        self.arch = arch
        self.resize = resize
        self.plan_run(None)

    # --- how the network runs ----------------------------------------------------------------------------
    def to(self, device: str | torch.device) -> "DINOv2Extractor":
        super().to(device)
        if hasattr(self, "arch"):  # not during Extractor.__init__
            self.plan_run(None)  # prepared weights live on the device: rebuild there
        return self

    def matmul_path(self) -> str:
        """``"ieee"``, ``"split3"`` or ``"fp8"``: how this mode computes the Linear layers on this device."""
        mode = self.precision.mode
        if mode == "exact":
            return exact_matmul_path(self.device)
        return "fp8" if mode == "fp8" else "ieee"

    def runner(self) -> ViTRunner:
        """The :class:`ViTRunner` for the current mode and device (prepared weights made once, then cached)."""
        path = self.matmul_path()
        emulate = self.device.type != "cuda"
        if path == "fp8" and not emulate and torch.cuda.get_device_capability(self.device) < (8, 9):
            raise FDEvalError(f"{self.name}: --precision fp8 needs FP8 tensor cores (compute capability 8.9+, "
                              f"Ada/Hopper); {torch.cuda.get_device_name(self.device)} has none: use fast")
        key = (path, split3_form() if path == "split3" else None, emulate, str(self.device))
        if self._runner is None or self._runner[0] != key:
            self._runner = None  # free the previous prepared weights first
            self._runner = (key, ViTRunner(self.model, path, emulate, key[1] or "cat").eval())
        return self._runner[1]

    def matmul_description(self) -> str:
        """What provenance records as ``precision.matmul``, e.g. ``"3xtf32-cat"`` or ``"ieee-fp32"``."""
        return self.runner().matmul

    def plan_run(self, n_images: int | None) -> None:
        """Resolve ``compile`` for a pass over ``n_images`` images (None: unknown): True compiles in any mode;
        None (auto) compiles fast modes on a GPU for passes of at least ``COMPILE_AUTO_MIN_IMAGES`` images (the
        threshold measured for the eager-vs-compiled bfloat16 network; to be re-measured with the tuned mode and
        the on-disk cache, benchmarks/bench_gpu.py)."""
        p, runner = self.precision, self.runner()
        want = p.compile is True or (p.fast and p.compile is None and self.device.type == "cuda"
                                     and n_images is not None
                                     and n_images >= precision_modes.COMPILE_AUTO_MIN_IMAGES)
        fm = self.forward_model
        if want and not (isinstance(fm, LazyCompiled) and fm.module is runner):
            self.forward_model = LazyCompiled(runner, self.name, regions="blocks", device_type=self.device.type)
        elif not want:
            self.forward_model = runner

    def forward_input(self, x: torch.Tensor) -> torch.Tensor:
        """float32 (N, 3, 224, 224) on ``self.device`` -> float32 (N, D), in the mode's numerics (the 3xTF32
        path on CUDA: :func:`fd_eval.extractors.precision.split_numerics`)."""
        if self.matmul_path() == "split3" and self.device.type == "cuda":
            ctx = split_numerics("cuda")
        else:
            ctx = self.precision.numerics(self.device, self.fast_compute)
        with torch.inference_mode(), ctx:
            out = self.forward_model(x)
        return out.float()

    def metadata(self) -> dict:
        md = super().metadata()
        md["precision"] = {**md["precision"], "matmul": self.matmul_description()}
        return md

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> float32 (N, 3, 224, 224) model input.

        ``pil``: torchvision's ToTensor + Normalize op for op (``x.float().div(255).sub(mean).div(std)``), so
        the input is bit-identical to the reference pipeline's; images not yet 224x224 are first resized here
        with :func:`fd_eval.extractors.pil_resize.pil_resize_checked` (Pillow's integers, on the device). ``torch``:
        EDM2's
        ``F.interpolate(x.float(), (224, 224), bicubic, antialias=True) / 255``, then the same normalisation (no
        clamping, as EDM2). Size, library, filter, antialias, scale, mean and std are read from
        ``self.preprocess_spec`` (the record saved with the statistics is what ran, by construction).
        """
        check_spec(self.preprocess_spec, self.name)
        return apply_spec(x, self.preprocess_spec, self.name)

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`normalize` (float32 (N, 3, 224, 224), whatever the precision mode)."""
        return self.normalize(x)


def _build_extractor(arch_key: str, reg: bool, weights: str | os.PathLike | None = None,
                     device: str | torch.device | None = None, resize: str = "pil",
                     _depth: int | None = None) -> DINOv2Extractor:
    """Shared factory; ``_depth`` (tests only) builds a shallower network of the same width."""
    name = extractor_name(arch_key, reg)
    preprocess_spec(resize)  # unknown modes fail here, before any download
    arch = ARCHS[arch_key]
    path = resolve_weights(weights, weights_source(arch_key, reg), name)
    model, _ = load_model(arch, reg, path, name, depth=_depth)
    return DINOv2Extractor(name, arch, model, resize, sha256_file_cached(path), device)


def _register(arch_key: str, reg: bool) -> None:
    arch = ARCHS[arch_key]
    name = extractor_name(arch_key, reg)
    hub = f"dinov2_{arch_key}{'_reg' if reg else ''}"
    desc = f"DINOv2 {arch_key}{' + 4 registers' if reg else ''} (torch.hub {hub}), final-norm CLS token, 224x224"

    @register_extractor(name, arch.embed_dim, desc, weights=weights_source(arch_key, reg), options=("resize",))
    def factory(weights: str | os.PathLike | None = None, device: str | torch.device | None = None,
                resize: str = "pil") -> DINOv2Extractor:
        return _build_extractor(arch_key, reg, weights=weights, device=device, resize=resize)

    factory.__name__ = factory.__qualname__ = name.replace("-", "_")
    factory.__doc__ = f"{desc}. resize: 'pil' (reference, dgm-eval/GPIC) or 'torch' (EDM2's fast default)."


for _arch in ARCHS:
    for _reg in (False, True):
        _register(_arch, _reg)
