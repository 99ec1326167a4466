"""Image sources: every input format as one indexable, picklable sequence of RGB images.

``open_source(spec)`` accepts

* a directory (recursive; .png .jpg .jpeg .webp .bmp .tif .tiff .gif (first frame), any case; sorted by path),
* a ``.zip`` of images (sorted by member name),
* tar shards (every image member is an item; ``{key}.json`` sidecars pair, see :class:`TarSource`): one ``.tar``, a glob
  (``shards/*.tar``) or a brace range (``shards/gpic_test_{00000..00127}.tar``), in shard order then tar order,
* ``.npy`` / ``.npz`` (``arr_0``, ADM / guided-diffusion style) arrays of uint8 (N, H, W, 3), memory-mapped,
* an in-memory uint8 (N, H, W, 3) numpy array,
* a glob or brace range of image files (treated like a directory holding exactly those files).
* a ``.parquet`` file, a folder or glob of them (an image column of ``struct<bytes, path>``; needs the ``parquet``
  extra), see :class:`ParquetSource`,
* remote tar shards or Parquet files, streamed: ``hf://datasets/ORG/NAME/shard_{00000..00127}.tar``, ``http(s)://``
  brace ranges, any installed fsspec protocol (``s3://``, ``memory://``), see :mod:`.remote`.

Every image is decoded as the reference protocols do, ``PIL.Image.open(f).convert("RGB")`` with a full decode
(no EXIF rotation, no ICC colour management, 16-bit values clipped to 255 by Pillow, alpha dropped, CMYK
converted by Pillow's formula). An item that does not decode raises :class:`BadImageError` naming the item,
the reason and the fix; :meth:`ImageSource.load_checked` returns the error instead so a pipeline can skip it.

Sources are map-style and safe for ``torch.utils.data.DataLoader`` workers: they hold paths and index arrays,
never an open file across ``fork``/``pickle`` (file descriptors are opened lazily per process).

Limits (untrusted inputs): ``max_item_bytes`` caps the bytes read for one item (file, zip or tar member;
default 256 MiB, ``$FD_EVAL_MAX_ITEM_BYTES``; 0 = none); ``max_image_pixels`` sets Pillow's decompression-bomb limit
while fd-eval decodes (default: Pillow's ``Image.MAX_IMAGE_PIXELS``, ``$FD_EVAL_MAX_IMAGE_PIXELS``; 0 = none).

Layout: :mod:`.base` (the :class:`ImageSource` interface, :class:`SkippedItem`), :mod:`.decode` (one image),
one module per format (:mod:`.folder`, :mod:`.zip`, :mod:`.tar`, :mod:`.arrays`, :mod:`.subset`, :mod:`.parquet`,
:mod:`.remote` over :mod:`.remote_io`), :mod:`.discovery` (brace expansion, shard globs, the tar index cache),
:mod:`.registry` (the source formats: a new format is one :func:`register_format` call) and :mod:`.opening`
(:func:`open_source`, which asks the registry).
The DataLoader glue (``ExtractorDataset``, ``Batch``, ``collate``) lives in :mod:`fd_eval.sources.loader`.
"""
from __future__ import annotations

from .accounting import InputAccounting
from .arrays import ArraySource
from .base import IMAGE_EXTENSIONS, ImageSource, SkippedItem
from .decode import decode_image
from .discovery import expand_braces, expand_shards
from .folder import DirectorySource
from .opening import open_source
from .parquet import ParquetSource
from .registry import SourceFormat, register_format, source_formats
from .remote import RemoteTarSource
from .subset import SubsetSource
from .tar import TarSource
from .zip import ZipSource

__all__ = [
    "IMAGE_EXTENSIONS", "ImageSource", "DirectorySource", "ZipSource", "TarSource", "ArraySource",
    "SubsetSource", "SkippedItem", "InputAccounting", "open_source", "decode_image", "expand_braces", "expand_shards",
    "ParquetSource", "RemoteTarSource", "SourceFormat", "register_format", "source_formats",
    "ExtractorDataset", "Batch", "collate",
]


def __getattr__(name: str) -> object:
    # The DataLoader glue moved to fd_eval.sources.loader (which imports this package): still importable from here.
    if name in ("ExtractorDataset", "Batch", "collate"):
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
