"""CLIPScore (Hessel et al., EMNLP 2021) exactly as torchmetrics computes it, pairing images with prompts by key.

torchmetrics ``CLIPScore`` / ``functional.clip_score`` (default model ``openai/clip-vit-large-patch14``, 224 px):
per pair ``s = 100 * cos(E_image, E_text)`` (both embeddings divided by their L2 norm), and the metric is
``max(mean(s), 0)`` -- the *mean* is clamped at 0 (its code), not each pair as its docstring's formula reads; both
are reported here (``clip_score`` is torchmetrics' number; ``clip_score_clamped_per_pair`` the docstring's).

* Image side: the ``clip-vitl14`` extractor (OpenAI CLIP ViT-L/14 image tower + projection at 224x224; the central
  square, Pillow bicubic to 224, /255, CLIP mean/std: the pixels of transformers' Pillow ``CLIPImageProcessor(Pil)``
  for square images).
* Text side: open_clip's text transformer (causal, QuickGELU, pooled at the highest token id -- the end-of-text
  token -- as OpenAI CLIP and transformers' ``CLIPTextModel`` with the OpenAI configuration do) and open_clip's
  BPE tokenizer (OpenAI's vocabulary, shipped with open_clip) after transformers' text normaliser. Truncation as
  torchmetrics: the tokens ``[start] + BPE(text) + [end]`` are cut to 77, so a caption over 75 BPE tokens loses
  its end token and is pooled at its highest remaining token id (torchmetrics truncates the processor's output
  the same way). Such prompts are counted and listed.
* Weights (``weights=PATH``): one full CLIP checkpoint holding both towers, Hugging Face
  ``openai/clip-vit-large-patch14`` ``model.safetensors`` (the default download) or open_clip's
  ``open_clip_pytorch_model.safetensors``; TorchScript archives are refused.

Needs the optional extra ``clip`` (``pip install 'fd-eval[clip]'``: open-clip-torch); without it
:class:`ClipDependencyError` says so in one line.
"""
from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FDEvalError, InputError, WeightsError
from ..extractors.weights import WeightsSource, check_keys, load_state_dict, resolve_weights

DEFAULT_MODEL = "openai/clip-vit-large-patch14"
CONTEXT_LENGTH = 77
TEXT_WIDTH, TEXT_HEADS, TEXT_LAYERS, VOCAB = 768, 12, 12, 49408
CLIP_L14_WEIGHTS = WeightsSource(
    url="https://huggingface.co/openai/clip-vit-large-patch14/resolve/main/model.safetensors",
    filename="openai_clip_vit_large_patch14.safetensors", approx_mib=1631)


class ClipDependencyError(FDEvalError):
    """open-clip-torch (the ``clip`` extra), which CLIPScore's text tower and tokenizer come from, is missing."""


def _open_clip() -> Any:
    try:
        import open_clip
    except ImportError as e:
        raise ClipDependencyError(f"CLIPScore needs open-clip-torch ({e.name} is not installed): "
                                  "pip install 'fd-eval[clip]'") from None
    return open_clip


# --- the text tower ---------------------------------------------------------------------------------------
def build_text_tower(layers: int = TEXT_LAYERS) -> torch.nn.Module:
    """open_clip's ViT-L/14 text transformer (width 768, 12 heads, 77 tokens, QuickGELU, argmax pooling), random."""
    _open_clip()
    from open_clip.model import CLIPTextCfg, _build_text_tower

    cfg = CLIPTextCfg(context_length=CONTEXT_LENGTH, vocab_size=VOCAB, width=TEXT_WIDTH, heads=TEXT_HEADS,
                      layers=layers)
    return _build_text_tower(TEXT_WIDTH, cfg, quick_gelu=True)


