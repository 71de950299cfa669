"""Read an image of the world back into its scene, exactly, or say why it cannot be read.

Exact on the renderer's images, and tolerant of the soft edges and colour shifts of the world
generator's autoencoder, without trading a fault for a wrong scene. Every pixel is compared with the
palette (``scenes.BACKGROUND`` and the four ``scenes.COLORS``):

- *background*: within ``BG_TOLERANCE`` of the background colour, or a colourless shift of it (within
  ``BG_SHIFT``, less than ``BG_MIX`` of the way towards its nearest colour);
- *full* (object) pixel of colour k: on the segment from the background to colour k (within
  ``COLOR_TOLERANCE`` of it) at a mix of at least ``FULL_MIX``;
- *partial* pixel: on such a segment at a smaller mix (a soft edge, or a faint object);
- *off-palette*: anything else.

A partial or off-palette pixel is an *edge* of an object of colour k when a full pixel of colour k lies
within ``EDGE_REACH`` px (Chebyshev) and the pixel within ``EDGE_TOLERANCE`` of k's segment; a partial
pixel under ``FAINT_EDGE_MIX`` within ``EDGE_REACH`` px of any full pixel, and an off-palette pixel
touching one, are edges too. Other partial and off-palette pixels are *stray*. Isolated stray pixels
(none of their 8 neighbours stray), up to ``STRAY_FRACTION`` of the image, are noise; two that touch, or
more, make the image unparseable, so a faint or half-drawn object is never silently dropped.

Each grid cell is read from the pixels whose centres lie in it. A cell without full pixels is empty.
Otherwise its object must be: of one colour (full pixels of one palette colour); about the rendered
size (the bounding box of its full pixels and of its edges at least ``BOX_MIX`` of the way to its
colour: sides ``floor(2 r) + 1`` or ``+ 2`` px, r from ``scenes.geometry``, give or take ``SIZE_SLACK``);
centred within the renderer's jitter of the cell centre (plus ``CENTRE_SLACK``); and one shape. The
ideal circle (an ellipse), square (a rectangle) and triangle are each inscribed in every box the renderer
could have drawn near the measured one (sides ``floor(2 r) + 1`` or ``+ 2``, each starting within 1 px
of the measured box's), and pixels further than ``BAND`` px from a shape's outline vote: *inside* are the
object's full pixels and its edges at least ``IN_MIX`` of the way to its colour, *outside* are pixels
(background included, the cell's neighbours' pixels too) less than ``OUT_MIX`` of the way. A shape fits
when, in one of its boxes, no vote disagrees with it, or only one while every other shape has at least
``LONE_MISS`` against it in each of its boxes; exactly one shape must fit. Pixels that are not full but
touch a full pixel of another cell (its blur) do not vote or count in the box, and the image's outermost
rows and columns (which an autoencoder fades) cast no *outside* votes. On clean renders this is exact
(``tests/test_world_judge.py`` reads 10,000 random scenes back at every size), and round trips through
the world generator's autoencoder read back (``test_autoencoder_round_trips_read_back``).

Everything is vectorised over a batch of images of one size and over the nine cells; only the reasons
of unparseable images are written in Python.
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
BG_SHIFT, BG_MIX = 40.0, 0.1  # ... and a colourless shift (within BG_SHIFT, under BG_MIX towards every colour)
COLOR_TOLERANCE = 60.0  # RGB distance from a background-to-colour segment still read as that colour
EDGE_TOLERANCE = 80.0  # ... for a pixel beside an object of that colour (its edge: soft or colour-shifted)
FULL_MIX = 0.75  # a pixel at least this far from the background towards its colour is a full object pixel
EDGE_REACH = 2  # px: partial and off-palette pixels this close to an object's full pixels may be its edge
FAINT_EDGE_MIX = 0.3  # a partial pixel less far than this is an edge beside an object of any colour
BOX_MIX = 0.4  # edge pixels at least this far towards the object's colour count in its bounding box
IN_MIX = 0.5  # ... and as inside the object for the shape tests
OUT_MIX = 0.15  # pixels less far than this towards the object's colour count as outside it
STRAY_FRACTION = 0.005  # isolated stray pixels tolerated, as a fraction of the image's pixels
BAND = 0.42  # px: pixels closer than this to an ideal shape's outline may fall either way
LONE_MISS = 4  # a shape that all but one pixel agrees with fits if every other shape misses this many
SIZE_SLACK = 2  # px: a bounding box may be this much smaller or larger than the rendered one (soft edges)
CENTRE_SLACK = 1.0  # px beyond the renderer's largest jitter that an object's centre may lie

_NAMES = tuple(COLORS)
_BG = np.array(BACKGROUND, dtype=np.float32)
_V = np.array([COLORS[c] for c in _NAMES], dtype=np.float32) - _BG  # (4, 3) background -> colour
_V2 = (_V**2).sum(1)
BG, FULL, PART, OFF = 0, 1, 2, 3  # pixel classes
_PIXELS_PER_STEP = 1 << 14  # images per vectorised step: about this many pixels (bounds memory, stays in cache)
_GEMM_SINGLE = 200_000  # multiply-adds per matrix product: OpenBLAS keeps smaller ones on one thread (fast when loaded)


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


@dataclass(frozen=True)
class _Pixels:
    """Per pixel of a batch (N, S, S): its class, nearest palette colour and mix towards it (colour and mix
    are 0 on background pixels); and, as 4-bit masks over the palette colours k (bit k), whether it lies
    within EDGE_TOLERANCE of k's segment (``near``; never on background), and whether its mix towards k
    is at least BOX_MIX (``box``), at least IN_MIX (``inside``) or under OUT_MIX (``low``)."""

    cls: np.ndarray
    color: np.ndarray
    mix: np.ndarray
    near: np.ndarray
    box: np.ndarray
    inside: np.ndarray
    low: np.ndarray


_BITS = (1 << np.arange(len(_NAMES))).astype(np.uint8)
_ALL = np.uint8(_BITS.sum())


def classify(batch: np.ndarray) -> _Pixels:
    """Each pixel of (N, S, S, 3) uint8 compared with the palette (the module doc)."""
    key = _pack(batch)
    cls = np.zeros(key.shape, dtype=np.int8)  # BG
    color = np.zeros(key.shape, dtype=np.int8)
    mix = np.zeros(key.shape, dtype=np.float32)
    near = np.zeros(key.shape, dtype=np.uint8)
    box = np.zeros(key.shape, dtype=np.uint8)
    inside = np.zeros(key.shape, dtype=np.uint8)
    low = np.full(key.shape, _ALL, dtype=np.uint8)
    rest = key != _KEYS[0]
    for k in range(len(_NAMES)):  # exact palette colours (every pixel of a clean render): no arithmetic
        exact = key == _KEYS[k + 1]
        cls[exact], color[exact], mix[exact] = FULL, k, 1.0
        near[exact] = box[exact] = inside[exact] = _BITS[k]
        low[exact] = 0
        rest &= ~exact
    if rest.any():
        d = batch[rest].astype(np.float32) - _BG  # (M, 3)
        dist2 = (d * d).sum(-1)
        dots = d @ _V.T  # (M, 4)
        m_all = np.clip(dots / _V2, 0.0, 1.0)
        res2_all = dist2[:, None] - m_all * (2 * dots - m_all * _V2)  # squared distance from each segment
        k = res2_all.argmin(-1)
        best = np.arange(len(k))
        m, r2 = m_all[best, k], res2_all[best, k]
        c = np.where(r2 <= COLOR_TOLERANCE**2, np.where(m >= FULL_MIX, FULL, PART), OFF)
        bg = (dist2 <= BG_TOLERANCE**2) | ((dist2 <= BG_SHIFT**2) & (m < BG_MIX))
        c[bg] = BG
        cls[rest], color[rest], mix[rest] = c, np.where(bg, 0, k), np.where(bg, 0.0, m)
        colour = ~bg[:, None]
        near[rest] = _bits((res2_all <= EDGE_TOLERANCE**2) & colour)
        box[rest] = _bits((m_all >= BOX_MIX) & colour)
        inside[rest] = _bits((m_all >= IN_MIX) & colour)
        low[rest] = _bits((m_all < OUT_MIX) | ~colour)
    return _Pixels(cls, color, mix, near, box, inside, low)


def _bits(flags: np.ndarray) -> np.ndarray:
    """(..., 4) bool -> (...) uint8 with bit k set where flag k is."""
    return np.packbits(flags, axis=-1, bitorder="little")[..., 0]


def _neighbours(mask: np.ndarray) -> np.ndarray:
    """Whether any of each pixel's 8 neighbours is set (the pixel itself not counted); (N, S, S)."""
    n, s, _ = mask.shape
    p = np.zeros((n, s + 2, s + 2), dtype=bool)
    p[:, 1:-1, 1:-1] = mask
    rows = p[:, :-2] | p[:, 1:-1] | p[:, 2:]  # (N, S, S + 2): the pixel's column of three
    out = rows[:, :, :-2] | rows[:, :, 2:] | p[:, :-2, 1:-1] | p[:, 2:, 1:-1]
    return out


