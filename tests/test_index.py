"""The training index: `fd-eval copies --train-index` equals `--train` (the whole results JSON, C_T and AuthPct
included) for a float32 index; the blocked float32 scan equals the float64 top-K bit for bit (ties, exclusion,
any block size); resume, append, refusal of another extractor's index, the float16 error, FAISS, `index info`.

Equality checks are exact (==). The float16 bound is the measured error's ceiling (see docs/copies.md).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fd_eval
import fd_eval.metrics.build as fb
from _images import photo_crops, save_images
from fd_eval.cli import main
from fd_eval.errors import InputError
from fd_eval.extractors.preprocess import PreprocessSpec
from fd_eval.index import ExactScan, open_index
from fd_eval.index.build import index_from_features
from fd_eval.metrics import copies as cp
from test_copies import PixelExtractor, brute_topk, jpeg75, tied_features

TESTS = Path(__file__).parent
KW = dict(top_k=3, threshold=0.9, num_workers=0, batch_size=3, progress=False)
UNIT = 7


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """gen: JPEG re-encodes of training images 0..11 + 40 novel crops; train: 40 crops; test: 30 held-out."""
    root = tmp_path_factory.mktemp("index")
    train = photo_crops(40, 32, 32, seed=1)
    gen = np.concatenate([np.stack([jpeg75(a) for a in train[:12]]), photo_crops(40, 32, 32, seed=2)])
    test = photo_crops(30, 32, 32, seed=3)
    return {k: save_images(v, root / k) for k, v in (("gen", gen), ("train", train), ("test", test))} | {"root": root}


def build(sets, out, **kw):
    return fd_eval.build_index(sets["train"], out, extractors=[PixelExtractor()], checkpoint_every=UNIT,
                               num_workers=0, batch_size=3, progress=False, **kw)


@pytest.fixture(scope="module")
def index32(sets):
    return build(sets, sets["root"] / "idx32")


@pytest.fixture(scope="module")
def live(sets):
    return fd_eval.find_copies(sets["gen"], sets["train"], extractors=[PixelExtractor()], test=sets["test"], **KW)


def test_train_index_json_equals_live_pass(sets, index32, live, tmp_path):
    """The whole results document (per-image lists, similarities, AuthPct, C_T, histogram...) is identical."""
    got = fd_eval.find_copies(sets["gen"], train_index=index32.root, extractors=[PixelExtractor()],
                              test=sets["test"], json_path=tmp_path / "c.json", sheet=tmp_path / "s.png", **KW)
    assert got.to_dict()["results"] == live.to_dict()["results"]
    r = got.results["pixels-16"]
    assert r["ct"] is not None and r["authpct"] is not None and "search" not in r
    assert [p["nearest"][0]["index"] for p in r["per_image"][:12]] == list(range(12))
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["provenance"]["train_index"]["n_rows"] == 40 and doc["provenance"]["train"]["spec"] == str(index32.root)
    from PIL import Image

    with Image.open(tmp_path / "s.png") as im:  # training thumbnails read from the index's recorded source
        assert im.getpixel((6 + 160 + 6 + 80, 6 + 80)) != (205, 205, 205)


def test_index_files_hold_unit_vectors_keys_and_provenance(sets, index32):
    info = index32.info()
    assert (info["n_rows"], info["n_units"], info["dtype"]) == (40, 6, "float32")
    f, k, n = index32.read(index32.units[1], "pixels-16", norm=True)
    assert k.tolist() == list(range(7, 14)) and f.dtype == torch.float32 and n.dtype == torch.float64
    assert torch.allclose(f.double().norm(dim=1), torch.ones(7, dtype=torch.float64), atol=1e-6)
    assert index32.describe(9) == str(Path(sets["train"]) / "009.png")
    assert info["extractors"]["pixels-16"]["preprocess"]["size"] == [16, 16]
    assert info["parts"][0]["fingerprint"] == fd_eval.open_source(sets["train"]).fingerprint()


@pytest.mark.parametrize("work,dtype,extra", [(64, torch.float32, 27), (64, torch.float32, 2),
                                              (1 << 20, torch.float32, 2), (64, torch.float64, 27)])
def test_blocked_scan_equals_brute_force_with_ties(work, dtype, extra, monkeypatch):
    """Many exact ties (repeated rows, integer features), blocks of a few rows and queries, float32 candidate
    stage with K + ``extra`` candidates: the lists equal brute force (similarity desc, key asc) and the float64
    consumer, bit for bit; with 2 extra candidates the ties send rows to the float64 fallback."""
    import fd_eval.index.scan as scan

    monkeypatch.setattr(scan, "EXTRA", extra)
    q, raw, keys = tied_features(n_q=9, n_t=300, d=16, seed=2)
    t = torch.nn.functional.normalize(raw.double(), dim=1).float()  # what a float32 index stores
    want_s, want_k = brute_topk(q, raw, keys, 5)
    sc = ExactScan(q, 5, scan_dtype=dtype, work=work)
    for a in range(0, 300, 100):
        sc.update(t[a:a + 100], keys[a:a + 100])
    s, k, _ = cp.unpack(sc.state.packed)
    assert torch.equal(k, want_k) and torch.equal(s, want_s)
    live = cp.TopKConsumer(q, 5)
    live.update(raw, keys)
    assert torch.equal(live.state.packed, sc.state.packed)
    if dtype == torch.float32 and extra == 2:
        assert sc.rescored_rows > 0  # the ties sent rows to the float64 fallback


def test_blocked_scan_random_large_block_and_exclusion():
    g = torch.Generator().manual_seed(5)
    raw = torch.randn(3000, 32, generator=g)
    t = torch.nn.functional.normalize(raw.double(), dim=1).float()
    keys = torch.arange(3000) * 3
    q = torch.cat([t[:4].double() + 1e-3 * torch.randn(4, 32, generator=g, dtype=torch.float64),
                   torch.randn(20, 32, generator=g, dtype=torch.float64)])
    excl = torch.cat([keys[:4], torch.full((20,), -1)])
    sc = ExactScan(q, 4, exclude=excl, work=10_000)
    sc.update(t, keys)
    live = cp.TopKConsumer(q, 4, exclude=excl)
    live.update(raw, keys)
    assert torch.equal(sc.state.packed, live.state.packed)
    assert (cp.unpack(sc.state.packed)[1][:4] != keys[:4, None]).all()


def test_interrupted_build_resumes_to_the_same_index(sets, index32, tmp_path, monkeypatch):
    real, calls = fb.save_unit_file, []

    def save(path, header, tensors, *meta):
        real(path, header, tensors, *meta)
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(fb, "save_unit_file", save)
    with pytest.raises(KeyboardInterrupt):
        build(sets, tmp_path / "idx")
    monkeypatch.undo()
    with pytest.raises(InputError, match="has not finished; run the same `fd-eval index build`"):
        open_index(tmp_path / "idx")
    notes = []
    idx = fd_eval.build_index(sets["train"], tmp_path / "idx", extractors=[PixelExtractor()], checkpoint_every=UNIT,
                              num_workers=0, batch_size=3, progress=False, log=notes.append)
    assert any("2 of 6 units already done" in n for n in notes)
    for u, v in zip(idx.units, index32.units):
        a, b = idx.read(u, "pixels-16", norm=True), index32.read(v, "pixels-16", norm=True)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(InputError, match="already holds an index of .*pass --append"):
        build(sets, tmp_path / "idx")


def test_append_adds_a_part_without_rewriting(sets, live, tmp_path):
    """train split in two folders: the index of part 1 + appended part 2 finds the same neighbours (keys are
    positions over both parts) as the live pass over the whole folder."""
    import shutil

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for i, p in enumerate(sorted(Path(sets["train"]).iterdir())):
        shutil.copy(p, (a if i < 20 else b) / p.name)
    kw = dict(extractors=[PixelExtractor()], num_workers=0, batch_size=3, progress=False)
    fd_eval.build_index(a, tmp_path / "idx", **kw)
    first = (tmp_path / "idx" / "units" / "unit-000000.safetensors").stat().st_mtime_ns
    idx = fd_eval.build_index(b, tmp_path / "idx", append=True, **kw)
    assert len(idx.parts) == 2 and idx.n_rows == 40 and idx.parts[1]["offset"] == 20
    assert (tmp_path / "idx" / "units" / "unit-000000.safetensors").stat().st_mtime_ns == first
    got = fd_eval.find_copies(sets["gen"], train_index=idx, extractors=[PixelExtractor()], test=sets["test"], **KW)
    want = live.results["pixels-16"]
    r = got.results["pixels-16"]
    strip = [[(n["index"], n["similarity"]) for n in p["nearest"]] for p in want["per_image"]]
    assert [[(n["index"], n["similarity"]) for n in p["nearest"]] for p in r["per_image"]] == strip
    assert r["authpct"] == want["authpct"] and r["per_image"][0]["nearest"][0]["key"] == str(a / "000.png")


class OtherPixels(PixelExtractor):
    def __init__(self):
        super().__init__()
        self.preprocess_spec = PreprocessSpec("pil", "bicubic", True, (16, 16), 255.0, (0.0,) * 3, (1.0,) * 3)


def test_index_of_another_extractor_is_refused_naming_both(sets, index32):
    with pytest.raises(InputError, match=r"idx32: the index's pixels-16 features were made with another "
                                         r"preprocessing resize_filter='bilinear' \(index\) vs "
                                         r"resize_filter='bicubic' \(this run\)"):
        fd_eval.find_copies(sets["gen"], train_index=index32.root, extractors=[OtherPixels()], **KW)
    with pytest.raises(InputError, match="one of the two"):
        fd_eval.find_copies(sets["gen"], sets["train"], train_index=index32.root, extractors=[PixelExtractor()])
    with pytest.raises(InputError, match="no index.json: not an fd-eval index"):
        fd_eval.find_copies(sets["gen"], train_index=sets["train"], extractors=[PixelExtractor()])


def test_float16_index_similarity_error(sets, live):
    """float16 rows: every reported similarity within 1e-3 of the float32 index's (measured: see docs)."""
    idx = build(sets, sets["root"] / "idx16", dtype="float16")
    assert idx.dtype == "float16" and idx.read(idx.units[0], "pixels-16")[0].dtype == torch.float16
    r = fd_eval.find_copies(sets["gen"], train_index=idx, extractors=[PixelExtractor()], **KW).results["pixels-16"]
    a = np.array([[n["similarity"] for n in p["nearest"]] for p in live.results["pixels-16"]["per_image"]])
    b = np.array([[n["similarity"] for n in p["nearest"]] for p in r["per_image"]])
    assert 0 < np.abs(a[:, 0] - b[:, 0]).max() < 1e-3


