"""Path KL to the base model at evaluation: the step KL against torch's Normal KL, the chain recomputation,
exactly 0 for fresh LoRA adapters and > 0 after they move, and an evaluation that logs and stores it."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tn_ray.training.losses import gaussian_step_kl, path_kl

PROMPTS = ["a photo of a lighthouse", "a watercolor of a red circle"]
SEEDS = [0, 1]


# --- the math -------------------------------------------------------------------------------
def _normal_kl(mean_p: torch.Tensor, mean_r: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """torch's KL of N(mean_p, std^2) || N(mean_r, std^2) per dim (float64), summed over the non-batch dims."""
    std = std.double().expand_as(mean_p)
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean_p.double(), std), torch.distributions.Normal(mean_r.double(), std)
    )
    return kl.flatten(1).sum(1)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 4),
    dims=st.sampled_from([(1, 1, 1), (4, 2, 3), (4, 8, 8)]),
    scale=st.floats(1e-3, 10.0),
    std_lo=st.floats(1e-2, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_gaussian_step_kl_is_torchs_normal_kl_summed_over_dims(batch, dims, scale, std_lo, seed):
    g = torch.Generator().manual_seed(seed)
    mean_p = torch.randn(batch, *dims, generator=g) * scale
    mean_r = torch.randn(batch, *dims, generator=g) * scale
    std = std_lo + torch.rand(batch, 1, 1, 1, generator=g)  # one std per row, as ddim_step's
    got = gaussian_step_kl(mean_p, mean_r, std)
    assert got.shape == (batch,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _normal_kl(mean_p, mean_r, std), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gaussian_step_kl(mean_p, mean_r, std.reshape(-1)), got)  # (B,) std alike
    assert torch.equal(gaussian_step_kl(mean_p, mean_p, std), torch.zeros(batch))


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), steps=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_path_kl_is_the_sum_of_step_kls(batch, steps, seed):
    g = torch.Generator().manual_seed(seed)
    means_p, means_r = (torch.randn(batch, steps, 4, 3, 3, generator=g) for _ in range(2))
    stds = 0.05 + torch.rand(batch, steps, 1, 1, 1, generator=g)
    expected = sum(_normal_kl(means_p[:, t], means_r[:, t], stds[:, t]) for t in range(steps))
    got = path_kl(means_p, means_r, stds)
    assert got.shape == (batch,)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(path_kl(means_p, means_r, stds.reshape(batch, steps)), got)


def test_step_kl_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one per row"):
        gaussian_step_kl(torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(3))
    with pytest.raises(ValueError, match="shapes differ"):
        path_kl(torch.zeros(2, 3, 4), torch.zeros(2, 2, 4), torch.ones(2, 3))


# --- on the tiny pipeline -----------------------------------------------------------------------
def _policy():
    from tn_ray.training.config import PolicyBlock
    from tn_ray.training.policy import Policy

    torch.set_num_threads(1)
    return Policy.load(PolicyBlock(pipeline="tiny", lora={"rank": 4}), device="cpu", seed=0)


def _block(**kw):
    from tn_ray.training.config import EvalBlock

    return EvalBlock(
        **{"num_inference_steps": 4, "guidance_scale": 3.0, "height": 32, "width": 32, "batch_size": 3, **kw}
    )


