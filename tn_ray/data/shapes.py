"""A small labelled benchmark in TIA2's layout of counted and composed shapes (tests and the reward-learning benchmark).

Images of coloured shapes drawn with PIL; prompts that count them ("a photo of three red
circles") or compose them ("a photo of a red circle and a blue square"); three simulated
annotators label a pair good when the image matches the prompt (with 10% label noise); the
contrastive sets change the count, the colour or the shape, like TIA2's released sets.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

NUMBERS = ["one", "two", "three", "four"]
COLORS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60)}
SHAPES = ["circle", "square"]


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def count_prompt(n: int, color: str, shape: str) -> str:
    return f"a photo of {NUMBERS[n - 1]} {color} {_plural(shape, n)}"


def _draw(rng: np.random.Generator, objects: list[tuple[str, str]], size: int) -> Image.Image:
    im = Image.new("RGB", (size, size), (245, 245, 240))
    d = ImageDraw.Draw(im)
    r = size // 9
    for color, shape in objects:
        x, y = rng.integers(r, size - r, size=2)
        box = [x - r, y - r, x + r, y + r]
        (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLORS[color])
    return im


def _labels(rng: np.random.Generator, match: bool) -> list[int]:
    labels = [int(match) if rng.random() > 0.1 else int(not match) for _ in range(3)]
    if rng.random() < 0.05:
        labels[rng.integers(3)] = -1
    return labels


def make(root: Path, images_per_prompt: int = 12, size: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """Write labels and prompt sets under ``root/tia2`` and images under ``root/images``."""
    rng = np.random.default_rng(seed)
    tia2_dir, img_dir = root / "tia2", root / "images"
    for sub in ("human_annotations", "prompts"):
        (tia2_dir / sub).mkdir(parents=True, exist_ok=True)
    specs = {
        "counting": [
            (n, c, s)
            for n, c, s in [(1, "red", "circle"), (2, "blue", "square"), (3, "green", "circle"), (4, "red", "square")]
        ],
        "composition": [
            (("red", "circle"), ("blue", "square")),
            (("green", "square"), ("red", "circle")),
            (("blue", "circle"), ("green", "square")),
        ],
    }
    for set_name, prompts in specs.items():
        labels, sets = {}, {}
        (img_dir / set_name).mkdir(parents=True, exist_ok=True)
        for p, spec in enumerate(prompts):
            if set_name == "counting":
                n, color, shape = spec
                x0 = count_prompt(n, color, shape)
                other = [c for c in COLORS if c != color][0]
                sets[x0] = [count_prompt(m, color, shape) for m in range(1, 5) if m != n] + [
                    count_prompt(n, other, shape)
                ]
            else:
                (c1, s1), (c2, s2) = spec
                x0 = f"a photo of a {c1} {s1} and a {c2} {s2}"
                sets[x0] = [
                    f"a photo of two {c1} {s1}s and a {c2} {s2}",
                    f"a photo of a {c2} {s1} and a {c1} {s2}",
                    f"a photo of a {c1} {s1}",
                    f"a photo of a {c2} {s2}",
                ]
            for q in range(images_per_prompt):
                match = q % 2 == 0
                if set_name == "counting":
                    k = n if match else int(rng.choice([m for m in range(1, 5) if m != n]))
                    objects = [(color, shape)] * k
                else:
                    objects = [(c1, s1), (c2, s2)] if match else [(c1, s1)] * int(rng.integers(1, 3))
                name = f"image_{p}_{q}_0.jpg"
                _draw(rng, objects, size).save(img_dir / set_name / name, quality=90)
                labels[name] = {"image": name, "caption": x0, "human_labels": _labels(rng, match)}
        (tia2_dir / "human_annotations" / f"human_labels_{set_name}.json").write_text(json.dumps(labels, indent=1))
        (tia2_dir / "prompts" / f"prompt_set_{set_name}.json").write_text(json.dumps(sets, indent=1))
    return tia2_dir, img_dir
