"""`fd-eval prompts`: the benchmark's evaluation captions, for running a generator on exactly those."""
from __future__ import annotations

import click

from ..outputs.prompts import write_prompts
from ..run.options import RunOptions
from ._checks import check_paths
from ._common import main, run_options


@main.command("prompts")
@click.argument("reference", default="gpic-test")
@click.option("--output", "-o", required=True, help="JSON-lines file to write (key, caption, caption_type, ...).")
@click.option("--shards", default=None,
              help="The split's tar shards: a folder, glob, brace range (gpic_test_{00000..00127}.tar) or a template "
                   "with {NNNNN} (local or hf://). Default: the reference's Hub dataset.")
@run_options(fields=("progress", "offline"))
def prompts_cmd(reference: str, output: str, shards: str | None, options: RunOptions) -> None:
    """Write the evaluation prompts named by REFERENCE's key/tar_idx (default gpic-test: the 50K GPIC prompts).

    One JSON object per line, in the reference's order: index, key, tar_idx, caption, caption_type. Only the
    shards that tar_idx names are read (downloaded from the Hub unless --shards points at local copies).
    """
    check_paths({"--shards": shards, "REFERENCE": reference}, output=output)
    prompts = write_prompts(output, reference, shards, offline=options.offline, progress=options.progress)
    n_shards = len({p["tar_idx"] for p in prompts})
    click.echo(f"wrote {output}: {len(prompts):,} prompts from {n_shards} shard(s)")
