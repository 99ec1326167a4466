"""Image sources: every input format as one indexable, picklable sequence of RGB images.

``open_source(spec)`` accepts

* a directory (recursive; .png .jpg .jpeg .webp .bmp .tif .tiff, any case; sorted by relative path),
* a ``.zip`` of images (sorted by member name),
* tar shards in WebDataset layout (``{key}.json`` + ``{key}.jpg|png``): one ``.tar``, a glob
  (``shards/*.tar``) or a brace range (``shards/gpic_test_{00000..00127}.tar``), in shard order then tar order,
* ``.npy`` / ``.npz`` (``arr_0``, ADM / guided-diffusion style) arrays of uint8 (N, H, W, 3), memory-mapped,
* an in-memory uint8 (N, H, W, 3) numpy array,
* a glob or brace range of image files (treated like a directory holding exactly those files).

Every image is decoded as the reference protocols do, ``PIL.Image.open(f).convert("RGB")`` with a full decode
(no EXIF rotation, no ICC colour management, 16-bit values clipped to 255 by Pillow, alpha dropped, CMYK
converted by Pillow's formula). An item that does not decode raises :class:`BadImageError` naming the item,
the reason and the fix; :meth:`ImageSource.load_checked` returns the error instead so a pipeline can skip it.

Sources are map-style and safe for ``torch.utils.data.DataLoader`` workers: they hold paths and index arrays,
never an open file across ``fork``/``pickle`` (file descriptors are opened lazily per process).

Limits (untrusted inputs): ``max_item_bytes`` caps the bytes read for one item (file, zip or tar member;
default 1 GiB, ``$FD_EVAL_MAX_ITEM_BYTES``); ``max_image_pixels`` sets Pillow's decompression-bomb limit
while fd-eval decodes (default: Pillow's ``Image.MAX_IMAGE_PIXELS``, ``$FD_EVAL_MAX_IMAGE_PIXELS``; 0 = none).
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import re
import tarfile
import threading
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.utils.data
from PIL import Image, ImageFile

from .errors import BadArrayError, BadImageError, EmptySourceError, InputError, SourceError
from .io_utils import atomic_path, cache_dir

__all__ = [
    "IMAGE_EXTENSIONS", "ImageSource", "DirectorySource", "ZipSource", "TarSource", "ArraySource",
    "SubsetSource", "SkippedItem", "open_source", "decode_image", "expand_braces", "expand_shards",
    "ExtractorDataset", "Batch", "collate",
]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})
DEFAULT_MAX_ITEM_BYTES = 1 << 30
_FINGERPRINT_VERSION = b"fd_eval.sources.fingerprint/1"
_TAR_INDEX_VERSION = 1
_SKIP_HINT = "or pass --skip-bad (skip_bad=True) to skip and list bad images"
_MAX_BRACE_ITEMS = 1_000_000
# WebDataset's split of a member name into sample key and extension: the extension starts at the first dot
# of the base name (so "a/b.seg.png" is key "a/b", extension "seg.png").
_WDS_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


# --- small helpers -----------------------------------------------------------------------------------
def _one_line(s: object) -> str:
    """``s`` with control characters and undecodable bytes escaped, so messages stay on one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(s))


def _bad_image(item: "str | Callable[[], str]", reason: str, fix: str = "re-create or remove it") -> BadImageError:
    item = item() if callable(item) else item  # names are built only when something went wrong
    err = BadImageError(_one_line(f"{item}: {reason}; {fix}, {_SKIP_HINT}"))
    err.item, err.reason = item, _one_line(reason)  # type: ignore[attr-defined]
    return err


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    if raw.lower() == "none":
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise InputError(f"${name}={raw!r} is not an integer; set a whole number (0 = no limit)") from None
    if value < 0:
        raise InputError(f"${name}={raw!r} is negative; set a whole number (0 = no limit)")
    return value


@dataclass(frozen=True)
class SkippedItem:
    """An item left out: a bad image (``index`` set) or a file that was never indexed (``index`` None).

    ``name`` is the item as :meth:`ImageSource.describe` gives it (path, ``shard.tar:member``, ``a.npz[3]``),
    ``reason`` a short one-line cause, ``message`` the full error message (empty for ignored files).
    """

    index: int | None
    name: str
    reason: str
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- decoding ----------------------------------------------------------------------------------------
_PIL_LOCK = threading.Lock()


@contextlib.contextmanager
def _pil_limits(max_image_pixels: int | None) -> Iterator[None]:
    """Pillow's globals as fd-eval decodes: truncation always detected, the bomb limit optionally overridden.

    Pillow reads both settings from module globals, so an override is set and restored around the decode
    (under a lock); when the globals already hold what we want, nothing is touched.
    """
    want = Image.MAX_IMAGE_PIXELS if max_image_pixels is None else (max_image_pixels or None)
    if want == Image.MAX_IMAGE_PIXELS and not ImageFile.LOAD_TRUNCATED_IMAGES:
        yield
        return
    with _PIL_LOCK:
        old = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = want, False
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = old


def decode_image(data: bytes, item: "str | Callable[[], str]" = "<bytes>", *,
                 max_image_pixels: int | None = None) -> Image.Image:
    """Encoded image bytes -> fully decoded PIL RGB image, exactly ``Image.open(f).convert("RGB")``.

    The format is found from the content (as Pillow does), never from the file extension. Any failure,
    including Pillow's ``DecompressionBombError``, becomes :class:`BadImageError` naming ``item``.

    Args:
        data: the file's bytes.
        item: how messages name the item (or a function returning it, called only on failure).
        max_image_pixels: Pillow's ``MAX_IMAGE_PIXELS`` for this decode (None: the current global; 0: no limit).
            Pillow refuses images above twice this many pixels and warns above it.
    """
    if len(data) == 0:
        raise _bad_image(item, "empty file (0 bytes)")
    try:
        with _pil_limits(max_image_pixels):
            with Image.open(io.BytesIO(data)) as im:
                # convert() loads every pixel, so truncated data raises here rather than in a later resize.
                return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise _bad_image(
            item, f"too many pixels for Pillow's decompression-bomb guard ({e})",
            "if the file is trusted raise the limit with --max-image-pixels N, open_source(max_image_pixels=N) "
            "or FD_EVAL_MAX_IMAGE_PIXELS=N (0 = no limit)") from None
    except Image.UnidentifiedImageError:
        raise _bad_image(item, f"not an image Pillow can identify ({len(data)} bytes: not PNG/JPEG/WebP/"
                               "BMP/TIFF/... content, or cut off within its header)") from None
    except Exception as e:  # noqa: BLE001 - untrusted bytes: every decoder failure is a bad image
        msg = str(e)
        kind = "truncated" if "truncated" in msg.lower() else "corrupt"
        raise _bad_image(item, f"{kind} image data ({type(e).__name__}: {msg})") from None


