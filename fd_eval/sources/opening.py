"""``open_source``: a spec (path, glob, brace range, array, source) to the right :class:`ImageSource`."""
from __future__ import annotations

import glob
import os
import re
import zipfile
from typing import Any

import numpy as np
import torch
import torch.utils.data

from ..errors import BadArrayError, SourceError
from .arrays import ArraySource
from .base import IMAGE_EXTENSIONS, ImageSource
from .discovery import expand_shards
from .folder import DirectorySource
from .registry import OpenOptions, SourceFormat, find_format, register_format
from .tar import TarSource
from .zip import ZipSource


# --- opening by spec ---------------------------------------------------------------------------------------
def open_source(spec: "str | os.PathLike[str] | np.ndarray | ImageSource", *, skip_bad: bool = False,
                max_image_pixels: int | None = None, max_item_bytes: int | None = None,
                npz_key: str = "arr_0", image_column: str | None = None, key_column: str | None = None,
                offline: bool | None = None) -> ImageSource:
    """Open images from a path, pattern, URL or array (see the module docstring for the formats).

    A spec string goes to the first registered format (:mod:`fd_eval.sources.registry`) that claims it: remote
    URLs (``hf://``, ``http(s)://``, any installed fsspec protocol), Parquet files or folders, directories, files
    by suffix, then globs and brace ranges.

    Args:
        spec: a directory, ``.zip``, ``.tar`` / glob / brace range of shards, ``.npz``, ``.npy``, ``.parquet`` (or a
            folder of them), a remote URL of tar shards or Parquet files, a glob of image files, a uint8
            (N, H, W, 3) numpy array, or an :class:`ImageSource` (returned as is).
        skip_bad: recorded on the source for the pipeline; also lists (instead of raising on) a corrupt tar
            header, after which the rest of that shard is unreadable, and a remote shard that cannot be read.
        max_image_pixels: Pillow's decompression-bomb limit while decoding (None: Pillow's current
            ``Image.MAX_IMAGE_PIXELS`` or ``$FD_EVAL_MAX_IMAGE_PIXELS``; 0: no limit).
        max_item_bytes: most bytes read for one image (None: ``$FD_EVAL_MAX_ITEM_BYTES`` or 256 MiB; 0: no limit).
        npz_key: the array inside an ``.npz``.
        image_column, key_column: Parquet columns (default: the image column found by its type, keys from a
            ``key``/``id`` column or the row number).
        offline: refuse remote sources (None: ``--offline`` scope, ``$FD_EVAL_OFFLINE``, ``$HF_HUB_OFFLINE``).

    Raises:
        SourceError: missing path or shard, unknown format, not a plain tar/zip, a remote source offline.
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
    fmt = find_format(s)
    if fmt is None:
        raise SourceError(f"{s}: no such file or directory; give a folder of images, a .zip, .tar shard(s) "
                          "(a glob or a {00000..00127} range), an .npz, an .npy, a .parquet, or an hf:// / "
                          "https:// URL of tar shards or Parquet files")
    return fmt.open(s, OpenOptions(kw, npz_key, image_column, key_column, offline))


def _is_pattern(s: str) -> bool:
    return glob.has_magic(s) or bool(re.search(r"\{[^{}]*(,|\.\.)[^{}]*\}", s))


def _open_pattern(s: str, o: OpenOptions) -> ImageSource:
    kw = o.common
    paths = expand_shards(s)
    if all(p.lower().endswith(".tar") and os.path.isfile(p) for p in paths):
        return TarSource(paths, spec=s, **kw)
    if all(os.path.isfile(p) and os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS for p in paths):
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
        return DirectorySource(root, sorted(os.path.relpath(os.path.abspath(p), root) for p in paths),
                               spec=s, **kw)
    if all(p.lower().endswith(".parquet") and os.path.isfile(p) for p in paths):
        from .parquet import ParquetSource

        return ParquetSource(paths, spec=s, image_column=o.image_column, key_column=o.key_column, **kw)
    raise SourceError(f"{s}: the pattern must match only .tar shards, only .parquet files or only image files "
                      f"(matched {len(paths)} paths, e.g. {paths[0]})")


STATS_HINT = ("is a statistics file, not images; compare two statistics files with `fd-eval fd A B` "
              "(fd_eval.load_stats + compare_stats), or pass it as the reference (--ref)")


def is_stats_npz(path: str) -> bool:
    """True for an .npz holding statistics (mu/sigma: pytorch-fid, clean-fid, GPIC) rather than images."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = {n.rsplit("/", 1)[-1] for n in zf.namelist()}
    except (zipfile.BadZipFile, OSError):
        return False
    return "arr_0.npy" not in names and bool(names & {"mu.npy", "dino_mu.npy", "inception_mu.npy"})


def open_file(path: str, kw: dict[str, Any], npz_key: str) -> ImageSource:
    """A local file by its suffix (``.tar``, ``.zip``, ``.npz``, ``.npy``, one image)."""
    low = path.lower()
    if low.endswith(".safetensors") or (low.endswith(".npz") and is_stats_npz(path)):
        raise SourceError(f"{path}: {STATS_HINT}")
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


# --- the built-in local formats (remote and Parquet register themselves, below) ---------------------------------
register_format(SourceFormat("directory", os.path.isdir, lambda s, o: DirectorySource(s, **o.common), order=40,
                             describe="a folder of images (recursive)"))
register_format(SourceFormat("file", os.path.isfile, lambda s, o: open_file(s, o.common, o.npz_key), order=50,
                             describe="one .tar, .zip, .npz, .npy or image file"))
register_format(SourceFormat("pattern", _is_pattern, _open_pattern, order=60,
                             describe="a glob or brace range of .tar shards, .parquet files or image files"))

from . import parquet, remote  # noqa: E402,F401 - they register their formats (and import only the registry)
