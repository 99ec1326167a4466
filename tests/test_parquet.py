"""Parquet image datasets (Hugging Face layout: an image column of struct<bytes, path>): statistics bit-identical to
the same images in a folder, a null image listed as skipped, row-group units, keys, columns, a missing pyarrow in
one line; and the source-format registry."""
import io
import sys

import numpy as np
import pytest
from PIL import Image

import fd_eval
import fd_eval.extractors.dinov2 as dv
from _checkpoints import save_dinov2_checkpoint
from _fake_hub import FakeHub, point_hf_at
from _images import photo_crops
from fd_eval.errors import SourceError
from fd_eval.sources import InputAccounting, open_source
from fd_eval.sources.parquet import ParquetSource
from fd_eval.sources.registry import SourceFormat, register_format, source_formats

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

N_ROWS, NULL_ROW = 8, 3
MODEL = "dinov2-vits14"
BS = 2  # row groups of 3 rows: every row group boundary falls inside a batch of the single pass


def _encode(img, fmt):
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _table(images, null_row=NULL_ROW, image_name="image"):
    rows, ids = [], []
    for k, img in enumerate(images):
        fmt = "PNG" if k % 2 == 0 else "JPEG"
        rows.append(None if k == null_row else {"bytes": _encode(img, fmt), "path": f"{k}.{fmt.lower()}"})
        ids.append(f"id{k}")
    img_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.table({"id": pa.array(ids), image_name: pa.array(rows, type=img_type),
                     "caption": pa.array([f"c{k}" for k in range(len(images))])})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("parquet")
    ckpt, _ = save_dinov2_checkpoint(root / "w.pth", "vits14", "official", seed=3, depth=2)
    images = photo_crops(N_ROWS, 48, 64, seed=11)
    table = _table(images)
    path = root / "train-00000.parquet"
    pq.write_table(table, path, row_group_size=3)
    folder = root / "folder"
    folder.mkdir()
    for k, row in enumerate(table.column("image").to_pylist()):
        if row is not None:
            (folder / f"{k:03d}.{row['path'].split('.')[1]}").write_bytes(row["bytes"])
    ex = dv._build_extractor("vits14", False, weights=ckpt, _depth=2)
    return {"root": root, "path": path, "folder": folder, "ex": ex, "table": table, "ckpt": ckpt}


def _stats(world, spec, **kw):
    return fd_eval.compute_stats(spec, extractors=[world["ex"]], batch_size=BS, num_workers=kw.pop("num_workers", 0),
                                 progress=False, **kw)[MODEL]


def test_parquet_equals_the_same_images_in_a_folder(world):
    folder = _stats(world, str(world["folder"]))
    res = _stats(world, str(world["path"]), num_workers=1)
    assert res.n == folder.n == N_ROWS - 1
    assert np.array_equal(res.mu, folder.mu) and np.array_equal(res.sigma, folder.sigma)
    inputs = res.metadata["source"]["inputs"]
    assert inputs["found"] == N_ROWS and inputs["used"] == N_ROWS - 1 and inputs["not_selected"] == 0
    assert inputs["ignored"] == {} and inputs["ignored_items"] == {}  # a null image is skipped, not ignored
    (null,) = inputs["skipped"]
    assert null["name"] == f"{world['path']}:row {NULL_ROW}" and null["reason"] == "null image"
    assert null["index"] is None and null["message"].startswith(f"{world['path']}:row {NULL_ROW}: the image column")
    assert "\n" not in null["message"]
    # the open-time skip is not a --skip-bad skip: the legacy keys count decode failures only, so a strict run can
    # still use this entry from the reference cache
    assert res.metadata["source"]["skipped"] == 0 and res.metadata["source"]["skipped_items"] == []
    assert InputAccounting.from_dict(inputs).summary() == f"{world['path']}: 8 found, 7 used, 1 skipped (null image)"


def test_null_image_is_skipped_in_every_output(world, tmp_path, monkeypatch):
    """``compute --json`` and the console: the null row is listed as skipped (name and reason) without --skip-bad;
    ``--num`` draws from the rows with an image and still lists it."""
    import functools
    import json

    from click.testing import CliRunner

    from fd_eval.cli import main

    monkeypatch.setattr(dv, "_build_extractor", functools.partial(dv._build_extractor, _depth=2))
    ref = tmp_path / "folder.safetensors"
    fd_eval.compute_stats(str(world["folder"]), extractors=[world["ex"]], batch_size=BS, num_workers=0,
                          progress=False)[MODEL].save(ref)
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["compute", str(world["path"]), "--ref", str(ref), "--model", MODEL,
                                  "--weights", f"{MODEL}={world['ckpt']}", "--batch-size", str(BS),
                                  "--num-workers", "0", "--json", str(out), "-q"])
    assert r.exit_code == 0, r.output
    name = f"{world['path']}:row {NULL_ROW}"
    assert f"{world['path']}: 8 found, 7 used, 1 skipped (null image)" in r.output
    assert f"skipped {name}: null image" in r.output
    doc = json.loads(out.read_text())
    gen = doc["inputs"]["generated"]
    assert (gen["found"], gen["used"], gen["ignored"]) == (N_ROWS, N_ROWS - 1, {})
    assert [(s["name"], s["reason"]) for s in gen["skipped"]] == [(name, "null image")]
    res = doc["results"][MODEL]  # the same images as the folder reference: FD 0, N 7 on both sides
    assert (res["n"], res["n_ref"]) == (N_ROWS - 1, N_ROWS - 1) and res["fd"] == pytest.approx(0.0, abs=1e-6)
    sub = fd_eval.sources.InputAccounting.build(open_source(str(world["path"])).subset(4, seed=0), [], 4)
    assert (sub.found, sub.used, sub.not_selected, len(sub.skipped)) == (N_ROWS, 4, N_ROWS - 1 - 4, 1)
    assert sub.found == sub.used + len(sub.skipped) + sum(sub.ignored.values()) + sub.not_selected


