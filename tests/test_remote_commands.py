"""Remote sources wherever a source is accepted: `ceiling --real`, `copies --train`, `index build` (then `copies
--train-index` over that index) on tar shards streamed from the loopback Hub (`hf://` and `http://` brace ranges)
and on a Parquet file on the Hub, each giving the very JSON values of the same data on local disk.

Streamed and local runs use the same batch size and units, so their features are bit-identical and every float of
the results is compared with ==. Item names differ only by where the shards live (a URL instead of a folder), so
the remote documents are compared after that prefix is mapped back to the local folder.
"""
from __future__ import annotations

import functools
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import fd_eval
import fd_eval.extractors.dinov2 as dv
from _checkpoints import save_dinov2_checkpoint
from _fake_hub import FakeHub, point_hf_at
from _gpic_shards import make_shards
from _images import photo_crops, save_images
from fd_eval.cli import main

MODEL, DEPTH = "dinov2-vits14", 2
N_SHARDS, PER_SHARD = 3, 3
RANGE = "{00000..00002}"
NULL_ROW = 4  # the Parquet copy of the training set has a null image in this row (row groups of 4)
# hf:// and http:// differ below the source layer only (tests/test_remote.py runs both): the fast tier runs each
# command over one of them, and hf:// in the slow tier
HF_SLOW = pytest.param("hf", marks=pytest.mark.slow)


def _jpeg(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=75)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """train: 3 GPIC-layout shards of 3 images (PNG/JPEG); gen: JPEG re-encodes of 3 training images + 3 novel
    crops; a reference statistics file from 6 other crops; the training images again as one Parquet file."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    root = tmp_path_factory.mktemp("remote_cmds")
    ckpt, _ = save_dinov2_checkpoint(root / "dinov2_vits14_pretrain.pth", "vits14", "official", seed=3, depth=DEPTH)
    train = photo_crops(N_SHARDS * PER_SHARD, 48, 48, seed=31)
    paths, samples = make_shards(root / "shards", train, PER_SHARD, split="train")
    gen = np.concatenate([np.stack([_jpeg(a) for a in train[:3]]), photo_crops(3, 48, 48, seed=32)])
    gen_dir = save_images(gen, root / "gen")
    ex = dv._build_extractor("vits14", False, weights=ckpt, _depth=DEPTH)
    ref = root / "ref.safetensors"
    fd_eval.compute_stats(save_images(photo_crops(6, 48, 48, seed=33), root / "ref"), extractors=[ex],
                          num_workers=0, progress=False)[MODEL].save(ref)
    rows = [{"bytes": s.data, "path": f"{s.key}.{s.ext}"} for s in samples]
    rows.insert(NULL_ROW, None)
    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    parquet = root / "pq" / "train-00000.parquet"
    parquet.parent.mkdir()
    pq.write_table(pa.table({"image": pa.array(rows, type=img_type)}), parquet, row_group_size=4)
    return {"root": root, "ckpt": ckpt, "shards": root / "shards", "data": {p.name: p.read_bytes() for p in paths},
            "gen": gen_dir, "ref": ref, "parquet": parquet}


@pytest.fixture()
def hub(world, monkeypatch, tmp_path):
    with FakeHub() as h:
        for name, data in world["data"].items():
            h.add_mirror(name, data)
            h.add_file("org/gpic", f"train/{name}", data)
        h.add_file("org/pq", "data/train-00000.parquet", world["parquet"].read_bytes())
        point_hf_at(h, monkeypatch, tmp_path / "hf_cache")
        yield h


def _run(args, tmp, name):
    """Run the CLI with the shallow DINOv2; returns (console output, the --json document)."""
    out = tmp / f"{name}.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dv, "_build_extractor", functools.partial(dv._build_extractor, _depth=DEPTH))
        r = CliRunner().invoke(main, [str(a) for a in args] + ["--json", str(out)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return r.output, json.loads(out.read_text())


def _common(world):
    return ["-m", MODEL, "--weights", world["ckpt"], "--batch-size", "2", "--num-workers", "0", "--device", "cpu",
            "-q"]


def _local(world, kind):
    return str(world["shards"] / f"gpic_train_{RANGE}.tar") if kind == "tar" else str(world["parquet"])


def _remote(hub, where):
    return {"http": f"{hub.url}/mirror/gpic_train_{RANGE}.tar",
            "hf": f"hf://datasets/org/gpic/train/gpic_train_{RANGE}.tar",
            "hf-parquet": "hf://datasets/org/pq/data/train-00000.parquet"}[where]


def _as_local(doc, world, hub):
    """``doc`` with every remote item name mapped to the same item on disk (URL prefix -> local folder)."""
    text = json.dumps(doc)
    for where in ("http", "hf", "hf-parquet"):
        folder = world["parquet"].parent if where == "hf-parquet" else world["shards"]
        text = text.replace(_remote(hub, where).rsplit("/", 1)[0] + "/", f"{folder}/")
    return json.loads(text)


def _counts(acc):
    """An accounting dict's counts and item names/reasons (the spec aside: it names where the data lives)."""
    return {"found": acc["found"], "used": acc["used"], "ignored": acc["ignored"], "not_selected": acc["not_selected"],
            "skipped": [(s["name"], s["reason"]) for s in acc["skipped"]],
            "per_shard": [{k: v for k, v in s.items() if k != "shard"} for s in acc["per_shard"] or []]}


