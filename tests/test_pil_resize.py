"""The device Pillow resize (fd_eval.extractors.pil_resize): bit-identical to Pillow, and where the pipeline uses it.

Pillow itself is the reference: every case compares against ``Image.resize`` on the same uint8 pixels.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import fd_eval
from _checkpoints import save_dinov2_checkpoint
from _images import photo_crops, save_images
from fd_eval.errors import FDEvalError
from fd_eval.extractors import pil_resize as pr
from fd_eval.extractors.base import load_extractor

PIL_FILTER = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
# (H, W) -> (h, w): GPIC's 256 -> 224, non-square, upscaling, one axis unchanged, both pass orders
# (Pillow runs the vertical pass first when the height shrinks more than twice as much as the width), extreme
# aspect ratios and large downscales (wide windows).
CASES = [((256, 256), (224, 224)), ((512, 384), (224, 224)), ((100, 37), (224, 224)), ((300, 224), (224, 224)),
         ((224, 300), (224, 224)), ((1000, 50), (224, 224)), ((50, 1000), (224, 224)), ((17, 5), (224, 224)),
         ((256, 256), (299, 299)), ((1024, 1024), (224, 224)), ((225, 223), (224, 224)), ((2000, 300), (224, 224)),
         ((7, 7), (3, 3)), ((640, 480), (480, 640))]


def pillow(x: torch.Tensor, size, filt: str) -> torch.Tensor:
    """Pillow's resize of each uint8 (3, H, W) image -> uint8 (N, 3, h, w)."""
    return torch.stack([torch.from_numpy(np.array(
        Image.fromarray(im.permute(1, 2, 0).numpy()).resize((size[1], size[0]), PIL_FILTER[filt]))).permute(2, 0, 1)
        for im in x])


def hard_images(h: int, w: int, seed: int) -> torch.Tensor:
    """Uniform noise and a 0/255 checkerboard (maximal overshoot of the negative lobes: clipping at 0 and 255)."""
    noise = np.random.default_rng(seed).integers(0, 256, (3, h, w), dtype=np.uint8)
    board = ((np.indices((h, w)).sum(0) % 2) * 255).astype(np.uint8)[None].repeat(3, 0)
    return torch.from_numpy(np.stack([noise, board]))


@pytest.mark.parametrize("filt", ["bicubic", "bilinear"])
@pytest.mark.parametrize("src,dst", CASES)
def test_bit_identical_to_pillow(src, dst, filt):
    x = hard_images(*src, seed=src[0] * 7 + src[1])
    ours = pr.pil_resize_tensor(x, dst, filt, max_bytes=1)  # one image per block: the block loop runs too
    assert ours.dtype == torch.uint8 and ours.shape == (2, 3, *dst)
    assert torch.equal(ours, pillow(x, dst, filt))


def test_photos_and_the_float64_exactness_margin():
    x = torch.from_numpy(photo_crops(6, 256, 256, seed=3)).permute(0, 3, 1, 2).contiguous()
    assert torch.equal(pr.pil_resize_tensor(x, (224, 224)), pillow(x, (224, 224), "bicubic"))
    # every term and partial sum of a pass is an integer of at most 255 * sum|coef| + 2**21: far below 2**53, so
    # float64 sums are exact in any order (on any device); in float32 (2**24) they would not be
    for (h, w), (oh, ow) in CASES:
        for n_in, n_out in ((w, ow), (h, oh)):
            k = pr.coefficients(n_in, n_out, "bicubic")
            bound = 255 * np.abs(k).sum(axis=1).max() + 2 ** 21
            assert 2 ** 24 < bound < 2 ** 40
            if n_in != n_out:  # rows are Pillow's normalised windows: sums within rounding of 2**22
                assert np.abs(k.sum(axis=1) - 2 ** 22).max() <= k.shape[1]


def test_same_size_is_returned_unchanged_and_bad_input_is_refused():
    x = hard_images(8, 8, 0)
    assert pr.pil_resize_tensor(x, (8, 8)) is x
    with pytest.raises(ValueError, match="uint8"):
        pr.pil_resize_tensor(x.float(), (4, 4))
    with pytest.raises(ValueError, match="lanczos"):
        pr.pil_resize_tensor(x, (4, 4), "lanczos")


def test_checked_resize_falls_back_to_pillow_when_the_device_result_differs(monkeypatch):
    pr._checked.clear()
    x = hard_images(40, 30, 1)
    want = pillow(x, (20, 20), "bicubic")
    real = pr.pil_resize_tensor
    monkeypatch.setattr(pr, "pil_resize_tensor", lambda *a, **k: real(*a, **k) ^ 1)  # a broken platform
    with pytest.warns(RuntimeWarning, match="differs from Pillow"):
        assert torch.equal(pr.pil_resize_checked(x, (20, 20)), want)
    assert pr._checked[("cpu", (40, 30), (20, 20), "bicubic")] is False
    assert torch.equal(pr.pil_resize_checked(x, (20, 20)), want)  # from then on Pillow, without a new check
    monkeypatch.setattr(pr, "pil_resize_tensor", real)
    pr._checked.clear()
    assert torch.equal(pr.pil_resize_checked(x, (20, 20)), want)
    assert pr._checked[("cpu", (40, 30), (20, 20), "bicubic")] is True


