"""The click group, error handling and output helpers shared by every command."""
from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable

import click

from .._version import __version__
from ..distributed import destroy, get_rank, init_distributed
from ..download import offline_scope
from ..errors import FDEvalError
from ..io_utils import atomic_write
from ..options import DECODES, OPTION_HELP, PRECISIONS, RESIZES, RunOptions


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


TABLE_FORMATS = ("table", "markdown", "csv")


def echo_table(rows: list[list[str]], header: list[str], fmt: str = "table") -> None:
    """Print a table: plain left-aligned text ("table"), a Markdown table, or CSV (one of :data:`TABLE_FORMATS`)."""
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([header, *rows])
        click.echo(buf.getvalue(), nl=False)
        return
    if fmt == "markdown":
        def cell(c: Any) -> str:
            return str(c).replace("|", "\\|")

        click.echo("| " + " | ".join(cell(h) for h in header) + " |")
        click.echo("|" + "|".join("---" for _ in header) + "|")
        for r in rows:
            click.echo("| " + " | ".join(cell(c) for c in r) + " |")
        return
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    click.echo(line.rstrip())
    click.echo("  ".join("-" * w for w in widths))
    for r in rows:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def warn(msg: str) -> None:
    click.echo(f"warning: {msg}", err=True)


def _run_option_params(offline: bool) -> list:
    """The click options of :class:`fd_eval.RunOptions` (help texts from :data:`fd_eval.options.OPTION_HELP`)."""
    h = OPTION_HELP
    params = [
        click.option("--device", default="auto", show_default=True, help=h["device"]),
        click.option("--batch-size", type=int, default=None, help=h["batch_size"]),
        click.option("--num-workers", type=int, default=None, help=h["num_workers"]),
        click.option("--resize", type=click.Choice(list(RESIZES)), default=None, help=h["resize"]),
        click.option("--precision", type=click.Choice(list(PRECISIONS)), default="exact", show_default=True,
                     help=h["precision"]),
        click.option("--compile/--no-compile", "compile_model", default=None, help=h["compile"]),
        click.option("--decode", type=click.Choice(list(DECODES)), default="pil", show_default=True, help=h["decode"]),
        click.option("--skip-bad", is_flag=True, help=h["skip_bad"]),
        click.option("--quiet", "-q", is_flag=True, help=h["progress"]),
    ]
    if offline:
        params.append(click.option("--offline", is_flag=True, default=None, help=h["offline"]))
    return params


_RUN_PARAMS = ("device", "batch_size", "num_workers", "resize", "precision", "compile_model", "decode", "skip_bad",
               "quiet", "offline")


def run_options(offline: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The one decorator that gives a command the run options (``--device``, ``--batch-size``,
    ``--num-workers``, ``--resize``, ``--precision``, ``--compile/--no-compile``, ``--decode``, ``--skip-bad``,
    ``--quiet``, and ``--offline`` when ``offline``) and hands it ``options``: a validated
    :class:`fd_eval.RunOptions` (a bad value is the usual one-line ``Error:``)."""

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def command(*args: Any, **kw: Any) -> Any:
            v = {k: kw.pop(k) for k in _RUN_PARAMS if k in kw}
            kw["options"] = RunOptions(
                device=v["device"], batch_size=v["batch_size"], num_workers=v["num_workers"], resize=v["resize"],
                precision=v["precision"], compile=v["compile_model"], decode=v["decode"], skip_bad=v["skip_bad"],
                progress=not v["quiet"], offline=v.get("offline"))
            if v.get("offline") is None:
                return f(*args, **kw)
            with offline_scope(v["offline"]):  # also reaches what the options do not carry (remote sources)
                return f(*args, **kw)

        for p in reversed(_run_option_params(offline)):
            command = p(command)
        return command

    return decorate


def weights_arg(values: tuple[str, ...]) -> Any:
    """``--weights PATH`` (one model) or repeated ``--weights MODEL=PATH``."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        return values[0]
    out = {}
    for v in values:
        if "=" not in v:
            raise click.BadParameter(f"{v!r}: with several --weights use MODEL=PATH", param_hint="--weights")
        k, path = v.split("=", 1)
        out[k] = path
    return out


def run_distributed(device: str | None, fn: Callable[[], Any]) -> Any:
    """``fn()`` inside torchrun's process group (joined here; a no-op for a single process): its result on rank 0,
    None on the other ranks, which print nothing. Every rank raises the same :class:`FDEvalError`; rank 0 alone
    prints it."""
    created = init_distributed(device)
    rank = get_rank()
    try:
        res = fn()
    except FDEvalError:
        if rank != 0:
            sys.exit(1)
        raise
    finally:
        if created:
            destroy()
    return res if rank == 0 else None