# --- the interface -----------------------------------------------------------------------------------
class ImageSource:
    """A fixed, ordered sequence of images.

    Attributes:
        spec: the spec the source was opened from (for messages).
        skip_bad: policy flag read by :class:`ExtractorDataset` (and, at open time, whether a corrupt tar
            header stops with an error or is listed in ``ignored``).
        ignored: files and members that were not indexed (non-image files, hidden files, symlinks in tars,
            samples without an image), as :class:`SkippedItem` with ``index=None``. Report them.
        warnings: one-line notes about odd but usable input (e.g. a tar member with an absolute path).
        max_image_pixels, max_item_bytes: the limits (see the module docstring).
    """

    kind = "source"

    def __init__(self, spec: str, *, skip_bad: bool = False, max_image_pixels: int | None = None,
                 max_item_bytes: int | None = None):
        self.spec = spec
        self.skip_bad = bool(skip_bad)
        env_pixels = _env_int("FD_EVAL_MAX_IMAGE_PIXELS")
        self.max_image_pixels = max_image_pixels if max_image_pixels is not None else env_pixels
        env_bytes = _env_int("FD_EVAL_MAX_ITEM_BYTES")
        self.max_item_bytes = int(max_item_bytes or env_bytes or DEFAULT_MAX_ITEM_BYTES)
        self.ignored: list[SkippedItem] = []
        self.warnings: list[str] = []
        self._handles: OrderedDict[Any, Any] = OrderedDict()
        self._handles_pid = os.getpid()

    # --- to implement ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        raise NotImplementedError

    def describe(self, i: int) -> str:
        """How messages name item ``i``: a file path, ``shard.tar:member``, ``images.zip:member``, ``a.npz[3]``."""
        raise NotImplementedError

    def _read(self, i: int) -> bytes:
        """The encoded bytes of item ``i`` (file-backed sources); raises :class:`BadImageError`."""
        raise NotImplementedError

    def _fingerprint_parts(self, content: bool) -> Iterable[bytes]:
        raise NotImplementedError

    # --- the API ------------------------------------------------------------------------------------------
    def load(self, i: int) -> Image.Image:
        """Item ``i`` as a fully decoded PIL RGB image; raises :class:`BadImageError` naming the item."""
        i = self._check_index(i)
        return decode_image(self._read(i), lambda: self.describe(i), max_image_pixels=self.max_image_pixels)

    def read_encoded(self, i: int) -> bytes | None:
        """The encoded bytes of item ``i`` (files, zip and tar members; for GPU decoding), or None for sources
        that hold decoded pixels (arrays). Raises :class:`BadImageError` naming the item when it cannot be read."""
        i = self._check_index(i)
        try:
            return self._read(i)
        except NotImplementedError:
            return None

    def load_checked(self, i: int) -> tuple[Image.Image | None, str | None]:
        """``(image, None)``, or ``(None, one-line error message)`` for a bad image (never raises for those)."""
        img, err = self._load_or_error(i)
        return img, (None if err is None else str(err))

    def _load_or_error(self, i: int) -> tuple[Image.Image | None, BadImageError | None]:
        try:
            return self.load(i), None
        except BadImageError as e:
            if not hasattr(e, "item"):
                e.item, e.reason = self.describe(i), str(e)  # type: ignore[attr-defined]
            return None, e

    def meta(self, i: int) -> dict[str, Any] | None:
        """The sample's parsed ``{key}.json`` for WebDataset tar shards (GPIC: key, caption, ...); else None."""
        self._check_index(i)
        return None

    def fingerprint(self, *, content: bool = False) -> str:
        """Hex sha256 identifying the indexed items, for caching statistics computed from them.

        Default (cheap): relative item names, sizes and modification times (plus zip CRCs and tar member
        headers); it changes when an item is added, removed, renamed or rewritten, and survives moving the
        data when modification times are kept (``mv``, ``cp -p``, ``rsync -a``). ``content=True`` hashes every
        byte instead of the modification times (slow: reads everything; survives any copy). In-memory arrays
        are always hashed by content.
        """
        h = hashlib.sha256(_FINGERPRINT_VERSION + b"\0" + self.kind.encode() + (b"\0content" if content else b""))
        for part in self._fingerprint_parts(content):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        return h.hexdigest()

    def subset(self, n: int, seed: int | None = None) -> "SubsetSource":
        """The first ``n`` items, or with ``seed`` a random ``n`` of them, kept in source order.

        The random choice is ``numpy.random.RandomState(seed).permutation(len(self))[:n]`` sorted, which NumPy
        keeps stable across versions, so a seed names the same subset everywhere.
        """
        total = len(self)
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n <= 0:
            raise InputError(f"{self.spec}: subset size must be a positive integer, got {n!r}")
        if n > total:
            raise InputError(f"{self.spec}: asked for {n} images but the source holds {total}; "
                             f"lower -n/--num to at most {total}")
        if seed is None:
            idx = np.arange(n, dtype=np.int64)
        else:
            if not 0 <= int(seed) < 2**32:
                raise InputError(f"{self.spec}: seed must be in 0..2**32-1, got {seed}")
            idx = np.sort(np.random.RandomState(int(seed)).permutation(total)[:n]).astype(np.int64)
        return SubsetSource(self, idx)

    # --- plumbing -----------------------------------------------------------------------------------------
    def _check_index(self, i: int) -> int:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{self.spec}: index {i} out of range for {n} images")
        return i

    def _handle(self, key: Any, opener: Callable[[], Any], closer: Callable[[Any], None], limit: int = 64) -> Any:
        """A per-process handle (file descriptor, ZipFile), opened lazily, least recently used closed first."""
        if self._handles_pid != os.getpid():  # forked: the parent's handles are not ours to use or close
            self._handles, self._handles_pid = OrderedDict(), os.getpid()
        h = self._handles.get(key)
        if h is None:
            h = self._handles[key] = opener()
            while len(self._handles) > limit:
                _, old = self._handles.popitem(last=False)
                with contextlib.suppress(Exception):
                    closer(old)
        else:
            self._handles.move_to_end(key)
        return h

    def _closer(self, h: Any) -> None:
        if isinstance(h, int):
            os.close(h)
        else:
            h.close()

    def close(self) -> None:
        """Close this process's open handles (they reopen on the next load)."""
        if self._handles_pid == os.getpid():
            for h in self._handles.values():
                with contextlib.suppress(Exception):
                    self._closer(h)
        self._handles = OrderedDict()

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"], state["_handles_pid"] = OrderedDict(), None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, n={len(self)})"


