"""`fd-eval report`: result JSON files in, one self-contained HTML page out."""
from __future__ import annotations

import click

from ..outputs.report import write_report
from ._checks import check_paths
from ._common import main


@main.command("report")
@click.argument("results", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="HTML file to write.")
@click.option("--title", default=None, help="Page title [default: from the results].")
@click.option("--thumbnails", type=click.IntRange(min=0), default=16, show_default=True,
              help="Generated samples shown (seeded choice; 0: none).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the thumbnail choice.")
@click.option("--max-copies", type=click.IntRange(min=0), default=12, show_default=True,
              help="Most suspected copies shown per model (results of `fd-eval copies --json`).")
def report_cmd(results: tuple[str, ...], output: str, title: str | None, thumbnails: int, seed: int,
               max_copies: int) -> None:
    """One self-contained HTML page (no network needed; printable) from RESULTS: `fd-eval compute --json`
    documents, FDMetric.compute() dicts saved as JSON (one per training evaluation: an FD-over-steps chart)
    and `fd-eval copies --json` documents. Needs matplotlib: pip install 'fd-eval[report]'."""
    check_paths(*results, output=output)
    path = write_report(list(results), output, title=title, thumbnails=thumbnails, seed=seed, max_copies=max_copies)
    click.echo(f"wrote {path} ({len(results)} result(s))")
