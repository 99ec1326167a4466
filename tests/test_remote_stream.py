"""A first pass over remote tar shards whose member index is not cached reads each shard once (fd_eval.run.streamed):
counted at the loopback server, statistics bit-identical to the shards on disk and to a cached-index pass, a dropped
connection resumed, a failing one named in one line (or its shard listed), spool files gone after the pass and after
an error, ranks that share a folder."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fd_eval
import fd_eval.metrics.build as build
import fd_eval.run.engine as engine
from _gpic_shards import gpic_sample, write_shard
from _images import photo_crops
from fd_eval.errors import CheckpointError, RemoteReadError
from fd_eval.sources.remote import RemoteTarSource
from test_remote import (
    BS,
    DEPTH,
    HF,
    MODEL,
    N_SHARDS,
    PER_SHARD,
    RANGE,
    _build,
    _http,
    _interrupt_after,
    _same,
    hub,
    on_disk,
    world,
)

__all__ = ["hub", "on_disk", "world"]  # fixtures shared with test_remote.py


@pytest.fixture()
def spool(tmp_path, monkeypatch):
    d = tmp_path / "spool"
    monkeypatch.setenv("FD_EVAL_SPOOL_DIR", str(d))
    return d


def _sizes(world):
    return {name: len(d) for name, d in world["data"].items()}


@pytest.mark.parametrize("where,workers", [("http", 0), ("http", 2), ("hf", 1)])
def test_first_pass_reads_each_shard_once(world, on_disk, hub, tmp_path, spool, monkeypatch, where, workers):
    spec = _http(hub) if where == "http" else HF
    alive: list[int] = []  # spool files present as each shard is registered
    real = RemoteTarSource.register

    def register(self, s, idx, path):
        real(self, s, idx, path)
        alive.append(len([p for p in spool.rglob("*.tar")]))

    monkeypatch.setattr(RemoteTarSource, "register", register)
    res = _build(world, spec, tmp_path / "a.safetensors", num_workers=workers)[MODEL]
    _same(res, on_disk)
    assert hub.served == _sizes(world)  # every byte of every shard sent once in all (index and data)
    gets = hub.body_gets(".tar")
    assert len(gets) == N_SHARDS and {r.range for r in gets} <= {None, "bytes=0-"}
    # without workers: this shard and the one read ahead, at most (workers' prefetch may span more shards)
    assert len(alive) == N_SHARDS and max(alive) <= (2 if workers == 0 else N_SHARDS)
    assert list(spool.iterdir()) == []  # the spool files went with the pass
    src = res.metadata["source"]
    assert src["inputs"]["used"] == 12 and src["build"]["units"] == N_SHARDS
    assert [f["sha256"] for f in src["files"]] == [hashlib.sha256(d).hexdigest() for d in world["data"].values()]

    hub.served.clear()  # a second pass: Hub shards have their index cached now (http ones have no validator)
    again = _build(world, spec, tmp_path / "b.safetensors", num_workers=workers)[MODEL]
    _same(again, res)
    assert len(hub.body_gets(".tar")) == 2 * N_SHARDS
    assert all(0 < hub.served[n] <= len(d) for n, d in world["data"].items())
    assert list(spool.iterdir()) == []


def test_first_pass_of_compute_stats_reads_each_shard_once(world, hub, spool):
    """compute_stats (one unit over every shard: batches that straddle shards) from the streamed shards, bit-identical
    to the same call over the shards on disk."""
    kw = {"extractors": [world["ex"]], "batch_size": 3, "num_workers": 0, "progress": False}
    disk = fd_eval.compute_stats(str(world["root"] / "shards" / "gpic_test_{00000..00002}.tar"), **kw)[MODEL]
    res = fd_eval.compute_stats(_http(hub), **kw)[MODEL]
    assert res.n == disk.n == 12 and np.array_equal(res.mu, disk.mu) and np.array_equal(res.sigma, disk.sigma)
    assert hub.served == _sizes(world) and list(spool.iterdir()) == []
    assert res.metadata["source"]["fingerprint"] == fd_eval.open_source(_http(hub)).fingerprint()


def test_first_pass_dropped_connection_resumes_to_identical_statistics(world, on_disk, hub, tmp_path, spool):
    hub.cuts = [5000, 700]  # the first shard's stream is cut twice
    res = _build(world, _http(hub), tmp_path / "c.safetensors", num_workers=1)[MODEL]
    _same(res, on_disk)
    ranges = [r.range for r in hub.body_gets("gpic_test_00000.tar")]
    assert ranges == ["bytes=0-", "bytes=5000-", "bytes=5700-"]  # continued from the byte reached, never from the start
    assert hub.served == _sizes(world) and list(spool.iterdir()) == []


def test_first_pass_connection_that_keeps_failing(world, hub, tmp_path, spool, monkeypatch):
    monkeypatch.setenv("FD_EVAL_REMOTE_RETRIES", "2")
    hub.cuts = [4000, 0, 0]  # shard 0: cut at byte 4,000, then twice no byte at all
    with pytest.raises(RemoteReadError) as e:
        _build(world, _http(hub), tmp_path / "x.safetensors")
    msg = str(e.value)
    assert "\n" not in msg and "gpic_test_00000.tar" in msg and "at byte 4,000" in msg and "--skip-bad" in msg
    assert list(spool.iterdir()) == []  # the spool goes after an error too
    hub.cuts = [4000, 0, 0]
    res = _build(world, _http(hub), tmp_path / "y.safetensors", skip_bad=True)[MODEL]
    inputs = res.metadata["source"]["inputs"]  # the shard is listed, the others are used
    assert res.n == 8 and inputs["found"] == 9 and inputs["used"] == 8
    assert [(p["found"], p["used"], p["skipped"], p["ignored"]) for p in inputs["per_shard"]] == [
        (1, 0, 0, 1), (4, 4, 0, 0), (4, 4, 0, 0)]
    assert list(spool.iterdir()) == []


@pytest.mark.parametrize("where", ["http", "hf"])
def test_interrupted_first_pass_resumes_and_refuses_a_changed_shard(world, on_disk, hub, tmp_path, spool,
                                                                    monkeypatch, where):
    spec = _http(hub) if where == "http" else HF
    out = tmp_path / "r.safetensors"
    real = engine.save_unit_file
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        _build(world, spec, out)
    monkeypatch.setattr(engine, "save_unit_file", real)
    assert list(spool.iterdir()) == []
    assert all(hub.served.get(n, 0) <= len(d) for n, d in world["data"].items())  # each shard read once at most
    other = write_shard(tmp_path / "new.tar", [gpic_sample(i, im) for i, im in
                                               enumerate(photo_crops(PER_SHARD, 64, 64, seed=99))]).read_bytes()
    hub.mirror["gpic_test_00000.tar"] = other
    hub.files["datasets/org/gpic/test/gpic_test_00000.tar"] = other
    with pytest.raises(CheckpointError, match="data of unit 0 .*gpic_test_00000.tar. changed since it was"):
        _build(world, spec, out)
    hub.mirror["gpic_test_00000.tar"] = world["data"]["gpic_test_00000.tar"]
    hub.files["datasets/org/gpic/test/gpic_test_00000.tar"] = world["data"]["gpic_test_00000.tar"]
    res = _build(world, spec, out)[MODEL]
    _same(res, on_disk)
    assert res.metadata["source"]["build"]["resumed_units"] == 1 and list(spool.iterdir()) == []


def test_ranks_sharing_a_folder_index_first_and_match(world, on_disk, hub, tmp_path, spool):
    """Two ranks (no process group) over never-indexed shards: each indexes the shards first (the documented
    limit), the merged statistics are the single process's bits."""
    out = tmp_path / "w.safetensors"
    notes: list[str] = []
    assert _build(world, _http(hub), out, rank=1, world_size=2, log=notes.append) is None
    res = _build(world, _http(hub), out, rank=0, world_size=2, log=notes.append)[MODEL]
    _same(res, on_disk)
    assert any("indexing the 3 remote shard(s) not in the tar index cache first" in n for n in notes)
    assert not build.default_checkpoint_dir(out).exists() and not spool.exists()  # (nothing streamed in a pass)