def _hf_text_to_open_clip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    block = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k == "text_projection.weight":
            out["text_projection"] = v.t()  # transformers: Linear (out, in); open_clip: x @ P
        elif k == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif k == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif k.startswith("text_model.final_layer_norm."):
            out["ln_final." + k.rsplit(".", 1)[1]] = v
        else:
            m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", k)
            if m and m.group(2) in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)[10]] = v
            elif m and m.group(2) in block:
                out[f"transformer.resblocks.{m.group(1)}.{block[m.group(2)]}.{m.group(3)}"] = v
    for (i, kind), p in qkv.items():
        if set(p) == {"q", "k", "v"}:
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([p["q"], p["k"], p["v"]])
    return out


def load_text_tower(path: str | os.PathLike, layers: int = TEXT_LAYERS) -> torch.nn.Module:
    """The text tower of a full CLIP checkpoint (Hugging Face ``text_model.*`` + ``text_projection`` or open_clip's
    top-level ``token_embedding`` / ``transformer`` / ``ln_final`` / ``text_projection``), float32, eval."""
    sd = load_state_dict(path)
    if any(k.startswith("text_model.") for k in sd):
        sd = _hf_text_to_open_clip(sd)
    else:
        keep = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
        sd = {k: v for k, v in sd.items() if k.startswith(keep)}
    if not sd:
        raise WeightsError(f"{path}: holds no CLIP text tower; CLIPScore needs a full CLIP checkpoint (e.g. "
                           f"{CLIP_L14_WEIGHTS.url})")
    tower = build_text_tower(layers)
    expected = {k: v for k, v in tower.state_dict().items() if k != "attn_mask"}
    check_keys(path, expected, sd)
    for k, t in expected.items():
        if tuple(sd[k].shape) != tuple(t.shape):
            raise WeightsError(f"{path}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(t.shape)}; is it "
                               "OpenAI CLIP ViT-L/14?")
    tower.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    return tower.eval().requires_grad_(False)


@dataclass(frozen=True)
class Tokens:
    """ids: int64 (B, 77), zero-padded; truncated: per prompt, whether it lost tokens (its end token included)."""

    ids: torch.Tensor
    truncated: list[bool]


def tokenize(texts: Sequence[str]) -> Tokens:
    """``[start] + BPE(text) + [end]`` cut to 77 tokens and zero-padded (torchmetrics' truncation; see the module
    docstring); open_clip's tokenizer (ftfy/html cleaning, lower case, OpenAI's BPE)."""
    _open_clip()
    from open_clip.tokenizer import SimpleTokenizer

    tok = _tokenizer_cache.get("t")
    if tok is None:
        tok = _tokenizer_cache.setdefault("t", SimpleTokenizer())
        tok.clean_fn = _normalize  # transformers' CLIP tokenizer's normaliser instead of open_clip's (see below)
    ids = torch.zeros(len(texts), CONTEXT_LENGTH, dtype=torch.long)
    truncated = []
    for i, t in enumerate(texts):
        seq = [tok.sot_token_id] + tok.encode(_normalize(str(t))) + [tok.eot_token_id]
        truncated.append(len(seq) > CONTEXT_LENGTH)
        seq = seq[:CONTEXT_LENGTH]
        ids[i, :len(seq)] = torch.tensor(seq)
    return Tokens(ids, truncated)


_tokenizer_cache: dict[str, Any] = {}


def _normalize(text: str) -> str:
    """The text normaliser of transformers' CLIP tokenizer (``tokenizers`` backend: NFC, runs of whitespace to one
    space, lower case), which torchmetrics runs. open_clip's own cleaning also applies ftfy and unescapes HTML
    entities (``&amp;`` -> ``&``); so did transformers' slow tokenizer with ftfy installed: captions with HTML
    entities or mojibake tokenize differently across those versions (docs/metrics-cmmd-clipscore.md)."""
    return unicodedata.normalize("NFC", re.sub(r"\s+", " ", text)).lower()


