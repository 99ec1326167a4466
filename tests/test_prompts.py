"""`fd-eval prompts`: the evaluation captions named by a reference's key/tar_idx, read from local or Hub shards."""
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner

import fd_eval
from _fake_hub import FakeHub, point_hf_at
from _gpic_shards import gpic_sample, write_shard
from fd_eval.cli import main
from fd_eval.errors import SourceError, StatsFormatError
from fd_eval.outputs.prompts import evaluation_prompts, read_prompts, write_prompts

N_SHARDS, PER_SHARD = 3, 4
# (shard, position in shard) of the evaluation samples, in the reference file's (deliberately unsorted) order
PICKS = [(2, 1), (0, 3), (1, 0), (2, 3), (0, 0), (1, 2)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Test shards gpic_test_00000..00002 (+ a broken shard 3 that no key names) and an official-format npz."""
    root = tmp_path_factory.mktemp("prompts")
    shards = root / "test"
    shards.mkdir()
    img = np.zeros((8, 8, 3), np.uint8)
    samples = [[gpic_sample(s * PER_SHARD + j, img, "png") for j in range(PER_SHARD)] for s in range(N_SHARDS)]
    for s, ss in enumerate(samples):
        write_shard(shards / f"gpic_test_{s:05d}.tar", ss)
    (shards / "gpic_test_00003.tar").write_bytes(b"not a tar: never read, no key names it")
    picked = [samples[s][j] for s, j in PICKS]
    expected = [{"index": i, "key": p.key, "tar_idx": s, "caption": p.meta["caption"],
                 "caption_type": p.meta["caption_type"]} for i, (p, (s, _)) in enumerate(zip(picked, PICKS))]
    return {"root": root, "shards": shards, "samples": samples, "expected": expected,
            "npz": official_npz(root / "test_stats.npz", [p.key for p in picked], [s for s, _ in PICKS])}


def official_npz(path, keys, tar_idx, with_selection=True):
    """GPIC's official layout: dino_mu, dino_sigma, key (unicode), tar_idx (int64)."""
    arrays = {"dino_mu": np.zeros(4), "dino_sigma": np.eye(4)}
    if with_selection:
        arrays.update(key=np.array(keys), tar_idx=np.asarray(tar_idx, dtype=np.int64))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())
    return path


def test_cli_writes_the_reference_selection_in_order(world, tmp_path):
    fd_eval.add_reference("my-test", world["npz"], split="test")
    out = tmp_path / "prompts.jsonl"
    spec = str(world["shards"] / "gpic_test_{00000..00002}.tar")
    r = CliRunner().invoke(main, ["prompts", "my-test", "-o", str(out), "--shards", spec, "-q"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert f"wrote {out}: 6 prompts from 3 shard(s)" in r.output
    lines = out.read_bytes().decode("utf-8").splitlines()
    assert [json.loads(x) for x in lines] == world["expected"]
    assert "été —" in lines[0]  # UTF-8, not \u escapes
    assert read_prompts(out) == world["expected"]


@pytest.mark.parametrize("how", ["folder", "template", "glob"])
def test_shard_specs_and_stats_file_reference(world, how):
    """A statistics file as the reference; shards as a folder (the broken, unnamed shard 3 is never opened), a
    {NNNNN} template or a glob."""
    shards = {"folder": world["shards"], "template": f"{world['shards']}/gpic_test_{{NNNNN}}.tar",
              "glob": f"{world['shards']}/gpic_test_0000[0-2].tar"}[how]
    assert evaluation_prompts(world["npz"], shards, progress=False) == world["expected"]


def test_missing_key_names_shard_and_key(world, tmp_path):
    picked = [world["samples"][s][j] for s, j in PICKS]
    keys, tar_idx = [p.key for p in picked], [s for s, _ in PICKS]
    tar_idx[1] = 1  # sample (0, 3) claimed to be in shard 1
    npz = official_npz(tmp_path / "bad.npz", keys, tar_idx)
    out = tmp_path / "prompts.jsonl"
    with pytest.raises(SourceError) as e:
        write_prompts(out, npz, world["shards"], progress=False)
    msg = str(e.value)
    assert msg.startswith(f"{world['shards'] / 'gpic_test_00001.tar'}: no sample with key {keys[1]}")
    assert "shard 1 (tar_idx)" in msg and "\n" not in msg
    assert not out.exists() and list(tmp_path.iterdir()) == [npz]  # nothing half-written


def test_shard_not_in_spec_and_no_selection(world, tmp_path):
    picked = [world["samples"][s][j] for s, j in PICKS]
    npz = official_npz(tmp_path / "far.npz", [p.key for p in picked], [5] * len(PICKS))
    with pytest.raises(SourceError, match=r"has no shard number 5 .*point it at all the shards"):
        evaluation_prompts(npz, world["shards"], progress=False)
    plain = official_npz(tmp_path / "plain.npz", [], [], with_selection=False)
    with pytest.raises(StatsFormatError, match=r"plain.npz has no key/tar_idx array naming the evaluation samples"):
        evaluation_prompts(plain, world["shards"], progress=False)


def test_gpic_test_from_the_hub_fetches_only_named_shards(world, tmp_path, monkeypatch):
    """`fd-eval prompts gpic-test` with no --shards: the built-in entry's npz and its test shards from the Hub."""
    repo = "stanford-vision-lab/gpic"
    with FakeHub() as hub:
        point_hf_at(hub, monkeypatch, tmp_path / "hf_cache")
        hub.add_file(repo, "reference_stats/test_stats.npz", world["npz"].read_bytes())
        for s in range(N_SHARDS + 1):
            hub.add_file(repo, f"test/gpic_test_{s:05d}.tar", (world["shards"] / f"gpic_test_{s:05d}.tar").read_bytes())
        out = tmp_path / "prompts.jsonl"
        r = CliRunner().invoke(main, ["prompts", "gpic-test", "-o", str(out), "-q"])
        assert r.exit_code == 0, r.output + repr(r.exception)
        assert read_prompts(out) == world["expected"]
        assert [len(hub.body_gets(f"gpic_test_{s:05d}.tar")) for s in range(N_SHARDS + 1)] == [1, 1, 1, 0]
    # the shards are cached: offline, with the server gone, the same prompts come back
    assert evaluation_prompts("gpic-test", offline=True, progress=False) == world["expected"]
