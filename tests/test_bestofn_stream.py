"""Best-of-n as one streaming pipeline: pool sizing, and rewards stored with the images they score."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tn_ray.config import ScoringConfig
from tn_ray.diffusion.generation import GenerationConfig, image_id, read_manifest
from tn_ray.experiments.bestofn_stream import generate_and_score, plan_pools
from tn_ray.scoring.batch_scoring import image_key
from tn_ray.scoring.cache import RewardCache
from tn_ray.storage import Store

PROMPTS = ["a red cat", "two dogs on a beach"]
TEXTS = {
    "a red cat": ["a red cat", "a blue cat", "a red dog"],
    "two dogs on a beach": ["two dogs on a beach", "one dog"],
}


def gen_config(out, **kw) -> GenerationConfig:
    base = dict(
        out=str(out),
        pipeline="tiny",
        num_inference_steps=2,
        height=32,
        width=32,
        samples_per_prompt=4,
        pipeline_batch_size=2,
        batch_size=2,
        num_actors=1,
    )
    return GenerationConfig(**{**base, **kw})


def test_pools_split_the_gpus_and_fall_back_when_they_cannot_share():
    gen = GenerationConfig(out="x")
    p = plan_pools({"GPU": 3.0, "CPU": 12.0}, gen, ScoringConfig(), n_models=2, n_units=100, reward_share=0.25)
    assert (p.generation_actors, p.generation_resources) == (2, {"num_gpus": 1.0})  # 3 - 2 x 0.25 GPUs left
    assert (p.reward_actors, p.reward_resources, p.concurrent) == (1, {"num_gpus": 0.25}, True)
    p = plan_pools(
        {"GPU": 8.0},
        gen.model_copy(update={"gpus_per_actor": 0.5}),
        ScoringConfig(gpus_per_actor=0.5, num_actors=2),
        n_models=1,
        n_units=100,
        reward_share=0.25,
    )
    assert (p.generation_actors, p.reward_actors, p.used, p.concurrent) == (14, 2, 8.0, True)
    p = plan_pools({"GPU": 1.0}, gen, ScoringConfig(gpus_per_actor=1.0), n_models=1, n_units=100, reward_share=0.25)
    assert not p.concurrent  # the user's whole-GPU reward actor leaves nothing for generation
    p = plan_pools({"CPU": 2.0}, gen, ScoringConfig(), n_models=2, n_units=100, reward_share=0.25)
    assert (p.generation_actors, p.generation_resources["num_cpus"], p.reward_resources["num_cpus"], p.concurrent) == (
        1,
        1.0,
        0.25,
        True,
    )
    p = plan_pools({"CPU": 2.0}, gen.model_copy(update={"cpus_per_actor": 0.875}), ScoringConfig(), 1, 1, 0.25)
    assert p.generation_actors == 1  # never more actors than work units
    p = plan_pools({"CPU": 2.0}, gen.model_copy(update={"num_actors": 2}), ScoringConfig(), 1, 100, 0.25)
    assert not p.concurrent


def test_rewards_are_stored_before_their_images_are_recorded(ray_session, tmp_path):
    """An interruption after a batch's rewards were stored but before its manifest rows: the
    rerun adopts those images and finds them scored, streams the rest (every streamed image is
    scored before it is recorded), and score_matrices afterwards computes only the images the
    interrupted run's actors finished unscored; every reward equals a single-process computation
    and is stored once."""
    from tn_ray.experiments.bestofn import score_items
    from tn_ray.rewards import build
    from tn_ray.scoring.batch_scoring import score_matrices

    cfg, cache_dir, scoring = gen_config(tmp_path / "gen"), str(tmp_path / "cache"), ScoringConfig(batch_size=2)

    class Interrupted(Exception):
        pass

    def interrupt(rows) -> None:
        raise Interrupted("stop after the first batch's rewards")

    with pytest.raises(Interrupted):
        generate_and_score(
            PROMPTS,
            TEXTS,
            cfg,
            ["clip:tiny"],
            cache_dir,
            scoring,
            set_name="bestofn",
            score_below=4,
            on_batch=interrupt,
        )
    assert read_manifest(Store(cfg.out)).empty  # rewards of the first batch stored, no manifest row
    first_batch = set(RewardCache(cache_dir, "clip:tiny").frame()["image_key"])
    assert len(first_batch) >= 2
    # the generation actors may have finished more images before the driver stopped; remove the
    # unscored ones so the rerun must generate (stream) them whatever the machine's load
    scored_ids = {k.split("/")[1] for k in first_batch}
    for path in (tmp_path / "gen" / "images").glob("*/*.png"):
        if image_id(int(path.parent.name), int(path.stem)) not in scored_ids:
            path.unlink()

    streamed: list[str] = []
    manifest = generate_and_score(
        PROMPTS,
        TEXTS,
        cfg,
        ["clip:tiny"],
        cache_dir,
        scoring,
        set_name="bestofn",
        score_below=3,
        on_batch=lambda rows: streamed.extend(rows["image_id"]),
    )
    assert len(manifest) == 8 and not manifest.duplicated(["prompt_id", "sample"]).any()
    keys = dict(
        zip(
            manifest["image_id"], [image_key("bestofn", i, h) for i, h in zip(manifest["image_id"], manifest["sha256"])]
        )
    )
    assert first_batch <= set(keys.values())  # the interrupted batch's images were adopted, same bytes
    cached = set(RewardCache(cache_dir, "clip:tiny").frame()["image_key"])
    below = manifest[manifest["sample"] < 3]
    assert streamed and {keys[i] for i in streamed if i in set(below["image_id"])} <= cached
    assert not {keys[i] for i in manifest[manifest["sample"] == 3]["image_id"] if i in streamed} & cached

    items = score_items(below, {p: t[1:] for p, t in TEXTS.items()}, "test")
    stats: dict = {}
    matrices = score_matrices(items, ["clip:tiny"], cache_dir, scoring, stats=stats)
    unscored = [k for k in items["image_key"] if k not in cached]  # finished by the interrupted run's actors
    assert stats["clip:tiny"]["computed"] == sum(
        len(TEXTS[p]) for p, k in zip(items["prompt"], items["image_key"]) if k in unscored
    )
    frame = RewardCache(cache_dir, "clip:tiny").frame()
    assert not frame.duplicated(["image_key", "text"]).any()
    want = build("clip:tiny").score_rows(list(items["image"]), [TEXTS[p] for p in items["prompt"]])
    for w, g in zip(want, matrices["clip:tiny"].values):
        np.testing.assert_allclose(g[: len(w)], w, atol=1e-5)


def test_score_stage_gives_every_batch_the_same_float_columns(tmp_path):
    """Unscored rows (sample >= score_below) are NaN in the same float columns, so blocks that
    hold only them have the schema of any other block; the driver stores the scored rows only."""
    from PIL import Image

    from tn_ray.experiments.bestofn_stream import ScoreStage, cache_rows, score_columns

    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / name)
    rows = pd.DataFrame(
        {
            "prompt_id": [0, 1],
            "prompt": PROMPTS,
            "sample": [0, 5],
            "image_id": ["00000-00000", "00001-00005"],
            "path": ["a.png", "b.png"],
            "sha256": ["x", "y"],
        }
    )
    stage = ScoreStage("clip:tiny", 8, str(tmp_path), TEXTS, score_below=5)
    mixed, unscored = stage(rows), stage(rows.iloc[1:].reset_index(drop=True))
    columns = score_columns("clip:tiny", 3)
    assert list(mixed.columns[-3:]) == list(unscored.columns[-3:]) == columns
    assert all(mixed[c].dtype == unscored[c].dtype == np.float64 for c in columns)
    assert np.isfinite(mixed.loc[0, columns].to_numpy(dtype=float)).all() and mixed.loc[1, columns].isna().all()
    stored = cache_rows(mixed, "clip:tiny", TEXTS, "bestofn")
    assert (
        stored["image_key"].tolist() == ["bestofn/00000-00000/x"] * 3 and stored["text"].tolist() == TEXTS[PROMPTS[0]]
    )
    assert cache_rows(unscored, "clip:tiny", TEXTS, "bestofn").empty
