"""The training index on disk: L2-normalised training features in sharded safetensors, with keys and provenance.

Layout of an index folder ``DIR``::

    DIR/index.json                     manifest (format, dtype, extractors, parts, units; written atomically)
    DIR/units/unit-{k:06d}.safetensors one per build unit (a tar shard, or a block of images)

A unit file holds, for its R readable images (rows in source order):

* ``index``: int64 (R,) the row keys: positions in the indexed images (part offset + position in the part's
  source), the ``index`` that ``fd-eval copies`` reports;
* ``{model}.features``: float32 (default) or float16 (R, D) unit vectors: ``F.normalize(x.double()).to(dtype)``
  of the extractor's float32 output x (see :mod:`fd_eval.index.scan` for why this is exactly the training vector
  a live ``copies --train`` pass compares against);
* ``{model}.norm``: float64 (R,) ``||x||`` (C_T works on raw features: ``features * norm``);

and, as JSON in the header (``fd_eval_index``), the unit's label, data fingerprint, the row names (what
``fd-eval copies`` prints as ``key``: a file path, or ``shard.tar:member``) and the images skipped as unreadable.

Parts. ``fd-eval index build MORE -o DIR --append`` adds a part: its units continue the unit numbering and its
keys start after the previous parts' images, so nothing already stored is rewritten. Every part must be made
with the same extractors, weights, preprocessing, precision and dtype (the manifest's ``extractors``).
"""
from __future__ import annotations

import bisect
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..errors import InputError

INDEX_FORMAT = "fd-eval-index/1"
MANIFEST = "index.json"
UNITS = "units"
META_KEY = "fd_eval_index"
DTYPES = {"float32": torch.float32, "float16": torch.float16}
_NP_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8"}  # safetensors: little-endian
IDENTITY_KEYS = ("extractor", "feature_dim", "weights_sha256", "preprocess", "precision")


def unit_path(root: Path, k: int) -> Path:
    return root / UNITS / f"unit-{k:06d}.safetensors"


def extractor_identity(meta: dict[str, Any]) -> dict[str, Any]:
    """The part of an extractor's metadata that decides its features (JSON-normalised)."""
    return json.loads(json.dumps({k: meta.get(k) for k in IDENTITY_KEYS}))


