"""`fd-eval index build|info`: the training images' features extracted once, for every later `copies` check."""
from __future__ import annotations

import json

import click

from ..index import build_index, open_index
from ..index.build import DEFAULT_INDEX_MODELS
from ..run.options import RunOptions
from ._checks import check_paths
from ._common import echo_table, main, model_option, run_distributed, run_options, weights_arg, weights_option


@main.group("index")
def index_group() -> None:
    """Build and inspect training indexes (`fd-eval copies GEN --train-index DIR`)."""


@index_group.command("build")
@click.argument("train")
@click.option("--output", "-o", "out", required=True, help="The index folder (created; the same command resumes).")
@model_option(tuple(DEFAULT_INDEX_MODELS), "Extractor (repeatable): sscd-disc-mixup, or any DINOv2.")
@weights_option
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Stored feature dtype: float32 gives the results of a live pass bit for bit; float16 halves the "
                   "size (a similarity moves by at most 4.9e-4).")
@click.option("--append", is_flag=True, help="Add TRAIN's images to a finished index as a new part (no rebuild).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None,
              help="Training images per unit file [default: one unit per tar shard, else 10,000].")
@run_options(offline=True)
def index_build_cmd(train: str, out: str, models: tuple[str, ...], weights: tuple[str, ...], dtype: str,
                    append: bool, checkpoint_every: int | None, options: RunOptions) -> None:
    """Extract TRAIN's features once into the index folder -o DIR (L2-normalised, sharded safetensors, keys and
    provenance). Resumable per unit; under `torchrun --nproc_per_node N -m fd_eval index build ...` each process
    takes every N-th unit."""
    check_paths({"TRAIN": train, "--weights": weights_arg(weights)}, folders={"--output": out})
    idx = run_distributed(options.device, lambda: build_index(
        train, out, list(models), dtype=dtype, append=append, weights=weights_arg(weights),
        checkpoint_every=checkpoint_every, options=options, log=lambda m: click.echo(m, err=True)))
    if idx is None:
        return
    info = idx.info()
    click.echo(f"wrote {out}: {info['n_rows']:,} rows ({info['n_skipped']} skipped) in {info['n_units']} units, "
               f"{info['dtype']}, {', '.join(info['extractors'])}")


@index_group.command("info")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
def index_info_cmd(path: str, as_json: bool) -> None:
    """What an index folder holds: rows, units, dtype, extractors (weights sha256, preprocessing), sources."""
    info = open_index(path).info()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['path']}  {info['format']}  created {info['created']} (fd-eval {info['fd_eval']})")
    click.echo(f"rows: {info['n_rows']:,} of {info['n_items']:,} images ({info['n_skipped']} skipped), "
               f"{info['n_units']} units, {info['dtype']}")
    echo_table([[n, str(m["feature_dim"]), str(m["weights_sha256"])[:16], f"{m['bytes'] / 2**30:.3f} GiB",
                 json.dumps(m["preprocess"], sort_keys=True)[:60]] for n, m in info["extractors"].items()],
               ["model", "D", "weights sha256", "size", "preprocess"])
    for p in info["parts"]:
        click.echo(f"part: {p['source']}  {p['n_items']:,} images, {p['n_units']} units from unit {p['first_unit']}")
