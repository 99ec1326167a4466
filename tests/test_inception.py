"""Inception-v3 FID extractors: exact parity with torch-fidelity (-tf) and pytorch-fid (-pt), the TF1 resize,
checkpoint formats and the download path. Random weights in the release file's format (tests/_inception_utils).
"""
import hashlib
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fd_eval
from _images import photo_crops
from _inception_utils import random_inception_state_dict, save_inception_checkpoint, to_pytorch_fid_module_keys
from fd_eval.errors import ChecksumError, DownloadError, FDEvalError, InputRangeError, WeightsError
from fd_eval.extractors import inception as inc
from fd_eval.extractors.inception import resize_bilinear_tf1, resize_bilinear_torch
from fd_eval.extractors.preprocess import PreprocessSpec
from fd_eval.util.io_utils import sha256_file

SIZES = [(224, 224), (256, 256), (299, 299), (512, 384), (333, 517)]  # (H, W); the last one odd on both axes
# FD on 2048-d features costs two 2048x2048 eigendecompositions (~4 s of CPU): checked at GPIC's 256x256 and at
# the odd size (one upscale, one mixed up/down); features are compared at every size.
FD_SIZES = [(256, 256), (333, 517)]
TOL = 1e-5  # max|diff| / max|feature| and relative FD, float32 on the CPU


# --- shared models (built once: ~1 s each) ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Both fd-eval extractors and both reference models on the same random weights."""
    from pytorch_fid import inception as pfi
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    root = tmp_path_factory.mktemp("inception")
    weights = save_inception_checkpoint(root / "pt_inception-random.pth", seed=0)
    with pytest.MonkeyPatch.context() as mp:  # module fixtures run before conftest's per-test isolation
        mp.setenv("FD_EVAL_CACHE", str(root / "cache"))
        mp.setenv("FD_EVAL_OFFLINE", "1")
        ours_tf = fd_eval.load_extractor("inception-v3-tf", weights=weights)
        ours_pt = fd_eval.load_extractor("inception-v3-pt", weights=weights)
        # pytorch-fid builds its network with the release weights fetched by load_state_dict_from_url.
        sd = torch.load(weights, weights_only=True)
        mp.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: sd)
        ref_pt = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    ref_tf = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    return {"weights": weights, "tf": ours_tf, "pt": ours_pt, "ref_tf": ref_tf.eval(), "ref_pt": ref_pt}


