"""Tar shards in WebDataset layout (``{key}.json`` + ``{key}.jpg|png``)."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import EmptySourceError, InputError, SourceError
from .base import ImageSource, SkippedItem, content_part, read_capped, relative_names, stat_part
from .decode import SKIP_HINT, bad_image, one_line
from .discovery import tar_index


class TarSource(ImageSource):
    """Tar shards (WebDataset layout or any tar of images): one item per image member.

    The member rule: an image member is any regular member whose extension after the LAST dot is an image type
    (``cfg1.5_0001.png`` is an image; ``c.png`` and ``c.jpg`` are two items). A ``.json`` sidecar pairs with an
    image by the name without its extension (``c.json`` for ``c.png``), else by WebDataset key (the base name up to
    its first dot: ``c.json`` for ``c.seg.png``); :meth:`meta` returns it. Every other member (other extensions,
    unpaired sidecars, links) is listed in ``ignored``.

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
            idx = self._index(path)
            counts.append(self._take_index(path, idx))
            if idx["empty"]:
                continue
            blobs.append(idx["names_blob"])
            ends.append(idx["name_ends"] + blob_base)
            blob_base += len(idx["names_blob"])
            for k in cols:
                cols[k].append(idx[k])
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if self._starts[-1] == 0:
            raise self._no_images()
        self._names_blob = np.concatenate(blobs) if blobs else np.zeros(0, np.uint8)
        self._name_ends = np.concatenate(ends)
        for k, v in cols.items():
            setattr(self, "_" + k, np.concatenate(v))

    def _no_images(self) -> EmptySourceError:
        what = "the tar shard holds" if len(self.shards) == 1 else f"the {len(self.shards)} tar shards hold"
        return EmptySourceError(f"{self.spec}: {what} no images ({len(self.ignored)} members ignored); "
                                "expected image members such as {key}.jpg|png (+ {key}.json)")

    def _take_index(self, path: str, idx: dict[str, Any]) -> int:
        """Record shard ``path``'s index (its info, warnings, ignored members); return its number of items."""
        if idx["empty"]:
            self.warnings.append(one_line(idx.get("why") or f"{path}: empty file (0 bytes), no samples"))
            self._shard_info.append({"header_digest": "", "file_size": 0})
            return 0
        info = idx["info"]
        self._shard_info.append(info)
        if info["end_problem"]:
            msg = one_line(f"{path}: {info['end_problem']}; later members are unreadable")
            if not self.skip_bad:
                raise SourceError(f"{msg}; re-download the shard, {SKIP_HINT}")
            self.ignored.append(SkippedItem(None, one_line(path), "unreadable rest of a damaged shard",
                                            info["end_problem"]))
            self.warnings.append(f"{msg}; the members before it are used (--skip-bad)")
        for name, reason in info["ignored"]:
            self.ignored.append(SkippedItem(None, one_line(f"{path}:{name}"), reason))
        if info["n_unsafe"]:
            self.warnings.append(one_line(
                f"{path}: {info['n_unsafe']} member(s) with an absolute or '..' path (e.g. {info['unsafe'][0]}); "
                "read in memory only, never extracted"))
        return len(idx["img_off"])

    def _index(self, path: str) -> dict[str, Any]:
        """The member index of one shard (:func:`fd_eval.sources.discovery.tar_index`; remote shards override)."""
        return tar_index(path)

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def shard_starts(self) -> np.ndarray:
        """int64 (S + 1,): item index of each shard's first sample; the last entry is ``len(self)``."""
        return self._starts

    def shard_of(self, indices: np.ndarray) -> np.ndarray:
        """int64 shard number of each item index in ``indices``."""
        return np.searchsorted(self._starts, indices, side="right").astype(np.int64) - 1

    def shard_header_digest(self, s: int) -> str:
        """Hex digest of shard ``s``'s member headers (names, sizes, offsets): part of its fingerprint."""
        return str(self._shard_info[s]["header_digest"])

    def shard_part(self, s: int) -> bytes:
        """Shard ``s``'s data fingerprint for resumable builds: its size, modification time and member headers
        (remote shards: URL, size, ETag, revision and member headers)."""
        path = self.shards[s]
        return stat_part(os.path.basename(path), path) + b"\0" + self.shard_header_digest(s).encode()

    def _locate(self, i: int) -> tuple[int, str]:
        s = int(np.searchsorted(self._starts, i, side="right") - 1)
        a = int(self._name_ends[i - 1]) if i > 0 else 0
        # name_ends is cumulative over all shards, so the previous item's end is this name's start
        name = self._names_blob[a:int(self._name_ends[i])].tobytes().decode("utf-8", "surrogateescape")
        return s, name

    def describe(self, i: int) -> str:
        s, name = self._locate(self._check_index(i))
        return one_line(f"{self.shards[s]}:{name}")

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
            raise bad_image(item, f"cannot read shard ({e.strerror or e})", "check the shard file") from None
        if got < size:
            raise bad_image(item, f"member data truncated ({got} of {size} bytes present; the shard ends early)",
                             "re-download the shard")
        return b"".join(chunks)

    def _read(self, i: int) -> bytes:
        def item() -> str:
            return self.describe(i)

        size = int(self._img_size[i])
        read_capped(item, size, self.max_item_bytes)
        s = int(np.searchsorted(self._starts, i, side="right") - 1)
        return self._pread(s, int(self._img_off[i]), size, item)

    def _read_head(self, i: int, n: int) -> bytes | None:
        size = int(self._img_size[i])
        if not n < size <= self.max_item_bytes:
            return None
        s = int(np.searchsorted(self._starts, i, side="right") - 1)
        return self._pread(s, int(self._img_off[i]), n, lambda: self.describe(i))

    def meta(self, i: int) -> dict[str, Any] | None:
        i = self._check_index(i)
        size = int(self._json_size[i])
        if size < 0:
            return None
        s, name = self._locate(i)
        item = one_line(f"{self.shards[s]}:{name}'s .json sidecar")
        read_capped(item, size, self.max_item_bytes)
        return parse_sidecar(item, self._pread(s, int(self._json_off[i]), size, item))

    def _fingerprint_parts(self, content: bool) -> Iterable[bytes]:
        rels = relative_names(self.shards)
        for rel, path, info in zip(rels, self.shards, self._shard_info):
            yield (content_part if content else stat_part)(rel, path)
            yield info["header_digest"].encode()


def parse_sidecar(item: str, data: bytes) -> dict[str, Any]:
    """A sample's ``.json`` sidecar as a dict (a non-object value as ``{"value": ...}``); InputError if not JSON."""
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(one_line(f"{item}: not valid UTF-8 JSON ({e}); re-create the sample's .json")) from None
    return value if isinstance(value, dict) else {"value": value}
