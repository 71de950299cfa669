"""The world's judge (docs/world.md, "The judge: `worldjudge`"): images read back into scenes exactly,
round trips through the world generator's autoencoder read back too, anything half-drawn, faint, mixed
or noisy unparseable rather than misread, verdicts that agree with the oracle, and the ``worldjudge``
reward through the registry."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageFilter

from tn_ray.data.world import grammar, oracle, sampler, scenes
from tn_ray.data.world.judge import STATUSES, judge
from tn_ray.data.world.reading import layout, read_scene, read_scenes
from tn_ray.diffusion.world import package
from tn_ray.errors import InputError
from tn_ray.rewards.registry import available, build
from tn_ray.rewards.units import unit

HYP = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIZES = st.integers(scenes.MIN_SIZE, scenes.MAX_SIZE)
SEEDS = st.integers(0, 2**31 - 1)


def random_scene(rng: np.random.Generator, low: int = 0, high: int = scenes.MAX_OBJECTS) -> scenes.Scene:
    n = int(rng.integers(low, high + 1))
    cells = rng.choice(scenes.CELLS, size=n, replace=False)
    keys = grammar.keys()
    return scenes.place([keys[int(k)] for k in rng.integers(len(keys), size=n)], cells)


@st.composite
def scene_st(draw, low: int = 0, high: int = scenes.MAX_OBJECTS - 1):
    return random_scene(np.random.default_rng(draw(SEEDS)), low, high)


def draw_shape(
    im: Image.Image, shape: str, color: str, cell: int, scale: float = 1.0, outline: bool = False, dx: float = 0.0
) -> tuple[float, float, float]:
    """Draw one object as the renderer does (centred in ``cell``), optionally scaled, outlined or shifted."""
    side, r, _ = scenes.geometry(im.size[0])
    r *= scale
    x, y = (cell % scenes.GRID + 0.5) * side + dx, (cell // scenes.GRID + 0.5) * side
    kw = {"outline": scenes.COLORS[color], "width": 1} if outline else {"fill": scenes.COLORS[color]}
    d = ImageDraw.Draw(im)
    if shape == "circle":
        d.ellipse([x - r, y - r, x + r, y + r], **kw)
    elif shape == "square":
        d.rectangle([x - r, y - r, x + r, y + r], **kw)
    else:
        d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], **kw)
    return x, y, r


def free_cell(scene: scenes.Scene, pick: int) -> int:
    free = [c for c in range(scenes.CELLS) if c not in {o.cell for o in scene.objects}]
    return free[pick % len(free)]


def noisy(im: Image.Image, sigma: float, seed: int) -> np.ndarray:
    a = np.asarray(im, dtype=np.float64)
    return np.clip(a + np.random.default_rng(seed).normal(0, sigma, a.shape), 0, 255).round().astype(np.uint8)


def unparseable(image, scene: scenes.Scene, words: str = "") -> str:
    """The reading's problem; fails if the image was read (rightly or wrongly)."""
    r = read_scene(image)
    assert r.scene is None and r.problem, f"read as {r.scene} (truth {scene})"
    assert words in r.problem, r.problem
    return r.problem


# --- exact on clean renders ----------------------------------------------------------------------------
def test_round_trip_of_10000_random_scenes():
    """Every one of 10,000 random scenes (0-6 objects, every colour, shape and cell, every size 32..128,
    random jitter seeds) parses back to exactly its scene."""
    rng = np.random.default_rng(2026)
    n = 10_000
    truth = [random_scene(rng) for _ in range(n)]
    sizes = [scenes.MIN_SIZE + i % (scenes.MAX_SIZE - scenes.MIN_SIZE + 1) for i in range(n)]  # each size ~100 times
    images = [np.asarray(scenes.render(s, size, int(rng.integers(2**31)))) for s, size in zip(truth, sizes)]
    start = time.perf_counter()
    readings = read_scenes(images)
    seconds = time.perf_counter() - start
    wrong = [(s, size, r) for s, size, r in zip(truth, sizes, readings) if r.scene != s or r.problem is not None]
    assert not wrong, f"{len(wrong)} of {n} misread, e.g. {wrong[:3]}"
    counts = {len(s.objects) for s in truth}
    assert counts == set(range(scenes.MAX_OBJECTS + 1))
    assert {(o.shape, o.color, o.cell) for s in truth for o in s.objects} == {
        (sh, c, cell) for sh in scenes.SHAPES for c in scenes.COLORS for cell in range(scenes.CELLS)
    }
    print(f"read 10,000 scenes in {seconds:.1f} s")


