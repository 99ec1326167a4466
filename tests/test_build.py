"""Resumable, shard-parallel `fd-eval stats`: killed, resumed and multi-process builds give bit-identical statistics
to an uninterrupted run, equal to an independent computation; resumes with other settings or data are refused."""
import functools
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from click.testing import CliRunner

import fd_eval
import fd_eval.extractors.dinov2 as dv
import fd_eval.metrics.build as build
import fd_eval.run.engine as engine
from _checkpoints import save_dinov2_checkpoint
from _gpic_shards import gpic_sample, make_shards, write_shard
from _images import photo_crops
from fd_eval.cli import main
from fd_eval.errors import BadImageError, CheckpointError
from fd_eval.metrics.build import build_stats, plan_units

N_SHARDS, PER_SHARD = 4, 3
N = N_SHARDS * PER_SHARD
MODEL = "dinov2-vits14"
BS = 2  # units of 3 images run as batches of 2 + 1: a short last batch in every unit
DEPTH = 2  # ViT-S/14 with 2 of its 12 blocks: the real architecture, ~6x cheaper per image
# the real `fd-eval` command line in a subprocess, with the shallow network (see _shallow_cli.py)
CLI = [sys.executable, str(Path(__file__).with_name("_shallow_cli.py")), str(DEPTH)]


