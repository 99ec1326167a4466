"""`fd-eval fd` (FD between two statistics files) and `fd-eval info` (what a statistics file records)."""
from __future__ import annotations

import json
from typing import Any

import click

from ..outputs.stats import compare_stats, load_all_stats, load_stats
from ..util.io_utils import sha256_file
from ._checks import check_paths
from ._common import echo_table, fmt_num, main, warn, write_json


def _n_text(s: Any) -> str:
    """N of a statistics file, or "unknown" when the file records none (pytorch-fid / clean-fid npz)."""
    return "unknown" if s.metadata.get("n_unknown") else f"{s.n:,}"


@main.command("fd")
@click.argument("stats_a", type=click.Path(dir_okay=False))
@click.argument("stats_b", type=click.Path(dir_okay=False))
@click.option("--model", "-m", default=None, help="Section to compare when a file holds several extractors.")
@click.option("--allow-mismatch", is_flag=True, help="Compare even if extractor/weights/preprocessing differ.")
@click.option("--device", default=None, help="Device for the linear algebra (default: cpu).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the result here.")
def fd_cmd(stats_a: str, stats_b: str, model: str | None, allow_mismatch: bool, device: str | None,
           json_path: str | None) -> None:
    """Fréchet distance between two statistics files, with its mean and covariance terms."""
    check_paths(stats_a, stats_b, json=json_path)
    a, b = load_stats(stats_a, model=model), load_stats(stats_b, model=model)
    res, warnings = compare_stats(a, b, allow_mismatch=allow_mismatch, device=device)
    for w in warnings:
        warn(w)
    echo_table(
        [[fmt_num(res.fd), fmt_num(res.fd_mean), fmt_num(res.fd_cov), _n_text(a), _n_text(b), str(res.dim)]],
        ["FD", "mean term", "cov term", "N a", "N b", "D"],
    )
    if res.clipped1 or res.clipped2 or res.rank1 < res.dim or res.rank2 < res.dim:
        click.echo(f"numerics: rank {res.rank1}/{res.rank2} of {res.dim}, clipped negative spectrum "
                   f"{res.clipped1:.2e}/{res.clipped2:.2e}")
    if json_path:
        write_json(json_path, {"result": res.to_dict(), "a": {"path": stats_a, "n": a.n, "model": a.name},
                               "b": {"path": stats_b, "n": b.n, "model": b.name}, "warnings": warnings})


@main.command("info")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
def info_cmd(path: str, as_json: bool) -> None:
    """Print what a statistics file records: extractor, N, preprocessing, source, versions."""
    sections = load_all_stats(path)
    out = {
        "path": path,
        "sha256": sha256_file(path),
        "sections": {
            name: {"n": s.n, "dim": s.dim, "features": None if s.features is None else list(s.features.shape),
                   "extras": sorted(s.extras), **s.metadata}
            for name, s in sections.items()
        },
    }
    if as_json:
        click.echo(json.dumps(out, indent=2, default=str))
        return
    click.echo(f"{path}  sha256 {out['sha256']}")
    for name, sec in out["sections"].items():
        click.echo(f"[{name}]")
        for k, v in sec.items():
            if isinstance(v, dict):
                click.echo(f"  {k}:")
                for kk, vv in v.items():
                    click.echo(f"    {kk}: {vv}")
            else:
                click.echo(f"  {k}: {v}")
