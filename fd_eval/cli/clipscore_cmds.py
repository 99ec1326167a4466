"""`fd-eval clipscore`: CLIPScore of generated images against their prompts (torchmetrics' definition)."""
from __future__ import annotations

import json

import click

from ..clipscore import clip_score
from ..io_utils import atomic_write
from ._checks import check_paths
from ._common import main


@main.command("clipscore")
@click.argument("images")
@click.option("--prompts", "prompts", required=True,
              help="prompts.jsonl (as `fd-eval prompts` writes): each image pairs with the prompt whose key (or "
                   "index) is its file name.")
@click.option("--weights", default=None,
              help="A full CLIP ViT-L/14 checkpoint (both towers; default: openai/clip-vit-large-patch14's "
                   "model.safetensors, downloaded once).")
@click.option("--device", default=None, help="torch device (default cpu).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, help="Images per batch.")
@click.option("--num-workers", type=click.IntRange(min=0), default=None, help="Decode workers.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the result (score, per-side accounting, truncated prompts) here.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def clipscore_cmd(images: str, prompts: str, weights: str | None, device: str | None, batch_size: int,
                  num_workers: int | None, json_path: str | None, quiet: bool) -> None:
    """CLIPScore of the images in IMAGES against their prompts: max(mean(100 cos(image, text)), 0) with OpenAI
    CLIP ViT-L/14 at 224 px, as torchmetrics' CLIPScore. Needs the `clip` extra (pip install 'fd-eval[clip]').

    Images without a prompt and prompts without an image are counted and listed (--json); prompts longer than
    CLIP's 77 tokens are truncated as torchmetrics does, and counted.
    """
    check_paths(images, prompts, json=json_path)
    res = clip_score(images, prompts, weights=weights, device=device, batch_size=batch_size,
                     num_workers=num_workers, progress=not quiet)
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
