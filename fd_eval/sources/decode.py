"""Decoding one encoded image as the reference protocols do (``PIL.Image.open(f).convert("RGB")``)."""
from __future__ import annotations

import contextlib
import io
import threading
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageFile

from ..errors import BadImageError

# How every image is decoded by default; statistics record it as ``preprocess.decode``.
DECODE_PIL_RGB = "PIL.Image.open(f).convert('RGB')"
SKIP_HINT = "or pass --skip-bad (skip_bad=True) to skip and list bad images"

def one_line(s: object) -> str:
    """``s`` with control characters and undecodable bytes escaped, so messages stay on one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(s))


def bad_image(item: "str | Callable[[], str]", reason: str, fix: str = "re-create or remove it") -> BadImageError:
    item = item() if callable(item) else item  # names are built only when something went wrong
    err = BadImageError(one_line(f"{item}: {reason}; {fix}, {SKIP_HINT}"))
    err.item, err.reason = item, one_line(reason)  # type: ignore[attr-defined]
    return err



# --- decoding ----------------------------------------------------------------------------------------
PIL_LOCK = threading.Lock()


@contextlib.contextmanager
def pil_limits(max_image_pixels: int | None) -> Iterator[None]:
    """Pillow's globals as fd-eval decodes: truncation always detected, the bomb limit optionally overridden.

    Pillow reads both settings from module globals, so an override is set and restored around the decode
    (under a lock); when the globals already hold what we want, nothing is touched.
    """
    want = Image.MAX_IMAGE_PIXELS if max_image_pixels is None else (max_image_pixels or None)
    if want == Image.MAX_IMAGE_PIXELS and not ImageFile.LOAD_TRUNCATED_IMAGES:
        yield
        return
    with PIL_LOCK:
        old = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = want, False
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = old


HEAD_BYTES = 1 << 20  # of an item larger than this, only the first HEAD_BYTES are read to decide "is it an image"


def is_image_head(head: bytes) -> bool:
    """Whether ``head`` (an item's first bytes) starts like an image Pillow can open, by Pillow's own rule: a
    format plugin's signature check on the first 16 bytes, or, for the few formats without a signature (TGA, ...),
    their header parse. Reads nothing more, so a 900 MB member that is not an image is refused after 1 MiB."""
    Image.init()
    prefix = head[:16]
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        if accept is not None:
            try:
                ok = accept(prefix)
            except Exception:  # noqa: BLE001 - a plugin's check on hostile bytes
                ok = False
            if ok and not isinstance(ok, str):  # a str is Pillow's "not this format, with a note"
                return True
    unsigned = [f for f in Image.ID if Image.OPEN[f][1] is None]
    try:
        with Image.open(io.BytesIO(head), formats=unsigned):
            return True
    except Image.UnidentifiedImageError:
        return False
    except Exception:  # noqa: BLE001 - identified but odd (e.g. a decompression bomb): the full decode reports it
        return True


def check_image_head(head: bytes, item: "str | Callable[[], str]") -> None:
    """Raise :class:`BadImageError` when an item's first bytes are no image's (see :func:`is_image_head`)."""
    if not is_image_head(head):
        raise bad_image(item, f"not an image Pillow can identify (its first {len(head):,} bytes are not PNG/JPEG/"
                              "WebP/BMP/TIFF/... content; the rest was not read)")


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
        raise bad_image(item, "empty file (0 bytes)")
    try:
        with pil_limits(max_image_pixels):
            with Image.open(io.BytesIO(data)) as im:
                # convert() loads every pixel, so truncated data raises here rather than in a later resize.
                return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise bad_image(
            item, f"too many pixels for Pillow's decompression-bomb guard ({e})",
            "if the file is trusted raise the limit with the environment variable FD_EVAL_MAX_IMAGE_PIXELS=N "
            "(0 = no limit) or open_source(max_image_pixels=N)") from None
    except Image.UnidentifiedImageError:
        raise bad_image(item, f"not an image Pillow can identify ({len(data)} bytes: not PNG/JPEG/WebP/"
                               "BMP/TIFF/... content, or cut off within its header)") from None
    except Exception as e:  # noqa: BLE001 - untrusted bytes: every decoder failure is a bad image
        msg = str(e)
        kind = "truncated" if "truncated" in msg.lower() else "corrupt"
        raise bad_image(item, f"{kind} image data ({type(e).__name__}: {msg})") from None


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> uint8 (3, H, W) tensor."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