def test_float16_error_on_random_unit_vectors(tmp_path):
    """512-d random unit vectors: |sim16 - sim32| over all pairs <= 2.5e-4 (the bound docs/copies.md quotes)."""
    g = torch.Generator().manual_seed(0)
    t = torch.nn.functional.normalize(torch.randn(2000, 512, generator=g, dtype=torch.float64), dim=1)
    q = torch.cat([t[:50] + 0.05 * torch.randn(50, 512, generator=g, dtype=torch.float64),
                   torch.randn(50, 512, generator=g, dtype=torch.float64)])
    q = torch.nn.functional.normalize(q, dim=1)
    s32 = q @ t.float().double().T
    s16 = q @ t.half().double().T
    err = (s32 - s16).abs().max().item()
    assert 1e-5 < err < 2.5e-4


def test_approximate_search_records_recall(sets, index32, live):
    got = fd_eval.find_copies(sets["gen"], train_index=index32.root, approximate=True, extractors=[PixelExtractor()],
                              test=sets["test"], **KW)
    r = got.results["pixels-16"]
    s = r.pop("search")
    assert s["approximate"] is True and s["recall_sample"] == 52 and s["recall_at_1"] == 1.0
    assert s["method"].startswith("faiss IVF1,") and s["faiss_bytes"] > 0
    assert r == live.results["pixels-16"]  # one IVF cell holds every row: the exact result
    assert list((index32.root / "approx").glob("pixels-16-ivf1-sq8.faiss"))


