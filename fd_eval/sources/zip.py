"""A ``.zip`` of images (sorted by member name)."""
from __future__ import annotations

import os
import re
import zipfile
from typing import Any, Iterable

import numpy as np

from ..errors import EmptySourceError, SourceError
from .base import (
    IMAGE_EXTENSIONS,
    ImageSource,
    SkippedItem,
    content_part,
    read_capped,
    relative_names,
    stat_part,
    unsafe_member_name,
)
from .decode import bad_image, one_line


# --- zip -----------------------------------------------------------------------------------------------
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
                self.ignored.append(SkippedItem(None, one_line(f"{path}:{name}"), "hidden member or __MACOSX"))
            elif os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                self.ignored.append(SkippedItem(None, one_line(f"{path}:{name}"), "not an image file extension"))
            else:
                entries.append((name, k, info.file_size, info.CRC))
                if unsafe_member_name(name):
                    unsafe.append(name)
        if unsafe:
            self.warnings.append(one_line(
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
        return one_line(f"{self.path}:{self.names[self._check_index(i)]}")

    def _read(self, i: int) -> bytes:
        def item() -> str:
            return self.describe(i)

        read_capped(item, int(self._sizes[i]), self.max_item_bytes)
        try:
            zf = self._handle("zip", lambda: zipfile.ZipFile(self.path), self._closer, limit=1)
            info = zf.infolist()[int(self._pos[i])]
            with zf.open(info) as f:  # zipfile stops at the declared size and checks the CRC
                return f.read()
        except Exception as e:  # noqa: BLE001 - bad CRC, encryption, unsupported compression, I/O
            raise bad_image(item, f"cannot read zip member ({type(e).__name__}: {e})",
                             "re-create the zip") from None

    def _read_head(self, i: int, n: int) -> bytes | None:
        if not n < int(self._sizes[i]) <= self.max_item_bytes:
            return None
        try:
            zf = self._handle("zip", lambda: zipfile.ZipFile(self.path), self._closer, limit=1)
            with zf.open(zf.infolist()[int(self._pos[i])]) as f:
                return f.read(n)
        except Exception:  # noqa: BLE001 - _read reports it
            return None

    def _fingerprint_parts(self, content: bool) -> Iterable[bytes]:
        (rel,) = relative_names([self.path])
        yield (content_part if content else stat_part)(rel, self.path)
        yield "\0".join(self.names).encode("utf-8", "surrogateescape")
        yield self._sizes.tobytes() + self._crcs.tobytes()
