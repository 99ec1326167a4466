"""DINOv2 extractors: parity with the hub model code and transformers, every checkpoint format, weights errors.

References are built independently of fd_eval (tests/_checkpoints.py): the hub ``DinoVisionTransformer`` of
``dinov2==0.0.1.dev2`` fed by the dgm-eval pipeline (PIL ``convert("RGB")``, torchvision ``Resize((224, 224),
BICUBIC)`` on the PIL image, ``ToTensor``, ``Normalize``), transformers' ``Dinov2Model`` /
``Dinov2WithRegistersModel`` read by transformers' own loader, and timm's own checkpoint converter.
"""
from __future__ import annotations

import hashlib
import http.server
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

import fd_eval
from _checkpoints import (
    load_hf_reference,
    official_to_hf,
    random_official_state_dict,
    save_dinov2_checkpoint,
    save_state_dict,
    timm_model,
)
from _images import photo_crops
from fd_eval.errors import DownloadError, FDEvalError, InputRangeError, WeightsError
from fd_eval.extractors import dinov2 as dv
from fd_eval.extractors.base import extractor_entry, load_extractor, resolve_name

SIZES = [(224, 224), (256, 256), (299, 299), (512, 384), (333, 517)]  # (H, W)
TOL = 1e-5  # max|diff| <= TOL * max|feature|; FD relative difference <= TOL

REFERENCE_TRANSFORM = T.Compose([
    T.Resize((224, 224), interpolation=T.InterpolationMode.BICUBIC),
    T.ToTensor(),
    T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
])


# --- helpers -----------------------------------------------------------------------------------------------
def image_sets(per_size: int, sizes=SIZES, seed: int = 0) -> list[np.ndarray]:
    """One uint8 (n, H, W, 3) batch of photo crops per size."""
    return [photo_crops(per_size, h, w, seed=seed + 17 * i) for i, (h, w) in enumerate(sizes)]


def nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def reference_input(a: np.ndarray) -> torch.Tensor:
    """dgm-eval: PIL RGB -> torchvision Resize((224, 224), BICUBIC) on PIL -> ToTensor -> Normalize."""
    return torch.stack([REFERENCE_TRANSFORM(Image.fromarray(im).convert("RGB")) for im in a])


def edm2_input(a: np.ndarray) -> torch.Tensor:
    """EDM2 resize_mode='torch': F.interpolate on float 0..255, bicubic + antialias, /255, normalise."""
    x = F.interpolate(nchw(a).to(torch.float32), size=(224, 224), mode="bicubic", antialias=True)
    x = x.to(torch.float32) / 255
    x = x - torch.tensor([0.485, 0.456, 0.406]).reshape(1, -1, 1, 1)
    return x / torch.tensor([0.229, 0.224, 0.225]).reshape(1, -1, 1, 1)


@torch.no_grad()
def ref_features(ref: torch.nn.Module, batches: list[np.ndarray], make_input=reference_input) -> torch.Tensor:
    return torch.cat([ref(make_input(a)) for a in batches])


def our_features(ex, batches: list[np.ndarray]) -> torch.Tensor:
    return torch.cat([ex(nchw(a)) for a in batches])


def rel_diff(f: torch.Tensor, r: torch.Tensor) -> float:
    return float((f - r).abs().max() / r.abs().max())


def fd(f1: torch.Tensor, f2: torch.Tensor) -> float:
    a, b = f1.double().numpy(), f2.double().numpy()
    return fd_eval.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def fd_rel(ours: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]) -> float:
    a, b = fd(*ours), fd(*ref)
    return abs(a - b) / b


def assert_parity(ours: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]) -> None:
    for f, r in zip(ours, ref):
        assert f.dtype == torch.float32 and f.shape == r.shape
        assert rel_diff(f, r) <= TOL, rel_diff(f, r)
    assert fd_rel(ours, ref) <= TOL, fd_rel(ours, ref)


def hub_rule_pos_embed(hub: torch.nn.Module) -> torch.Tensor:
    """The hub code's own interpolation of its position embedding for a 224x224 input, (1, 257, D)."""
    dim = hub.pos_embed.shape[-1]
    return hub.interpolate_pos_encoding(torch.zeros(1, 257, dim), 224, 224).detach()


