"""Cheap checks first, and an output never overwrites an input (issue 14, sections 2-3): every case fails before any
weights load, with one line that names the file, and leaves the inputs untouched."""
from __future__ import annotations

import io
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import fd_eval
import fd_eval.api as api
from _images import photo_crops, save_images
from fd_eval.cli import main
from fd_eval.errors import (
    BadImageError,
    OutputError,
    SourceError,
    UnknownReferenceError,
)
from fd_eval.sources import open_source
from test_accounting import PixelExtractor

IMGS = photo_crops(4, 24, 32, seed=7)


@pytest.fixture()
def no_weights(monkeypatch):
    """Loading any extractor fails the test: the checks must come first."""
    def boom(*a, **k):
        raise AssertionError("weights loaded before the cheap checks")

    monkeypatch.setattr(api, "load_extractors", boom)


@pytest.fixture()
def pixels(monkeypatch):
    monkeypatch.setattr(api, "load_extractors", lambda *a, **k: [PixelExtractor()])


@pytest.fixture()
def data(tmp_path):
    gen = save_images(IMGS, tmp_path / "gen")
    ref = save_images(IMGS[::-1], tmp_path / "ref")
    return tmp_path, gen, ref


def run(argv, standalone=True):
    return CliRunner().invoke(main, [*argv, "--device", "cpu", "--num-workers", "0", "-q"],
                              standalone_mode=standalone)


def failed(argv, cls, *words):
    """The command fails with one line holding ``words``, raised as ``cls`` (an fd_eval.errors class)."""
    r = run(argv)
    assert r.exit_code == 1, r.output
    line = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert len(line) == 1 and all(w in line[0] for w in words), r.output
    raw = run(argv, standalone=False).exception  # the click exception, caused by the fd-eval error
    assert isinstance(raw.__cause__, cls), repr(raw)


def snapshot(*paths: Path) -> dict[str, bytes]:
    out = {}
    for p in paths:
        for f in ([p] if p.is_file() else sorted(p.rglob("*"))):
            out[str(f)] = f.read_bytes()
    return out


def test_save_stats_over_the_reference_statistics(data, pixels, no_weights):
    tmp, gen, _ = data
    ref = tmp / "ref.safetensors"
    fd_eval.save_stats(ref, [fd_eval.Stats.from_features(np.random.default_rng(0).normal(size=(20, 48)))])
    before = snapshot(ref, gen)
    failed(["compute", str(gen), "--ref", str(ref), "--save-stats", str(ref)], OutputError, str(ref),
           "--save-stats", "input")
    assert snapshot(ref, gen) == before


def test_stats_output_over_the_array_source(tmp_path, no_weights):
    np.save(tmp_path / "x.npy", IMGS)
    before = snapshot(tmp_path / "x.npy")
    failed(["stats", str(tmp_path / "x.npy"), "-o", str(tmp_path / "x.npy")], OutputError, "x.npy", "--output")
    assert snapshot(tmp_path / "x.npy") == before
    with pytest.raises(OutputError, match="x.npy"):  # the API checks too
        fd_eval.build_stats(str(tmp_path / "x.npy"), tmp_path / "x.npy")


def test_json_over_an_image_inside_gen(data, no_weights):
    _, gen, ref = data
    before = snapshot(gen)
    failed(["compute", str(gen), "--ref", str(ref), "--json", str(gen / "000.png")], OutputError,
           "000.png", "--json", "inside the input folder")
    failed(["compute", str(gen), "--ref", str(ref), "--json", str(gen / "new.png")], OutputError,
           "new.png", "add an image")
    assert snapshot(gen) == before


def test_json_into_a_folder_or_unwritable_place(data, no_weights):
    tmp, gen, ref = data
    (tmp / "out").mkdir()
    failed(["compute", str(gen), "--ref", str(ref), "--json", str(tmp / "out")], OutputError,
           str(tmp / "out"), "is a folder")
    failed(["compute", str(gen), "--ref", str(ref), "--json", str(tmp / "nothere") + "/"], OutputError,
           "is a folder")
    (tmp / "afile").write_text("x")
    failed(["compute", str(gen), "--ref", str(ref), "--json", str(tmp / "afile" / "r.json")], OutputError,
           "afile", "a file where a folder should be")
    failed(["compute", str(gen), "--ref", str(ref), "--json", str(tmp / "a.json"), "--save-stats",
                str(tmp / "a.json")], OutputError, "a.json", "--json", "--save-stats")