def _read_capped(item: "str | Callable[[], str]", size: int, cap: int) -> None:
    if size > cap:
        raise _bad_image(item, f"{size} bytes exceeds the per-item limit of {cap} bytes",
                         "if the file is trusted raise the limit with open_source(max_item_bytes=N) or "
                         "FD_EVAL_MAX_ITEM_BYTES=N")


def _stat_part(rel: str, path: str) -> bytes:
    st = os.stat(path)
    return f"{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode("utf-8", "surrogateescape")


def _content_part(rel: str, path: str) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"{rel}\0{h.hexdigest()}".encode("utf-8", "surrogateescape")


def _relative_names(paths: Sequence[str]) -> list[str]:
    """Paths relative to their common parent directory (a lone file: its base name)."""
    absp = [os.path.abspath(p) for p in paths]
    root = os.path.commonpath([os.path.dirname(p) for p in absp])
    return [os.path.relpath(p, root).replace(os.sep, "/") for p in absp]


# --- directory ---------------------------------------------------------------------------------------
class DirectorySource(ImageSource):
    """Image files under ``root`` (recursive), or an explicit list of files relative to ``root``.

    Hidden files and folders (name starting with ".", e.g. macOS ``._x.png``) and files without an image
    extension are not indexed; they are listed in ``ignored``. Symlinked files and folders are followed
    (each folder once). Order: relative POSIX path, sorted by code point.
    """

    kind = "directory"

    def __init__(self, root: str, files: Sequence[str] | None = None, *, spec: str | None = None, **kw: Any):
        super().__init__(spec or root, **kw)
        self.root = root
        if files is None:
            files, self.ignored = _scan_dir(root)
        self.files = list(files)
        if not self.files:
            shown = ", ".join(s.name for s in self.ignored[:3])
            other = f"; {len(self.ignored)} other entries ignored (e.g. {shown})" if self.ignored else ""
            raise EmptySourceError(
                f"{self.spec}: no images found (looked recursively for "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))}, any case){other}; point at the folder holding the images")

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, i: int) -> str:
        return _one_line(os.path.join(self.root, self.files[self._check_index(i)]))

    def _path(self, i: int) -> str:
        return os.path.join(self.root, self.files[i])

    def _read(self, i: int) -> bytes:
        def item() -> str:
            return self.describe(i)

        try:
            with open(self._path(i), "rb") as f:
                _read_capped(item, os.fstat(f.fileno()).st_size, self.max_item_bytes)
                return f.read(self.max_item_bytes + 1)
        except OSError as e:
            raise _bad_image(item, f"cannot read ({e.strerror or e})",
                             "check that the file exists and is readable") from None

    def _fingerprint_parts(self, content: bool) -> Iterable[bytes]:
        part = _content_part if content else _stat_part
        for rel in self.files:
            yield part(rel, os.path.join(self.root, rel))


def _scan_dir(root: str) -> tuple[list[str], list[SkippedItem]]:
    files: list[str] = []
    ignored: list[SkippedItem] = []
    seen: set[tuple[int, int]] = set()
    stack = [""]
    while stack:
        rel = stack.pop()
        path = os.path.join(root, rel) if rel else root
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) in seen:
                ignored.append(SkippedItem(None, _one_line(path), "folder already visited (symlink loop)"))
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(path) as it:
                entries = list(it)
        except OSError as e:
            ignored.append(SkippedItem(None, _one_line(path), f"cannot list folder ({e.strerror or e})"))
            continue
        for e in entries:
            r = f"{rel}/{e.name}" if rel else e.name
            if e.name.startswith("."):
                ignored.append(SkippedItem(None, _one_line(os.path.join(root, r)), "hidden file or folder"))
            elif e.is_dir():  # follows symlinks; loops are cut by `seen`
                stack.append(r)
            elif not e.is_file():
                ignored.append(SkippedItem(None, _one_line(os.path.join(root, r)), "not a regular file"))
            elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                files.append(r)
            else:
                ignored.append(SkippedItem(None, _one_line(os.path.join(root, r)), "not an image file extension"))
    files.sort()
    return files, ignored


# --- zip -----------------------------------------------------------------------------------------------
def _unsafe_member_name(name: str) -> bool:
    return name.startswith(("/", "\\")) or bool(re.match(r"^[A-Za-z]:", name)) or ".." in re.split(r"[/\\]", name)


