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


def clip_tokenizer_files(folder: Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt of OpenAI's CLIP BPE, made from the vocabulary open_clip ships (the files of the
    Hub's openai/clip-vit-large-patch14 tokenizer hold the same tables)."""
    import gzip
    import json

    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder / "vocab.json", folder / "merges.txt"


def save_hf_clip(folder: Path, vision_depth: int = 2, text_layers: int = 2, seed: int = 0):
    """A random transformers CLIPModel with OpenAI ViT-L/14's shapes (224 px; eos_token_id=2 as the Hub's OpenAI
    configs, i.e. pooling at the highest token id) and a Pillow CLIPProcessor; returns (model, processor, file)."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    vision = hf_vision_config(224, vision_depth).to_dict()
    text = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=text_layers,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                projection_dim=768, eos_token_id=2, bos_token_id=0, pad_token_id=1)
    torch.manual_seed(seed)
    model = perturb_norms_(CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)).eval(),
                           seed)
    model.save_pretrained(folder, safe_serialization=True)
    vocab, merges = clip_tokenizer_files(Path(folder) / "tokenizer")
    tok = CLIPTokenizer(str(vocab), str(merges), pad_token="<|endoftext|>")
    proc = CLIPProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=tok)
    return model, proc, Path(folder) / "model.safetensors"