def test_approximate_recall_on_random_vectors(tmp_path):
    """2,000 random 64-d rows in 16 IVF cells, queries near 100 of them: recall@1 of the planted pairs is 1."""
    from fd_eval.index.approx import approximate_pass, recall_at_1  # noqa: F401

    g = torch.Generator().manual_seed(1)
    t = torch.randn(2000, 64, generator=g)
    ex = PixelExtractor()
    meta = {**ex.metadata(), "feature_dim": 64}
    idx = index_from_features(tmp_path / "r", "pixels-16", meta, t, unit_rows=300)
    from fd_eval.index.approx import load_or_build, rescore

    ivf = load_or_build(idx, "pixels-16", nlist=16)
    ivf.nprobe = 4
    q = t[:100] + 0.1 * torch.randn(100, 64, generator=g)
    qn = torch.nn.functional.normalize(q.double(), dim=1).float().numpy()
    _, cand = ivf.search(qn, 32)
    packed = rescore(idx, "pixels-16", q, cand, 3)
    rec = recall_at_1(idx, "pixels-16", q, packed, sample=50)
    assert rec["recall_at_1"] == 1.0 and rec["n_above_0.5"] == 50
    assert cp.unpack(packed)[1][:, 0].tolist() == list(range(100))


def test_cli_index_build_info_and_copies(sets, index32, live, tmp_path):
    import fd_eval.extractors as fx

    r = CliRunner().invoke(main, ["index", "info", str(index32.root)])
    assert r.exit_code == 0, r.output
    assert "rows: 40 of 40 images (0 skipped), 6 units, float32" in r.output and "pixels-16" in r.output
    r = CliRunner().invoke(main, ["index", "info", str(index32.root), "--json"])
    assert json.loads(r.output)["n_rows"] == 40
    r = CliRunner().invoke(main, ["index", "info", str(tmp_path)])
    assert r.exit_code == 1 and "Error: " in r.output and "not an fd-eval index" in r.output
    r = CliRunner().invoke(main, ["copies", str(sets["gen"]), "--approximate", "-m", "sscd-disc-mixup"])
    assert r.exit_code == 1 and "one of the two" in r.output
    assert fx is not None