# --- where the pipeline uses it --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_dinov2_checkpoint(tmp_path_factory.mktemp("w") / "dinov2_vits14_pretrain.pth", "vits14",
                                  "official", seed=5)[0]


def test_placement_policy(ckpt, monkeypatch):
    ex = load_extractor("dinov2-vits14", weights=ckpt)
    assert ex.pil_resize_on == "auto" and ex.resizes_on_host and ex.metadata()["pil_resize_on"] == "host"
    assert ex.host_transform().size == (224, 224)  # the workers resize
    ex.set_precision("fast")
    assert ex.resizes_on_host  # fast on a CPU: Pillow in the workers is the faster resize there
    ex.device = torch.device("cuda", 0)  # the rule only (no GPU here): fast on a GPU resizes on the device
    assert ex.pil_resizes_on_device and not ex.resizes_on_host
    ex.set_precision("exact")
    assert ex.resizes_on_host  # the exact protocol keeps Pillow in the workers unless asked
    ex.device = torch.device("cpu")
    assert ex.set_pil_resize_on("device").pil_resizes_on_device and ex.metadata()["pil_resize_on"] == "device"
    assert ex.host_transform().size is None  # the workers only decode
    torch_ex = load_extractor("dinov2-vits14", weights=ckpt, resize="torch").set_pil_resize_on("device")
    assert not torch_ex.pil_resizes_on_device and "pil_resize_on" not in torch_ex.metadata()
    with pytest.raises(FDEvalError, match="gpu"):
        ex.set_pil_resize_on("gpu")
    monkeypatch.setenv("FD_EVAL_PIL_RESIZE_ON", "device")
    assert load_extractor("dinov2-vits14", weights=ckpt).pil_resize_on == "device"
    monkeypatch.setenv("FD_EVAL_PIL_RESIZE_ON", "sideways")
    with pytest.raises(FDEvalError, match="FD_EVAL_PIL_RESIZE_ON"):
        load_extractor("dinov2-vits14", weights=ckpt)


def test_the_metric_resizes_on_a_gpu_unless_told_otherwise(ckpt):
    from fd_eval.run.pipeline import place_pil_resize

    auto, host = (load_extractor("dinov2-vits14", weights=ckpt) for _ in range(2))
    host.set_pil_resize_on("host")
    place_pil_resize([auto, host], torch.device("cpu"), streaming=True)
    assert auto.pil_resize_on == "auto" and auto.resizes_on_host  # a CPU metric keeps Pillow
    place_pil_resize([auto, host], torch.device("cuda", 0), streaming=True)  # the rule only: no GPU here
    assert auto.pil_resize_on == "device" and host.pil_resize_on == "host"


@pytest.mark.slow
def test_pipeline_and_metric_give_identical_statistics_with_the_device_resize(ckpt, tmp_path):
    # mixed sizes: the device path batches runs of equal size; the host path gets 224x224 from the workers
    arr = [photo_crops(3, 256, 256, seed=8), photo_crops(2, 300, 200, seed=9), photo_crops(3, 256, 256, seed=10)]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(a for block in arr for a in block):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    host = load_extractor("dinov2-vits14", weights=ckpt)
    dev = load_extractor("dinov2-vits14", weights=ckpt).set_pil_resize_on("device")
    kw = dict(num_workers=0, batch_size=4, progress=False)
    a = fd_eval.compute_stats(str(folder), extractors=[host], **kw)["dinov2-vits14"]
    b = fd_eval.compute_stats(str(folder), extractors=[dev], **kw)["dinov2-vits14"]
    assert a.n == b.n == 8
    assert np.array_equal(a.mu, b.mu) and np.array_equal(a.sigma, b.sigma)
    assert a.metadata["pil_resize_on"] == "host" and b.metadata["pil_resize_on"] == "device"
    assert a.metadata["preprocess"] == b.metadata["preprocess"]  # same protocol: comparable without a flag
    # the training-loop metric keeps the batch on its device and gets the same features
    x = torch.from_numpy(arr[0]).permute(0, 3, 1, 2).contiguous()
    assert torch.equal(dev(x), host(x))
    ref = save_images(photo_crops(4, 224, 224, seed=12), tmp_path / "ref")
    ref_stats = fd_eval.compute_stats(str(ref), extractors=[host], **kw)["dinov2-vits14"]
    results = []
    for ex in (host, dev):
        m = fd_eval.FDMetric(extractors=[ex], ref=ref_stats.save(tmp_path / "ref.safetensors"))
        m.update(torch.from_numpy(np.concatenate([arr[0], arr[2]])))
        results.append(m.compute()["results"]["dinov2-vits14"]["fd"])
    assert results[0] == results[1]
