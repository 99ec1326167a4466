"""A directory of image files (recursive), or a glob / brace range of image files."""
from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

from ..errors import EmptySourceError
from .base import IMAGE_EXTENSIONS, NO_LIMIT, ImageSource, SkippedItem, content_part, read_capped, stat_part
from .decode import bad_image, one_line


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
            files, self.ignored = scan_dir(root)
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
        return one_line(os.path.join(self.root, self.files[self._check_index(i)]))

    def _path(self, i: int) -> str:
        return os.path.join(self.root, self.files[i])

    def _read(self, i: int) -> bytes:
        def item() -> str:
            return self.describe(i)

        try:
            with open(self._path(i), "rb") as f:
                read_capped(item, os.fstat(f.fileno()).st_size, self.max_item_bytes)
                # capped: a file that grows after the size check is not read past the limit
                return f.read(self.max_item_bytes + 1 if self.max_item_bytes < NO_LIMIT else -1)
        except OSError as e:
            raise bad_image(item, f"cannot read ({e.strerror or e})",
                             "check that the file exists and is readable") from None

    def _read_head(self, i: int, n: int) -> bytes | None:
        try:
            with open(self._path(i), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                return f.read(n) if n < size <= self.max_item_bytes else None
        except OSError:
            return None  # _read reports it

    def _fingerprint_parts(self, content: bool) -> Iterable[bytes]:
        part = content_part if content else stat_part
        for rel in self.files:
            yield part(rel, os.path.join(self.root, rel))


def scan_dir(root: str) -> tuple[list[str], list[SkippedItem]]:
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
                ignored.append(SkippedItem(None, one_line(path), "folder already visited (symlink loop)"))
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(path) as it:
                entries = list(it)
        except OSError as e:
            ignored.append(SkippedItem(None, one_line(path), "unreadable folder", one_line(e.strerror or e)))
            continue
        for e in entries:
            r = f"{rel}/{e.name}" if rel else e.name
            if e.name.startswith("."):
                ignored.append(SkippedItem(None, one_line(os.path.join(root, r)), "hidden file or folder"))
            elif e.is_dir():  # follows symlinks; loops are cut by `seen`
                stack.append(r)
            elif not e.is_file():
                ignored.append(SkippedItem(None, one_line(os.path.join(root, r)), "not a regular file"))
            elif os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                files.append(r)
            else:
                ignored.append(SkippedItem(None, one_line(os.path.join(root, r)), "not an image file extension"))
    files.sort()
    return files, ignored
