"""The reference registry, verified fetching and loading (fd_eval.outputs.references) and `fd-eval ref`.

A loopback server stands in for the Hub; it serves fake official-format GPIC statistics files made here.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from _fake_hub import FakeHub, point_hf_at
from fd_eval.cli import main
from fd_eval.errors import (
    ChecksumError,
    DownloadError,
    GatedRepoError,
    StatsFormatError,
    StatsMismatchError,
    UnknownReferenceError,
)
from fd_eval.extractors.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec
from fd_eval.outputs import references as refs
from fd_eval.outputs.stats import Stats, compare_stats

REPO = "stanford-vision-lab/gpic"
TEST_FILE = "reference_stats/test_stats.npz"
ACCESS = "https://huggingface.co/datasets/stanford-vision-lab/gpic"
# The dgm-eval protocol as the brief states it, written out independently of the registry file.
DGM_EVAL = PreprocessSpec(resize_library="pil", resize_filter="bicubic", antialias=True, size=(224, 224), scale=255.0,
                          mean=IMAGENET_MEAN, std=IMAGENET_STD, decode="PIL.Image.open(f).convert('RGB')",
                          crop="none", align_corners=False, model_dtype="float32")


def gpic_npz(d: int = 32, n_emb: int = 200, seed: int = 0, n_keys: int = 50) -> tuple[bytes, dict[str, np.ndarray]]:
    """An official-format GPIC statistics file: dino_mu, dino_sigma, dino_embeddings, key, tar_idx."""
    rng = np.random.default_rng(seed)
    # Power-law spectrum, as real features have; mu/sigma independent of the embeddings (a subset in real files).
    a = rng.standard_normal((d, d)) * (np.arange(1, d + 1) ** -0.75)
    arrays = {
        "dino_mu": rng.standard_normal(d),
        "dino_sigma": a @ a.T + 1e-3 * np.eye(d),
        "dino_embeddings": rng.standard_normal((n_emb, d)).astype(np.float32),
        "key": np.array([hashlib.sha256(f"{seed}-{i}".encode()).hexdigest() for i in range(n_keys)]),
        "tar_idx": rng.integers(0, 128, n_keys).astype(np.int64),
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue(), arrays


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with FakeHub() as h:
        point_hf_at(h, monkeypatch, tmp_path / "hf_cache")
        yield h


@pytest.fixture
def official(hub, monkeypatch):
    """The fake Hub serving an official-format test_stats.npz at gpic-test's location (gated; the test's
    HF_TOKEN has access); returns its arrays and sha256."""
    data, arrays = gpic_npz(d=64, n_emb=300)
    hub.add_file(REPO, TEST_FILE, data)
    hub.gated[f"datasets/{REPO}"], hub.token = 401, "hf_ok"
    monkeypatch.setenv("HF_TOKEN", "hf_ok")
    arrays["sha256"] = hashlib.sha256(data).hexdigest()
    return arrays


def _frechet_reference(mu1, s1, mu2, s2) -> float:
    from pytorch_fid.fid_score import calculate_frechet_distance

    return float(calculate_frechet_distance(mu1, s1, mu2, s2))


# --- the built-in registry ---------------------------------------------------------------------------------
def test_builtin_entries():
    test, val = refs.get_reference("gpic-test"), refs.get_reference("gpic-val")
    assert [r.name for r in refs.list_references()][:2] == ["gpic-test", "gpic-val"]
    assert test.location == f"hf://datasets/{REPO}/reference_stats/test_stats.npz"
    assert val.location == f"hf://datasets/{REPO}/reference_stats/val_stats.npz"
    assert (test.n, test.split, test.format, test.sha256) == (1_000_000, "test", "gpic-npz", None)
    assert (val.n, val.split, val.format) == (200_000, "val", "gpic-npz")
    assert test.access_url == ACCESS and test.builtin and test.kind == "hf"
    for ref in (test, val):
        spec = ref.preprocess_spec("dinov2-vitl14")
        assert spec.differences(DGM_EVAL) == ["reference: 'dgm-eval / GPIC toolkit' != ''"]
        assert ref.models["inception-v3-pt"].optional and not ref.models["dinov2-vitl14"].optional
    assert refs.get_reference("gpic-test").preprocess_spec("dinov2") == test.preprocess_spec("dinov2-vitl14")


def test_registry_specs_match_the_extractors():
    """The registry's preprocessing (data) must equal what the extractors record, or every comparison of
    generated statistics with gpic-test would be refused as a mismatch."""
    from fd_eval.extractors import dinov2, inception

    for name in ("gpic-test", "gpic-val"):
        ref = refs.get_reference(name)
        for model, spec in (("dinov2-vitl14", dinov2.preprocess_spec("pil")), ("inception-v3-pt", inception.SPEC_PT)):
            diffs = ref.preprocess_spec(model).differences(spec)
            assert [d for d in diffs if not d.startswith("reference:")] == [], (name, model, diffs)


def test_published_floors():
    f = refs.floor_for("gpic-test", "dinov2-vitl14", 50_000)
    assert (f.fd, f.fd_mean, f.fd_cov) == (7.44, 0.040, 7.404)
    assert round(f.fd_mean + f.fd_cov, 2) == f.fd  # the paper rounds the total to two decimals
    assert refs.floor_for("gpic-test", "dinov2", 200_000).fd == 2.37
    f = refs.floor_for("gpic-test", "inception-v3-pt", 50_000)
    assert (f.fd, f.fd_mean, f.fd_cov) == (0.68, 0.004, 0.678)
    assert refs.floor_for("gpic-test", "inception-v3-pt", 200_000).fd == 0.21
    # Other sample sizes, the TF-lineage Inception ("fid") and the val reference have no published floor.
    assert refs.floor_for("gpic-test", "dinov2-vitl14", 10_000) is None
    assert refs.floor_for("gpic-test", "fid", 50_000) is None
    assert refs.floor_for("gpic-val", "dinov2-vitl14", 50_000) is None


def test_unknown_reference_lists_known_names():
    with pytest.raises(UnknownReferenceError) as e:
        refs.get_reference("gpic-tset")
    assert str(e.value).startswith("unknown reference 'gpic-tset'; known references: gpic-test, gpic-val")


# --- official files from the (fake) Hub ---------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")  # pytorch-fid on SciPy >= 1.16
def test_load_official_format(official, hub):
    st = refs.load_reference("gpic-test")
    d = official["dino_mu"].shape[0]
    assert np.array_equal(st.mu, official["dino_mu"]) and np.array_equal(st.sigma, official["dino_sigma"])
    assert st.n == 1_000_000  # the registry's N: the npz records none, its embeddings may be a subset
    assert np.array_equal(st.features, official["dino_embeddings"]) and st.metadata["features_n"] == 300
    assert np.array_equal(st.extras["key"], official["key"]) and np.array_equal(st.extras["tar_idx"],
                                                                               official["tar_idx"])
    assert st.metadata["extractor"] == "dinov2-vitl14"
    assert PreprocessSpec.from_dict(st.metadata["preprocess"]).differences(DGM_EVAL) == [
        "reference: 'dgm-eval / GPIC toolkit' != ''"]
    assert st.metadata["reference"] == {"name": "gpic-test", "location": f"hf://datasets/{REPO}/{TEST_FILE}",
                                        "sha256": official["sha256"], "split": "test", "n": 1_000_000,
                                        "format": "gpic-npz", "builtin": True}
    assert [(f["n"], f["fd"]) for f in st.metadata["floors"]] == [(50_000, 7.44), (200_000, 2.37)]
    assert "gpic-test" in st.origin

    # Generated statistics made with the same protocol compare; FD 0 against the same numbers.
    gen_meta = {"extractor": "dinov2-vitl14", "preprocess": DGM_EVAL.to_dict()}
    same = Stats(official["dino_mu"], official["dino_sigma"], 50_000, gen_meta)
    res, warnings = compare_stats(same, st)
    assert warnings == [] and abs(res.fd) < 1e-9 * np.trace(official["dino_sigma"])
    # ... and the independently computed FD (pytorch-fid's scipy sqrtm) against other statistics.
    _, other = gpic_npz(d=d, seed=1)
    gen = Stats(other["dino_mu"], other["dino_sigma"], 50_000, gen_meta)
    res, _ = compare_stats(gen, st)
    want = _frechet_reference(other["dino_mu"], other["dino_sigma"], official["dino_mu"], official["dino_sigma"])
    assert res.fd == pytest.approx(want, rel=1e-6) and want > 1.0
    # Statistics made with another resize are refused (the reference carries its protocol).
    torch_resize = {**gen_meta, "preprocess": {**DGM_EVAL.to_dict(), "resize_library": "torch"}}
    with pytest.raises(StatsMismatchError, match="resize_library"):
        compare_stats(Stats(other["dino_mu"], other["dino_sigma"], 50_000, torch_resize), st)


def test_cache_hit_never_touches_network(official, hub, monkeypatch):
    path = refs.fetch_reference("gpic-test", progress=False)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == official["sha256"]
    assert refs.cached_copy("gpic-test") == {"path": path, "sha256": official["sha256"], "size": path.stat().st_size}
    seen = len(hub.requests)
    refs.load_reference("gpic-test")  # online mode, cached: not even a HEAD request
    assert len(hub.requests) == seen
    hub.stop()
    assert np.array_equal(refs.load_reference("gpic-test").mu, official["dino_mu"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert np.array_equal(refs.load_reference("gpic-test").mu, official["dino_mu"])
    assert refs.fetch_reference("gpic-test", offline=True) == path


def test_offline_without_cache(hub, monkeypatch):
    monkeypatch.setenv("FD_EVAL_OFFLINE", "1")
    with pytest.raises(DownloadError) as e:
        refs.load_reference("gpic-test")
    msg = str(e.value)
    assert "offline mode is on" in msg and "`fd-eval ref download gpic-test`" in msg and "\n" not in msg
    monkeypatch.delenv("FD_EVAL_OFFLINE")
    with pytest.raises(DownloadError, match="offline mode is on"):
        refs.fetch_reference("gpic-val", offline=True)
    assert hub.requests == []


@pytest.mark.parametrize("status", [401, 403])
def test_gated_without_access(hub, monkeypatch, status):
    hub.add_file(REPO, TEST_FILE, gpic_npz()[0])
    hub.gated[f"datasets/{REPO}"], hub.token = status, "hf_granted"
    if status == 403:
        monkeypatch.setenv("HF_TOKEN", "hf_not_granted")  # logged in, access not yet granted
    with pytest.raises(GatedRepoError) as e:
        refs.load_reference("gpic-test")
    msg = str(e.value)
    assert msg.startswith("reference 'gpic-test': ") and "\n" not in msg and f"HTTP {status}" in msg
    assert f"request access at {ACCESS}" in msg and "`hf auth login`" in msg and "HF_TOKEN" in msg
    assert refs.cached_path("gpic-test") is None


def test_resume_of_cut_download(official, hub):
    hub.cuts = [80_000]  # of ~110 KB
    path = refs.fetch_reference("gpic-test", progress=False)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == official["sha256"]
    gets = hub.body_gets(TEST_FILE)
    assert len(gets) == 2 and gets[0].range is None and gets[1].range.startswith("bytes=")
    assert 0 < int(gets[1].range[len("bytes="):-1]) <= 80_000


def test_pinned_digest_guards_later_downloads(official, hub, monkeypatch):
    path = refs.fetch_reference("gpic-test", progress=False)
    pinned = refs.cached_copy("gpic-test")["sha256"]
    assert pinned == official["sha256"]
    # The Hub's file changes and the local copy is gone: the new file must not be used silently.
    changed, changed_arrays = gpic_npz(d=64, seed=7)
    hub.add_file(REPO, TEST_FILE, changed)
    refs._discard(path)
    with pytest.raises(ChecksumError, match="was deleted.*pinned at the first download.*--repin") as e:
        refs.fetch_reference("gpic-test", progress=False)
    assert "\n" not in str(e.value)
    assert refs.cached_path("gpic-test") is None and not path.exists()
    # The user accepts the new upstream file explicitly.
    new = refs.fetch_reference("gpic-test", repin=True, progress=False)
    assert refs.cached_copy("gpic-test")["sha256"] == hashlib.sha256(changed).hexdigest()
    assert np.array_equal(refs.load_reference("gpic-test").mu, changed_arrays["dino_mu"])
    assert new.exists()


def test_changed_cached_file_is_rechecked(official, hub):
    path = refs.fetch_reference("gpic-test", progress=False)
    blob = path.resolve()
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF  # damage in place (size unchanged, mtime changes)
    blob.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="was deleted"):
        refs.load_reference("gpic-test")
    assert not blob.exists()
    assert np.array_equal(refs.load_reference("gpic-test").mu, official["dino_mu"])  # downloaded afresh


@pytest.mark.parametrize("damage", ["truncated", "html", "no_dino_keys"])
def test_corrupt_download_is_refused_and_deleted(hub, damage):
    data, _ = gpic_npz()
    bad = {"truncated": data[: len(data) // 2],
           "html": b"<!DOCTYPE html><html>Log in to continue</html>",
           "no_dino_keys": _npz(mu=np.zeros(4), sigma=np.eye(4))}[damage]
    hub.add_file(REPO, TEST_FILE, bad)
    with pytest.raises(StatsFormatError) as e:
        refs.load_reference("gpic-test")
    msg = str(e.value)
    assert "test_stats.npz" in msg and "gpic-test" in msg and "was deleted" in msg and "\n" not in msg
    assert refs.cached_path("gpic-test") is None
    from huggingface_hub import constants as hfc

    assert not [p for p in Path(hfc.HF_HUB_CACHE).rglob("test_stats.npz")]


def test_damaged_array_inside_npz(hub):
    data, arrays = gpic_npz()
    # Flip a byte inside dino_sigma's data: the zip directory is intact, the member's CRC is not.
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = zf.getinfo("dino_sigma.npy")
    bad = bytearray(data)
    bad[info.header_offset + 30 + len(info.filename) + info.compress_size // 2] ^= 0xFF
    hub.add_file(REPO, TEST_FILE, bytes(bad))
    path = refs.fetch_reference("gpic-test", progress=False)
    with pytest.raises(StatsFormatError) as e:
        refs.load_reference("gpic-test")
    assert str(path) in str(e.value) and "--force" in str(e.value) and "\n" not in str(e.value)


def test_model_missing_from_reference(official, hub):
    with pytest.raises(StatsMismatchError, match="no inception-v3-pt statistics .*may not include them"):
        refs.load_reference("gpic-test", model="inception-v3-pt")
    with pytest.raises(StatsMismatchError, match="not 'dinov2-vits14'"):
        refs.load_reference("gpic-test", model="dinov2-vits14")


def _fetch_in_child(barrier, queue) -> None:
    from fd_eval.outputs import references

    barrier.wait()
    try:
        path = references.fetch_reference("gpic-test", progress=False)
        queue.put((str(path), hashlib.sha256(path.read_bytes()).hexdigest()))
    except Exception as e:  # noqa: BLE001
        queue.put(("error", repr(e)))


def test_two_processes_download_at_once(official, hub):
    hub.throttle = 0.1  # ~1 s per transfer, so both processes ask while the first is downloading
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_fetch_in_child, args=(barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
    assert all(p.exitcode == 0 for p in procs)
    assert results[0] == results[1] and results[0][1] == official["sha256"], results
    assert len(hub.body_gets(TEST_FILE)) == 1  # the second waited for the lock and used the first's copy
    from huggingface_hub import constants as hfc

    assert not [p for p in Path(hfc.HF_HUB_CACHE).rglob("*") if "incomplete" in p.name]


# --- user entries --------------------------------------------------------------------------------------------
def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_user_registry_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((40, 8))
    st = Stats.from_features(feats, {"extractor": "dinov2-vits14", "preprocess": DGM_EVAL.to_dict()})
    path = st.save(tmp_path / "imagenet_val.safetensors")
    ref = refs.add_reference("imagenet-val", path, description="ImageNet val", split="val")
    assert (ref.location, ref.n, list(ref.models), ref.builtin) == (str(path.resolve()), 40, ["dinov2-vits14"], False)
    assert ref.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()  # local files are pinned when added
    saved = json.loads(refs.user_registry_path().read_text())
    assert saved["references"]["imagenet-val"]["location"] == str(path.resolve())
    assert [r.name for r in refs.list_references()] == ["gpic-test", "gpic-val", "imagenet-val"]
    loaded = refs.load_reference("imagenet-val", model="dinov2-vits14")
    assert np.array_equal(loaded.mu, st.mu) and np.array_equal(loaded.sigma, st.sigma) and loaded.n == 40
    assert loaded.metadata["reference"]["name"] == "imagenet-val" and loaded.metadata["floors"] == []
    assert compare_stats(st, loaded)[0].fd == pytest.approx(0.0, abs=1e-9)

    with pytest.raises(UnknownReferenceError, match="already exists"):
        refs.add_reference("imagenet-val", path)
    refs.add_reference("imagenet-val", path, n=40, overwrite=True)
    with pytest.raises(UnknownReferenceError, match="built-in"):
        refs.add_reference("gpic-test", path)
    with pytest.raises(UnknownReferenceError, match="built-in"):
        refs.remove_reference("gpic-test")
    with pytest.raises(StatsMismatchError, match="records N = 40, not 41"):
        refs.add_reference("imagenet-val", path, n=41, overwrite=True)
    doc = json.loads(refs.user_registry_path().read_text())  # an entry edited by hand
    doc["references"]["imagenet-val"]["n"] = 41
    refs.user_registry_path().write_text(json.dumps(doc))
    with pytest.raises(StatsMismatchError, match="records N = 40 but the registry entry says N = 41"):
        refs.load_reference("imagenet-val", model="dinov2-vits14")

    assert refs.remove_reference("imagenet-val").name == "imagenet-val"
    with pytest.raises(UnknownReferenceError, match=r"known references: gpic-test, gpic-val\. Add"):
        refs.get_reference("imagenet-val")
    with pytest.raises(UnknownReferenceError, match="unknown reference"):
        refs.remove_reference("imagenet-val")


def test_user_npz_without_extractor_needs_model(tmp_path):
    rng = np.random.default_rng(4)
    a = rng.standard_normal((6, 6))
    path = tmp_path / "fid_stats.npz"
    path.write_bytes(_npz(mu=rng.standard_normal(6), sigma=a @ a.T))
    with pytest.raises(UnknownReferenceError, match="does not record which extractor .* --model"):
        refs.add_reference("cifar", path)
    refs.add_reference("cifar", path, model="inception-v3-pt", n=50_000)
    st = refs.load_reference("cifar", model="inception-v3-pt")
    assert st.n == 50_000 and st.metadata["extractor"] == "inception-v3-pt" and "preprocess" not in st.metadata
    with pytest.raises(StatsMismatchError, match="holds statistics for inception-v3-pt"):
        refs.load_reference("cifar")  # default model dinov2-vitl14


def test_user_local_file_changed_is_not_deleted(tmp_path):
    path = tmp_path / "ref.npz"
    path.write_bytes(_npz(mu=np.zeros(3), sigma=np.eye(3)))
    refs.add_reference("mine", path, model="dinov2-vitl14", n=10)
    refs.load_reference("mine")
    path.write_bytes(_npz(mu=np.ones(3), sigma=np.eye(3)))
    with pytest.raises(ChecksumError, match="changed after it was registered"):
        refs.load_reference("mine")
    assert path.exists()
    path.unlink()
    with pytest.raises(DownloadError, match="does not exist"):
        refs.load_reference("mine")


def test_user_url_entry_verified(hub):
    data, arrays = gpic_npz(seed=5)
    url = hub.add_mirror("imagenet_stats.npz", data)
    refs.add_reference("mirror-bad", url, sha256="ab" * 32, n=1000, format="gpic-npz")
    with pytest.raises(ChecksumError, match="the file was deleted"):
        refs.load_reference("mirror-bad")
    assert not [p for p in Path(os.environ["FD_EVAL_CACHE"]).rglob("imagenet_stats.npz*") if "lock" not in p.name]
    sha = hashlib.sha256(data).hexdigest()
    refs.add_reference("mirror", url, sha256=sha, n=1000, format="gpic-npz")
    st = refs.load_reference("mirror")
    assert np.array_equal(st.mu, arrays["dino_mu"]) and st.n == 1000 and st.metadata["reference"]["sha256"] == sha
    hub.stop()
    assert refs.load_reference("mirror", offline=True).n == 1000


def test_bad_user_registry_file():
    refs.user_registry_path().parent.mkdir(parents=True, exist_ok=True)
    refs.user_registry_path().write_text("{not json")
    with pytest.raises(UnknownReferenceError, match="references.json: not valid JSON"):
        refs.list_references()
    refs.user_registry_path().write_text(json.dumps({"version": 1, "references": {"x": {"location": "a",
                                                                                          "n": -3}}}))
    with pytest.raises(UnknownReferenceError, match="reference 'x': 'n' must be a positive integer"):
        refs.get_reference("x")


# --- the command line -------------------------------------------------------------------------------------
def test_cli_ref_commands(official, hub, tmp_path):
    runner = CliRunner()
    out = runner.invoke(main, ["ref", "list", "--wide"])
    assert out.exit_code == 0, out.output
    row = next(line for line in out.output.splitlines() if line.startswith("gpic-test"))
    assert "dinov2-vitl14, inception-v3-pt?" in row and " 1M " in row and " no " in row
    assert "dinov2-vitl14 7.44@50K 2.37@200K; inception-v3-pt 0.68@50K 0.21@200K" in row
    out = runner.invoke(main, ["ref", "list"])  # the default fits 100 columns: one row per model
    lines = out.output.splitlines()
    assert out.exit_code == 0 and max(map(len, lines)) <= 100, out.output
    i = next(i for i, line in enumerate(lines) if line.startswith("gpic-test"))
    assert lines[i].split() == ["gpic-test", "1M", "no", "dinov2-vitl14", "7.44@50K(s)", "2.37@200K(i)"]
    assert lines[i + 1].split() == ["inception-v3-pt?", "0.68@50K(s)", "0.21@200K(i)"]
    assert "gpic-test: hf://" in out.output and "? after a model: the file may lack" in out.output

    out = runner.invoke(main, ["ref", "download", "gpic-test"])
    assert out.exit_code == 0 and official["sha256"] in out.output, out.output
    out = runner.invoke(main, ["ref", "list", "--json"])
    listed = {r["name"]: r for r in json.loads(out.output)}
    assert listed["gpic-test"]["cached_sha256"] == official["sha256"] and listed["gpic-val"]["cached"] is None
    out = runner.invoke(main, ["ref", "info", "gpic-test"])
    assert out.exit_code == 0 and "floor dinov2-vitl14 N=50000: FD 7.44 (mean 0.04 + cov 7.404)" in out.output
    assert f"cached_sha256: {official['sha256']}" in out.output
    out = runner.invoke(main, ["ref", "download", "gpic-val", "--offline"])
    assert out.exit_code == 1 and out.output.startswith("Error: reference 'gpic-val': ") and "offline" in out.output

    path = tmp_path / "mine.npz"
    path.write_bytes(_npz(mu=np.zeros(3), sigma=np.eye(3)))
    out = runner.invoke(main, ["ref", "add", "mine", str(path), "--model", "inception-v3-pt", "--n", "500",
                               "-d", "my set"])
    assert out.exit_code == 0, out.output
    info = json.loads(runner.invoke(main, ["ref", "info", "mine", "--json"]).output)
    assert (info["n"], info["description"], list(info["models"])) == (500, "my set", ["inception-v3-pt"])
    assert runner.invoke(main, ["ref", "remove", "mine"]).exit_code == 0
    out = runner.invoke(main, ["ref", "info", "mine"])
    assert out.exit_code == 1 and "unknown reference 'mine'" in out.output
