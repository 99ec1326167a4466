"""`fd-eval compute` end to end: the CLI's FD equals an independent reference computation, from every source
format, any worker count and any batch size."""
import json
import tarfile
import zipfile

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

N = 12  # images per set: enough for a non-trivial FD, small enough for ViT-S on 2 CPU cores


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two image sets (gen: mixed sizes, ref: 256x256) and a random ViT-S/14 in the official format."""
    root = tmp_path_factory.mktemp("compute")
    ckpt, hub = save_dinov2_checkpoint(root / "dinov2_vits14_pretrain.pth", "vits14", "official", seed=3)
    gen = np.concatenate([photo_crops(N // 2, 256, 256, seed=1), photo_crops(N // 2, 256, 256, seed=11)])
    ref = photo_crops(N, 256, 256, seed=2)
    dirs = {}
    for name, arr in (("gen", gen), ("ref", ref)):
        dirs[f"{name}_dir"] = save_images(arr, root / name)
    # the same generated images in every other format
    with zipfile.ZipFile(root / "gen.zip", "w") as zf:
        for p in sorted(dirs["gen_dir"].iterdir()):
            zf.write(p, p.name)
    for s in range(2):  # two shards in GPIC's layout: {key}.json + {key}.png
        with tarfile.open(root / f"gen_{s:05d}.tar", "w") as tf:
            for i in range(s * N // 2, (s + 1) * N // 2):
                key = f"{i:064x}"
                tf.add(dirs["gen_dir"] / f"{i:03d}.png", f"{key}.png")
                meta = root / "meta.json"
                meta.write_text(json.dumps({"key": key, "caption": f"image {i}"}))
                tf.add(meta, f"{key}.json")
    np.savez(root / "gen.npz", arr_0=gen)
    np.save(root / "gen.npy", gen)
    return {"root": root, "ckpt": ckpt, "hub": hub, "gen": gen, "ref": ref, **dirs}


def _reference_features(hub, images):
    """dgm-eval / GPIC protocol written independently: PIL RGB -> torchvision Resize((224, 224), BICUBIC) on
    PIL -> ToTensor -> Normalize(ImageNet) -> hub model."""
    tf = T.Compose([T.Resize((224, 224), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    x = torch.stack([tf(Image.fromarray(im).convert("RGB")) for im in images])
    with torch.no_grad():
        return hub(x).double().numpy()


@pytest.fixture(scope="module")
def ref_stats(world):
    """The reference set's statistics, computed once by fd-eval (the FD tests below pass them as `ref`)."""
    return fd_eval.compute_stats(world["ref_dir"], "dinov2-vits14", weights=world["ckpt"], progress=False,
                                 num_workers=0)["dinov2-vits14"]


@pytest.fixture(scope="module")
def expected_fd(world):
    fg, fr = _reference_features(world["hub"], world["gen"]), _reference_features(world["hub"], world["ref"])
    return fd_eval.frechet_distance(fg.mean(0), np.cov(fg, rowvar=False), fr.mean(0), np.cov(fr, rowvar=False))


def _cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r


def test_cli_matches_independent_reference_computation(world, expected_fd, ref_stats, tmp_path):
    out = tmp_path / "res.json"
    saved = tmp_path / "gen.safetensors"
    _cli("compute", world["gen_dir"], "--ref", world["ref_dir"], "-m", "dinov2-vits14", "--weights", world["ckpt"],
         "--json", out, "--save-stats", saved, "--quiet", "--num-workers", 0)
    doc = json.loads(out.read_text())
    r = doc["results"]["dinov2-vits14"]
    assert r["fd"] == pytest.approx(expected_fd, rel=1e-6)
    assert r["fd"] == pytest.approx(r["fd_mean"] + r["fd_cov"], rel=1e-12)
    assert (r["n"], r["n_ref"]) == (N, N)
    prov = doc["provenance"]
    assert prov["extractors"]["dinov2-vits14"]["weights_sha256"] == fd_eval.util.io_utils.sha256_file(world["ckpt"])
    assert prov["extractors"]["dinov2-vits14"]["preprocess"]["resize_library"] == "pil"
    assert prov["reference"]["kind"] == "source" and prov["versions"]["torch"] == torch.__version__
    assert any("not above the feature dimension" in w for w in doc["warnings"])
    # the saved generated statistics reproduce the FD through `fd-eval fd` against the cached reference
    st = fd_eval.load_stats(saved)
    assert st.n == N and st.metadata["source"]["fingerprint"]
    assert fd_eval.compare_stats(st, ref_stats)[0].fd == pytest.approx(expected_fd, rel=1e-6)