@pytest.mark.slow
def test_torchrun_two_processes_build_the_same_index(sets, index32, tmp_path):
    """2 gloo ranks build the index (every other unit each), then scan it: the same files and the same JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    from test_copies_run import _free_port

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({**{k: str(v) for k, v in sets.items()}, "out": str(tmp_path), "unit": UNIT, **KW}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(TESTS / "_index_worker.py"), str(cfg)]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    idx = open_index(tmp_path / "idx")
    for u, v in zip(idx.units, index32.units):
        assert all(torch.equal(x, y) for x, y in zip(idx.read(u, "pixels-16", norm=True),
                                                    index32.read(v, "pixels-16", norm=True)))
    live = fd_eval.find_copies(sets["gen"], sets["train"], extractors=[PixelExtractor()], test=sets["test"], **KW)
    for r in (0, 1):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == live.to_dict()["results"]


def test_cli_build_then_copies_train_index_equals_copies_train(tmp_path):
    """The real CLI end to end with DINOv2 (random weights, 2 blocks): `index build` then `copies --train-index`
    gives the JSON results of `copies --train` (same batch size and units: the same float32 features)."""
    import functools

    import fd_eval.extractors.dinov2 as dv
    from test_copies_run import DEPTH

    root = tmp_path
    train = photo_crops(12, 32, 32, seed=1)
    gen = np.concatenate([np.stack([jpeg75(a) for a in train[:4]]), photo_crops(6, 32, 32, seed=2)])
    s = {k: save_images(v, root / k) for k, v in (("gen", gen), ("train", train))}
    from _checkpoints import save_dinov2_checkpoint

    w, _ = save_dinov2_checkpoint(root / "dinov2_vits14_pretrain.pth", "vits14", "official", seed=3, depth=DEPTH)
    common = ["-m", "dinov2-vits14", "--weights", str(w), "--checkpoint-every", "5", "--batch-size", "2",
              "--num-workers", "0", "--device", "cpu", "-q"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dv, "_build_extractor", functools.partial(dv._build_extractor, _depth=DEPTH))
        r = CliRunner().invoke(main, ["index", "build", str(s["train"]), "-o", str(root / "idx"), *common])
        assert r.exit_code == 0, r.output + repr(r.exception)
        assert "wrote" in r.output and "12 rows (0 skipped) in 3 units, float32, dinov2-vits14" in r.output
        outs = []
        for how in (["--train", str(s["train"])], ["--train-index", str(root / "idx")]):
            out = root / f"{len(outs)}.json"
            r = CliRunner().invoke(main, ["copies", str(s["gen"]), *how, "--top", "2", "--threshold", "0.9",
                                          *common, "--json", str(out)])
            assert r.exit_code == 0, r.output + repr(r.exception)
            outs.append(json.loads(out.read_text()))
        r = CliRunner().invoke(main, ["copies", str(s["gen"]), "--train-index", str(root / "idx"), "--approximate",
                                      "--top", "2", "--threshold", "0.9", *common, "--json", str(root / "a.json")])
        assert r.exit_code == 0, r.output + repr(r.exception)
        assert "approximate search (faiss IVF1,sq8 inner product, nprobe 1): recall@1 1.000 on 10 queries" in r.output
    assert outs[0]["results"] == outs[1]["results"]
    assert outs[1]["results"]["dinov2-vits14"]["authpct"] is not None


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_index_build_stopped_by_a_signal_resumes_bit_identically(tmp_path, monkeypatch, sig):
    """`fd-eval index build` stopped by Ctrl-C (SIGINT) or a scheduler's SIGTERM after its first unit file: exit
    status 128 + the signal, one line, no temp file; the same command resumes to the rows of an uninterrupted build."""
    import functools

    import fd_eval.extractors.dinov2 as dv
    from _checkpoints import save_dinov2_checkpoint
    from test_copies_run import DEPTH

    train = save_images(photo_crops(9, 32, 32, seed=1), tmp_path / "train")
    w, _ = save_dinov2_checkpoint(tmp_path / "dinov2_vits14_pretrain.pth", "vits14", "official", seed=3, depth=DEPTH)
    monkeypatch.setattr(dv, "_build_extractor", functools.partial(dv._build_extractor, _depth=DEPTH))

    def index_build(out):
        return CliRunner().invoke(main, ["index", "build", str(train), "-o", str(out), "-m", "dinov2-vits14",
                                         "--weights", str(w), "--checkpoint-every", "3", "--batch-size", "2",
                                         "--num-workers", "0", "--device", "cpu", "-q"])

    r = index_build(tmp_path / "whole")
    assert r.exit_code == 0, r.output + repr(r.exception)
    real, calls = fb.save_unit_file, []

    def save(*a, **kw):
        real(*a, **kw)
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), sig)  # delivered at once (os.kill checks pending signals on return)
            raise AssertionError(f"{sig.name} did not stop the command")

    monkeypatch.setattr(fb, "save_unit_file", save)
    previous = signal.signal(sig, signal.SIG_IGN)  # a SIGTERM the CLI failed to catch must not end pytest
    try:
        r = index_build(tmp_path / "idx")
    finally:
        signal.signal(sig, previous)
    assert r.exit_code == 128 + sig, r.output + repr(r.exception)
    assert r.output.strip().splitlines()[-1] == f"Error: interrupted ({sig.name}); nothing half-written was left"
    assert "run the same command again to resume" in r.output and "Traceback" not in r.output
    assert not [q for q in tmp_path.rglob("*") if q.name.endswith(".tmp")]
    monkeypatch.setattr(fb, "save_unit_file", real)
    r = index_build(tmp_path / "idx")
    assert r.exit_code == 0 and "1 of 3 units already done" in r.output, r.output + repr(r.exception)
    idx, whole = open_index(tmp_path / "idx"), open_index(tmp_path / "whole")
    assert len(idx.units) == len(whole.units) == 3
    for u, v in zip(idx.units, whole.units):
        assert all(torch.equal(x, y) for x, y in zip(idx.read(u, "dinov2-vits14", norm=True),
                                                    whole.read(v, "dinov2-vits14", norm=True)))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_rows_gathered_from_memory_maps_equal_the_unit_files(tmp_path, dtype):
    """rows(keys) (any order, repeats) == the units' stored features, read whole with safetensors."""
    g = torch.Generator().manual_seed(3)
    ex = PixelExtractor()
    idx = index_from_features(tmp_path / "g", "pixels-16", {**ex.metadata(), "feature_dim": 24},
                              torch.randn(1000, 24, generator=g), unit_rows=130, dtype=dtype)
    whole = torch.cat([f.float() for _, f, _, _ in idx.iter_units("pixels-16")])
    keys = torch.cat([torch.randint(0, 1000, (500,), generator=g), torch.tensor([999, 0, 0, 129, 130])])
    assert torch.equal(idx.rows("pixels-16", keys), whole[keys])
    assert idx.rows("pixels-16", keys[:0]).shape == (0, 24)
    with pytest.raises(InputError, match="key 1000 is not in the index"):
        idx.rows("pixels-16", torch.tensor([3, 1000]))


