"""The :class:`ImageSource` interface, :class:`SkippedItem` and the helpers every format shares."""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from ..errors import BadImageError, InputError
from .decode import HEAD_BYTES, bad_image, check_image_head, decode_image

if TYPE_CHECKING:
    from .subset import SubsetSource

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})  # GIF: first frame
DEFAULT_MAX_ITEM_BYTES = 1 << 28  # 256 MiB: far above any image file (a 16K x 16K PNG is ~100-700 MB raw pixels)
NO_LIMIT = 1 << 62  # max_item_bytes = 0
FINGERPRINT_VERSION = b"fd_eval.sources.fingerprint/1"
TAR_INDEX_VERSION = 2  # 2: the member rule (last-dot image extension, every image an item)
MAX_BRACE_ITEMS = 1_000_000
# WebDataset's split of a member name into sample key and extension: the extension starts at the first dot
# of the base name (so "a/b.seg.png" is key "a/b", extension "seg.png").
WDS_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


# --- small helpers -----------------------------------------------------------------------------------

def env_int(name: str) -> int | None:
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



# --- the interface -----------------------------------------------------------------------------------
class ImageSource:
    """A fixed, ordered sequence of images.

    Attributes:
        spec: the spec the source was opened from (for messages).
        skip_bad: policy flag read by :class:`ExtractorDataset` (and, at open time, whether a corrupt tar
            header stops with an error or is listed in ``ignored``).
        ignored: files and members that were not indexed (non-image files, hidden files, symlinks in tars,
            samples without an image), as :class:`SkippedItem` with ``index=None``. Report them.
        skipped_at_open: entries found at open time to hold no image although they are image entries (a Parquet
            row whose image is null), as :class:`SkippedItem` with ``index=None``: not items (never read), listed
            as *skipped* in the accounting whether or not ``skip_bad`` is set (the dataset itself records that the
            row has no image; it is not a file that failed to decode).
        warnings: one-line notes about odd but usable input (e.g. a tar member with an absolute path).
        max_image_pixels, max_item_bytes: the limits (see the module docstring).
    """

    kind = "source"

    def __init__(self, spec: str, *, skip_bad: bool = False, max_image_pixels: int | None = None,
                 max_item_bytes: int | None = None):
        self.spec = spec
        self.skip_bad = bool(skip_bad)
        env_pixels = env_int("FD_EVAL_MAX_IMAGE_PIXELS")
        self.max_image_pixels = max_image_pixels if max_image_pixels is not None else env_pixels
        limit = max_item_bytes if max_item_bytes is not None else env_int("FD_EVAL_MAX_ITEM_BYTES")
        # None: the default; 0: no limit (as the messages and docs say)
        self.max_item_bytes = DEFAULT_MAX_ITEM_BYTES if limit is None else (int(limit) or NO_LIMIT)
        self.ignored: list[SkippedItem] = []
        self.skipped_at_open: list[SkippedItem] = []
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
        head = self._read_head(i, HEAD_BYTES)
        if head is not None:  # a big item: is it an image at all? (before reading all of it)
            check_image_head(head, lambda: self.describe(i))
        return decode_image(self._read(i), lambda: self.describe(i), max_image_pixels=self.max_image_pixels)

    def _read_head(self, i: int, n: int) -> bytes | None:
        """The first ``n`` bytes of item ``i`` when it holds more than ``n`` (and no more than the per-item limit,
        which :meth:`_read` refuses on its own); None otherwise or when the source cannot read a prefix cheaply."""
        return None

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
        img, err = self.load_or_error(i)
        return img, (None if err is None else str(err))

    def load_or_error(self, i: int) -> tuple[Image.Image | None, BadImageError | None]:
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
        h = hashlib.sha256(FINGERPRINT_VERSION + b"\0" + self.kind.encode() + (b"\0content" if content else b""))
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
        from .subset import SubsetSource  # (subset.py subclasses ImageSource)

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


def read_capped(item: "str | Callable[[], str]", size: int, cap: int) -> None:
    if size > cap:
        raise bad_image(item, f"{size} bytes exceeds the per-item limit of {cap} bytes",
                         "if the file is trusted raise the limit with the environment variable "
                         "FD_EVAL_MAX_ITEM_BYTES=N (0 = no limit) or open_source(max_item_bytes=N)")


def stat_part(rel: str, path: str) -> bytes:
    st = os.stat(path)
    return f"{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode("utf-8", "surrogateescape")


def content_part(rel: str, path: str) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"{rel}\0{h.hexdigest()}".encode("utf-8", "surrogateescape")


def relative_names(paths: Sequence[str]) -> list[str]:
    """Paths relative to their common parent directory (a lone file: its base name)."""
    absp = [os.path.abspath(p) for p in paths]
    root = os.path.commonpath([os.path.dirname(p) for p in absp])
    return [os.path.relpath(p, root).replace(os.sep, "/") for p in absp]



def unsafe_member_name(name: str) -> bool:
    return name.startswith(("/", "\\")) or bool(re.match(r"^[A-Za-z]:", name)) or ".." in re.split(r"[/\\]", name)
