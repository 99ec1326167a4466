"""`fd-eval compute` (images in, FD out) and `fd-eval stats` (images in, statistics file out)."""
from __future__ import annotations

import sys
import textwrap
from typing import Any

import click

from ..api import compute_fd
from ..extractors.preprocess import SOURCE_TRANSFORMS
from ..metrics.analysis import check_reference_features
from ..metrics.build import DEFAULT_BLOCK, build_stats, default_checkpoint_dir
from ..outputs.report import require_matplotlib, write_report
from ..outputs.stats import save_stats
from ..run.options import RunOptions
from ..sources import open_source
from ._checks import check_paths, render_accounting
from ._common import (
    TABLE_FORMATS,
    echo_table,
    fmt_num,
    main,
    model_option,
    run_distributed,
    run_options,
    warn,
    weights_arg,
    weights_option,
    write_json,
)
from .analysis_cmds import analysis_options, analysis_spec, run_analysis


def _selection(f):
    """What `compute` and `stats` evaluate: --model, --weights, --num, --seed."""
    opts = [
        model_option(),
        weights_option,
        click.option("--num", "-n", type=int, default=None, help="Use the first N images (random N with --seed)."),
        click.option("--seed", type=int, default=None, help="Seed of the random subset taken by --num."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _columns(f):
    """Parquet sources: --image-column, --key-column (default: found by type / name)."""
    for o in reversed([
        click.option("--image-column", default=None,
                     help="Parquet sources: the image column (default: the struct<bytes, path> column)."),
        click.option("--key-column", default=None,
                     help="Parquet sources: the key column (default: key, __key__, id or image_id, else the row "
                          "number)."),
    ]):
        f = o(f)
    return f


def _open_columns(spec: str, image_column: str | None, key_column: str | None, options: RunOptions) -> Any:
    """``spec`` as is, or opened with the Parquet columns named on the command line."""
    if image_column is None and key_column is None:
        return spec
    return open_source(spec, skip_bad=options.skip_bad, offline=options.offline, image_column=image_column,
                       key_column=key_column)


@main.command("compute")
@click.argument("gen")
@click.option("--ref", "-r", default="gpic-test", show_default=True,
              help="Reference: a registry name, a statistics file, or another image source.")
@_selection
@run_options(offline=True)
@_columns
@click.option("--ref-transform", type=click.Choice(list(SOURCE_TRANSFORMS)), default=None,
              help="Transform reference images first when REF is an image source (center-crop-256 = GPIC B.1).")
@click.option("--allow-mismatch", is_flag=True, help="Compare even if the reference was made differently.")
@click.option("--json", "json_path", default=None, help="Write results and provenance as JSON here.")
@click.option("--save-stats", "save_stats_path", default=None,
              help="Also save the generated set's statistics (safetensors).")
@click.option("--report", "report_path", default=None,
              help="Also write a self-contained HTML report (needs fd-eval[report]).")
@click.option("--format", "table_format", type=click.Choice(TABLE_FORMATS), default="table", show_default=True,
              help="Results table as aligned text, a Markdown table or CSV (to paste; notes go to stderr then).")
@analysis_options
def compute_cmd(gen: str, ref: str, models: tuple[str, ...], weights: tuple[str, ...], num: int | None,
                seed: int | None, options: RunOptions, image_column: str | None, key_column: str | None,
                ref_transform: str | None, allow_mismatch: bool,
                json_path: str | None, save_stats_path: str | None, report_path: str | None, table_format: str,
                **analysis_opts: Any) -> None:
    """FD of the images in GEN against REF, for each --model (default FD-DINOv2 against GPIC Test-1M).

    Under torchrun (``torchrun --nproc_per_node 8 -m fd_eval compute ...``) every process extracts its share of
    the images on its own GPU (NCCL; gloo with --device cpu), the statistics are merged exactly, and rank 0
    alone prints and writes the outputs.
    """
    check_paths({"GEN": gen, "--ref": ref, "--weights": weights_arg(weights)}, json=json_path,
                save_stats=save_stats_path, report=report_path)  # before any weights load
    if report_path:
        require_matplotlib()  # fail before extracting, not after
    spec = analysis_spec(**analysis_opts)  # None unless --ci/--bootstrap/--fd-infinity/--prdc/--mmd
    if spec is not None and spec.needs_reference_features:
        check_reference_features(ref, models, offline=options.offline)  # fail before extracting, not after
    gen_source = _open_columns(gen, image_column, key_column, options)
    res = run_distributed(options.device, lambda: compute_fd(
        gen_source, ref, models, weights=weights_arg(weights), num=num, seed=seed, options=options,
        allow_mismatch=allow_mismatch, ref_image_transform=ref_transform, keep_features=spec is not None,
        ref_features=spec is not None and spec.needs_reference_features))
    if res is None:  # not rank 0
        return
    for w in res.warnings:
        warn(w)
    render_accounting(res.inputs)
    echo_results(res, table_format)
    analyses = {} if spec is None else run_analysis(res, spec, device=options.device)
    if save_stats_path:
        save_stats(save_stats_path, list(res.stats.values()))
    if json_path or report_path:
        doc = res.to_dict()
        for model, a in analyses.items():
            doc["results"][model]["analysis"] = a
        doc["provenance"]["command"] = ["fd-eval", *sys.argv[1:]]
        if json_path:
            write_json(json_path, doc)
        if report_path:
            write_report([doc], report_path)
            click.echo(f"wrote {report_path}", err=True)


FLOOR_NOTE = ("floor: published real-vs-real FD at this N (relation: subset = those real images are part of the "
              "reference); a perfect independent generator scores ≈ the estimate, see docs/floors.md")


def echo_results(res: Any, table_format: str = "table") -> None:
    """The results table of `compute` (aligned text, Markdown or CSV) and its floor note. CSV holds plain numbers
    (N without separators, the floor's relation in a column of its own) for spreadsheets."""
    csv_ = table_format == "csv"
    header = ["model", "FD", "mean term", "cov term", "N", "N ref", "published floor"]
    header += ["floor relation"] if csv_ else []
    header += ["indep. floor (est.)"]
    rows = []
    for model, r in res.results.items():
        n = str(r["n"]) if csv_ else f"{r['n']:,}" + (f" (+{len(res.skipped)} skipped)" if res.skipped else "")
        n_ref = "?" if not r["n_ref"] else str(r["n_ref"]) if csv_ else f"{r['n_ref']:,}"
        rel, est = r.get("floor_relation"), r.get("floor_independent_estimate")
        floor = "-" if r["floor"] is None else f"{r['floor']:.2f}" + (f" ({rel})" if rel and not csv_ else "")
        rows.append([model, fmt_num(r["fd"]), fmt_num(r["fd_mean"]), fmt_num(r["fd_cov"]), n, n_ref, floor]
                    + ([rel or "-"] if csv_ else []) + ["-" if est is None else f"{est:.2f}"])
    floors = any(r["floor"] is not None or r.get("floor_independent_estimate") is not None
                 for r in res.results.values())
    if not floors:  # a reference outside the registry: no floor to show
        k = len(header) - header.index("published floor")
        header, rows = header[:-k], [r[:-k] for r in rows]
    if any("cmmd" in r for r in res.results.values()):  # CLIP models: CMMD beside FD (docs/metrics-cmmd-clipscore.md)
        header = header[:2] + ["CMMD"] + header[2:]
        rows = [row[:2] + [fmt_num(r["cmmd"]) if "cmmd" in r else "-"] + row[2:]
                for row, r in zip(rows, res.results.values())]
    echo_table(rows, header, table_format)
    if floors:
        click.echo(FLOOR_NOTE, err=table_format != "table")


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


@main.command("stats")
@click.argument("source")
@click.option("--output", "-o", required=True, help="Statistics file to write (safetensors).")
@_selection
@run_options(offline=True)
@_columns
@click.option("--transform", "image_transform", type=click.Choice(list(SOURCE_TRANSFORMS)), default=None,
              help="Transform images first (center-crop-256 = GPIC reference preprocessing, App. B.1).")
@click.option("--keep-features", is_flag=True,
              help="Store the (N, D) features too (for PRDC, MMD, bootstrap; always for CLIP models: CMMD needs them).")
@click.option("--checkpoint-dir", default=None,
              help="Where finished units are saved for resuming (default OUTPUT.partial; shared by all ranks).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None,
              help=f"Images per resumable unit (default: one unit per tar shard, else {DEFAULT_BLOCK:,}).")
def stats_cmd(source: str, output: str, models: tuple[str, ...], weights: tuple[str, ...], num: int | None,
              seed: int | None, options: RunOptions, image_column: str | None, key_column: str | None,
              image_transform: str | None, keep_features: bool,
              checkpoint_dir: str | None, checkpoint_every: int | None) -> None:
    """Build a statistics file (one section per --model) from the images in SOURCE.

    Resumable: finished units (tar shards, or blocks of --checkpoint-every images) are saved as the run goes;
    after a crash or kill the same command continues where it stopped and writes bit-identical statistics.
    Under `torchrun --nproc_per_node N -m fd_eval stats ...` each process takes every N-th unit.
    """
    check_paths({"SOURCE": source, "--weights": weights_arg(weights)}, output=output,
                folders={"--checkpoint-dir": checkpoint_dir or default_checkpoint_dir(output)})
    src = _open_columns(source, image_column, key_column, options)
    stats = build_stats(src, output, models, weights=weights_arg(weights), num=num, seed=seed,
                        keep_features=keep_features, image_transform=image_transform, checkpoint_dir=checkpoint_dir,
                        checkpoint_every=checkpoint_every, options=options, log=lambda msg: click.echo(msg, err=True))
    if stats is None:  # not rank 0: rank 0 writes the file
        return
    first = next(iter(stats.values()))
    skipped = first.metadata["source"].get("skipped_items", [])
    render_accounting({"input": first.metadata["source"].get("inputs")}, more=f"`fd-eval info --json {output}`")
    build = first.metadata["source"]["build"]
    resumed = f", {build['resumed_units']} resumed" if build["resumed_units"] else ""
    click.echo(f"wrote {output}: {', '.join(stats)} over {first.n:,} images"
               + (f" ({len(skipped)} skipped)" if skipped else "")
               + f" from {_plural(build['units'], 'unit')}{resumed}")


def _gpic_models() -> dict[str, list[str]]:
    """{model: [built-in GPIC references holding its statistics ("?" when the file may lack them)]}."""
    from ..outputs.references import list_references

    out: dict[str, list[str]] = {}
    for r in list_references():
        if r.builtin and r.name.startswith("gpic"):
            for m, info in r.models.items():
                out.setdefault(m, []).append(r.name + ("?" if info.optional else ""))
    return out


@main.command("models")
@click.option("--urls", is_flag=True, help="List the official weights files (URL, approximate size, sha256) "
                                           "to fetch them on another machine.")
def models_cmd(urls: bool) -> None:
    """List the extractors: * marks the default, aliases name the same extractor, and the GPIC column says which
    built-in references hold statistics for it."""
    from ..extractors import ALIASES, DEFAULT_EXTRACTOR, extractor_entry, list_extractors
    from ..util.io_utils import cache_root

    names = list_extractors()
    if urls:
        files: dict[str, tuple[Any, list[str]]] = {}
        for n in names:
            w = extractor_entry(n).weights
            if w is not None:
                files.setdefault(w.url, (w, []))[1].append(n)
        for url, (w, users) in files.items():
            size = f"~{w.approx_mib:,.0f} MiB" if w.approx_mib else "size unknown"
            click.echo(f"{', '.join(users)}: {w.filename} ({size})\n  {url}\n  sha256 "
                       + (w.sha256 if w.sha256 and len(w.sha256) == 64 else "not published (recorded in every "
                                                                              "result's provenance)"))
        click.echo(f"put the files in {cache_root() / 'weights'} (as named) or pass --weights PATH")
        return
    aliases: dict[str, list[str]] = {}
    for a, n in ALIASES.items():
        aliases.setdefault(n, []).append(a)
    gpic = _gpic_models()
    rows = [[n + (" *" if n == DEFAULT_EXTRACTOR else ""), str(extractor_entry(n).feature_dim),
             ", ".join(aliases.get(n, [])) or "-", ", ".join(gpic.get(n, [])) or "-"] for n in names]
    left = sum(max(len(r[i]) for r in rows + [["name", "D", "alias", "GPIC references"]]) + 2 for i in range(4))
    wrapped = []  # the description wrapped so that the table fits 100 columns
    for n, row in zip(names, rows):
        lines = textwrap.wrap(extractor_entry(n).description, max(30, 100 - left), break_on_hyphens=False) or ["-"]
        wrapped += [row + [lines[0]], *([["", "", "", "", line] for line in lines[1:]])]
    echo_table(wrapped, ["name", "D", "alias", "GPIC references", "description"])
    click.echo("* = the default --model; alias: another name accepted by --model\n"
               "GPIC references: built-in ones with its statistics (? = the file may lack them; "
               "`fd-eval ref list`)\nofficial weights files (URL, size, sha256): `fd-eval models --urls`")