def text_embeddings(tower: torch.nn.Module, texts: Sequence[str], batch_size: int = 256,
                    device: str | torch.device = "cpu") -> tuple[torch.Tensor, list[bool]]:
    """float32 (B, 768) unit-norm text embeddings, and which prompts were truncated."""
    tok = tokenize(texts)
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            out.append(F.normalize(tower(tok.ids[i:i + batch_size].to(device)).float(), dim=-1).cpu())
    return (torch.cat(out) if out else torch.zeros(0, TEXT_WIDTH)), tok.truncated


# --- pairing ---------------------------------------------------------------------------------------------
def image_key(description: str) -> str:
    """An image's key: its file (or archive member) name up to the first dot (WebDataset's rule), e.g.
    ``gen/0a1b....png`` -> ``0a1b...``; an array item ``a.npy[3]`` -> ``3``."""
    m = re.search(r"\[(\d+)\]$", description)
    if m:
        return m.group(1)
    name = re.split(r"[/\\:]", description)[-1]
    return name.split(".", 1)[0]


def read_prompt_map(prompts: Any) -> tuple[dict[str, str], list[str]]:
    """{key: caption} from a prompts.jsonl path (``fd-eval prompts``' format: ``key``, ``index``, ``caption``) or a
    list of such dicts; each prompt is reachable by its ``key`` and by its ``index`` (images named 00042.png).
    Returns the map and the prompts' keys in order. Duplicate keys are an error."""
    from ..outputs.prompts import read_prompts

    where = str(prompts) if isinstance(prompts, (str, os.PathLike)) else "prompts"
    if isinstance(prompts, (str, os.PathLike)):
        if not Path(prompts).is_file():
            raise InputError(f"{prompts}: prompts file not found; write one with `fd-eval prompts`")
        try:
            prompts = read_prompts(prompts)
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError(f"{where}: not JSON lines ({e}); expected the format `fd-eval prompts` writes") from e
    by_key: dict[str, str] = {}
    order: list[str] = []
    for n, p in enumerate(prompts):
        if not isinstance(p, dict) or "caption" not in p or ("key" not in p and "index" not in p):
            raise InputError(f"{where}: prompt {n} has no 'caption' and 'key' (or 'index'); expected the format "
                             "`fd-eval prompts` writes")
        key = str(p.get("key", p.get("index")))
        if key in by_key:
            raise InputError(f"{where}: key {key!r} appears twice; each image pairs with one prompt")
        by_key[key] = str(p["caption"])
        order.append(key)
        if "index" in p and "key" in p:
            by_key.setdefault(f"#{int(p['index'])}", key)  # index alias, resolved in pair_images
    return by_key, order


def pair_images(descriptions: Sequence[str], prompts: dict[str, str],
                order: Sequence[str]) -> tuple[list[int], list[str], list[str], list[str]]:
    """(image indices, their prompt keys, unmatched image descriptions, prompt keys without an image).

    An image matches the prompt whose key is its :func:`image_key`, or, for a numeric name, whose index it is."""
    idx, keys, lonely, used = [], [], [], set()
    for i, d in enumerate(descriptions):
        k = image_key(d)
        if k not in prompts and k.isdigit() and f"#{int(k)}" in prompts:
            k = prompts[f"#{int(k)}"]
        if k in prompts and not k.startswith("#"):
            if k in used:
                lonely.append(f"{d} (a second image for prompt {k})")
                continue
            idx.append(i)
            keys.append(k)
            used.add(k)
        else:
            lonely.append(d)
    missing = [k for k in order if k not in used]
    return idx, keys, lonely, missing