def _extractor(weights, **kw):
    return dv._build_extractor("vits14", False, weights=weights, _depth=DEPTH, **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    ckpt, hub = save_dinov2_checkpoint(root / "dinov2_vits14_pretrain.pth", "vits14", "official", seed=3,
                                       depth=DEPTH)
    images = photo_crops(N, 64, 64, seed=7)
    shards, samples = make_shards(root / "shards", images, PER_SHARD)
    spec = str(root / "shards" / "gpic_test_{00000..00003}.tar")
    ex = _extractor(ckpt)
    return {"root": root, "ckpt": ckpt, "hub": hub, "images": images, "shards": shards, "samples": samples,
            "spec": spec, "ex": ex}


def _build(world, out, **kw):
    kw.setdefault("extractors", [world["ex"]])
    return build_stats(kw.pop("spec", world["spec"]), out, batch_size=BS, num_workers=kw.pop("num_workers", 0),
                       progress=False, **kw)


@pytest.fixture(scope="module")
def serial(world):
    """The uninterrupted single-process build every other run must reproduce bit for bit."""
    out = world["root"] / "serial" / "stats.safetensors"
    return _build(world, out)[MODEL]


def _reference_features(hub, samples):
    """dgm-eval / GPIC protocol written independently: decoded RGB -> Resize((224, 224), BICUBIC) on PIL ->
    ToTensor -> Normalize(ImageNet) -> hub model."""
    tf = T.Compose([T.Resize((224, 224), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    x = torch.stack([tf(s.decoded()) for s in samples])
    with torch.no_grad():
        return hub(x).double().numpy()


def _same(a, b):
    assert a.n == b.n
    assert np.array_equal(a.mu, b.mu) and np.array_equal(a.sigma, b.sigma)


def _interrupt_after(monkeypatch, k):
    """Simulate Ctrl-C right after the k-th unit file is saved; returns the list of saved unit paths."""
    real, saved = engine.save_unit_file, []

    def save(path, header, tensors, *meta_key):
        real(path, header, tensors, *meta_key)
        saved.append(Path(path))
        if len(saved) == k:
            raise KeyboardInterrupt

    monkeypatch.setattr(engine, "save_unit_file", save)  # the unit engine writes every unit file
    return saved


def _units(ck):
    return sorted(p.name for p in Path(ck).glob("unit-*.safetensors"))


# --- correctness -------------------------------------------------------------------------------------------
def test_build_from_gpic_shards_matches_independent_features(world, serial):
    f = _reference_features(world["hub"], world["samples"])
    scale = np.abs(f).max()
    np.testing.assert_allclose(serial.mu, f.mean(0), rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(serial.sigma, np.cov(f, rowvar=False), rtol=0, atol=1e-5 * scale**2)
    assert serial.n == N
    src = serial.metadata["source"]
    assert src["build"]["units"] == N_SHARDS and src["build"]["kind"] == "tar-shards"
    assert src["build"]["resumed_units"] == 0 and src["fingerprint"] == fd_eval.open_source(world["spec"]).fingerprint()
    out_dir = world["root"] / "serial"
    assert sorted(os.listdir(out_dir)) == ["stats.safetensors"]  # checkpoint folder removed, no temp files
    _same(fd_eval.load_stats(out_dir / "stats.safetensors"), serial)


def test_loader_items_smaller_than_the_model_batch_give_the_same_units(world, serial, tmp_path, monkeypatch):
    """1-image loader items (GPU-style items smaller than the model batch) joined per unit: same bits."""
    monkeypatch.setattr(fd_eval.run.pipeline, "loader_chunk", lambda bs, dev: 1)
    _same(_build(world, tmp_path / "s.safetensors")[MODEL], serial)


def test_plan_units_per_shard_blocks_and_selection(world):
    src = fd_eval.open_source(world["spec"])
    plan = plan_units(src)
    assert [len(u) for u in plan.units] == [PER_SHARD] * N_SHARDS
    assert [u.label for u in plan.units] == [str(p) for p in world["shards"]]
    split = plan_units(src, checkpoint_every=2)
    assert [len(u) for u in split.units] == [2, 1] * N_SHARDS and "(samples 2..2)" in split.units[1].label
    assert np.array_equal(np.concatenate([u.indices for u in split.units]), np.arange(N))
    sub = plan_units(src, num=5, seed=0)  # a random 5 of 12, grouped by the shard each lies in
    assert np.array_equal(np.concatenate([u.indices for u in sub.units]), src.subset(5, seed=0).indices)
    # fingerprints are per shard: equal for the same shard's data in another plan
    assert split.units[0].fingerprint != split.units[1].fingerprint
    arr = fd_eval.open_source(world["images"])
    blocks = plan_units(arr, checkpoint_every=5)
    assert [len(u) for u in blocks.units] == [5, 5, 2] and blocks.kind == "blocks"


def test_keep_features_over_folder_blocks(world, tmp_path):
    """A non-tar source in blocks of --checkpoint-every images; features come back in source order."""
    d = tmp_path / "imgs"
    d.mkdir()
    for i, s in enumerate(world["samples"]):
        (d / f"{i:03d}.{s.ext}").write_bytes(s.data)
    res = _build(world, tmp_path / "f.safetensors", spec=d, checkpoint_every=5, keep_features=True)[MODEL]
    f = _reference_features(world["hub"], world["samples"])
    assert res.metadata["source"]["build"]["units"] == 3
    np.testing.assert_allclose(res.features, f, rtol=0, atol=1e-5 * np.abs(f).max())
    x = res.features.astype(np.float64)
    np.testing.assert_allclose(res.mu, x.mean(0), rtol=0, atol=1e-12 * np.abs(x).max())
    np.testing.assert_allclose(res.sigma, np.cov(x, rowvar=False), rtol=0, atol=1e-10 * np.abs(x).max() ** 2)
    assert fd_eval.load_stats(tmp_path / "f.safetensors").features.shape == (N, 384)


# --- resume --------------------------------------------------------------------------------------------------
def test_interrupted_then_resumed_is_bit_identical(world, serial, tmp_path, monkeypatch):
    out = tmp_path / "o" / "stats.safetensors"
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _build(world, out, num_workers=1)  # decode workers feed all units through one loader
    ck = build.default_checkpoint_dir(out)
    assert not out.exists() and _units(ck) == ["unit-000000.safetensors", "unit-000001.safetensors"]
    assert not [p for p in ck.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    saved = _interrupt_after(monkeypatch, 99)
    res = _build(world, out)[MODEL]
    assert [p.name for p in saved] == ["unit-000002.safetensors", "unit-000003.safetensors"]  # only the rest
    assert res.metadata["source"]["build"]["resumed_units"] == 2
    _same(res, serial)
    assert not ck.exists() and sorted(os.listdir(out.parent)) == ["stats.safetensors"]


def _cli_args(world, out, *extra):
    return ["stats", world["spec"], "-o", str(out), "-m", MODEL, "--weights", str(world["ckpt"]),
            "--batch-size", str(BS), "--num-workers", "0", *extra]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=["SIGKILL", "SIGINT", "SIGTERM"])
@pytest.mark.slow
def test_killed_cli_run_resumes_bit_identically(world, serial, tmp_path, sig, monkeypatch):
    """SIGKILL ends the process on the spot; SIGINT (Ctrl-C) and SIGTERM (a job scheduler's stop) are an orderly
    stop: exit status 128 + the signal, one line, no temp file. The same command then resumes bit-identically."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "stats.safetensors"
    ck = build.default_checkpoint_dir(out)
    # the CLI process signals itself right after its first unit file is saved (_shallow_cli.py): deterministic
    env = {**os.environ, "FD_EVAL_TEST_SIGNAL_AFTER_UNITS": f"1:{sig.name}"}
    proc = subprocess.run([*CLI, *_cli_args(world, out, "-q")], capture_output=True, env=env, timeout=600)
    err = proc.stderr
    assert proc.returncode == (-sig if sig == signal.SIGKILL else 128 + sig), (proc.returncode, err)
    done = _units(ck)
    assert done == ["unit-000000.safetensors"], "the kill must land after exactly one unit"
    assert not out.exists() and os.listdir(out_dir) == [ck.name]  # nothing beside the output
    if sig != signal.SIGKILL:  # an orderly stop also removes its temp files and says how to resume
        assert not [p for p in ck.iterdir() if p.name.endswith(".tmp")]
        assert b"run the same command again to resume" in err and b"Traceback" not in err
        assert err.decode().strip().splitlines()[-1] == (f"Error: interrupted ({sig.name}); nothing half-written "
                                                         "was left")
    monkeypatch.setattr(dv, "_build_extractor", functools.partial(dv._build_extractor, _depth=DEPTH))
    r = CliRunner().invoke(main, _cli_args(world, out))  # resumed in this process
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert f"{len(done)} resumed" in r.output and f"resuming from {ck}" in r.output
    _same(fd_eval.load_stats(out), serial)
    assert os.listdir(out_dir) == ["stats.safetensors"]


# --- parallel ------------------------------------------------------------------------------------------------
def test_ranks_split_units_and_rank0_merges(world, serial, tmp_path):
    """The protocol in one process: rank 0 does units 0, 2 and waits; rank 1 does 1, 3; rank 0 merges."""
    out = tmp_path / "stats.safetensors"
    with pytest.raises(CheckpointError, match=r"units \[1, 3\] missing .*run the same command again"):
        _build(world, out, rank=0, world_size=2, wait_timeout=0)
    assert _units(build.default_checkpoint_dir(out)) == ["unit-000000.safetensors", "unit-000002.safetensors"]
    assert _build(world, out, rank=1, world_size=2) is None and not out.exists()
    res = _build(world, out, rank=0, world_size=2)[MODEL]
    _same(res, serial)
    assert res.metadata["source"]["build"]["resumed_units"] == N_SHARDS


@pytest.mark.slow
def test_two_processes_by_env_equal_serial(world, serial, tmp_path):
    """Two `fd-eval stats` processes with RANK/WORLD_SIZE (no process group, no store) share one folder."""
    out = tmp_path / "stats.safetensors"
    procs = [subprocess.Popen([*CLI, *_cli_args(world, out, "-q")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2",
                                                           "LOCAL_RANK": str(r)})
             for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert b"rank 1 of 2: computed 2 unit(s)" in outs[1][1]
    res = fd_eval.load_stats(out)
    _same(res, serial)
    assert res.metadata["source"]["build"]["world_size"] == 2


@pytest.mark.slow
def test_torchrun_gloo_resume_equals_serial(world, serial, tmp_path):
    """torchrun with an initialised gloo process group, resuming a run whose rank 0 finished its share (units 0
    and 2): the ranks agree on the units left and split them evenly, meet at a barrier, rank 0 writes the file."""
    out = tmp_path / "stats.safetensors"
    with pytest.raises(CheckpointError, match="missing"):
        _build(world, out, rank=0, world_size=2, wait_timeout=0)
    script = tmp_path / "run.py"
    script.write_text(
        "import functools, sys, torch.distributed as dist\n"
        "import fd_eval.extractors.dinov2 as dv\n"
        "from fd_eval.metrics.build import build_stats\n"
        f"dv._build_extractor = functools.partial(dv._build_extractor, _depth={DEPTH})\n"
        "dist.init_process_group('gloo')\n"
        "res = build_stats(sys.argv[1], sys.argv[2], 'dinov2-vits14', weights=sys.argv[3], batch_size=2,\n"
        "                  num_workers=0, progress=False, log=print)\n"
        "print('rank', dist.get_rank(), 'result', res is not None)\n"
        "dist.destroy_process_group()\n")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), world["spec"], str(out), str(world["ckpt"])],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "rank 0 result True" in p.stdout and "rank 1 result False" in p.stdout
    for r in (0, 1):
        assert f"rank {r} of 2: resuming from {build.default_checkpoint_dir(out)}: 2 of 4 units already done, 1 to " \
               "compute here" in p.stdout
    res = fd_eval.load_stats(out)
    _same(res, serial)
    assert res.metadata["source"]["build"]["resumed_units"] == 2


# --- refusals ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def partial(world, tmp_path_factory):
    """A checkpoint folder with unit 0 done (over copies of the shards, for tests that change them)."""
    root = tmp_path_factory.mktemp("partial")
    shards = root / "shards"
    shutil.copytree(world["root"] / "shards", shards)  # copy2: same sizes and mtimes, so same fingerprints
    out = root / "stats.safetensors"
    with pytest.MonkeyPatch.context() as mp:
        _interrupt_after(mp, 1)
        with pytest.raises(KeyboardInterrupt):
            _build(world, out, spec=str(shards / "gpic_test_{00000..00003}.tar"))
    return {"ck": build.default_checkpoint_dir(out), "shards": shards}


@pytest.fixture
def resume(world, partial, tmp_path):
    """A fresh copy of the partial checkpoint and shards; resume(**kw) runs the build against it."""
    shards = tmp_path / "shards"
    shutil.copytree(partial["shards"], shards)
    out = tmp_path / "stats.safetensors"
    shutil.copytree(partial["ck"], build.default_checkpoint_dir(out))

    def run(**kw):
        return _build(world, out, spec=str(shards / "gpic_test_{00000..00003}.tar"), **kw)

    run.shards, run.out, run.ck = shards, out, build.default_checkpoint_dir(out)
    return run


def _unchanged(resume):
    return _units(resume.ck) == ["unit-000000.safetensors"] and not resume.out.exists()


def test_resume_with_other_weights_is_refused(world, resume, tmp_path):
    other, _ = save_dinov2_checkpoint(tmp_path / "other.pth", "vits14", "official", seed=4, depth=DEPTH)
    with pytest.raises(CheckpointError, match=r"cannot resume: the checkpoint was made with other settings "
                                              r"\(dinov2-vits14 weights sha256: then [0-9a-f]{12}\.\.\., now"):
        resume(extractors=[_extractor(other)])
    assert _unchanged(resume)


@pytest.mark.parametrize("kw,match", [
    ({"resize": "torch"}, "dinov2-vits14 preprocess resize_library: then 'pil', "
                                                               "now 'torch'"),
    ({"image_transform": "center-crop-256"}, "image transform: then none, now center-crop-256"),
    ({"checkpoint_every": 2}, "units: then 4 units .one per tar shard. over 12 images, now 8 units"),
    ({"num": 6}, "--num/--seed: then None/None, now 6/None"),
    ({"keep_features": True}, "computed without feature rows"),
], ids=["resize", "transform", "units", "num", "features"])
def test_resume_with_other_settings_is_refused(world, resume, kw, match):
    kw = dict(kw)
    if "resize" in kw:
        kw["extractors"] = [_extractor(world["ckpt"], resize=kw.pop("resize"))]
    with pytest.raises(CheckpointError, match=match) as e:
        resume(**kw)
    assert str(resume.ck) in str(e.value) and "\n" not in str(e.value)
    assert _unchanged(resume)


def test_other_model_name_is_named(world):
    plan = plan_units(fd_eval.open_source(world["spec"]))
    ident = build._identity([world["ex"]], None, None, None, plan)
    other = {**ident, "extractors": [{**ident["extractors"][0], "extractor": "dinov2-vitb14", "feature_dim": 768}]}
    assert build._identity_diffs(other, ident) == ["models: then dinov2-vitb14, now dinov2-vits14"]


def test_resume_over_changed_shard_is_refused(world, resume):
    shard0 = resume.shards / "gpic_test_00000.tar"
    imgs = photo_crops(PER_SHARD, 64, 64, seed=99)
    write_shard(shard0, [gpic_sample(i, im) for i, im in enumerate(imgs)])
    with pytest.raises(CheckpointError, match="data of unit 0 .*gpic_test_00000.tar. changed since it was") as e:
        resume()
    assert "unit-000000.safetensors to recompute that unit" in str(e.value)
    assert _unchanged(resume)


def test_changed_shard_not_yet_computed_is_used(world, serial, resume):
    """Re-downloading a shard whose unit was not done yet is fine: the result covers the data as it is now."""
    write_shard(resume.shards / "gpic_test_00003.tar", [gpic_sample(i, im) for i, im in
                                                        enumerate(photo_crops(PER_SHARD, 64, 64, seed=98))])
    res = resume()[MODEL]
    assert res.n == N and not np.array_equal(res.mu, serial.mu)


def test_unit_file_equals_pipeline_extract_of_the_unit(world, partial):
    """A unit's saved triple is exactly what fd_eval.run.pipeline.extract gives for the unit alone."""
    from safetensors.torch import load_file

    src = fd_eval.open_source(str(partial["shards"] / "gpic_test_{00000..00003}.tar"))
    unit = plan_units(src).units[0]
    ext = fd_eval.run.pipeline.extract(fd_eval.sources.SubsetSource(src, unit.indices), [world["ex"]], batch_size=BS,
                                   num_workers=0, progress=False)
    saved = load_file(partial["ck"] / "unit-000000.safetensors")
    assert torch.equal(saved[f"{MODEL}.mean"], ext.accumulators[0].mean)
    assert torch.equal(saved[f"{MODEL}.m2"], ext.accumulators[0].m2)


def test_damaged_unit_file_is_refused(resume):
    unit = resume.ck / "unit-000000.safetensors"
    unit.write_bytes(unit.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{unit}: damaged or not an fd-eval unit file .*delete it"):
        resume()


# --- bad images ----------------------------------------------------------------------------------------------
def test_skip_bad_resume_after_a_strict_failure(world, tmp_path, monkeypatch):
    """A strict run stops at a corrupt image with its finished units saved; --skip-bad resumes from there; a
    later strict resume refuses a unit that skipped images."""
    good = world["samples"][:2 * PER_SHARD]
    bad = gpic_sample(100, world["images"][0], "jpg")
    bad.data = bad.data[: len(bad.data) // 2]  # truncated JPEG
    d = tmp_path / "shards"
    d.mkdir()
    write_shard(d / "gpic_test_00000.tar", good[:PER_SHARD])
    write_shard(d / "gpic_test_00001.tar", good[PER_SHARD:])
    write_shard(d / "gpic_test_00002.tar", [world["samples"][6], bad])
    spec = str(d / "gpic_test_{00000..00002}.tar")
    out = tmp_path / "stats.safetensors"
    ck = build.default_checkpoint_dir(out)
    with pytest.raises(BadImageError, match=f"gpic_test_00002.tar:{bad.key}.jpg"):
        _build(world, out, spec=spec)
    assert _units(ck) == ["unit-000000.safetensors", "unit-000001.safetensors"]
    saved = _interrupt_after(monkeypatch, 1)  # stop right after the last unit is saved, before merging
    with pytest.raises(KeyboardInterrupt):
        _build(world, out, spec=spec, skip_bad=True)
    assert [p.name for p in saved] == ["unit-000002.safetensors"]
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="unit 2 .* skipped 1 unreadable image.*pass --skip-bad"):
        _build(world, out, spec=spec)
    res = _build(world, out, spec=spec, skip_bad=True)[MODEL]
    items = res.metadata["source"]["skipped_items"]
    assert res.n == 2 * PER_SHARD + 1 and len(items) == 1 and items[0]["index"] == 2 * PER_SHARD + 1
    assert bad.key in items[0]["name"]
    f = _reference_features(world["hub"], good + [world["samples"][6]])
    np.testing.assert_allclose(res.mu, f.mean(0), rtol=0, atol=1e-5 * np.abs(f).max())
