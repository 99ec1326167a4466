"""CLIP ViT-L/14 image embeddings: parity with transformers and open_clip on random weights, CMMD's preprocessing.

References (test-only): transformers ``CLIPVisionModelWithProjection`` (``image_embeds``, then ``/ norm``, as
torchmetrics' CLIPScore and CMMD use them), open_clip's image tower (OpenAI's module names, QuickGELU), and
google-research cmmd ``io_util._center_crop_and_resize`` written here from its definition (Pillow crop of the
central square with floor division, Pillow bicubic resize), then ``/ 255`` and CLIP's mean/std.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from _clip_models import open_clip_vision, save_hf_vision, save_safetensors
from fd_eval.errors import FDEvalError, WeightsError
from fd_eval.extractors import clip as c
from fd_eval.extractors.preprocess import CLIP_MEAN, CLIP_STD, tensor_to_pil

DEPTH = 2  # the full 24-block tower is in the slow test


def _imgs(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, h, w), dtype=np.uint8))


def cmmd_reference_input(img: Image.Image, size: int) -> np.ndarray:
    """google-research cmmd: _center_crop_and_resize, np.asarray(...).astype(float32) / 255, normalize_image."""
    w, h = img.size
    s = min(w, h)
    top, left = (h - s) // 2, (w - s) // 2
    im = img.crop((left, top, left + s, top + s)).resize((size, size), resample=Image.BICUBIC)
    x = np.asarray(im).astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return x.transpose(2, 0, 1)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return save_hf_vision(tmp_path_factory.mktemp("hfclip"), 336, DEPTH, seed=0)


def _prepared(ex, x: torch.Tensor) -> torch.Tensor:
    return torch.stack([ex.prepare(tensor_to_pil(a)) for a in x])


@pytest.mark.parametrize("hw", [(336, 336), (301, 347), (256, 256)])
def test_matches_transformers_clip_vision_with_projection(hf, hw):
    model, path = hf
    ex = c._build("clip-vitl14-336", path, "cpu", {}, _depth=DEPTH)
    x = _imgs(3, *hw, seed=hw[0])
    got = ex(x)
    inp = ex.model_input(_prepared(ex, x))
    with torch.no_grad():
        ref = model(pixel_values=inp).image_embeds
    ref = ref / ref.norm(dim=-1, keepdim=True)
    assert got.shape == (3, 768) and got.dtype == torch.float32
    assert torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert (got - ref).abs().max().item() < 1e-5


def test_model_input_is_cmmd_reference_preprocessing(hf):
    ex = c._build("clip-vitl14-336", hf[1], "cpu", {}, _depth=DEPTH)
    x = _imgs(2, 301, 348, seed=3)  # odd margin on one side: floor and round crops differ by one pixel
    got = ex.model_input(_prepared(ex, x)).numpy()
    want = np.stack([cmmd_reference_input(tensor_to_pil(a), 336) for a in x])
    assert np.array_equal(got, want)
    # the tensor path (ex(images): crop and Pillow resize from the tensor) gives the same features
    assert torch.equal(ex(x), ex.forward_prepared(_prepared(ex, x)))


def test_open_clip_and_timm_formats(tmp_path):
    tower = open_clip_vision(336, DEPTH, seed=1)
    sd = {f"visual.{k}": v for k, v in tower.state_dict().items()}
    sd["logit_scale"] = torch.tensor(4.6)  # a full CLIP checkpoint's other keys are ignored
    path = save_safetensors(sd, tmp_path / "open_clip_pytorch_model.safetensors")
    ex = c._build("clip-vitl14-336", path, "cpu", {}, _depth=DEPTH)
    x = _imgs(2, 336, 336, seed=5)
    with torch.no_grad():
        ref = tower(ex.model_input(x))
    ref = ref / ref.norm(dim=-1, keepdim=True)
    got = ex(x)
    assert (got - ref).abs().max().item() < 1e-5
    timm_path = save_safetensors(ex.model.vit.state_dict(), tmp_path / "model.safetensors")
    assert c.detect_format(c.load_state_dict(timm_path)) == "timm"
    assert torch.equal(c._build("clip-vitl14-336", timm_path, "cpu", {}, _depth=DEPTH)(x), got)


def test_rows_do_not_depend_on_the_batch(hf):
    ex = c._build("clip-vitl14-336", hf[1], "cpu", {}, _depth=DEPTH)
    x = _imgs(5, 336, 336, seed=7)
    full = ex(x)
    assert torch.equal(torch.cat([ex(x[:2]), ex(x[2:3]), ex(x[3:])]), full)


def test_bad_checkpoints_are_refused(hf, tmp_path):
    _, path = hf
    with pytest.raises(WeightsError, match="clip-vitl14"):  # a 336 checkpoint for the 224 model: names the other
        c._build("clip-vitl14", path, "cpu", {}, _depth=DEPTH)
    ts = tmp_path / "ViT-L-14-336px.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(ts))
    with pytest.raises(WeightsError, match="TorchScript"):
        c._build("clip-vitl14-336", ts, "cpu", {})
    with pytest.raises(FDEvalError, match="no options"):
        c._build("clip-vitl14-336", path, "cpu", {"resize": "torch"})


def test_registered_with_cmmd():
    from fd_eval.extractors import extractor_entry

    e = extractor_entry("clip-vitl14-336")
    assert e.feature_dim == 768 and "cmmd" in e.metrics and e.weights.url.endswith(".safetensors")


@pytest.mark.slow
def test_full_architecture_matches_transformers(tmp_path):
    model, path = save_hf_vision(tmp_path, 336, 24, seed=2)
    ex = c._build("clip-vitl14-336", path, "cpu", {})
    x = _imgs(2, 256, 256, seed=9)
    with torch.no_grad():
        ref = model(pixel_values=ex.model_input(_prepared(ex, x))).image_embeds
    ref = ref / ref.norm(dim=-1, keepdim=True)
    assert (ex(x) - ref).abs().max().item() < 1e-5
