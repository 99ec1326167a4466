"""Statistics files: round trips of every format, pickle refusal, atomic writes, mismatch refusal, CLI."""
import json
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fd_eval
from fd_eval import Stats, StatsFormatError, StatsMismatchError, compare_stats, load_all_stats, load_stats, save_stats
from fd_eval.cli import main
from fd_eval.extractors.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec

SPEC = PreprocessSpec("pil", "bicubic", True, (224, 224), 255.0, IMAGENET_MEAN, IMAGENET_STD)


def _stats(d=16, n=200, seed=0, name="dinov2-vits14", spec=SPEC, features=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    meta = {"extractor": name, "weights_sha256": "ab" * 32, "preprocess": spec.to_dict(),
            "source": {"description": "synthetic"}}
    return Stats.from_features(x, meta, keep_features=features)


def test_safetensors_round_trip_multi_section(tmp_path):
    a, b = _stats(), _stats(d=8, seed=1, name="inception-v3-tf", features=False)
    a.extras["key"] = np.array(["k1", "k2"])
    path = save_stats(tmp_path / "s.safetensors", [a, b])
    got = load_all_stats(path)
    assert sorted(got) == ["dinov2-vits14", "inception-v3-tf"]
    ga = got["dinov2-vits14"]
    np.testing.assert_array_equal(ga.mu, a.mu)
    np.testing.assert_array_equal(ga.sigma, a.sigma)
    np.testing.assert_array_equal(ga.features, a.features)
    assert ga.n == 200 and ga.metadata == a.metadata and ga.preprocess == SPEC
    assert list(ga.extras["key"]) == ["k1", "k2"]
    assert got["inception-v3-tf"].features is None
    with pytest.raises(StatsFormatError, match="choose one"):
        load_stats(path)
    assert load_stats(path, model="inception-v3-tf").dim == 8
    with pytest.raises(StatsMismatchError, match="fd-eval stats"):
        load_stats(path, model="dinov2-vitl14")


def test_gpic_official_npz(tmp_path):
    rng = np.random.default_rng(2)
    emb = rng.standard_normal((300, 32)).astype(np.float32)
    keys = np.array([f"{i:064x}" for i in range(50)])
    np.savez(tmp_path / "test_stats.npz", dino_mu=emb.mean(0).astype(np.float64),
             dino_sigma=np.cov(emb.astype(np.float64), rowvar=False), dino_embeddings=emb,
             key=keys, tar_idx=np.arange(50) % 7)
    s = load_stats(tmp_path / "test_stats.npz")
    assert s.name == "dinov2-vitl14" and s.n == 300
    np.testing.assert_array_equal(s.features, emb)
    assert list(s.extras["key"]) == list(keys) and list(s.extras["tar_idx"]) == list(np.arange(50) % 7)


@pytest.mark.parametrize("writer", ["pytorch-fid", "clean-fid"])
def test_mu_sigma_npz(tmp_path, writer):
    rng = np.random.default_rng(3)
    mu, sigma = rng.standard_normal(8), np.eye(8)
    path = tmp_path / "ref.npz"
    (np.savez if writer == "pytorch-fid" else np.savez_compressed)(path, mu=mu, sigma=sigma)
    s = load_stats(path, model="inception-v3-tf")  # the file does not say which extractor made it
    np.testing.assert_array_equal(s.mu, mu)
    assert s.name == "unknown" and s.metadata.get("n_unknown")


def test_pickles_and_garbage_are_refused(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"mu": torch.zeros(3)}, p)
    with pytest.raises(StatsFormatError, match="never unpickles"):
        load_stats(p)
    p2 = tmp_path / "x.pkl"
    p2.write_bytes(pickle.dumps({"mu": [0.0]}))
    with pytest.raises(StatsFormatError, match="never unpickles"):
        load_stats(p2)
    p3 = tmp_path / "obj.npz"
    np.savez(p3, mu=np.array([object()], dtype=object), sigma=np.eye(1))
    with pytest.raises(StatsFormatError, match="pickled Python objects"):
        load_stats(p3)
    p4 = tmp_path / "junk.safetensors"
    p4.write_bytes(b"not a stats file at all")
    with pytest.raises(StatsFormatError, match=str(p4.name)):
        load_stats(p4)
    p5 = tmp_path / "trunc.safetensors"
    _stats().save(p5)
    p5.write_bytes(p5.read_bytes()[:-100])
    with pytest.raises(StatsFormatError, match="corrupt or truncated"):
        load_stats(p5)


