"""The synthetic world (docs/world.md): oracle, renderer, sampler rates, best-of-n expectation,
the trained proxy's determinism, the label files through ``tia2 stats|eval``, ``world run``."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from tn_ray.analysis import goodhart
from tn_ray.data.world import grammar, labels, oracle, sampler, scenes

HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def scene_st(draw, max_kinds: int | None = None):
    n = draw(st.integers(1, scenes.MAX_OBJECTS))
    cells = draw(st.lists(st.integers(0, scenes.CELLS - 1), min_size=n, max_size=n, unique=True))
    pool = grammar.keys()
    if max_kinds:
        pool = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=max_kinds, unique=True))
    keys = [draw(st.sampled_from(pool)) for _ in cells]
    return scenes.place(keys, cells)


@st.composite
def prompt_st(draw):
    kind = draw(st.sampled_from(grammar.KINDS))
    return grammar.random_prompt(kind, np.random.default_rng(draw(st.integers(0, 2**32 - 1))))


def decode(image, size: int) -> list[tuple[str, str, int]]:
    """(shape, colour, cell) of every object found in the pixels: connected components, their
    nearest palette colour, their fill of the bounding box (square 1, circle ~0.78, triangle ~0.5)."""
    a = np.asarray(image, dtype=float)
    lab, _ = ndimage.label(np.linalg.norm(a - np.array(scenes.BACKGROUND), axis=-1) > 60)
    cell = size / scenes.GRID
    out = []
    for i, sl in enumerate(ndimage.find_objects(lab), 1):
        m = lab[sl] == i
        rgb = a[sl][m].mean(0)
        color = min(scenes.COLORS, key=lambda c: np.linalg.norm(np.array(scenes.COLORS[c]) - rgb))
        fill = m.sum() / m.size
        shape = "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"
        cy, cx = ndimage.center_of_mass(lab == i)
        out.append((shape, color, int(cy // cell) * scenes.GRID + int(cx // cell)))
    return sorted(out)


@HYP
@given(scene=scene_st(), size=st.sampled_from([32, 64, 128]), seed=st.integers(0, 10**6))
def test_rendered_pixels_show_the_scene_description(scene, size, seed):
    """Every object of the description is in the picture, with its shape, colour and cell, and nothing else."""
    assert decode(scenes.render(scene, size, seed), size) == sorted((o.shape, o.color, o.cell) for o in scene.objects)


@HYP
@given(scene=scene_st(max_kinds=2))
def test_oracle_agrees_with_the_description_on_every_attribute(scene):
    """The prompt describing a scene matches it; each prompt one attribute away is wrong on exactly that attribute."""
    prompt = grammar.describe(scene)
    assert oracle.judge(scene, prompt).errors == ()
    found = set()
    for error, other in grammar.perturbations(prompt):
        assert oracle.judge(scene, other).errors == (error,), (error, other.text)
        found.add(error)
    assert {"count", "colour", "shape"} <= found
    colors, shapes = {o.color for o in scene.objects}, {o.shape for o in scene.objects}
    absent = next(k for k in grammar.keys() if k[0] not in colors and k[1] not in shapes)  # nothing can stand in for it
    named = grammar.WorldPrompt("composition", (*prompt.slots, grammar.Slot(1, *absent)))
    assert oracle.judge(scene, named).errors == ("missing",)


@HYP
@given(scene=scene_st(), prompt=prompt_st())
def test_oracle_match_is_exact_counts_and_relation(scene, prompt):
    """Independent statement of the rule: the scene's (colour, shape) counts equal the prompt's,
    and every first object stands in the relation to every second one."""
    want = Counter({s.key: s.count for s in prompt.slots})
    expected = scene.counts() == want
    if expected and prompt.relation:
        a, b = (scene.of(*s.key) for s in prompt.slots)
        d = {"left": lambda p, q: p.col < q.col, "right": lambda p, q: p.col > q.col,
             "above": lambda p, q: p.row < q.row, "below": lambda p, q: p.row > q.row}[prompt.relation]
        expected = all(d(p, q) for p in a for q in b)
    assert oracle.matches(scene, prompt) == expected


@HYP
@given(prompt=prompt_st())
def test_prompt_text_parses_back(prompt):
    assert grammar.parse(prompt.text) == prompt
    for _, other in grammar.perturbations(prompt):
        assert grammar.parse(other.text).slots == other.slots


def test_sampler_error_rates_equal_the_configured_ones():
    """Per kind, 2000 draws: P(match) and P(error type | mismatch), both read from the oracle,
    within 4 binomial standard errors of the configuration; every drawn scene has exactly its
    intended error."""
    cfg = sampler.SamplerConfig(
        p_match=0.3, error_weights={"count": 3, "colour": 1, "shape": 1, "missing": 2, "relation": 1}
    )
    rng = np.random.default_rng(7)
    n = 2000
    for kind in grammar.KINDS:
        verdicts = []
        for _ in range(n):
            prompt = grammar.random_prompt(kind, rng)
            s = sampler.draw(prompt, cfg, rng)
            v = oracle.judge(s.scene, prompt)
            assert v.errors == ((s.error,) if s.error else ()), (prompt.text, s.error, v.errors)
            verdicts.append(v.errors)
        match = np.mean([not v for v in verdicts])
        assert abs(match - cfg.p_match) < 4 * np.sqrt(cfg.p_match * (1 - cfg.p_match) / n), (kind, match)
        wrong = [v[0] for v in verdicts if v]
        for error, p in cfg.error_probs(kind).items():
            rate = np.mean([e == error for e in wrong])
            assert abs(rate - p) < 4 * np.sqrt(p * (1 - p) / len(wrong)), (kind, error, rate, p)


def test_sampler_config_errors_are_named():
    with pytest.raises(ValueError, match="unknown error types"):
        sampler.SamplerConfig(error_weights={"size": 1.0})
    with pytest.raises(ValueError, match="no error type"):
        sampler.SamplerConfig(error_weights={"relation": 1.0}).error_probs("counting")


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_expected_best_of_n_accuracy_equals_enumeration(data):
    """Exact expectation vs every n-subset of a small pool, ties broken uniformly at random."""
    size = data.draw(st.integers(1, 8))
    scores = data.draw(st.lists(st.integers(0, 3), min_size=size, max_size=size))
    correct = data.draw(st.lists(st.booleans(), min_size=size, max_size=size))
    n = data.draw(st.integers(1, size))
    total = []
    for subset in itertools.combinations(range(size), n):
        best = max(scores[i] for i in subset)
        total.append(np.mean([correct[i] for i in subset if scores[i] == best]))
    assert goodhart.expected_accuracy(scores, correct, n) == pytest.approx(np.mean(total), abs=1e-12)


def test_expected_accuracy_references():
    correct = np.array([1, 0, 0, 0] * 8, dtype=bool)
    assert goodhart.expected_accuracy(np.zeros(32), correct, 16) == pytest.approx(0.25)  # all tied: random
    oracle_acc = goodhart.expected_accuracy(correct.astype(float), correct, 4)  # P(some correct among 4 of 32)
    from scipy.special import comb

    assert oracle_acc == pytest.approx(1 - comb(24, 4) / comb(32, 4))


# --- the proxy --------------------------------------------------------------------------------
SMALL = "worldclip:steps=30,batch=16"

SHA = """
import json, sys
from tn_ray.rewards.worldclip import ensure, parse_source
import torch
blob = torch.load(ensure(parse_source(sys.argv[1])), weights_only=True)
print(json.dumps({"sha": blob["info"]["sha256"]}))
"""


def test_proxy_weights_identical_across_processes(tmp_path):
    """Two fresh processes train the proxy from scratch into separate caches: the same bytes."""
    shas = []
    for i in range(2):
        env = {**os.environ, "TN_RAY_CACHE_DIR": str(tmp_path / f"c{i}"), "OMP_NUM_THREADS": str(i + 1)}
        res = subprocess.run(
            [sys.executable, "-c", SHA, SMALL.partition(":")[2]], env=env, capture_output=True, text=True, timeout=600
        )
        assert res.returncode == 0, res.stderr[-2000:]
        shas.append(json.loads(res.stdout.strip().splitlines()[-1])["sha"])
        files = list((tmp_path / f"c{i}" / "world").glob("worldclip-*.pt"))
        assert len(files) == 1
    assert shas[0] == shas[1]


def test_proxy_source_errors():
    from tn_ray.errors import InputError
    from tn_ray.rewards.worldclip import parse_source

    assert parse_source("seed=3,steps=10").seed == 3
    with pytest.raises(InputError, match="key 'colour'"):
        parse_source("colour=1")
    with pytest.raises(InputError, match="key=value"):
        parse_source("big")


@pytest.fixture(scope="session")
def world_cache(tmp_path_factory):
    """A proxy cache for this test session (set before Ray starts, so reward actors see it)."""
    path = tmp_path_factory.mktemp("world_cache")
    old = os.environ.get("TN_RAY_CACHE_DIR")
    os.environ["TN_RAY_CACHE_DIR"] = str(path)
    from tn_ray.experiments.world import ensure_models

    ensure_models(["worldclip:tiny", "worldclip:tiny,seed=1"])
    yield path
    if old is None:
        os.environ.pop("TN_RAY_CACHE_DIR", None)
    else:
        os.environ["TN_RAY_CACHE_DIR"] = old


def test_proxy_learns_the_world(world_cache):
    """Even the tiny proxy scores matching pairs above mismatched ones more often than not."""
    from tn_ray.rewards import build

    model = build("worldclip:tiny")
    rng = np.random.default_rng(3)
    prompts = [grammar.random_prompt("colours", rng) for _ in range(24)]
    good = [scenes.render(sampler.draw_scene(p, None, rng), 64) for p in prompts]
    bad = [scenes.render(sampler.draw_scene(p, "colour", rng), 64) for p in prompts]
    s_good = np.array([r[0] for r in model.score_rows(good, [[p.text] for p in prompts])])
    s_bad = np.array([r[0] for r in model.score_rows(bad, [[p.text] for p in prompts])])
    assert (s_good > s_bad).mean() > 0.6


def test_world_labels_in_tia2_stats_and_eval(tmp_path, world_cache, ray_session, capsys):
    """`tn-ray world labels` writes files that `tia2 stats` and `tia2 eval` read unchanged."""
    from tn_ray.cli import main

    data = tmp_path / "data"
    assert (
        main(["world", "labels", "--out", str(data), "--per-kind", "2", "--images-per-prompt", "6", "--size", "32"])
        == 0
    )
    assert main(["tia2", "stats", "--tia2-dir", str(data / "tia2"), "--out", str(tmp_path / "stats.md")]) == 0
    text = (tmp_path / "stats.md").read_text()
    assert "| counting" in text and "| spatial" in text and "| colours" in text
    world = __import__("pandas").read_parquet(data / "world.parquet")
    assert len(world) == 8 * 6 and set(world["kind"]) == set(grammar.KINDS)
    assert (
        main(
            [
                "tia2",
                "eval",
                "--tia2-dir",
                str(data / "tia2"),
                "--images",
                str(data / "images"),
                "--models",
                "worldclip:tiny",
                "--sets",
                "counting",
                "composition",
                "comprehensive",
                "--out",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )
    per_set = __import__("pandas").read_csv(tmp_path / "eval" / "per_set.csv")
    assert set(per_set["reward"]) == {"worldclip:tiny", "textnorm(worldclip:tiny)"}
    assert per_set["auroc"].between(0, 1).all()
    assert "contrastive" in labels.__doc__


def test_world_run_end_to_end(tmp_path, world_cache, ray_session):
    """`tn-ray world run` on a tiny setting: AUROC table, best-of-n curves with CIs and a plot;
    the oracle selector's accuracy is 1 - P(no match among n), random stays at the match rate."""
    import pandas as pd

    from tn_ray.cli import main

    out = tmp_path / "run"
    sets = [
        "models=[worldclip:tiny, 'worldclip:tiny,seed=1']",
        "per_kind=1",
        "images_per_prompt=6",
        "size=32",
        "bestofn.per_kind=1",
        "bestofn.pool=16",
        "bestofn.ns=[1,4,16]",
        "bestofn.resamples=200",
    ]
    assert main(["world", "run", "--out", str(out), *sum((["--set", s] for s in sets), [])]) == 0
    summary = pd.read_csv(out / "bestofn" / "summary.csv")
    scores = pd.read_parquet(out / "bestofn" / "scores.parquet")
    sel = set(summary["selector"])
    assert {
        "worldclip:tiny",
        "textnorm(worldclip:tiny) [rules]",
        "textnorm(worldclip:tiny) [world]",
        "ensemble-mean [rules]",
        "oracle",
        "random",
    } <= sel
    rnd = summary[summary["selector"] == "random"]["accuracy"]
    assert np.allclose(rnd, scores["correct"].mean())  # 4 prompts x 16: pool means averaged = overall mean
    assert (summary["ci_low"] <= summary["accuracy"] + 1e-12).all() and (
        summary["accuracy"] <= summary["ci_high"] + 1e-12
    ).all()
    assert (out / "bestofn" / "goodhart.png").stat().st_size > 0
    assert "AUROC against the oracle" in (out / "summary.md").read_text()
