"""The contact sheet of ``fd-eval copies --sheet``: the most similar (generated, nearest training) pairs as a grid.

Pairs are ordered by top-1 similarity, highest first, so the suspected copies (above the threshold) come first
and are flagged ``COPY`` in red. Each cell holds the generated image beside its nearest training image and a
caption (similarity, model, generated name, training key) wrapped to the cell's width: a long path takes more
lines, never gets cut. A training image that cannot be read (an index whose source folder is gone) is drawn as a
grey tile and its key is still printed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..util.io_utils import atomic_path

PAD, GAP = 6, 12


def wrap(text: str, width_px: float, measure: Any) -> list[str]:
    """``text`` cut into lines no wider than ``width_px`` (measured by ``measure(str) -> px``); words are kept
    whole where they fit, long paths are broken anywhere. Nothing is dropped."""
    lines: list[str] = []
    for para in text.split("\n"):
        cur = ""
        for ch in para:
            if cur and measure(cur + ch) > width_px:
                cut = cur.rfind(" ")
                if cut > 0 and measure(cur[:cut]) <= width_px:
                    lines.append(cur[:cut])
                    cur = cur[cut + 1:] + ch
                else:
                    lines.append(cur)
                    cur = ch
            else:
                cur += ch
        lines.append(cur)
    return lines


def _tile(src: Any, i: int | None, thumb: int) -> Any:
    from PIL import Image, ImageDraw, ImageOps

    if i is not None and src is not None:
        try:  # fitted to the tile (small images enlarged too), aspect ratio kept
            return ImageOps.contain(src.load(i).convert("RGB"), (thumb, thumb), Image.BICUBIC)
        except Exception:  # noqa: BLE001 - any unreadable image becomes the grey tile; the key is printed
            pass
    im = Image.new("RGB", (thumb, thumb), (205, 205, 205))
    ImageDraw.Draw(im).text((8, thumb // 2 - 6), "not reachable", fill="black")
    return im


def contact_sheet(result: Any, gen: Any, train: Any, path: str | os.PathLike, *, model: str, rows: int = 16,
                  thumb: int = 160, cols: int = 3) -> Path:
    """PNG grid of the ``rows`` generated images with the highest top-1 similarity (``cols`` pairs per row), each
    beside its nearest training image, captioned; written atomically. Returns ``path``."""
    from PIL import Image, ImageDraw, ImageFont

    r = result.results[model]
    order = sorted(r["per_image"], key=lambda p: -(p["nearest"][0]["similarity"] if p["nearest"] else -9))[:rows]
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def measure(s: str) -> float:
        return probe.textlength(s, font=font)

    cell_w = 2 * thumb + PAD
    line_h = int(sum(font.getmetrics())) + 2
    cells = []
    for p in order:
        near = p["nearest"][0] if p["nearest"] else None
        s = near["similarity"] if near else float("nan")
        copy = near is not None and s > r["threshold"]
        text = (f"{'COPY - ' if copy else ''}cos={s:.4f} ({model})\ngenerated: {p['name']}\n"
                f"train: {near['key'] if near else '-'}")
        cells.append((p, near, copy, wrap(text, cell_w, measure)))
    ncols = max(1, min(cols, len(cells)))
    grid = [cells[i:i + ncols] for i in range(0, len(cells), ncols)]
    heights = [thumb + PAD + line_h * max(len(c[3]) for c in row) for row in grid]
    width = ncols * cell_w + (ncols - 1) * GAP + 2 * PAD
    sheet = Image.new("RGB", (width, max(1, sum(heights) + GAP * max(0, len(grid) - 1) + 2 * PAD)), "white")
    draw = ImageDraw.Draw(sheet)
    y = PAD
    for row, h in zip(grid, heights):
        for j, (p, near, copy, lines) in enumerate(row):
            x = PAD + j * (cell_w + GAP)
            sheet.paste(_tile(gen, p["index"], thumb), (x, y))
            sheet.paste(_tile(train, near["index"] if near else None, thumb), (x + thumb + PAD, y))
            for k, line in enumerate(lines):
                draw.text((x, y + thumb + PAD // 2 + k * line_h), line, fill=(200, 0, 0) if copy else "black",
                          font=font)
        y += h + GAP
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return Path(path)