def test_rescore_gathers_candidates_and_equals_the_exact_scan(tmp_path, monkeypatch):
    """The re-scored top-K of candidate lists holding the exact top-K (shuffled, with other rows and -1 padding)
    equals the exact scan's packed top-K bit for bit, and reads no unit whole (no pass over the index)."""
    from fd_eval.index import scan_index
    from fd_eval.index.approx import rescore

    g = torch.Generator().manual_seed(4)
    ex = PixelExtractor()
    idx = index_from_features(tmp_path / "s", "pixels-16", {**ex.metadata(), "feature_dim": 48},
                              torch.randn(3000, 48, generator=g), unit_rows=400)
    q = torch.randn(300, 48, generator=g)
    exact = scan_index(idx, "pixels-16", q, 5).state.packed
    top = cp.unpack(exact)[1]
    cand = torch.cat([top, torch.randint(0, 3000, (300, 20), generator=g), torch.full((300, 3), -1)], 1)
    cand = cand[:, torch.randperm(cand.shape[1], generator=g)].numpy()
    monkeypatch.setattr(type(idx), "read", lambda *a, **k: pytest.fail("rescore read a whole unit"))
    import fd_eval.index.approx as ap
    monkeypatch.setattr(ap, "RESCORE_WORK", 48 * 28 * 7)  # blocks of 7 queries
    assert torch.equal(rescore(idx, "pixels-16", q, cand, 5), exact)