def _perturb(policy, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.add_(scale * torch.randn(p.shape, generator=g))


def test_path_kl_is_zero_for_fresh_adapters_and_positive_once_they_move():
    """LoRA B = 0: the policy's chain and the base model's recomputed steps agree bit for bit, path KL
    exactly 0; perturbed LoRA weights: every image's path KL > 0, larger for a larger perturbation, and
    the same numbers on a rerun (one generator per image); the pipeline's scheduler is left alone."""
    from tn_ray.training.evaluation import path_kls

    policy = _policy()
    sched = policy.pipe.scheduler
    block = _block()
    assert path_kls(policy, PROMPTS, SEEDS, block) == [0.0] * 4
    assert policy.pipe.scheduler is sched and sched.num_inference_steps is None
    _perturb(policy)
    small = path_kls(policy, PROMPTS, SEEDS, block)
    assert all(v > 0 for v in small), small
    assert path_kls(policy, PROMPTS, SEEDS, _block(batch_size=1)) == pytest.approx(small, rel=1e-4)
    _perturb(policy, 0.2)
    large = path_kls(policy, PROMPTS, SEEDS, block)
    assert sum(large) > sum(small), (small, large)
    print("path KL per image (nats): perturbed 0.05", small, "then + 0.2", large)


def test_recomputed_chain_means_equal_the_sampled_ones():
    """chain_means with the sampling weights reproduces every recorded step's mean and std exactly; under
    reference() on a moved policy they differ (the base model's steps on the policy's states)."""
    from diffusers import DDIMScheduler

    from tn_ray.diffusion.sampling import chain_means, sample_chains

    policy = _policy()
    _perturb(policy)
    pipe = policy.pipe
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    recorded = []
    chains = sample_chains(
        pipe,
        PROMPTS,
        [0, 1],
        num_steps=4,
        guidance=3.0,
        eta=1.0,
        generator=[torch.Generator().manual_seed(s) for s in SEEDS],
        on_step=recorded.append,
    )
    means, stds = chain_means(pipe.unet, pipe.scheduler, chains, 3.0, 1.0)
    assert torch.equal(means, torch.stack([o.mean for o in recorded], dim=1))
    assert torch.equal(stds, torch.stack([o.std.reshape(-1) for o in recorded], dim=1))
    with policy.reference():
        ref, ref_stds = chain_means(pipe.unet, pipe.scheduler, chains, 3.0, 1.0)
    assert torch.equal(ref_stds, stds) and not torch.equal(ref, means)


# --- an evaluation logs it, stores it beside the scores, reports carry it --------------------------
def test_evaluation_logs_path_kl_beside_unchanged_scores(tmp_path, monkeypatch):
    """Evaluator.evaluate (rewards stubbed: no Ray) returns eval_path_kl = the mean of
    eval/path_kl/<step>.parquet; read_scores and the win counts see only eval/scores; write_outputs'
    eval.csv gains a path_kl column (0 at step 0) and selection is as before."""
    import json

    import numpy as np

    from tn_ray.storage import Store
    from tn_ray.training.config import FineTuneConfig
    from tn_ray.training.evaluation import Evaluator, read_path_kl, read_scores
    from tn_ray.training.outputs import write_outputs

    def fake_score(self, images):  # one column: brightness of the PNG bytes' length, deterministic
        n = len(self.seeds)
        return pd.DataFrame(
            [
                (i // n, self.seeds[i % n], self.prompts[i // n], "brightness", float(len(b) % 97))
                for i, b in enumerate(images)
            ],
            columns=["prompt_id", "seed", "prompt", "reward", "value"],
        )

    monkeypatch.setattr(Evaluator, "score", fake_score)
    out = tmp_path / "run"
    cfg = FineTuneConfig.model_validate(
        {
            "out": str(out),
            "reward": {"models": ["brightness"], "use": "brightness"},
            "eval": {"prompts": PROMPTS, "seeds": SEEDS, "num_inference_steps": 3, "height": 32, "width": 32},
        }
    )
    policy = _policy()
    ev = Evaluator(cfg, PROMPTS)
    ev.base(policy)
    _perturb(policy)
    result = ev.evaluate(2, policy)
    table = read_path_kl(str(out))
    assert list(table.columns) == ["prompt_id", "seed", "prompt", "step", "path_kl"] and len(table) == 4
    assert (table["path_kl"] > 0).all() and (table["step"] == 2).all()
    assert result["eval_path_kl"] == pytest.approx(table["path_kl"].mean())
    scores, _ = read_scores(str(out))
    assert set(scores["reward"]) == {"brightness"} and len(scores) == 4 and ev.evaluated_steps() == [2]
    Store(str(out)).write_bytes("checkpoints/step-000002/pytorch_lora_weights.safetensors", b"lora")
    write_outputs(cfg, PROMPTS)
    csv = pd.read_csv(out / "eval.csv")
    assert csv.set_index("step")["path_kl"].to_dict() == pytest.approx({0: 0.0, 2: result["eval_path_kl"]})
    assert json.loads((out / "selection.json").read_text())["step"] == 2
    assert np.isfinite(csv["mean"]).all()

    cfg_off = cfg.model_copy(
        update={"out": str(tmp_path / "off"), "eval": cfg.eval.model_copy(update={"path_kl": False})}
    )
    ev_off = Evaluator(cfg_off, PROMPTS)
    ev_off.base(policy)
    assert "eval_path_kl" not in ev_off.evaluate(2, policy) and read_path_kl(cfg_off.out).empty


# --- flow-matching policies (GRPO): the flow SDE's steps, the same path_kl ------------------------
def test_flow_path_kl_of_identical_policies_is_zero_and_a_mean_shift_matches_a_hand_computation():
    """Flow-GRPO SDE steps (no model: velocities given) on FlowMatchEulerDiscreteScheduler(shift=3), 4 steps,
    a = 0.7. The reference's velocity is the policy's + delta on every dim, on the same states: the step mean
    moves by c delta with c = dt (1 + sigma_t^2 (1 - t) / (2 t)), std = sigma_t sqrt(|dt|) is shared, so each
    step's KL is D (c delta)^2 / (2 std^2); sigma_t = a sqrt(t / (1 - t')), t' = t except t = 1 -> sigmas[1].
    Identical velocities: path KL exactly 0."""
    import math

    from diffusers import FlowMatchEulerDiscreteScheduler

    from tn_ray.diffusion.flow_sde import flow_sde_step

    a, delta, steps = 0.7, 0.1, 4
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    sigmas = [float(s) for s in sched.sigmas]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 2, 2, generator=g)
    means, ref_means, stds, expected = [], [], [], 0.0
    for i in range(steps):
        v = torch.randn(x.shape, generator=g)
        pol = flow_sde_step(sched, v, i, x, a, generator=g)
        ref = flow_sde_step(sched, v + delta, i, x, a, prev_sample=pol.prev_sample)
        torch.testing.assert_close(ref.std, pol.std, rtol=0, atol=0)
        means.append(pol.mean)
        ref_means.append(ref.mean)
        stds.append(pol.std.reshape(-1))
        t, dt = sigmas[i], sigmas[i + 1] - sigmas[i]
        sigma_t = a * math.sqrt(t / (1 - (sigmas[1] if t == 1.0 else t)))
        c = dt * (1 + sigma_t**2 * (1 - t) / (2 * t))
        expected += x[0].numel() * (c * delta) ** 2 / (2 * sigma_t**2 * abs(dt))
        x = pol.prev_sample
    assert sigmas[0] == 1.0  # the clamp is exercised
    means, ref_means, stds = torch.stack(means, 1), torch.stack(ref_means, 1), torch.stack(stds, 1)
    assert path_kl(means, means.clone(), stds).tolist() == [0.0, 0.0]
    torch.testing.assert_close(path_kl(means, ref_means, stds), torch.full((2,), expected, dtype=torch.float32),
                               rtol=1e-4, atol=0)


def _flow_policy():
    from tn_ray.training.config import PolicyBlock
    from tn_ray.training.policy import FlowPolicy, Policy

    torch.set_num_threads(1)
    policy = Policy.load(PolicyBlock(pipeline="tiny-sd3", lora={"rank": 4}), device="cpu", seed=0)
    assert isinstance(policy, FlowPolicy)
    return policy


def _perturb_model(policy, scale: float) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.add_(scale * torch.randn(p.shape, generator=g))


def test_flow_policy_path_kl_is_zero_for_fresh_adapters_and_positive_once_they_move():
    """The evaluation's path_kls on a FlowPolicy (tiny-sd3): flow SDE chains at eval.kl_noise_level, the base
    transformer's step means on the same states. LoRA B = 0: exactly 0; moved: > 0, growing with the move, the
    same per image whatever the batch size; a larger noise level gives a smaller KL (std grows with a)."""
    from tn_ray.training.evaluation import path_kls

    policy = _flow_policy()
    block = _block(guidance_scale=4.5, num_inference_steps=3)
    assert path_kls(policy, PROMPTS, SEEDS, block) == [0.0] * 4
    _perturb_model(policy, 0.05)
    small = path_kls(policy, PROMPTS, SEEDS, block)
    assert all(v > 0 for v in small), small
    assert path_kls(policy, PROMPTS, SEEDS, _block(guidance_scale=4.5, num_inference_steps=3, batch_size=1)) == (
        pytest.approx(small, rel=1e-4))
    noisier = path_kls(policy, PROMPTS, SEEDS, _block(guidance_scale=4.5, num_inference_steps=3, kl_noise_level=1.0))
    assert sum(noisier) < sum(small), (small, noisier)
    _perturb_model(policy, 0.2)
    assert sum(path_kls(policy, PROMPTS, SEEDS, block)) > sum(small)


def test_eval_kl_noise_level_is_checked():
    from tn_ray.training.config import EvalBlock

    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="noise_level must be in"):
            EvalBlock(kl_noise_level=bad)
