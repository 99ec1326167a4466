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
from typing import Any, Iterable, Mapping

from ..errors import OutputError
from ..sources import IMAGE_EXTENSIONS


def _input_files(spec: str) -> tuple[list[Path], list[Path]]:
    """(files, folders) an input spec names: the path itself, or what a glob / brace range matches."""
    if os.path.exists(spec):
        p = Path(spec)
        return ([], [p]) if p.is_dir() else ([p], [])
    if glob.has_magic(spec) or re.search(r"\{[^{}]*(,|\.\.)[^{}]*\}", spec):
        from ..sources import expand_shards

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


Spec = Any  # a path, a glob, a registry name, an object (passed over), or a list/dict of them (weights per model)


def _flatten(inputs: Iterable[Spec] | Mapping[str, Spec]) -> list[tuple[str, str]]:
    """[(label, spec)] of every path-like input; ``inputs`` as a mapping gives labels (``{"--weights": ...}``)."""
    items = inputs.items() if isinstance(inputs, Mapping) else (("", v) for v in inputs)
    out: list[tuple[str, str]] = []
    for label, v in items:
        if v is None:
            continue
        if isinstance(v, Mapping):
            out += [t for x in v.values() for t in _flatten({label: x})]
        elif isinstance(v, (list, tuple, set, frozenset)):
            out += [t for x in v for t in _flatten({label: x})]
        elif isinstance(v, (str, os.PathLike)) and os.fspath(v):
            out.append((label, os.fspath(v)))
        elif isinstance(getattr(v, "spec", None), str) and v.spec:  # an opened ImageSource: its path or pattern
            out.append((label, v.spec))
    return list(dict.fromkeys(out))


def _inside(real: str, root: str) -> bool:
    """``real`` is ``root`` or lies below it (both resolved)."""
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _check_writable_place(s: str, opt: str, is_folder: bool = False) -> None:
    parent = Path(s).absolute() if is_folder else Path(s).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {s} ({opt}): {parent} is a file where a folder should be; choose "
                          "another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {s} ({opt}): the folder {parent} is not writable; choose a writable "
                          "location")


def check_outputs(inputs: Iterable[Spec] | Mapping[str, Spec], outputs: Mapping[str, str | os.PathLike | None],
                  folders: Mapping[str, str | os.PathLike | None] | None = None) -> None:
    """Raise :class:`OutputError` (one line naming the path, the option and the fix) unless every output can be
    written and touches no input. The one output rule of every command (and of the API entry points that write).

    Args:
        inputs: the run's inputs: image sources (folders, files, globs, shard ranges), statistics files, weights
            files, prompts; registry names, objects and None are passed over; lists and dicts (weights per model)
            are looked into. A mapping ``{label: spec}`` names each input in the messages (``"--weights"``).
        outputs: ``{option name: file path}`` (e.g. ``{"--json": "r.json", "--save-stats": None}``); None is passed
            over.
        folders: ``{option name: folder path}`` for outputs that are folders (checkpoint folders, feature shards,
            index folders).

    The rule: an output is never an input file, never inside an input folder (it would replace a file there or
    join the images next time), never the same path as another output nor inside an output folder (a checkpoint
    folder is emptied when its run finishes); a file output is not an existing folder, a folder output not an
    existing file; the nearest existing parent is a writable folder.
    """
    files: list[tuple[str, Path]] = []
    in_folders: list[tuple[str, Path]] = []
    for label, spec in _flatten(inputs):
        f, d = _input_files(spec)
        files += [(label, x) for x in f]
        in_folders += [(label, x) for x in d]
    todo = [(o, v, False) for o, v in outputs.items()] + [(o, v, True) for o, v in (folders or {}).items()]
    seen: dict[str, str] = {}
    out_folders: list[tuple[str, str]] = []
    for opt, raw, is_folder in todo:
        if raw is None or os.fspath(raw) == "":
            continue
        s = os.fspath(raw)
        p = Path(s)
        if not is_folder and (s.endswith(("/", os.sep)) or p.is_dir()):
            raise OutputError(f"{s} ({opt}) is a folder; {opt} names a file to write, e.g. "
                              f"{os.path.join(s, 'result.json' if 'json' in opt else 'stats.safetensors')}")
        if is_folder and p.exists() and not p.is_dir():
            raise OutputError(f"{s} ({opt}) is a file; {opt} names a folder to write into: choose a folder path "
                              "(or remove the file)")
        _check_writable_place(s, opt, is_folder)
        real = os.path.realpath(s)
        for label, f in files:
            if _same(p, f) or real == os.path.realpath(f):
                what = f" ({label})" if label else ""
                raise OutputError(f"{s} ({opt}) is an input of this run{what}; writing it would replace that input: "
                                  "choose another output path")
        for label, d in in_folders:
            if _inside(real, os.path.realpath(d)):
                what = ("replace a file" if p.is_file() else "add an image" if p.suffix.lower() in IMAGE_EXTENSIONS
                        else "add files")
                where = f" ({label})" if label else ""
                raise OutputError(f"{s} ({opt}) lies inside the input folder {d}{where}; writing it would {what} "
                                  "there: choose a path outside the input folder")
        if real in seen:
            raise OutputError(f"{s}: given to both {seen[real]} and {opt}; give each output its own path")
        seen[real] = opt
        if is_folder:
            out_folders.append((opt, real))
    for real, opt in seen.items():
        for fopt, froot in out_folders:
            if fopt != opt and real != froot and _inside(real, froot):
                raise OutputError(f"{real} ({opt}) lies inside the {fopt} folder {froot}; give each output its own "
                                  f"place: choose a path for {opt} outside it")