def _dilate(mask: np.ndarray, reach: int) -> np.ndarray:
    """OR of each pixel's (2 reach + 1)^2 neighbourhood, itself included, of a bool or bit-mask (N, S, S) array."""
    n, s, _ = mask.shape
    p = np.zeros((n, s + 2 * reach, s + 2 * reach), dtype=mask.dtype)
    p[:, reach : reach + s, reach : reach + s] = mask
    rows = p[:, :s, :].copy()
    for d in range(1, 2 * reach + 1):
        rows |= p[:, d : d + s, :]
    out = rows[:, :, :s].copy()
    for d in range(1, 2 * reach + 1):
        out |= rows[:, :, d : d + s]
    return out


@cache
def _cell_map(size: int) -> np.ndarray:
    """(S + 2, S + 2): the cell (0..8) of each pixel of an image of ``size`` px, -1 on a frame around it."""
    lay = layout(size)
    band = np.zeros(size, dtype=int)
    for j in range(GRID):
        band[lay.starts[j] : lay.stops[j]] = j
    out = np.full((size + 2, size + 2), -1)
    out[1:-1, 1:-1] = band[:, None] * GRID + band[None, :]
    return out


def _beside_other_cell(full: np.ndarray) -> np.ndarray:
    """Whether one of each pixel's 8 neighbours is a full pixel of another cell; (N, S, S)."""
    size = full.shape[-1]
    cell = _cell_map(size)
    p = np.zeros((full.shape[0], size + 2, size + 2), dtype=bool)
    p[:, 1:-1, 1:-1] = full
    own = cell[1:-1, 1:-1]
    out = np.zeros(full.shape, dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                other = cell[1 + dy : size + 1 + dy, 1 + dx : size + 1 + dx] != own
                out |= p[:, 1 + dy : size + 1 + dy, 1 + dx : size + 1 + dx] & other
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


def _distances(cy: np.ndarray, cx: np.ndarray, ry: np.ndarray, rx: np.ndarray, w: int) -> np.ndarray:
    """Signed distance (px, < 0 inside) of each pixel of a ``w`` x ``w`` grid from the ideal circle (an
    ellipse, its distance measured along the ray from its centre), square (a rectangle) and triangle (apex
    up, as wide as high) of half-height ``ry`` and half-width ``rx`` centred at (cy, cx), each (T,);
    (T, 3, w, w)."""
    grid = np.arange(w, dtype=np.float32)
    dy = grid[None, :, None] - cy[:, None, None]
    dx = np.abs(grid[None, None, :] - cx[:, None, None])
    a, b = ry[:, None, None], rx[:, None, None]
    q = np.sqrt((dy / a) ** 2 + (dx / b) ** 2)  # 1 on the ellipse
    circle = np.where(q > 0, np.sqrt(dy**2 + dx**2) * (1 - 1 / np.maximum(q, 1e-6)), -np.minimum(a, b))
    square = np.maximum(np.abs(dy) - a, dx - b)
    r = (a + b) / 2  # the triangle's box is as near square as PIL's polygons: one half-side fits them best
    triangle = np.maximum(dy - r, (2 * dx - dy - r) / np.sqrt(5.0))
    return np.stack([circle, square, triangle], axis=1)


@dataclass(frozen=True)
class _Templates:
    """Per image size: each shape inscribed in each candidate box, as masks over a patch of ``side`` px
    whose corner lies 2 px above and left of a measured bounding box's."""

    side: int
    outside: np.ndarray  # (side * side, T) float32: the pixel lies further than BAND outside the shape
    inside: np.ndarray  # (side * side, T) float32: further than BAND inside it
    shape: np.ndarray  # (T,) each candidate's shape index


@cache
def _templates(size: int, band: float) -> _Templates:
    lo, hi = layout(size).sides
    side = hi + 4
    starts = np.array([1, 2, 3])  # the measured box's top (left) - 1, + 0, + 1, in patch coordinates
    ty, hy, tx, hx = (a.ravel() for a in np.meshgrid(starts, [lo, hi], starts, [lo, hi], indexing="ij"))
    f = np.float32
    sd = _distances(
        (ty + (hy - 1) / 2).astype(f), (tx + (hx - 1) / 2).astype(f), (hy / 2).astype(f), (hx / 2).astype(f), side
    )
    sd = sd.transpose(1, 0, 2, 3).reshape(3 * len(ty), side * side)  # (T, side^2), shape-major
    return _Templates(
        side=side,
        outside=np.ascontiguousarray((sd > band).T.astype(np.float32)),
        inside=np.ascontiguousarray((sd < -band).T.astype(np.float32)),
        shape=np.repeat(np.arange(3), len(ty)),
    )


def _read_batch(batch: np.ndarray, lay: _Layout) -> list[Reading]:
    n, w, size = batch.shape[0], lay.width, lay.size
    px = classify(batch)
    cls = px.cls
    full, part = cls == FULL, cls == PART
    full_bits = np.where(full, _BITS[px.color], 0).astype(np.uint8)  # bit k: a full pixel of colour k
    around = _dilate(full_bits, EDGE_REACH)  # the colours of the full pixels within EDGE_REACH
    edge_bits = np.where(full, 0, around & px.near)  # bit k: an edge of an object of colour k
    edge = (edge_bits > 0) | (part & (px.mix < FAINT_EDGE_MIX) & (around > 0)) | ((cls == OFF) & _neighbours(full))
    stray = ((cls == OFF) | part) & ~edge
    clumped = stray & _neighbours(stray)
    votes = np.where(_beside_other_cell(full) & ~full, 0, 1).astype(np.uint8)  # another cell's blur decides nothing
    boxed = (full_bits | (edge_bits & px.box)) * votes  # bit k: in the bounding box of an object of colour k
    inside = (full_bits | (edge_bits & px.inside)) * votes  # ... inside it, for the shape tests
    outside = px.low * votes  # ... outside it
    outside[:, [0, -1], :] = 0  # an autoencoder fades the image's outermost rows and columns: they show no outside
    outside[:, :, [0, -1]] = 0

    code = cls.astype(np.uint32) | (px.color.astype(np.uint32) << 2) | (stray.astype(np.uint32) << 4)
    code |= (clumped.astype(np.uint32) << 5) | (boxed.astype(np.uint32) << 8)
    code |= (inside.astype(np.uint32) << 12) | (outside.astype(np.uint32) << 16)
    c_code = _cells(code, lay, 0)  # one gather of everything a cell needs
    c_full = (c_code & 3) == FULL
    c_color = (c_code >> 2) & 3
    c_clump = (c_code & 32) > 0

    per_color = np.stack([(c_full & (c_color == k)).sum((2, 3)) for k in range(len(_NAMES))], -1)  # (N, 9, 4)
    present = per_color.sum(-1) > 0
    n_colors = (per_color > 0).sum(-1)
    obj_color = per_color.argmax(-1)
    c_obj = ((c_code >> (8 + obj_color[..., None, None].astype(np.uint32))) & 1) > 0

    rows, cols = c_obj.any(3), c_obj.any(2)  # (N, 9, W)
    y0, x0 = rows.argmax(-1), cols.argmax(-1)
    y1, x1 = w - 1 - rows[..., ::-1].argmax(-1), w - 1 - cols[..., ::-1].argmax(-1)
    h, wd = y1 - y0 + 1, x1 - x0 + 1
    cy, cx = (y0 + y1) / 2.0, (x0 + x1) / 2.0
    lo, hi = lay.sides
    size_ok = (np.minimum(h, wd) >= lo - SIZE_SLACK) & (np.maximum(h, wd) <= hi + SIZE_SLACK)

    grid_r = np.arange(GRID * GRID) // GRID
    grid_c = np.arange(GRID * GRID) % GRID
    off_y = cy + lay.starts[grid_r] - lay.centres[grid_r]
    off_x = cx + lay.starts[grid_c] - lay.centres[grid_c]
    centred = (np.abs(off_y) <= lay.max_offset) & (np.abs(off_x) <= lay.max_offset)

    passes = np.zeros((n, GRID * GRID, len(SHAPES)), dtype=bool)
    ii, cc = np.nonzero(present & (n_colors == 1) & size_ok & centred)
    if len(ii):  # the shapes, on a patch around each object's bounding box
        tpl = _templates(size, BAND)
        span = np.arange(tpl.side) - 2
        r0, c0 = lay.starts[grid_r[cc]][:, None], lay.starts[grid_c[cc]][:, None]
        ys = r0 + y0[ii, cc, None] + span  # (M, side), image coordinates
        xs = c0 + x0[ii, cc, None] + span
        own = ((ys >= r0) & (ys < lay.stops[grid_r[cc]][:, None]))[:, :, None] & (
            (xs >= c0) & (xs < lay.stops[grid_c[cc]][:, None])
        )[:, None, :]  # the cell's own pixels: beyond them, pixels can only show the object's outside
        seen = ((ys >= 0) & (ys < size))[:, :, None] & ((xs >= 0) & (xs < size))[:, None, :]
        patch = code[ii[:, None, None], np.clip(ys, 0, size - 1)[:, :, None], np.clip(xs, 0, size - 1)[:, None, :]]
        k = obj_color[ii, cc][:, None, None].astype(np.uint32)
        p_in = (own & ((patch >> (12 + k)) & 1 > 0)).reshape(len(ii), -1).astype(np.float32)
        p_out = (seen & ((patch >> (16 + k)) & 1 > 0)).reshape(len(ii), -1).astype(np.float32)
        viol = np.empty((len(ii), len(tpl.shape)), dtype=np.float32)
        step = max(1, _GEMM_SINGLE // (tpl.side**2 * len(tpl.shape)))  # small products: one BLAS thread
        for j in range(0, len(ii), step):
            viol[j : j + step] = p_in[j : j + step] @ tpl.outside + p_out[j : j + step] @ tpl.inside
        best = np.stack([viol[:, tpl.shape == s].min(1) for s in range(len(SHAPES))], 1)  # (M, 3)
        fit = best == 0
        ranked = np.sort(best, 1)
        fit |= (best == 1) & (ranked[:, :1] == 1) & (ranked[:, 1:2] >= LONE_MISS)
        passes[ii, cc] = fit
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
        if not passing and max(h, wd) < lo:
            return f"{_where(c)}: an object too small/faint to count ({wd}x{h} px; objects are {lo}-{hi} px)"
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
