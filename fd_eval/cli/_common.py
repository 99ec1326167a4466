"""The click group, error handling and output helpers shared by every command."""
from __future__ import annotations

import contextlib
import functools
import json
import math
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import click

from .._version import __version__
from ..errors import FDEvalError
from ..run.distributed import destroy, get_rank, init_distributed
from ..run.options import CLI_FLAGS, OPTION_HELP, CliFlag, RunOptions
from ..util.download import offline_scope
from ..util.io_utils import atomic_write

EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, the shell's status for a run stopped by Ctrl-C


class Stopped(KeyboardInterrupt):
    """SIGTERM (what SLURM, Kubernetes and torchrun's agent send to stop a job), raised in the main thread as Ctrl-C
    raises KeyboardInterrupt: a subclass, so every path that stops on Ctrl-C (the unit files finished so far kept,
    temp files removed, the DataLoader workers shut down) stops on it too. ``signum``: the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, frame: Any) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def _signals_stop() -> Any:
    """SIGINT raises KeyboardInterrupt and SIGTERM :class:`Stopped` in this process for the duration, whatever the
    parent set.

    Why: a process started as a background job of a non-interactive shell (``cmd &`` in a script, CI runners, test
    harnesses) inherits SIGINT *ignored*, and Python then keeps it ignored: a Ctrl-C or ``kill -INT`` was silently
    lost and an hours-long build ran to the end. SIGTERM's default action kills the process on the spot (no resume
    note, temp files left). A command of this tool is always stoppable, in order: the handlers are installed
    explicitly (main thread only; the previous ones are restored afterwards, for callers such as ``CliRunner``).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _raise_stopped}
    previous = {sig: signal.getsignal(sig) for sig in handlers}
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


class _Group(click.Group):
    """Turns every :class:`FDEvalError` into a one-line ``Error: ...`` and exit status 1, Ctrl-C (SIGINT) and SIGTERM
    into one line and exit status 128 + the signal (130, 143), and every Python warning into one ``warning: ...``
    line."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        with _signals_stop(), _warnings_as_lines():
            return super().main(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FDEvalError as e:
            inputs = getattr(e, "inputs", None)
            if isinstance(inputs, dict):  # too few images: the skipped and ignored items, before the error line
                from ._checks import render_listing

                render_listing(inputs)
            raise click.ClickException(str(e)) from e
        except KeyboardInterrupt as e:
            # click would print "Aborted!" and exit 1; a stopped run is 128 + the signal with one line. Every writer
            # is atomic (temp file + rename), so nothing half-written is left; unit files already saved stay for a
            # resume (the command said so on the line before).
            signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            click.echo(f"Error: interrupted ({signal.Signals(signum).name}); nothing half-written was left", err=True)
            raise click.exceptions.Exit(128 + signum) from None


@contextlib.contextmanager
def _warnings_as_lines() -> Any:
    """Python warnings (ours and libraries') print as one ``warning: <first line of the message>`` line, without
    the file:line and source line of :func:`warnings.showwarning`. Left alone where the caller already customised
    warnings or records them (``warnings.catch_warnings(record=True)``, as pytest does)."""
    import warnings

    previous = warnings.showwarning
    recording = getattr(getattr(warnings, "_showwarnmsg_impl", None), "__self__", None) is not None
    if previous is not getattr(warnings, "_showwarning_orig", previous) or recording:
        yield
        return

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        text = str(message).strip().splitlines()
        click.echo(f"warning: {text[0] if text else category.__name__}", err=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


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


def _click_option(flag: CliFlag) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The click option of one :data:`fd_eval.run.options.CLI_FLAGS` row; its parameter is named after the field."""
    kw: dict[str, Any] = {"help": OPTION_HELP[flag.field], "default": flag.default}
    if flag.show_default:
        kw["show_default"] = True
    if isinstance(flag.type, tuple):
        kw["type"] = click.Choice(list(flag.type))
    elif flag.type is not None:
        kw["type"] = flag.type
    elif "/" not in flag.decls[0]:
        kw["is_flag"] = True
    return click.option(*flag.decls, f"_run_{flag.field}", **kw)


def run_options(offline: bool = False, fields: tuple[str, ...] | None = None
                ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The one decorator that gives a command the run options, generated from :data:`fd_eval.run.options.CLI_FLAGS`
    (``--device``, ``--batch-size``, ``--num-workers``, ``--resize``, ``--precision``, ``--compile/--no-compile``,
    ``--decode``, ``--skip-bad``, ``--quiet``, and ``--offline`` when ``offline``; only ``fields`` when given), and
    hands it ``options``: a validated :class:`fd_eval.RunOptions` (a bad value is the usual one-line ``Error:``)."""
    flags = [f for f in CLI_FLAGS if (f.field in fields if fields is not None else f.field != "offline" or offline)]

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def command(*args: Any, **kw: Any) -> Any:
            values = {}
            for flag in flags:
                v = kw.pop(f"_run_{flag.field}")
                values[flag.field] = (not v) if flag.inverted else v
            if values.get("offline") is False:
                values["offline"] = None  # a flag not given: $FD_EVAL_OFFLINE / $HF_HUB_OFFLINE decide
            kw["options"] = RunOptions(**values)
            if values.get("offline") is None:
                return f(*args, **kw)
            with offline_scope(values["offline"]):  # also reaches what the options do not carry (remote sources)
                return f(*args, **kw)

        for flag in reversed(flags):
            command = _click_option(flag)(command)
        return command

    return decorate


def model_option(default: tuple[str, ...] = ("dinov2-vitl14",),
                 help: str = "Extractor (repeatable; `fid` = inception-v3-tf). See `fd-eval models`."
                 ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--model/-m`` (repeatable; the command receives ``models``), declared once for every command."""
    return click.option("--model", "-m", "models", multiple=True, default=default, show_default=True, help=help)


def weights_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--weights PATH`` or repeated ``--weights MODEL=PATH`` (the command receives ``weights``; see
    :func:`weights_arg`)."""
    return click.option("--weights", "weights", multiple=True, help="Local weights: PATH, or MODEL=PATH per model.")(f)


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