def test_typo_in_gen_fails_before_weights_and_reference(data, no_weights, monkeypatch):
    tmp, gen, ref = data
    monkeypatch.setattr(api, "resolve_reference", lambda *a, **k: pytest.fail("reference read first"))
    failed(["compute", str(tmp / "gne"), "--ref", str(ref)], SourceError, str(tmp / "gne"), "no such file")
    failed(["compute", str(gen), "--ref", str(tmp / "rfe")], SourceError, str(tmp / "rfe"))
    failed(["compute", str(gen), "--ref", "gpic-tset"], UnknownReferenceError, "gpic-tset")
    for call in (lambda: fd_eval.compute_fd(tmp / "gne", ref), lambda: fd_eval.compute_stats(tmp / "gne"),
                 lambda: fd_eval.build_stats(str(tmp / "gne"), tmp / "o.safetensors"),
                 lambda: fd_eval.ceiling(tmp / "gne", str(ref))):
        with pytest.raises(SourceError, match="gne"):
            call()


def test_statistics_file_as_gen_gets_the_fd_hint(data, no_weights):
    tmp, _, ref = data
    st = tmp / "gen.safetensors"
    fd_eval.save_stats(st, [fd_eval.Stats.from_features(np.random.default_rng(0).normal(size=(20, 48)))])
    np.savez(tmp / "gen_stats.npz", mu=np.zeros(4), sigma=np.eye(4))
    for p in (st, tmp / "gen_stats.npz"):
        failed(["compute", str(p), "--ref", str(ref)], SourceError, str(p), "statistics file", "fd-eval fd")


def test_hints_name_real_controls(tmp_path, monkeypatch):
    big = io.BytesIO()
    Image.new("RGB", (40, 40)).save(big, "PNG")
    (tmp_path / "big.png").write_bytes(big.getvalue())
    with pytest.raises(BadImageError) as e:
        open_source(tmp_path, max_image_pixels=100).load(0)
    assert "--max-image-pixels" not in str(e.value) and "FD_EVAL_MAX_IMAGE_PIXELS" in str(e.value)
    with pytest.raises(BadImageError) as e:
        open_source(tmp_path, max_item_bytes=10).load(0)
    assert "FD_EVAL_MAX_ITEM_BYTES=N (0 = no limit)" in str(e.value)
    monkeypatch.setenv("FD_EVAL_MAX_ITEM_BYTES", "0")  # 0 means no limit, as the message says
    assert open_source(tmp_path).load(0).size == (40, 40)
    monkeypatch.setenv("FD_EVAL_MAX_ITEM_BYTES", "10")
    with pytest.raises(BadImageError, match="per-item limit of 10 bytes"):
        open_source(tmp_path).load(0)


@pytest.mark.parametrize("fmt", ["folder", "tar"])
def test_unusable_cache_warns_and_the_run_finishes(data, pixels, monkeypatch, fmt):
    """$FD_EVAL_CACHE is a file: the reference-statistics cache (and the tar index cache) are skipped with one
    warning naming it; the run finishes with the same FD."""
    tmp, gen, ref = data
    if fmt == "tar":
        with tarfile.open(tmp / "gen.tar", "w") as tf:
            for p in sorted(gen.iterdir()):
                tf.add(p, p.name)
        gen = tmp / "gen.tar"
    expected = fd_eval.compute_fd(gen, str(ref), device="cpu", num_workers=0, progress=False)
    cache = tmp / "cache"
    cache.write_text("not a folder")
    monkeypatch.setenv("FD_EVAL_CACHE", str(cache))
    import fd_eval.util.io_utils as io_utils

    monkeypatch.setattr(io_utils, "_WARNED_CACHES", set())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = fd_eval.compute_fd(gen, str(ref), device="cpu", num_workers=0, progress=False)
    assert res.results["pixels-4"]["fd"] == expected.results["pixels-4"]["fd"] > 0
    msgs = [str(x.message) for x in w if "continuing without the cache" in str(x.message)]
    assert len(msgs) == 1 and str(cache) in msgs[0] and "FD_EVAL_CACHE" in msgs[0]
    assert cache.read_text() == "not a folder"


