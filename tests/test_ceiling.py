"""`fd-eval ceiling`: real images against the reference (GPIC Table 2: the subset's statistics against the
reference's) and split-half real vs real, each equal to an independent computation with the hub model."""
import json

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from click.testing import CliRunner
from PIL import Image

import fd_eval
from _checkpoints import save_dinov2_checkpoint
from _images import photo_crops, save_images
from fd_eval.cli import main
from fd_eval.outputs import references as refs

N_REAL, N_REF = 14, 12
MODEL = "dinov2-vits14"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ceiling")
    ckpt, hub = save_dinov2_checkpoint(root / "dinov2_vits14_pretrain.pth", "vits14", "official", seed=5)
    real = photo_crops(N_REAL, 96, 96, seed=21)
    ref = photo_crops(N_REF, 96, 96, seed=22)
    real_dir = save_images(real, root / "real")
    # dgm-eval / GPIC protocol written independently: PIL bicubic to 224, ToTensor, Normalize, hub model
    tf = T.Compose([T.Resize((224, 224), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def feats(images):
        with torch.no_grad():
            return hub(torch.stack([tf(Image.fromarray(im).convert("RGB")) for im in images])).double().numpy()

    f_real, f_ref = feats(real), feats(ref)
    npz = root / "test_stats.npz"  # an official-format reference file made from the hub features
    np.savez(npz, dino_mu=f_ref.mean(0), dino_sigma=np.cov(f_ref, rowvar=False))
    return {"root": root, "ckpt": ckpt, "real_dir": real_dir, "f_real": f_real, "f_ref": f_ref, "npz": npz}


def _fd(a, b):
    return fd_eval.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def _register(name, npz, floors):
    """A user registry entry with published floors (the schema of the built-in gpic-test entry)."""
    entry = {"description": "tiny stand-in for GPIC Test-1M", "location": str(npz), "format": "gpic-npz",
             "split": "test", "n": N_REF, "sha256": None, "models": {MODEL: {}}, "floors": {MODEL: floors}}
    path = refs.user_registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "references": {name: entry}}))


def _cli(*args, code=0):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == code, r.output + repr(r.exception)
    return r


def test_ceiling_is_the_subset_statistics_against_the_reference(world, tmp_path):
    floors = [{"n": 8, "fd": 123.4, "fd_mean": 1.4, "fd_cov": 122.0, "label": "Test-8 vs Test-12",
               "source": "made up for this test"},
              {"n": 10, "fd": 99.0, "label": "Val-10 vs Test-12", "source": "made up for this test"}]
    _register("gpic-tiny", world["npz"], floors)
    out = tmp_path / "c.json"
    r = _cli("ceiling", "--ref", "gpic-tiny", "--real", world["real_dir"], "-n", 8, "--seed", 3, "-m", MODEL,
             "--weights", world["ckpt"], "--json", out, "-q", "--num-workers", 0)
    # independently: the documented sample (RandomState(seed).permutation(N)[:n], sorted) against the reference
    idx = np.sort(np.random.RandomState(3).permutation(N_REAL)[:8])
    expected = _fd(world["f_real"][idx], world["f_ref"])
    doc = json.loads(out.read_text())
    res = doc["results"][MODEL]
    assert doc["mode"] == "reference"
    assert res["fd"] == pytest.approx(expected, rel=1e-6)
    assert res["fd"] == pytest.approx(res["fd_mean"] + res["fd_cov"], rel=1e-12)
    assert (res["n"], res["n_ref"]) == (8, N_REF)
    assert (res["floor"], res["floor_fd_mean"], res["floor_fd_cov"]) == (123.4, 1.4, 122.0)  # the floor at N = 8
    assert [f["n"] for f in res["floors"]] == [8, 10] and res["floors"][1]["label"] == "Val-10 vs Test-12"
    real = doc["provenance"]["real"]
    assert (real["n"], real["num"], real["seed"]) == (8, 8, 3) and "RandomState(seed)" in real["sampling"]
    assert doc["provenance"]["reference"]["name"] == "gpic-tiny"
    assert "123.40" in r.stdout and "123.4 at N=8 (Test-8 vs Test-12), 99 at N=10 (Val-10 vs Test-12)" in r.stdout
    assert "--transform center-crop-256" in r.output  # a gpic-* reference without the GPIC image transform
    # the npz holds no image keys and the real images are another source: the overlap cannot be told
    assert res["overlap"] == {"relation": None, "method": None, "in_reference": None, "n": None}
    assert "overlap: cannot tell whether the real images are part of gpic-tiny" in r.stdout


def test_split_half_is_the_fd_between_two_disjoint_halves(world, tmp_path):
    out = tmp_path / "s.json"
    r = _cli("ceiling", "--split-half", "--real", world["real_dir"], "--seed", 4, "-m", MODEL, "--weights",
             world["ckpt"], "--json", out, "-q", "--num-workers", 0)
    n = N_REAL // 2  # default: min(50,000, half the source)
    perm = np.random.RandomState(4).permutation(N_REAL)
    a, b = np.sort(perm[:n]), np.sort(perm[n:2 * n])
    assert not set(a) & set(b)
    doc = json.loads(out.read_text())
    res = doc["results"][MODEL]
    assert doc["mode"] == "split-half"
    assert res["fd"] == pytest.approx(_fd(world["f_real"][a], world["f_real"][b]), rel=1e-6)
    assert (res["n"], res["n_ref"], res["floor"], res["floors"]) == (n, n, None, [])
    assert res["overlap"] == {"relation": "independent", "method": "split", "in_reference": 0, "n": n}
    real = doc["provenance"]["real"]
    assert (real["n"], real["n_a"], real["n_b"], real["seed"], real["total"]) == (n, n, n, 4, N_REAL)
    assert "FD half a vs b" in r.stdout
    # half a is what `--num n --seed s` selects elsewhere in fd-eval
    from fd_eval.metrics.ceiling import split_indices

    ia, ib = split_indices(N_REAL, n, 4)
    src = fd_eval.open_source(world["real_dir"])
    assert np.array_equal(ia, src.subset(n, seed=4).indices) and np.array_equal(ib, b)


def test_ceiling_input_errors(world):
    r = _cli("ceiling", "--split-half", "--ref", world["npz"], "--real", world["real_dir"], code=2)
    assert "drop --ref" in r.output
    r = _cli("ceiling", "--split-half", "--real", world["real_dir"], "-n", 8, "-m", MODEL, "--weights",
             world["ckpt"], code=1)
    assert "needs 2 x 8 = 16 images but the source holds 14; lower -n to at most 7" in r.output
    assert str(world["real_dir"]) in r.output
    r = _cli("ceiling", "--ref", world["npz"], "--real", world["real_dir"], "-m", MODEL, "--weights",
             world["ckpt"], "-q", code=1)  # default -n 50,000
    assert "asked for 50000 images but the source holds 14" in r.output
