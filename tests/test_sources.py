"""Image sources: every format gives the same decoded pixels in the same order; subsets, fingerprints,
pickling and DataLoader workers."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _images import photo_crops
from fd_eval import sources
from fd_eval.errors import InputError
from fd_eval.extractors.preprocess import pil_resize, pil_to_tensor
from fd_eval.sources import (
    ArraySource,
    Batch,
    DirectorySource,
    ExtractorDataset,
    SkippedItem,
    TarSource,
    ZipSource,
    collate,
    expand_braces,
    open_source,
)

N = 7
SHARD_SIZES = (3, 2, 2)


def encode(a: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    b = io.BytesIO()
    Image.fromarray(a).save(b, fmt, **kw)
    return b.getvalue()


def gpic_key(i: int) -> str:
    return hashlib.sha256(f"sample-{i}".encode()).hexdigest()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))


def gpic_sample(i: int, data: bytes, ext: str = "png") -> list[tuple[str, bytes]]:
    key = gpic_key(i)
    meta = {"key": key, "caption": f"caption {i}", "caption_type": "short", "img_width": 32, "img_height": 24,
            "split": ["nano"], "license": "CC-BY", "retrieved_at": "2025-01-01"}
    return [(f"{key}.json", json.dumps(meta).encode()), (f"{key}.{ext}", data)]


def rel_name(i: int) -> str:
    # three files at the top, the rest in a subfolder: sorted relative paths keep index order
    return f"{i:03d}.png" if i < 3 else f"sub/{i:03d}.png"


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return photo_crops(N, 24, 32, seed=3)


@pytest.fixture(scope="module")
def formats(tmp_path_factory, images) -> dict[str, object]:
    root = tmp_path_factory.mktemp("formats")
    d = root / "pngs"
    for i, a in enumerate(images):
        (d / rel_name(i)).parent.mkdir(parents=True, exist_ok=True)
        (d / rel_name(i)).write_bytes(encode(a))
    with zipfile.ZipFile(root / "pngs.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i in reversed(range(N)):  # archive order must not matter: members are sorted by name
            zf.writestr(rel_name(i), encode(images[i]))
    (root / "shards").mkdir()
    i = 0
    for s, size in enumerate(SHARD_SIZES):
        members = []
        for _ in range(size):
            members += gpic_sample(i, encode(images[i]))
            i += 1
        write_tar(root / "shards" / f"gpic_test_{s:05d}.tar", members)
    np.savez(root / "samples.npz", images, np.arange(N))  # ADM style: arr_0 images, arr_1 labels
    np.savez_compressed(root / "compressed.npz", images)
    np.save(root / "samples.npy", images)
    return {
        "dir": str(d),
        "zip": str(root / "pngs.zip"),
        "tar_brace": str(root / "shards" / "gpic_test_{00000..00002}.tar"),
        "tar_glob": str(root / "shards" / "gpic_test_*.tar"),
        "tar_list": str(root / "shards" / "gpic_test_{00000,00001,00002}.tar"),
        "npz": str(root / "samples.npz"),
        "npz_compressed": str(root / "compressed.npz"),
        "npy": str(root / "samples.npy"),
        "memory": images,
        "image_glob": str(d / "**" / "*.png"),
    }


FORMATS = ["dir", "zip", "tar_brace", "tar_glob", "tar_list", "npz", "npz_compressed", "npy", "memory"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_gives_the_same_pixels_in_the_same_order(formats, images, fmt):
    src = open_source(formats[fmt])
    assert len(src) == N
    for i in range(N):
        img = src.load(i)
        assert img.mode == "RGB" and img.size == (32, 24)
        np.testing.assert_array_equal(np.asarray(img), images[i], err_msg=f"{fmt} item {i}")
    assert src.ignored == []
    if fmt == "npz_compressed":
        assert len(src.warnings) == 1 and "decompressed into memory" in src.warnings[0]
    else:
        assert src.warnings == []


def test_image_glob_is_a_file_list(formats, images):
    src = open_source(formats["image_glob"])  # pngs/**/*.png: recursive, like the folder itself
    assert isinstance(src, DirectorySource) and src.files == open_source(formats["dir"]).files
    for i in range(N):
        np.testing.assert_array_equal(np.asarray(src.load(i)), images[i])
    one = open_source(Path(formats["dir"]) / "sub" / "004.png")
    assert len(one) == 1 and one.describe(0).endswith("sub/004.png")


def test_source_types_and_describe(formats):
    d = open_source(formats["dir"])
    assert isinstance(d, DirectorySource) and d.describe(4) == os.path.join(formats["dir"], "sub/004.png")
    z = open_source(formats["zip"])
    assert isinstance(z, ZipSource) and z.describe(4) == f"{formats['zip']}:sub/004.png"
    t = open_source(formats["tar_brace"])
    shard1 = formats["tar_brace"].replace("{00000..00002}", "00001")
    assert isinstance(t, TarSource) and t.shards[1] == shard1
    assert t.describe(4) == f"{shard1}:{gpic_key(4)}.png"
    assert t.describe(-1) == t.describe(N - 1)
    a = open_source(formats["npz"])
    assert isinstance(a, ArraySource) and a.describe(3) == f"{formats['npz']}[3]"
    assert open_source(formats["memory"]).describe(3) == "array[3]"
    with pytest.raises(IndexError):
        t.load(N)


def test_tar_meta_is_the_gpic_json(formats):
    t = open_source(formats["tar_glob"])
    for i in range(N):
        m = t.meta(i)
        assert m["key"] == gpic_key(i) and m["caption"] == f"caption {i}" and m["caption_type"] == "short"
    assert open_source(formats["dir"]).meta(0) is None
    assert open_source(formats["npy"]).meta(0) is None


def test_jpeg_members_decode_exactly_like_pil(tmp_path, images):
    datas = [encode(images[0], "JPEG", quality=90), encode(images[1], "JPEG", progressive=True),
             encode(images[2], "WEBP", quality=80), encode(images[3], "BMP"), encode(images[4], "TIFF")]
    exts = ["jpg", "jpeg", "webp", "bmp", "tiff"]
    members = []
    for i, (data, ext) in enumerate(zip(datas, exts)):
        members += gpic_sample(i, data, ext)
    write_tar(tmp_path / "mixed.tar", members)
    src = open_source(tmp_path / "mixed.tar")
    assert len(src) == len(datas)
    for i, data in enumerate(datas):
        ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(np.asarray(src.load(i)), ref)
    assert not np.array_equal(np.asarray(src.load(0)), images[0])  # JPEG is lossy: the reference is PIL's decode


def test_directory_extensions_any_case_and_mixed_sizes(tmp_path, images):
    (tmp_path / "A").mkdir()
    files = {"A/x.PNG": encode(images[0]), "b.JPG": encode(images[1], "JPEG"),
             "c.Tif": encode(images[2][:10, :7].copy(), "TIFF"), "d.webp": encode(images[3], "WEBP", lossless=True)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    src = open_source(tmp_path)
    assert src.files == sorted(files)
    assert src.load(2).size == (7, 10)
    np.testing.assert_array_equal(np.asarray(src.load(3)), images[3])


def test_subsets(formats):
    src = open_source(formats["dir"])
    first = src.subset(4)
    assert list(first.indices) == [0, 1, 2, 3] and first.describe(3) == src.describe(3)
    a, b, c = src.subset(4, seed=0), src.subset(4, seed=0), src.subset(4, seed=1)
    assert list(a.indices) == list(b.indices) and list(a.indices) != list(c.indices)
    assert list(a.indices) == sorted(a.indices) and len(set(a.indices)) == 4
    # the legacy RandomState stream is frozen by NumPy, so this subset is the same on every version
    assert list(a.indices) == sorted(np.random.RandomState(0).permutation(N)[:4])
    np.testing.assert_array_equal(np.asarray(a.load(1)), np.asarray(src.load(int(a.indices[1]))))
    # the same seed picks the same items from any format holding the same images
    t = open_source(formats["tar_brace"]).subset(4, seed=1)
    assert list(t.indices) == list(c.indices)
    assert t.meta(0)["key"] == gpic_key(int(c.indices[0]))
    # subsets of subsets, and fingerprints that tell them apart
    assert list(a.subset(2).indices) == [0, 1]
    fps = {src.fingerprint(), first.fingerprint(), a.fingerprint(), c.fingerprint()}
    assert len(fps) == 4 and a.fingerprint() == b.fingerprint()
    with pytest.raises(InputError, match=r"holds 7.*at most 7"):
        src.subset(8)
    with pytest.raises(InputError):
        src.subset(0)


def test_fingerprint_directory(tmp_path, images):
    d = tmp_path / "d"
    d.mkdir()
    for i in range(3):
        (d / f"{i}.png").write_bytes(encode(images[i]))
    fp = open_source(d).fingerprint()
    assert open_source(d).fingerprint() == fp
    assert len(fp) == 64 and open_source(d).fingerprint(content=True) != fp
    # moving/copying with modification times kept: same key (names are relative to the folder)
    shutil.copytree(d, tmp_path / "copy")
    assert open_source(tmp_path / "copy").fingerprint() == fp
    assert open_source(tmp_path / "copy").fingerprint(content=True) == open_source(d).fingerprint(content=True)
    # a non-image file does not count
    (d / "notes.txt").write_text("x")
    assert open_source(d).fingerprint() == fp
    # addition, modification, removal
    (d / "3.png").write_bytes(encode(images[3]))
    fp_add = open_source(d).fingerprint()
    assert fp_add != fp
    (d / "3.png").write_bytes(encode(images[4]))
    fp_mod = open_source(d).fingerprint()
    assert fp_mod not in (fp, fp_add)
    (d / "3.png").unlink()
    assert open_source(d).fingerprint() == fp
    # same size and a restored mtime: only the content fingerprint sees it (documented trade-off)
    p, st = d / "0.png", os.stat(d / "0.png")
    content_fp = open_source(d).fingerprint(content=True)
    data = bytearray(p.read_bytes())
    data[-20] ^= 0xFF
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert open_source(d).fingerprint() == fp
    assert open_source(d).fingerprint(content=True) != content_fp


def test_fingerprint_tar_and_index_cache(tmp_path, images, monkeypatch):
    for s in range(2):
        write_tar(tmp_path / f"s{s}.tar", gpic_sample(2 * s, encode(images[2 * s])) +
                  gpic_sample(2 * s + 1, encode(images[2 * s + 1])))
    spec = str(tmp_path / "s*.tar")
    src = open_source(spec)
    fp = src.fingerprint()
    assert len(list((Path(os.environ["FD_EVAL_CACHE"]) / "tar_index").glob("*.npz"))) == 2

    # reopening uses the cached header index: no shard is scanned again, and the result is identical
    def no_scan(path):
        raise AssertionError(f"rescanned {path}")

    monkeypatch.setattr(sources.discovery, "scan_tar", no_scan)
    again = open_source(spec)
    assert again.fingerprint() == fp and [again.describe(i) for i in range(4)] == [src.describe(i) for i in range(4)]
    np.testing.assert_array_equal(np.asarray(again.load(3)), images[3])
    monkeypatch.undo()
    # a new shard, then a rewritten shard (new member): new keys, and the stale cache entry is not used
    write_tar(tmp_path / "s2.tar", gpic_sample(4, encode(images[4])))
    fp3 = open_source(spec).fingerprint()
    assert fp3 != fp and len(open_source(spec)) == 5
    write_tar(tmp_path / "s2.tar", gpic_sample(4, encode(images[4])) + gpic_sample(5, encode(images[5])))
    src = open_source(spec)
    fp6 = src.fingerprint()
    assert fp6 not in (fp, fp3) and len(src) == 6
    np.testing.assert_array_equal(np.asarray(src.load(5)), images[5])
    # same size and a restored mtime but other members (sample 6 instead of 5): the index is rebuilt and the
    # member headers change the key
    st = os.stat(tmp_path / "s2.tar")
    write_tar(tmp_path / "s2.tar", gpic_sample(4, encode(images[4])) + gpic_sample(6, encode(images[5])))
    os.utime(tmp_path / "s2.tar", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.path.getsize(tmp_path / "s2.tar") == st.st_size
    src = open_source(spec)
    assert src.meta(5)["key"] == gpic_key(6) and src.fingerprint() != fp6


def test_fingerprint_arrays(tmp_path, images):
    np.save(tmp_path / "a.npy", images)
    fp = open_source(tmp_path / "a.npy").fingerprint()
    x = images.copy()
    x[0, 0, 0, 0] ^= 1
    np.save(tmp_path / "a.npy", x)
    st = os.stat(tmp_path / "a.npy")
    os.utime(tmp_path / "a.npy", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse-mtime filesystems
    assert open_source(tmp_path / "a.npy").fingerprint() != fp
    assert open_source(images).fingerprint() == open_source(images.copy()).fingerprint()
    assert open_source(x).fingerprint() != open_source(images).fingerprint()


@pytest.mark.parametrize("fmt", ["dir", "zip", "tar_brace", "npy", "npz", "npz_compressed", "memory"])
def test_pickle_mid_use(formats, images, fmt):
    src = open_source(formats[fmt])
    src.load(1)  # opens whatever handle the source keeps (fd, ZipFile, memmap)
    blob = pickle.dumps(src)
    if fmt != "memory":
        assert len(blob) < 20_000  # paths and index arrays only: no image data, no decompressed array
    clone = pickle.loads(blob)
    for i in (0, N - 1, 2):
        np.testing.assert_array_equal(np.asarray(clone.load(i)), images[i])
    assert clone.fingerprint() == src.fingerprint() and clone.describe(2) == src.describe(2)
    sub = pickle.loads(pickle.dumps(src.subset(3, seed=5)))
    np.testing.assert_array_equal(np.asarray(sub.load(0)), images[int(sub.indices[0])])
    src.close()
    np.testing.assert_array_equal(np.asarray(src.load(0)), images[0])  # reopens after close


def _resize_16(img: Image.Image) -> torch.Tensor:
    return pil_to_tensor(pil_resize(img, (16, 16)))


def _run_loader(source, transforms, num_workers: int, batch_size: int = 3, skip_bad=None, context=None):
    ds = ExtractorDataset(source, transforms, skip_bad=skip_bad)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                                         multiprocessing_context=context)
    indices, outs, skipped = [], [[] for _ in transforms], []
    for batch in loader:
        assert isinstance(batch, Batch)
        skipped += ds.check(batch)
        indices += batch.indices.tolist()
        for k, x in enumerate(batch.inputs):
            outs[k] += list(x) if isinstance(x, list) else list(x.unbind(0))
    return indices, outs, skipped


def test_dataloader_workers_match_single_process(formats, images, tmp_path):
    src = open_source(formats["tar_brace"])
    transforms = [pil_to_tensor, _resize_16]
    i0, o0, s0 = _run_loader(src, transforms, num_workers=0)
    i2, o2, s2 = _run_loader(src, transforms, num_workers=2)
    assert i0 == i2 == list(range(N)) and s0 == s2 == []
    for k in range(2):
        for a, b in zip(o0[k], o2[k]):
            assert torch.equal(a, b)
    for i in range(N):
        assert torch.equal(o0[0][i], torch.from_numpy(images[i]).permute(2, 0, 1))
        assert torch.equal(o0[1][i], _resize_16(Image.fromarray(images[i])))


def test_dataloader_spawned_worker(formats, images):
    # spawn pickles the dataset: the source must travel without open handles and reopen in the worker
    src = open_source(formats["zip"])
    src.load(0)
    i0, o0, _ = _run_loader(src, [pil_to_tensor], num_workers=0)
    i1, o1, _ = _run_loader(src, [pil_to_tensor], num_workers=1, batch_size=4, context="spawn")
    assert i0 == i1 == list(range(N)) and all(torch.equal(a, b) for a, b in zip(o0[0], o1[0]))


def test_collate_stacks_when_shapes_agree_else_lists(images):
    a = pil_to_tensor(Image.fromarray(images[0]))
    b = pil_to_tensor(Image.fromarray(images[1][:10]))
    skip = SkippedItem(5, "x.png", "corrupt")
    batch = collate([(0, [a, a]), skip, (1, [a, b])])
    assert batch.indices.tolist() == [0, 1] and batch.skipped == [skip] and len(batch) == 2
    assert isinstance(batch.inputs[0], torch.Tensor) and batch.inputs[0].shape == (2, 3, 24, 32)
    assert isinstance(batch.inputs[1], list) and [t.shape[1] for t in batch.inputs[1]] == [24, 10]
    empty = collate([skip])
    assert len(empty) == 0 and empty.inputs == [] and empty.skipped == [skip]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_batch_pin_memory(images):
    a = pil_to_tensor(Image.fromarray(images[0]))
    b = pil_to_tensor(Image.fromarray(images[1][:10]))
    pinned = collate([(0, [a, a]), (1, [a, b])]).pin_memory()
    assert pinned.indices.is_pinned() and pinned.inputs[0].is_pinned() and all(t.is_pinned() for t in pinned.inputs[1])
    assert torch.equal(pinned.inputs[0][1], a) and torch.equal(pinned.inputs[1][1], b)


def test_brace_expansion():
    assert expand_braces("s/gpic_test_{00000..00002}.tar") == [f"s/gpic_test_{i:05d}.tar" for i in range(3)]
    assert expand_braces("{a,b}{8..10}") == ["a8", "a9", "a10", "b8", "b9", "b10"]
    assert expand_braces("x{3..1}") == ["x3", "x2", "x1"]
    assert expand_braces("lit{x}y") == ["lit{x}y"]


def test_compressed_npz_capped_from_header_and_read_as_far_as_needed(tmp_path, monkeypatch):
    """A compressed npz over the per-item limit is refused before any decompression; under the limit only the
    prefix of the deflate stream that the images read need is decompressed (``-n 4`` reads 4 images' worth)."""
    from fd_eval.errors import BadArrayError
    from fd_eval.sources import ArraySource

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    path = tmp_path / "c.npz"
    np.savez_compressed(path, images)
    with pytest.raises(BadArrayError, match=r"c\.npz\[arr_0\].*compressed.*np\.savez.*FD_EVAL_MAX_ITEM_BYTES"):
        open_source(str(path), max_item_bytes=images.nbytes - 1)

    reads: list[int] = []
    real = ArraySource._rows

    def counting(self, n):
        out = real(self, n)
        reads.append(out.shape[0])
        return out

    monkeypatch.setattr(ArraySource, "_rows", counting)
    src = open_source(str(path), max_item_bytes=images.nbytes)
    assert len(src) == 40 and reads == []  # nothing decompressed at open
    sub = src.subset(4)
    got = np.stack([np.asarray(sub.load(i)) for i in range(4)])
    np.testing.assert_array_equal(got, images[:4])
    assert max(reads) == 4
    # a full pass grows the prefix geometrically and equals the array
    full = np.stack([np.asarray(src.load(i)) for i in range(40)])
    np.testing.assert_array_equal(full, images)
    assert reads == [1, 2, 4, 8, 16, 32, 40]  # each read doubles the prefix: O(N) decompression in all
