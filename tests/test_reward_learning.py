"""Reward learning (issue 14): losses and ECE against hand computations, the split by prompt,
``learned:`` rewards through Ray actors vs in-process, and features computed once."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tn_ray.reward_learning.calibration import expected_calibration_error
from tn_ray.reward_learning.config import SplitBlock
from tn_ray.reward_learning.data import split_by_prompt
from tn_ray.reward_learning.losses import label_loss, prompt_classification_loss, total_loss

# a fixed batch: 3 images, contrastive sets of 2, 2 and 1 prompts (row 2 padded)
REWARDS = torch.tensor([[0.9, 0.2, -0.4], [0.1, 0.7, 0.3], [0.6, 0.5, 0.0]], dtype=torch.float64)
MASK = torch.tensor([[True, True, True], [True, True, True], [True, True, False]])
TARGET = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
GOOD = torch.tensor([True, False, True])


def test_label_losses_equal_hand_computation():
    r0 = [0.9, 0.1, 0.6]
    y = [1.0, 0.0, 1.0]
    mse = sum((a - b) ** 2 for a, b in zip(r0, y)) / 3
    assert label_loss(REWARDS[:, 0], TARGET, "mse").item() == pytest.approx(mse, rel=1e-12)
    sig = [1 / (1 + math.exp(-a)) for a in r0]
    bce = -sum(b * math.log(s) + (1 - b) * math.log(1 - s) for s, b in zip(sig, y)) / 3
    assert label_loss(REWARDS[:, 0], TARGET, "bce").item() == pytest.approx(bce, rel=1e-12)


def test_prompt_classification_loss_equals_hand_computation():
    t = 0.5
    # good rows only (0 and 2); row 2's third column is padding and must not count
    ce0 = -math.log(math.exp(0.9 / t) / sum(math.exp(v / t) for v in (0.9, 0.2, -0.4)))
    ce2 = -math.log(math.exp(0.6 / t) / sum(math.exp(v / t) for v in (0.6, 0.5)))
    got = prompt_classification_loss(REWARDS, MASK, GOOD, temperature=t).item()
    assert got == pytest.approx((ce0 + ce2) / 2, rel=1e-12)
    parts = total_loss(REWARDS, MASK, TARGET, GOOD, "mse", aux_weight=0.25, temperature=t)
    mse = ((0.9 - 1) ** 2 + 0.1**2 + (0.6 - 1) ** 2) / 3
    assert parts["loss"].item() == pytest.approx(mse + 0.25 * (ce0 + ce2) / 2, rel=1e-12)
    off = total_loss(REWARDS, MASK, TARGET, GOOD, "mse", aux_weight=0.0)
    assert off["loss"].item() == pytest.approx(mse, rel=1e-12) and off["aux"].item() == 0.0
    # no good image in the batch: the auxiliary term is 0, not NaN
    assert prompt_classification_loss(REWARDS, MASK, torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_ece_equals_hand_computation():
    prob = np.array([0.05, 0.15, 0.12, 0.95, 1.0, 0.55])
    label = np.array([0, 1, 0, 1, 1, 0])
    # bins (width 0.1): [0,.1): 0.05/0 -> |0-.05|; [.1,.2): .15,.12 / 1,0 -> |.5-.135|;
    # [.5,.6): .55/0 -> .55; [.9,1]: .95,1.0 / 1,1 -> |1-.975|
    hand = (1 * 0.05 + 2 * abs(0.5 - 0.135) + 1 * 0.55 + 2 * abs(1 - 0.975)) / 6
    assert expected_calibration_error(prob, label, 10) == pytest.approx(hand, rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(n_a=st.integers(1, 30), n_b=st.integers(1, 30), per=st.integers(1, 4), seed=st.integers(0, 10_000),
       val=st.sampled_from([0.0, 0.1, 0.2, 0.3]), test=st.sampled_from([0.0, 0.1, 0.2, 0.4]))
def test_split_puts_every_prompt_in_one_part(n_a, n_b, per, seed, val, test):
    rows = [
        (s, f"{s} prompt {i}", f"{s}/{i}_{k}")
        for s, n in (("a", n_a), ("b", n_b))
        for i in range(n)
        for k in range(per)
    ]
    rows.append(("b", "a prompt 0", "b/shared"))  # the same prompt text in two sets: still one part
    frame = pd.DataFrame(rows, columns=["set", "prompt", "image_key"])
    split = SplitBlock(val=val, test=test, seed=seed)
    part = split_by_prompt(frame, split)
    assert part.notna().all()
    assert (frame.assign(part=part).groupby("prompt")["part"].nunique() == 1).all()
    assert part.equals(split_by_prompt(frame.sample(frac=1, random_state=1).sort_index(), split))  # seeded, order-free
    for s, n in (("a", n_a), ("b", n_b)):  # stratified: each set with >= 3 prompts fills every requested part
        parts = set(part[(frame["set"] == s) & ~((frame["set"] == "b") & (frame["prompt"] == "a prompt 0"))])
        assert "train" in parts
        if n >= 3:
            assert ("val" in parts) == (val > 0) and ("test" in parts) == (test > 0)


def _shapes(root: Path, images_per_prompt: int = 2) -> Path:
    from tn_ray.data.shapes import make

    make(root, images_per_prompt=images_per_prompt, size=32)
    return root


def _config(root: Path, out: Path, **over) -> dict:
    sets = {
        s: {
            "labels": str(root / "tia2" / "human_annotations" / f"human_labels_{s}.json"),
            "images": str(root / "images" / s),
        }
        for s in ("counting", "composition")
    }
    cfg = {
        "out": str(out),
        "backbone": "clip:tiny",
        "feature_cache": str(root / "features"),
        "data": {
            "sets": sets,
            "contrast": str(root / "tia2" / "prompts" / "prompt_set_{set}.json"),
            "split": {"val": 0.3, "test": 0.3},
        },
        "head": {"hidden": 16, "layers": 1},
        "train": {"epochs": 2, "batch_size": 8},
        "report": {"compare_without_aux": False},
        "logging": {"tensorboard": False, "progress_bar": False},
    }
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def test_learned_reward_scores_the_same_on_ray_actors_and_in_process(ray_session, tmp_path):
    from tn_ray.rewards import build
    from tn_ray.rewards.learned_head import RewardHead, export
    from tn_ray.scoring.batch_scoring import score_matrices
    from tn_ray.textnorm.columns import RewardConfig

    root = _shapes(tmp_path / "shapes")
    torch.manual_seed(3)
    meta = {"backbone": "clip:tiny", "kind": "mse"}
    folder = export(RewardHead(32, hidden=8, layers=1), str(tmp_path / "heads"), meta)
    spec = f"learned:{folder}"
    labels = json.loads((root / "tia2" / "human_annotations" / "human_labels_counting.json").read_text())
    sets = json.loads((root / "tia2" / "prompts" / "prompt_set_counting.json").read_text())
    names = sorted(labels)[:5]
    items = pd.DataFrame(
        {
            "set": "counting",
            "prompt": [labels[n]["caption"] for n in names],
            "image_id": names,
            "image_key": names,
            "image": [str(root / "images" / "counting" / n) for n in names],
        }
    )
    items["texts"] = [[p, *sets[p]] for p in items["prompt"]]
    on_ray = score_matrices(items, [spec], tmp_path / "cache")[spec]
    local = build(spec, device="cpu").score_rows(list(items["image"]), list(items["texts"]))
    np.testing.assert_allclose(on_ray.values[:, : len(items["texts"][0])], np.stack(local), rtol=1e-5, atol=1e-6)
    # TextNorm applies to it as to any reward
    reward = RewardConfig(models=[spec], use=f"textnorm({spec})")
    col = reward.column({spec: on_ray.values})
    assert np.isfinite(col).all() and ((col > 0) & (col <= 1)).all()


def test_second_training_run_encodes_no_image(ray_session, tmp_path):
    from tn_ray.config import validate
    from tn_ray.reward_learning.config import RewardTrainConfig
    from tn_ray.reward_learning.pipeline import run

    root = _shapes(tmp_path / "shapes")
    first = run(validate(RewardTrainConfig, _config(root, tmp_path / "run1")))
    n_images = first["summary"]["images"]
    assert first["summary"]["features"]["images_encoded"] == n_images > 0
    assert first["summary"]["features"]["texts_encoded"] > 0
    # another head and loss on the same data: every embedding and backbone reward comes from the cache
    second = run(
        validate(RewardTrainConfig, _config(root, tmp_path / "run2", head={"hidden": 8}, loss={"kind": "bce"}))
    )
    assert second["summary"]["features"] == {"images_encoded": 0, "texts_encoded": 0, "backbone_rewards_computed": 0}
    for out in (tmp_path / "run1", tmp_path / "run2"):
        table = pd.read_csv(out / "per_set_test.csv")
        assert {"learned", "clip:tiny", "textnorm(learned)", "textnorm(clip:tiny)"} <= set(table["reward"])
        assert (out / "reliability_test.png").stat().st_size > 0
    spec = second["summary"]["reward"]
    assert spec.startswith("learned:") and Path(spec.split(":", 1)[1], "head.json").is_file()


def test_bad_configs_fail_before_ray(tmp_path):
    from tn_ray.config import ConfigError, validate
    from tn_ray.reward_learning.config import RewardTrainConfig
    from tn_ray.sweep import registry
    from tn_ray.sweep.runner import load

    with pytest.raises(ConfigError, match="backbone"):
        validate(RewardTrainConfig, _config(tmp_path, tmp_path / "o", backbone="nosuchmodel"))
    with pytest.raises(ConfigError, match="cross-encoder"):
        validate(RewardTrainConfig, _config(tmp_path, tmp_path / "o", backbone="imagereward:tiny"))
    with pytest.raises(ConfigError, match="leaves no training prompts"):
        validate(RewardTrainConfig, _config(tmp_path, tmp_path / "o", data={"split": {"val": 0.5, "test": 0.5}}))
    entry = registry.get("reward_head")
    assert (
        entry.check_param(None, "lr", -1.0)
        and entry.check_param(None, "hidden", 0)
        and entry.check_param(None, "nope", 1)
    )
    assert entry.check_param(None, "aux_weight", 0.0) is None
    load(Path(__file__).resolve().parents[1] / "sweeps" / "reward_head.yaml")


def test_contrastive_prompts_from_a_prompt_source(tmp_path):
    from tn_ray.reward_learning.config import DataBlock
    from tn_ray.reward_learning.data import attach_texts

    frame = pd.DataFrame(
        {"set": ["s", "s", "t"], "prompt": ["a photo of three red circles"] * 2 + ["a photo of a blue square"]}
    )
    data = DataBlock(sets={"s": {"labels": "l.json", "images": "i"}}, contrast="rules", max_contrast=3)
    texts = attach_texts(frame, data)["texts"].tolist()
    assert [t[0] for t in texts] == list(frame["prompt"]) and texts[0] == texts[1]
    assert all(1 < len(t) <= 4 and len(set(t)) == len(t) for t in texts)
    assert "a photo of two red circles" in texts[0]
