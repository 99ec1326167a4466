"""`fd-eval compute --ci/--bootstrap/--fd-infinity/--prdc/--mmd`: the JSON's per-model "analysis" section equals
direct calls of bootstrap_fd / fd_infinity / prdc / mmd on the same feature rows and seed; a reference without
feature rows fails before any extraction, with a message that names it and the fix."""
import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

import fd_eval
from _checkpoints import save_dinov2_checkpoint
from _images import photo_crops, save_images
from fd_eval.cli import main
from fd_eval.errors import MissingFeaturesError
from fd_eval.metrics.analysis import AnalysisSpec, analyze, check_reference_features

MODEL = "dinov2-vits14"
N_GEN, N_REF = 14, 12


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    ckpt, _ = save_dinov2_checkpoint(root / "dinov2_vits14_pretrain.pth", "vits14", "official", seed=7)
    gen = photo_crops(N_GEN, 96, 96, seed=31)
    gen = (gen.astype(np.float32) * 0.75 + 40).astype(np.uint8)  # a "generator" with a colour cast
    dirs = {}
    for name, arr in (("gen", gen), ("ref", photo_crops(N_REF, 96, 96, seed=32))):
        dirs[name] = save_images(arr, root / name)
    return {"root": root, "ckpt": ckpt, **dirs}


@pytest.fixture(scope="module")
def ref_stats(world):
    """The reference images' statistics with features, as fd-eval computes them (the CLI computes the same)."""
    return fd_eval.compute_stats(world["ref"], MODEL, weights=world["ckpt"], keep_features=True, progress=False,
                                 num_workers=0)[MODEL]


def _assert_same(got, want):
    """JSON record == the direct call's to_dict(), to float rounding (the same rows and seed)."""
    assert set(got) == set(want)
    for k, v in want.items():
        if isinstance(v, str) or v is None or (isinstance(v, list) and all(isinstance(e, str) for e in v)):
            assert got[k] == v, k
        else:
            np.testing.assert_allclose(np.asarray(got[k], dtype=float), np.asarray(v, dtype=float), rtol=1e-12,
                                       atol=0, err_msg=k)


def _cli(*args, code=0):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == code, r.output + repr(r.exception)
    return r


@pytest.mark.slow
def test_analysis_section_equals_direct_calls(world, ref_stats, tmp_path):
    out, saved = tmp_path / "r.json", tmp_path / "gen.safetensors"
    r = _cli("compute", world["gen"], "--ref", world["ref"], "-m", MODEL, "--weights", world["ckpt"], "--json", out,
             "--save-stats", saved, "-q", "--num-workers", 0, "--ci", 0.9, "--bootstrap", 12, "--fd-infinity",
             "--prdc", "--mmd", "--analysis-seed", 7)
    doc = json.loads(out.read_text())
    res = doc["results"][MODEL]
    a = res["analysis"]
    gen = fd_eval.load_stats(saved)  # --save-stats keeps the feature rows the analysis used
    x = gen.features
    assert x.shape == (N_GEN, 384) and x.dtype == np.float32

    b = fd_eval.bootstrap_fd(x, ref_stats, n_boot=12, ci=0.9, seed=7)
    _assert_same(a["bootstrap"], b.to_dict())
    assert (a["bootstrap"]["seed"], a["bootstrap"]["n_boot"], a["bootstrap"]["ci"]) == (7, 12, 0.9)
    assert a["bootstrap"]["fd"] == pytest.approx(res["fd"], rel=1e-9)  # the interval is about the reported FD
    assert a["bootstrap"]["low"] < res["fd"] < a["bootstrap"]["high"]

    inf = fd_eval.fd_infinity(x, ref_stats, seed=7)
    got = a["fd_infinity"]
    assert got["fd_infinity"] == pytest.approx(inf.fd_infinity, rel=1e-9)
    assert got["ns"] == list(inf.ns) and got["seed"] == 7 and got["n_reps"] == inf.n_reps
    _assert_same(got, inf.to_dict())
    assert any("FD-infinity" in w for w in doc["warnings"] + a["warnings"])  # N far below 5 x D

    p = fd_eval.prdc(ref_stats.features, x, nearest_k=5, seed=7)
    assert a["prdc"] == p and a["prdc"]["seed"] == 7 and (p["n_real"], p["n_fake"]) == (N_REF, N_GEN)

    m = fd_eval.mmd(ref_stats.features, x, seed=7)
    assert a["mmd"]["mmd"] == m
    assert a["mmd"]["std"] == pytest.approx(float(fd_eval.mmd_subsets(ref_stats.features, x, seed=7).std()))
    assert (a["mmd"]["seed"], a["mmd"]["subset_size_used"], a["mmd"]["n_subsets"]) == (7, N_REF, 100)
    assert a["mmd"]["gamma"] == 1 / 384

    assert (a["seed"], a["n"], a["n_ref"]) == (7, N_GEN, N_REF)
    header = next(line for line in r.stdout.splitlines() if line.startswith("model") and "precision" in line)
    assert "FD 90% CI" in header and "FD-infinity" in header and "MMD" in header


