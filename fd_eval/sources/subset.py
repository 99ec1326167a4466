"""A fixed subset (index array) of another source."""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
from PIL import Image

from .base import ImageSource


# --- subsets -----------------------------------------------------------------------------------------------
class SubsetSource(ImageSource):
    """Items ``indices`` (int64, into ``parent``) of another source, in that order."""

    kind = "subset"

    def __init__(self, parent: ImageSource, indices: np.ndarray):
        super().__init__(parent.spec, skip_bad=parent.skip_bad, max_image_pixels=parent.max_image_pixels,
                         max_item_bytes=parent.max_item_bytes)
        self.parent = parent
        self.indices = np.asarray(indices, dtype=np.int64)
        self.ignored, self.skipped_at_open, self.warnings = parent.ignored, parent.skipped_at_open, parent.warnings

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
