"""Remote tar shards (http(s) through the loopback hub, hf:// resolve URLs, fsspec's memory filesystem): statistics
bit-identical to the same shards on disk, a dropped connection resumed, a changed shard refused on resume, a
connection that keeps failing named in one line (or its shard skipped), --offline refusing remote sources."""
import os
from pathlib import Path

import fsspec
import numpy as np
import pytest

import fd_eval
import fd_eval.extractors.dinov2 as dv
import fd_eval.metrics.build as build
import fd_eval.run.engine as engine
from _checkpoints import save_dinov2_checkpoint
from _fake_hub import FakeHub, point_hf_at
from _gpic_shards import gpic_sample, make_shards, write_shard
from _images import photo_crops
from fd_eval.errors import BadImageError, CheckpointError, SourceError
from fd_eval.metrics.build import build_stats
from fd_eval.sources import open_source
from fd_eval.sources.remote import RemoteTarSource

N_SHARDS, PER_SHARD = 3, 4
MODEL = "dinov2-vits14"
BS = 3  # units of 4 images run as batches of 3 + 1
DEPTH = 2
RANGE = "{00000..00002}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    ckpt, _ = save_dinov2_checkpoint(root / "dinov2_vits14_pretrain.pth", "vits14", "official", seed=3, depth=DEPTH)
    paths, _ = make_shards(root / "shards", photo_crops(N_SHARDS * PER_SHARD, 64, 64, seed=7), PER_SHARD)
    ex = dv._build_extractor("vits14", False, weights=ckpt, _depth=DEPTH)
    return {"root": root, "paths": paths, "ex": ex, "data": {p.name: p.read_bytes() for p in paths}}


def _build(world, spec, out, **kw):
    return build_stats(spec, out, extractors=[world["ex"]], batch_size=BS, num_workers=kw.pop("num_workers", 0),
                       progress=False, **kw)