def _nchw(imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(imgs).permute(0, 3, 1, 2)  # a (N, 3, H, W) view of NHWC memory, as users pass


@torch.no_grad()
def _reference_features(models, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(torch-fidelity '2048', pytorch-fid block 3), each fed the way that tool feeds it."""
    ref_tf = models["ref_tf"](x)[0]  # torch-fidelity takes uint8 NCHW
    # pytorch-fid: ToTensor (uint8 HWC -> contiguous float CHW / 255), default-collated into a batch.
    ref_pt = models["ref_pt"](x.contiguous().to(torch.float32).div(255))[0]
    return ref_tf, ref_pt.squeeze(-1).squeeze(-1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _fd(f1: torch.Tensor, f2: torch.Tensor) -> float:
    a, b = f1.double().numpy(), f2.double().numpy()
    return fd_eval.frechet_distance(np.mean(a, 0), np.cov(a, rowvar=False), np.mean(b, 0), np.cov(b, rowvar=False))


# --- parity ------------------------------------------------------------------------------------------------------
class _Captured(Exception):
    pass


def _reference_network_inputs(models, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tensors torch-fidelity and pytorch-fid feed their first conv, without running the network."""
    def grab(first_conv: torch.nn.Module, run) -> torch.Tensor:
        seen = []

        def hook(_module, args):
            seen.append(args[0].clone())
            raise _Captured

        handle = first_conv.register_forward_pre_hook(hook)
        try:
            with torch.no_grad(), pytest.raises(_Captured):
                run()
        finally:
            handle.remove()
        return seen[0]

    ref_tf, ref_pt = models["ref_tf"], models["ref_pt"]
    return (grab(ref_tf.Conv2d_1a_3x3, lambda: ref_tf(x)),
            grab(ref_pt.blocks[0][0], lambda: ref_pt(x.contiguous().to(torch.float32).div(255))))


@pytest.mark.parametrize("hw", SIZES + [(75, 75), (598, 600), (1024, 1024)])
def test_network_input_bit_identical_to_references(models, hw):
    """The resize and scaling reproduce each reference's network input bit for bit (cheap: no network run)."""
    x = _nchw(photo_crops(3, *hw, seed=0))
    ref_tf, ref_pt = _reference_network_inputs(models, x)
    ours_tf, ours_pt = models["tf"].model_input(x), models["pt"].model_input(x)
    assert ours_tf.shape == ours_pt.shape == (3, 3, 299, 299)
    assert torch.equal(ours_tf, ref_tf) and torch.equal(ours_pt, ref_pt)
    assert not torch.allclose(ours_tf, ref_pt, rtol=0, atol=1e-3)  # the lineages differ at every size


@pytest.mark.parametrize("hw", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
@pytest.mark.slow
def test_feature_and_fd_parity_with_references(models, hw):
    """Features and FD equal torch-fidelity's (-tf) and pytorch-fid's (-pt); swapping the lineages would fail."""
    h, w = hw
    x = torch.cat([_nchw(photo_crops(2, h, w, seed=1)), _nchw(photo_crops(2, h, w, seed=2))])  # two sets of 2
    ours_tf, ours_pt = models["tf"](x), models["pt"](x)
    ref_tf, ref_pt = _reference_features(models, x)
    assert ours_tf.dtype == ours_pt.dtype == torch.float32 and ours_tf.shape == (4, 2048)
    spread = (ref_tf - ref_tf.mean(0)).norm(dim=1) / ref_tf.mean(0).norm()
    assert float(spread.min()) > 0.02  # the random network's features do depend on the image

    err_tf, err_pt = _rel(ours_tf, ref_tf), _rel(ours_pt, ref_pt)
    print(f"{h}x{w}: max|diff|/max|f| tf {err_tf:.1e} pt {err_pt:.1e}; tf vs pt {_rel(ours_tf, ours_pt):.1e}")
    assert err_tf <= TOL and err_pt <= TOL
    # The tolerance is far below the lineage gap, so a swapped or mixed-up protocol cannot pass.
    assert _rel(ours_tf, ref_pt) > 100 * TOL and _rel(ours_pt, ref_tf) > 100 * TOL
    if hw not in FD_SIZES:
        return
    fd = {k: (_fd(a[:2], a[2:]), _fd(b[:2], b[2:])) for k, a, b in [("tf", ours_tf, ref_tf), ("pt", ours_pt, ref_pt)]}
    print(f"{h}x{w}: FD (ours, reference) tf {fd['tf']} pt {fd['pt']}")
    for ours, ref in fd.values():
        assert ref > 0 and abs(ours - ref) <= TOL * ref
    assert abs(fd["tf"][0] - fd["pt"][1]) > 100 * TOL * fd["pt"][1]


def test_lineages_differ_even_at_299(models):
    """At 299x299 neither lineage resamples; the scaling alone separates them (0..255 -> [-1, 127/128] vs [-1, 1])."""
    x = _nchw(photo_crops(2, 299, 299, seed=3))
    tf_in, pt_in = models["tf"].model_input(x), models["pt"].model_input(x)
    # (x - 128) / 128 - (2 x / 255 - 1) = -x / 32640: 0 at black, -1/128 at white.
    assert torch.allclose((tf_in - pt_in).double(), -x.double() / 32640, rtol=0, atol=1e-6)
    assert torch.equal(pt_in, 2 * (x.to(torch.float32) / 255) - 1)  # no resampling at 299 (identity)
    assert torch.equal(tf_in, (x.to(torch.float32) - 128) / 128)


def test_batch_composition_and_memory_layout_do_not_change_features(models):
    x = _nchw(photo_crops(2, 256, 256, seed=4))  # a channels-last view
    for name in ("tf", "pt"):
        whole = models[name](x)
        assert torch.equal(models[name](x.contiguous()), whole)  # the network always sees NCHW-contiguous input
        single = torch.cat([models[name](x[i:i + 1]) for i in range(2)])
        assert _rel(single, whole) <= TOL


# --- TF1 resize ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("src,dst", [((224, 224), (299, 299)), ((256, 256), (299, 299)), ((512, 384), (299, 299)),
                                     ((333, 517), (299, 299)), ((299, 299), (299, 299)), ((7, 5), (3, 11)),
                                     ((1, 1), (4, 6)), ((600, 598), (299, 299)), ((32, 32), (299, 299))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tf1_resize_bit_identical_to_torch_fidelity(src, dst, dtype):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = torch.rand(2, 3, *src, generator=torch.Generator().manual_seed(0), dtype=dtype) * 255
    ours = resize_bilinear_tf1(x, dst)
    ref = interpolate_bilinear_2d_like_tensorflow1x(x, size=dst, align_corners=False)
    assert ours.shape == (2, 3, *dst) and torch.equal(ours, ref)


def test_tf1_resize_closed_forms_and_difference_from_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (1, 3, 12, 16), generator=g).float()
    torch_resize = lambda t, s: F.interpolate(t, size=s, mode="bilinear", align_corners=False)  # noqa: E731
    # Same size: both are the identity (the only case where they must agree).
    assert torch.equal(resize_bilinear_tf1(x, (12, 16)), x) and torch.equal(resize_bilinear_torch(x, (12, 16)), x)
    # Integer downscale: TF1 has no half-pixel offset, so it picks every k-th pixel (top-left aligned) ...
    assert torch.equal(resize_bilinear_tf1(x, (6, 8)), x[..., ::2, ::2])
    assert torch.equal(resize_bilinear_tf1(x, (3, 4)), x[..., ::4, ::4])
    # ... where torch's align_corners=False bilinear averages 2x2 blocks.
    assert torch.allclose(torch_resize(x, (6, 8)), F.avg_pool2d(x, 2), atol=1e-4)
    assert not torch.allclose(resize_bilinear_tf1(x, (6, 8)), torch_resize(x, (6, 8)), atol=1)
    # Integer upscale (power of two, so the float32 scale is exact): source pixels land on every k-th output,
    # midpoints in between, and the last source row/column is repeated at the bottom/right border.
    up = resize_bilinear_tf1(x, (24, 32))
    assert torch.equal(up[..., ::2, ::2], x)
    assert torch.equal(up[..., 1:-1:2, ::2], x[..., :-1, :] + (x[..., 1:, :] - x[..., :-1, :]) * 0.5)
    assert torch.equal(up[..., -1, :], up[..., -2, :]) and torch.equal(up[..., :, -1], up[..., :, -2])
    up4 = resize_bilinear_tf1(x, (48, 64))
    assert torch.equal(up4[..., ::4, ::4], x) and torch.equal(up4[..., -4:, -4:], x[..., -1:, -1:].expand_as(
        up4[..., -4:, -4:]))
    # torch's half-pixel centres shift the upscaled image by a quarter pixel: it keeps no source pixel.
    tup = torch_resize(x, (24, 32))
    assert (tup[..., ::2, ::2] - x).abs().max() > 10
    # A constant image stays exactly constant under TF1 (a + (a - a) t == a).
    c = torch.full((1, 3, 37, 41), 117.0)
    assert torch.equal(resize_bilinear_tf1(c, (299, 299)), torch.full((1, 3, 299, 299), 117.0))
    # On photos the two resizes are far apart (not a rounding-level difference).
    p = _nchw(photo_crops(1, 256, 256, seed=5)).float()
    gap = (resize_bilinear_tf1(p, (299, 299)) - torch_resize(p, (299, 299))).abs()
    assert gap.mean() > 0.3 and gap.max() > 10


def test_tf1_resize_rejects_integer_tensors():
    with pytest.raises(InputRangeError, match="float"):
        resize_bilinear_tf1(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), (2, 2))


# --- registry, specs, inputs ---------------------------------------------------------------------------------------
def test_registry_specs_and_metadata(models):
    assert {"inception-v3-tf", "inception-v3-pt"} <= set(fd_eval.list_extractors())
    assert fd_eval.extractors.resolve_name("fid") == "inception-v3-tf"
    tf, pt = models["tf"], models["pt"]
    assert (tf.name, tf.feature_dim, pt.name, pt.feature_dim) == ("inception-v3-tf", 2048, "inception-v3-pt", 2048)
    assert not tf.resizes_on_host and not pt.resizes_on_host
    assert tf.preprocess_spec.resize_library == "tf1" and pt.preprocess_spec.resize_library == "torch"
    assert "torch-fidelity" in tf.preprocess_spec.reference and "pytorch-fid" in pt.preprocess_spec.reference
    for spec in (tf.preprocess_spec, pt.preprocess_spec):
        assert PreprocessSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
        assert (spec.size, spec.antialias, spec.align_corners) == ((299, 299), False, False)
    assert tf.preprocess_spec.differences(pt.preprocess_spec)  # statistics of the two are never mixed
    sha = sha256_file(models["weights"])
    assert tf.weights_sha256 == pt.weights_sha256 == sha and tf.metadata()["weights_sha256"] == sha
    # prepare() leaves the image alone: the resize happens on the device.
    img = fd_eval.extractors.preprocess.tensor_to_pil(_nchw(photo_crops(1, 40, 60, seed=0))[0])
    assert tf.prepare(img).shape == (3, 40, 60)


def test_rejects_bad_inputs_and_options(models):
    with pytest.raises(InputRangeError, match="uint8"):
        models["pt"](torch.rand(1, 3, 64, 64))
    with pytest.raises(InputRangeError, match="uint8"):
        models["tf"].forward_prepared(torch.rand(1, 3, 64, 64))
    with pytest.raises(FDEvalError, match="no options"):
        fd_eval.load_extractor("inception-v3-tf", weights=models["weights"], resize="pil")


# --- checkpoint formats ----------------------------------------------------------------------------------------
def _loaded_tensors(path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in inc.load_inception(path).state_dict().items() if not k.endswith("num_batches_tracked")}


def test_release_file_keys_load_unchanged(tmp_path):
    path = save_inception_checkpoint(tmp_path / "w.pth")
    sd = torch.load(path, weights_only=True)
    assert len(sd) == 566 and sd["fc.weight"].shape == (1008, 2048)  # the release file's layout
    loaded = _loaded_tensors(path)
    assert set(loaded) == {k for k in sd if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}
    assert all(torch.equal(v, sd[k]) for k, v in loaded.items())
    assert all(v.dtype == torch.float32 for v in loaded.values())


def test_torch_fidelity_file_has_the_same_keys(models, tmp_path):
    """torch-fidelity loads the pytorch-fid file strictly; its own state dict saved to disk loads here too."""
    ref_sd = models["ref_tf"].state_dict()
    assert set(ref_sd) == set(torch.load(models["weights"], weights_only=True))
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(ref_sd, path)
    ours = _loaded_tensors(path)
    assert all(torch.equal(v, ref_sd[k]) for k, v in ours.items())


def test_pytorch_fid_module_state_dict_loads(models, tmp_path):
    """A state dict of pytorch-fid's InceptionV3 module (blocks.i.j names, no fc) loads to the same tensors."""
    module_sd = models["ref_pt"].state_dict()
    release = torch.load(models["weights"], weights_only=True)
    assert set(module_sd) == set(to_pytorch_fid_module_keys(release))  # the helper mirrors the real module
    path = tmp_path / "module.pth"
    torch.save(module_sd, path)
    assert inc.checkpoint_format(set(module_sd)) == "pytorch-fid-module"
    ours = _loaded_tensors(path)
    assert all(torch.equal(v, release[k]) for k, v in ours.items())
    helper_path = save_inception_checkpoint(tmp_path / "helper.pth", seed=0, fmt="pytorch-fid-module")
    assert all(torch.equal(v, ours[k]) for k, v in _loaded_tensors(helper_path).items())


def test_optional_counters_safetensors_and_half_precision(tmp_path):
    from safetensors.torch import save_file

    sd = random_inception_state_dict()
    want = _loaded_tensors(save_inception_checkpoint(tmp_path / "ref.pth"))
    no_counters = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save(no_counters, tmp_path / "old.pth")  # files saved by torch < 0.4.1 have no counters
    save_file(no_counters, str(tmp_path / "w.safetensors"))
    for p in (tmp_path / "old.pth", tmp_path / "w.safetensors"):
        got = _loaded_tensors(p)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, tmp_path / "half.pth")
    assert all(v.dtype == torch.float32 for v in _loaded_tensors(tmp_path / "half.pth").values())