def test_cell_windows_hold_the_renderers_objects_at_every_size():
    """The pixels read for a cell (centres inside it) hold every object the renderer can draw there, at the
    largest jitter either way, and the allowed object sides are the rendered ones."""
    for size in range(scenes.MIN_SIZE, scenes.MAX_SIZE + 1):
        lay = layout(size)
        side, r, jit = scenes.geometry(size)
        for shape in scenes.SHAPES:
            for cell in (0, 4, 8):
                for sign in (-1, 1):
                    im = Image.new("L", (size, size), 0)
                    x, y = (cell % 3 + 0.5) * side + sign * jit, (cell // 3 + 0.5) * side + sign * jit
                    d = ImageDraw.Draw(im)
                    if shape == "circle":
                        d.ellipse([x - r, y - r, x + r, y + r], fill=1)
                    elif shape == "square":
                        d.rectangle([x - r, y - r, x + r, y + r], fill=1)
                    else:
                        d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=1)
                    ys, xs = np.nonzero(np.asarray(im))
                    row, col = divmod(cell, 3)
                    assert lay.starts[row] <= ys.min() and ys.max() < lay.stops[row], (size, shape, cell, sign)
                    assert lay.starts[col] <= xs.min() and xs.max() < lay.stops[col], (size, shape, cell, sign)
                    for extent in (np.ptp(ys) + 1, np.ptp(xs) + 1):
                        assert lay.sides[0] <= extent <= lay.sides[1], (size, shape, extent, lay.sides)


def test_read_accepts_pil_and_arrays_and_more_than_six_objects():
    scene = scenes.Scene((scenes.Obj("triangle", "yellow", 2), scenes.Obj("square", "green", 6)))
    im = scenes.render(scene, 48, 3)
    assert read_scene(im).scene == read_scene(np.asarray(im)).scene == read_scene(im.convert("RGBA")).scene == scene
    empty = read_scene(scenes.render(scenes.Scene(()), 32))
    assert empty.scene == scenes.Scene(()) and empty.parsed
    # seven well-formed objects: read (a wrong scene for every prompt), though no Scene holds them
    im = scenes.render(scenes.Scene(tuple(scenes.Obj("circle", "red", c) for c in range(6))), 64, 1)
    draw_shape(im, "square", "blue", 8)
    r = read_scene(im)
    assert r.parsed and r.scene is None and len(r.objects) == 7
    (v,) = judge([im], ["a photo of six red circles"])
    assert (v.status, v.errors) == ("wrong scene", ("extra",))