class ZipSource(ImageSource):
    """Image members of a ``.zip`` (stored or deflated), sorted by member name; read in memory only."""

    kind = "zip"

    def __init__(self, path: str, **kw: Any):
        super().__init__(path, **kw)
        self.path = path
        try:
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, OSError) as e:
            raise SourceError(f"{path}: not a readable zip archive ({e}); re-create or re-download it") from None
        entries = []  # (name, position in infolist, size, crc)
        unsafe = []
        for k, info in enumerate(infos):
            name = info.filename
            if info.is_dir():
                continue
            parts = [p for p in re.split(r"[/\\]", name) if p]
            if any(p.startswith(".") and p != ".." for p in parts) or (parts and parts[0] == "__MACOSX"):
                self.ignored.append(SkippedItem(None, _one_line(f"{path}:{name}"), "hidden member or __MACOSX"))
            elif os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                self.ignored.append(SkippedItem(None, _one_line(f"{path}:{name}"), "not an image file extension"))
            else:
                entries.append((name, k, info.file_size, info.CRC))
                if _unsafe_member_name(name):
                    unsafe.append(name)
        if unsafe:
            self.warnings.append(_one_line(
                f"{path}: {len(unsafe)} member(s) with an absolute or '..' path (e.g. {unsafe[0]}); read in memory "
                "only, never extracted"))
        entries.sort(key=lambda e: e[0])
        if not entries:
            raise EmptySourceError(f"{path}: the zip holds no images ({len(self.ignored)} other members ignored); "
                                   "check that it is the right archive")
        self.names = [e[0] for e in entries]
        self._pos = np.array([e[1] for e in entries], dtype=np.int64)
        self._sizes = np.array([e[2] for e in entries], dtype=np.int64)
        self._crcs = np.array([e[3] for e in entries], dtype=np.uint32)

    def __len__(self) -> int:
        return len(self.names)

    def describe(self, i: int) -> str:
        return _one_line(f"{self.path}:{self.names[self._check_index(i)]}")

    def _read(self, i: int) -> bytes:
        def item() -> str:
            return self.describe(i)

        _read_capped(item, int(self._sizes[i]), self.max_item_bytes)
        try:
            zf = self._handle("zip", lambda: zipfile.ZipFile(self.path), self._closer, limit=1)
            info = zf.infolist()[int(self._pos[i])]
            with zf.open(info) as f:  # zipfile stops at the declared size and checks the CRC
                return f.read()
        except Exception as e:  # noqa: BLE001 - bad CRC, encryption, unsupported compression, I/O
            raise _bad_image(item, f"cannot read zip member ({type(e).__name__}: {e})",
                             "re-create the zip") from None

    def _fingerprint_parts(self, content: bool) -> Iterable[bytes]:
        (rel,) = _relative_names([self.path])
        yield (_content_part if content else _stat_part)(rel, self.path)
        yield "\0".join(self.names).encode("utf-8", "surrogateescape")
        yield self._sizes.tobytes() + self._crcs.tobytes()


# --- tar shards ------------------------------------------------------------------------------------------
def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: ``a{00..02}b`` -> a00b a01b a02b (zero-padded), ``{x,y}`` -> x y."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    prefix, body, rest = pattern[:m.start()], m.group(1), expand_braces(pattern[m.end():])
    r = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if r:
        a, b = int(r.group(1)), int(r.group(2))
        if abs(b - a) + 1 > _MAX_BRACE_ITEMS:
            raise SourceError(f"{pattern}: brace range {body} has more than {_MAX_BRACE_ITEMS} items")
        padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in r.groups())
        width = max(len(r.group(1)), len(r.group(2))) if padded else 0
        step = 1 if b >= a else -1
        alts = [str(v).zfill(width) for v in range(a, b + step, step)]
    elif "," in body:
        alts = body.split(",")
    else:  # not an expansion: keep the braces literally
        return [prefix + "{" + body + "}" + t for t in rest]
    return [prefix + alt + t for alt in alts for t in rest]


def expand_shards(spec: str) -> list[str]:
    """Files named by a brace range and/or glob, in expansion order (each glob sorted), duplicates dropped.

    A name without glob characters must exist (a missing shard in a range is an error, not a silent gap).
    """
    out: list[str] = []
    for pat in expand_braces(spec):
        if glob.has_magic(pat):
            hits = sorted(glob.glob(pat, recursive=True))
            if not hits:
                raise SourceError(f"{pat}: matches no files; check the pattern (from {spec})")
            out.extend(hits)
        elif os.path.exists(pat):
            out.append(pat)
        else:
            raise SourceError(f"{pat}: no such file (from {spec}); check the path or the brace range")
    return list(dict.fromkeys(out))


_COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def _scan_tar(path: str) -> dict[str, Any]:
    """Read every member header of one tar once; group WebDataset samples. Never reads member data."""
    size = os.path.getsize(path)
    if size == 0:
        return {"empty": True}
    with open(path, "rb") as f:
        head = f.read(6)
        for magic, name in _COMPRESSED_MAGIC.items():
            if head.startswith(magic):
                raise SourceError(f"{path}: {name}-compressed tar; random access needs a plain tar: decompress it "
                                  f"(e.g. `{'gunzip' if name == 'gzip' else name + ' -d'}`) and keep the .tar")
        f.seek(0)
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except tarfile.TarError as e:
            raise SourceError(f"{path}: not a tar archive ({e}); re-download or re-create the shard") from None
        digest = hashlib.sha256()
        regular: list[tuple[str, int, int]] = []  # (name, data offset, size)
        ignored: list[tuple[str, str]] = []
        end_problem = ""
        while True:
            try:
                ti = tf.next()
            except tarfile.TarError as e:
                if "unexpected end of data" in str(e):  # tarfile noticed the previous member's data is cut off
                    end_problem = f"truncated: the shard ends inside member data ({size} bytes; interrupted copy?)"
                else:  # e.g. a corrupt pax/GNU extended header
                    end_problem = f"corrupt tar header at byte {tf.offset} ({e})"
                break
            if ti is None:
                break
            tf.members.clear()  # tarfile keeps every TarInfo otherwise; we only need the ones collected here
            digest.update(f"{ti.name}\0{ti.size}\0{ti.mtime}\0{ti.type!r}\0{ti.offset_data}\n"
                          .encode("utf-8", "surrogateescape"))
            if ti.isreg() and not ti.issparse():
                regular.append((ti.name, ti.offset_data, ti.size))
            elif not ti.isdir():
                ignored.append((ti.name, "not a regular file (link, device or sparse member); not read"))
        if not end_problem:
            # tarfile ends silently at a corrupt header after the first member; a real end is zero blocks or EOF.
            f.seek(tf.offset)
            block = f.read(tarfile.BLOCKSIZE)
            if block.strip(b"\0"):
                end_problem = f"corrupt or truncated tar header at byte {tf.offset} of {size}"
    # WebDataset samples: members sharing a key; the first image member is the sample's image.
    samples: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for name, off, sz in regular:
        m = _WDS_KEY.match(name)
        if not m:
            ignored.append((name, "no file extension; not part of a WebDataset sample"))
            continue
        key, ext = m.group(1), m.group(2).lower()
        s = samples.setdefault(key, {})
        if "." + ext in IMAGE_EXTENSIONS:
            if "img" in s:
                ignored.append((name, f"second image in sample {key}; only {s['img'][0]} is used"))
            else:
                s["img"] = (name, off, sz)
                order.append(key)
        elif ext == "json" and "json" not in s:
            s["json"] = (off, sz)
    for key, s in samples.items():
        if "img" not in s:
            ignored.append((key, "sample without an image member (.jpg/.png/...)"))
    names = [samples[k]["img"][0] for k in order]
    blob = "".join(names).encode("utf-8", "surrogateescape")
    ends = np.cumsum([len(n.encode("utf-8", "surrogateescape")) for n in names], dtype=np.int64)
    unsafe = [n for n in names if _unsafe_member_name(n)]
    info = {
        "header_digest": digest.hexdigest(), "end_problem": end_problem, "ignored": ignored,
        "unsafe": unsafe[:3], "n_unsafe": len(unsafe), "file_size": size,
    }
    return {
        "empty": False,
        "names_blob": np.frombuffer(blob, dtype=np.uint8).copy(),
        "name_ends": ends.astype(np.int64) if len(names) else np.zeros(0, np.int64),
        "img_off": np.array([samples[k]["img"][1] for k in order], dtype=np.int64),
        "img_size": np.array([samples[k]["img"][2] for k in order], dtype=np.int64),
        "json_off": np.array([samples[k].get("json", (-1, -1))[0] for k in order], dtype=np.int64),
        "json_size": np.array([samples[k].get("json", (-1, -1))[1] for k in order], dtype=np.int64),
        "info": info,
    }


def _tar_index(path: str) -> dict[str, Any]:
    """:func:`_scan_tar`, cached in ``$FD_EVAL_CACHE/tar_index`` keyed by the shard's path, size, inode, mtime
    and ctime (which no tool can set back, so a rewrite that keeps size and mtime still misses the cache).

    tarfile reads the headers of a GPIC test shard (~15,600 members) in 0.4-0.9 s on one core here, so a
    first open of the 128-shard test set takes 1-2 minutes; the cache (~0.4 MB per shard) makes reopening it
    take well under a second. The cache holds only integer and byte arrays (no pickle).
    """
    st = os.stat(path)
    key = hashlib.sha256(f"{_TAR_INDEX_VERSION}\0{os.path.realpath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0"
                         f"{st.st_ino}\0{st.st_dev}\0{st.st_ctime_ns}".encode("utf-8", "surrogateescape")).hexdigest()
    cache_file = None
    with contextlib.suppress(OSError):
        cache_file = cache_dir("tar_index") / f"{key}.npz"
        if cache_file.exists():
            try:
                with np.load(cache_file, allow_pickle=False) as z:
                    idx = {k: z[k] for k in z.files}
                idx["info"] = json.loads(bytes(idx.pop("info_json")).decode("utf-8", "surrogateescape"))
                idx["empty"] = bool(idx["empty"])
                return idx
            except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt
                pass
    idx = _scan_tar(path)
    if cache_file is not None and not idx["empty"]:
        with contextlib.suppress(OSError):
            info_json = json.dumps(idx["info"], ensure_ascii=True).encode()
            arrays = {k: v for k, v in idx.items() if k not in ("info",)}
            arrays["info_json"] = np.frombuffer(info_json, dtype=np.uint8)
            with atomic_path(cache_file) as tmp:
                with open(tmp, "wb") as f:
                    np.savez_compressed(f, **arrays)
    return idx


