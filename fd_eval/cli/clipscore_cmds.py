"""`fd-eval clipscore`: CLIPScore of generated images against their prompts (torchmetrics' definition)."""
from __future__ import annotations

import json

import click

from ..metrics.clipscore import clip_score
from ..run.options import RunOptions
from ..run.pipeline import default_batch_size
from ..util.io_utils import atomic_write
from ._checks import check_paths
from ._common import main, run_options


@main.command("clipscore")
@click.argument("images")
@click.option("--prompts", "prompts", required=True,
              help="prompts.jsonl (as `fd-eval prompts` writes): each image pairs with the prompt whose key (or "
                   "index) is its file name.")
@click.option("--weights", default=None,
              help="A full CLIP ViT-L/14 checkpoint (both towers; default: openai/clip-vit-large-patch14's "
                   "model.safetensors, downloaded once).")
@run_options(fields=("device", "batch_size", "num_workers", "progress"))
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the result (score, per-side accounting, truncated prompts) here.")
def clipscore_cmd(images: str, prompts: str, weights: str | None, options: RunOptions, json_path: str | None) -> None:
    """CLIPScore of the images in IMAGES against their prompts: max(mean(100 cos(image, text)), 0) with OpenAI
    CLIP ViT-L/14 at 224 px, as torchmetrics' CLIPScore. Needs the `clip` extra (pip install 'fd-eval[clip]').

    Images without a prompt and prompts without an image are counted and listed (--json); prompts longer than
    CLIP's 77 tokens are truncated as torchmetrics does, and counted.
    """
    check_paths({"IMAGES": images, "--prompts": prompts, "--weights": weights}, json=json_path)
    dev = options.torch_device()
    res = clip_score(images, prompts, weights=weights, device=dev,
                     batch_size=options.batch_size or default_batch_size(dev), num_workers=options.num_workers,
                     progress=options.progress)
    click.echo(f"CLIPScore {res.clip_score:.4f} over {res.n:,} image-prompt pairs "
               f"(per-pair clamped mean {res.clip_score_clamped_per_pair:.4f})")
    for what, items in (("image(s) without a prompt", res.images_without_prompt),
                        ("prompt(s) without an image", res.prompts_without_image),
                        ("prompt(s) truncated to 77 tokens", res.truncated_prompts)):
        if items:
            click.echo(f"  {len(items):,} {what}, e.g. {', '.join(map(str, items[:3]))}", err=True)
    if json_path:
        with atomic_write(json_path, "w") as f:
            json.dump(res.to_dict(), f, indent=1)
        click.echo(f"wrote {json_path}", err=True)