def with_hub_rule(hf_ref: torch.nn.Module, hub: torch.nn.Module) -> torch.nn.Module:
    """transformers' Dinov2Model, its position-embedding interpolation replaced by the hub code's result."""
    pos = hub_rule_pos_embed(hub)
    hf_ref.hf.embeddings.interpolate_pos_encoding = lambda emb, h, w: pos
    return hf_ref


@pytest.fixture(scope="module")
def sets() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two image sets, 2 photo crops at each of the five sizes each."""
    return image_sets(2, seed=0), image_sets(2, seed=1000)


@pytest.fixture(scope="module")
def vits14(tmp_path_factory):
    """(official checkpoint path, hub reference) for random ViT-S/14 weights."""
    return save_dinov2_checkpoint(tmp_path_factory.mktemp("w") / "dinov2_vits14_pretrain.pth", "vits14", "official")


@pytest.fixture(scope="module")
def vits14_ref_feats(vits14, sets):
    _, hub = vits14
    return tuple(ref_features(hub, s) for s in sets)


# --- registry ------------------------------------------------------------------------------------------
def test_registry_names_dims_and_urls():
    dims = {"vits14": 384, "vitb14": 768, "vitl14": 1024, "vitg14": 1536}
    for arch, dim in dims.items():
        for reg in (False, True):
            name = f"dinov2-{arch}{'-reg' if reg else ''}"
            assert name in fd_eval.list_extractors()
            assert extractor_entry(name).feature_dim == dim
            src = dv.weights_source(arch, reg)
            assert src.url == (f"https://dl.fbaipublicfiles.com/dinov2/dinov2_{arch}/dinov2_{arch}"
                               f"{'_reg4' if reg else ''}_pretrain.pth")
    assert resolve_name("dinov2") == "dinov2-vitl14"
    assert dv.ARCHS["vitg14"].ffn_hidden == 4096 and dv.ARCHS["vitg14"].swiglu
    with pytest.raises(FDEvalError, match="resize"):
        load_extractor("dinov2-vits14", weights="unused", resize="bilinear")


# --- parity with the hub code ---------------------------------------------------------------------------
@pytest.mark.slow
def test_vits14_matches_hub(vits14, sets, vits14_ref_feats):
    path, hub = vits14
    ex = load_extractor("dinov2-vits14", weights=path)
    assert ex.feature_dim == 384 and ex.preprocess_spec.resize_library == "pil"
    assert ex.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    # The model input is bit-identical to torchvision's, for every size.
    for a in sets[0]:
        prepared = torch.stack([ex.prepare(Image.fromarray(im)) for im in a])
        assert torch.equal(ex.normalize(prepared), reference_input(a))
    ours = tuple(our_features(ex, s) for s in sets)
    assert_parity(ours, vits14_ref_feats)
    for i in range(len(SIZES)):  # per size (2 images each) as well
        assert rel_diff(ours[0][2 * i:2 * i + 2], vits14_ref_feats[0][2 * i:2 * i + 2]) <= TOL


@pytest.mark.slow
def test_vitl14_matches_hub(tmp_path):
    path, hub = save_dinov2_checkpoint(tmp_path / "dinov2_vitl14_pretrain.pth", "vitl14", "official", seed=3)
    ex = load_extractor("dinov2-vitl14", weights=path)
    s1 = [photo_crops(1, 512, 384, seed=1), photo_crops(1, 333, 517, seed=2)]
    s2 = [photo_crops(1, 256, 256, seed=3), photo_crops(1, 299, 299, seed=4)]
    ours = (our_features(ex, s1), our_features(ex, s2))
    ref = (ref_features(hub, s1), ref_features(hub, s2))
    assert ours[0].shape == (2, 1024)
    assert_parity(ours, ref)


# --- parity with transformers ---------------------------------------------------------------------------
@pytest.mark.slow
def test_vits14_hf_checkpoint_matches_transformers(tmp_path, sets, vits14_ref_feats):
    path, hub = save_dinov2_checkpoint(tmp_path / "model.safetensors", "vits14", "hf")  # same seed as `vits14`
    assert dv.detect_format(dv.load_state_dict(path)) == "hf"
    ex = load_extractor("dinov2-vits14", weights=path)
    ours = tuple(our_features(ex, s) for s in sets)
    hf = load_hf_reference(path, "vits14", reg=False)
    hf_own_rule = tuple(ref_features(hf, s) for s in sets)
    hf_hub_rule = tuple(ref_features(with_hub_rule(hf, hub), s) for s in sets)
    assert_parity(ours, hf_hub_rule)
    assert_parity(ours, vits14_ref_feats)
    # transformers >= 4.45 resamples to the exact size: not the hub's numbers (measured: 1.4e-3, FD 1.5e-4).
    assert rel_diff(hf_own_rule[0], vits14_ref_feats[0]) > 50 * TOL
    assert fd_rel(hf_own_rule, vits14_ref_feats) > 5 * TOL


@pytest.mark.slow
def test_vits14_reg_matches_transformers_registers_model(tmp_path, sets):
    # Dinov2WithRegistersModel resamples with size=(16, 16), bicubic, antialias=True: the hub's _reg rule.
    path, ref = save_dinov2_checkpoint(tmp_path / "model.safetensors", "vits14", "hf", seed=5, reg=True)
    ex = load_extractor("dinov2-vits14-reg", weights=path)
    ours = tuple(our_features(ex, s) for s in sets)
    assert_parity(ours, tuple(ref_features(ref, s) for s in sets))


# --- checkpoint formats ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,reg,depth", [("vits14", False, None), ("vits14", True, None), ("vitg14", False, 1),
                                            ("vitg14", True, 1)])
@pytest.mark.slow
def test_checkpoint_formats(tmp_path, arch, reg, depth):
    """official / HF / timm files of the same weights load to identical features equal to the reference's.

    ViT-g is tested at depth 1 (its full width and SwiGLU FFN, not its 1.1B parameters; block indices are
    covered by ViT-S).
    """
    imgs = [photo_crops(1, 256, 256, seed=7), photo_crops(1, 333, 517, seed=8)]
    feats, paths = {}, {}
    for fmt, suffix in (("official", ".pth"), ("hf", ".safetensors"), ("timm", ".safetensors")):
        paths[fmt], ref = save_dinov2_checkpoint(tmp_path / f"{fmt}{suffix}", arch, fmt, seed=11, reg=reg,
                                                 depth=depth)
        assert dv.detect_format(dv.load_state_dict(paths[fmt])) == fmt
        ex = dv._build_extractor(arch, reg, weights=paths[fmt], _depth=depth)
        feats[fmt] = our_features(ex, imgs)
    want = ref_features(ref, imgs)  # hub code (no registers) or transformers' registers model
    assert rel_diff(feats["official"], want) <= TOL
    assert torch.equal(feats["hf"], feats["official"]) and torch.equal(feats["timm"], feats["official"])

    # The timm file is timm's own format: timm loads it strictly into its model.
    timm_sd = dv.load_state_dict(paths["timm"])
    timm_model(arch, reg, depth=depth).load_state_dict(timm_sd, strict=True)

    # The HF file is what transformers reads (its loader splits weights_in into gate/up for SwiGLU); and a
    # transformers>=5 state_dict() (q_proj/k_proj/v_proj/o_proj, gate_proj/up_proj/down_proj) loads too.
    hf = load_hf_reference(paths["hf"], arch, reg, depth)
    if not reg:
        sd, hub = random_official_state_dict(arch, seed=11, depth=depth)
        hf = with_hub_rule(hf, hub)
    assert rel_diff(feats["official"], ref_features(hf, imgs)) <= TOL
    native = save_state_dict(hf.hf.state_dict(), tmp_path / "native.safetensors")
    assert any(".q_proj." in k for k in dv.load_state_dict(native))
    ex = dv._build_extractor(arch, reg, weights=native, _depth=depth)
    assert torch.equal(our_features(ex, imgs), feats["official"])


def test_giant_swiglu_halves_are_not_interchangeable(tmp_path):
    """The giant mapping test can fail: swapping the SwiGLU gate and value halves changes the features."""
    sd, hub = random_official_state_dict("vitg14", seed=2, depth=1)
    for k in [k for k in sd if ".mlp.w12." in k]:
        a, b = sd[k].chunk(2, dim=0)
        sd[k] = torch.cat([b, a])
    path = save_state_dict(sd, tmp_path / "swapped.pth")
    ex = dv._build_extractor("vitg14", False, weights=path, _depth=1)
    imgs = [photo_crops(1, 224, 224, seed=9)]
    assert rel_diff(our_features(ex, imgs), ref_features(hub, imgs)) > 1e-2


# --- position-embedding rule ----------------------------------------------------------------------------
@pytest.mark.slow
def test_pos_embed_rule_is_the_hubs_and_timms_default_is_not(vits14, sets, vits14_ref_feats):
    from timm.layers import resample_abs_pos_embed
    from timm.models.vision_transformer import checkpoint_filter_fn

    path, hub = vits14
    pos37 = hub.pos_embed.detach()[:, 1:]
    ours = dv.resample_pos_embed(pos37, reg=False)
    assert torch.equal(ours, hub_rule_pos_embed(hub)[:, 1:])
    timm_rule = resample_abs_pos_embed(pos37, new_size=(16, 16), num_prefix_tokens=0)
    assert (timm_rule - ours).abs().max() > 0.05 * ours.abs().max()

    # timm's own model with timm's default resampling (checkpoint_filter_fn at img_size=224): FD is off.
    model = timm_model("vits14", reg=False, img_size=224)
    model.load_state_dict(checkpoint_filter_fn(dv.load_state_dict(path), model), strict=True)
    timm_feats = tuple(ref_features(model, s) for s in sets)
    assert rel_diff(timm_feats[0], vits14_ref_feats[0]) > 50 * TOL  # measured 3.1e-3
    assert fd_rel(timm_feats, vits14_ref_feats) > 5 * TOL  # measured 1.5e-4

    # Register models: the hub's _reg rule (exact size, antialiased) is timm's default, and differs from the above.
    reg_rule = dv.resample_pos_embed(pos37, reg=True)
    assert torch.equal(reg_rule, timm_rule)
    assert not torch.allclose(reg_rule, ours)
    # A checkpoint already at the 16x16 grid is used as is (the hub skips interpolation too).
    assert torch.equal(dv.resample_pos_embed(ours, reg=False), ours)


# --- resize="torch" (EDM2) ------------------------------------------------------------------------------
@pytest.mark.slow
def test_torch_resize_matches_edm2_and_differs_from_pil(vits14, sets, vits14_ref_feats):
    path, hub = vits14
    ex = load_extractor("dinov2-vits14", weights=path, resize="torch")
    spec = ex.preprocess_spec
    assert (spec.resize_library, spec.resize_filter, spec.antialias, spec.size) == ("torch", "bicubic", True,
                                                                                     (224, 224))
    assert spec != load_extractor("dinov2-vits14", weights=path).preprocess_spec
    im = Image.fromarray(photo_crops(1, 333, 517)[0])
    assert tuple(ex.prepare(im).shape) == (3, 333, 517)  # resized on the device instead
    ours = tuple(our_features(ex, s) for s in sets)
    edm2 = tuple(ref_features(hub, s, make_input=edm2_input) for s in sets)
    assert_parity(ours, edm2)
    # Not the reference protocol: a small, systematic difference (README documents its size).
    d = rel_diff(ours[0], vits14_ref_feats[0])
    assert 1e-4 < d < 0.1, d


def test_forward_prepared_checks_its_input_and_resizes_like_pillow(vits14, sets):
    ex = load_extractor("dinov2-vits14", weights=vits14[0])
    with pytest.raises(InputRangeError, match="uint8"):
        ex(torch.zeros(1, 3, 224, 224))
    # a 256x256 batch that skipped the host resize is resized on the device with Pillow's integers
    x = nchw(sets[0][1])
    assert not ex.pil_resizes_on_device  # CPU, exact mode: the host path
    assert torch.equal(ex.forward_prepared(x), ex(x))


# --- weights: errors, downloads, digests ------------------------------------------------------------------
def test_missing_unexpected_and_wrong_arch_keys(tmp_path):
    sd, _ = random_official_state_dict("vits14", seed=1)
    missing = dict(sd)
    del missing["blocks.3.ls2.gamma"]
    p = save_state_dict(missing, tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match=r"missing.*blocks\.3\.ls2\.gamma") as e:
        load_extractor("dinov2-vits14", weights=p)
    assert str(p) in str(e.value)

    p = save_state_dict({**sd, "head.weight": torch.zeros(3, 384)}, tmp_path / "unexpected.pth")
    with pytest.raises(WeightsError, match=r"unexpected.*head\.weight") as e:
        load_extractor("dinov2-vits14", weights=p)
    assert str(p) in str(e.value)

    hf = official_to_hf(sd)
    del hf["encoder.layer.5.attention.attention.key.bias"]  # incomplete q/k/v group
    p = save_state_dict(hf, tmp_path / "hf_missing.safetensors")
    with pytest.raises(WeightsError, match=r"blocks\.5\.attn\.qkv\.bias"):
        load_extractor("dinov2-vits14", weights=p)

    p = save_state_dict(sd, tmp_path / "s.pth")
    with pytest.raises(WeightsError, match="shape.*looks like a dinov2-vits14 checkpoint"):
        load_extractor("dinov2-vitb14", weights=p)
    with pytest.raises(WeightsError, match="reg_token.*looks like a dinov2-vits14 checkpoint"):
        load_extractor("dinov2-vits14-reg", weights=p)
    with pytest.raises(WeightsError, match="not found.*--weights"):
        load_extractor("dinov2-vits14", weights=tmp_path / "nope.pth")


class _Payload:
    """Unpickling this calls open(marker, "w"): code execution a weights file must never trigger."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_with_code_is_refused(tmp_path):
    sd, _ = random_official_state_dict("vits14", seed=1)
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pth"
    torch.save({**sd, "evil": _Payload(marker)}, p)
    with pytest.raises(WeightsError, match="never unpickles") as e:
        load_extractor("dinov2-vits14", weights=p)
    assert str(p) in str(e.value)
    assert not marker.exists()


