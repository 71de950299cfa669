"""Best-of-n end to end on tiny models: scores, selections, summary, grids, human-eval export."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tn_ray.analysis.bestofn_selection import select, summary
from tn_ray.config import ConfigError, load_config
from tn_ray.errors import InputError
from tn_ray.experiments.bestofn import BestOfNConfig, resolve_prompts
from tn_ray.prompts.contrast import load_contrast
from tn_ray.scoring.matrix import ScoreMatrix, model_slug

MODELS = ["clip:tiny", "pickscore:tiny"]
CONTRAST = {
    "a photo of three red circles": ["a photo of two red circles", "a photo of three blue circles", "a photo of a red "
                                                                                                    "circle"],
    "a blue square and a green circle": ["a green square and a blue circle", "a blue square", "two blue squares"],
}
POOLS, KS, TAU, LAM = [4, 8], [1, 4], 0.5, 2.0
PAIRS = [["ensemble-uncertainty", "clip:tiny"], ["textnorm(pickscore:tiny)", "pickscore:tiny"]]


def write_config(tmp: Path, **extra) -> Path:
    (tmp / "contrast.json").write_text(json.dumps(CONTRAST))
    cfg = {
        "out": str(tmp / "run"), "contrast": str(tmp / "contrast.json"), "pools": POOLS, "top_k": KS, "models": MODELS,
        "textnorm": {"tau": TAU, "lam": LAM},
        "ensembles": [{"name": "ensemble-mean", "members": MODELS, "kind": "mean"},
                      {"name": "ensemble-uncertainty", "members": MODELS, "kind": "uncertainty"}],
        "generation": {"pipeline": "tiny", "num_inference_steps": 2, "height": 32, "width": 32,
                       "pipeline_batch_size": 4, "batch_size": 8, "num_actors": 1},
        "scoring": {"batch_size": 16}, "grid_cell": 32,
        "human_eval": {"pairs": PAIRS, "k": 4, "seed": 3},
        **extra,
    }
    path = tmp / "bestofn.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def run_dir(ray_session, tmp_path_factory) -> Path:
    from tn_ray.cli import main

    tmp = tmp_path_factory.mktemp("bestofn")
    assert main(["bestofn", str(write_config(tmp))]) == 0
    return tmp / "run"


def own_textnorm(values: np.ndarray, tau: float) -> np.ndarray:
    """Softmax probability of column 0, written independently of tn_ray.textnorm.equations."""
    z = np.where(np.isnan(values), -np.inf, values / tau)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e[:, 0] / e.sum(axis=1)


def stored_rewards(run_dir: Path) -> pd.DataFrame:
    """Every reward recomputed from the stored score-matrix Parquet files alone."""
    frames = {m: ScoreMatrix.load(run_dir / "scores" / f"{model_slug(m)}.parquet") for m in MODELS}
    keys = frames[MODELS[0]].keys[["prompt_id", "sample"]]
    out = keys.copy()
    for m, sm in frames.items():
        sm = sm.align(frames[MODELS[0]].keys)
        out[m] = sm.values[:, 0]
        out[f"textnorm({m})"] = own_textnorm(sm.values, TAU)
    p = np.stack([out[f"textnorm({m})"] for m in MODELS])
    out["ensemble-mean"] = p.mean(axis=0)
    out["ensemble-uncertainty"] = p.mean(axis=0) - LAM * p.var(axis=0)
    return out


def test_score_matrices_have_the_shared_format(run_dir):
    for m in MODELS:
        sm = ScoreMatrix.load(run_dir / "scores" / f"{model_slug(m)}.parquet")
        assert sm.model == m and len(sm) == len(CONTRAST) * max(POOLS)
        assert set(sm.keys["set"]) == {"bestofn"}
        assert sm.keys["prompt_id"].dtype == np.int64 and sm.keys["sample"].dtype == np.int64
        assert sorted(zip(sm.keys["prompt_id"], sm.keys["sample"])) == [(p, s) for p in range(2) for s in range(8)]
        prompts = list(CONTRAST)
        for (pid, prompt, texts) in zip(sm.keys["prompt_id"], sm.keys["prompt"], sm.texts):
            assert prompt == prompts[pid] and texts == [prompt, *CONTRAST[prompt]]
        assert np.isfinite(sm.values).all()
        assert sm.keys["image_id"].is_unique


def test_selections_match_an_independent_argmax_over_the_stored_scores(run_dir):
    sel = pd.read_parquet(run_dir / "selections.parquet")
    rewards = stored_rewards(run_dir)
    names = [c for c in rewards.columns if c not in ("prompt_id", "sample")]
    assert sorted(sel["reward"].unique()) == sorted(names)
    checked = 0
    for pid in range(len(CONTRAST)):
        for n in POOLS:
            pool = rewards[(rewards["prompt_id"] == pid) & (rewards["sample"] < n)]
            for reward in names:
                values = pool[reward].to_numpy()
                order = pool["sample"].to_numpy()[np.lexsort((pool["sample"].to_numpy(), -values))]
                best = int(pool["sample"].to_numpy()[np.argmax(values)])
                got = sel[(sel["prompt_id"] == pid) & (sel["reward"] == reward) & (sel["n"] == n)]
                top1 = got[got["k"] == 1]
                assert top1["sample"].tolist() == [best], (pid, reward, n)
                assert np.isclose(top1["value"].iloc[0], values.max(), rtol=1e-9, atol=1e-12)
                assert got[got["k"] == 4].sort_values("rank")["sample"].tolist() == order[:4].tolist()
                checked += 1
    assert checked == len(CONTRAST) * len(POOLS) * len(names)


def test_summary_is_the_mean_judged_reward_of_each_selection(run_dir):
    table = pd.read_csv(run_dir / "summary.csv")
    rewards = stored_rewards(run_dir)
    sel = pd.read_parquet(run_dir / "selections.parquet")
    for _, row in table.sample(20, random_state=0).iterrows():
        if row["n"] == 1:
            chosen = rewards[rewards["sample"] == 0]
        else:
            top = sel[(sel["reward"] == row["selector"]) & (sel["n"] == row["n"]) & (sel["k"] == 1)]
            chosen = top[["prompt_id", "sample"]].merge(rewards, on=["prompt_id", "sample"])
        assert len(chosen) == len(CONTRAST)
        assert np.isclose(row["mean"], chosen[row["judge"]].mean(), rtol=1e-9)
    # nested pools: a selector's own reward of its pick can only grow with n
    own = table[table["selector"] == table["judge"]].sort_values(["selector", "n"])
    for _, g in own.groupby("selector"):
        assert (np.diff(g["mean"].to_numpy()) >= -1e-12).all()
    md = (run_dir / "summary.md").read_text()
    assert "## judged by textnorm(clip:tiny)" in md and "n=8" in md


def test_grids_have_a_row_per_reward_and_a_column_per_pool(run_dir):
    from PIL import Image

    grids = sorted((run_dir / "grids").glob("*.png"))
    assert [g.name for g in grids] == ["00000.png", "00001.png"]
    sel = pd.read_parquet(run_dir / "selections.parquet")
    n_rewards = sel["reward"].nunique()
    cell, pad = 32, 4
    with Image.open(grids[0]) as im:
        assert im.height > n_rewards * (cell + pad) and im.width > len(POOLS) * (cell + pad)
        pixels = np.asarray(im.convert("RGB"))
    # first row (clip:tiny), last column (largest n): that reward's top-1 image at n = 8
    best = sel[(sel["prompt_id"] == 0) & (sel["reward"] == "clip:tiny") & (sel["n"] == 8) & (sel["k"] == 1)]
    with Image.open(best["image"].iloc[0]) as src:
        expected = np.asarray(src.convert("RGB"))
    y, x = pixels.shape[0] - n_rewards * (cell + pad), pixels.shape[1] - 2 * pad - cell
    assert (pixels[y : y + cell, x : x + cell] == expected).all()


def test_human_eval_export_is_blinded_and_matches_the_selections(run_dir):
    key = pd.read_csv(run_dir / "human_eval_key.csv")
    sel = pd.read_parquet(run_dir / "selections.parquet")
    export = run_dir / "human_eval"
    assert len(key) == len(PAIRS) * len(CONTRAST) and key["question"].is_unique
    assert {tuple(sorted(p)) for p in zip(key["set1_reward"], key["set2_reward"])} == {tuple(sorted(p)) for p in PAIRS}
    reward_names = sel["reward"].unique()
    for _, q in key.iterrows():
        page = (export / f"{q['question']}.html").read_text()
        assert q["prompt"] in page
        assert not any(r in page for r in reward_names), "a page names a reward"
        for side in ("set1", "set2"):
            top4 = sel[
                (sel["reward"] == q[f"{side}_reward"])
                & (sel["prompt_id"] == q["prompt_id"])
                & (sel["n"] == 8)
                & (sel["k"] == 4)
            ]
            shown = json.loads(q[f"{side}_images"])
            assert sorted(shown) == sorted(top4["image_id"])
            files = json.loads(q[f"{side}_files"])
            for image_id, f in zip(shown, files):
                assert f in page and re.fullmatch(r"img/[0-9a-f]{20}\.png", f)
                src = top4.loc[top4["image_id"] == image_id, "image"].iloc[0]
                assert (export / f).read_bytes() == Path(src).read_bytes()
    index = (export / "index.html").read_text()
    assert all(f'href="{q}.html"' in index for q in key["question"])
    assert not (export / "human_eval_key.csv").exists()  # the key stays outside the shipped folder


def test_a_rerun_recomputes_nothing(run_dir, ray_session, tmp_path):
    from tn_ray.experiments.bestofn import run

    cfg = load_config(run_dir.parent / "bestofn.yaml", BestOfNConfig)
    parts = sorted(p.name for p in (run_dir / "generation" / "manifest").iterdir())
    cache = sorted(str(p.relative_to(run_dir)) for p in (run_dir / "cache").rglob("*.parquet"))
    before = pd.read_parquet(run_dir / "selections.parquet")
    run(cfg)
    assert sorted(p.name for p in (run_dir / "generation" / "manifest").iterdir()) == parts
    assert sorted(str(p.relative_to(run_dir)) for p in (run_dir / "cache").rglob("*.parquet")) == cache
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "selections.parquet"), before)


# ---- configuration and input errors -------------------------------------------------------


@pytest.mark.parametrize(
    "extra,message",
    [
        (
            {"pools": [4, 300], "generation": {"pipeline": "tiny", "samples_per_prompt": 16}},
            "samples_per_prompt .16. is smaller than the largest pool 300",
        ),
        ({"top_k": [1, 8]}, r"top_k \[1, 8\] exceeds the smallest pool 4"),
        (
            {"human_eval": {"pairs": [["clip:tiny", "nope"]]}},
            r"human_eval.pairs: \['clip:tiny', 'nope'\] must name two "
            r"different rewards",
        ),
        ({"ensembles": [{"name": "e", "members": ["clip:tiny", "clip"]}]}, r"members \['clip'\] are not among models"),
        ({"generation": {"num_inference_step": 3}}, "key 'generation.num_inference_step': unknown key"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, **extra), BestOfNConfig)


def test_samples_per_prompt_follows_the_largest_pool(tmp_path):
    cfg = load_config(write_config(tmp_path), BestOfNConfig)
    assert cfg.generation.samples_per_prompt == 8


def test_prompts_without_contrastive_sets_and_bad_files_are_refused(tmp_path, tia2_dir):
    cfg = load_config(
        write_config(tmp_path, prompts=["a photo of three red circles", "an unknown prompt"]), BestOfNConfig
    )
    with pytest.raises(InputError, match=r"1 prompt\(s\) have no contrastive set .*'an unknown prompt'"):
        resolve_prompts(cfg, load_contrast(cfg.contrast))
    (tmp_path / "bad.json").write_text('{"x": "not a list"}')
    with pytest.raises(InputError, match="bad.json: the set of prompt 'x' must be a list of prompts"):
        load_contrast(str(tmp_path / "bad.json"))
    released = cfg.model_copy(update={"contrast": "released:counting", "prompts": None, "max_prompts": 3})
    prompts = resolve_prompts(released, load_contrast(released.contrast))
    assert len(prompts) == 3 and all(load_contrast(released.contrast)[p] for p in prompts)


# ---- selection as a pure function -----------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, (3, 8), elements=st.floats(-5, 5).map(lambda x: round(x, 1))))
def test_select_equals_sorting_with_ties_to_the_lower_sample(values):
    rewards = pd.DataFrame(
        {
            "prompt_id": np.repeat(np.arange(3), 8),
            "sample": np.tile(np.arange(8), 3),
            "r": values.ravel(),
            "minus_r": -values.ravel(),
        }
    )
    sel = select(rewards, ["r", "minus_r"], [2, 8], [1, 3])
    for pid in range(3):
        for n in (2, 8):
            for name, v in (("r", values[pid, :n]), ("minus_r", -values[pid, :n])):
                expected = sorted(range(n), key=lambda s: (-v[s], s))[:3]
                got = sel[(sel["prompt_id"] == pid) & (sel["reward"] == name) & (sel["n"] == n)]
                assert got[got["k"] == 3].sort_values("rank")["sample"].tolist() == expected[: min(3, n)]
                assert got[got["k"] == 1]["sample"].tolist() == expected[:1]
    table = summary(rewards, sel, ["r", "minus_r"])
    own = table[(table["selector"] == "r") & (table["judge"] == "r")].sort_values("n")["mean"].to_numpy()
    assert own[0] <= own[1] <= own[2]  # n = 1, 2, 8: nested pools


def test_select_refuses_short_pools_and_nan():
    rewards = pd.DataFrame({"prompt_id": [0, 0, 1], "sample": [0, 1, 0], "r": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="1 prompts have fewer than 2 samples .*prompt_id 1: 1"):
        select(rewards, ["r"], [2], [1])
    with pytest.raises(ValueError, match=r"reward columns \['r'\] contain NaN"):
        select(rewards.assign(r=[1.0, np.nan, 2.0]), ["r"], [1], [1])


def test_answers_become_win_counts_per_pair(run_dir):
    from tn_ray.analysis.human_eval import score_answers

    key = pd.read_csv(run_dir / "human_eval_key.csv")
    # the annotator always prefers whichever set the ensemble picked, and says "tie" otherwise
    answers = pd.DataFrame(
        {
            "question": key["question"],
            "answer": np.where(
                key["set1_reward"] == "ensemble-uncertainty",
                "set 1",
                np.where(key["set2_reward"] == "ensemble-uncertainty", "set 2", "tie"),
            ),
        }
    )
    counts = score_answers(key, answers).set_index(["pair", "winner"])["count"].to_dict()
    assert counts == {
        ("clip:tiny vs ensemble-uncertainty", "ensemble-uncertainty"): len(CONTRAST),
        ("pickscore:tiny vs textnorm(pickscore:tiny)", "tie"): len(CONTRAST),
    }


def test_the_papers_prompts_per_set_and_a_textnorm_kind_per_set(tia2_dir, monkeypatch):
    """30 prompts of each TIA2 set (release order) and TextNorm whose ensemble kind follows the
    prompt's set (mean on composition, eq. 3 elsewhere), as sweeps/bestofn_sd21.yaml asks."""
    from types import SimpleNamespace

    from tn_ray.config import validate
    from tn_ray.data import tia2
    from tn_ray.experiments.bestofn import reward_table
    from tn_ray.textnorm.columns import combine

    monkeypatch.setenv("TN_RAY_TIA2_DIR", str(tia2_dir))
    cfg = load_config(
        str(Path(__file__).resolve().parents[1] / "sweeps/bestofn_sd21.yaml"), BestOfNConfig, {"prompts_per_set": 2}
    )
    prompts = resolve_prompts(cfg, load_contrast(cfg.contrast))
    first = {s: list(tia2.load_prompt_sets(s, tia2_dir))[:2] for s in tia2.SETS}
    assert prompts == [*first["comprehensive"], *first["counting"], *first["composition"]]
    with pytest.raises(ConfigError, match="prompts_per_set"):
        validate(BestOfNConfig, {"contrast": "released:counting", "prompts_per_set": 3})
    rng = np.random.default_rng(0)
    items = pd.DataFrame(
        {"prompt_id": range(6), "prompt": prompts, "sample": 0, "image_id": range(6), "image": "x", "set": "bestofn"}
    )
    values = {m: rng.normal(size=(6, 4)) for m in cfg.models}
    matrices = {m: SimpleNamespace(align=lambda keys, v=v: SimpleNamespace(values=v)) for m, v in values.items()}
    got = reward_table(items, matrices, cfg)["textnorm"].to_numpy()
    members = ["imagereward", "pickscore"]
    mean = combine(values, members, [1.0, 1.0], "mean")
    unc = combine(values, members, [1.0, 1.0], "uncertainty", 1.0)
    np.testing.assert_allclose(got, np.r_[unc[:4], mean[4:]])
