"""CLIPScore: parity with torchmetrics' CLIPScore on the same random CLIP weights; pairing by key; truncation.

torchmetrics (test-only) is given a locally built transformers ``CLIPModel`` (ViT-L/14 shapes, fewer blocks) and
a ``CLIPProcessor`` (Pillow image processor, OpenAI's BPE vocabulary from open_clip); fd-eval reads the same
``model.safetensors``.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import fd_eval
from _clip_models import save_hf_clip
from _images import photo_crops
from fd_eval.errors import InputError
from fd_eval.metrics.clipscore import ClipDependencyError, clip_score, image_key, tokenize

LAYERS = 2
LONG = " ".join(["a very long caption about a red bicycle leaning on a wall"] * 12)  # > 77 tokens


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("clipscore")
    model, proc, weights = save_hf_clip(root / "hf", LAYERS, LAYERS, seed=0)
    imgs = photo_crops(5, 256, 256, seed=4)
    captions = ["a photo of a cat", "a red car on a road", "Two dogs, playing &amp; running!", LONG,
                "an astronaut riding a horse"]
    keys = [f"{i:064x}" for i in range(5)]
    gen = root / "gen"
    gen.mkdir()
    for k, im in zip(keys[:4], imgs[:4]):  # the fifth prompt has no image
        Image.fromarray(im).save(gen / f"{k}.png")
    Image.fromarray(imgs[4]).save(gen / "stray.png")  # an image without a prompt
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"index": i, "key": k, "caption": c}) + "\n"
                               for i, (k, c) in enumerate(zip(keys, captions))))
    return {"root": root, "model": model, "proc": proc, "weights": weights, "imgs": imgs, "captions": captions,
            "keys": keys, "gen": gen, "prompts": prompts}


class Projected(torch.nn.Module):
    """transformers >= 5 returns an output object from get_*_features where torchmetrics 1.9 expects the
    projected tensor (its .pooler_output); this hands torchmetrics that tensor and changes nothing else."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *a, **k):
        out = self.model.get_image_features(*a, **k)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_text_features(self, *a, **k):
        out = self.model.get_text_features(*a, **k)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


def _tm_model(world):
    return lambda: (Projected(world["model"]), world["proc"])


def _torchmetrics(world, n=4):
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=_tm_model(world))
    imgs = [torch.from_numpy(a).permute(2, 0, 1) for a in world["imgs"][:n]]
    metric.update(imgs, world["captions"][:n])
    return float(metric.compute())


def test_equals_torchmetrics_on_the_same_weights(world):
    with pytest.warns(UserWarning, match="truncate"):  # torchmetrics warns about the long caption too
        want = _torchmetrics(world)
    res = clip_score(world["gen"], world["prompts"], weights=world["weights"], num_workers=0,
                     _text_layers=LAYERS, _vision_depth=LAYERS)
    assert res.n == 4 and res.keys == world["keys"][:4]
    assert abs(res.clip_score - want) < 1e-4, (res.clip_score, want)
    # the accounting: one image without a prompt, one prompt without an image, one truncated prompt
    assert [image_key(s) for s in res.images_without_prompt] == ["stray"]
    assert res.prompts_without_image == [world["keys"][4]]
    assert res.truncated_prompts == [world["keys"][3]]
    # per pair: torchmetrics' own per-sample scores (its functional form on one pair at a time)
    from torchmetrics.functional.multimodal import clip_score as tm_clip_score

    for i in (0, 2):
        one = float(tm_clip_score(torch.from_numpy(world["imgs"][i]).permute(2, 0, 1), world["captions"][i],
                                  model_name_or_path=_tm_model(world)))
        assert abs(max(res.per_pair[i], 0) - one) < 1e-4


def test_tokens_are_the_hub_tokenizers(world):
    tok = world["proc"].tokenizer
    got = tokenize(world["captions"])
    for i, c in enumerate(world["captions"]):
        ids = tok(c)["input_ids"][:77]
        assert got.ids[i, :len(ids)].tolist() == ids and not got.ids[i, len(ids):].any()
    assert got.truncated == [False, False, False, True, False]


def test_index_named_images_and_errors(world, tmp_path):
    gen = tmp_path / "by_index"
    gen.mkdir()
    for i in (0, 1):
        Image.fromarray(world["imgs"][i]).save(gen / f"{i:05d}.png")
    res = clip_score(gen, world["prompts"], weights=world["weights"], num_workers=0, _text_layers=LAYERS,
                     _vision_depth=LAYERS)
    assert res.keys == world["keys"][:2] and len(res.prompts_without_image) == 3
    with pytest.raises(InputError, match="no image matches"):
        clip_score(gen, [{"key": "zz", "caption": "x"}], weights=world["weights"])
    with pytest.raises(InputError, match="twice"):
        clip_score(gen, [{"key": "a", "caption": "x"}, {"key": "a", "caption": "y"}], weights=world["weights"])


def test_cli_writes_the_json(world, tmp_path, monkeypatch):
    import functools

    import fd_eval.metrics.clipscore as cs
    from fd_eval.cli import main

    monkeypatch.setattr(cs, "TEXT_LAYERS", LAYERS)
    monkeypatch.setattr(fd_eval.cli.clipscore_cmds, "clip_score",
                        functools.partial(cs.clip_score, _text_layers=LAYERS, _vision_depth=LAYERS))
    out = tmp_path / "s.json"
    r = CliRunner().invoke(main, ["clipscore", str(world["gen"]), "--prompts", str(world["prompts"]), "--weights",
                                  str(world["weights"]), "--json", str(out), "--num-workers", "0"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["n"] == 4 and doc["truncated_prompts"]["count"] == 1 and doc["prompts_without_image"]["count"] == 1
    assert "CLIPScore" in r.output and "1 image(s) without a prompt" in r.output


def test_missing_extra_is_one_line(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "open_clip" or name.startswith("open_clip."):
            raise ImportError("No module named 'open_clip'", name="open_clip")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ClipDependencyError, match=r"fd-eval\[clip\]") as e:
        clip_score("x", [])
    assert "\n" not in str(e.value)


def test_numbers_closed_form():
    from fd_eval.metrics.clipscore import score

    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    per, tm, clamped = score(a, b)
    assert np.allclose(per, [100.0, 0.0]) and tm == 50.0 and clamped == 50.0
    per, tm, clamped = score(a[:1], -b[:1])
    assert tm == 0.0 and per[0] == -100.0
    assert np.isfinite(np.float64(0.5))
