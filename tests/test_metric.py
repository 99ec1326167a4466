"""FDMetric: fed tensors in any chunking it gives `fd-eval compute`'s number on the saved PNGs; float input is
quantised exactly as EDM2 / torchvision save images; checkpoints resume exactly; bad input gets one-line errors."""
import json

import numpy as np
import pytest
import torch
import torchvision.utils
from click.testing import CliRunner
from PIL import Image

import fd_eval
from _checkpoints import save_dinov2_checkpoint
from _images import photo_crops, save_images
from fd_eval.cli import main
from fd_eval.errors import InputError, InputRangeError, StatsMismatchError
from fd_eval.metrics.metric import FDMetric, to_uint8

N = 8  # generated and reference images; most tests use the first 4 (ViT-S/14 on 2 CPU cores is the cost)
MODEL = "dinov2-vits14"


def _cli_fd(gen_dir, ref_file, ckpt, *extra):
    out = gen_dir.parent / f"{gen_dir.name}.json"
    r = CliRunner().invoke(main, [str(a) for a in ("compute", gen_dir, "--ref", ref_file, "-m", MODEL, "--weights",
                                                   ckpt, "--json", out, "-q", "--num-workers", 0, *extra)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric")
    ckpt, _ = save_dinov2_checkpoint(root / "dinov2_vits14_pretrain.pth", "vits14", "official", seed=4)
    gen = np.concatenate([photo_crops(N // 2, 56, 72, seed=1), photo_crops(N // 2, 56, 72, seed=11)])
    ref = photo_crops(N, 64, 64, seed=2)
    exs = fd_eval.load_extractors(MODEL, ckpt, "cpu")
    ref_stats = fd_eval.compute_stats(ref, extractors=exs, num_workers=0, progress=False)[MODEL]
    ref_file = ref_stats.save(root / "ref.safetensors")
    gen_dir = save_images(gen, root / "gen")
    cli = _cli_fd(gen_dir, ref_file, ckpt)
    return {"root": root, "ckpt": ckpt, "gen": gen, "ref": ref, "exs": exs, "ref_stats": ref_stats,
            "ref_file": ref_file, "cli": cli}


def _metric(world, **kw):
    return FDMetric(extractors=world["exs"], ref=world["ref_file"], **kw)


# --- the CLI's number ---------------------------------------------------------------------------------------
def test_uint8_chunks_of_any_size_and_layout_give_the_clis_number(world):
    m = _metric(world)
    x = torch.from_numpy(world["gen"])  # NHWC
    m.update(x[:3])  # NHWC tensor
    m.update(x[3:4].permute(0, 3, 1, 2))  # NCHW tensor
    m.update(world["gen"][4:])  # NHWC numpy array
    m.update(x[:0])  # an empty batch is a no-op
    doc = m.compute()
    cli = world["cli"]
    r, c = doc["results"][MODEL], cli["results"][MODEL]
    assert set(doc) == set(cli) == {"results", "provenance", "warnings", "skipped", "inputs"}
    assert set(r) == set(c) and set(r["diagnostics"]) == set(c["diagnostics"])
    assert r["fd"] == pytest.approx(c["fd"], rel=1e-6) and (r["n"], r["n_ref"]) == (N, N)
    assert r["fd"] == pytest.approx(r["fd_mean"] + r["fd_cov"], rel=1e-12)
    assert doc["provenance"]["extractors"] == cli["provenance"]["extractors"]
    assert doc["provenance"]["generated"]["updates"] == 3 and doc["warnings"] == cli["warnings"]
    assert m.n == N and m.stats()[MODEL].n == N  # compute() keeps the state (more updates may follow)


@pytest.mark.slow
def test_float_minus1_1_equals_cli_on_edm2_saved_pngs(world, tmp_path):
    """[-1, 1] floats (with overshoot, as unclamped samplers give) == the CLI on PNGs saved the EDM2 way."""
    g = torch.Generator().manual_seed(0)
    x = torch.from_numpy(world["gen"][:4]).permute(0, 3, 1, 2).float()
    x = (x - x.min()) / (x.max() - x.min()) * 2.06 - 1.03  # a sampler's output: slightly beyond +-1
    x = x + 0.01 * torch.randn(x.shape, generator=g)  # and off the uint8 grid
    assert x.min() < -1 and x.max() > 1
    edm2 = (x * 127.5 + 128).clip(0, 255).to(torch.uint8)  # EDM2 generate_images.py / StyleGAN
    assert torch.equal(to_uint8(x, (-1, 1)), edm2)
    assert (edm2 != ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)).float().mean() > 0.3  # != ADM's truncation
    cli = _cli_fd(save_images(edm2.permute(0, 2, 3, 1).numpy(), tmp_path / "edm2"), world["ref_file"], world["ckpt"])
    m = _metric(world, value_range=(-1, 1))
    m.update(x[:1])
    m.update(x[1:])
    assert m.compute()["results"][MODEL]["fd"] == pytest.approx(cli["results"][MODEL]["fd"], rel=1e-6)


def test_float_0_1_quantises_like_torchvision_save_image(tmp_path):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 17, 19, generator=g) * 1.04 - 0.02
    x[0, 0, 0, :8] = torch.tensor([0.5 / 255, 1.5 / 255, 127.5 / 255, 254.5 / 255, 0.0, 1.0, -0.01, 1.01])
    for i in range(2):
        torchvision.utils.save_image(x[i], tmp_path / f"{i}.png")
        png = torch.from_numpy(np.array(Image.open(tmp_path / f"{i}.png"))).permute(2, 0, 1)
        assert torch.equal(to_uint8(x[i:i + 1], (0, 1))[0], png)
    # half and bfloat16 values are widened exactly, then quantised like float32
    for dt in (torch.float16, torch.bfloat16):
        assert torch.equal(to_uint8(x.to(dt), (0, 1)), to_uint8(x.to(dt).float(), (0, 1)))


@pytest.mark.slow
def test_torch_resize_is_the_fast_protocol_and_is_refused_against_a_pil_reference(world):
    ex_torch = fd_eval.load_extractors(MODEL, world["ckpt"], "cpu", resize="torch")
    with pytest.raises(StatsMismatchError, match="resize_library"):  # at construction, before any image
        FDMetric(extractors=ex_torch, ref=world["ref_file"])
    m = FDMetric(extractors=ex_torch, ref=world["ref_file"], allow_mismatch=True)
    m.update(torch.from_numpy(world["gen"][:3]))
    doc = m.compute()
    assert any("resize_library" in w for w in doc["warnings"])
    api = fd_eval.compute_fd(world["gen"][:3], world["ref_stats"], MODEL, weights=world["ckpt"], resize="torch",
                             allow_mismatch=True, num_workers=0, progress=False)
    assert doc["results"][MODEL]["fd"] == pytest.approx(api[MODEL]["fd"], rel=1e-6)
    m_pil = _metric(world)
    m_pil.update(torch.from_numpy(world["gen"][:3]))
    fd_torch, fd_pil = doc["results"][MODEL]["fd"], m_pil.compute()["results"][MODEL]["fd"]
    assert abs(fd_torch - fd_pil) > 1e-5 * fd_pil  # the paths differ (the resize is not PIL's)


# --- checkpoints ------------------------------------------------------------------------------------------
def test_state_dict_round_trip_mid_evaluation(world, tmp_path):
    x = torch.from_numpy(world["gen"][:4]).permute(0, 3, 1, 2).float() / 255
    a = _metric(world, value_range=(0, 1))
    a.update(x[:2])
    torch.save(a.state_dict(), tmp_path / "ckpt.pt")
    a.update(x[2:])  # the uninterrupted run
    b = _metric(world, value_range=(0, 1))
    b.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    assert b.n == 2 and b.updates == 1
    b.update(x[2:])
    assert b.compute()["results"][MODEL] == a.compute()["results"][MODEL]  # bit-identical
    with pytest.raises(InputError, match=r"value_range=\(0.0, 1.0\), this metric has \(-1.0, 1.0\)"):
        _metric(world, value_range=(-1, 1)).load_state_dict(a.state_dict())
    with pytest.raises(InputError, match="not an FDMetric state"):
        b.load_state_dict({"n": 3})


def test_deferred_range_error_is_raised_at_compute_and_survives_a_checkpoint(world):
    x = torch.from_numpy(world["gen"][:4]).permute(0, 3, 1, 2).float() / 255
    m = _metric(world, value_range=(0, 1), validate="deferred")
    m.update(x[:2])
    m.update(x[2:] * 2 - 1)  # [-1, 1] data declared as [0, 1]: not caught here (no host sync)
    state = m.state_dict()
    for metric in (m, _metric(world, value_range=(0, 1), validate="deferred")):
        if metric is not m:
            metric.load_state_dict(state)
        with pytest.raises(InputRangeError, match=r"^FDMetric.compute: update #1: values in \[-[\d.]+, [\d.]+\] but "
                                                  r"value_range=\(0, 1\) .*need value_range=\(-1, 1\).*reset\(\)"):
            metric.compute()
    m.reset()
    m.update(x[:2])
    assert m.compute()["results"][MODEL]["n"] == 2


# --- bad input ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eager(world):
    return _metric(world, value_range=(0, 1))


@pytest.mark.parametrize("images,match", [
    (torch.rand(2, 3, 8, 8) * 2 - 1, r"values in \[-\d.*\] but value_range=\(0, 1\) \(tolerance 0.05\): images in "
                                     r"\[-1, 1\] need value_range=\(-1, 1\)"),
    (torch.rand(2, 3, 8, 8) * 255, r"pixel values 0..255 in a float tensor: pass images.round\(\).to\(torch.uint8\)"),
    (torch.rand(2, 3, 8, 8) + 0.5, r"clamp them to the range first"),
    (torch.full((2, 3, 8, 8), float("nan")), "contain NaN or Inf"),
    (torch.tensor([0.0, float("inf")]).repeat(48).reshape(2, 3, 4, 4), "contain NaN or Inf"),
    (torch.zeros(2, 1, 8, 8), r"3 channels.*got shape \(2, 1, 8, 8\); repeat grayscale"),
    (torch.zeros(2, 8, 8, 4, dtype=torch.uint8), r"3 channels.*drop alpha with images\[:, :3\]"),
    (torch.zeros(3, 8, 8), r"4-D batch .* got shape \(3, 8, 8\); add a batch dimension with images\[None\]"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.int64), r"got torch.int64; convert 0..255 integers with images.to"),
    ([np.zeros((8, 8, 3), np.uint8)], "expects a torch.Tensor of images"),
])
def test_bad_inputs_get_one_line_errors(eager, images, match):
    with pytest.raises(InputRangeError, match=match) as e:
        eager.update(images)
    assert "\n" not in str(e.value) and eager.n == 0  # nothing accumulated


def test_float_without_value_range_and_bad_value_ranges(world):
    with pytest.raises(InputRangeError, match=r"got torch.float32 images but the metric has no value_range; build "
                                              r"it with FDMetric\(..., value_range=\(0, 1\)\)"):
        _metric(world).update(torch.rand(2, 3, 8, 8))
    for vr in [(0, 255), (0, 1, 2), "0-1"]:
        with pytest.raises(InputRangeError, match="value_range must be"):
            _metric(world, value_range=vr)
    with pytest.raises(InputRangeError, match="to_uint8 needs value_range"):
        to_uint8(torch.rand(2), None)


def test_small_overshoot_is_clamped_not_an_error(eager):
    x = torch.full((2, 3, 8, 8), 1.04)
    x[:, :, 0] = -0.04
    assert set(to_uint8(x, (0, 1)).unique().tolist()) == {0, 255}
    eager.update(x)  # within the 0.05 tolerance
    assert eager.n == 2
    eager.reset()


def test_zero_to_one_images_declared_minus1_1_are_warned_about(world):
    m = _metric(world, value_range=(-1, 1))
    m.update(torch.from_numpy(world["gen"][:3]).permute(0, 3, 1, 2).float() / 255)
    doc = m.compute()
    assert any("no float value below 0" in w and "value_range=(0, 1)" in w for w in doc["warnings"])


def test_compute_needs_two_images_and_a_reference_for_each_model(world):
    m = _metric(world)
    m.update(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(InputError, match="1 image"):
        m.compute()
    with pytest.raises(StatsMismatchError, match="no statistics for dinov2-vits14"):
        FDMetric(extractors=world["exs"], ref={"dinov2-vitb14": world["ref_stats"]})