def test_a_spool_that_cannot_be_written_is_one_line(world, hub, tmp_path, spool, monkeypatch):
    import errno
    import os

    from fd_eval.errors import OutputError

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as mp:
        mp.setattr(os, "pwrite", full)
        with pytest.raises(OutputError, match=r"cannot write the spool of .*gpic_test_00000\.tar .*SPOOL_DIR") as e:
            _build(world, _http(hub), tmp_path / "f.safetensors")
    assert "\n" not in str(e.value) and e.value.errno == errno.ENOSPC and list(spool.iterdir()) == []
    (tmp_path / "a_file").write_bytes(b"")
    monkeypatch.setenv("FD_EVAL_SPOOL_DIR", str(tmp_path / "a_file"))  # not a folder
    with pytest.raises(OutputError, match=r"cannot make a spool folder .*a_file .*set FD_EVAL_SPOOL_DIR"):
        _build(world, _http(hub), tmp_path / "g.safetensors")


@pytest.mark.slow
def test_torchrun_stats_over_never_indexed_shards_equals_one_process_on_disk(world, hub, tmp_path, spool, one_thread):
    """`torchrun --nproc_per_node 2 -m fd_eval stats URL`: the ranks index the shards first, each shard by one rank
    over torchrun's group joined for it (a note says so), take every other shard, and the statistics are one
    process's over the shards on disk, to the bit; the server sent each shard whole once and at most twice over."""
    from _checkpoints import save_dinov2_checkpoint
    from test_distributed import _torchrun

    ckpt, _ = save_dinov2_checkpoint(tmp_path / "dinov2_vits14_pretrain.pth", "vits14", "official", seed=5)
    out = tmp_path / "t.safetensors"
    p = _torchrun(["-m", "fd_eval", "stats", _http(hub), "-o", out, "-m", MODEL, "--weights", ckpt,
                   "--batch-size", 3, "--num-workers", 0, "--device", "cpu", "-q"], cwd=tmp_path)
    assert "indexing the 3 remote shard(s) not in the tar index cache first, each read by one of the 2 ranks" in (
        p.stderr)
    whole = [r.path.rsplit("/", 1)[-1] for r in hub.body_gets(".tar") if r.range in (None, "bytes=0-")]
    assert sorted(whole) == sorted(world["data"])
    assert all(len(d) < hub.served[n] <= 2 * len(d) for n, d in world["data"].items()), hub.served
    exs = fd_eval.load_extractors(MODEL, ckpt, "cpu")
    disk = build.build_stats(str(world["root"] / "shards" / "gpic_test_{00000..00002}.tar"), tmp_path / "d.safetensors",
                             extractors=exs, batch_size=3, num_workers=0, progress=False)[MODEL]
    got = fd_eval.load_stats(out)
    assert got.n == disk.n == 12 and np.array_equal(got.mu, disk.mu) and np.array_equal(got.sigma, disk.sigma)
    assert got.metadata["source"]["build"]["world_size"] == 2 and not spool.exists()