@pytest.mark.parametrize("case", ["missing", "unexpected", "aux_logits", "fc_1000", "conv_shape", "not_weights",
                                  "pickle_code", "no_file"])
def test_bad_checkpoints_raise_weights_error_naming_the_file(tmp_path, case):
    sd = random_inception_state_dict()
    path = tmp_path / f"{case}.pth"
    match = None
    if case == "missing":
        del sd["Mixed_6c.branch7x7_2.conv.weight"]
        match = "1 missing.*Mixed_6c.branch7x7_2.conv.weight"
    elif case == "unexpected":
        sd["extra.weight"] = torch.zeros(1)
        match = "1 unexpected.*extra.weight"
    elif case == "aux_logits":  # torchvision's ImageNet Inception3 (aux head)
        sd["AuxLogits.conv0.conv.weight"] = torch.zeros(128, 768, 1, 1)
        match = "unexpected.*AuxLogits"
    elif case == "fc_1000":
        sd["fc.weight"], sd["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
        match = "1008 classes"
    elif case == "conv_shape":
        sd["Conv2d_1a_3x3.conv.weight"] = torch.zeros(32, 3, 5, 5)
        match = "Conv2d_1a_3x3.conv.weight has shape"
    if case == "not_weights":
        path.write_bytes(b"this is not a checkpoint")
    elif case == "pickle_code":
        torch.save({"model": sd, "opt": object.__new__(http.server.HTTPServer)}, path)
        match = "never unpickles"
    elif case != "no_file":
        torch.save(sd, path)
    with pytest.raises(WeightsError, match=match) as e:
        fd_eval.load_extractor("inception-v3-pt", weights=path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


# --- weights download and cache ----------------------------------------------------------------------------------
def test_offline_without_cached_weights_names_url_and_weights_flag():
    with pytest.raises(DownloadError) as e:
        fd_eval.load_extractor("fid")
    msg = str(e.value)
    assert inc.INCEPTION_WEIGHTS.url in msg and "--weights" in msg and "\n" not in msg
    assert inc.INCEPTION_WEIGHTS.url.endswith("/pt_inception-2015-12-05-6726825d.pth")
    assert inc.INCEPTION_WEIGHTS.sha256.startswith("6726825d")


def test_offline_uses_the_cached_file(tmp_path):
    dest = fd_eval.util.io_utils.cache_dir("weights") / inc.INCEPTION_WEIGHTS.filename
    save_inception_checkpoint(dest)
    e = fd_eval.load_extractor("inception-v3-pt")
    assert e.weights_sha256 == sha256_file(dest)
    assert torch.equal(e.model.Conv2d_1a_3x3.conv.weight, random_inception_state_dict()["Conv2d_1a_3x3.conv.weight"])


class _Server:
    """A loopback HTTP server serving one directory, counting requests."""

    def __init__(self, root: Path):
        self.hits = 0
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **k):
                super().__init__(*a, directory=str(root), **k)

            def do_GET(self):  # noqa: N802
                outer.hits += 1
                super().do_GET()

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_download_once_verify_and_record_sha(tmp_path, monkeypatch):
    served = tmp_path / "srv"
    served.mkdir()
    f = save_inception_checkpoint(served / "pt_inception.pth")
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    monkeypatch.delenv("FD_EVAL_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    srv = _Server(served)
    try:
        monkeypatch.setattr(inc, "INCEPTION_WEIGHTS", inc.WeightsSource(
            url=f"{srv.url}/pt_inception.pth", filename="pt_inception-test.pth", sha256=digest[:8]))
        e1 = fd_eval.load_extractor("inception-v3-tf")
        e2 = fd_eval.load_extractor("inception-v3-pt")
        assert srv.hits == 1 and e1.weights_sha256 == e2.weights_sha256 == digest
        cached = fd_eval.util.io_utils.cache_dir("weights") / "pt_inception-test.pth"
        assert cached.read_bytes() == f.read_bytes()
        assert not list(cached.parent.glob("*.part"))
        # A server handing out other bytes: ChecksumError, and nothing is left in the cache.
        monkeypatch.setattr(inc, "INCEPTION_WEIGHTS", inc.WeightsSource(
            url=f"{srv.url}/pt_inception.pth", filename="other.pth", sha256="00000000"))
        with pytest.raises(ChecksumError):
            fd_eval.load_extractor("inception-v3-tf")
        assert not (cached.parent / "other.pth").exists()
    finally:
        srv.close()


def test_weights_digest_is_cached_and_follows_file_changes(tmp_path, monkeypatch):
    path = save_inception_checkpoint(tmp_path / "w.pth")
    calls = []
    real = fd_eval.util.io_utils.sha256_file
    monkeypatch.setattr(fd_eval.util.io_utils, "sha256_file", lambda p: calls.append(p) or real(p))
    a = fd_eval.load_extractor("inception-v3-tf", weights=path).weights_sha256
    fd_eval.util.io_utils._SHA256_MEMO.clear()  # a new process: only the on-disk record remains
    b = fd_eval.load_extractor("inception-v3-tf", weights=path).weights_sha256
    assert a == b == real(path) and len(calls) == 1  # hashed once; the second load read the record
    sd = random_inception_state_dict()
    sd["fc.bias"] += 1
    torch.save(sd, tmp_path / "new.pth")
    (tmp_path / "new.pth").replace(path)  # replaced by rename, same size
    c = fd_eval.load_extractor("inception-v3-tf", weights=path).weights_sha256
    assert c == real(path) != a