def _short(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return s[:12] + "..." if isinstance(v, str) and len(s) > 16 else s


def identity_difference(stored: dict[str, Any], current: dict[str, Any]) -> str | None:
    """'weights sha256 abc... (index) vs def... (this run)' for the first field that differs, else None."""
    words = {"extractor": "extractor", "feature_dim": "feature dimension", "weights_sha256": "weights sha256",
             "preprocess": "preprocessing", "precision": "precision"}
    for k in IDENTITY_KEYS:
        a, b = stored.get(k), current.get(k)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                sub = sorted(x for x in set(a) | set(b) if a.get(x) != b.get(x))
                return (f"{words[k]} {', '.join(f'{x}={a.get(x)!r}' for x in sub)} (index) vs "
                        f"{', '.join(f'{x}={b.get(x)!r}' for x in sub)} (this run)")
            return f"{words[k]} {_short(a)} (index) vs {_short(b)} (this run)"
    return None


@dataclass(frozen=True)
class IndexUnit:
    """One stored unit: ``number`` (file unit-{number:06d}), ``part``, label, data fingerprint, images planned
    (``n_items``), rows stored (``n_rows``) and its key range (first_key..last_key; -1 when empty)."""

    number: int
    part: int
    label: str
    fingerprint: str
    n_items: int
    n_rows: int
    first_key: int
    last_key: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class TrainingIndex:
    """A complete index folder, opened read-only (:func:`open_index`).

    ``units``: every :class:`IndexUnit`, in key order. ``models``: {name: extractor identity}. ``dtype``: the stored
    feature dtype. ``n_rows``: training images stored; ``n_items``: images indexed (rows + skipped).
    """

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root, self.manifest = root, manifest
        self.dtype: str = manifest["dtype"]
        self.models: dict[str, dict[str, Any]] = manifest["extractors"]
        self.units = [IndexUnit(**u) for u in manifest["units"]]
        self.parts: list[dict[str, Any]] = manifest["parts"]
        self.n_rows = sum(u.n_rows for u in self.units)
        self.n_items = sum(p["n_items"] for p in self.parts)
        self._filled = [u for u in self.units if u.n_rows]  # key ranges ascend over the units that hold rows
        self._starts = [u.first_key for u in self._filled]
        self._names: dict[int, tuple[torch.Tensor, list[str]]] = {}
        self._layout: dict[int, dict[str, tuple[int, int, str, tuple[int, ...]]]] = {}  # unit: tensor offsets

    # --- reading ------------------------------------------------------------------------------------------
    def path(self, unit: IndexUnit) -> Path:
        return unit_path(self.root, unit.number)

    def read_header(self, unit: IndexUnit) -> dict[str, Any]:
        from safetensors import SafetensorError, safe_open

        p = self.path(unit)
        try:
            with safe_open(str(p), framework="pt") as f:
                return json.loads((f.metadata() or {})[META_KEY])
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise InputError(f"{p}: damaged or missing index unit ({type(e).__name__}: {e}); rebuild it with "
                             f"`fd-eval index build` (the same command resumes)") from None

    def read(self, unit: IndexUnit, model: str, *, norm: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(features (R, D) in the stored dtype, keys int64 (R,), norms float64 (R,) or None) of one unit."""
        from safetensors import SafetensorError, safe_open

        p = self.path(unit)
        try:
            with safe_open(str(p), framework="pt") as f:
                feats, keys = f.get_tensor(f"{model}.features"), f.get_tensor("index")
                nrm = f.get_tensor(f"{model}.norm") if norm else None
        except (SafetensorError, OSError, KeyError) as e:
            raise InputError(f"{p}: damaged or missing index unit ({type(e).__name__}: {e}); rebuild it with "
                             "`fd-eval index build` (the same command resumes)") from None
        d = self.models[model]["feature_dim"]
        if feats.shape != (unit.n_rows, d) or keys.shape != (unit.n_rows,) or str(feats.dtype)[6:] != self.dtype:
            raise InputError(f"{p}: holds {tuple(feats.shape)} {feats.dtype} features, the manifest says "
                             f"({unit.n_rows}, {d}) {self.dtype}; rebuild the index")
        return feats, keys, nrm

    def iter_units(self, model: str, units: Sequence[IndexUnit] | None = None, *, norm: bool = False,
                   prefetch: bool = True) -> Iterator[tuple[IndexUnit, torch.Tensor, torch.Tensor, Any]]:
        """Yield (unit, features, keys, norms) in order; with ``prefetch`` the next unit is read by a thread
        while the caller works on the current one (safetensors reads release the GIL)."""
        units = list(self.units if units is None else units)
        if not prefetch:
            for u in units:
                yield (u, *self.read(u, model, norm=norm))
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="fd-eval-index-read") as pool:
            nxt = pool.submit(self.read, units[0], model, norm=norm) if units else None
            for i, u in enumerate(units):
                cur = nxt.result()  # type: ignore[union-attr]
                nxt = pool.submit(self.read, units[i + 1], model, norm=norm) if i + 1 < len(units) else None
                yield (u, *cur)

    def unit_of(self, key: int) -> IndexUnit:
        i = bisect.bisect_right(self._starts, key) - 1
        if i < 0 or not self._filled[i].first_key <= key <= self._filled[i].last_key:
            raise InputError(f"{self.root}: key {key} is not in the index")
        return self._filled[i]

    def _unit_names(self, u: IndexUnit) -> tuple[torch.Tensor, list[str]]:
        if u.number not in self._names:
            from safetensors import safe_open

            with safe_open(str(self.path(u)), framework="pt") as f:
                keys = f.get_tensor("index")
            self._names[u.number] = (keys, self.read_header(u)["names"])
        return self._names[u.number]

    def describe(self, key: int) -> str:
        """The stored name of row ``key`` (a file path, or ``shard.tar:member``), as ``ImageSource.describe``."""
        u = self.unit_of(int(key))
        keys, names = self._unit_names(u)
        pos = int(torch.searchsorted(keys, torch.tensor(int(key))))
        if pos >= len(keys) or int(keys[pos]) != int(key):
            raise InputError(f"{self.root}: key {key} is not in the index (skipped when it was built?)")
        return names[pos]

    def mapped(self, unit: IndexUnit, name: str) -> np.ndarray:
        """Tensor ``name`` of one unit file as a read-only numpy memory map (no read until rows are indexed):
        a safetensors file is an 8-byte header length, the JSON header, then each tensor's bytes at its
        ``data_offsets``. Headers are parsed once per unit (they hold the row names: large)."""
        p = self.path(unit)
        try:
            if unit.number not in self._layout:
                with open(p, "rb") as f:
                    n = struct.unpack("<Q", f.read(8))[0]
                    head = json.loads(f.read(n))
                self._layout[unit.number] = {k: (8 + n + v["data_offsets"][0], v["data_offsets"][1] -
                                                 v["data_offsets"][0], v["dtype"], tuple(v["shape"]))
                                             for k, v in head.items() if k != "__metadata__"}
            off, size, dt, shape = self._layout[unit.number][name]
            dtype = _NP_DTYPES[dt]
            if size != int(np.prod(shape)) * np.dtype(dtype).itemsize:
                raise ValueError(f"{name} holds {size} bytes for shape {shape}")
            return np.memmap(p, dtype=dtype, mode="r", offset=off, shape=shape)
        except (OSError, ValueError, KeyError, struct.error) as e:
            raise InputError(f"{p}: damaged or missing index unit ({type(e).__name__}: {e}); rebuild it with "
                             "`fd-eval index build` (the same command resumes)") from None

    def rows(self, model: str, keys: torch.Tensor) -> torch.Tensor:
        """The stored features (N, D) of rows ``keys`` (int64 (N,), any order, repeats allowed), as float32.

        Gathered from memory maps of the unit files: only the pages holding the requested rows are read, so
        re-scoring C candidates of Q queries costs Q x C rows, not a pass over the index."""
        d = self.models[model]["feature_dim"]
        k = keys.cpu().numpy().astype(np.int64, copy=False).reshape(-1)
        out = np.empty((len(k), d), dtype=np.float32)  # every row is filled below, or an error raised
        if not len(k):
            return torch.from_numpy(out)
        starts = np.asarray(self._starts, dtype=np.int64)
        which = np.searchsorted(starts, k, side="right") - 1
        lasts = np.asarray([u.last_key for u in self._filled], dtype=np.int64)
        bad = (which < 0) | (k > lasts[np.clip(which, 0, None)])
        if bad.any():
            raise InputError(f"{self.root}: key {int(k[bad][0])} is not in the index")
        order = np.argsort(which, kind="stable")
        bounds = np.flatnonzero(np.diff(which[order])) + 1
        for js in np.split(order, bounds):
            u = self._filled[int(which[js[0]])]
            if u.last_key - u.first_key + 1 == u.n_rows:  # no image skipped in the unit: keys are consecutive
                pos = k[js] - u.first_key
            else:
                ukeys = self.mapped(u, "index")
                pos = np.searchsorted(ukeys, k[js])
                if (pos >= len(ukeys)).any() or (ukeys[np.minimum(pos, len(ukeys) - 1)] != k[js]).any():
                    raise InputError(f"{self.root}: a requested key is not in {self.path(u).name} (skipped when "
                                     "the index was built?)")
            feats = self.mapped(u, f"{model}.features")
            if feats.shape != (u.n_rows, d):
                raise InputError(f"{self.path(u)}: holds {feats.shape} features, the manifest says "
                                 f"({u.n_rows}, {d}); rebuild the index")
            srt = np.argsort(pos, kind="stable")  # ascending offsets: sequential page reads
            out[js[srt]] = feats[pos[srt]]
        return torch.from_numpy(out)

    def skipped(self) -> list[dict[str, Any]]:
        return [s for p in self.parts for s in p.get("skipped", [])]

    def sources(self) -> list[str]:
        return [p["source"] for p in self.parts]

    # --- checks -------------------------------------------------------------------------------------------
    def check_extractor(self, name: str, meta: dict[str, Any]) -> None:
        """Refuse (one line naming both) when ``meta`` (``Extractor.metadata()``) would make other features."""
        if name not in self.models:
            raise InputError(f"{self.root}: the index holds {', '.join(sorted(self.models))} features, not {name}; "
                             f"build one with `fd-eval index build TRAIN -o DIR -m {name}`")
        diff = identity_difference(self.models[name], extractor_identity(meta))
        if diff:
            raise InputError(f"{self.root}: the index's {name} features were made with another {diff}; use the "
                             "weights and preprocessing the index was built with, or rebuild it")

    def info(self) -> dict[str, Any]:
        """What ``fd-eval index info`` prints (JSON-ready)."""
        per_model = {n: {**m, "bytes": self.n_rows * m["feature_dim"] * (4 if self.dtype == "float32" else 2)}
                     for n, m in self.models.items()}
        return {"path": str(self.root), "format": self.manifest["format"], "dtype": self.dtype,
                "n_rows": self.n_rows, "n_items": self.n_items, "n_skipped": len(self.skipped()),
                "n_units": len(self.units), "extractors": per_model,
                "parts": [{k: v for k, v in p.items() if k != "skipped"} for p in self.parts],
                "fd_eval": self.manifest.get("fd_eval"), "created": self.manifest.get("created")}


def read_manifest(root: str | os.PathLike) -> dict[str, Any] | None:
    p = Path(root) / MANIFEST
    if not p.exists():
        return None
    try:
        m = json.loads(p.read_text())
        if not isinstance(m, dict) or m.get("format") != INDEX_FORMAT:
            raise ValueError(f"format {m.get('format') if isinstance(m, dict) else None!r}, not {INDEX_FORMAT!r}")
        return m
    except (OSError, ValueError) as e:
        raise InputError(f"{p}: not an fd-eval index manifest ({e}); point at a folder made by "
                         "`fd-eval index build`") from None


def open_index(root: str | os.PathLike) -> TrainingIndex:
    """Open a complete index folder; refuses a missing, unfinished or foreign one with a one-line error."""
    root = Path(root)
    m = read_manifest(root)
    if m is None:
        raise InputError(f"{root}: no {MANIFEST}: not an fd-eval index; build one with "
                         "`fd-eval index build TRAIN -o DIR`")
    if not m.get("parts") or not all(p.get("complete") for p in m["parts"]):
        raise InputError(f"{root}: the index build has not finished; run the same `fd-eval index build` command "
                         "again to complete it")
    return TrainingIndex(root, m)