@pytest.mark.parametrize("fmt", ["zip", "tar-brace", "tar-glob", "npz", "npy"])
def test_every_source_format_gives_the_same_fd(world, expected_fd, ref_stats, fmt):
    root = world["root"]
    gen = {"zip": root / "gen.zip", "tar-brace": f"{root}/gen_{{00000..00001}}.tar",
           "tar-glob": f"{root}/gen_*.tar", "npz": root / "gen.npz", "npy": root / "gen.npy"}[fmt]
    res = fd_eval.compute_fd(gen, ref_stats, "dinov2-vits14", weights=world["ckpt"], progress=False,
                             num_workers=0, batch_size=5)
    assert res["dinov2-vits14"]["fd"] == pytest.approx(expected_fd, rel=1e-6)


@pytest.mark.parametrize("batch_size,workers", [(1, 0), (7, 2), (64, 1)])
def test_batch_size_and_workers_do_not_change_fd(world, expected_fd, ref_stats, batch_size, workers):
    res = fd_eval.compute_fd(world["gen_dir"], ref_stats, "dinov2-vits14", weights=world["ckpt"], progress=False,
                             num_workers=workers, batch_size=batch_size)
    assert res["dinov2-vits14"]["fd"] == pytest.approx(expected_fd, rel=1e-6)


def test_loader_items_smaller_than_the_model_batch_are_joined_exactly(world, monkeypatch):
    """On a GPU the workers hand over 32-image items that the runner joins into model batches; forced here on
    the CPU with 5-image items and 8-image model batches: full batches of 8, a short last one, the same bits."""
    ex = fd_eval.load_extractors("dinov2-vits14", world["ckpt"], "cpu")[0]
    kw = dict(extractors=[ex], progress=False, num_workers=1, batch_size=8)
    whole = fd_eval.compute_stats(world["gen_dir"], **kw)["dinov2-vits14"]
    sizes, real = [], ex.forward_input

    def spy(x):
        sizes.append(x.shape[0])
        return real(x)

    monkeypatch.setattr(ex, "forward_input", spy)
    monkeypatch.setattr(fd_eval.run.pipeline, "loader_chunk", lambda bs, dev: 5)
    joined = fd_eval.compute_stats(world["gen_dir"], **kw)["dinov2-vits14"]
    assert sizes == [8, N - 8]
    assert joined.n == whole.n == N
    assert np.array_equal(joined.mu, whole.mu) and np.array_equal(joined.sigma, whole.sigma)


@pytest.mark.slow
def test_reference_source_statistics_are_cached(world, monkeypatch):
    kw = dict(weights=world["ckpt"], progress=False, num_workers=0)
    first = fd_eval.compute_fd(world["gen_dir"], world["ref_dir"], "dinov2-vits14", **kw)
    calls = []
    real = fd_eval.api.compute_stats
    monkeypatch.setattr(fd_eval.api, "compute_stats", lambda *a, **k: calls.append(k) or real(*a, **k))
    second = fd_eval.compute_fd(world["gen_dir"], world["ref_dir"], "dinov2-vits14", **kw)
    assert len(calls) == 1  # the generated set only; the reference came from the cache
    assert second["dinov2-vits14"]["fd"] == first["dinov2-vits14"]["fd"]


@pytest.mark.slow
def test_num_and_seed_select_deterministic_subsets(world):
    kw = dict(weights=world["ckpt"], progress=False, num_workers=0)
    a = fd_eval.compute_stats(world["gen_dir"], "dinov2-vits14", num=6, seed=0, **kw)["dinov2-vits14"]
    b = fd_eval.compute_stats(world["gen_dir"], "dinov2-vits14", num=6, seed=0, **kw)["dinov2-vits14"]
    c = fd_eval.compute_stats(world["gen_dir"], "dinov2-vits14", num=6, seed=1, **kw)["dinov2-vits14"]
    first = fd_eval.compute_stats(world["gen_dir"], "dinov2-vits14", num=6, **kw)["dinov2-vits14"]
    fg = _reference_features(world["hub"], world["gen"][:6])
    np.testing.assert_allclose(first.mu, fg.mean(0), rtol=0, atol=1e-5 * np.abs(fg).max())
    assert np.array_equal(a.mu, b.mu) and not np.allclose(a.mu, c.mu)
    assert a.n == 6 and a.metadata["source"]["seed"] == 0


@pytest.mark.slow
def test_gpic_official_npz_reference(world, expected_fd, tmp_path):
    """A fake official-format test_stats.npz registered under a name: compute --ref NAME gives the FD."""
    fr = _reference_features(world["hub"], world["ref"])
    npz = tmp_path / "test_stats.npz"
    np.savez(npz, dino_mu=fr.mean(0), dino_sigma=np.cov(fr, rowvar=False), key=np.array(["a" * 64] * 3),
             tar_idx=np.arange(3))
    _cli("ref", "add", "my-ref", npz, "--model", "dinov2-vits14", "--n", N)
    out = tmp_path / "r.json"
    _cli("compute", world["gen_dir"], "--ref", "my-ref", "-m", "dinov2-vits14", "--weights", world["ckpt"], "--json",
         out, "-q", "--num-workers", 0)
    r = json.loads(out.read_text())["results"]["dinov2-vits14"]
    assert r["fd"] == pytest.approx(expected_fd, rel=1e-6) and r["n_ref"] == N