# --- the world generator's autoencoder ------------------------------------------------------------------
def autoencoder_round_trips(vae, n: int, seed: int) -> tuple[list[scenes.Scene], np.ndarray]:
    """``n`` random scenes (3 in 4 drawn for a random prompt, as the generator's training data is; 1 in 4 of
    0-6 random objects) rendered at 32 px and passed through ``vae``: the latent mean decoded, clamped to
    [-1, 1] and rounded to uint8 as the pipeline writes images."""
    import torch

    rng = np.random.default_rng(seed)
    truth = []
    for i in range(n):
        if i % 4 == 3:
            truth.append(random_scene(rng))
        else:
            prompt = grammar.random_prompt(grammar.KINDS[int(rng.integers(len(grammar.KINDS)))], rng)
            truth.append(sampler.draw_scene(prompt, None, rng))
    clean = np.stack([np.asarray(scenes.render(s, 32, int(rng.integers(2**31)))) for s in truth])
    out = []
    with torch.no_grad():
        for k in range(0, n, 100):
            x = torch.from_numpy(clean[k : k + 100]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
            out.append(((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return truth, np.concatenate(out)


def test_autoencoder_round_trips_read_back():
    """500 random scenes through the shipped world generator's AutoencoderKL (encode, latent mean, decode):
    at least 99% read back exactly, and none as another scene (the others are unparseable)."""
    import diffusers
    import torch

    vae = diffusers.AutoencoderKL.from_pretrained(package.WEIGHTS / "vae", dtype=torch.float32).eval()
    truth, images = autoencoder_round_trips(vae, 500, 2027)
    readings = read_scenes(list(images))
    wrong = [(r.scene, s) for r, s in zip(readings, truth) if r.parsed and r.scene != s]
    assert not wrong, f"{len(wrong)} round trips read as another scene, e.g. {wrong[:2]}"
    exact = sum(r.scene == s for r, s in zip(readings, truth))
    reasons = Counter(r.problem.split(":")[-1].strip()[:60] for r in readings if not r.parsed)
    assert exact >= 495, f"{exact}/500 round trips read back exactly; unparseable: {reasons.most_common(5)}"
    print(f"{exact}/500 autoencoder round trips read back exactly; unparseable: {dict(reasons)}")


# --- robust: never a wrong scene, never a silently dropped object -------------------------------------------
def extra_object(alpha):
    """Hypothesis cases of a scene with one more object drawn in a free cell, blended by ``alpha``."""
    return given(scene=scene_st(), size=SIZES, seed=SEEDS, pick=st.integers(0, 8), alpha=alpha,
                 shape=st.sampled_from(scenes.SHAPES), color=st.sampled_from(list(scenes.COLORS)))


@HYP
@extra_object(alpha=st.floats(0.2, 0.5))
def test_a_faint_extra_object_is_unparseable(scene, size, seed, pick, alpha, shape, color):
    """An object blended 20-50% into the background makes the image unparseable, naming its cell."""
    im = scenes.render(scene, size, seed)
    layer = im.copy()
    cell = free_cell(scene, pick)
    draw_shape(layer, shape, color, cell)
    problem = unparseable(Image.blend(im, layer, alpha), scene, "too small/faint")
    assert f"cell ({cell // 3}, {cell % 3})" in problem


@HYP
@extra_object(alpha=st.floats(0.05, 1.0))
def test_an_extra_object_at_any_strength_is_counted_or_unparseable(scene, size, seed, pick, alpha, shape, color):
    """Blended at any strength, an extra object is counted (read as a scene that holds it) or makes the image
    unparseable; the image is never read as the scene without it unless it is all but invisible."""
    im = scenes.render(scene, size, seed)
    layer = im.copy()
    cell = free_cell(scene, pick)
    draw_shape(layer, shape, color, cell)
    r = read_scene(Image.blend(im, layer, alpha))
    with_it = scenes.Scene((*scene.objects, scenes.Obj(shape, color, cell)))
    assert r.scene in (None, with_it, scene)
    if r.scene == scene:  # below the background tolerance: at most ~11% of the way to any colour
        assert alpha < 0.12, alpha


@HYP
@given(
    scene=scene_st(),
    size=SIZES,
    seed=SEEDS,
    pick=st.integers(0, 8),
    half=st.integers(0, 3),
    shape=st.sampled_from(scenes.SHAPES),
    color=st.sampled_from(list(scenes.COLORS)),
)
def test_half_formed_shapes_are_unparseable(scene, size, seed, pick, half, shape, color):
    """A shape cut in half (any side), a shape at half size, an outline only: each unparseable."""
    cell = free_cell(scene, pick)
    cut = scenes.render(scene, size, seed)
    x, y, r = draw_shape(cut, shape, color, cell)
    m = r + 2
    box = [[x, y - m, x + m, y + m], [x - m, y - m, x, y + m], [x - m, y, x + m, y + m], [x - m, y - m, x + m, y]]
    ImageDraw.Draw(cut).rectangle(box[half], fill=scenes.BACKGROUND)
    unparseable(cut, scene)
    small = scenes.render(scene, size, seed)
    draw_shape(small, shape, color, cell, scale=0.5)
    unparseable(small, scene, "too small/faint")
    ring = scenes.render(scene, size, seed)
    draw_shape(ring, shape, color, cell, outline=True)
    unparseable(ring, scene)


@HYP
@given(
    scene=scene_st(),
    size=SIZES,
    seed=SEEDS,
    pick=st.integers(0, 8),
    shapes=st.permutations(scenes.SHAPES),
    colors=st.permutations(list(scenes.COLORS)),
    split=st.floats(-0.5, 0.5),
)
def test_mixed_colour_objects_are_unparseable(scene, size, seed, pick, shapes, colors, split):
    """An object of two colours (one shape drawn over another, or one shape split between two colours)."""
    cell = free_cell(scene, pick)
    over = scenes.render(scene, size, seed)
    draw_shape(over, shapes[0], colors[0], cell)
    draw_shape(over, shapes[1], colors[1], cell, scale=0.5)
    unparseable(over, scene, "two colours")
    halves = scenes.render(scene, size, seed)
    x, _, r = draw_shape(halves, shapes[0], colors[0], cell)
    layer = halves.copy()
    draw_shape(layer, shapes[0], colors[1], cell)
    mask = Image.new("L", halves.size, 0)
    ImageDraw.Draw(mask).rectangle([x + split * r, 0, size, size], fill=255)
    unparseable(Image.composite(layer, halves, mask), scene, "two colours")


@HYP
@given(
    scene=scene_st(),
    size=SIZES,
    seed=SEEDS,
    pick=st.integers(0, 8),
    shift=st.floats(0.3, 0.6),
    sign=st.sampled_from([-1, 1]),
    tiny=st.floats(0.05, 0.3),
    shape=st.sampled_from(scenes.SHAPES),
)
def test_objects_off_their_cell_or_too_small_are_unparseable(scene, size, seed, pick, shift, sign, tiny, shape):
    """An object pushed 0.3-0.6 of a cell off its centre is unparseable or, when it still reads as an object of
    its cell, counted there: never silently dropped (the issue's rule). The second case exists: CI found a blue
    circle shifted 0.3 cell (3.2 px at 32 px) whose overflow touched a blue square in the next cell; it was read
    as a blue circle in its cell. A too-small object is always unparseable."""
    cell = free_cell(scene, pick)
    im = scenes.render(scene, size, seed)
    draw_shape(im, shape, "blue", cell, dx=sign * shift * size / scenes.GRID)
    r = read_scene(im)
    if r.scene is not None:
        assert (shape, "blue", cell) in {(o.shape, o.color, o.cell) for o in r.scene.objects}, (r, scene)
        assert r.scene != scene
    else:
        assert r.problem
    im = scenes.render(scene, size, seed)
    before = np.asarray(im).copy()
    draw_shape(im, shape, "red", cell, scale=tiny)
    assume(not np.array_equal(before, np.asarray(im)))  # PIL may draw nothing at all for a radius under a pixel
    unparseable(im, scene, "too small/faint")


@HYP
@given(scene=scene_st(), size=SIZES, seed=SEEDS, sigma=st.floats(0.0, 4.0))
def test_mild_noise_still_parses(scene, size, seed, sigma):
    """Gaussian noise up to sigma 4 (of 255) on every channel: read exactly."""
    assert read_scene(noisy(scenes.render(scene, size, seed), sigma, seed)).scene == scene


@HYP
@given(scene=scene_st(), size=SIZES, seed=SEEDS, sigma=st.floats(4.0, 100.0), blur=st.floats(0.2, 3.0))
def test_noise_and_blur_never_give_a_wrong_scene(scene, size, seed, sigma, blur):
    """Any noise or blur: the true scene or unparseable, never another scene; heavy noise: unparseable."""
    im = scenes.render(scene, size, seed)
    r = read_scene(noisy(im, sigma, seed))
    assert r.scene in (scene, None) and (r.scene is None) == (r.problem is not None), (r, scene)
    if sigma >= 30:
        assert r.problem, f"sigma {sigma:.1f} read as {r.scene}"
    r = read_scene(im.filter(ImageFilter.GaussianBlur(blur)))
    assert r.scene in (scene, None), (r, scene)


def test_unparseable_reasons_name_the_cell_and_the_fault():
    scene = scenes.Scene((scenes.Obj("circle", "red", 0), scenes.Obj("square", "blue", 4)))
    im = scenes.render(scene, 64, 0)
    ring = im.copy()
    draw_shape(ring, "circle", "green", 8, outline=True)
    assert unparseable(ring, scene).startswith("cell (2, 2): shape not recognised (fill ratio")
    small = im.copy()
    draw_shape(small, "square", "green", 5, scale=0.5)
    assert unparseable(small, scene).startswith("cell (1, 2): an object too small/faint to count")
    crossing = im.copy()
    draw_shape(crossing, "circle", "green", 8, dx=-0.5 * 64 / 3)
    assert unparseable(crossing, scene).startswith("object crosses the boundary of cell")
    assert "all over the image" in unparseable(noisy(im, 40, 0), scene)


# --- the judge -------------------------------------------------------------------------------------------
@HYP
@given(
    scene=scene_st(low=1, high=scenes.MAX_OBJECTS),
    size=SIZES,
    seed=SEEDS,
    pseed=SEEDS,
    kind=st.sampled_from(grammar.KINDS),
)
def test_verdicts_agree_with_the_oracle(scene, size, seed, pseed, kind):
    """On rendered scenes, the judge's verdict for a random prompt, the prompt describing the scene and
    every prompt one attribute away is the oracle's: match or wrong scene with exactly its errors."""
    prompts = [grammar.random_prompt(kind, np.random.default_rng(pseed))]
    described = grammar.describe(scene)
    if described is not None:
        prompts += [described] + [p for _, p in grammar.perturbations(described)]
    im = scenes.render(scene, size, seed)
    verdicts = judge([im] * len(prompts), [p.text for p in prompts])
    for prompt, v in zip(prompts, verdicts):
        truth = oracle.judge(scene, prompt)
        assert v.status in STATUSES and v.problem is None
        assert v.match == truth.match and v.errors == truth.errors, (prompt.text, v, truth)
        assert v.status == ("match" if truth.match else "wrong scene")
        assert v.error == (",".join(truth.errors) or None)


def test_unparseable_is_reported_apart_from_a_wrong_scene():
    scene = scenes.Scene((scenes.Obj("circle", "red", 4),))
    im = scenes.render(scene, 32, 0)
    blurred = im.filter(ImageFilter.GaussianBlur(1.5))
    good, wrong, bad = judge(
        [im, im, blurred], ["a photo of a red circle", "a photo of a blue circle", "a photo of a red circle"]
    )
    assert (good.status, good.match, good.error, good.problem) == ("match", True, None, None)
    assert (wrong.status, wrong.match, wrong.error, wrong.problem) == ("wrong scene", False, "colour", None)
    assert (bad.status, bad.match, bad.error) == ("unparseable", False, None) and bad.problem


def test_bad_inputs_are_refused_in_one_line():
    with pytest.raises(InputError, match=r"^world image of 40x32 px: .*square, 32\.\.128 px"):
        read_scene(Image.new("RGB", (40, 32)))
    for side in (31, 129):
        with pytest.raises(InputError, match=rf"^world image of {side}x{side} px: .*32\.\.128"):
            read_scene(np.zeros((side, side, 3), np.uint8))
    with pytest.raises(InputError, match=r"shape \(32, 32\) and dtype uint8"):
        read_scene(np.zeros((32, 32), np.uint8))
    with pytest.raises(InputError, match="float32"):
        read_scene(np.zeros((32, 32, 3), np.float32))
    # a prompt outside the grammar is named before any image is read (the image here is not even valid)
    with pytest.raises(InputError, match=r"^prompt 'a photo of a dog' is not in the world's grammar"):
        judge([Image.new("RGB", (16, 16)), Image.new("RGB", (16, 16))], ["a photo of a red circle", "a photo of a dog"])
    with pytest.raises(InputError, match="2 images but 1 prompts"):
        judge([None, None], ["a photo of a red circle"])


# --- the reward -------------------------------------------------------------------------------------------
def test_worldjudge_reward_through_the_registry():
    assert "worldjudge" in available()
    assert "oracle" in unit("worldjudge").text
    model = build("worldjudge")
    assert model.model_id == "worldjudge"
    scene = scenes.Scene((scenes.Obj("circle", "red", 0), scenes.Obj("square", "blue", 8)))
    im = scenes.render(scene, 32, 0)
    other = scenes.render(scenes.Scene((scenes.Obj("circle", "red", 8), scenes.Obj("square", "blue", 0))), 32, 0)
    left = "a photo of a red circle to the left of a blue square"
    contrast = [
        left,
        "a photo of a red circle to the right of a blue square",
        "a photo of a red circle",
        "a photo of a red circle and a blue square",
    ]
    rows = model.score_rows([im, other, np.asarray(im)], [contrast, contrast, [left]])
    np.testing.assert_array_equal(rows[0], [1.0, 0.0, 0.0, 1.0])
    np.testing.assert_array_equal(rows[1], [0.0, 1.0, 0.0, 1.0])
    np.testing.assert_array_equal(rows[2], [1.0])
    assert all(r.dtype == np.float32 for r in rows)
    noisy_rows = model.score_rows([noisy(im, 60, 0)], [[left]])  # unparseable scores 0
    np.testing.assert_array_equal(noisy_rows[0], [0.0])
    with pytest.raises(InputError, match="'a photo of a cat'"):
        model.score_rows([Image.new("RGB", (8, 8))], [[left, "a photo of a cat"]])
    with pytest.raises(InputError, match="worldjudge has no weights"):
        build("worldjudge:tiny")
    with pytest.raises(InputError, match="not a dual encoder"):
        model.embed([im], [left])
