"""Helpers every command calls with one line: preflight checks of output paths, and the input accounting summary."""
from __future__ import annotations

import os
from typing import Any, Mapping

import click

from ..run.preflight import check_outputs
from ..sources import InputAccounting

MAX_LISTED = 20  # skipped items printed per side; the rest are in --json


def check_paths(*inputs: Any, folders: Mapping[str, Any] | None = None, **outputs: str | os.PathLike | None) -> None:
    """Before any work, the one output rule (:func:`fd_eval.run.preflight.check_outputs`): every output
    (``json="r.json"`` is shown as ``--json``) writable, not a folder, not an input nor inside an input folder,
    not shared with another output. ``inputs``: specs, or ``{label: spec}`` mappings (``{"--weights": ...}``);
    ``folders``: ``{option: folder}`` outputs (checkpoint folders). Raises the one-line
    :class:`fd_eval.errors.OutputError`."""
    labeled: dict[str, list[Any]] = {}
    for v in inputs:
        for k, x in (v.items() if isinstance(v, Mapping) else [("", v)]):
            labeled.setdefault(k, []).append(x)
    check_outputs(labeled, {"--" + k.replace("_", "-"): v for k, v in outputs.items()}, folders)


def render_listing(inputs: Mapping[str, Mapping[str, Any] | None]) -> None:
    """The skipped items (first 20) and a few ignored entries per reason of each side, on stderr (the summary is
    in the error line that follows)."""
    for doc in inputs.values():
        if doc:
            for line in InputAccounting.from_dict(doc).listing(MAX_LISTED):
                click.echo(f"  {line.replace('(see --json)', '(see the error)')}", err=True)


def render_accounting(inputs: Mapping[str, Mapping[str, Any] | None], more: str = "see --json") -> None:
    """One summary line per side (``generated samples/: 1,000 found, 998 used, 1 skipped (corrupt), 1 ignored
    (not an image file extension: 1)``), then the skipped items (first 20, then ``... see --json``), a few ignored
    entries per reason and the sources' warnings, on stderr."""
    for side, doc in inputs.items():
        if not doc:
            continue
        acc = InputAccounting.from_dict(doc)
        click.echo(acc.summary(side), err=True)
        for line in acc.listing(MAX_LISTED):
            click.echo(f"  {line.replace('(see --json)', f'({more})')}", err=True)
        for w in acc.warnings:
            click.echo(f"warning: {w}", err=True)
