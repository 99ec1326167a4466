"""The click group, error handling and output helpers shared by every command."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

from .._version import __version__
from ..errors import FDEvalError
from ..io_utils import atomic_write


class _Group(click.Group):
    """Turns every :class:`FDEvalError` into a one-line ``Error: ...`` and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FDEvalError as e:
            raise click.ClickException(str(e)) from e


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fd-eval")
def main() -> None:
    """FD-DINOv2 and FID for image generators, exact to the reference protocols (GPIC benchmark)."""


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=_json_default)
        f.write("\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def fmt_num(x: float | None, digits: int = 4) -> str:
    """Fixed notation for ordinary magnitudes, scientific for tiny ones."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if abs(x) >= 10 ** (-digits + 1) or x == 0 else f"{x:.3e}"


def echo_table(rows: list[list[str]], header: list[str]) -> None:
    """Print a plain left-aligned table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    click.echo(line)
    click.echo("  ".join("-" * w for w in widths))
    for r in rows:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def warn(msg: str) -> None:
    click.echo(f"warning: {msg}", err=True)


def speed_options() -> list:
    """``--precision``, ``--compile/--no-compile``, ``--decode`` (shared with `ceiling`)."""
    return [
        click.option("--precision", type=click.Choice(["exact", "fast"]), default="exact", show_default=True,
                     help="exact: float32, TF32 off (the protocol's numbers); fast: bfloat16 autocast for DINOv2, "
                          "TF32 for Inception (faster on GPUs; refused against exact references unless "
                          "--allow-mismatch)."),
        click.option("--compile/--no-compile", "compile_model", default=None,
                     help="torch.compile the network with --precision fast [default: only on a GPU for passes "
                          "of >= 200K images]."),
        click.option("--decode", type=click.Choice(["pil", "gpu"]), default="pil", show_default=True,
                     help="gpu: decode JPEGs on the GPU (nvJPEG; needs --resize torch for DINOv2; other formats "
                          "and CPU runs use PIL)."),
    ]
