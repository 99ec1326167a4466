"""Parquet image datasets (the Hugging Face ``datasets`` layout): one row per image, the image in a column of
type ``struct<bytes: binary, path: string>`` (or a binary column named with ``image_column``).

Needs pyarrow (``pip install 'fd-eval[parquet]'``). Items are the rows with an image, in file order (files as
given, a folder's sorted), then row order. Rows are read one row group at a time (a process keeps one row
group's image bytes), so memory is bounded by the largest row group; under ``fd-eval stats`` the units are row
groups, so a run resumes and spreads over ranks by row group. A row whose image is null is not an item: it is
listed as *skipped* (``"null image"``, named ``file.parquet:row N``) in the accounting, with or without
``--skip-bad`` (the dataset itself says the row has no image: there is nothing to decode or to stop on).
"""
from __future__ import annotations

import glob
import os
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import EmptySourceError, SourceError
from .base import ImageSource, SkippedItem, content_part, read_capped, relative_names, stat_part
from .decode import bad_image, one_line
from .registry import OpenOptions, SourceFormat, register_format
from .remote_io import RemoteFile, StreamReader

KEY_COLUMNS = ("key", "__key__", "id", "image_id")
PARQUET_HINT = "reading Parquet needs pyarrow: pip install 'fd-eval[parquet]' (or pip install pyarrow)"


def _pq(spec: str) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SourceError(f"{spec}: {PARQUET_HINT}") from None
    return pq


def _image_field(schema: Any, name: str | None, where: str) -> str:
    import pyarrow as pa

    if name is not None:
        if name not in schema.names:
            raise SourceError(f"{where}: no column {name!r} (columns: {', '.join(schema.names)}); fix --image-column")
        return name
    for f in schema:
        if pa.types.is_struct(f.type) and any(c.name == "bytes" and pa.types.is_binary(c.type) or
                                              c.name == "bytes" and pa.types.is_large_binary(c.type) for c in f.type):
            return f.name
    raise SourceError(one_line(f"{where}: no image column (a struct<bytes, path> column, as Hugging Face datasets "
                               f"store images; columns: {', '.join(schema.names)}); name it with --image-column"))


