"""`fd-eval ref list|download|add|remove|info`: the reference-statistics registry (fd_eval.outputs.references)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..outputs import references as refs
from ._common import echo_table, main


def _short_n(n: int) -> str:
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    return f"{n // 1000}K" if n % 1000 == 0 else str(n)


_REL = {"subset": "s", "independent": "i"}


def _floor_list(fl: tuple[refs.Floor, ...], marks: bool = True) -> str:
    return " ".join(f"{f.fd:g}@{_short_n(f.n)}" + (f"({_REL[f.relation]})" if marks and f.relation else "")
                    for f in fl) or "-"


def _floors_text(ref: refs.Reference) -> str:
    parts = [f"{m} " + _floor_list(fl, marks=False) for m, fl in ref.floors.items() if fl]
    return "; ".join(parts) or "-"


def _cached_text(ref: refs.Reference) -> str:
    """"yes"/"no" for a download; a local file is read in place: "local" (or "missing" when it is gone)."""
    if ref.kind == "local":
        return "local" if Path(ref.location).expanduser().is_file() else "missing"
    return "yes" if refs.cached_path(ref.name) else "no"


def _models_text(ref: refs.Reference) -> str:
    return ", ".join(m + ("?" if i.optional else "") for m, i in ref.models.items()) or "-"


def _info_dict(ref: refs.Reference) -> dict:
    copy = refs.cached_copy(ref.name)
    return {"name": ref.name, "builtin": ref.builtin, **ref.to_dict(),
            "cached": str(copy["path"]) if copy else None, "cached_sha256": copy["sha256"] if copy else None}


@main.group("ref")
def ref_group() -> None:
    """Reference statistics by name (gpic-test, gpic-val, your own): list, download, add, remove, info."""


@ref_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
@click.option("--wide", is_flag=True, help="One line per reference, locations included (wider than 100 columns).")
def list_cmd(as_json: bool, wide: bool) -> None:
    """Known references: N, cached?, models with their published floors (FD@N), and where each file lives."""
    entries = refs.list_references()
    if as_json:
        click.echo(json.dumps([_info_dict(r) for r in entries], indent=2))
        return
    if wide:
        rows = [[r.name + ("" if r.builtin else " (user)"), _models_text(r), _short_n(r.n) if r.n else "?",
                 r.location, _cached_text(r), _floors_text(r)] for r in entries]
        echo_table(rows, ["name", "models", "N", "location", "cached", "floors (FD@N)"])
    else:  # one row per model so that it fits 100 columns; the locations follow
        rows = []
        for r in entries:
            first = [r.name + ("" if r.builtin else " (user)"), _short_n(r.n) if r.n else "?", _cached_text(r)]
            for i, (m, info) in enumerate(r.models.items() or [("-", None)]):
                rows.append((first if i == 0 else ["", "", ""])
                            + [m + ("?" if info and info.optional else ""), _floor_list(r.floors.get(m, ()))])
        echo_table(rows, ["name", "N", "cached", "model", "published floors (FD@N)"])
        click.echo("")
        for r in entries:
            click.echo(f"{r.name}: {r.location}")
    click.echo("\n? after a model: the file may lack its statistics (e.g. Inception in the official GPIC files)\n"
               "cached: yes/no = downloaded and verified in the cache; local = a file read in place (not copied)\n"
               "(s) = the real images are a subset of the reference, (i) = an independent sample; "
               "see docs/floors.md")


@ref_group.command("download")
@click.argument("name")
@click.option("--offline", is_flag=True, help="Use the cache only (as HF_HUB_OFFLINE=1 / FD_EVAL_OFFLINE=1).")
@click.option("--force", is_flag=True, help="Download again even if cached (repairs a damaged copy).")
@click.option("--repin", is_flag=True, help="Accept a changed upstream file: forget the digest pinned at the "
                                            "first download.")
def download_cmd(name: str, offline: bool, force: bool, repin: bool) -> None:
    """Download and verify reference NAME (once; later runs use the cache without the network)."""
    path = refs.fetch_reference(name, offline=True if offline else None, force=force, repin=repin)
    copy = refs.cached_copy(name)
    click.echo(f"{name}: {path}" + (f"  sha256 {copy['sha256']}" if copy else ""))


@ref_group.command("add")
@click.argument("name")
@click.argument("file_or_url")
@click.option("--model", "-m", default=None,
              help="Extractor of the statistics (default: what the file records; dinov2-vitl14 for URLs).")
@click.option("--sha256", default=None, help="Expected sha256 (computed for local files when omitted).")
@click.option("--n", "n", type=int, default=None, help="Number of images behind the statistics.")
@click.option("--description", "-d", default="", help="One-line description.")
@click.option("--split", default=None, help="Which data split the statistics describe.")
@click.option("--format", "fmt", type=click.Choice(refs.FORMATS), default="auto", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing user entry of that name.")
def add_cmd(name: str, file_or_url: str, model: str | None, sha256: str | None, n: int | None, description: str,
            split: str | None, fmt: str, overwrite: bool) -> None:
    """Add your own reference NAME: a local statistics file, an https:// URL or an hf:// location."""
    ref = refs.add_reference(name, file_or_url, model=model, sha256=sha256, n=n, description=description,
                             split=split, format=fmt, overwrite=overwrite)
    click.echo(f"added {ref.name}: {ref.location} ({_models_text(ref)}, N {ref.n or '?'}) to "
               f"{refs.user_registry_path()}")


@ref_group.command("remove")
@click.argument("name")
def remove_cmd(name: str) -> None:
    """Remove your reference NAME from the user registry (built-in references stay)."""
    ref = refs.remove_reference(name)
    click.echo(f"removed {ref.name} ({ref.location})")


@ref_group.command("info")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the entry as JSON.")
def info_cmd(name: str, as_json: bool) -> None:
    """Everything the registry says about NAME, and its cached copy."""
    ref = refs.get_reference(name)
    info = _info_dict(ref)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{ref.name}{'' if ref.builtin else ' (user entry)'}: {ref.description}")
    for key in ("location", "format", "split", "n", "sha256", "access_url", "cached", "cached_sha256"):
        val = info[key]
        if key == "sha256" and val is None:
            val = "not published; pinned at first download"
        click.echo(f"  {key}: {val if val is not None else '-'}")
    for m, mi in ref.models.items():
        click.echo(f"  model {m}{' (the file may lack it)' if mi.optional else ''}:")
        if mi.preprocess:
            click.echo("    preprocess: " + ", ".join(f"{k}={v}" for k, v in mi.preprocess.items()))
        if mi.weights_sha256:
            click.echo(f"    weights_sha256: {mi.weights_sha256}")
    for m, fl in ref.floors.items():
        for f in fl:
            terms = f" (mean {f.fd_mean:g} + cov {f.fd_cov:g})" if None not in (f.fd_mean, f.fd_cov) else ""
            click.echo(f"  floor {m} N={f.n}: FD {f.fd:g}{terms}  {f.label}; {f.source}")
