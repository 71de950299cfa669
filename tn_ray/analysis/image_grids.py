"""Labelled image grids, PNG: per-prompt best-of-n grids (as the paper's Figure 4: rows = rewards, columns = n),
a fine-tuning run's evaluation images per step, and the study report's figures (Fig. 4 and 5 analogues)."""

from __future__ import annotations

import io
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PAD = 4
LINE = 12  # pixels per text line of PIL's default bitmap font


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    return int(draw.textlength(text, font=font))


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text``, its start cut (``..``) until it fits ``width`` pixels: a caption's value (at its end) stays."""
    while _text_width(draw, text, font) > width and len(text) > 3:
        text = ".." + text[3:]
    return text


def prompt_grid(
    prompt: str,
    rows: Sequence[str],
    pools: Sequence[int],
    image_of: Callable[[str, int], bytes],
    cell: int = 128,
    column_label: Callable[[int], str] = lambda n: f"n={n}",
    caption: Callable[[str, int], str] | None = None,
) -> Image.Image:
    """A labelled grid: cell (reward r, pool n) is the top-1 image of r among the first n samples.

    ``image_of(reward, n)`` returns the selected image's encoded bytes; ``column_label(n)`` the
    column's heading (fine-tuning grids: checkpoint steps); ``caption(reward, n)``, when given, a
    line under each image (e.g. the truth's score), its start cut to the image's width.
    """
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(_text_width(probe, r, font) for r in rows) + 2 * PAD
    width = label_w + len(pools) * (cell + PAD) + PAD
    title = textwrap.wrap(prompt, max(20, (width - 2 * PAD) // 6)) or [""]
    top = PAD + LINE * len(title) + PAD + LINE + PAD
    row_h = cell + PAD + (LINE if caption else 0)
    height = top + len(rows) * row_h
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for i, line in enumerate(title):
        draw.text((PAD, PAD + i * LINE), line, fill="black", font=font)
    for j, n in enumerate(pools):
        x = label_w + j * (cell + PAD)
        label = column_label(n)
        draw.text(
            (x + cell // 2 - _text_width(draw, label, font) // 2, top - LINE - PAD), label, fill="black", font=font
        )
    for i, reward in enumerate(rows):
        y = top + i * row_h
        draw.text((PAD, y + cell // 2 - LINE // 2), reward, fill="black", font=font)
        for j, n in enumerate(pools):
            x = label_w + j * (cell + PAD)
            with Image.open(io.BytesIO(image_of(reward, n))) as im:
                tile = im.convert("RGB").resize((cell, cell), Image.NEAREST if im.width < cell else Image.BICUBIC)
            grid.paste(tile, (x, y))
            if caption:
                text = _fit(draw, caption(reward, n), font, cell)
                draw.text(
                    (x + cell // 2 - _text_width(draw, text, font) // 2, y + cell + 1), text, fill="black", font=font
                )
    return grid


def save_grid(grid: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    grid.save(tmp, format="PNG")
    tmp.replace(path)
    return path