class TarSource(ImageSource):
    """WebDataset tar shards: one item per sample ``{key}.{jpg,png,...}`` (+ optional ``{key}.json``).

    Member headers are read once per shard (and cached); member bytes are read by offset (``os.pread``),
    in memory, never extracted, so absolute or ``..`` member names are harmless labels (listed in
    ``warnings``). Links and device members are never read (listed in ``ignored``). Order: shards as given
    (a glob sorted, a brace range in range order), then samples in tar order.
    """

    kind = "tar"

    def __init__(self, shards: Sequence[str], *, spec: str | None = None, **kw: Any):
        super().__init__(spec or (shards[0] if len(shards) == 1 else f"{len(shards)} tar shards"), **kw)
        self.shards = list(shards)
        counts, blobs, ends, cols = [], [], [], {k: [] for k in ("img_off", "img_size", "json_off", "json_size")}
        self._shard_info: list[dict[str, Any]] = []
        blob_base = 0
        for path in self.shards:
            idx = _tar_index(path)
            if idx["empty"]:
                self.warnings.append(_one_line(f"{path}: empty file (0 bytes), no samples"))
                counts.append(0)
                self._shard_info.append({"header_digest": "", "file_size": 0})
                continue
            info = idx["info"]
            self._shard_info.append(info)
            if info["end_problem"]:
                msg = _one_line(f"{path}: {info['end_problem']}; later members are unreadable")
                if not self.skip_bad:
                    raise SourceError(f"{msg}; re-download the shard, {_SKIP_HINT}")
                self.ignored.append(SkippedItem(None, _one_line(path), info["end_problem"]))
            for name, reason in info["ignored"]:
                self.ignored.append(SkippedItem(None, _one_line(f"{path}:{name}"), reason))
            if info["n_unsafe"]:
                self.warnings.append(_one_line(
                    f"{path}: {info['n_unsafe']} member(s) with an absolute or '..' path (e.g. {info['unsafe'][0]}); "
                    "read in memory only, never extracted"))
            counts.append(len(idx["img_off"]))
            blobs.append(idx["names_blob"])
            ends.append(idx["name_ends"] + blob_base)
            blob_base += len(idx["names_blob"])
            for k in cols:
                cols[k].append(idx[k])
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if self._starts[-1] == 0:
            what = "the tar shard holds" if len(self.shards) == 1 else f"the {len(self.shards)} tar shards hold"
            raise EmptySourceError(f"{self.spec}: {what} no images ({len(self.ignored)} members ignored); "
                                   "expected WebDataset samples {key}.jpg|png (+ {key}.json)")
        self._names_blob = np.concatenate(blobs) if blobs else np.zeros(0, np.uint8)
        self._name_ends = np.concatenate(ends)
        for k, v in cols.items():
            setattr(self, "_" + k, np.concatenate(v))

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, i: int) -> tuple[int, str]:
        s = int(np.searchsorted(self._starts, i, side="right") - 1)
        a = int(self._name_ends[i - 1]) if i > 0 else 0
        # name_ends is cumulative over all shards, so the previous item's end is this name's start
        name = self._names_blob[a:int(self._name_ends[i])].tobytes().decode("utf-8", "surrogateescape")
        return s, name

    def describe(self, i: int) -> str:
        s, name = self._locate(self._check_index(i))
        return _one_line(f"{self.shards[s]}:{name}")

    def _pread(self, s: int, offset: int, size: int, item: "str | Callable[[], str]") -> bytes:
        try:
            fd = self._handle(s, lambda: os.open(self.shards[s], os.O_RDONLY), self._closer)
            chunks, got = [], 0
            while got < size:
                b = os.pread(fd, size - got, offset + got)
                if not b:
                    break
                chunks.append(b)
                got += len(b)
        except OSError as e:
            raise _bad_image(item, f"cannot read shard ({e.strerror or e})", "check the shard file") from None
        if got < size:
            raise _bad_image(item, f"member data truncated ({got} of {size} bytes present; the shard ends early)",
                             "re-download the shard")
        return b"".join(chunks)

    def _read(self, i: int) -> bytes:
        def item() -> str:
            return self.describe(i)

        size = int(self._img_size[i])
        _read_capped(item, size, self.max_item_bytes)
        s = int(np.searchsorted(self._starts, i, side="right") - 1)
        return self._pread(s, int(self._img_off[i]), size, item)

    def meta(self, i: int) -> dict[str, Any] | None:
        i = self._check_index(i)
        size = int(self._json_size[i])
        if size < 0:
            return None
        s, name = self._locate(i)
        item = _one_line(f"{self.shards[s]}:{_WDS_KEY.match(name).group(1)}.json")  # type: ignore[union-attr]
        _read_capped(item, size, self.max_item_bytes)
        data = self._pread(s, int(self._json_off[i]), size, item)
        try:
            value = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise InputError(_one_line(f"{item}: not valid UTF-8 JSON ({e}); re-create the sample's .json")) from None
        return value if isinstance(value, dict) else {"value": value}

    def _fingerprint_parts(self, content: bool) -> Iterable[bytes]:
        rels = _relative_names(self.shards)
        for rel, path, info in zip(rels, self.shards, self._shard_info):
            yield (_content_part if content else _stat_part)(rel, path)
            yield info["header_digest"].encode()


