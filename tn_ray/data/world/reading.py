"""Read an image of the world back into its scene, exactly, or say why it cannot be read.

Every pixel is compared with the palette (``scenes.BACKGROUND`` and the four ``scenes.COLORS``):

- *background*: within ``BG_TOLERANCE`` of the background colour;
- *full* (object) pixel of colour k: on the segment from the background to colour k (within
  ``COLOR_TOLERANCE`` of it) at a mix of at least ``FULL_MIX``;
- *partial* pixel: on such a segment at a smaller mix (an anti-aliased or blurred edge, or a faint
  object). It is an edge when a full pixel is among its 8 neighbours, else *faint*;
- *off-palette*: anything else.

Faint and off-palette pixels are *stray*. Isolated stray pixels (none of their 8 neighbours
stray), up to ``STRAY_FRACTION`` of the image, are noise; two that touch, or more, make the image
unparseable, so a faint or half-drawn object is never silently dropped.

Each grid cell is read from the pixels whose centres lie in it. A cell without full pixels is
empty. Otherwise its object must be: of one colour (full pixels of one palette colour); of the
rendered size (bounding box side ``floor(2 r) + 1`` or ``+ 2`` px, r from ``scenes.geometry``);
centred within the renderer's jitter of the cell centre (plus ``CENTRE_SLACK``); and one shape:
the ideal circle, square or triangle inscribed in its bounding box must explain every pixel
further than ``BAND`` px from its outline (full pixels inside it, background pixels outside it;
edge and stray pixels decide nothing). Exactly one shape must pass. On clean renders this is
exact (``tests/test_world_judge.py`` reads 10,000 random scenes back at every size).

Everything is vectorised over a batch of images of one size and over the nine cells; only the
reasons of unparseable images are written in Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from tn_ray.data.world.scenes import (
    BACKGROUND,
    COLORS,
    GRID,
    MAX_OBJECTS,
    MAX_SIZE,
    MIN_SIZE,
    SHAPES,
    Obj,
    Scene,
    geometry,
)
from tn_ray.errors import InputError

BG_TOLERANCE = 24.0  # RGB distance from the background still read as background
COLOR_TOLERANCE = 40.0  # RGB distance from a background-to-colour segment still read as that colour
FULL_MIX = 0.75  # a pixel at least this far from the background towards its colour is a full object pixel
OBJECT_MIX = 0.5  # a partial pixel at least this far counts in the object's bounding box
STRAY_FRACTION = 0.005  # isolated stray pixels tolerated, as a fraction of the image's pixels
BAND = 0.42  # px: pixels closer than this to an ideal shape's outline may fall either way
CENTRE_SLACK = 1.0  # px beyond the renderer's largest jitter that an object's centre may lie

_NAMES = tuple(COLORS)
_BG = np.array(BACKGROUND, dtype=np.float32)
_V = np.array([COLORS[c] for c in _NAMES], dtype=np.float32) - _BG  # (4, 3) background -> colour
_V2 = (_V**2).sum(1)
BG, FULL, PART, OFF = 0, 1, 2, 3  # pixel classes
_PIXELS_PER_STEP = 1 << 14  # images per vectorised step: about this many pixels (bounds memory, stays in cache)


@dataclass(frozen=True)
class Reading:
    """What an image shows: its scene, or (``scene`` None) the ``problem`` that makes it unparseable.

    ``objects`` holds every object read when the image parses; a picture of more than
    ``MAX_OBJECTS`` well-formed objects parses (``problem`` None) but is no scene (``scene`` None).
    """

    scene: Scene | None
    problem: str | None
    objects: tuple[Obj, ...] = ()

    @property
    def parsed(self) -> bool:
        return self.problem is None


@dataclass(frozen=True)
class _Layout:
    """Per image size: the pixel windows of the grid cells and the rules' constants."""

    size: int
    starts: np.ndarray  # (3,) first pixel of each row/column band
    stops: np.ndarray  # (3,) one past the last
    width: int  # the widest band
    centres: np.ndarray  # (3,) cell centres in pixel-index coordinates
    sides: tuple[int, int]  # allowed bounding-box sides, inclusive
    max_offset: float  # largest distance (per axis) of an object's centre from its cell's
    stray_limit: int