def test_nan_stats_are_refused(tmp_path):
    p = tmp_path / "nan.npz"
    np.savez(p, mu=np.array([np.nan, 0.0]), sigma=np.eye(2))
    with pytest.raises(fd_eval.InvalidStatsError, match="NaN"):
        load_stats(p)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "s.safetensors"
    _stats(seed=0).save(path)
    before = path.read_bytes()
    import safetensors.numpy

    def broken(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.numpy, "save_file", broken)
    with pytest.raises(KeyboardInterrupt):
        _stats(seed=1).save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


def test_mismatched_stats_are_refused_unless_allowed():
    a = _stats()
    torch_spec = PreprocessSpec("torch", "bicubic", True, (224, 224), 255.0, IMAGENET_MEAN, IMAGENET_STD)
    b = _stats(seed=1, spec=torch_spec)
    with pytest.raises(StatsMismatchError, match="resize_library: 'pil' != 'torch'"):
        compare_stats(a, b)
    res, warnings = compare_stats(a, b, allow_mismatch=True)
    assert res.fd > 0 and any("resize_library" in w for w in warnings)
    with pytest.raises(StatsMismatchError, match="extractor"):
        compare_stats(a, _stats(seed=1, name="dinov2-vitb14"))
    with pytest.raises(StatsMismatchError, match="8-d"):
        compare_stats(a, _stats(d=8), allow_mismatch=True)
    # the "reference" label of a spec is not a difference
    relabelled = _stats(seed=1, spec=PreprocessSpec(**{**SPEC.__dict__, "reference": "other words"}))
    compare_stats(a, relabelled)


def test_cli_fd_and_info(tmp_path):
    a, b = _stats(seed=0), _stats(seed=1)
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    out_json = tmp_path / "fd.json"
    r = CliRunner().invoke(main, ["fd", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                                  "--json", str(out_json)])
    assert r.exit_code == 0, r.output
    expected = fd_eval.frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    assert json.loads(out_json.read_text())["result"]["fd"] == expected
    assert f"{expected:.4f}" in r.output
    r = CliRunner().invoke(main, ["info", str(tmp_path / "a.safetensors"), "--json"])
    info = json.loads(r.output)
    assert info["sections"]["dinov2-vits14"]["n"] == 200
    assert info["sections"]["dinov2-vits14"]["preprocess"]["resize_library"] == "pil"
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00" * 64)
    r = CliRunner().invoke(main, ["fd", str(bad), str(tmp_path / "a.safetensors")])
    assert r.exit_code == 1 and "bad.bin" in r.output and r.output.count("\n") == 1


def test_features_can_be_skipped_and_n_still_known(tmp_path):
    emb = np.random.default_rng(4).standard_normal((123, 8)).astype(np.float32)
    np.savez(tmp_path / "g.npz", dino_mu=emb.mean(0), dino_sigma=np.cov(emb, rowvar=False), dino_embeddings=emb)
    s = load_stats(tmp_path / "g.npz", features=False)
    assert s.features is None and s.n == 123
    st = _stats()
    st.save(tmp_path / "a.safetensors")
    assert load_stats(tmp_path / "a.safetensors", features=False).features is None


def test_npz_with_bad_crc_is_a_clear_error(tmp_path):
    p = tmp_path / "crc.npz"
    np.savez(p, mu=np.zeros(64), sigma=np.eye(64))
    raw = bytearray(p.read_bytes())
    i = raw.find(b"\x93NUMPY", raw.find(b"sigma.npy"))
    raw[i + 200] ^= 0xFF  # flip a data byte inside the stored (uncompressed) sigma member
    p.write_bytes(bytes(raw))
    with pytest.raises(StatsFormatError, match="crc.npz"):
        load_stats(p)