def _bytes_array(col: Any) -> Any:
    """The image bytes of one column chunk (struct: its ``bytes`` field; null where the struct is null)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    if pa.types.is_struct(col.type):
        b = col.field("bytes")
        return pc.if_else(col.is_valid(), b, pa.nulls(len(b), b.type)) if col.null_count else b
    return col


class ParquetSource(ImageSource):
    """Rows of Parquet files (local paths or :class:`RemoteFile` URLs) with an image; see the module docstring."""

    kind = "parquet"

    def __init__(self, files: Sequence["str | RemoteFile"], *, spec: str | None = None, image_column: str | None = None,
                 key_column: str | None = None, **kw: Any):
        self.files = list(files)
        self.names = [f.url if isinstance(f, RemoteFile) else str(f) for f in self.files]
        super().__init__(spec or (self.names[0] if len(self.names) == 1 else f"{len(self.names)} Parquet files"),
                         **kw)
        _pq(self.spec)  # the one-line error without pyarrow, before anything else
        self.image_column: str = ""
        self.key_column = key_column
        item_rg, item_row, rg_starts, rg_labels, rg_rows = [], [], [0], [], []
        self._key_columns: list[str | None] = []  # per file: where meta() reads keys (None: the row number)
        for f in range(len(self.files)):
            pf = self._file(f)
            schema = pf.schema_arrow
            col = _image_field(schema, image_column, self.names[f])
            if self.image_column and col != self.image_column:
                raise SourceError(f"{self.names[f]}: image column {col!r}, but {self.names[0]} has "
                                  f"{self.image_column!r}; name it with --image-column")
            self.image_column = col
            kcol = key_column if key_column is not None else next((k for k in KEY_COLUMNS if k in schema.names), None)
            if kcol is not None and kcol not in schema.names:
                raise SourceError(f"{self.names[f]}: no key column {kcol!r}; fix --key-column")
            self._key_columns.append(kcol)
            row0 = 0
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                valid = self._valid_rows(pf, g, n)
                for r in np.flatnonzero(~valid).tolist():
                    name = one_line(f"{self.names[f]}:row {row0 + r}")
                    self.skipped_at_open.append(SkippedItem(None, name, "null image", (
                        f"{name}: the image column {col!r} is null in this row (the dataset stores no image "
                        "there); the row is skipped, not used")))
                rows = np.flatnonzero(valid).astype(np.int64)
                item_rg.append(np.full(len(rows), len(rg_labels), np.int32))
                item_row.append(rows)
                rg_labels.append((f, g, row0))
                rg_rows.append(n)
                rg_starts.append(rg_starts[-1] + len(rows))
                row0 += n
            self.close()
        self._item_rg = np.concatenate(item_rg) if item_rg else np.zeros(0, np.int32)
        self._item_row = np.concatenate(item_row) if item_row else np.zeros(0, np.int64)
        self._rg = rg_labels  # (file, row group in file, first row of the group in the file)
        self._rg_rows = rg_rows
        self._starts = np.asarray(rg_starts, dtype=np.int64)
        if not len(self._item_row):
            raise EmptySourceError(f"{self.spec}: no rows with an image ({len(self.skipped_at_open)} null images); "
                                   "check the dataset and --image-column")

    # --- pyarrow plumbing -----------------------------------------------------------------------------------------
    def _file(self, f: int) -> Any:
        def opener() -> Any:
            pq = _pq(self.spec)
            src = self.files[f]
            try:
                return pq.ParquetFile(StreamReader(src) if isinstance(src, RemoteFile) else src)
            except (OSError, ValueError) as e:
                raise SourceError(one_line(f"{self.names[f]}: not a readable Parquet file ({e}); re-create or "
                                           "re-download it")) from None

        return self._handle(("pf", f), opener, lambda h: h.close(), limit=4)

    def _valid_rows(self, pf: Any, g: int, n: int) -> np.ndarray:
        """bool (n,): rows of row group ``g`` with an image. Column statistics answer without reading the images
        when they say there is no null; otherwise the row group's image column is read once."""
        md = pf.metadata.row_group(g)
        leaves = [md.column(j) for j in range(md.num_columns)
                  if md.column(j).path_in_schema.split(".")[0] == self.image_column]
        if leaves and all(c.statistics is not None and c.statistics.has_null_count and c.statistics.null_count == 0
                          for c in leaves):
            return np.ones(n, dtype=bool)
        arr = _bytes_array(pf.read_row_group(g, columns=[self.image_column]).column(0))
        return arr.is_valid().to_numpy(zero_copy_only=False).astype(bool)

    def _group(self, u: int) -> Any:
        """Row group ``u``'s image bytes (one per process: bounded memory)."""
        key = ("rg", u)
        if key not in self._handles:
            for k in [k for k in self._handles if k[0] == "rg"]:
                del self._handles[k]
        f, g, _ = self._rg[u]

        def read() -> Any:
            return _bytes_array(self._file(f).read_row_group(g, columns=[self.image_column]).column(0))

        return self._handle(key, read, lambda h: None)

    def _closer(self, h: Any) -> None:
        if hasattr(h, "close"):
            h.close()

    # --- the ImageSource API -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._item_row)

    def describe(self, i: int) -> str:
        i = self._check_index(i)
        f, _, row0 = self._rg[int(self._item_rg[i])]
        return one_line(f"{self.names[f]}:row {row0 + int(self._item_row[i])}")

    def _read(self, i: int) -> bytes:
        def item() -> str:
            return self.describe(i)

        u = int(self._item_rg[i])
        try:
            arr = self._group(u)
        except SourceError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged row group is a bad image for each of its rows
            raise bad_image(item, f"cannot read the row group ({type(e).__name__}: {e})",
                            "re-create the file") from None
        data = arr[int(self._item_row[i])].as_py()
        if data is None:
            raise bad_image(item, "null image", "the file changed since it was opened; open it again")
        read_capped(item, len(data), self.max_item_bytes)
        return bytes(data)

    def meta(self, i: int) -> dict[str, Any] | None:
        """``{"key": ...}``: the row's key column (read per row group, one cached per process), else its row number
        in the file (keys are not held for the whole dataset: a million rows would be ~100 MB of strings)."""
        i = self._check_index(i)
        u, r = int(self._item_rg[i]), int(self._item_row[i])
        f, g, row0 = self._rg[u]
        kcol = self._key_columns[f]
        if kcol is None:
            return {"key": str(row0 + r)}
        key = ("keys", u)
        if key not in self._handles:
            for k in [k for k in self._handles if k[0] == "keys"]:
                del self._handles[k]
        keys = self._handle(key, lambda: self._file(f).read_row_group(g, columns=[kcol]).column(0).to_pylist(),
                            lambda h: None)
        return {"key": str(keys[r])}

    # --- units: row groups (the shard API that fd_eval.metrics.build plans by) ---------------------------------------
    @property
    def shards(self) -> list[str]:
        return [f"{self.names[f]} (row group {g})" for f, g, _ in self._rg]

    @property
    def shard_starts(self) -> np.ndarray:
        """int64 (G + 1,): item index of each row group's first item; the last entry is ``len(self)``."""
        return self._starts

    def shard_of(self, indices: np.ndarray) -> np.ndarray:
        return np.asarray(self._item_rg, dtype=np.int64)[np.asarray(indices, dtype=np.int64)]

    def shard_part(self, u: int) -> bytes:
        f, g, row0 = self._rg[u]
        return self._file_part(f) + f"\0rg {g}\0{row0}\0{self._rg_rows[u]}".encode()

    def _file_part(self, f: int, content: bool = False) -> bytes:
        src = self.files[f]
        if isinstance(src, RemoteFile):
            return src.part()
        (rel,) = relative_names([src])
        return (content_part if content else stat_part)(rel, src)

    def provenance(self) -> list[dict[str, Any]]:
        """Per file: the path, or for a remote file its URL, size, ETag and revision (the Hub commit)."""
        return [{"url": f.url, "size": f.size, "etag": f.etag, "revision": f.revision} if isinstance(f, RemoteFile)
                else {"path": str(f), "size": os.path.getsize(f)} for f in self.files]

    def _fingerprint_parts(self, content: bool) -> Iterable[bytes]:
        yield f"{self.image_column}\0{self.key_column}".encode()
        for f in range(len(self.files)):
            yield self._file_part(f, content)
        yield self._item_rg.tobytes() + self._item_row.tobytes()


# --- the registered format ----------------------------------------------------------------------------------------
def _parquet_files_in(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(folder), "**", "*.parquet"), recursive=True))


def _claims(spec: str) -> bool:
    if os.path.isfile(spec):
        return spec.lower().endswith(".parquet")
    if os.path.isdir(spec):  # a folder of Parquet files (and no images beside them)
        from .base import IMAGE_EXTENSIONS

        try:
            names = [e.name.lower() for e in os.scandir(spec)]
        except OSError:
            return False
        return (any(n.endswith(".parquet") for n in names)
                and not any(os.path.splitext(n)[1] in IMAGE_EXTENSIONS for n in names))
    return False


def _open(spec: str, o: OpenOptions) -> ImageSource:
    files = [spec] if os.path.isfile(spec) else _parquet_files_in(spec)
    return ParquetSource(files, spec=spec, image_column=o.image_column, key_column=o.key_column, **o.common)


register_format(SourceFormat("parquet", _claims, _open, order=20,
                             describe="a .parquet file or a folder of them (image column struct<bytes, path>)"))