def _ceiling_args(world, real):
    return ["ceiling", "--real", real, "--ref", world["ref"], "-n", N_SHARDS * PER_SHARD, *_common(world)]


@pytest.fixture(scope="module")
def local_ceiling(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ceiling_local")
    return {kind: _run(_ceiling_args(world, _local(world, kind)), tmp, kind)[1] for kind in ("tar", "parquet")}


@pytest.mark.parametrize("where", ["http", HF_SLOW, "hf-parquet"])
def test_ceiling_real_streamed_equals_on_disk(world, hub, local_ceiling, tmp_path, where):
    kind = "parquet" if where == "hf-parquet" else "tar"
    _, doc = _run(_ceiling_args(world, _remote(hub, where)), tmp_path, "c")
    want = local_ceiling[kind]
    res, ref_res = doc["results"][MODEL], want["results"][MODEL]
    assert res["n"] == N_SHARDS * PER_SHARD and res["fd"] > 0
    assert {k: v for k, v in res.items() if k != "real"} == {k: v for k, v in ref_res.items() if k != "real"}
    got = _as_local(doc, world, hub)["inputs"]["real"]
    assert _counts(got) == _counts(want["inputs"]["real"])
    if kind == "tar":
        assert [(s["found"], s["used"]) for s in got["per_shard"]] == [(PER_SHARD, PER_SHARD)] * N_SHARDS
    else:  # the null row is skipped (named by its URL and row) on the Hub as on disk
        assert doc["inputs"]["real"]["skipped"][0]["name"] == f"{_remote(hub, where)}:row {NULL_ROW}"
        assert (got["found"], got["used"]) == (N_SHARDS * PER_SHARD + 1, N_SHARDS * PER_SHARD)


def _copies_args(world, *train):
    return ["copies", world["gen"], *train, "--top", "2", "--threshold", "0.9", "--no-authpct", *_common(world)]


@pytest.mark.parametrize("where", ["http", HF_SLOW])
def test_compute_ref_streamed_equals_on_disk(world, hub, tmp_path, where):
    """An image-source ``--ref`` may be remote too (its statistics are computed from the stream)."""
    docs = [_run(["compute", world["gen"], "--ref", ref, *_common(world)], tmp_path, name)[1]
            for name, ref in (("local", _local(world, "tar")), ("remote", _remote(hub, where)))]
    assert docs[1]["results"] == docs[0]["results"] and docs[1]["results"][MODEL]["n_ref"] == N_SHARDS * PER_SHARD
    got, want = _as_local(docs[1], world, hub)["inputs"]["reference"], docs[0]["inputs"]["reference"]
    assert _counts(got) == _counts(want) and docs[1]["inputs"]["reference"]["spec"] == _remote(hub, where)


@pytest.fixture(scope="module")
def local_copies(world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("copies_local")
    out = {kind: (_run(_copies_args(world, "--train", _local(world, kind), "--sheet", tmp / f"{kind}.png"), tmp,
                       kind)[1], tmp / f"{kind}.png") for kind in ("tar", "parquet")}
    out["test"] = _run(_copies_args(world, "--train", _local(world, "tar"), "--test", _local(world, "parquet")), tmp,
                       "test")[1]
    return out


@pytest.mark.parametrize("where", ["http", HF_SLOW])
def test_copies_train_streamed_equals_on_disk(world, hub, local_copies, tmp_path, where):
    """``--train`` streamed (and ``--test``, held-out images for C_T, from a Parquet file on the Hub; too few
    generated images here for C_T itself, so the test side is checked by its accounting)."""
    out, doc = _run(_copies_args(world, "--train", _remote(hub, where), "--test", _remote(hub, "hf-parquet")),
                    tmp_path, "c")
    want = local_copies["test"]
    got = _as_local(doc, world, hub)
    assert got["results"] == want["results"]  # per-image nearest (names, keys, similarities), quantiles, copies
    res = got["results"][MODEL]
    assert [p["nearest"][0]["index"] for p in res["per_image"][:3]] == [0, 1, 2]  # the planted re-encodes
    assert doc["provenance"]["test"]["spec"] == _remote(hub, "hf-parquet") and doc["provenance"]["test"]["n"] == 9
    for side in ("train", "test"):
        assert _counts(got["inputs"][side]) == _counts(want["inputs"][side])
    assert f"{_remote(hub, where)}: 9 found, 9 used" in out
    assert f"{_remote(hub, 'hf-parquet')}: 10 found, 9 used, 1 skipped (null image)" in out


@pytest.mark.parametrize("where", ["hf", "hf-parquet"])
def test_index_build_streamed_then_train_index_equals_copies_on_disk(world, hub, local_copies, tmp_path, where):
    """`index build` over remote data, then `copies --train-index` (with a contact sheet, whose training thumbnails
    are read back from the remote source the index records) == `copies --train` over the data on disk."""
    kind = "parquet" if where == "hf-parquet" else "tar"
    idx = tmp_path / "idx"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dv, "_build_extractor", functools.partial(dv._build_extractor, _depth=DEPTH))
        r = CliRunner().invoke(main, ["index", "build", _remote(hub, where), "-o", str(idx), *_common(world)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    n_skipped = 1 if kind == "parquet" else 0
    units = N_SHARDS if kind == "tar" else 3  # tar: a unit per shard; Parquet: per row group (4 + 4 + 2 rows)
    assert f"{N_SHARDS * PER_SHARD} rows ({n_skipped} skipped) in {units} units" in r.output
    info = fd_eval.index.open_index(idx).info()
    assert info["parts"][0]["source"] == _remote(hub, where)
    sheet = tmp_path / "sheet.png"
    _, doc = _run(_copies_args(world, "--train-index", idx, "--sheet", sheet), tmp_path, "c")
    want, want_sheet = local_copies[kind]
    got = _as_local(doc, world, hub)
    assert got["results"] == want["results"]
    acc, want_acc = got["inputs"]["train"], want["inputs"]["train"]
    assert (acc["used"], [s["name"] for s in acc["skipped"]]) == (want_acc["used"],
                                                                  [s["name"] for s in want_acc["skipped"]])
    if kind == "parquet":  # the null row: skipped in the index's accounting as in a live pass
        assert [s["reason"] for s in acc["skipped"]] == ["null image"] and acc["found"] == want_acc["found"]
    # the first row of the sheet (generated | training thumbnail pairs, above the captions, which name the items)
    # is the same: the training thumbnails were read from the Hub
    with Image.open(sheet) as im, Image.open(want_sheet) as im_local:
        a, b = np.asarray(im.convert("RGB"))[:166], np.asarray(im_local.convert("RGB"))[:166]
    assert np.array_equal(a, b) and len(np.unique(a.reshape(-1, 3), axis=0)) > 100