@cache
def layout(size: int) -> _Layout:
    """The cells' pixels and the allowed object sides and offsets for images of ``size`` px."""
    cell, r, jit = geometry(size)
    centres_px = np.arange(size) + 0.5
    band = np.minimum((centres_px // cell).astype(int), GRID - 1)  # the cell holding each pixel's centre
    starts = np.array([np.argmax(band == j) for j in range(GRID)])
    stops = np.array([size - np.argmax(band[::-1] == j) for j in range(GRID)])
    low = int(np.floor(2 * r)) + 1
    return _Layout(
        size=size,
        starts=starts,
        stops=stops,
        width=int((stops - starts).max()),
        # PIL's pixel i covers [i, i + 1): the drawn centre x lies at pixel-index coordinate x - 0.5
        centres=(np.arange(GRID) + 0.5) * cell - 0.5,
        sides=(low, low + 1),
        max_offset=jit + CENTRE_SLACK,
        stray_limit=int(STRAY_FRACTION * size * size),
    )


def as_array(image: Any) -> np.ndarray:
    """An image as an (S, S, 3) uint8 array; :class:`InputError` for any other size or layout."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        arr = np.asarray(image.convert("RGB"))
    else:
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise InputError(
                f"cannot read a world image from an array of shape {arr.shape} and dtype {arr.dtype}: "
                "expected an RGB PIL image or an H x W x 3 uint8 array"
            )
    h, w = arr.shape[:2]
    if h != w or not MIN_SIZE <= h <= MAX_SIZE:
        raise InputError(f"world image of {w}x{h} px: the world's images are square, {MIN_SIZE}..{MAX_SIZE} px a side")
    return arr


def read_scene(image: Any) -> Reading:
    """The scene an image shows (see the module doc), or why it is unparseable."""
    return read_scenes([image])[0]


def read_scenes(images: Sequence[Any]) -> list[Reading]:
    """:func:`read_scene` of each image, vectorised over the images of each size."""
    arrays = [as_array(im) for im in images]
    out: list[Reading | None] = [None] * len(arrays)
    by_size: dict[int, list[int]] = {}
    for i, a in enumerate(arrays):
        by_size.setdefault(a.shape[0], []).append(i)
    for size, idx in by_size.items():
        step = max(1, _PIXELS_PER_STEP // (size * size))
        for k in range(0, len(idx), step):
            part = idx[k : k + step]
            for i, reading in zip(part, _read_batch(np.stack([arrays[i] for i in part]), layout(size))):
                out[i] = reading
    return out  # type: ignore[return-value]


# --- the vectorised steps ----------------------------------------------------------------
def _pack(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> (...) uint32 keys, one per colour."""
    return (rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8) | rgb[..., 2]


_KEYS = _pack(np.array([BACKGROUND, *(COLORS[c] for c in _NAMES)], dtype=np.uint8))


def classify(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pixel of (N, S, S, 3) uint8: class (BG/FULL/PART/OFF), palette colour index, mix in [0, 1]
    (colour and mix are 0 on background pixels)."""
    key = _pack(batch)
    cls = np.zeros(key.shape, dtype=np.int8)  # BG
    color = np.zeros(key.shape, dtype=np.int8)
    mix = np.zeros(key.shape, dtype=np.float32)
    rest = key != _KEYS[0]
    for k in range(len(_NAMES)):  # exact palette colours (every pixel of a clean render): no arithmetic
        exact = key == _KEYS[k + 1]
        cls[exact], color[exact], mix[exact] = FULL, k, 1.0
        rest &= ~exact
    if rest.any():
        d = batch[rest].astype(np.float32) - _BG  # (M, 3)
        dist2 = (d * d).sum(-1)
        dots = d @ _V.T  # (M, 4)
        m = np.clip(dots / _V2, 0.0, 1.0)
        res2 = dist2[:, None] - m * (2 * dots - m * _V2)
        k = res2.argmin(-1)
        best = np.arange(len(k))
        m, r2 = m[best, k], res2[best, k]
        c = np.where(r2 <= COLOR_TOLERANCE**2, np.where(m >= FULL_MIX, FULL, PART), OFF)
        c[dist2 <= BG_TOLERANCE**2] = BG
        cls[rest], color[rest], mix[rest] = c, np.where(c == BG, 0, k), np.where(c == BG, 0.0, m)
    return cls, color, mix


def _neighbours(mask: np.ndarray) -> np.ndarray:
    """Whether any of each pixel's 8 neighbours is set (the pixel itself not counted); (N, S, S)."""
    n, s, _ = mask.shape
    p = np.zeros((n, s + 2, s + 2), dtype=bool)
    p[:, 1:-1, 1:-1] = mask
    rows = p[:, :-2] | p[:, 1:-1] | p[:, 2:]  # (N, S, S + 2): the pixel's column of three
    out = rows[:, :, :-2] | rows[:, :, 2:] | p[:, :-2, 1:-1] | p[:, 2:, 1:-1]
    return out


def _cells(x: np.ndarray, lay: _Layout, fill: int) -> np.ndarray:
    """(N, S, S) -> (N, 9, W, W): each cell's window, padded with ``fill`` beyond its band."""
    w = lay.width
    idx = lay.starts[:, None] + np.arange(w)[None, :]  # (3, W)
    valid = idx < lay.stops[:, None]
    idx = np.minimum(idx, lay.size - 1)
    out = x[:, idx[:, None, :, None], idx[None, :, None, :]]  # (N, 3, 3, W, W)
    keep = valid[:, None, :, None] & valid[None, :, None, :]
    out = np.where(keep, out, fill)
    return out.reshape(x.shape[0], GRID * GRID, w, w)


def _distances(cy: np.ndarray, cx: np.ndarray, rho: np.ndarray, w: int) -> np.ndarray:
    """Signed distance (px, < 0 inside) of each pixel of a ``w`` x ``w`` grid from the ideal circle,
    square and triangle (apex up) of half-side ``rho`` centred at (cy, cx), each (N, 9); (N, 9, 3, w, w)."""
    grid = np.arange(w, dtype=np.float32)
    dy = grid[None, None, :, None] - cy[..., None, None]
    dx = grid[None, None, None, :] - cx[..., None, None]
    r = rho[..., None, None]
    circle = np.sqrt(dy**2 + dx**2) - r
    square = np.maximum(np.abs(dy), np.abs(dx)) - r
    side = (2 * np.abs(dx) - dy - r) / np.sqrt(5.0)
    triangle = np.maximum(dy - r, side)
    return np.stack([circle, square, triangle], axis=2)


def _read_batch(batch: np.ndarray, lay: _Layout) -> list[Reading]:
    n, w = batch.shape[0], lay.width
    cls, color, mix = classify(batch)
    full = cls == FULL
    stray = (cls == OFF) | ((cls == PART) & ~_neighbours(full))
    clumped = stray & _neighbours(stray)
    obj = full | ((cls == PART) & (mix >= OBJECT_MIX) & ~stray)

    code = cls | (color << 2) | (obj.astype(np.int8) << 4) | (stray.astype(np.int8) << 5)
    code |= clumped.astype(np.int8) << 6
    c_code = _cells(code, lay, BG)  # one gather of everything a cell needs
    c_cls, c_color = c_code & 3, (c_code >> 2) & 3
    c_full = c_cls == FULL
    c_obj, c_clump = (c_code & 16) > 0, (c_code & 64) > 0

    per_color = np.stack([(c_full & (c_color == k)).sum((2, 3)) for k in range(len(_NAMES))], -1)  # (N, 9, 4)
    present = per_color.sum(-1) > 0
    n_colors = (per_color > 0).sum(-1)
    obj_color = per_color.argmax(-1)

    rows, cols = c_obj.any(3), c_obj.any(2)  # (N, 9, W)
    y0, x0 = rows.argmax(-1), cols.argmax(-1)
    y1, x1 = w - 1 - rows[..., ::-1].argmax(-1), w - 1 - cols[..., ::-1].argmax(-1)
    h, wd = y1 - y0 + 1, x1 - x0 + 1
    cy, cx = (y0 + y1) / 2.0, (x0 + x1) / 2.0
    rho = ((h + wd) / 4.0).astype(np.float32)
    lo, hi = lay.sides
    size_ok = (h >= lo) & (h <= hi) & (wd >= lo) & (wd <= hi)

    grid_r = np.arange(GRID * GRID) // GRID
    grid_c = np.arange(GRID * GRID) % GRID
    off_y = cy + lay.starts[grid_r] - lay.centres[grid_r]
    off_x = cx + lay.starts[grid_c] - lay.centres[grid_c]
    centred = (np.abs(off_y) <= lay.max_offset) & (np.abs(off_x) <= lay.max_offset)

    # the shapes are tested on each cell's bounding box (at most ``hi`` px a side), the only place they differ
    span = np.arange(hi)
    ys = y0[..., None] + span  # (N, 9, hi)
    xs = x0[..., None] + span
    inside = (span < h[..., None])[..., :, None] & (span < wd[..., None])[..., None, :]
    box = c_cls[
        np.arange(n)[:, None, None, None],
        np.arange(GRID * GRID)[None, :, None, None],
        np.minimum(ys, w - 1)[..., :, None],
        np.minimum(xs, w - 1)[..., None, :],
    ]
    box = np.where(inside, box, BG)  # (N, 9, hi, hi)
    local = ((h - 1) / 2.0).astype(np.float32), ((wd - 1) / 2.0).astype(np.float32)
    sd = _distances(*local, rho, hi)  # (N, 9, 3, hi, hi)
    wrong = ((box == FULL)[:, :, None] & (sd > BAND)) | ((box == BG)[:, :, None] & (sd < -BAND))
    violations = wrong.sum((3, 4))  # (N, 9, 3)
    passes = violations == 0
    n_pass = passes.sum(-1)
    shape = passes.argmax(-1)
    fill = c_obj.sum((2, 3)) / np.maximum(h * wd, 1)

    ok_cell = ~present | ((n_colors == 1) & size_ok & centred & (n_pass == 1))
    clumps = c_clump.any((2, 3))
    n_stray = stray.sum((1, 2))
    clean = ok_cell.all(1) & ~clumps.any(1) & (n_stray <= lay.stray_limit)

    facts = {
        "lay": lay,
        "clumps": clumps,
        "n_clump": c_clump.sum((2, 3)),
        "n_stray": n_stray,
        "present": present,
        "per_color": per_color,
        "n_colors": n_colors,
        "h": h,
        "wd": wd,
        "box": (y0, y1, x0, x1),
        "size_ok": size_ok,
        "centred": centred,
        "off": (off_y, off_x),
        "passes": passes,
        "fill": fill,
    }
    out = []
    for i in range(n):
        if not clean[i]:
            out.append(Reading(None, _problem(i, facts), ()))
            continue
        objects = tuple(
            Obj(shape=SHAPES[shape[i, c]], color=_NAMES[obj_color[i, c]], cell=int(c))
            for c in np.flatnonzero(present[i])
        )
        out.append(Reading(Scene(objects) if len(objects) <= MAX_OBJECTS else None, None, objects))
    return out


def _where(c: int) -> str:
    return f"cell ({c // GRID}, {c % GRID})"


def _problem(i: int, v: dict) -> str:
    """The first reason image ``i`` of a batch is unparseable, in words (``v``: the batch's per-cell facts)."""
    lay: _Layout = v["lay"]
    lo, hi = lay.sides
    if v["n_stray"][i] > lay.stray_limit and v["clumps"][i].sum() >= 5:
        return (
            f"{int(v['n_stray'][i])} faint or off-palette pixels all over the image (noise?); at most "
            f"{lay.stray_limit} isolated ones are tolerated"
        )
    for c in range(GRID * GRID):
        if v["clumps"][i, c]:
            k = int(v["n_clump"][i, c])
            if not v["present"][i, c]:
                return f"{_where(c)}: an object too small/faint to count ({k} faint or off-palette pixels together)"
            return (
                f"{_where(c)}: {k} faint or off-palette pixels together beside its object (a blurred, faint or "
                "mixed-colour part)"
            )
        if not v["present"][i, c]:
            continue
        if v["n_colors"][i, c] > 1:
            names = [_NAMES[k] for k in np.flatnonzero(v["per_color"][i, c])]
            return f"{_where(c)}: pixels of two colours ({', '.join(names)})"
        h, wd = int(v["h"][i, c]), int(v["wd"][i, c])
        if not v["size_ok"][i, c]:
            if max(h, wd) < lo:
                return f"{_where(c)}: an object too small/faint to count ({wd}x{h} px; objects are {lo}-{hi} px)"
            if _touches_edge(i, c, v):
                return f"object crosses the boundary of {_where(c)} ({wd}x{h} px of it here; objects are {lo}-{hi} px)"
            return f"{_where(c)}: an object of {wd}x{h} px; objects are {lo}-{hi} px a side"
        if not v["centred"][i, c]:
            dy, dx = (float(a[i, c]) for a in v["off"])
            return (
                f"object crosses the boundary of {_where(c)}: its centre is ({dx:+.1f}, {dy:+.1f}) px from the "
                f"cell's (at most {lay.max_offset:.1f} per axis)"
            )
        passing = [SHAPES[s] for s in np.flatnonzero(v["passes"][i, c])]
        if not passing:
            return f"{_where(c)}: shape not recognised (fill ratio {float(v['fill'][i, c]):.2f})"
        if len(passing) > 1:
            return f"{_where(c)}: shape ambiguous ({' or '.join(passing)}: its edges are too blurred to tell)"
    return f"{int(v['n_stray'][i])} faint or off-palette pixels; at most {lay.stray_limit} isolated ones are tolerated"


def _touches_edge(i: int, c: int, v: dict) -> bool:
    """Whether the cell's object pixels reach the edge of its window towards a neighbouring cell."""
    lay: _Layout = v["lay"]
    r, col = divmod(c, GRID)
    y0, y1, x0, x1 = (int(a[i, c]) for a in v["box"])
    last_y, last_x = int(lay.stops[r] - lay.starts[r]) - 1, int(lay.stops[col] - lay.starts[col]) - 1
    return (
        (r > 0 and y0 == 0)
        or (r < GRID - 1 and y1 == last_y)
        or (col > 0 and x0 == 0)
        or (col < GRID - 1 and x1 == last_x)
    )
