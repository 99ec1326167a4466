"""Cheap checks before any weights load or extraction: every output path is writable and is not an input.

A run that extracts 50,000 images and then fails to write ``--json`` into a folder, or that writes its statistics
over the reference it was compared against, wastes the run or destroys data; :func:`check_outputs` finds both in
milliseconds. The CLI calls it first in every command that writes files; :func:`fd_eval.build_stats` calls it for
its output.
"""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Iterable, Mapping

from .errors import OutputError
from .sources import IMAGE_EXTENSIONS


def _input_files(spec: str) -> tuple[list[Path], list[Path]]:
    """(files, folders) an input spec names: the path itself, or what a glob / brace range matches."""
    if os.path.exists(spec):
        p = Path(spec)
        return ([], [p]) if p.is_dir() else ([p], [])
    if glob.has_magic(spec) or re.search(r"\{[^{}]*(,|\.\.)[^{}]*\}", spec):
        from .sources import expand_shards

        try:
            hits = [Path(h) for h in expand_shards(spec)]
        except Exception:  # noqa: BLE001 - a bad pattern is the source check's to report
            return [], []
        return [h for h in hits if h.is_file()], [h for h in hits if h.is_dir()]
    return [], []


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(inputs: Iterable[str | os.PathLike | None], outputs: Mapping[str, str | os.PathLike | None]) -> None:
    """Raise :class:`OutputError` (one line naming the path, the option and the fix) unless every output can be
    written and replaces no input.

    Args:
        inputs: the run's input specs (image folders, files, globs, statistics files; registry names and None are
            passed over).
        outputs: ``{option name: path}`` (e.g. ``{"--json": "r.json", "--save-stats": None}``); None is passed over.

    Checked: the path is not a folder (nor ends with a separator); its nearest existing parent is a writable folder;
    it is not the same file as an input, not an existing file inside an input folder, and not an image name inside
    an input folder (it would join the images next time); two options do not name the same file.
    """
    files: list[Path] = []
    folders: list[Path] = []
    for spec in inputs:
        if spec is None or not isinstance(spec, (str, os.PathLike)):
            continue
        f, d = _input_files(os.fspath(spec))
        files += f
        folders += d
    seen: dict[str, str] = {}
    for opt, raw in outputs.items():
        if raw is None or raw == "":
            continue
        s = os.fspath(raw)
        p = Path(s)
        if s.endswith(("/", os.sep)) or p.is_dir():
            raise OutputError(f"{s} ({opt}) is a folder; {opt} names a file to write, e.g. "
                              f"{os.path.join(s, 'result.json' if 'json' in opt else 'stats.safetensors')}")
        parent = p.absolute().parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise OutputError(f"cannot write {s} ({opt}): {parent} is a file where a folder should be; choose "
                              "another path")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"cannot write {s} ({opt}): the folder {parent} is not writable; choose a writable "
                              "location")
        for f in files:
            if p.exists() and _same(p, f):
                raise OutputError(f"{s} ({opt}) is an input of this run; writing it would replace the input: choose "
                                  "another output path")
        real = os.path.realpath(s)
        for d in folders:
            root = os.path.realpath(d)
            if real.startswith(root.rstrip(os.sep) + os.sep) and (p.exists() or p.suffix.lower() in IMAGE_EXTENSIONS):
                what = "replace a file" if p.exists() else "add an image"
                raise OutputError(f"{s} ({opt}) lies inside the input folder {d}; writing it would {what} there: "
                                  "choose a path outside the input folder")
        if real in seen:
            raise OutputError(f"{s}: given to both {seen[real]} and {opt}; give each output its own path")
        seen[real] = opt
