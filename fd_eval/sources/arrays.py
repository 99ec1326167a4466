"""``.npy`` / ``.npz`` arrays and in-memory uint8 (N, H, W, 3) arrays (``.npy`` header parsing)."""
from __future__ import annotations

import hashlib
import os
import zipfile
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image

from ..errors import BadArrayError, EmptySourceError, SourceError
from .base import ImageSource, content_part, relative_names, stat_part
from .decode import one_line


# --- arrays ----------------------------------------------------------------------------------------------
def npy_header(fp: Any, item: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from a .npy header, without reading the data or unpickling anything."""
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(fp)
        if version in ((2, 0), (3, 0)):  # 3.0 differs only in the header text's encoding (utf-8)
            return np.lib.format.read_array_header_2_0(fp)
        raise ValueError(f"unsupported .npy version {version}")
    except Exception as e:  # noqa: BLE001
        raise BadArrayError(one_line(f"{item}: not a valid .npy array ({e}); re-save it with np.save")) from None


def array_problems(shape: tuple[int, ...], dtype: np.dtype, item: str,
                    sample: Callable[[], np.ndarray] | None) -> None:
    """Raise BadArrayError / EmptySourceError unless the array is uint8 (N, H, W, 3) with N > 0."""
    if dtype.hasobject:
        raise BadArrayError(f"{item}: holds Python objects (dtype {dtype}), which would need unpickling; fd-eval "
                            "never unpickles: re-save the images as a uint8 (N, H, W, 3) array with np.save/np.savez")
    problems = []
    if len(shape) != 4:
        if len(shape) == 3 and shape[-1] == 3:
            problems.append(f"shape {shape} is one image; add a batch axis: x[None]")
        elif len(shape) == 3:
            problems.append(f"shape {shape} looks like grayscale (N, H, W); make RGB: "
                            "np.repeat(x[..., None], 3, axis=-1)")
        else:
            problems.append(f"shape {shape} is not (N, H, W, 3)")
    elif shape[-1] != 3:
        if shape[1] == 3:
            problems.append(f"shape {shape} looks like NCHW; transpose to NHWC: x.transpose(0, 2, 3, 1)")
        elif shape[-1] == 1:
            problems.append(f"shape {shape} has 1 channel; make RGB: np.repeat(x, 3, axis=-1)")
        elif shape[-1] == 4:
            problems.append(f"shape {shape} has 4 channels (RGBA?); keep RGB: x[..., :3]")
        else:
            problems.append(f"shape {shape} has {shape[-1]} channels; expected (N, H, W, 3) RGB")
    elif 0 in shape[1:3]:
        problems.append(f"shape {shape} has an empty image size")
    if dtype != np.uint8:
        hint = "convert to uint8 0..255"
        if dtype.kind == "f":
            rng = ""
            if sample is not None and len(shape) >= 1 and shape[0] > 0 and 0 not in shape:
                x = np.asarray(sample(), dtype=np.float64)
                lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
                rng = f" (first image spans {lo:.3g}..{hi:.3g})"
                if lo >= 0 and hi <= 1:
                    hint = "values look like 0..1: (x * 255).round().clip(0, 255).astype(np.uint8)"
                elif lo >= -1 and hi <= 1:
                    hint = "values look like -1..1: ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8)"
                else:
                    hint = "values 0..255: x.round().clip(0, 255).astype(np.uint8)"
            else:
                hint = ("values 0..1: (x * 255).round().clip(0, 255).astype(np.uint8); values -1..1: "
                        "((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8)")
            problems.append(f"dtype {dtype}{rng}, expected uint8; convert: {hint}")
        elif dtype.kind in "iub":
            problems.append(f"dtype {dtype}, expected uint8; if values are 0..255: x.clip(0, 255).astype(np.uint8)")
        else:
            problems.append(f"dtype {dtype}, expected uint8 RGB values 0..255")
    if problems:
        raise BadArrayError(one_line(f"{item}: " + "; ".join(problems)))
    if shape[0] == 0:
        raise EmptySourceError(f"{item}: the array holds no images (shape {shape}); check the file")


class ArraySource(ImageSource):
    """uint8 (N, H, W, 3) images from ``.npy``, ``.npz`` (member ``arr_0``) or memory.

    ``.npy`` and uncompressed ``.npz`` members are memory-mapped (``np.savez`` stores ``arr_0`` uncompressed,
    as ADM's sampling scripts do); a compressed member (``np.savez_compressed``) is decompressed into memory as
    far as the images read need it (``-n 4`` decompresses 4 images' worth of a C-order array), and is refused from
    its header when the whole array would exceed the per-item cap ``max_item_bytes`` (noted in ``warnings``).
    Nothing is ever unpickled: object arrays are refused.
    """

    kind = "array"

    def __init__(self, array: np.ndarray | None = None, path: str | None = None, *, key: str = "arr_0",
                 spec: str | None = None, **kw: Any):
        super().__init__(spec or path or "array", **kw)
        self.path, self.key = path, key
        self._mmap: tuple[int, tuple[int, ...], str, bool] | None = None  # (offset, shape, dtype, fortran)
        self._memory: np.ndarray | None = None
        self._compressed = False
        self._cinfo: tuple[tuple[int, ...], str, bool] | None = None  # compressed member: (shape, dtype, fortran)
        if array is not None:
            if not isinstance(array, np.ndarray):
                raise BadArrayError(f"array: expected a numpy uint8 (N, H, W, 3) array, got {type(array).__name__}")
            array_problems(array.shape, array.dtype, "array", lambda: array[0] if array.ndim else array)
            self._memory = array
            self._label = "array"
        elif path is not None and path.lower().endswith(".npz"):
            self._label = path
            self._open_npz(path, key)
        elif path is not None:
            self._label = path
            self._open_npy(path)
        else:
            raise ValueError("ArraySource needs an array or a path")
        shape = (self._memory.shape if self._cinfo is None and self._memory is not None else
                 self._cinfo[0] if self._cinfo is not None else self._mmap[1])
        self.shape = tuple(int(s) for s in shape)

    def _open_npy(self, path: str) -> None:
        try:
            with open(path, "rb") as f:
                shape, fortran, dtype = npy_header(f, path)
                offset = f.tell()
        except OSError as e:
            raise SourceError(f"{path}: cannot read ({e.strerror or e}); check the path") from None
        self._set_mmap(path, offset, shape, dtype, fortran, path)

    def _set_mmap(self, path: str, offset: int, shape: tuple[int, ...], dtype: np.dtype, fortran: bool,
                  item: str) -> None:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if not dtype.hasobject else 0
        if not dtype.hasobject and os.path.getsize(path) < offset + nbytes:
            raise BadArrayError(f"{item}: truncated: header says {shape} {dtype} ({nbytes} bytes) but the file ends "
                                "early; re-save or re-download it")

        def sample() -> np.ndarray:
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                             order="F" if fortran else "C")[0]

        array_problems(tuple(shape), dtype, item, sample)
        self._mmap = (offset, tuple(shape), dtype.str, bool(fortran))

    def _open_npz(self, path: str, key: str) -> None:
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise BadArrayError(f"{path}: not a readable .npz (zip) file ({e}); re-save it with np.savez") from None
        with zf:
            names = [i.filename for i in zf.infolist()]
            member = key + ".npy"
            if member not in names:
                keys = ", ".join(n[:-4] for n in names if n.endswith(".npy")) or "none"
                raise BadArrayError(f"{path}: no array {key!r} (ADM-style files store images as arr_0; this file has: "
                                    f"{keys}); re-save with np.savez(path, images) or pass the right key")
            info = zf.getinfo(member)
            item = f"{path}[{key}]"
            if info.compress_type == zipfile.ZIP_STORED:
                # The member's bytes lie verbatim in the file: local header (30 bytes + name + extra), then .npy.
                with open(path, "rb") as f:
                    f.seek(info.header_offset)
                    local = f.read(30)
                    if len(local) < 30 or local[:4] != b"PK\x03\x04":
                        raise BadArrayError(f"{path}: corrupt .npz member {member}; re-save it with np.savez")
                    start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + \
                        int.from_bytes(local[28:30], "little")
                    f.seek(start)
                    shape, fortran, dtype = npy_header(f, item)
                    offset = f.tell()
                self._set_mmap(path, offset, shape, dtype, fortran, item)
            else:
                try:
                    with zf.open(info) as f:
                        shape, fortran, dtype = npy_header(f, item)
                except BadArrayError:
                    raise
                except Exception as e:  # noqa: BLE001
                    raise BadArrayError(one_line(f"{item}: cannot read ({e}); re-save it with np.savez")) from None
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if not dtype.hasobject else 0
                if nbytes > self.max_item_bytes:
                    raise BadArrayError(
                        f"{item}: compressed (np.savez_compressed) array of {nbytes / 2**30:.2f} GiB would have to "
                        f"be decompressed into memory, above the per-item limit of {self.max_item_bytes / 2**30:.2f} "
                        "GiB; re-save it uncompressed with np.savez (memory-mapped, no limit) or raise "
                        "FD_EVAL_MAX_ITEM_BYTES")
                self._compressed, self._cinfo = True, (tuple(shape), dtype.str, bool(fortran))
                array_problems(tuple(shape), dtype, item, None if dtype.kind != "f" else lambda: self._rows(1)[0])
                self.warnings.append(f"{path}: {key} is compressed (np.savez_compressed): decompressed into memory "
                                     f"as read (up to {nbytes / 2**30:.2f} GiB); np.savez (uncompressed) is "
                                     "memory-mapped instead")

    def _rows(self, n: int) -> np.ndarray:
        """The first ``n`` images of a compressed member (``n`` >= the rows held), read from the start of the
        deflate stream; a Fortran-order array is not row-contiguous and is decompressed whole."""
        assert self.path is not None and self._cinfo is not None
        shape, dtype, fortran = self._cinfo
        n = shape[0] if fortran else min(shape[0], n)
        row = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.key + ".npy") as f:
                if fortran:
                    return np.lib.format.read_array(f, allow_pickle=False)
                npy_header(f, f"{self.path}[{self.key}]")
                data = f.read(n * row)
        except BadArrayError:
            raise
        except Exception as e:  # noqa: BLE001
            raise BadArrayError(one_line(f"{self.path}[{self.key}]: cannot decompress ({e}); re-save it with "
                                          "np.savez")) from None
        if len(data) != n * row:
            raise BadArrayError(f"{self.path}[{self.key}]: truncated: the compressed member ends before image {n - 1}"
                                "; re-save or re-download it")
        return np.frombuffer(data, dtype=np.dtype(dtype)).reshape((n, *shape[1:]))

    def _array(self, need: int | None = None) -> np.ndarray:
        """The images as an array-like holding at least the first ``need`` rows (None: all of them)."""
        if self._compressed:  # grow the decompressed prefix geometrically: O(N) decompression over a full pass
            held = 0 if self._memory is None else self._memory.shape[0]
            want = self.shape[0] if need is None else need
            if held < want:
                self._memory = self._rows(max(want, min(self.shape[0], 2 * held)))
            assert self._memory is not None
            return self._memory
        if self._memory is not None:
            return self._memory
        assert self._mmap is not None and self.path is not None
        offset, shape, dtype, fortran = self._mmap
        return self._handle("mmap", lambda: np.memmap(self.path, dtype=np.dtype(dtype), mode="r", offset=offset,
                                                      shape=shape, order="F" if fortran else "C"),
                            lambda m: None, limit=1)

    def __len__(self) -> int:
        return self.shape[0]

    def describe(self, i: int) -> str:
        return one_line(f"{self._label}[{self._check_index(i)}]")

    def load(self, i: int) -> Image.Image:
        i = self._check_index(i)
        return Image.fromarray(np.ascontiguousarray(self._array(i + 1)[i]))

    def _fingerprint_parts(self, content: bool) -> Iterable[bytes]:
        yield f"{self.key}\0{self.shape}".encode()
        if self.path is None:
            a = np.ascontiguousarray(self._memory)
            h = hashlib.sha256()
            flat = a.reshape(-1)
            step = 1 << 26
            for s in range(0, flat.size, step):
                h.update(flat[s:s + step].data)
            yield h.hexdigest().encode()
        else:
            (rel,) = relative_names([self.path])
            yield (content_part if content else stat_part)(rel, self.path)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        if self._compressed:  # don't ship a decompressed copy through pickle; reload lazily instead
            state["_memory"] = None
        return state