# --- arrays ----------------------------------------------------------------------------------------------
def _npy_header(fp: Any, item: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from a .npy header, without reading the data or unpickling anything."""
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(fp)
        if version in ((2, 0), (3, 0)):  # 3.0 differs only in the header text's encoding (utf-8)
            return np.lib.format.read_array_header_2_0(fp)
        raise ValueError(f"unsupported .npy version {version}")
    except Exception as e:  # noqa: BLE001
        raise BadArrayError(_one_line(f"{item}: not a valid .npy array ({e}); re-save it with np.save")) from None


def _array_problems(shape: tuple[int, ...], dtype: np.dtype, item: str,
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
        raise BadArrayError(_one_line(f"{item}: " + "; ".join(problems)))
    if shape[0] == 0:
        raise EmptySourceError(f"{item}: the array holds no images (shape {shape}); check the file")


class ArraySource(ImageSource):
    """uint8 (N, H, W, 3) images from ``.npy``, ``.npz`` (member ``arr_0``) or memory.

    ``.npy`` and uncompressed ``.npz`` members are memory-mapped (``np.savez`` stores ``arr_0`` uncompressed,
    as ADM's sampling scripts do); a compressed member (``np.savez_compressed``) is decompressed into memory
    once at open (noted in ``warnings``). Nothing is ever unpickled: object arrays are refused.
    """

    kind = "array"

    def __init__(self, array: np.ndarray | None = None, path: str | None = None, *, key: str = "arr_0",
                 spec: str | None = None, **kw: Any):
        super().__init__(spec or path or "array", **kw)
        self.path, self.key = path, key
        self._mmap: tuple[int, tuple[int, ...], str, bool] | None = None  # (offset, shape, dtype, fortran)
        self._memory: np.ndarray | None = None
        self._compressed = False
        if array is not None:
            if not isinstance(array, np.ndarray):
                raise BadArrayError(f"array: expected a numpy uint8 (N, H, W, 3) array, got {type(array).__name__}")
            _array_problems(array.shape, array.dtype, "array", lambda: array[0] if array.ndim else array)
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
        self.shape = tuple(int(s) for s in (self._memory.shape if self._memory is not None else self._mmap[1]))

    def _open_npy(self, path: str) -> None:
        try:
            with open(path, "rb") as f:
                shape, fortran, dtype = _npy_header(f, path)
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

        _array_problems(tuple(shape), dtype, item, sample)
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
                    shape, fortran, dtype = _npy_header(f, item)
                    offset = f.tell()
                self._set_mmap(path, offset, shape, dtype, fortran, item)
            else:
                try:
                    with zf.open(info) as f:
                        shape, fortran, dtype = _npy_header(f, item)
                except BadArrayError:
                    raise
                except Exception as e:  # noqa: BLE001
                    raise BadArrayError(_one_line(f"{item}: cannot read ({e}); re-save it with np.savez")) from None
                _array_problems(tuple(shape), dtype, item, None if dtype.kind != "f" else
                                lambda: self._decompress()[0])
                self._compressed = True
                self._memory = self._decompress()
                self.warnings.append(f"{path}: {key} is compressed (np.savez_compressed) and was decompressed into "
                                     f"memory ({self._memory.nbytes / 2**30:.2f} GiB); np.savez (uncompressed) is "
                                     "memory-mapped instead")

    def _decompress(self) -> np.ndarray:
        assert self.path is not None
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.key + ".npy") as f:
                return np.lib.format.read_array(f, allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            raise BadArrayError(_one_line(f"{self.path}[{self.key}]: cannot decompress ({e}); re-save it with "
                                          "np.savez")) from None

    def _array(self) -> np.ndarray:
        if self._memory is not None:
            return self._memory
        if self._compressed:  # unpickled copy of a compressed npz: decompress once in this process
            self._memory = self._decompress()
            return self._memory
        assert self._mmap is not None and self.path is not None
        offset, shape, dtype, fortran = self._mmap
        return self._handle("mmap", lambda: np.memmap(self.path, dtype=np.dtype(dtype), mode="r", offset=offset,
                                                      shape=shape, order="F" if fortran else "C"),
                            lambda m: None, limit=1)

    def __len__(self) -> int:
        return self.shape[0]

    def describe(self, i: int) -> str:
        return _one_line(f"{self._label}[{self._check_index(i)}]")

    def load(self, i: int) -> Image.Image:
        i = self._check_index(i)
        return Image.fromarray(np.ascontiguousarray(self._array()[i]))

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
            (rel,) = _relative_names([self.path])
            yield (_content_part if content else _stat_part)(rel, self.path)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        if self._compressed:  # don't ship a decompressed copy through pickle; reload lazily instead
            state["_memory"] = None
        return state


# --- subsets -----------------------------------------------------------------------------------------------
class SubsetSource(ImageSource):
    """Items ``indices`` (int64, into ``parent``) of another source, in that order."""

    kind = "subset"

    def __init__(self, parent: ImageSource, indices: np.ndarray):
        super().__init__(parent.spec, skip_bad=parent.skip_bad, max_image_pixels=parent.max_image_pixels,
                         max_item_bytes=parent.max_item_bytes)
        self.parent = parent
        self.indices = np.asarray(indices, dtype=np.int64)
        self.ignored, self.warnings = parent.ignored, parent.warnings

    def __len__(self) -> int:
        return len(self.indices)

    def describe(self, i: int) -> str:
        return self.parent.describe(int(self.indices[self._check_index(i)]))

    def load(self, i: int) -> Image.Image:
        return self.parent.load(int(self.indices[self._check_index(i)]))

    def meta(self, i: int) -> dict[str, Any] | None:
        return self.parent.meta(int(self.indices[self._check_index(i)]))

    def read_encoded(self, i: int) -> bytes | None:
        return self.parent.read_encoded(int(self.indices[self._check_index(i)]))

    def _fingerprint_parts(self, content: bool) -> Iterable[bytes]:
        yield self.parent.fingerprint(content=content).encode()
        yield self.indices.tobytes()

    def close(self) -> None:
        self.parent.close()

    def __del__(self) -> None:  # the parent may outlive this view: leave its handles open
        pass


# --- opening by spec ---------------------------------------------------------------------------------------
def open_source(spec: "str | os.PathLike[str] | np.ndarray | ImageSource", *, skip_bad: bool = False,
                max_image_pixels: int | None = None, max_item_bytes: int | None = None,
                npz_key: str = "arr_0") -> ImageSource:
    """Open images from a path, pattern or array (see the module docstring for the formats).

    Args:
        spec: a directory, ``.zip``, ``.tar`` / glob / brace range of shards, ``.npz``, ``.npy``, a glob of image
            files, a uint8 (N, H, W, 3) numpy array, or an :class:`ImageSource` (returned as is).
        skip_bad: recorded on the source for the pipeline; also lists (instead of raising on) a corrupt tar
            header, after which the rest of that shard is unreadable.
        max_image_pixels: Pillow's decompression-bomb limit while decoding (None: Pillow's current
            ``Image.MAX_IMAGE_PIXELS`` or ``$FD_EVAL_MAX_IMAGE_PIXELS``; 0: no limit).
        max_item_bytes: most bytes read for one image (None: ``$FD_EVAL_MAX_ITEM_BYTES`` or 1 GiB).
        npz_key: the array inside an ``.npz``.

    Raises:
        SourceError: missing path or shard, unknown format, not a plain tar/zip.
        EmptySourceError: no images. BadArrayError: an array of the wrong dtype/shape or holding objects.
    """
    kw: dict[str, Any] = dict(skip_bad=skip_bad, max_image_pixels=max_image_pixels, max_item_bytes=max_item_bytes)
    if isinstance(spec, ImageSource):
        return spec
    if isinstance(spec, np.ndarray):
        return ArraySource(spec, **kw)
    if isinstance(spec, torch.Tensor):
        raise BadArrayError("tensor given: pass a numpy uint8 (N, H, W, 3) array, e.g. "
                            "x.permute(0, 2, 3, 1).cpu().numpy() for a uint8 NCHW tensor")
    s = os.fspath(spec)
    if os.path.isdir(s):
        return DirectorySource(s, **kw)
    if os.path.isfile(s):
        return _open_file(s, kw, npz_key)
    if glob.has_magic(s) or re.search(r"\{[^{}]*(,|\.\.)[^{}]*\}", s):
        paths = expand_shards(s)
        if all(p.lower().endswith(".tar") and os.path.isfile(p) for p in paths):
            return TarSource(paths, spec=s, **kw)
        if all(os.path.isfile(p) and os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS for p in paths):
            root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
            return DirectorySource(root, sorted(os.path.relpath(os.path.abspath(p), root) for p in paths),
                                   spec=s, **kw)
        raise SourceError(f"{s}: the pattern must match only .tar shards or only image files "
                          f"(matched {len(paths)} paths, e.g. {paths[0]})")
    raise SourceError(f"{s}: no such file or directory; give a folder of images, a .zip, .tar shard(s) "
                      "(a glob or a {00000..00127} range), an .npz or an .npy")


def _open_file(path: str, kw: dict[str, Any], npz_key: str) -> ImageSource:
    low = path.lower()
    if low.endswith(".tar"):
        return TarSource([path], **kw)
    if low.endswith(".zip"):
        return ZipSource(path, **kw)
    if low.endswith(".npz"):
        return ArraySource(path=path, key=npz_key, **kw)
    if low.endswith(".npy"):
        return ArraySource(path=path, **kw)
    if os.path.splitext(low)[1] in IMAGE_EXTENSIONS:
        return DirectorySource(os.path.dirname(path) or ".", [os.path.basename(path)], spec=path, **kw)
    if re.search(r"\.(tar\.gz|tgz|tar\.bz2|tar\.xz|tar\.zst)$", low):
        raise SourceError(f"{path}: compressed tar; random access needs a plain .tar: decompress it first")
    raise SourceError(f"{path}: unknown source format; give a folder of images, a .zip, .tar shard(s), an .npz "
                      "(arr_0) or an .npy of uint8 (N, H, W, 3)")


# --- DataLoader glue ---------------------------------------------------------------------------------------
class ExtractorDataset(torch.utils.data.Dataset):
    """Item ``i``: ``(i, [t(image) for t in transforms])``, or a :class:`SkippedItem` for a bad image.

    Bad images never raise inside a worker (torch would re-raise them with a multi-line traceback); they come
    back as :class:`SkippedItem` and :meth:`check` raises the one-line :class:`BadImageError` in the main
    process unless ``skip_bad``. Transforms are pickled to workers under the spawn start method, so pass
    light callables (e.g. ``functools.partial(pil_resize, size=...)`` + ``pil_to_tensor``), not models.
    """

    def __init__(self, source: ImageSource, transforms: Sequence[Callable[[Image.Image], torch.Tensor]],
                 skip_bad: bool | None = None, image_transform: Callable[[Image.Image], Image.Image] | None = None):
        self.source = source
        self.transforms = list(transforms)
        self.skip_bad = source.skip_bad if skip_bad is None else bool(skip_bad)
        self.image_transform = image_transform  # applied once, before the per-extractor transforms

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> "tuple[int, list[torch.Tensor]] | SkippedItem":
        img, err = self.source._load_or_error(i)
        if err is not None:
            return SkippedItem(int(i), getattr(err, "item", self.source.describe(i)),
                               getattr(err, "reason", str(err)), str(err))
        if self.image_transform is not None:
            img = self.image_transform(img)
        return int(i), [t(img) for t in self.transforms]

    def check(self, batch: "Batch") -> list[SkippedItem]:
        """The batch's skipped items; raises the first one's :class:`BadImageError` unless ``skip_bad``."""
        if batch.skipped and not self.skip_bad:
            s = batch.skipped[0]
            err = BadImageError(s.message or f"{s.name}: {s.reason}")
            err.item, err.reason = s.name, s.reason  # type: ignore[attr-defined]
            raise err
        return batch.skipped


@dataclass
class Batch:
    """A collated batch.

    indices: int64 (B,) source indices of the decoded items, in batch order.
    inputs: one entry per transform: a stacked tensor (B, ...) when every item's shape agrees, else a list of
        B tensors; ``[]`` when every item of the batch was skipped.
    skipped: the batch's bad items (index, name, reason, message).
    """

    indices: torch.Tensor
    inputs: list[torch.Tensor | list[torch.Tensor]]
    skipped: list[SkippedItem] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.indices.numel())

    def pin_memory(self) -> "Batch":  # called by DataLoader(pin_memory=True)
        def pin(x: Any) -> Any:
            return x.pin_memory() if isinstance(x, torch.Tensor) else [t.pin_memory() for t in x]

        return Batch(self.indices.pin_memory(), [pin(x) for x in self.inputs], self.skipped)


def collate(items: Sequence["tuple[int, list[torch.Tensor]] | SkippedItem"]) -> Batch:
    """Collate :class:`ExtractorDataset` items into a :class:`Batch` (use as ``DataLoader(collate_fn=collate)``)."""
    ok = [it for it in items if not isinstance(it, SkippedItem)]
    skipped = [it for it in items if isinstance(it, SkippedItem)]
    indices = torch.tensor([i for i, _ in ok], dtype=torch.int64)
    inputs: list[torch.Tensor | list[torch.Tensor]] = []
    if ok:
        for k in range(len(ok[0][1])):
            ts = [t[k] for _, t in ok]
            same = all(t.shape == ts[0].shape and t.dtype == ts[0].dtype for t in ts)
            # default_collate stacks into shared memory inside workers, saving a copy on the way back
            inputs.append(torch.utils.data.default_collate(ts) if same else ts)
    return Batch(indices, inputs, skipped)