def test_write_failure_still_prints_the_result(data, pixels, monkeypatch):
    tmp, gen, ref = data
    import fd_eval.cli._common as common

    def full(*a, **k):
        raise OutputError(f"cannot write output {tmp / 'r.json'} (ENOSPC: No space left on device); nothing was "
                          "written. Free space or choose a writable location")

    monkeypatch.setattr(common, "atomic_write", full)
    r = run(["compute", str(gen), "--ref", str(ref), "--json", str(tmp / "r.json")])
    assert r.exit_code == 1 and "pixels-4" in r.output and "ENOSPC" in r.output
    assert not (tmp / "r.json").exists()


@pytest.mark.parametrize("offline", [True, False])
def test_offline_reaches_the_weights(data, monkeypatch, offline):
    """``offline=`` (``--offline``) is in force while the extractors load, in every entry point."""
    tmp, gen, ref = data
    from fd_eval.util.download import offline_mode

    seen = []

    def load(*a, **k):
        seen.append(offline_mode())
        return [PixelExtractor()]

    monkeypatch.setattr(api, "load_extractors", load)
    monkeypatch.delenv("FD_EVAL_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0" if offline else "1")  # the option overrides the environment
    kw = dict(offline=offline, device="cpu", num_workers=0, progress=False)
    fd_eval.compute_fd(gen, str(ref), **kw)
    fd_eval.compute_stats(gen, **kw)
    fd_eval.build_stats(str(gen), tmp / "s.safetensors", **kw)
    assert seen == [offline] * 3


# --- issue 23 §2: one output rule for every output of every command ---------------------------------------------
@pytest.fixture()
def copies_data(tmp_path):
    gen = save_images(IMGS, tmp_path / "gen")
    train = save_images(IMGS[::-1], tmp_path / "train")
    w = tmp_path / "w.pth"
    w.write_bytes(b"weights")
    return tmp_path, gen, train, w


def _copies(gen, train, *extra):
    return ["copies", str(gen), "--train", str(train), "-m", "dinov2-vits14", *extra]


@pytest.mark.parametrize("case", ["json-on-gen-image", "sheet-on-train-image", "json-on-train-image",
                                  "sheet-new-image-in-gen", "json-and-sheet-one-path", "json-in-gen-folder",
                                  "checkpoint-in-train", "weights-as-json", "json-inside-checkpoint-dir"])
def test_copies_outputs_never_touch_inputs(copies_data, no_weights, case):
    tmp, gen, train, w = copies_data
    args, words = {
        "json-on-gen-image": (["--json", str(gen / "000.png")], ["000.png", "--json", "inside the input folder",
                                                                 "(GEN)", "replace a file"]),
        "sheet-on-train-image": (["--sheet", str(train / "001.png")], ["001.png", "--sheet", "(--train)"]),
        "json-on-train-image": (["--json", str(train / "001.png")], ["001.png", "--json", "(--train)"]),
        "sheet-new-image-in-gen": (["--sheet", str(gen / "sheet.png")], ["sheet.png", "add an image"]),
        "json-and-sheet-one-path": (["--json", str(tmp / "x"), "--sheet", str(tmp / "x")],
                                    ["given to both", "--json", "--sheet"]),
        "json-in-gen-folder": (["--json", str(gen / "r.json")], ["r.json", "inside the input folder", "add files"]),
        "checkpoint-in-train": (["--checkpoint-dir", str(train / "ck")], ["--checkpoint-dir", "(--train)"]),
        "weights-as-json": (["--weights", str(w), "--json", str(w)], ["w.pth", "(--weights)", "replace"]),
        "json-inside-checkpoint-dir": (["--checkpoint-dir", str(tmp / "ck"), "--json", str(tmp / "ck" / "r.json")],
                                       ["r.json", "inside the --checkpoint-dir folder"]),
    }[case]
    before = snapshot(gen, train, w)
    failed(_copies(gen, train, *args), OutputError, *words)
    assert snapshot(gen, train, w) == before and not (tmp / "x").exists()


