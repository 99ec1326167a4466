"""No input is dropped silently: every candidate entry of every image source is counted as used, skipped or ignored,
in the statistics metadata, the result JSON and the console (issue 14, sections 1-2)."""
from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

import fd_eval
import fd_eval.api as api
from _images import photo_crops, save_images
from fd_eval.cli import main
from fd_eval.extractors.base import Extractor
from fd_eval.extractors.preprocess import PreprocessSpec
from fd_eval.sources import InputAccounting, open_source

IMGS = photo_crops(6, 24, 32, seed=5)


class _Flat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class PixelExtractor(Extractor):
    """Test-only: 4x4 bilinear thumbnail pixels (48-d): the real pipeline, no weights, milliseconds per image."""

    def __init__(self) -> None:
        spec = PreprocessSpec("pil", "bilinear", True, (4, 4), 255.0, (0.0,) * 3, (1.0,) * 3)
        super().__init__("pixels-4", 48, spec, _Flat(), None)

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255


@pytest.fixture()
def pixels(monkeypatch):
    """Every entry point loads the pixel extractor instead of a network."""
    monkeypatch.setattr(api, "load_extractors", lambda *a, **k: [PixelExtractor()])


def png(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(a).save(b, "PNG")
    return b.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


def run(argv: list[str]):
    return CliRunner().invoke(main, [*argv, "--device", "cpu", "--num-workers", "0", "-q"])


def test_tar_member_rule_lists_every_member(tmp_path):
    side = json.dumps({"caption": "c"}).encode()
    tar = write_tar(tmp_path / "s.tar", [
        ("cfg1.5_0001.png", png(IMGS[0])), ("cfg1.5_0002.png", png(IMGS[1])),  # dots in the name: images
        ("c.png", png(IMGS[2])), ("c.jpg", png(IMGS[3])), ("c.json", side),  # one key, two images
        ("notes.txt", b"x"), ("orphan.json", side), ("README", b"x")])
    with tarfile.open(tar, "a") as tf:
        ti = tarfile.TarInfo("link.png")
        ti.type, ti.linkname = tarfile.SYMTYPE, "c.png"
        tf.addfile(ti)
    src = open_source(tar)
    assert [src.describe(i).rsplit(":", 1)[1] for i in range(len(src))] == \
        ["cfg1.5_0001.png", "cfg1.5_0002.png", "c.png", "c.jpg"]
    assert src.meta(2) == src.meta(3) == {"caption": "c"} and src.meta(0) is None
    acc = InputAccounting.build(src, [], len(src))
    assert acc.found == 8 and acc.used == 4 and acc.ignored == {  # the paired c.json is metadata, not an entry
        "not a regular file (link, device or sparse member)": 1, "not an image file extension": 1,
        "no file extension": 1, "sidecar .json without an image": 1}
    assert acc.found == acc.used + len(acc.skipped) + sum(acc.ignored.values()) + acc.not_selected


def test_damaged_tar_with_skip_bad_is_reported(tmp_path, pixels):
    tar = write_tar(tmp_path / "c.tar", [(f"{i}.png", png(IMGS[i])) for i in range(6)])
    raw = bytearray(tar.read_bytes())
    at = raw.index(b"3.png\0")
    raw[at:at + 512] = b"\x07" * 512  # a corrupt header: tarfile would stop here silently
    tar.write_bytes(bytes(raw))
    st = fd_eval.compute_stats(tar, skip_bad=True, device="cpu", num_workers=0, progress=False)["pixels-4"]
    inputs = st.metadata["source"]["inputs"]
    assert st.n == 3 and inputs["used"] == 3 and inputs["found"] == 4
    assert inputs["ignored"] == {"unreadable rest of a damaged shard": 1}
    assert any("c.tar" in w and "corrupt" in w for w in inputs["warnings"])
    assert st.metadata["source"]["skipped_items"] == []  # the old key stays


def test_folder_gif_and_ignored_entries(tmp_path, pixels):
    d = save_images(IMGS[:3], tmp_path / "gen")
    Image.fromarray(IMGS[3]).save(d / "anim.gif", save_all=True,
                                  append_images=[Image.fromarray(IMGS[4])])  # two frames: the first is used
    (d / "notes.txt").write_text("x")
    (d / ".hidden.png").write_bytes(png(IMGS[5]))
    (d / "bad.png").write_bytes(b"not an image")
    src = open_source(d)
    gif = next(i for i in range(len(src)) if src.describe(i).endswith("anim.gif"))
    with Image.open(d / "anim.gif") as im:
        assert np.array_equal(np.asarray(src.load(gif)), np.asarray(im.convert("RGB")))
    st = fd_eval.compute_stats(d, skip_bad=True, device="cpu", num_workers=0, progress=False)["pixels-4"]
    acc = InputAccounting.from_dict(st.metadata["source"]["inputs"])
    assert (acc.found, acc.used, len(acc.skipped)) == (7, 4, 1) and acc.skipped[0]["name"].endswith("bad.png")
    assert acc.summary("generated") == (
        f"generated {d}: 7 found, 4 used, 1 skipped (not an image), 2 ignored (hidden file or folder: 1, "
        "not an image file extension: 1)")


def test_num_subset_counts_unselected(tmp_path, pixels):
    d = save_images(IMGS, tmp_path / "gen")
    st = fd_eval.compute_stats(d, num=4, seed=1, device="cpu", num_workers=0, progress=False)["pixels-4"]
    inputs = st.metadata["source"]["inputs"]
    assert (inputs["found"], inputs["used"], inputs["not_selected"]) == (6, 4, 2)


def test_zip_unsafe_member_warning_reaches_the_console_and_json(tmp_path, pixels):
    z = tmp_path / "g.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for i in range(4):
            zf.writestr(f"{i}.png", png(IMGS[i]))
        zf.writestr("../evil.png", png(IMGS[4]))
        zf.writestr("readme.md", "x")
    ref = save_images(IMGS, tmp_path / "ref")
    r = run(["compute", str(z), "--ref", str(ref), "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert "'..' path" in r.output and f"generated {z}: 6 found, 5 used, 1 ignored" in r.output
    doc = json.loads((tmp_path / "r.json").read_text())
    gen = doc["inputs"]["generated"]
    assert gen["used"] == 5 and any("'..' path" in w for w in gen["warnings"])
    assert doc["inputs"]["reference"]["used"] == 6


def test_skip_bad_applies_to_an_image_folder_reference(tmp_path, pixels):
    bad = save_images(IMGS, tmp_path / "bad")
    (bad / "zz.png").write_bytes(png(IMGS[0])[:60])  # truncated
    strict = run(["compute", str(bad), "--ref", str(bad)])
    assert strict.exit_code == 1 and "zz.png" in strict.output and "--skip-bad" in strict.output
    r = run(["compute", str(bad), "--ref", str(bad), "--skip-bad", "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "r.json").read_text())
    for side in ("generated", "reference"):
        assert doc["inputs"][side]["used"] == 6 and [s["name"] for s in doc["inputs"][side]["skipped"]] == \
            [str(bad / "zz.png")]
        assert f"{side} {bad}: 7 found, 6 used, 1 skipped (truncated)" in r.output
    assert doc["results"]["pixels-4"]["fd"] == pytest.approx(0, abs=1e-6)
    # the reference cached under --skip-bad is not used by a strict run: that still stops on the bad image
    again = run(["compute", str(save_images(IMGS, tmp_path / "ok")), "--ref", str(bad)])
    assert again.exit_code == 1 and "zz.png" in again.output


def test_ceiling_real_set_skip_bad(tmp_path, pixels):
    real = save_images(IMGS, tmp_path / "real")
    (real / "zz.png").write_bytes(b"\x89PNG broken")
    ref = save_images(IMGS, tmp_path / "ref")
    res = fd_eval.ceiling(real, str(ref), n=None, skip_bad=True, device="cpu", num_workers=0, progress=False)
    assert res.inputs["real"]["used"] == 6 and len(res.inputs["real"]["skipped"]) == 1
    assert res.inputs["reference"]["used"] == 6


def test_stats_cli_prints_accounting(tmp_path, pixels):
    d = save_images(IMGS, tmp_path / "gen")
    (d / "x.gif.txt").write_text("x")
    r = run(["stats", str(d), "-o", str(tmp_path / "s.safetensors")])
    assert r.exit_code == 0, r.output
    assert f"input {d}: 7 found, 6 used, 1 ignored (not an image file extension: 1)" in r.output
    meta = fd_eval.load_stats(tmp_path / "s.safetensors").metadata["source"]
    assert meta["inputs"]["ignored_items"] == {"not an image file extension": [str(d / "x.gif.txt")]}


def test_unreadable_subfolder_is_listed(tmp_path, monkeypatch):
    d = save_images(IMGS[:2], tmp_path / "gen")
    save_images(IMGS[2:4], d / "locked")
    real = os.scandir

    def scandir(path):  # root reads any folder: simulate the permission error
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    src = open_source(d)
    acc = InputAccounting.build(src, [], len(src))
    assert (acc.found, acc.used, acc.ignored) == (3, 2, {"unreadable folder": 1})
    assert acc.ignored_items["unreadable folder"] == [str(d / "locked")]
    assert acc.listing() == [f"ignored (unreadable folder): {d / 'locked'}"]
