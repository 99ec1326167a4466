"""Failures are one line naming the file, optional things degrade, crafted statistics files are refused.

Issue 14 §4 (unusable cache, disk full, offline weights, no network), §5 (crafted or damaged statistics and registry
files, with a property-based fuzz of the safetensors metadata) and §6 (storage-aware FD rank, near-constant
features, floors with their relation and the finite-sample model).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fd_eval.util.io_utils as io
from _fake_hub import FakeHub, point_hf_at
from fd_eval.errors import (
    CacheError,
    DownloadError,
    FDEvalError,
    InvalidStatsError,
    OutputError,
    StatsFormatError,
    UnknownReferenceError,
)
from fd_eval.extractors.weights import WeightsSource, resolve_weights
from fd_eval.outputs import references as refs
from fd_eval.outputs.stats import Stats, compare_stats, load_all_stats, load_stats, save_stats
from fd_eval.util.download import download_hf, offline_scope

STATS_ERRORS = (StatsFormatError, InvalidStatsError)


def _one_line(e: BaseException, *names: object) -> str:
    """The message is one line and names every one of ``names`` (paths, variables)."""
    msg = str(e)
    assert "\n" not in msg, msg
    for n in names:
        assert str(n) in msg, (n, msg)
    return msg


def _small_stats(d: int = 4, n: int = 10, seed: int = 0, **kw) -> Stats:
    x = np.random.default_rng(seed).standard_normal((n, d))
    return Stats.from_features(x, {"extractor": "toy", **kw})


@pytest.fixture
def fresh_cache_warnings(monkeypatch):
    """Each test sees the once-per-process cache warning afresh."""
    monkeypatch.setattr(io, "_WARNED_CACHES", set())


# --- §4 unusable cache ------------------------------------------------------------------------------------------
def test_cache_root_is_a_file_required_vs_optional(tmp_path, monkeypatch, fresh_cache_warnings):
    bad = tmp_path / "not_a_dir"
    bad.write_text("x")
    monkeypatch.setenv("FD_EVAL_CACHE", str(bad))
    with pytest.raises(CacheError) as ei:
        io.cache_dir("weights")
    assert isinstance(ei.value, OSError) and isinstance(ei.value, FDEvalError)
    _one_line(ei.value, bad / "weights", "FD_EVAL_CACHE")
    with pytest.warns(RuntimeWarning, match="continuing without the cache") as rec:
        assert io.optional_cache_dir("sha256") is None
        assert io.optional_cache_dir("references") is None  # one warning per process and root
    assert len(rec) == 1 and str(bad) in str(rec[0].message)
    # hashing still works (only the record is skipped), so does a registry reference check
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    io._SHA256_MEMO.clear()
    assert io.sha256_file_cached(f) == io.sha256_file(f)


def test_full_cache_costs_only_the_record(tmp_path, monkeypatch, fresh_cache_warnings):
    import contextlib

    @contextlib.contextmanager
    def full(path, mode="wb", what="output"):
        with io.atomic_path(path, what=what) as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
            yield

    monkeypatch.setattr(io, "atomic_write", full)
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    io._SHA256_MEMO.clear()
    with pytest.warns(RuntimeWarning, match="ENOSPC") as rec:
        assert io.sha256_file_cached(f) == io.sha256_file(f)
    assert len(rec) == 1 and "sha256" in str(rec[0].message)
    assert not list(io.cache_dir("sha256").iterdir())  # no partial record


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_cache_is_optional(tmp_path, monkeypatch, fresh_cache_warnings):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    monkeypatch.setenv("FD_EVAL_CACHE", str(ro))
    try:
        with pytest.warns(RuntimeWarning, match="continuing without the cache"):
            assert io.optional_cache_dir("sha256") is None
        with pytest.raises(CacheError, match="FD_EVAL_CACHE"):
            io.cache_dir("weights")
    finally:
        ro.chmod(0o755)


def test_local_reference_with_unusable_cache_finishes(tmp_path, monkeypatch, fresh_cache_warnings):
    st_path = _small_stats().save(tmp_path / "r.safetensors")
    refs.add_reference("mine", st_path)
    bad = tmp_path / "cache_file"
    bad.write_text("")
    monkeypatch.setenv("FD_EVAL_CACHE", str(bad))
    with pytest.warns(RuntimeWarning, match="continuing without the cache"):
        s = refs.load_reference("mine", "toy", offline=True)
    assert s.n == 10 and refs.cached_path("mine") is None


# --- §4 disk full on an output ----------------------------------------------------------------------------------
def test_disk_full_on_save_stats_one_line_no_partial_file(tmp_path, monkeypatch):
    import safetensors.numpy as stn

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stn, "save_file", full)
    out = tmp_path / "o" / "stats.safetensors"
    with pytest.raises(OutputError) as ei:
        save_stats(out, [_small_stats()])
    assert ei.value.errno == errno.ENOSPC and isinstance(ei.value, OSError)
    _one_line(ei.value, out, "ENOSPC")
    assert os.listdir(out.parent) == []  # neither the output nor the temp file


def test_atomic_write_errors_name_the_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError) as ei:
        with io.atomic_write(blocker / "out.json", "w") as f:
            f.write("{}")
    _one_line(ei.value, blocker / "out.json")
    with pytest.raises(OutputError) as ei:  # a writer failing half-way leaves nothing
        with io.atomic_write(tmp_path / "out.json", "w") as f:
            f.write("{")
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    _one_line(ei.value, tmp_path / "out.json", "EDQUOT")
    assert sorted(os.listdir(tmp_path)) == ["file"]
    with pytest.raises(KeyError):  # other exceptions pass through unchanged
        with io.atomic_path(tmp_path / "x"):
            raise KeyError("k")
    assert sorted(os.listdir(tmp_path)) == ["file"]


# --- §4 offline weights, no network ---------------------------------------------------------------------------
SRC = WeightsSource("http://127.0.0.1:9/dinov2_vitl14_pretrain.pth", "dinov2_vitl14_pretrain.pth")


def test_offline_weights_error_says_file_path_and_flag(monkeypatch):
    monkeypatch.delenv("FD_EVAL_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    dest = io.cache_dir("weights") / SRC.filename
    for call in (lambda: resolve_weights(None, SRC, "dinov2-vitl14", offline=True),
                 lambda: _in_offline_scope(lambda: resolve_weights(None, SRC, "dinov2-vitl14"))):
        with pytest.raises(DownloadError) as ei:
            call()
        _one_line(ei.value, SRC.filename, dest, "--weights PATH", "offline")
    dest.write_bytes(b"w")  # a file put where the message says is used without the network
    assert resolve_weights(None, SRC, "dinov2-vitl14", offline=True) == dest


def _in_offline_scope(fn):
    with offline_scope(True):
        return fn()


def test_weights_with_unusable_cache(tmp_path, monkeypatch):
    bad = tmp_path / "f"
    bad.write_text("")
    monkeypatch.setenv("FD_EVAL_CACHE", str(bad))
    with pytest.raises(CacheError) as ei:
        resolve_weights(None, SRC, "dinov2-vitl14", offline=True)
    _one_line(ei.value, bad / "weights", "FD_EVAL_CACHE", "--weights PATH")


def test_disk_full_during_weights_download(monkeypatch):
    import fd_eval.util.download as dl

    monkeypatch.delenv("FD_EVAL_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = []

    def full(url, part, progress):
        calls.append(url)
        part.write_bytes(b"12")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dl, "_fetch", full)
    with pytest.raises(OutputError) as ei:
        resolve_weights(None, SRC, "dinov2-vitl14", offline=False)
    part = io.cache_dir("weights") / (SRC.filename + ".part")
    _one_line(ei.value, part, "ENOSPC", "FD_EVAL_CACHE", "--weights PATH")
    assert len(calls) == 1  # not retried


def test_no_network_fails_at_once_without_retries(tmp_path, monkeypatch, caplog):
    with FakeHub() as hub:
        point_hf_at(hub, monkeypatch, tmp_path / "hf")
        loc = hub.add_file("org/repo", "stats.npz", b"data")
        url = hub.add_mirror("w.pth", b"w")
    # the server is gone: every connection is refused
    caplog.set_level(logging.WARNING)
    with pytest.raises(DownloadError) as ei:
        download_hf(loc, progress=False)
    _one_line(ei.value, loc, hub.url)
    assert not [r for r in caplog.records if "Retry" in r.getMessage()], caplog.text
    assert len(hub.requests) == 0
    with pytest.raises(DownloadError) as ei:
        resolve_weights(None, WeightsSource(url, "w.pth"), "toy", offline=False)
    _one_line(ei.value, url, "--weights PATH")
    assert not (tmp_path / "hf").exists() or not list((tmp_path / "hf").rglob("*.incomplete"))


def test_no_network_still_serves_a_cached_hub_file(tmp_path, monkeypatch):
    with FakeHub() as hub:
        point_hf_at(hub, monkeypatch, tmp_path / "hf")
        loc = hub.add_file("org/repo", "stats.npz", b"data")
        path = download_hf(loc, progress=False)
    assert download_hf(loc, progress=False) == path and path.read_bytes() == b"data"


# --- §5 crafted npz files ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [np.array([3, 4]), np.array(np.nan), np.array("12"), np.array(True), np.array(0),
                               np.array(2.5), np.array([[7]])], ids=["vector", "nan", "string", "bool", "zero",
                                                                     "fraction", "2d"])
def test_npz_bad_n(tmp_path, n):
    p = tmp_path / "s.npz"
    np.savez(p, mu=np.zeros(3), sigma=np.eye(3), n=n)
    with pytest.raises(StatsFormatError) as ei:
        load_stats(p)
    _one_line(ei.value, p, "'n'")


def test_npz_good_n_forms(tmp_path):
    for i, n in enumerate([np.array(7), np.array([7]), np.array(7.0), np.uint32(7)]):
        p = tmp_path / f"s{i}.npz"
        np.savez(p, mu=np.zeros(3), sigma=np.eye(3), n=n)
        assert load_stats(p).n == 7


def _npy_header(shape: tuple[int, ...], dtype: str = "<f8") -> bytes:
    import io as _io

    buf = _io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED], ids=["stored", "deflated"])
def test_npz_header_claiming_huge_sigma_refused_before_allocation(tmp_path, compression):
    p = tmp_path / "crafted.npz"
    with zipfile.ZipFile(p, "w", compression) as zf:
        zf.writestr("mu.npy", _npy_header((2,)) + np.zeros(2).tobytes())
        zf.writestr("sigma.npy", _npy_header((100000, 100000)) + b"\0" * 16)
    assert p.stat().st_size < 1000
    with pytest.raises(StatsFormatError) as ei:
        load_stats(p)
    msg = _one_line(ei.value, p, "'sigma'", "(100000, 100000)")
    assert "damaged or crafted" in msg


def test_npz_deflate_ratio_beyond_possible_refused(tmp_path):
    p = tmp_path / "bomb.npz"
    body = _npy_header((1000, 1000)) + bytes(1000 * 1000 * 8)  # 8 MB of zeros deflate ~1000:1: legal
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("mu.npy", _npy_header((2,)) + np.zeros(2).tobytes())
        zf.writestr("sigma.npy", body)
    # rewrite the directory's uncompressed size to claim 1000x more than deflate can give (header in the file too)
    raw = bytearray(p.read_bytes())
    with zipfile.ZipFile(p) as zf:
        info = zf.getinfo("sigma.npy")
    old = info.file_size.to_bytes(4, "little")
    new = (0xFFFFFF00).to_bytes(4, "little")
    assert raw.count(old) == 2
    p.write_bytes(bytes(raw).replace(old, new))
    with pytest.raises(StatsFormatError) as ei:
        load_all_stats(p)
    _one_line(ei.value, p, "'sigma'")


def test_npz_object_and_bool_arrays(tmp_path):
    p = tmp_path / "b.npz"
    np.savez(p, mu=np.zeros(3, bool), sigma=np.eye(3))
    with pytest.raises(InvalidStatsError) as ei:
        load_stats(p)
    _one_line(ei.value, p, "'mu'")
    p = tmp_path / "o.npz"
    np.savez(p, mu=np.array([None, 1, 2], dtype=object), sigma=np.eye(3))
    with pytest.raises(StatsFormatError, match="never unpickles") as ei:
        load_stats(p)
    _one_line(ei.value, p)


# --- §5 safetensors metadata of the wrong JSON types ----------------------------------------------------------------
def _rewrite_meta(path: Path, mutate) -> None:
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(path), framework="numpy") as f:
        header = json.loads(f.metadata()["fd_eval"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = mutate(header)
    save_file(tensors, str(path), metadata={"fd_eval": header if isinstance(header, str) else json.dumps(header)})


def _stats_file(tmp_path: Path) -> Path:
    s = _small_stats(preprocess=None)
    s.metadata["preprocess"] = {"resize_library": "pil", "resize_filter": "bicubic", "antialias": True,
                                "size": [8, 8], "scale": 255.0, "mean": [0, 0, 0], "std": [1, 1, 1]}
    s.extras["key"] = np.array(["a", "bb", "ccc"])
    return save_stats(tmp_path / "s.safetensors", [s])


def _set(path: tuple, value):
    def mutate(h):
        node = h
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        return h
    return mutate


@pytest.mark.parametrize("path,value", [
    (("sections",), ["toy"]),
    (("sections", "toy"), "n=10"),
    (("sections", "toy", "preprocess"), "pil bicubic"),
    (("sections", "toy", "preprocess"), {"resize_library": "pil"}),
    (("string_extras",), 3),
    (("string_extras",), [1]),
    (("sections", "toy", "n"), True),
    (("sections", "toy", "n"), 10.5),
    (("sections", "toy", "extractor"), ["toy"]),
    (("sections", "toy", "weights_sha256"), 12),
    (("sections", "toy", "storage_dtype"), "int8"),
], ids=lambda v: str(v)[:24])
def test_safetensors_metadata_wrong_types(tmp_path, path, value):
    p = _stats_file(tmp_path)
    _rewrite_meta(p, _set(path, value))
    with pytest.raises(StatsFormatError) as ei:
        load_all_stats(p)
    _one_line(ei.value, p)


def test_safetensors_header_not_an_object(tmp_path):
    p = _stats_file(tmp_path)
    for text in ("[1, 2]", '"fd-eval-stats/1"', "{bad json"):
        _rewrite_meta(p, lambda h: text)
        with pytest.raises(StatsFormatError) as ei:
            load_all_stats(p)
        _one_line(ei.value, p)


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 10 ** 12) | st.floats(allow_nan=True)
                     | st.text(max_size=8), lambda kids: st.lists(kids, max_size=3)
                     | st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=6)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_safetensors_metadata_loads_or_refuses(tmp_path_factory, data):
    """Any mutation of the metadata JSON (replace a node, delete a key, add a key) either loads (and compares) or
    raises StatsFormatError / InvalidStatsError naming the file: never another exception."""
    p = _stats_file(tmp_path_factory.mktemp("fuzz"))
    from safetensors import safe_open

    with safe_open(str(p), framework="numpy") as f:
        header = json.loads(f.metadata()["fd_eval"])
    for _ in range(data.draw(st.integers(1, 3))):
        paths = list(_paths(header))
        path = data.draw(st.sampled_from(paths))
        op = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if not path:
            header = data.draw(_JSON) if op == "replace" else header
            continue
        parent = header
        for k in path[:-1]:
            parent = parent[k]
        if op == "replace":
            parent[path[-1]] = data.draw(_JSON)
        elif op == "delete":
            del parent[path[-1]]
        elif isinstance(parent[path[-1]], dict):
            parent[path[-1]][data.draw(st.text(max_size=6))] = data.draw(_JSON)
    _rewrite_meta(p, lambda h: json.dumps(header))
    try:
        sections = load_all_stats(p)
    except STATS_ERRORS as e:
        _one_line(e, p)
        event(f"refused: {type(e).__name__}")
        return
    event("loaded")
    for s in sections.values():
        compare_stats(s, s, allow_mismatch=True)
        s.preprocess  # noqa: B018 - must not raise either


# --- §5 user registry with wrong-typed fields -------------------------------------------------------------------
def _entry(**kw):
    e = {"location": "/data/r.npz", "format": "npz", "n": 10,
         "floors": {"toy": [{"n": 5, "fd": 1.0, "relation": "subset"}]}}
    e.update(kw)
    return e


@pytest.mark.parametrize("doc", [
    {"version": "1", "references": {}},
    {"version": 1, "references": {"r": _entry(description=["x"])}},
    {"version": 1, "references": {"r": _entry(split=3)}},
    {"version": 1, "references": {"r": _entry(n=True)}},
    {"version": 1, "references": {"r": _entry(models={"toy": {"weights_sha256": 5}})}},
    {"version": 1, "references": {"r": _entry(models={"toy": {"optional": "yes"}}) }},
    {"version": 1, "references": {"r": _entry(models={"toy": {"preprocess": "pil"}})}},
    {"version": 1, "references": {"r": _entry(floors={"toy": {"n": 5, "fd": 1.0}})}},
    {"version": 1, "references": {"r": _entry(floors={"toy": ["7.44"]})}},
    {"version": 1, "references": {"r": _entry(floors={"toy": [{"n": True, "fd": 1.0}]})}},
    {"version": 1, "references": {"r": _entry(floors={"toy": [{"n": 5.5, "fd": 1.0}]})}},
    {"version": 1, "references": {"r": _entry(floors={"toy": [{"n": 5, "fd": "1.0"}]})}},
    {"version": 1, "references": {"r": _entry(floors={"toy": [{"n": 5, "fd": float("nan")}]})}},
    {"version": 1, "references": {"r": _entry(floors={"toy": [{"n": 5, "fd": 1.0, "label": 3}]})}},
    {"version": 1, "references": {"r": _entry(floors={"toy": [{"n": 5, "fd": 1.0, "relation": "sub"}]})}},
], ids=lambda d: json.dumps(d)[-40:])
def test_user_registry_wrong_types(doc):
    path = refs.user_registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    with pytest.raises(UnknownReferenceError) as ei:
        refs.list_references()
    _one_line(ei.value, path)


def test_user_registry_valid_entry_parses():
    path = refs.user_registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "references": {"r": _entry()}}))
    (f,) = refs.get_reference("r").floors["toy"]
    assert (f.n, f.fd, f.relation) == (5, 1.0, "subset")


# --- §6 storage-aware FD, near-constant features ------------------------------------------------------------------
def test_float32_stored_statistics_keep_their_rank(tmp_path):
    """N = 500 images in 1024-d: the covariance has rank 499. Stored in float32, its null space carries float32
    rounding; a float64-only threshold counts ~760 directions (the rank reported before Stats kept the dtype)."""
    rng = np.random.default_rng(0)
    scale = np.sqrt(1.0 / np.arange(1, 1025))
    paths = []
    for i in range(2):
        x = rng.standard_normal((500, 1024)) * scale
        paths.append(tmp_path / f"{i}.npz")
        np.savez(paths[-1], mu=x.mean(0).astype(np.float32), sigma=np.cov(x, rowvar=False).astype(np.float32))
    a, b = (load_stats(p) for p in paths)
    assert a.storage_dtype == b.storage_dtype == "float32" and a.sigma.dtype == np.float64
    res, _ = compare_stats(a, b)
    assert (res.rank1, res.rank2) == (499, 499)
    a.save(tmp_path / "a.safetensors")  # the storage dtype survives a round trip through the native format
    a2 = load_stats(tmp_path / "a.safetensors")
    assert a2.storage_dtype == "float32"
    res2, _ = compare_stats(a2, b)
    assert res2.rank1 == 499 and res2.fd == res.fd
    a.storage_dtype = "float64"  # what Stats did before: the float64 threshold keeps rounding noise
    assert compare_stats(a, b)[0].rank1 > 600


def test_near_constant_features_warn(tmp_path):
    good = _small_stats(d=8, n=50)
    const = Stats.from_features(np.ones((50, 8)) * 3.0, {"extractor": "toy"})
    res, warns = compare_stats(const, const)
    assert res.fd == 0.0
    assert [w for w in warns if "nearly) constant" in w and "weights" in w]
    tiny = Stats.from_features(np.random.default_rng(1).standard_normal((50, 8)) * 1e-9 + 5.0, {"extractor": "toy"})
    assert any("constant" in w for w in compare_stats(tiny, good)[1])
    assert not any("constant" in w for w in compare_stats(good, good)[1])


# --- §6 floors ------------------------------------------------------------------------------------------------------
def test_published_floors_have_relations_and_the_model():
    f = refs.floor_for("gpic-test", "dinov2-vitl14", 50_000)
    assert (f.fd, f.relation) == (7.44, "subset") and f.to_dict()["relation"] == "subset"
    assert refs.floor_for("gpic-test", "dinov2", 200_000).relation == "independent"
    m = 1_000_000
    c = 7.44 / (1 / 50_000 - 1 / m)  # fitted to the subset floor
    fm = refs.floor_model("gpic-test", "dinov2-vitl14")
    assert fm.c == pytest.approx(c) and fm.m == m
    assert refs.independent_floor_estimate("gpic-test", "dinov2-vitl14", 50_000) == pytest.approx(c * 21 / m)
    assert round(refs.independent_floor_estimate("gpic-test", "dinov2-vitl14", 50_000), 1) == 8.2
    assert round(refs.independent_floor_estimate("gpic-test", "inception-v3-pt", 50_000), 2) == 0.75
    # the same c predicts the independent Val-200K floor within 2% of the published 2.37
    assert fm.independent(200_000) == pytest.approx(2.37, rel=0.02)
    assert fm.subset(50_000) == pytest.approx(7.44)
    assert refs.finite_n_shift("gpic-test", "dinov2-vitl14", 100_000) == pytest.approx(-c / 100_000)
    assert round(refs.finite_n_shift("gpic-test", "dinov2-vitl14", 100_000), 1) == -3.9
    assert refs.finite_n_shift("gpic-test", "dinov2-vitl14", 50_000) == 0.0
    assert round(refs.reference_bias("gpic-test", "dinov2-vitl14"), 2) == 0.39
    assert refs.floor_model("gpic-val", "dinov2-vitl14") is None  # no published floors


def test_floor_model_from_independent_floors_only():
    fl = (refs.Floor("m", 200_000, 2.4, relation="independent"), refs.Floor("m", 10_000, 9.9))  # no relation: unused
    fm = refs.FloorModel.fit(fl, 1_000_000)
    assert fm.c == pytest.approx(2.4 / (1 / 200_000 + 1 / 1_000_000))
    assert refs.FloorModel.fit((refs.Floor("m", 10_000, 9.9),), 1_000_000) is None


def test_docs_floor_table_matches_the_model():
    """docs/floors.md's table is what the registry and FloorModel give (rounded as printed)."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "floors.md").read_text()
    rows = [[c.strip(" *") for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| gpic-test")]
    assert len(rows) == 4
    for _ref, model, n, published, relation, subset, independent in rows:
        n = int(n.rstrip("K")) * 1000
        f = refs.floor_for("gpic-test", model, n)
        fm = refs.floor_model("gpic-test", model)
        assert published.split()[0] == f"{f.fd:g}" and relation == f.relation
        assert float(subset) == round(fm.subset(n), 2) and float(independent) == round(fm.independent(n), 2)


# --- issue 23 §4: weights-file problems are named as weights problems ---------------------------------------------
def _weights_error(path, *words):
    from fd_eval.errors import WeightsError
    from fd_eval.extractors.weights import load_state_dict

    with pytest.raises(WeightsError) as e:
        load_state_dict(path)
    msg = _one_line(e.value, path, *words)
    assert "weights_only=False" not in msg and "statistics" not in msg, msg
    return msg


def test_weights_with_nan_text_onnx_pickle_and_folder(tmp_path):
    import torch

    from fd_eval.errors import WeightsError

    sd = {"a.weight": torch.ones(3, 3), "b.bias": torch.tensor([0.0, float("nan"), 1.0])}
    torch.save(sd, tmp_path / "nan.pth")
    _weights_error(tmp_path / "nan.pth", "NaN or Inf", "b.bias", "download it again")
    (tmp_path / "w.txt").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1234\n")
    _weights_error(tmp_path / "w.txt", "text file", "state dict")
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07\x12\x07pytorch\x1a\x052.1.0" + bytes(100))
    _weights_error(tmp_path / "m.onnx", "ONNX is not supported")
    (tmp_path / "m.bin").write_bytes(b"\x08\x07\x12\x07pytorch\x1a\x052.1.0" + bytes(100))  # by content
    _weights_error(tmp_path / "m.bin", "ONNX is not supported")

    import datetime

    torch.save({"model": {"w": torch.ones(2)}, "saved": datetime.date(2026, 1, 1)}, tmp_path / "obj.pt")
    _weights_error(tmp_path / "obj.pt", "never unpickles", "torch.save(model.state_dict(), PATH)")
    (tmp_path / "empty.pth").write_bytes(b"")
    _weights_error(tmp_path / "empty.pth", "empty")
    (tmp_path / "folder").mkdir()
    with pytest.raises(WeightsError) as e:
        resolve_weights(tmp_path / "folder", WeightsSource("https://x/w.pth", "w.pth"), "dinov2-vits14")
    _one_line(e.value, tmp_path / "folder", "is a folder", "w.pth")


def test_weights_folder_on_the_command_line(tmp_path):
    from click.testing import CliRunner

    from _images import photo_crops, save_images
    from fd_eval.cli import main

    gen = save_images(photo_crops(3, 16, 16), tmp_path / "gen")
    (tmp_path / "wdir").mkdir()
    r = CliRunner().invoke(main, ["stats", str(gen), "-o", str(tmp_path / "s.safetensors"), "-m", "dinov2-vits14",
                                  "--weights", str(tmp_path / "wdir"), "--device", "cpu", "-q"])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "is a folder" in r.output, r.output


# --- issue 23 §4/§6: one rule for n and dtypes in both formats; widths refused from headers -----------------------
@pytest.mark.parametrize("n, ok", [(8, True), (8.0, True), (1e30, False), (2.5, False), (0, False), (True, False),
                                   (2 ** 53, True), (2 ** 53 + 2, False)])
def test_n_rule_is_the_same_for_npz_and_safetensors(tmp_path, n, ok):
    npz = tmp_path / "s.npz"
    np.savez(npz, mu=np.zeros(4), sigma=np.eye(4), n=np.array(n, dtype=np.float64 if isinstance(n, float) else
                                                               np.int64 if not isinstance(n, bool) else bool))
    st = _stats_file(tmp_path)
    _rewrite_meta(st, _set(("sections", "toy", "n"), n))
    for p in (npz, st):
        if ok:
            assert load_stats(p).n == int(n)
        else:
            with pytest.raises(StatsFormatError) as ei:
                load_stats(p)
            _one_line(ei.value, p, "2**53")


def test_float16_sigma_warns_in_both_formats(tmp_path):
    x = np.random.default_rng(1).standard_normal((50, 4))
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    np.savez(tmp_path / "h.npz", mu=mu, sigma=sigma.astype(np.float16), n=50)
    s = Stats(mu, sigma.astype(np.float16), 50, {})
    save_stats(tmp_path / "h.safetensors", [s])
    other = Stats.from_features(x[::-1])
    for p in (tmp_path / "h.npz", tmp_path / "h.safetensors"):
        loaded = load_stats(p)
        assert loaded.storage_dtype == "float16"
        _, warns = compare_stats(other, loaded)
        assert [w for w in warns if "float16" in w and str(p) in w and "re-save" in w], warns
    _, warns = compare_stats(other, Stats(mu, sigma, 50, {}))
    assert not [w for w in warns if "float16" in w]


def _zeros_member(zf: zipfile.ZipFile, name: str, shape: tuple[int, ...]) -> None:
    """A .npy member of float64 zeros written in chunks (the test never holds the array)."""
    with zf.open(name, "w", force_zip64=True) as f:
        f.write(_npy_header(shape))
        left = int(np.prod(shape)) * 8
        chunk = bytes(1 << 22)
        while left:
            f.write(chunk[:min(left, len(chunk))])
            left -= min(left, len(chunk))


def test_statistics_wider_than_the_limit_refused_from_the_header(tmp_path, monkeypatch):
    p = tmp_path / "wide.npz"  # 5000 x 5000 float64 zeros: 200 MB, a few hundred KB deflated
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as zf:
        _zeros_member(zf, "mu.npy", (5000,))
        _zeros_member(zf, "sigma.npy", (5000, 5000))
    assert p.stat().st_size < 2_000_000
    with pytest.raises(StatsFormatError) as ei:
        load_stats(p)
    _one_line(ei.value, p, "'mu'", "(5000,)", "limit of 4096", "FD_EVAL_MAX_STATS_DIM")
    # safetensors: the header's shapes, before a tensor is read
    s = Stats(np.zeros(80), np.eye(80), 10, {"extractor": "toy"})
    save_stats(tmp_path / "w.safetensors", [s])
    monkeypatch.setenv("FD_EVAL_MAX_STATS_DIM", "64")
    with pytest.raises(StatsFormatError) as ei:
        load_stats(tmp_path / "w.safetensors")
    _one_line(ei.value, tmp_path / "w.safetensors", "(80,)", "limit of 64")
    monkeypatch.setenv("FD_EVAL_MAX_STATS_DIM", "0")  # no limit
    assert load_stats(tmp_path / "w.safetensors").dim == 80


# --- issue 23 §5: safetensors' own full-disk error is an OutputError line, in every writer -----------------------
_SAFETENSORS_FULL = ('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left '
                     'on device" })')


def _safetensors_full(tensors, filename, metadata=None):
    from safetensors import SafetensorError

    Path(filename).write_bytes(b"partial")
    raise SafetensorError(_SAFETENSORS_FULL)


@pytest.mark.parametrize("writer", ["save_stats", "unit", "feature_shards"])
def test_safetensors_disk_full_is_one_output_error(tmp_path, monkeypatch, writer):
    import safetensors.numpy as stn
    import safetensors.torch as stt
    import torch

    from fd_eval.metrics.build import save_unit_file
    from fd_eval.metrics.copies import FeatureShardWriter

    monkeypatch.setattr(stn, "save_file", _safetensors_full)
    monkeypatch.setattr(stt, "save_file", _safetensors_full)
    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(OutputError) as ei:
        if writer == "save_stats":
            save_stats(out / "s.safetensors", [_small_stats()])
        elif writer == "unit":
            save_unit_file(out / "unit-000000.safetensors", {"a": 1}, {"x": torch.zeros(2)})
        else:
            w = FeatureShardWriter(out, rows=2)
            w.update(torch.zeros(2, 3), torch.arange(2))
    assert ei.value.errno == errno.ENOSPC
    _one_line(ei.value, out, "ENOSPC", "No space left on device")
    assert os.listdir(out) == []


# --- issue 23 §5: configuration paths and hostile report input are one line ---------------------------------------
def test_fd_eval_config_that_is_a_file_or_holds_a_folder(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from fd_eval.cli import main

    cfg = tmp_path / "cfg"
    cfg.write_text("not a folder")
    monkeypatch.setenv("FD_EVAL_CONFIG", str(cfg))
    for argv in (["ref", "list"], ["ref", "remove", "mine"]):
        r = CliRunner().invoke(main, argv)
        assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
        assert str(cfg) in r.output and "FD_EVAL_CONFIG" in r.output and "is a file" in r.output
    with pytest.raises(UnknownReferenceError) as ei:
        refs.list_references()
    _one_line(ei.value, cfg, "FD_EVAL_CONFIG")
    cfg.unlink()
    (cfg / "references.json").mkdir(parents=True)
    with pytest.raises(UnknownReferenceError) as ei:
        refs.list_references()
    _one_line(ei.value, cfg / "references.json", "is a folder")


def test_report_refuses_json_nested_deeper_than_results(tmp_path):
    from click.testing import CliRunner

    from fd_eval.cli import main
    from fd_eval.errors import InputError
    from fd_eval.outputs.report import MAX_JSON_DEPTH, read_input

    deep = tmp_path / "deep.json"
    deep.write_text('{"results": {"m": ' + "[" * 100_000 + "]" * 100_000 + "}}")
    with pytest.raises(InputError) as ei:
        read_input(deep)
    _one_line(ei.value, deep, "100002 levels", str(MAX_JSON_DEPTH))
    r = CliRunner().invoke(main, ["report", str(deep), "-o", str(tmp_path / "r.html")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "levels deep" in r.output, r.output
    ok = tmp_path / "ok.json"  # brackets inside strings do not count
    ok.write_text(json.dumps({"results": {"m": {"fd": 1.0, "note": "[[[[" * 100}}}))
    assert read_input(ok).doc["results"]["m"]["fd"] == 1.0


# --- issue 23 §7: the FD step's thread count follows the problem size and the free cores -----------------------
def test_choose_threads_rules(monkeypatch):
    import torch

    from fd_eval.util import threads as th

    monkeypatch.delenv("FD_EVAL_LINALG_THREADS", raising=False)
    monkeypatch.setattr(th, "usable_cores", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(th, "other_runnable", lambda: 0)
    assert th.choose_threads(64) == 1  # small: never threaded
    assert th.choose_threads(2048) == 8  # idle: every core
    monkeypatch.setattr(th, "other_runnable", lambda: 5)
    assert th.choose_threads(2048) == 3  # 5 of 8 cores busy
    monkeypatch.setattr(th, "other_runnable", lambda: 40)
    assert th.choose_threads(2048) == 1  # overloaded: one thread, never zero
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(th, "other_runnable", lambda: 0)
    assert th.choose_threads(2048) == 2  # never above the user's torch.set_num_threads
    monkeypatch.setenv("FD_EVAL_LINALG_THREADS", "3")
    assert th.choose_threads(64) == 3
    monkeypatch.setenv("FD_EVAL_LINALG_THREADS", "x")
    with pytest.raises(FDEvalError, match="FD_EVAL_LINALG_THREADS"):
        th.choose_threads(64)


def test_fd_runs_at_the_chosen_count_and_restores_torch(monkeypatch):
    import torch

    from fd_eval.core import frechet
    from fd_eval.util import threads as th

    seen = []
    real = frechet.factor_covariance

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(frechet, "factor_covariance", spy)
    monkeypatch.setenv("FD_EVAL_LINALG_THREADS", "1")
    before = torch.get_num_threads()
    a, b = _small_stats(d=300, n=400, seed=1), _small_stats(d=300, n=400, seed=2)
    one = frechet.frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    assert seen == [1, 1] and torch.get_num_threads() == before
    monkeypatch.setenv("FD_EVAL_LINALG_THREADS", "0")  # torch's default
    seen.clear()
    assert frechet.frechet_distance(a.mu, a.sigma, b.mu, b.sigma) == pytest.approx(one, rel=1e-10)
    assert seen == [before, before]
    assert th.other_runnable() is None or th.other_runnable() >= 0
