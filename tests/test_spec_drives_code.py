"""The PreprocessSpec an extractor records is what its code runs: every field is read from it.

A changed field (mean, std, scale, filter, antialias) changes the model input by its closed form and changes the
features; unsupported specs fail with one-line errors. (Bit-identity of the registered specs with the reference
pipelines is tested in test_dinov2.py / test_inception.py; benchmarks/feature_digests.py recorded the digests.)
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import fd_eval
from _checkpoints import save_dinov2_checkpoint
from _inception_utils import save_inception_checkpoint
from fd_eval.errors import FDEvalError
from fd_eval.extractors import dinov2 as d


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
    path, _ = save_dinov2_checkpoint(tmp_path_factory.mktemp("spec") / "w.pth", "vits14", "official", seed=0, depth=2)
    return lambda resize="pil": d._build_extractor("vits14", False, weights=path, resize=resize, _depth=2)


def _imgs(h: int, w: int, n: int = 3) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(h * w).integers(0, 256, (n, 3, h, w), dtype=np.uint8))


def test_dinov2_mean_std_scale_come_from_the_spec(dino):
    ex = dino()
    x = _imgs(224, 224)
    base_in, base_f = ex.model_input(x), ex(x)
    ex.preprocess_spec = replace(ex.preprocess_spec, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert torch.equal(ex.model_input(x), x.float() / 255)  # closed form: ToTensor only
    ex.preprocess_spec = replace(ex.preprocess_spec, scale=510.0)
    assert torch.equal(ex.model_input(x), x.float() / 255 / 2)  # halving is exact in floats
    ex.preprocess_spec = replace(d.preprocess_spec("pil"), std=tuple(2 * s for s in d.preprocess_spec("pil").std))
    assert torch.equal(ex.model_input(x), base_in / 2)
    assert not torch.equal(ex(x), base_f)
    ex.preprocess_spec = d.preprocess_spec("pil")
    assert torch.equal(ex(x), base_f)


@pytest.mark.parametrize("resize", ["pil", "torch"])
def test_dinov2_filter_and_antialias_come_from_the_spec(dino, resize):
    ex = dino(resize)
    x = _imgs(300, 257)
    base = ex(x)
    ex.preprocess_spec = replace(ex.preprocess_spec, resize_filter="bilinear", mean=(0.0,) * 3, std=(1.0,) * 3)
    got = ex.model_input(x if resize == "torch" else torch.stack([ex.prepare(Image.fromarray(
        a.permute(1, 2, 0).numpy())) for a in x]))
    if resize == "pil":  # the host step (Pillow) also reads the spec's filter
        want = torch.stack([torch.from_numpy(np.array(Image.fromarray(a.permute(1, 2, 0).numpy()).resize(
            (224, 224), Image.Resampling.BILINEAR))).permute(2, 0, 1) for a in x]).float() / 255
    else:
        want = torch.nn.functional.interpolate(x.float(), (224, 224), mode="bilinear", antialias=True) / 255
    assert torch.equal(got, want)
    ex.preprocess_spec = replace(d.preprocess_spec(resize), resize_filter="bilinear")
    assert not torch.equal(ex(x), base)
    if resize == "torch":
        ex.preprocess_spec = replace(d.preprocess_spec(resize), antialias=False)
        assert not torch.equal(ex(x), base)


def test_dinov2_unsupported_specs_fail_clearly(dino):
    ex = dino()
    for change, msg in ((dict(size=(256, 256)), "size"), (dict(antialias=False), "antialias"),
                        (dict(resize_library="tf1"), "resize library")):
        ex.preprocess_spec = replace(d.preprocess_spec("pil"), **change)
        with pytest.raises(FDEvalError, match=msg):
            ex(_imgs(224, 224))


def test_inception_spec_fields_drive_the_input(tmp_path):
    w = save_inception_checkpoint(tmp_path / "pt_inception.pth", seed=0)
    x = _imgs(320, 280, 2)
    for name in ("inception-v3-pt", "inception-v3-tf"):
        ex = fd_eval.load_extractor(name, weights=str(w))
        base_in, base_f = ex.model_input(x), ex(x)
        spec = ex.preprocess_spec
        ex.preprocess_spec = replace(spec, std=tuple(2 * s for s in spec.std))
        assert torch.equal(ex.model_input(x), base_in / 2)
        assert not torch.equal(ex(x), base_f)
        ex.preprocess_spec = replace(spec, mean=(0.0,) * 3, std=(1.0,) * 3, scale=1.0)
        if name == "inception-v3-pt":
            want = torch.nn.functional.interpolate(x.float(), (299, 299), mode="bilinear", align_corners=False)
            assert torch.equal(ex.model_input(x), want)
            ex.preprocess_spec = replace(spec, antialias=True)
            assert not torch.equal(ex.model_input(x), base_in)
        else:
            ex.preprocess_spec = replace(spec, align_corners=True)
            with pytest.raises(FDEvalError, match="TF1 resize"):
                ex(x)
        ex.preprocess_spec = spec
        assert torch.equal(ex(x), base_f)


def test_resize_mode_short_edge_comes_from_the_spec():
    """resize_mode "short-edge": torchvision Resize(S)'s output size and Pillow's pixels; "exact": size; the
    short-edge mode with a torch resize fails with one line; the default is not written into the record."""
    from fd_eval.extractors.base import apply_spec
    from fd_eval.extractors.sscd import preprocess_spec

    spec = preprocess_spec(288, short_edge=True)
    assert spec.target_size(200, 300) == (288, 432) and spec.target_size(301, 203) == (427, 288)
    assert spec.target_size(288, 432) == (288, 432)  # a resized image maps to itself
    assert spec.to_dict()["resize_mode"] == "short-edge" and "resize_mode" not in preprocess_spec(288).to_dict()
    flat = replace(spec, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), scale=1.0)
    x = _imgs(200, 300, 1)
    pil = Image.fromarray(x[0].permute(1, 2, 0).numpy()).resize((432, 288), Image.BILINEAR)
    want = torch.from_numpy(np.asarray(pil)).permute(2, 0, 1).float()[None]
    assert torch.equal(apply_spec(x, flat), want)
    assert apply_spec(x, replace(flat, resize_mode="exact")).shape == (1, 3, 288, 288)
    with pytest.raises(FDEvalError, match="short-edge' is implemented for Pillow resizes only"):
        apply_spec(x, replace(spec, resize_library="torch"))
