"""`fd-eval copies`: the training images nearest to each generated image (copy detection, SSCD by default)."""
from __future__ import annotations

import click

from ..metrics.copies import DEFAULT_MODELS, find_copies
from ..run.options import RunOptions
from ._checks import check_paths, render_accounting
from ._common import (
    echo_table,
    fmt_num,
    main,
    model_option,
    run_distributed,
    run_options,
    warn,
    weights_arg,
    weights_option,
)


@main.command("copies")
@click.argument("gen")
@click.option("--train", "-t", "train", default=None,
              help="Training images (folder, tar shard range, ...); the reference test set for a leak check.")
@click.option("--train-index", default=None,
              help="Instead of --train: a training index folder (`fd-eval index build`); no training image decoded.")
@click.option("--approximate", is_flag=True,
              help="Search --train-index with FAISS (IVF, candidates re-scored exactly; recall@1 reported).")
@model_option(tuple(DEFAULT_MODELS), "Extractor (repeatable): sscd-disc-mixup, or any DINOv2.")
@weights_option
@click.option("--top", "top_k", type=int, default=5, show_default=True, help="Nearest training images kept per image.")
@click.option("--threshold", type=float, default=None,
              help="Copy threshold on top-1 cosine similarity [default: 0.75, SSCD's operating point].")
@click.option("--test", "test", default=None, help="Held-out real images (e.g. the test set) for C_T.")
@click.option("--no-authpct", is_flag=True, help="Skip AuthPct (its second pass over the training images).")
@click.option("--save-features", default=None, help="Save the training features here (AuthPct then reads them).")
@click.option("--json", "json_path", default=None, help="Write the per-image lists, summary and provenance here.")
@click.option("--sheet", default=None, help="Write a contact-sheet PNG of the top suspected copies here.")
@click.option("--checkpoint-dir", default=None,
              help="Where finished units are saved for resuming [default: JSON.partial with --json; shared by all "
                   "ranks].")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None,
              help="Training images per resumable unit [default: one unit per tar shard, else 10,000].")
@run_options(offline=True)
def copies_cmd(gen: str, train: str | None, train_index: str | None, approximate: bool, models: tuple[str, ...],
               weights: tuple[str, ...], top_k: int,
               threshold: float | None, test: str | None, no_authpct: bool, save_features: str | None,
               json_path: str | None, sheet: str | None, checkpoint_dir: str | None, checkpoint_every: int | None,
               options: RunOptions) -> None:
    """For every image in GEN, its --top nearest images in --train (or --train-index; cosine similarity of SSCD
    descriptors by default); prints the copies above --threshold and the top-1 similarity quantiles.

    Resumable: with --json (or --checkpoint-dir) each finished training unit is saved; after a crash or kill
    the same command continues and gives the identical result. Under `torchrun --nproc_per_node N -m fd_eval
    copies ...` each process takes every N-th unit and the top-K lists are merged exactly.
    """
    ckpt = checkpoint_dir if checkpoint_dir is not None else (f"{json_path}.partial" if json_path else None)
    check_paths({"GEN": gen, "--train": train, "--train-index": train_index, "--test": test,
                 "--weights": weights_arg(weights)}, json=json_path,
                sheet=sheet, folders={"--save-features": save_features, "--checkpoint-dir": ckpt})
    res = run_distributed(options.device, lambda: find_copies(
        gen, train, train_index=train_index, approximate=approximate, models=list(models), top_k=top_k,
        threshold=threshold, test=test, compute_authpct=not no_authpct, save_features=save_features,
        weights=weights_arg(weights),
        checkpoint_dir=ckpt, checkpoint_every=checkpoint_every, json_path=json_path, sheet=sheet, options=options,
        log=lambda msg: click.echo(msg, err=True)))
    if res is None:  # not rank 0
        return
    render_accounting(res.inputs)  # per source: found / used / skipped / ignored, as compute reports it
    rows = []
    for model, r in res.results.items():
        q = r["quantiles"]
        rows.append([model, f"{r['n_gen']:,}", f"{r['n_train']:,}", f"{r['n_copies']:,} (> {r['threshold']:g})",
                     f"{r['copy_fraction']:.4f}", *(fmt_num(q[k]) for k in ("0.5", "0.9", "0.99", "1.0")),
                     fmt_num(r["authpct"], 2), fmt_num(r["ct"], 3)])
    echo_table(rows, ["model", "N gen", "N train", "copies", "fraction", "top-1 p50", "p90", "p99", "max",
                      "AuthPct", "C_T"])
    for model, r in res.results.items():
        if (r.get("search") or {}).get("approximate"):
            sr = r["search"]
            above = sr.get("recall_at_1_above_0.5")
            warn(f"{model}: approximate search ({sr['method']}, nprobe {sr['nprobe']}): recall@1 "
                 f"{sr['recall_at_1']:.3f} on {sr['recall_sample']} queries checked by an exact scan"
                 + (f", {above:.3f} for pairs above 0.5" if above is not None else ""))
    if json_path:
        click.echo(f"wrote {json_path}" + (f" and {sheet}" if sheet else ""))
    elif sheet:
        click.echo(f"wrote {sheet}")