def test_index_build_first_pass_reads_each_shard_once(world, hub, tmp_path, spool):
    """`index build` over never-indexed shards: each shard streamed once, every unit's keys and vectors those of the
    same build over the shards on disk, the part's count and fingerprint filled in when it completes."""
    from safetensors.torch import load_file

    from fd_eval.index.build import build_index
    from fd_eval.index.store import unit_path

    kw = {"extractors": [world["ex"]], "batch_size": 3, "num_workers": 0, "progress": False}
    disk = build_index(str(world["root"] / "shards" / "gpic_test_{00000..00002}.tar"), tmp_path / "d", **kw)
    remote = build_index(_http(hub), tmp_path / "r", **kw)
    assert hub.served == _sizes(world) and list(spool.iterdir()) == []
    with pytest.MonkeyPatch.context() as mp:  # interrupted after its first unit, then resumed
        _interrupt_after(mp, 1)
        with pytest.raises(KeyboardInterrupt):
            build_index(_http(hub), tmp_path / "i", **kw)
    assert list(spool.iterdir()) == []
    resumed = build_index(_http(hub), tmp_path / "i", **kw)
    assert resumed.n_items == 12 and resumed.parts[0]["fingerprint"] == remote.parts[0]["fingerprint"]
    for k in range(N_SHARDS):
        a, b = load_file(unit_path(tmp_path / "d", k)), load_file(unit_path(tmp_path / "i", k))
        assert all(np.array_equal(a[t].numpy(), b[t].numpy()) for t in a)
    assert (remote.n_items, remote.n_rows, len(remote.units)) == (disk.n_items, disk.n_rows, len(disk.units)) == (
        12, 12, N_SHARDS)
    for k in range(N_SHARDS):
        a, b = load_file(unit_path(tmp_path / "d", k)), load_file(unit_path(tmp_path / "r", k))
        assert a.keys() == b.keys() and all(np.array_equal(a[t].numpy(), b[t].numpy()) for t in a)
    part = remote.parts[0]
    assert part["complete"] and part["n_items"] == 12
    assert part["fingerprint"] == fd_eval.open_source(_http(hub)).fingerprint()