def test_copies_api_checks_outputs_first(copies_data, no_weights):
    tmp, gen, train, _ = copies_data
    before = snapshot(gen, train)
    for kw in ({"json_path": gen / "000.png"}, {"sheet": train / "001.png"}, {"checkpoint_dir": gen / "ck"},
               {"save_features": train / "f"}, {"json_path": tmp / "a", "sheet": tmp / "a"}):
        with pytest.raises(OutputError):
            fd_eval.find_copies(gen, train, models=["dinov2-vits14"], **kw)
    assert snapshot(gen, train) == before and not (gen / "ck").exists()


def test_save_stats_over_the_weights_file(data, no_weights):
    tmp, gen, ref = data
    w = tmp / "w.pth"
    w.write_bytes(b"weights")
    failed(["compute", str(gen), "--ref", str(ref), "-m", "dinov2-vits14", "--weights", str(w), "--save-stats",
            str(w)], OutputError, "w.pth", "--save-stats", "(--weights)")
    failed(["compute", str(gen), "--ref", str(ref), "-m", "dinov2-vits14", "--weights", f"dinov2-vits14={w}",
            "--json", str(w)], OutputError, "w.pth", "--json", "(--weights)")
    assert w.read_bytes() == b"weights"


def test_stats_checkpoint_folder_inside_the_source_or_a_file(data, no_weights):
    tmp, gen, _ = data
    before = snapshot(gen)
    failed(["stats", str(gen), "-o", str(tmp / "s.safetensors"), "--checkpoint-dir", str(gen / "ckpt")],
           OutputError, "ckpt", "--checkpoint-dir", "inside the input folder", "(SOURCE)")
    failed(["stats", str(gen), "-o", str(gen / "s.safetensors")], OutputError, "inside the input folder")
    (tmp / "afile").write_text("x")
    failed(["stats", str(gen), "-o", str(tmp / "s.safetensors"), "--checkpoint-dir", str(tmp / "afile")],
           OutputError, "afile", "is a file", "--checkpoint-dir")
    with pytest.raises(OutputError, match="is a file"):  # the API too
        fd_eval.build_stats(str(gen), tmp / "s.safetensors", checkpoint_dir=tmp / "afile")
    with pytest.raises(OutputError, match="inside the input folder"):
        fd_eval.build_stats(str(gen), tmp / "s.safetensors", checkpoint_dir=gen / "ckpt")
    assert snapshot(gen) == before and (tmp / "afile").read_text() == "x"


def test_prompts_and_report_outputs(data, tmp_path):
    tmp, gen, _ = data
    (tmp / "r.json").write_text("{}")
    r = CliRunner().invoke(main, ["report", str(tmp / "r.json"), "-o", str(tmp / "r.json")])
    assert r.exit_code == 1 and "is an input of this run" in r.output
    shards = tmp / "shards"
    shards.mkdir()
    r = CliRunner().invoke(main, ["prompts", "--shards", str(shards), "-o", str(shards / "p.jsonl")])
    assert r.exit_code == 1 and "inside the input folder" in r.output and "(--shards)" in r.output


# --- issue 23 §3: a registry reference's access (and download) before any weights download ---------------------
@pytest.mark.parametrize("status", [401, 403])
def test_gated_reference_is_checked_before_any_weights(data, no_weights, monkeypatch, tmp_path, status):
    from _fake_hub import FakeHub, point_hf_at
    from fd_eval.errors import GatedRepoError
    from test_references import REPO, TEST_FILE, gpic_npz

    tmp, gen, _ = data
    with FakeHub() as hub:
        point_hf_at(hub, monkeypatch, tmp_path / "hf_cache")
        hub.add_file(REPO, TEST_FILE, gpic_npz()[0])
        hub.gated[f"datasets/{REPO}"], hub.token = status, "hf_granted"
        if status == 403:
            monkeypatch.setenv("HF_TOKEN", "hf_not_granted")
        with pytest.raises(GatedRepoError, match="request access"):  # not the no_weights AssertionError
            fd_eval.compute_fd(gen, "gpic-test", device="cpu", num_workers=0, progress=False)
        failed(["compute", str(gen), "--ref", "gpic-test"], GatedRepoError, "gpic-test", "request access")