def test_registry_reference_embeddings_feed_prdc(world, ref_stats, tmp_path):
    """An official-format npz with dino_embeddings: PRDC/MMD use those rows; `--bootstrap` alone means 95%."""
    npz = tmp_path / "test_stats.npz"
    emb = ref_stats.features[::-1].copy()  # distinguishable from the image reference's own row order
    np.savez(npz, dino_mu=ref_stats.mu, dino_sigma=ref_stats.sigma, dino_embeddings=emb)
    _cli("ref", "add", "my-ref", npz, "--model", MODEL, "--n", N_REF)
    out, saved = tmp_path / "r.json", tmp_path / "gen.safetensors"
    _cli("compute", world["gen"], "--ref", "my-ref", "-m", MODEL, "--weights", world["ckpt"], "--json", out,
         "--save-stats", saved, "-q", "--num-workers", 0, "--prdc", "--mmd", "--bootstrap", 5)
    a = json.loads(out.read_text())["results"][MODEL]["analysis"]
    x = fd_eval.load_stats(saved).features
    assert a["prdc"] == fd_eval.prdc(emb, x, seed=0)  # default --analysis-seed 0
    assert a["mmd"]["mmd"] == fd_eval.mmd(emb, x, seed=0)
    assert (a["bootstrap"]["ci"], a["bootstrap"]["n_boot"]) == (0.95, 5) and "fd_infinity" not in a


@pytest.mark.slow
def test_prdc_after_a_plain_run_recomputes_the_reference_features(world, ref_stats, tmp_path):
    """A plain `compute` caches the reference images' statistics without feature rows; a later --prdc run must
    still compare against the reference's rows (recomputed), not fail or use anything else."""
    common = ("-m", MODEL, "--weights", world["ckpt"], "-q", "--num-workers", 0)
    _cli("compute", world["gen"], "--ref", world["ref"], *common)
    (cached,) = fd_eval.util.io_utils.cache_dir("ref_stats").glob("*.safetensors")  # this test's own cache (conftest)
    assert fd_eval.load_stats(cached).features is None  # the premise: cached without feature rows
    out, saved = tmp_path / "r.json", tmp_path / "gen.safetensors"
    _cli("compute", world["gen"], "--ref", world["ref"], *common, "--prdc", "--json", out, "--save-stats", saved)
    a = json.loads(out.read_text())["results"][MODEL]["analysis"]
    assert a["prdc"] == fd_eval.prdc(ref_stats.features, fd_eval.load_stats(saved).features, seed=0)
    # the cache entry was rebuilt with the rows (same moments), so the next --prdc run reads them from it
    rebuilt = fd_eval.load_stats(cached)
    np.testing.assert_array_equal(rebuilt.features, ref_stats.features)
    np.testing.assert_allclose(rebuilt.sigma, ref_stats.sigma, rtol=0, atol=1e-12 * np.abs(ref_stats.sigma).max())