def test_items_keys_and_row_groups(world):
    src = open_source(str(world["path"]))
    assert isinstance(src, ParquetSource) and len(src) == N_ROWS - 1 and src.image_column == "image"
    rows = [r for r in world["table"].column("image").to_pylist() if r is not None]
    assert [src.read_encoded(i) for i in range(len(src))] == [r["bytes"] for r in rows]
    assert src.meta(3) == {"key": "id4"} and src.describe(3) == f"{world['path']}:row 4"
    assert src.shard_starts.tolist() == [0, 3, 5, 7]  # row groups of 3, 3 (one null), 2 rows
    plan = fd_eval.metrics.build.plan_units(src)
    assert plan.kind == "row-groups" and [len(u) for u in plan.units] == [3, 2, 2]
    acc = InputAccounting.build(src, [], len(src))
    assert acc.summary().endswith("8 found, 7 used, 1 skipped (null image)") and not acc.ignored
    assert acc.listing() == [f"skipped {world['path']}:row {NULL_ROW}: null image"]


def test_build_units_are_row_groups(world, tmp_path):
    out = tmp_path / "s.safetensors"
    res = fd_eval.metrics.build.build_stats(str(world["path"]), out, extractors=[world["ex"]], batch_size=BS,
                                    num_workers=0, progress=False)[MODEL]
    single = _stats(world, str(world["path"]))
    assert res.metadata["source"]["build"]["units"] == 3 and res.n == N_ROWS - 1
    assert np.allclose(res.mu, single.mu, atol=1e-6) and np.allclose(res.sigma, single.sigma, atol=1e-6)


def test_keys_from_row_numbers_and_named_columns(world, tmp_path):
    images = photo_crops(4, 32, 32, seed=5)
    plain = pa.table({"pixels": pa.array([_encode(im, "PNG") for im in images], type=pa.binary())})
    p = tmp_path / "plain.parquet"
    pq.write_table(plain, p)
    with pytest.raises(SourceError, match=r"plain.parquet: no image column .*name it with --image-column") as e:
        open_source(str(p))
    assert "\n" not in str(e.value)
    src = open_source(str(p), image_column="pixels")
    assert len(src) == 4 and src.meta(2) == {"key": "2"}
    with pytest.raises(SourceError, match="no column 'img'"):
        open_source(str(p), image_column="img")
    from click.testing import CliRunner

    from fd_eval.cli import main

    for cmd in (["stats", str(p), "-o", str(tmp_path / "o.safetensors")], ["compute", str(p)]):
        r = CliRunner().invoke(main, [*cmd, "--image-column", "img"])  # the option reaches the source, before weights
        assert r.exit_code == 1 and "no column 'img'" in r.output, r.output
    renamed = tmp_path / "renamed.parquet"
    pq.write_table(_table(images, null_row=-1, image_name="picture"), renamed)
    assert open_source(str(renamed)).image_column == "picture"  # found by its type


def test_folder_of_parquet_files(world, tmp_path):
    images = photo_crops(5, 32, 32, seed=6)
    for k, part in enumerate((images[:2], images[2:])):
        pq.write_table(_table(part, null_row=-1), tmp_path / f"part-{k}.parquet")
    src = open_source(str(tmp_path))
    assert isinstance(src, ParquetSource) and len(src) == 5
    one = open_source(str(tmp_path / "part-*.parquet"))
    assert [one.read_encoded(i) for i in range(5)] == [src.read_encoded(i) for i in range(5)]


def test_missing_pyarrow_is_one_line_naming_the_extra(world, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(SourceError, match=r"train-00000.parquet: reading Parquet needs pyarrow: pip install "
                                          r"'fd-eval\[parquet\]'") as e:
        open_source(str(world["path"]))
    assert "\n" not in str(e.value)


def test_parquet_from_the_hub(world, tmp_path, monkeypatch):
    with FakeHub() as hub:
        hub.add_file("org/samples", "data/train-00000.parquet", world["path"].read_bytes())
        point_hf_at(hub, monkeypatch, tmp_path / "hf")
        src = open_source("hf://datasets/org/samples/data/train-00000.parquet")
        local = open_source(str(world["path"]))
        assert isinstance(src, ParquetSource) and len(src) == len(local)
        assert [src.read_encoded(i) for i in range(len(src))] == [local.read_encoded(i) for i in range(len(local))]
        assert src.fingerprint() != local.fingerprint()
        whole = open_source("hf://datasets/org/samples")  # a Hub dataset: its Parquet files, listed
        assert isinstance(whole, ParquetSource) and whole.names == ["hf://datasets/org/samples/data/train-00000.parquet"]
        with pytest.raises(SourceError, match="offline mode is on"):
            open_source("hf://datasets/org/samples/data/train-00000.parquet", offline=True)


def test_a_new_format_is_one_registration(tmp_path):
    arr = np.zeros((2, 8, 8, 3), np.uint8)
    fmt = SourceFormat("test-zeros", lambda s: s.startswith("zeros:"),
                       lambda s, o: fd_eval.sources.ArraySource(arr, **o.common), order=5)
    register_format(fmt)
    try:
        assert [f.name for f in source_formats()][0] == "test-zeros"
        assert len(open_source("zeros:two")) == 2
        with pytest.raises(ValueError, match="already registered"):
            register_format(fmt)
    finally:
        from fd_eval.sources import registry

        registry._FORMATS.pop("test-zeros")
    assert [f.name for f in source_formats()] == ["remote", "parquet", "directory", "file", "pattern"]
