"""The fine-tuning core shared by RWR and DDPO: losses, weights, selection, monitor, policy, checkpoints."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tn_ray.training.losses import kl_surrogate, rwr_loss, weighted_denoising
from tn_ray.training.monitor import Monitor
from tn_ray.training.selection import select_checkpoint, win_counts
from tn_ray.training.weights import reward_weights, top_k_per_group


# --- pure functions -----------------------------------------------------------------------
def test_rwr_loss_equals_hand_computation():
    g = torch.Generator().manual_seed(3)
    pred, noise, ref = (torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64) for _ in range(3))
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    beta = 0.75
    p, n, r = pred.numpy(), noise.numpy(), ref.numpy()
    hand_denoise = sum(w[i].item() * np.mean((n[i] - p[i]) ** 2) for i in range(3)) / 3
    hand_kl = sum(np.mean((p[i] - r[i]) ** 2) for i in range(3)) / 3
    out = rwr_loss(pred, noise, w, beta=beta, ref_pred=ref)
    assert out["denoise"].item() == pytest.approx(hand_denoise, rel=1e-6)
    assert out["kl"].item() == pytest.approx(hand_kl, rel=1e-6)
    assert out["loss"].item() == pytest.approx(hand_denoise + beta * hand_kl, rel=1e-6)
    assert weighted_denoising(pred, noise, w).item() == pytest.approx(hand_denoise, rel=1e-6)
    assert kl_surrogate(pred, ref).shape == (3,)


def test_rwr_loss_no_gradient_into_reference():
    pred = torch.randn(2, 4, 2, 2, requires_grad=True)
    ref = torch.randn(2, 4, 2, 2, requires_grad=True)
    rwr_loss(pred, torch.zeros_like(pred), torch.ones(2), beta=1.0, ref_pred=ref)["loss"].backward()
    assert pred.grad is not None and ref.grad is None
    with pytest.raises(ValueError, match="ref_pred"):
        rwr_loss(pred, pred, torch.ones(2), beta=0.5)


def test_weights_and_top_k():
    r = np.array([0.2, 0.9, 0.5, 0.1, 0.3, 0.3])
    g = ["a", "a", "a", "b", "b", "b"]
    assert top_k_per_group(r, g, 2).tolist() == [1, 2, 4, 5]  # tie 0.3/0.3: lower index first
    assert reward_weights(r, g, "value").tolist() == r.tolist()
    mm = reward_weights(r, g, "minmax")
    np.testing.assert_allclose(mm, [0.0, 1.0, 3 / 7, 0.0, 1.0, 1.0])
    sm = reward_weights(r, g, "softmax", temperature=0.5)
    e = np.exp(r / 0.5)
    np.testing.assert_allclose(sm, 6 * e / e.sum())
    assert sm.mean() == pytest.approx(1.0)
    np.testing.assert_allclose(reward_weights([1.0, 1.0], ["x", "x"], "minmax"), [1.0, 1.0])
    with pytest.raises(ValueError, match="rewards >= 0"):
        reward_weights([-1.0, 2.0], ["x", "x"], "value")


def test_selection_picks_earliest_maximum():
    base = pd.DataFrame([(p, s, "judge", 0.5) for p in range(2) for s in range(3)] + [(p, s, "train", 0.0) for p in range(2) for s in range(3)],
                        columns=["prompt_id", "seed", "reward", "value"])
    # wins per step under the judge: step 10 -> 2, step 20 -> 5, step 30 -> 5, step 40 -> 3
    wins = {10: 2, 20: 5, 30: 5, 40: 3}
    rows = []
    for step, k in wins.items():
        for i, (p, s) in enumerate((p, s) for p in range(2) for s in range(3)):
            rows.append((step, p, s, "judge", 0.9 if i < k else 0.5))  # equal to base is not a win
            rows.append((step, p, s, "train", float(step)))
    scores = pd.DataFrame(rows, columns=["step", "prompt_id", "seed", "reward", "value"])
    counts = win_counts(scores, base)
    assert counts[counts["reward"] == "judge"].set_index("step")["wins"].to_dict() == wins
    assert select_checkpoint(counts, "judge") == 20
    assert select_checkpoint(counts, "train") == 10  # every step beats the base on every image: earliest
    with pytest.raises(ValueError, match="no evaluation counts"):
        select_checkpoint(counts, "other")


def test_monitor_flags_overoptimization_and_stays_quiet():
    m = Monitor(window=2)
    history = [(0, 1.0, 0.5), (10, 1.1, 0.6), (20, 1.3, 0.55), (30, 1.6, 0.4)]  # judge peaks at 10, then falls
    flags = [m.update(s, t, {"judge": j}) for s, t, j in history]
    assert flags[:3] == [None, None, None]  # at 20 the judge is above its value at 0
    assert flags[3] is not None and flags[3].window_start == 10 and flags[3].judge_changes["judge"] == pytest.approx(-0.2)
    quiet = Monitor(window=2)
    assert all(quiet.update(s, 1.0 + s, {"judge": 0.5 + s / 100, "other": s}) is None for s in range(0, 60, 10))
    no_judges = Monitor(window=1)
    assert all(no_judges.update(s, float(s), {}) is None for s in range(5))
    restored = Monitor(window=2)
    restored.load_state_dict(m.state_dict())
    assert restored.history == m.history and restored.flags == m.flags


def test_config_rejects_training_reward_as_judge():
    from tn_ray.config import ConfigError, validate
    from tn_ray.training.config import FineTuneConfig

    reward = {"models": ["brightness"], "use": "brightness"}
    with pytest.raises(ConfigError, match="held out"):
        validate(FineTuneConfig, {"reward": reward, "eval": {"judges": [reward]}})
    with pytest.raises(ConfigError, match="select_by"):
        validate(FineTuneConfig, {"reward": reward, "eval": {"select_by": "clip:tiny"}})
    cfg = validate(FineTuneConfig, {"reward": reward, "eval": {"judges": [{"models": ["clip:tiny"], "use": "clip:tiny"}]}})
    assert cfg.selection_judge == "clip:tiny"


# --- policy and checkpoints on the tiny pipeline -----------------------------------------
@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([50, 700]), torch.randn(2, 4, 16, 16, generator=g)


def _policy(seed: int = 0):
    from tn_ray.training.config import PolicyBlock
    from tn_ray.training.policy import Policy

    return Policy.load(PolicyBlock(pipeline="tiny", lora={"rank": 4}), device="cpu", seed=seed)


def _train(policy, inputs, steps: int, lr: float = 1e-2):
    from tn_ray.training.config import OptimizerBlock
    from tn_ray.training.optim import Optimization

    x, t, noise = inputs
    emb = policy.encode_prompts(["a red square", "a blue circle"])
    optim = Optimization(policy.trainable_parameters(), OptimizerBlock(lr=lr), steps, policy.device)
    for _ in range(steps):
        optim.backward(rwr_loss(policy.noise_pred(x, t, emb), noise, torch.ones(2))["loss"])
        optim.step()
    return emb, optim


def test_only_lora_changes_and_reference_is_the_untouched_base(inputs):
    from tn_ray.diffusion.pipelines import tiny_pipeline

    policy = _policy()
    assert all(".lora_" in n for n in policy.trainable_names()) and policy.trainable_names()
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    before = {k: v.clone() for k, v in policy.unet.state_dict().items()}
    emb, _ = _train(policy, inputs, steps=2)
    after = policy.unet.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(".lora_B" in k or ".lora_A" in k for k in changed)
    x, t, _ = inputs
    untouched = tiny_pipeline().unet.eval()
    with torch.no_grad():
        base = untouched(x, t, encoder_hidden_states=emb).sample
        trained = policy.noise_pred(x, t, emb)
    torch.testing.assert_close(policy.reference_pred(x, t, emb), base, rtol=0, atol=1e-6)
    assert (trained - base).abs().max() > 1e-3  # the adapter is active outside reference()


def test_checkpoint_loads_into_plain_pipeline_and_resumes_the_trained_adapter(tmp_path, inputs):
    from tn_ray.diffusion.pipelines import tiny_pipeline
    from tn_ray.training.checkpoint import Checkpoints, rng_state, set_rng_state

    policy = _policy()
    emb, optim = _train(policy, inputs, steps=2)
    x, t, _ = inputs
    with torch.no_grad():
        trained = policy.noise_pred(x, t, emb)
        base = policy.reference_pred(x, t, emb)
    ckpts = Checkpoints(tmp_path / "run")
    uri = ckpts.save(2, policy, {"optim": optim.state_dict(), "rng": rng_state(), "method": {"position": 7}})
    assert ckpts.steps() == [2] and ckpts.latest() == 2

    plain = tiny_pipeline()
    plain.load_lora_weights(uri)
    with torch.no_grad():
        torch.testing.assert_close(plain.unet(x, t, encoder_hidden_states=emb).sample, trained, rtol=0, atol=1e-5)

    # resume into a fresh policy (trl issue 2505: the loaded LoRA must be the active one, not the base)
    fresh = _policy()
    state = ckpts.load(2)
    fresh.load_lora_state(state["lora"])
    with torch.no_grad():
        resumed = fresh.noise_pred(x, t, emb)
    torch.testing.assert_close(resumed, trained, rtol=0, atol=0)
    assert (resumed - base).abs().max() > 1e-3
    assert state["method"] == {"position": 7} and state["step"] == 2
    torch.manual_seed(123)
    saved = rng_state()
    a = torch.rand(3)
    set_rng_state(saved)
    assert torch.equal(torch.rand(3), a)

    # an incomplete checkpoint (no complete.json: killed while writing) is ignored; pruning keeps protected steps
    ckpts.store.write_bytes("checkpoints/step-000003/state.pt", b"partial")
    assert ckpts.steps() == [2]
    ckpts.save(4, policy, {"rng": rng_state()})
    ckpts.save(6, policy, {"rng": rng_state()})
    assert ckpts.prune(keep_last=1, protect={2}) == [4] and ckpts.steps() == [2, 6]


def test_tracker_writes_tensorboard_and_offline_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from tn_ray.training.config import LoggingBlock
    from tn_ray.training.tracking import Tracker

    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = Tracker(LoggingBlock(wandb_project="tn-ray-test", wandb_mode="offline", progress_bar=False), str(tmp_path), 4,
                      run_config={"beta": 0.5})
    tracker.log(1, {"loss": 0.5, "kl": 0.01})
    tracker.log(1, {"textnorm(clip:tiny)": 0.3}, prefix="eval")
    tracker.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    runs = list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