@pytest.fixture(scope="module")
def on_disk(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("disk") / "stats.safetensors"
    return _build(world, str(world["root"] / "shards" / f"gpic_test_{RANGE}.tar"), out)[MODEL]


def _same(a, b):
    assert a.n == b.n == N_SHARDS * PER_SHARD
    assert np.array_equal(a.mu, b.mu) and np.array_equal(a.sigma, b.sigma)


@pytest.fixture()
def hub(world, monkeypatch, tmp_path):
    with FakeHub() as h:
        for name, data in world["data"].items():
            h.add_mirror(name, data)
            h.add_file("org/gpic", f"test/{name}", data)
        point_hf_at(h, monkeypatch, tmp_path / "hf_cache")
        monkeypatch.setenv("FD_EVAL_REMOTE_BACKOFF", "0.01")
        yield h


def _http(hub):
    return f"{hub.url}/mirror/gpic_test_{RANGE}.tar"


HF = f"hf://datasets/org/gpic/test/gpic_test_{RANGE}.tar"


# --- bit-identical to the shards on disk ----------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["http", "hf", "hf-lfs-redirect"])
def test_streamed_shards_equal_shards_on_disk(world, on_disk, hub, tmp_path, where):
    hub.lfs_redirect = where == "hf-lfs-redirect"
    spec = _http(hub) if where == "http" else HF
    # two decode workers: each reads its runs of members forward through the shard, skipping the other's
    res = _build(world, spec, tmp_path / "s.safetensors", num_workers=2 if where == "http" else 1)[MODEL]
    _same(res, on_disk)
    src = res.metadata["source"]
    assert src["spec"] == spec and src["inputs"]["used"] == 12 and src["build"]["units"] == N_SHARDS
    if where != "http":  # pinned to the commit the Hub resolved, the token never sent to the CDN
        gets = [r.path for r in hub.body_gets(".tar") if "/resolve/" in r.path]
        assert gets and all("/resolve/0123456789abcdef0123456789abcdef01234567/" in p for p in gets)
        assert not any("authorization" in r.headers for r in hub.requests if r.path.startswith("/cdn/"))
        files = src["files"]  # provenance: every shard's URL, size, ETag (the LFS sha256) and the commit
        assert [f["url"] for f in files] == [HF.replace(RANGE, f"{k:05d}") for k in range(N_SHARDS)]
        assert {f["revision"] for f in files} == {"0123456789abcdef0123456789abcdef01234567"}
        assert all(f["etag"] == f["sha256"] and len(f["sha256"]) == 64 for f in files)


def test_fsspec_memory_filesystem_equals_shards_on_disk(world, on_disk, tmp_path, monkeypatch):
    monkeypatch.delenv("FD_EVAL_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    mem = fsspec.filesystem("memory")
    for name, data in world["data"].items():
        mem.pipe(f"/fd_eval_test/{name}", data)
    try:
        src = open_source("memory://fd_eval_test/gpic_test_*.tar")
        assert isinstance(src, RemoteTarSource) and len(src) == 12
        _same(_build(world, src, tmp_path / "m.safetensors")[MODEL], on_disk)
    finally:
        mem.rm("/fd_eval_test", recursive=True)


def test_hub_glob_lists_the_shards(world, hub):
    src = open_source("hf://datasets/org/gpic/test/gpic_test_*.tar")  # listed with HfFileSystem
    local = open_source(str(world["root"] / "shards" / f"gpic_test_{RANGE}.tar"))
    assert src.shards == [HF.replace(RANGE, f"{k:05d}") for k in range(N_SHARDS)]
    assert [src.read_encoded(i) for i in range(len(src))] == [local.read_encoded(i) for i in range(len(local))]


def test_each_shard_is_streamed_once_per_pass(world, hub):
    """The index comes from one sequential read of each shard (then cached); a pass with no workers reads each
    shard's members on one connection, never the whole file twice more."""
    src = open_source(_http(hub))
    assert not hub.body_gets(".tar")  # opening reads no shard: a pass indexes them from its one read of each
    assert len(src) == 12  # the count needs every index now: no etag, so indexed at every open (one read each)
    assert len(hub.body_gets(".tar")) == N_SHARDS
    before = len(hub.body_gets(".tar"))
    for i in range(len(src)):
        src.read_encoded(i)
    assert len(hub.body_gets(".tar")) - before == N_SHARDS  # one request per shard
    reopened = open_source(HF)  # the Hub gives an ETag: indexed once, then from the cache
    assert len(reopened) == 12 and len(open_source(HF)) == 12
    assert len([r for r in hub.body_gets(".tar") if "/resolve/" in r.path]) == N_SHARDS
    assert reopened.provenance()[0]["revision"] == "0123456789abcdef0123456789abcdef01234567"


# --- dropped connections --------------------------------------------------------------------------------------------
def test_dropped_connection_resumes_to_identical_statistics(world, on_disk, hub, tmp_path):
    src = open_source(_http(hub))  # indexed; now every body the pass asks for is cut twice mid-shard
    hub.cuts = [5000, 700]
    res = _build(world, src, tmp_path / "c.safetensors")[MODEL]
    _same(res, on_disk)
    resumed = [r.range for r in hub.body_gets(".tar") if r.range not in (None, "bytes=0-")]
    assert any(int(r[6:-1]) > 5000 for r in resumed)  # continued from the byte reached, not from the start
    hub.cuts = [9000]
    _same(_build(world, _http(hub), tmp_path / "d.safetensors")[MODEL], on_disk)  # also while indexing


def test_connection_that_keeps_failing_is_one_line_naming_shard_and_byte(world, hub, tmp_path, monkeypatch):
    monkeypatch.setenv("FD_EVAL_REMOTE_RETRIES", "2")
    monkeypatch.setattr(fd_eval.sources.remote, "INDEX_THREADS", 1)  # shards indexed in order: the cuts hit shard 0
    hub.cuts = [4000, 0, 0]  # cut at byte 4,000, then twice no byte at all
    with pytest.raises(SourceError) as e:
        len(open_source(f"{hub.url}/mirror/gpic_test_00000.tar"))  # (the count needs the index)
    msg = str(e.value)
    assert "\n" not in msg and "gpic_test_00000.tar" in msg and "at byte 4,000" in msg and "--skip-bad" in msg
    hub.cuts = [4000, 0, 0]
    src = open_source(_http(hub), skip_bad=True)  # the shard that fails is listed, the others are used
    assert len(src) == 8 and [s.reason for s in src.ignored] == ["unreadable remote shard"]
    assert "gpic_test_00000.tar" in src.ignored[0].name
    acc = fd_eval.sources.InputAccounting.build(src, [], len(src))
    assert acc.found == 9 and "unreadable remote shard: 1" in acc.summary()
    assert [(p["found"], p["used"], p["ignored"]) for p in acc.per_shard] == [(1, 0, 1), (4, 4, 0), (4, 4, 0)]


def test_connection_lost_during_the_pass(world, hub, tmp_path, monkeypatch):
    monkeypatch.setenv("FD_EVAL_REMOTE_RETRIES", "1")
    src = open_source(_http(hub))
    len(src)  # indexed now: the pass reads the members again (streamed first passes: test_streamed_first_pass_*)
    hub.cuts = [6000] * 50
    with pytest.raises(BadImageError, match=r"gpic_test_00000\.tar:.*remote shard unreadable .*at byte [\d,]+") as e:
        _build(world, src, tmp_path / "x.safetensors")
    assert "\n" not in str(e.value)
    hub.cuts = []
    src = open_source(_http(hub), skip_bad=True)
    len(src)
    hub.cuts = [0, 0]  # shard 0's reader gets no byte twice: its items are skipped, the other shards are used
    res = _build(world, src, tmp_path / "y.safetensors", skip_bad=True)[MODEL]
    skipped = res.metadata["source"]["inputs"]["skipped"]
    assert res.n == 8 and len(skipped) == PER_SHARD
    per_shard = res.metadata["source"]["inputs"]["per_shard"]  # everything accounted for, shard by shard
    assert [(p["found"], p["used"], p["skipped"], p["ignored"]) for p in per_shard] == [(4, 0, 4, 0), (4, 4, 0, 0),
                                                                                     (4, 4, 0, 0)]
    assert all("gpic_test_00000.tar:" in s["name"] and "remote shard unreadable" in s["reason"] for s in skipped)


# --- resume ---------------------------------------------------------------------------------------------------------
def _interrupt_after(monkeypatch, k):
    real, saved = engine.save_unit_file, []

    def save(path, header, tensors, *meta_key):
        real(path, header, tensors, *meta_key)
        saved.append(Path(path))
        if len(saved) == k:
            raise KeyboardInterrupt

    monkeypatch.setattr(engine, "save_unit_file", save)  # the unit engine writes every unit file
    return saved


@pytest.mark.parametrize("where", ["http", "hf"])
def test_resume_over_a_changed_remote_shard_is_refused(world, on_disk, hub, tmp_path, monkeypatch, where):
    spec = _http(hub) if where == "http" else HF
    out = tmp_path / "r.safetensors"
    real = engine.save_unit_file
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        _build(world, spec, out)
    monkeypatch.setattr(engine, "save_unit_file", real)
    header = build._read_header(build.default_checkpoint_dir(out) / "unit-000000.safetensors")
    assert header["unit"]["label"].startswith(spec.split("{")[0])
    other = write_shard(tmp_path / "new.tar", [gpic_sample(i, im) for i, im in
                                               enumerate(photo_crops(PER_SHARD, 64, 64, seed=99))]).read_bytes()
    hub.mirror["gpic_test_00000.tar"] = other
    hub.files["datasets/org/gpic/test/gpic_test_00000.tar"] = other
    with pytest.raises(CheckpointError, match="data of unit 0 .*gpic_test_00000.tar. changed since it was"):
        _build(world, spec, out)
    hub.mirror["gpic_test_00000.tar"] = world["data"]["gpic_test_00000.tar"]  # restored: the resume goes on
    hub.files["datasets/org/gpic/test/gpic_test_00000.tar"] = world["data"]["gpic_test_00000.tar"]
    res = _build(world, spec, out)[MODEL]
    _same(res, on_disk)
    assert res.metadata["source"]["build"]["resumed_units"] == 1


# --- offline, bad URLs ----------------------------------------------------------------------------------------------
def test_offline_refuses_every_remote_source(world, hub, monkeypatch):
    for spec in (_http(hub), HF, "memory://x/shard.tar", "s3://bucket/a.parquet"):
        with pytest.raises(SourceError, match="a remote source, but offline mode is on") as e:
            open_source(spec, offline=True)
        assert "\n" not in str(e.value)
    monkeypatch.setenv("FD_EVAL_OFFLINE", "1")
    with pytest.raises(SourceError, match="offline mode is on"):
        open_source(HF)
    assert not hub.requests


def test_missing_shard_and_listing_http_are_one_line(hub):
    with pytest.raises(SourceError, match=r"gpic_test_00003\.tar: not found \(HTTP 404\)"):
        open_source(f"{hub.url}/mirror/gpic_test_{{00002..00003}}.tar")
    with pytest.raises(SourceError, match="cannot be listed; name the shards with a brace range"):
        open_source(f"{hub.url}/mirror/*.tar")


def test_gated_dataset_without_token_names_the_fix(hub, monkeypatch):
    hub.gated["datasets/org/gpic"], hub.token = 401, "secret"
    with pytest.raises(SourceError, match=r"access refused \(HTTP 401\).*hf auth login"):
        open_source(HF)
    monkeypatch.setenv("HF_TOKEN", "secret")
    assert len(open_source(HF)) == 12


def test_cli_stats_offline_refuses_a_remote_source(hub, tmp_path):
    from click.testing import CliRunner

    from fd_eval.cli import main

    r = CliRunner().invoke(main, ["stats", _http(hub), "-o", str(tmp_path / "o.safetensors"), "--offline"])
    assert r.exit_code == 1 and "offline mode is on" in r.output and not hub.requests
    assert not os.path.exists(tmp_path / "o.safetensors")


def test_index_is_one_sequential_read_even_over_large_members(world, hub, tmp_path):
    """tarfile jumps over member data; the index read reads through it (one request, the whole file hashed)."""
    import hashlib
    import io
    import tarfile

    path = tmp_path / "big.tar"
    blob = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()  # 3 MiB, not an image
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in (("a.bin", blob), ("b.png", b"x")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    data = path.read_bytes()
    url = hub.add_mirror("big.tar", data)
    src = open_source(url)
    assert len(src) == 1 and [s.reason for s in src.ignored] == ["not an image file extension"]
    assert len(hub.body_gets("big.tar")) == 1
    assert src.provenance()[0]["sha256"] == hashlib.sha256(data).hexdigest()


def test_server_that_refuses_head_is_asked_for_one_byte(world, hub, monkeypatch):
    """Presigned URLs are signed for GET only: the size comes from a one-byte range request instead."""
    import _fake_hub

    def refuse(self):
        self.send_response(405)
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()

    monkeypatch.setattr(_fake_hub._Handler, "do_HEAD", refuse)
    src = open_source(_http(hub))
    assert len(src) == 12 and [f.size for f in src.files] == [len(d) for d in world["data"].values()]
    assert [r.range for r in hub.requests if r.range == "bytes=0-0"] == ["bytes=0-0"] * N_SHARDS


def test_a_reader_that_jumps_asks_for_windows_without_read_ahead(hub, tmp_path):
    """A DataLoader worker reads runs of members with other workers' runs between them: after its first far jump
    its reader requests closed ranges the size of the run it read, and reads nothing ahead."""
    from fd_eval.sources.remote_io import SEEK_SKIP, StreamReader, stat_remote

    data = np.random.default_rng(1).integers(0, 256, 6 << 20, dtype=np.uint8).tobytes()
    rf = stat_remote(hub.add_mirror("blob.bin", data))
    with StreamReader(rf, 0, readahead=4 << 20) as r:
        assert r.read(100_000) == data[:100_000]  # a run of 100 KB, then a jump over others' runs
        r.seek(3_000_000)
        assert r.read(50_000) == data[3_000_000:3_050_000]
        r.seek(3_048_000)  # back within the rewind window (4 KiB): no request
        assert r.read(20_000) == data[3_048_000:3_068_000]
        r.seek(5_000_000)
        assert r.read(SEEK_SKIP + 10) == data[5_000_000:5_000_000 + SEEK_SKIP + 10]  # across two windows
    ranges = [q.range for q in hub.body_gets("blob.bin")]
    w = SEEK_SKIP
    assert ranges == ["bytes=0-", f"bytes=3000000-{3_000_000 + w - 1}", f"bytes=5000000-{5_000_000 + w - 1}",
                      f"bytes={5_000_000 + w}-"]  # the second window reaches the end of the file


def test_a_shard_that_is_not_a_tar_stops_the_open_in_one_line(world, hub):
    hub.mirror["gpic_test_00001.tar"] = b"\x1f\x8b" + bytes(5000)  # gzip magic
    with pytest.raises(SourceError, match=r"gpic_test_00001\.tar: gzip-compressed tar; .*decompress it") as e:
        len(open_source(_http(hub)))
    assert "\n" not in str(e.value)


def test_hub_cdn_location_is_reused_by_a_reader_that_jumps(world, hub):
    """With LFS redirects, a reader's later windows go straight to the CDN location (no token), not through the
    resolve URL again."""
    from fd_eval.sources.remote_io import StreamReader, stat_remote

    hub.lfs_redirect = True
    data = world["data"]["gpic_test_00000.tar"]
    rf = stat_remote(HF.replace(RANGE, "00000"))
    with StreamReader(rf, 0, max_skip=0) as r:
        assert r.read(3000) == data[:3000]
        r.seek(9000)
        assert r.read(2000) == data[9000:11000]
        r.seek(20000)
        assert r.read(100) == data[20000:20100]
    gets = [(q.path.split("/")[1], q.range) for q in hub.requests if q.method == "GET"]
    assert [g[0] for g in gets] == ["datasets", "cdn", "cdn", "cdn"]
    assert not any("authorization" in q.headers for q in hub.requests if q.path.startswith("/cdn/"))