@pytest.mark.skipif(not hasattr(torch.backends, "fp32_precision"), reason="PyTorch without the fp32_precision API")
def test_scan_under_the_new_fp32_api_equals_and_restores(tmp_path):
    """A caller who set TF32 through PyTorch's new ``fp32_precision`` API (where the legacy ``allow_tf32`` getter
    raises) gets the same exact scan, and its settings back unchanged."""
    from fd_eval.index import scan_index

    g = torch.Generator().manual_seed(5)
    ex = PixelExtractor()
    idx = index_from_features(tmp_path / "s", "pixels-16", {**ex.metadata(), "feature_dim": 48},
                              torch.randn(900, 48, generator=g), unit_rows=400)
    q = torch.randn(40, 48, generator=g)
    want = scan_index(idx, "pixels-16", q, 5).state.packed
    b = torch.backends
    levels = {"global": b, "matmul": b.cuda.matmul}
    saved = {k: o.fp32_precision for k, o in levels.items()}
    try:
        b.fp32_precision, b.cuda.matmul.fp32_precision = "tf32", "tf32"
        with pytest.raises(RuntimeError):  # the state the old code read through the legacy getter
            _ = b.cuda.matmul.allow_tf32
        assert torch.equal(scan_index(idx, "pixels-16", q, 5).state.packed, want)
        assert (b.fp32_precision, b.cuda.matmul.fp32_precision) == ("tf32", "tf32")
    finally:
        for k, o in levels.items():
            o.fp32_precision = saved[k]