def test_offline_without_cached_weights_names_url_and_flag():
    with pytest.raises(DownloadError) as e:
        load_extractor("dinov2-vitl14")
    msg = str(e.value)
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth" in msg
    assert "--weights" in msg and "\n" not in msg


@pytest.mark.slow
def test_download_from_loopback_server(tmp_path, monkeypatch, vits14, sets, vits14_ref_feats):
    src, _ = vits14
    root = tmp_path / "srv"
    (root / "dinov2_vits14").mkdir(parents=True)
    (root / "dinov2_vits14" / "dinov2_vits14_pretrain.pth").write_bytes(src.read_bytes())
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(dv, "BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.delenv("FD_EVAL_OFFLINE")
        monkeypatch.delenv("HF_HUB_OFFLINE")
        ex = load_extractor("dinov2-vits14")
    finally:
        server.shutdown()
        server.server_close()
    cached = fd_eval.util.io_utils.cache_dir("weights") / "dinov2_vits14_pretrain.pth"
    assert cached.read_bytes() == src.read_bytes()
    assert ex.weights_sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert rel_diff(our_features(ex, sets[0]), vits14_ref_feats[0]) <= TOL
    monkeypatch.setenv("FD_EVAL_OFFLINE", "1")  # server gone, offline: the cached file is used
    assert load_extractor("dinov2-vits14").weights_sha256 == ex.weights_sha256


def test_weights_sha256_is_cached_by_size_and_mtime(tmp_path, monkeypatch):
    import os

    from fd_eval.util import io_utils

    f = tmp_path / "w.bin"
    f.write_bytes(b"abc" * 1000)
    want = hashlib.sha256(f.read_bytes()).hexdigest()
    assert io_utils.sha256_file_cached(f) == want
    assert list(io_utils.cache_dir("sha256").iterdir())

    def boom(path):
        raise AssertionError("rehashed")

    monkeypatch.setattr(io_utils, "sha256_file", boom)
    io_utils._SHA256_MEMO.clear()
    assert io_utils.sha256_file_cached(f) == want  # from the on-disk record
    f.write_bytes(b"abd" * 1000)  # same size; new contents and mtime
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="rehashed"):
        io_utils.sha256_file_cached(f)
