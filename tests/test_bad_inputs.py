"""Bad and odd inputs at the source level (issue 9.1/9.2): each gets its own error class and a one-line
message naming the item; odd-but-valid images decode exactly as ``PIL.Image.open(f).convert("RGB")``."""
from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, ImageOps

from _images import photo_crops
from fd_eval.errors import (
    BadArrayError,
    BadImageError,
    EmptySourceError,
    FDEvalError,
    InputError,
    SourceError,
)
from fd_eval.extractors.preprocess import pil_to_tensor
from fd_eval.sources import ExtractorDataset, collate, decode_image, open_source

IMG = photo_crops(1, 24, 32, seed=11)[0]


def encode(a, fmt="PNG", **kw) -> bytes:
    b = io.BytesIO()
    (a if isinstance(a, Image.Image) else Image.fromarray(a)).save(b, fmt, **kw)
    return b.getvalue()


def reference(path_or_bytes) -> np.ndarray:
    f = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    return np.asarray(Image.open(f).convert("RGB"))


def write_tar(path: Path, members: list[tuple[str, bytes]], **kw) -> None:
    with tarfile.open(path, "w", **kw) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def one_line_error(excinfo, *names: str) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for name in names:
        assert name in msg, (name, msg)
    return msg


def single(tmp_path: Path, name: str, data: bytes):
    d = tmp_path / "imgs"
    d.mkdir(exist_ok=True)
    (d / name).write_bytes(data)
    return open_source(d), str(d / name)