def test_reference_without_features_fails_before_extraction(world, ref_stats, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(fd_eval.api, "compute_stats", lambda *a, **k: calls.append(a))
    no_feats = tmp_path / "ref.safetensors"
    fd_eval.save_stats(no_feats, [ref_stats], include_features=False)
    r = _cli("compute", world["gen"], "--ref", no_feats, "-m", MODEL, "--weights", world["ckpt"], "--prdc", code=1)
    msg = r.output.strip().splitlines()[-1]
    assert msg.startswith("Error: reference ") and str(no_feats) in msg
    assert f"holds no {MODEL} feature rows" in msg and "--keep-features" in msg and "dino_embeddings" in msg

    npz = tmp_path / "test_stats.npz"  # the official layout without the optional dino_embeddings
    np.savez(npz, dino_mu=ref_stats.mu, dino_sigma=ref_stats.sigma)
    _cli("ref", "add", "gpic-like", npz, "--model", MODEL, "--n", N_REF)
    r = _cli("compute", world["gen"], "--ref", "gpic-like", "-m", MODEL, "--weights", world["ckpt"], "--mmd", code=1)
    assert "reference 'gpic-like'" in r.output and "feature rows" in r.output
    assert not calls  # nothing was extracted
    with_feats = tmp_path / "ref_feats.safetensors"
    fd_eval.save_stats(with_feats, [ref_stats])
    check_reference_features(with_feats, MODEL)  # stored rows: passes
    check_reference_features(world["ref"], MODEL)  # an image source: its features will be extracted


def test_analyze_errors_name_the_missing_rows(ref_stats):
    gen = fd_eval.Stats(ref_stats.mu, ref_stats.sigma, ref_stats.n, {"extractor": MODEL})
    with pytest.raises(MissingFeaturesError, match="keep_features=True"):
        analyze(gen, ref_stats, AnalysisSpec(ci=0.95))
    gen.features = ref_stats.features
    bare = fd_eval.Stats(ref_stats.mu, ref_stats.sigma, ref_stats.n, {"extractor": MODEL})
    assert "bootstrap" in analyze(gen, bare, AnalysisSpec(ci=0.95, n_boot=3))  # FD-only: mu/sigma suffice
    with pytest.raises(MissingFeaturesError, match="the reference statistics holds no dinov2-vits14 feature rows"):
        analyze(gen, bare, AnalysisSpec(prdc=True))
    with pytest.raises(MissingFeaturesError):
        check_reference_features(bare, MODEL)
    check_reference_features(ref_stats, MODEL)  # has features: passes
    with pytest.raises(fd_eval.InputError, match="--ci must be a level in"):
        AnalysisSpec(ci=1.5)


@pytest.mark.slow
def test_analyze_result_uses_the_reference_compute_fd_compared_against(world, ref_stats, tmp_path):
    """compute_fd keeps the reference it used (ref_stats), with rows only when asked: the bootstrap needs none,
    PRDC refuses without them, and with ref_features=True analyze_result equals analyze on the same rows."""
    from fd_eval.metrics.analysis import analyze_result

    no_rows = tmp_path / "ref_no_rows.safetensors"
    fd_eval.save_stats(no_rows, [dataclasses.replace(ref_stats, features=None)])
    with_rows = tmp_path / "ref_rows.safetensors"
    fd_eval.save_stats(with_rows, [ref_stats])
    opts = dict(models=MODEL, weights=world["ckpt"], progress=False, num_workers=0, keep_features=True)
    boot = AnalysisSpec(ci=0.9, n_boot=5, seed=3)
    res = fd_eval.compute_fd(world["gen"], no_rows, **opts)
    assert res.ref_stats[MODEL].features is None and res.stats[MODEL].features.shape == (N_GEN, 384)
    got = analyze_result(res, boot)[MODEL]
    _assert_same(got["bootstrap"], analyze(res.stats[MODEL], ref_stats, boot)["bootstrap"])
    with pytest.raises(MissingFeaturesError):
        analyze_result(res, AnalysisSpec(prdc=True))
    res = fd_eval.compute_fd(world["gen"], with_rows, ref_features=True, **opts)
    np.testing.assert_array_equal(res.ref_stats[MODEL].features, ref_stats.features)
    spec = AnalysisSpec(prdc=True, mmd=True, seed=1)
    _assert_same(analyze_result(res, spec)[MODEL]["prdc"], analyze(res.stats[MODEL], ref_stats, spec)["prdc"])
    # keep_features alone does not read the reference's rows (they can be gigabytes: GPIC's 1M embeddings)
    assert fd_eval.compute_fd(world["gen"], with_rows, ref_features=False, **opts).ref_stats[MODEL].features is None
