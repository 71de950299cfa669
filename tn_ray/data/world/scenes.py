"""Scenes of 1-6 coloured shapes on a 3 x 3 grid, and their PIL rendering (32-128 px).

A scene is its description: each object has a shape, a colour and a grid cell (row, col);
no two objects share a cell, so counts and left/right/above/below are unambiguous in the
picture. Rendering jitters each object inside its cell (seeded) and never lets it leave it.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {"red": (215, 35, 35), "green": (30, 160, 60), "blue": (40, 70, 220),
                                           "yellow": (230, 195, 20)}
SHAPES = ("circle", "square", "triangle")
GRID = 3
CELLS = GRID * GRID
MAX_OBJECTS = 6
BACKGROUND = (242, 240, 232)
MIN_SIZE, MAX_SIZE = 32, 128


@dataclass(frozen=True, order=True)
class Obj:
    """One object: its shape, colour and grid cell (0..8, row-major)."""

    shape: str
    color: str
    cell: int

    @property
    def row(self) -> int:
        return self.cell // GRID

    @property
    def col(self) -> int:
        return self.cell % GRID

    @property
    def key(self) -> tuple[str, str]:
        return self.color, self.shape


@dataclass(frozen=True)
class Scene:
    """A set of objects in distinct cells (kept sorted by cell, so equal scenes compare equal)."""

    objects: tuple[Obj, ...]

    def __post_init__(self):
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share a cell: {cells}")
        if not 0 <= len(cells) <= MAX_OBJECTS:
            raise ValueError(f"a scene holds 0..{MAX_OBJECTS} objects, got {len(cells)}")
        bad = [o for o in self.objects if o.shape not in SHAPES or o.color not in COLORS or not 0 <= o.cell < CELLS]
        if bad:
            raise ValueError(f"invalid object {bad[0]}")
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda o: o.cell)))

    def counts(self) -> Counter:
        """(colour, shape) -> number of objects."""
        return Counter(o.key for o in self.objects)

    def of(self, color: str, shape: str) -> list[Obj]:
        return [o for o in self.objects if o.key == (color, shape)]

    def to_dict(self) -> list[dict]:
        return [{"shape": o.shape, "color": o.color, "row": o.row, "col": o.col} for o in self.objects]


def place(keys: list[tuple[str, str]], cells: list[int]) -> Scene:
    """A scene with object ``i`` of (colour, shape) ``keys[i]`` in ``cells[i]``."""
    return Scene(tuple(Obj(shape=s, color=c, cell=int(cell)) for (c, s), cell in zip(keys, cells)))


def geometry(size: int) -> tuple[float, float, float]:
    """(cell side, object half-width, largest jitter) in pixels for an image of ``size``."""
    cell = size / GRID
    return cell, 0.3 * cell, 0.12 * cell


def render(scene: Scene, size: int = 64, seed: int = 0) -> Image.Image:
    """The scene as an RGB image of ``size`` px; ``seed`` only moves objects inside their cells."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"image size must be {MIN_SIZE}..{MAX_SIZE} px, got {size}")
    rng = np.random.default_rng(seed)
    cell, r, jit = geometry(size)
    im = Image.new("RGB", (size, size), BACKGROUND)
    d = ImageDraw.Draw(im)
    for o in scene.objects:
        dx, dy = rng.uniform(-jit, jit, size=2)
        x, y = (o.col + 0.5) * cell + dx, (o.row + 0.5) * cell + dy
        fill = COLORS[o.color]
        if o.shape == "circle":
            d.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif o.shape == "square":
            d.rectangle([x - r, y - r, x + r, y + r], fill=fill)
        else:
            d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    return im