# --- bad image files ----------------------------------------------------------------------------------
def test_zero_byte_file(tmp_path):
    src, path = single(tmp_path, "empty.png", b"")
    with pytest.raises(BadImageError) as e:
        src.load(0)
    assert "0 bytes" in one_line_error(e, path, "--skip-bad")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(tmp_path, fmt):
    data = encode(IMG, fmt)
    src, path = single(tmp_path, f"cut.{fmt.lower()}", data[: len(data) * 2 // 3])
    with pytest.raises(BadImageError) as e:
        src.load(0)
    assert "truncated" in one_line_error(e, path).lower()


def test_non_image_bytes_with_image_extension(tmp_path):
    src, path = single(tmp_path, "notes.jpg", b"just some text, not a JPEG\n" * 10)
    with pytest.raises(BadImageError) as e:
        src.load(0)
    assert "not an image" in one_line_error(e, path)


@pytest.mark.parametrize("stored,named", [("JPEG", "x.png"), ("PNG", "x.jpg"), ("WEBP", "x.tif")])
def test_lying_extension_decodes_by_content(tmp_path, stored, named):
    data = encode(IMG, stored)
    src, path = single(tmp_path, named, data)
    np.testing.assert_array_equal(np.asarray(src.load(0)), reference(data))


def test_non_image_and_hidden_files_are_ignored_and_reported(tmp_path):
    d = tmp_path / "imgs"
    (d / ".ipynb_checkpoints").mkdir(parents=True)
    (d / "a.png").write_bytes(encode(IMG))
    (d / "captions.txt").write_text("a cat")
    (d / "meta.json").write_text("{}")
    (d / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")  # macOS resource fork
    (d / ".ipynb_checkpoints" / "a-checkpoint.png").write_bytes(encode(IMG))
    src = open_source(d)
    assert len(src) == 1 and src.files == ["a.png"]
    reasons = {Path(s.name).name: s.reason for s in src.ignored}
    assert reasons == {"captions.txt": "not an image file extension", "meta.json": "not an image file extension",
                       "._a.png": "hidden file or folder", ".ipynb_checkpoints": "hidden file or folder"}
    assert all(s.index is None for s in src.ignored)


@pytest.mark.parametrize("case", ["cmyk_jpeg", "cmyk_tiff", "palette", "palette_transparent", "i16", "gray",
                                  "gray_alpha", "rgba", "bilevel"])
def test_modes_convert_exactly_like_the_reference(tmp_path, case):
    rgb = Image.fromarray(IMG)
    if case == "cmyk_jpeg":
        data = encode(rgb.convert("CMYK"), "JPEG", quality=95)
    elif case == "cmyk_tiff":
        data = encode(rgb.convert("CMYK"), "TIFF")
    elif case == "palette":
        data = encode(rgb.quantize(16), "PNG")
    elif case == "palette_transparent":
        data = encode(rgb.quantize(16), "PNG", transparency=3)
    elif case == "i16":
        data = encode(Image.fromarray((IMG[..., 0].astype(np.uint16) * 257)), "PNG")
    elif case == "gray":
        data = encode(rgb.convert("L"), "PNG")
    elif case == "gray_alpha":
        data = encode(rgb.convert("LA"), "PNG")
    elif case == "rgba":
        data = encode(Image.fromarray(np.dstack([IMG, IMG[..., :1] // 2])), "PNG")
    else:
        data = encode(rgb.convert("1"), "BMP")
    src, path = single(tmp_path, "x.tiff" if "tiff" in case else "x.png", data)
    out = np.asarray(src.load(0))
    np.testing.assert_array_equal(out, reference(Path(path).open("rb")))
    if case == "i16":  # Pillow clips 16-bit values to 255 rather than scaling them (documented)
        assert set(np.unique(out)) <= {0, 255}
    if case == "rgba":  # alpha is dropped, not composited
        np.testing.assert_array_equal(out, IMG)


def test_exif_rotation_is_not_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    data = encode(IMG, "JPEG", exif=exif.tobytes())
    src, path = single(tmp_path, "rotated.jpg", data)
    out = np.asarray(src.load(0))
    assert out.shape == (24, 32, 3)  # stored orientation, as the reference decodes it
    np.testing.assert_array_equal(out, reference(data))
    assert ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size == (24, 32)  # a viewer would rotate it


def test_decompression_bomb(tmp_path, monkeypatch):
    src, path = single(tmp_path, "big.png", encode(IMG))  # 768 pixels
    limit_before = Image.MAX_IMAGE_PIXELS
    bomb = open_source(tmp_path / "imgs", max_image_pixels=300)  # error above 2 x 300 pixels
    with pytest.raises(BadImageError) as e:
        bomb.load(0)
    one_line_error(e, path, "decompression-bomb", "FD_EVAL_MAX_IMAGE_PIXELS", "max_image_pixels")
    assert Image.MAX_IMAGE_PIXELS == limit_before  # the override is scoped to fd-eval's decode
    np.testing.assert_array_equal(np.asarray(open_source(tmp_path / "imgs", max_image_pixels=0).load(0)), IMG)
    monkeypatch.setenv("FD_EVAL_MAX_IMAGE_PIXELS", "300")
    with pytest.raises(BadImageError):
        open_source(tmp_path / "imgs").load(0)
    monkeypatch.setenv("FD_EVAL_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(InputError, match="FD_EVAL_MAX_IMAGE_PIXELS"):
        open_source(tmp_path / "imgs")
    # Pillow's own global is honoured when no override is given
    monkeypatch.delenv("FD_EVAL_MAX_IMAGE_PIXELS")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    with pytest.raises(BadImageError):
        src.load(0)


def test_truncation_detected_even_if_pillow_is_told_to_pad(tmp_path, monkeypatch):
    data = encode(IMG, "JPEG")
    src, path = single(tmp_path, "cut.jpg", data[:-100])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(BadImageError):
        src.load(0)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


# --- empty and missing sources -------------------------------------------------------------------------------
def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptySourceError) as e:
        open_source(tmp_path / "empty")
    one_line_error(e, str(tmp_path / "empty"))
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(EmptySourceError) as e:
        open_source(tmp_path / "empty")
    one_line_error(e, "1 other entries ignored", "readme.txt")


def test_empty_tar(tmp_path):
    (tmp_path / "zero.tar").write_bytes(b"")
    with pytest.raises(EmptySourceError) as e:
        open_source(tmp_path / "zero.tar")
    one_line_error(e, "zero.tar")
    write_tar(tmp_path / "nomembers.tar", [])  # only the end-of-archive blocks
    with pytest.raises(EmptySourceError):
        open_source(tmp_path / "nomembers.tar")
    write_tar(tmp_path / "jsononly.tar", [("k1.json", b"{}"), ("k2.json", b"{}")])
    with pytest.raises(EmptySourceError) as e:
        open_source(tmp_path / "jsononly.tar")
    one_line_error(e, "jsononly.tar", "2 members ignored")


def test_empty_array_and_zip(tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(EmptySourceError) as e:
        open_source(tmp_path / "empty.npy")
    one_line_error(e, "empty.npy")
    with pytest.raises(EmptySourceError):
        open_source(np.zeros((0, 8, 8, 3), np.uint8))
    with zipfile.ZipFile(tmp_path / "e.zip", "w") as zf:
        zf.writestr("readme.txt", "x")
    with pytest.raises(EmptySourceError):
        open_source(tmp_path / "e.zip")


def test_missing_paths_and_unknown_formats(tmp_path):
    with pytest.raises(SourceError) as e:
        open_source(tmp_path / "nope")
    one_line_error(e, str(tmp_path / "nope"))
    write_tar(tmp_path / "s_00000.tar", [("k.png", encode(IMG))])
    write_tar(tmp_path / "s_00002.tar", [("k.png", encode(IMG))])
    with pytest.raises(SourceError) as e:  # a gap in a brace range is an error, not a silently smaller set
        open_source(str(tmp_path / "s_{00000..00002}.tar"))
    one_line_error(e, "s_00001.tar")
    with pytest.raises(SourceError):
        open_source(str(tmp_path / "x_*.tar"))
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(SourceError, match="unknown source format"):
        open_source(tmp_path / "data.csv")


# --- tar shards ----------------------------------------------------------------------------------------
def test_tar_member_with_absolute_or_dotdot_path_is_read_in_memory(tmp_path):
    escape = f"escape-{uuid.uuid4().hex}.png"
    absolute = f"/tmp/fd-eval-abs-{uuid.uuid4().hex}.png"
    data = encode(IMG)
    write_tar(tmp_path / "evil.tar", [(f"../{escape}", data), (absolute, data)])
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        src = open_source("evil.tar")
        for i in range(2):
            np.testing.assert_array_equal(np.asarray(src.load(i)), IMG)
    finally:
        os.chdir(cwd)
    assert src.describe(0) == f"evil.tar:../{escape}" and src.describe(1) == f"evil.tar:{absolute}"
    assert len(src.warnings) == 1 and "2 member(s) with an absolute or '..' path" in src.warnings[0]
    assert not (tmp_path.parent / escape).exists() and not os.path.exists(absolute)


def test_tar_links_are_never_followed(tmp_path):
    with tarfile.open(tmp_path / "links.tar", "w") as tf:
        ti = tarfile.TarInfo("a.png")
        data = encode(IMG)
        ti.size = len(data)
        tf.addfile(ti, io.BytesIO(data))
        link = tarfile.TarInfo("b.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    src = open_source(tmp_path / "links.tar")
    assert len(src) == 1 and src.describe(0).endswith(":a.png")
    assert [(s.name.rsplit(":", 1)[1], "not a regular file" in s.reason) for s in src.ignored] == [("b.png", True)]


def test_tar_member_size_cap(tmp_path, monkeypatch):
    data = encode(IMG)
    write_tar(tmp_path / "big.tar", [("k.json", b'{"key": "k"}'), ("k.png", data)])
    src = open_source(tmp_path / "big.tar", max_item_bytes=100)
    with pytest.raises(BadImageError) as e:
        src.load(0)
    one_line_error(e, "big.tar:k.png", f"{len(data)} bytes", "FD_EVAL_MAX_ITEM_BYTES")
    monkeypatch.setenv("FD_EVAL_MAX_ITEM_BYTES", "100")
    img, msg = open_source(tmp_path / "big.tar").load_checked(0)
    assert img is None and "big.tar:k.png" in msg
    monkeypatch.setenv("FD_EVAL_MAX_ITEM_BYTES", str(len(data)))
    np.testing.assert_array_equal(np.asarray(open_source(tmp_path / "big.tar").load(0)), IMG)


def test_truncated_shard(tmp_path):
    a, b = encode(IMG), encode(IMG[::-1].copy())
    write_tar(tmp_path / "t.tar", [("a.png", a), ("b.png", b)])
    raw = (tmp_path / "t.tar").read_bytes()
    cut = raw.index(b[:64]) + len(b) // 2  # in the middle of the last member's data
    (tmp_path / "t.tar").write_bytes(raw[:cut])
    with pytest.raises(SourceError) as e:  # found when the shard is opened, not an hour into the run
        open_source(tmp_path / "t.tar")
    one_line_error(e, "t.tar", "truncated", "re-download", "--skip-bad")
    src = open_source(tmp_path / "t.tar", skip_bad=True)
    assert [s.message.split(":")[0] for s in src.ignored] == ["truncated"]
    np.testing.assert_array_equal(np.asarray(src.load(0)), IMG)
    with pytest.raises(BadImageError) as e:
        src.load(1)
    assert "truncated" in one_line_error(e, "t.tar:b.png", "re-download")


def test_corrupt_tar_header(tmp_path):
    a = encode(IMG)
    write_tar(tmp_path / "c.tar", [("a.png", a), ("b.png", a), ("c.png", a)])
    raw = bytearray((tmp_path / "c.tar").read_bytes())
    second = raw.index(b"b.png\0")
    raw[second:second + 512] = b"\x07" * 512  # garbage where the second header should be
    (tmp_path / "c.tar").write_bytes(bytes(raw))
    with pytest.raises(SourceError) as e:  # tarfile would stop silently here, hiding two thirds of the shard
        open_source(tmp_path / "c.tar")
    one_line_error(e, "c.tar", "corrupt", "--skip-bad")
    src = open_source(tmp_path / "c.tar", skip_bad=True)
    assert len(src) == 1 and "corrupt" in src.ignored[0].message and src.warnings
    np.testing.assert_array_equal(np.asarray(src.load(0)), IMG)


def test_not_a_tar_and_compressed_tar(tmp_path):
    (tmp_path / "fake.tar").write_bytes(b"hello, not a tar" * 100)
    with pytest.raises(SourceError) as e:
        open_source(tmp_path / "fake.tar")
    one_line_error(e, "fake.tar", "not a tar archive")
    write_tar(tmp_path / "plain.tar", [("k.png", encode(IMG))])
    (tmp_path / "gz.tar").write_bytes(gzip.compress((tmp_path / "plain.tar").read_bytes()))
    with pytest.raises(SourceError) as e:
        open_source(tmp_path / "gz.tar")
    one_line_error(e, "gz.tar", "decompress")


def test_corrupt_image_in_tar_and_zip_names_the_member(tmp_path):
    good, bad = encode(IMG, "JPEG"), encode(IMG, "JPEG")[:300]
    write_tar(tmp_path / "s.tar", [("k0.json", b"{}"), ("k0.jpg", good), ("k1.json", b"{}"), ("k1.jpg", bad)])
    with pytest.raises(BadImageError) as e:
        open_source(tmp_path / "s.tar").load(1)
    one_line_error(e, "s.tar:k1.jpg")
    # a zip member whose bytes were altered after the CRC was recorded
    with zipfile.ZipFile(tmp_path / "z.zip", "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("dir/a.jpg", good)
    raw = bytearray((tmp_path / "z.zip").read_bytes())
    pos = raw.index(good[:32]) + 200
    raw[pos] ^= 0xFF
    (tmp_path / "z.zip").write_bytes(bytes(raw))
    with pytest.raises(BadImageError) as e:
        open_source(tmp_path / "z.zip").load(0)
    one_line_error(e, "z.zip:dir/a.jpg", "CRC")


# --- arrays -----------------------------------------------------------------------------------------------
X = photo_crops(3, 8, 10, seed=2)


@pytest.mark.parametrize("case,array,needles", [
    ("float01", X.astype(np.float32) / 255, ["float32", "(x * 255).round().clip(0, 255).astype(np.uint8)"]),
    ("float11", X.astype(np.float64) / 127.5 - 1, ["float64", "((x + 1) * 127.5)"]),
    ("int64", X.astype(np.int64), ["int64", "x.clip(0, 255).astype(np.uint8)"]),
    ("nchw", X.transpose(0, 3, 1, 2).copy(), ["NCHW", "x.transpose(0, 2, 3, 1)"]),
    ("rgba", np.concatenate([X, X[..., :1]], -1), ["4 channels", "x[..., :3]"]),
    ("gray", X[..., 0].copy(), ["grayscale", "np.repeat"]),
    ("nchw_float", X.transpose(0, 3, 1, 2).astype(np.float32) / 255, ["x.transpose(0, 2, 3, 1)", "astype(np.uint8)"]),
])
def test_bad_arrays(tmp_path, case, array, needles):
    np.save(tmp_path / f"{case}.npy", array)
    np.savez(tmp_path / f"{case}.npz", array)
    for path in (tmp_path / f"{case}.npy", tmp_path / f"{case}.npz"):
        with pytest.raises(BadArrayError) as e:
            open_source(path)
        one_line_error(e, path.name, *needles)
    with pytest.raises(BadArrayError) as e:
        open_source(array)
    one_line_error(e, "array", *needles)


class _Payload:
    """Unpickling this object creates a marker file: proof that something was unpickled."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["npy", "npz", "npz_compressed"])
def test_pickle_bearing_arrays_are_refused_unread(tmp_path, kind):
    _Payload.marker = str(tmp_path / "UNPICKLED")
    arr = np.empty(2, dtype=object)
    arr[:] = [_Payload(), _Payload()]
    path = tmp_path / f"evil.{kind[:3]}"
    {"npy": lambda: np.save(path, arr, allow_pickle=True), "npz": lambda: np.savez(path, arr),
     "npz_compressed": lambda: np.savez_compressed(path, arr)}[kind]()
    with pytest.raises(BadArrayError) as e:
        open_source(path)
    one_line_error(e, path.name, "Python objects", "never unpickles")
    assert not (tmp_path / "UNPICKLED").exists()


def test_npz_without_arr_0_and_truncated_npy(tmp_path):
    np.savez(tmp_path / "named.npz", images=X, labels=np.arange(3))
    with pytest.raises(BadArrayError) as e:
        open_source(tmp_path / "named.npz")
    one_line_error(e, "named.npz", "arr_0", "images, labels")
    assert len(open_source(tmp_path / "named.npz", npz_key="images")) == 3
    np.save(tmp_path / "cut.npy", X)
    raw = (tmp_path / "cut.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(raw[:-50])
    with pytest.raises(BadArrayError) as e:
        open_source(tmp_path / "cut.npy")
    one_line_error(e, "cut.npy", "truncated")
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(BadArrayError):
        open_source(tmp_path / "junk.npy")
    with pytest.raises(BadArrayError, match="numpy"):
        open_source(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


# --- skip_bad -------------------------------------------------------------------------------------------------
def _bad_folder(tmp_path: Path) -> Path:
    d = tmp_path / "mixed"
    d.mkdir()
    jpeg = encode(IMG, "JPEG")
    for i in range(6):
        (d / f"{i}.png").write_bytes(encode(np.roll(IMG, i, axis=1)))
    (d / "1.png").write_bytes(b"")
    (d / "4.png").write_bytes(jpeg[:200])
    return d


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_bad_reports_skipped_items(tmp_path, num_workers):
    d = _bad_folder(tmp_path)
    src = open_source(d, skip_bad=True)
    img, msg = src.load_checked(1)
    assert img is None and str(d / "1.png") in msg and "\n" not in msg
    img, msg = src.load_checked(0)
    assert msg is None and np.array_equal(np.asarray(img), IMG)
    ds = ExtractorDataset(src, [pil_to_tensor])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=num_workers, collate_fn=collate)
    indices, skipped = [], []
    for batch in loader:
        skipped += ds.check(batch)
        indices += batch.indices.tolist()
        for i, x in zip(batch.indices.tolist(), batch.inputs[0]):
            assert torch.equal(x, pil_to_tensor(Image.fromarray(np.roll(IMG, i, axis=1))))
    assert indices == [0, 2, 3, 5]
    assert [(s.index, s.name) for s in skipped] == [(1, str(d / "1.png")), (4, str(d / "4.png"))]
    assert "0 bytes" in skipped[0].reason and "\n" not in skipped[1].message
    assert json.dumps([s.to_dict() for s in skipped])  # goes into the JSON output as is


def test_without_skip_bad_the_first_bad_item_stops_the_run(tmp_path):
    d = _bad_folder(tmp_path)
    ds = ExtractorDataset(open_source(d), [pil_to_tensor])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=0, collate_fn=collate)
    with pytest.raises(BadImageError) as e:
        for batch in loader:
            ds.check(batch)
    one_line_error(e, str(d / "1.png"), "0 bytes", "--skip-bad")


# --- fuzz: random bytes and damaged images ---------------------------------------------------------------------
_VALID = [encode(IMG[:12, :16].copy(), "PNG"), encode(IMG[:12, :16].copy(), "JPEG", quality=80),
          encode(IMG[:12, :16].copy(), "JPEG", progressive=True),
          encode(Image.fromarray(IMG[:12, :16].copy()).quantize(8), "PNG", transparency=2)]


def _truncations():
    return st.sampled_from(_VALID).flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n]))


def _corruptions():
    def flip(args):
        data, edits = args
        out = bytearray(data)
        for pos, val in edits:
            out[pos % len(out)] = val
        return bytes(out)

    return st.tuples(st.sampled_from(_VALID), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                       min_size=1, max_size=4)).map(flip)


def _magic_then_noise():
    return st.tuples(st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"RIFF\x00\x00\x00\x00WEBP",
                                      b"II*\x00", b"GIF89a"]), st.binary(max_size=300)).map(lambda t: t[0] + t[1])


@settings(max_examples=1000, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=600), _truncations(), _corruptions(), _magic_then_noise()))
def test_fuzz_decode_is_pil_or_bad_image_error(data):
    try:
        expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except Exception:  # noqa: BLE001 - whatever Pillow raises, fd-eval must turn it into one clean error
        expected = None
    if expected is None:
        with pytest.raises(BadImageError) as e:
            decode_image(data, "fuzz.png")
        assert isinstance(e.value, FDEvalError) and "\n" not in str(e.value) and "fuzz.png" in str(e.value)
    else:
        np.testing.assert_array_equal(np.asarray(decode_image(data, "fuzz.png")), expected)


# --- issue 23 §5: an error raised in a DataLoader worker reaches the user as its own one line -------------------
def test_worker_error_is_the_original_one_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import fd_eval
    import fd_eval.api as api
    from fd_eval.cli import main
    from test_accounting import PixelExtractor

    np.savez_compressed(tmp_path / "a.npz", photo_crops(40, 32, 32, seed=1))
    b = bytearray((tmp_path / "a.npz").read_bytes())
    for i in range(len(b) // 2, len(b) // 2 + 2000):  # damage the deflate stream, keep the zip directory
        b[i] ^= 0x5A
    bad = tmp_path / "c.npz"
    bad.write_bytes(bytes(b))
    with pytest.raises(BadArrayError) as e:
        fd_eval.compute_stats(bad, extractors=[PixelExtractor()], num_workers=1, progress=False, batch_size=4)
    msg = one_line_error(e, f"{bad}[arr_0]", "re-save it")
    rest = msg.replace(str(tmp_path), "")
    assert "Caught" not in rest and "Traceback" not in rest and "worker" not in rest
    monkeypatch.setattr(api, "load_extractors", lambda *a, **k: [PixelExtractor()])
    ref = tmp_path / "ref.npz"
    np.savez(ref, photo_crops(8, 32, 32, seed=2))
    r = CliRunner().invoke(main, ["compute", str(bad), "--ref", str(ref), "--num-workers", "1", "--device", "cpu",
                                  "-q", "--batch-size", "4"])
    assert r.exit_code == 1 and r.output.startswith(f"Error: {bad}[arr_0]: cannot decompress"), r.output
    assert r.output.count("\n") == 1, r.output


# --- issue 23 §6: bounded memory for hostile archives -------------------------------------------------------------
def test_zip_and_tar_members_refused_from_declared_size_at_the_default_limit(tmp_path):
    from fd_eval.sources.base import DEFAULT_MAX_ITEM_BYTES

    assert DEFAULT_MAX_ITEM_BYTES == 256 << 20
    big = 300 << 20
    z = tmp_path / "bomb.zip"  # a few hundred KB holding a 300 MB member of zeros (written in chunks)
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ok.png", encode(IMG))
        with zf.open("big.png", "w", force_zip64=True) as f:
            for _ in range(big >> 22):
                f.write(bytes(1 << 22))
    assert z.stat().st_size < 2_000_000
    src = open_source(z)
    with pytest.raises(BadImageError) as e:
        src.load(src.names.index("big.png"))
    one_line_error(e, "big.png", f"{big} bytes exceeds the per-item limit of {256 << 20} bytes")
    t = tmp_path / "lying.tar"  # a tar header declaring 300 MB, then the data: refused from the header
    with open(t, "wb") as f:
        ti = tarfile.TarInfo("big.png")
        ti.size = big
        f.write(ti.tobuf())
        f.truncate(512 + big + 1024)  # sparse: the data is holes, never written nor read
    with pytest.raises(BadImageError) as e:
        open_source(t).load(0)
    one_line_error(e, "lying.tar:big.png", "exceeds the per-item limit")


@pytest.mark.parametrize("kind", ["zip", "tar", "folder"])
def test_is_it_an_image_reads_only_the_head(tmp_path, monkeypatch, kind):
    """A 3 MB member that is not an image is refused after its first 1 MiB; a 3 MB real image still decodes."""
    from fd_eval.sources import decode as dec

    junk = b"\x01\x02junk" + bytes(3 << 20)
    noisy = np.random.default_rng(0).integers(0, 256, (1100, 1100, 3), dtype=np.uint8)
    real = encode(noisy)  # ~3.6 MB PNG of noise
    assert len(real) > 1 << 20
    if kind == "zip":
        with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
            zf.writestr("junk.png", junk)
            zf.writestr("real.png", real)
        spec = tmp_path / "a.zip"
    elif kind == "tar":
        write_tar(tmp_path / "a.tar", [("junk.png", junk), ("real.png", real)])
        spec = tmp_path / "a.tar"
    else:
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "junk.png").write_bytes(junk)
        (tmp_path / "d" / "real.png").write_bytes(real)
        spec = tmp_path / "d"
    src = open_source(spec)
    names = [src.describe(i) for i in range(len(src))]
    j, r = (next(i for i, n in enumerate(names) if n.endswith(w)) for w in ("junk.png", "real.png"))
    monkeypatch.setattr(type(src), "_read", lambda self, i: pytest.fail("read the whole item"))
    with pytest.raises(BadImageError) as e:
        src.load(j)
    one_line_error(e, "junk.png", "first 1,048,576 bytes", "the rest was not read")
    monkeypatch.undo()
    assert np.array_equal(np.asarray(src.load(r)), noisy)
    assert dec.is_image_head(real[:1 << 20]) and not dec.is_image_head(junk[:1 << 20])