# --- issue 23 §4: clear endings ------------------------------------------------------------------------------
def test_too_few_images_after_skip_bad_names_the_source_and_lists_the_skipped(data, pixels):
    tmp, _, ref = data
    gen = save_images(IMGS[:1], tmp / "few")
    for i in range(3):
        (gen / f"bad{i}.png").write_bytes(b"not a png")
    (gen / "notes.txt").write_text("x")
    r = run(["compute", str(gen), "--ref", str(ref), "--skip-bad"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    lines = r.output.splitlines()
    listed = [ln.strip() for ln in lines if ln.strip().startswith("skipped ")]
    assert len(listed) == 3 and all(f"bad{i}.png: not an image" in ln for i, ln in enumerate(listed)), r.output
    assert any(ln.strip().startswith("ignored (not an image file extension)") for ln in lines)
    err = lines[-1]
    assert err.startswith(f"Error: {gen}: 5 found, 1 used, 3 skipped") and "at least 2 images" in err, err
    assert "fix or replace the skipped files" in err and "ignored" in err
    with pytest.raises(fd_eval.errors.TooFewImagesError) as e:
        fd_eval.compute_fd(gen, str(ref), device="cpu", num_workers=0, progress=False, skip_bad=True)
    doc = e.value.inputs[str(gen)]
    assert doc["used"] == 1 and sorted(Path(s["name"]).name for s in doc["skipped"]) == ["bad0.png", "bad1.png",
                                                                                           "bad2.png"]


def test_mismatch_is_refused_before_extraction_and_names_the_images(data, monkeypatch):
    tmp, gen, _ = data
    ex = PixelExtractor()
    ex.weights_sha256 = "cd" * 32
    monkeypatch.setattr(api, "load_extractors", lambda *a, **k: [ex])
    ref = tmp / "other_weights.safetensors"
    meta = {**PixelExtractor().metadata(), "weights_sha256": "ab" * 32}
    fd_eval.save_stats(ref, [fd_eval.Stats.from_features(np.random.default_rng(0).normal(size=(20, 48)), meta)])
    monkeypatch.setattr(api, "compute_stats", lambda *a, **k: pytest.fail("images extracted before the check"))
    with pytest.raises(fd_eval.StatsMismatchError) as e:
        fd_eval.compute_fd(gen, str(ref), device="cpu", num_workers=0, progress=False)
    msg = str(e.value)
    assert f"{gen} and {ref} were made differently" in msg and "weights sha256" in msg and "<memory>" not in msg
    monkeypatch.undo()
    monkeypatch.setattr(api, "load_extractors", lambda *a, **k: [ex])
    res = fd_eval.compute_fd(gen, str(ref), device="cpu", num_workers=0, progress=False, allow_mismatch=True)
    assert any("weights sha256" in w for w in res.warnings)


def test_opened_sources_are_inputs_too(data, no_weights):
    tmp, gen, _ = data
    with pytest.raises(OutputError, match="inside the input folder"):
        fd_eval.build_stats(open_source(gen), gen / "s.safetensors")


def test_ceiling_reads_a_gated_reference_before_any_weights(data, no_weights, monkeypatch, tmp_path):
    from _fake_hub import FakeHub, point_hf_at
    from fd_eval.errors import GatedRepoError
    from test_references import REPO, TEST_FILE, gpic_npz

    tmp, gen, _ = data
    with FakeHub() as hub:
        point_hf_at(hub, monkeypatch, tmp_path / "hf_cache")
        hub.add_file(REPO, TEST_FILE, gpic_npz()[0])
        hub.gated[f"datasets/{REPO}"], hub.token = 401, "hf_granted"
        with pytest.raises(GatedRepoError, match="request access"):
            fd_eval.ceiling(gen, "gpic-test", n=4, device="cpu", num_workers=0, progress=False)


def test_copies_outputs_never_inside_the_train_index(copies_data, no_weights):
    tmp, gen, train, _ = copies_data
    idx = tmp / "index"
    idx.mkdir()
    (idx / "manifest.json").write_text("{}")
    with pytest.raises(OutputError, match=r"inside the input folder .*\(--train-index\)"):
        fd_eval.find_copies(gen, None, train_index=idx, models=["dinov2-vits14"], json_path=idx / "r.json")
    failed(["copies", str(gen), "--train-index", str(idx), "--json", str(idx / "manifest.json")], OutputError,
           "manifest.json", "(--train-index)")