# --- ranks with a process group: each pending shard indexed by one rank, the indexes exchanged ----------------------
def test_indexes_travel_as_npz_bytes(world):
    """What ranks exchange (the tar index cache's .npz form, no pickle): every array's dtype, shape and bytes, the
    info and an unreadable mark."""
    from fd_eval.run.rank_index import decode_indexes, encode_indexes
    from fd_eval.sources.discovery import scan_tar

    idx = scan_tar(str(world["paths"][1]))
    gone = {"empty": True, "unreadable": "connection reset at byte 4,000"}
    back = decode_indexes(encode_indexes([(1, idx), (2, gone), (5, {"empty": True})]))
    assert [s for s, _ in back] == [1, 2, 5] and back[1][1] == gone and back[2][1] == {"empty": True}
    got = back[0][1]
    assert got.keys() == idx.keys() and json.dumps(got["info"]) == json.dumps(idx["info"])
    for k, v in idx.items():
        if isinstance(v, np.ndarray):
            assert got[k].dtype == v.dtype and np.array_equal(got[k], v)


def _two_ranks(world, tmp_path, spec, *, skip_bad=False, index_spec=None, compute_spec=None, caches=None):
    """Two processes (gloo, a group of their own) running build_stats on ``spec`` (then compute_stats and build_index
    when given): their rank{R}.json (notes, results or error)."""
    from test_distributed import TESTS, _free_port

    cfg = {"dir": str(tmp_path), "spec": spec, "out": str(tmp_path / "two.safetensors"), "depth": DEPTH, "ckpt":
           str(world["root"] / "dinov2_vits14_pretrain.pth"), "batch_size": 3, "skip_bad": skip_bad,
           "index_spec": index_spec, "index_out": str(tmp_path / "two_index"), "compute_spec": compute_spec,
           "caches": caches}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS), "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [subprocess.Popen([sys.executable, str(TESTS / "_rank_index_worker.py"), str(tmp_path / "cfg.json")],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]  # (a guard against a hang, not a timing)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_ranks_index_each_shard_once_in_all(world, hub, tmp_path, spool, one_thread):
    """A first pass of two ranks (process group) over never-indexed shards: each shard is indexed by one rank and
    read once more by the pass, so the server sends at most twice its bytes (the index read is whole: more than
    once), not three times; statistics equal one process's over the same URLs and over the shards on disk, to the
    bit. `index build` likewise (shards under other names, counted apart), its units equal one process's; and
    `compute_stats` (ranks take blocks of items) reads each shard whole once, for its index."""
    from safetensors.torch import load_file

    from fd_eval.index.build import build_index
    from fd_eval.index.store import unit_path

    for name, data in world["data"].items():
        hub.add_mirror("ix_" + name, data)
        hub.add_mirror("cx_" + name, data)
    ranks = _two_ranks(world, tmp_path, _http(hub), index_spec=f"{hub.url}/mirror/ix_gpic_test_{RANGE}.tar",
                       compute_spec=f"{hub.url}/mirror/cx_gpic_test_{RANGE}.tar")
    assert [r.get("error") for r in ranks] == [None, None] and [r["stats"] for r in ranks] == [True, False]
    assert [r["index"] for r in ranks] == [True, False]
    whole = [r.path.rsplit("/", 1)[-1] for r in hub.body_gets(".tar") if r.range in (None, "bytes=0-")]
    assert sorted(whole) == sorted(p + n for p in ("", "ix_", "cx_") for n in world["data"])  # one index read each
    for name, size in _sizes(world).items():  # (compute's rank blocks cut shard 1: both ranks read part of it)
        for served in (hub.served[name], hub.served["ix_" + name]):
            assert size < served <= 2 * size, (name, served, size)
    for r, rank in enumerate(ranks):
        assert any(f"rank {r} of 2: indexing the 3 remote shard(s) not in the tar index cache first, each read by one "
                   "of the 2 ranks" in n for n in rank["notes"]), rank["notes"]
    kw = {"extractors": [world["ex"]], "batch_size": BS, "num_workers": 0, "progress": False}
    disk = build.build_stats(str(world["root"] / "shards" / f"gpic_test_{RANGE}.tar"), tmp_path / "d.safetensors",
                             **kw)[MODEL]
    one = build.build_stats(_http(hub), tmp_path / "o.safetensors", **kw)[MODEL]
    two = fd_eval.load_stats(tmp_path / "two.safetensors")
    _same(two, disk)
    _same(two, one)
    for rank in ranks:  # compute_stats (ranks' blocks merged exactly): the one process's result to rounding
        got = rank["compute"]
        assert got["n"] == 12 and np.allclose(got["mu"], disk.mu, rtol=0, atol=1e-12 * np.abs(disk.mu).max())
        assert np.allclose(got["sigma"], disk.sigma, rtol=0, atol=1e-12 * np.abs(disk.sigma).max())
    assert two.metadata["source"]["build"]["world_size"] == 2 and list(spool.iterdir()) == []
    build_index(str(world["root"] / "shards" / f"gpic_test_{RANGE}.tar"), tmp_path / "d_index", **kw)
    for k in range(N_SHARDS):
        a, b = load_file(unit_path(tmp_path / "d_index", k)), load_file(unit_path(tmp_path / "two_index", k))
        assert a.keys() == b.keys() and all(np.array_equal(a[t].numpy(), b[t].numpy()) for t in a)