# --- the metric ---------------------------------------------------------------------------------------------
@dataclass
class ClipScoreResult:
    """``clip_score``: torchmetrics' number, ``max(mean(100 cos), 0)``; ``per_pair``: 100 cos per matched image
    (float64, in ``keys`` order); the unmatched on both sides and the truncated prompts, listed."""

    clip_score: float
    clip_score_clamped_per_pair: float
    n: int
    keys: list[str]
    per_pair: np.ndarray
    images_without_prompt: list[str] = field(default_factory=list)
    prompts_without_image: list[str] = field(default_factory=list)
    truncated_prompts: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"clip_score": self.clip_score, "clip_score_clamped_per_pair": self.clip_score_clamped_per_pair,
                "n": self.n, "images_without_prompt": {"count": len(self.images_without_prompt),
                                                       "items": self.images_without_prompt},
                "prompts_without_image": {"count": len(self.prompts_without_image),
                                          "keys": self.prompts_without_image},
                "truncated_prompts": {"count": len(self.truncated_prompts), "keys": self.truncated_prompts,
                                      "context_length": CONTEXT_LENGTH},
                "provenance": self.provenance}


def score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> tuple[np.ndarray, float, float]:
    """Per-pair ``100 cos`` (float64), torchmetrics' ``max(mean, 0)`` and the per-pair clamped mean."""
    s = 100.0 * (image_emb.double() * text_emb.double()).sum(dim=-1)
    per = s.numpy()
    return per, max(float(per.mean()), 0.0), float(np.maximum(per, 0.0).mean())


def clip_score(images: Any, prompts: Any, *, weights: str | os.PathLike | None = None,
               device: str | torch.device | None = None, batch_size: int = 32, num_workers: int | None = None,
               progress: bool = False, _text_layers: int = TEXT_LAYERS, _vision_depth: int | None = None,
               ) -> ClipScoreResult:
    """CLIPScore of the images of ``images`` (any image source: folder, zip, tar shards, ...) against their
    prompts (``prompts.jsonl`` as ``fd-eval prompts`` writes, or a list of ``{"key", "caption"}`` dicts), paired
    by key (:func:`pair_images`).

    ``weights``: a full CLIP ViT-L/14 checkpoint (both towers; default: the official ``openai/clip-vit-large-
    patch14`` safetensors, downloaded once). Raises :class:`ClipDependencyError` without open-clip-torch,
    :class:`fd_eval.errors.InputError` when no image has a prompt.
    """
    _open_clip()  # before any download or decode
    from ..api import compute_stats
    from ..extractors import clip as clip_family
    from ..sources import open_source
    from ..sources.subset import SubsetSource
    from ..util.io_utils import sha256_file_cached

    src = open_source(images)
    by_key, order = read_prompt_map(prompts)
    idx, keys, lonely, missing = pair_images([src.describe(i) for i in range(len(src))], by_key, order)
    if not idx:
        raise InputError(f"{src.spec}: no image matches a prompt key (e.g. image {image_key(src.describe(0))!r}, "
                         f"prompt {order[0] if order else None!r}); name images by the prompt's key or index")
    path = resolve_weights(weights, CLIP_L14_WEIGHTS, "CLIPScore (clip-vitl14)")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    ex = clip_family._build("clip-vitl14", path, dev, {}, _depth=_vision_depth)
    kw = {"num_workers": num_workers} if num_workers is not None else {}
    st = compute_stats(SubsetSource(src, np.asarray(idx)), extractors=[ex], keep_features=True,
                       batch_size=batch_size, progress=progress, device=dev, **kw)["clip-vitl14"]
    tower = load_text_tower(path, layers=_text_layers).to(dev)
    text, truncated = text_embeddings(tower, [by_key[k] for k in keys], device=dev)
    per, tm, clamped = score(torch.from_numpy(np.asarray(st.features)), text)
    prov = {"model": DEFAULT_MODEL, "weights_sha256": sha256_file_cached(path), "image": ex.metadata(),
            "text": {"tower": "open_clip TextTransformer (OpenAI CLIP ViT-L/14)", "context_length": CONTEXT_LENGTH,
                     "truncation": "torchmetrics: [start] + BPE + [end] cut to 77 tokens"},
            "formula": "torchmetrics: max(mean(100 * cos(image, text)), 0)", "images": str(src.spec)}
    return ClipScoreResult(tm, clamped, len(idx), keys, per, lonely, missing,
                           [k for k, t in zip(keys, truncated) if t], prov)