def test_two_ranks_whose_caches_differ(world, on_disk, hub, tmp_path, spool, monkeypatch):
    """Hub shards whose indexes rank 0's cache holds and rank 1's does not (two nodes): both ranks join the exchange,
    rank 0 sends its cached indexes without reading, rank 1 reads only its share (shard 1); the result is exact."""
    caches = [str(tmp_path / "cache0"), str(tmp_path / "cache1")]
    monkeypatch.setenv("FD_EVAL_CACHE", caches[0])
    _same(_build(world, HF, tmp_path / "one.safetensors")[MODEL], on_disk)  # fills rank 0's cache
    hub.requests.clear()
    ranks = _two_ranks(world, tmp_path, HF, caches=caches)
    assert [r.get("error") for r in ranks] == [None, None]
    whole = [r.path.rsplit("/", 1)[-1] for r in hub.body_gets(".tar") if r.range in (None, "bytes=0-")]
    assert whole == ["gpic_test_00001.tar"], whole
    assert not any("indexing" in n for n in ranks[0]["notes"]) and any("indexing the 3" in n for n in ranks[1]["notes"])
    _same(fd_eval.load_stats(tmp_path / "two.safetensors"), on_disk)


@pytest.mark.parametrize("skip_bad", [False, True], ids=["error", "skip-bad"])
def test_an_indexing_failure_on_one_rank_is_the_same_line_on_both(world, hub, tmp_path, spool, monkeypatch, skip_bad):
    """Shard 1 (indexed by rank 1) drops every connection: both ranks raise the same one-line RemoteReadError
    naming it (no rank waits for the other); with --skip-bad it is listed as unreadable, the same for both."""
    monkeypatch.setenv("FD_EVAL_REMOTE_RETRIES", "1")
    hub.broken["gpic_test_00001.tar"] = 3000
    ranks = _two_ranks(world, tmp_path, _http(hub), skip_bad=skip_bad)
    if not skip_bad:
        errors = [r["error"] for r in ranks]
        assert errors[0][0] == errors[1][0] == "RemoteReadError", errors
        lines = [e[1].removesuffix(" (on rank 1)") for e in errors]
        assert lines[0] == lines[1] and "\n" not in lines[0] and "gpic_test_00001.tar" in lines[0], errors
        assert " at byte " in lines[0] and not (tmp_path / "two.safetensors").exists()
        return
    assert [r.get("error") for r in ranks] == [None, None]
    two = fd_eval.load_stats(tmp_path / "two.safetensors")
    inputs = two.metadata["source"]["inputs"]
    assert two.n == 8 and inputs["used"] == 8
    assert [(p["found"], p["used"], p["skipped"], p["ignored"]) for p in inputs["per_shard"]] == [
        (4, 4, 0, 0), (1, 0, 0, 1), (4, 4, 0, 0)]
