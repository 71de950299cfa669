"""GRPO's advantages, loss and KLs against hand computations, flow_grpo's formulas and torch.distributions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tn_ray.diffusion.flow_sde import flow_sde_step
from tn_ray.training.grpo_loss import (
    ADV_EPS,
    flow_grpo_kl,
    group_advantages,
    grpo_loss,
    train_step_indices,
)
from tn_ray.training.losses import gaussian_step_kl, path_kl


def test_group_advantages_by_hand():
    """Groups {1, 3} and {0, 4}: means 2 and 2, population stds 1 and 2; global std sqrt(2.5)."""
    rewards = [1.0, 3.0, 0.0, 4.0]
    ids = [7, 7, 9, 9]
    adv = group_advantages(rewards, ids, eps=0.0)
    assert adv.tolist() == [-1.0, 1.0, -1.0, 1.0]
    glob = group_advantages(rewards, ids, eps=0.0, global_std=True)
    torch.testing.assert_close(glob, torch.tensor([-1.0, 1.0, -2.0, 2.0], dtype=torch.float64) / math.sqrt(2.5))
    with_eps = group_advantages(rewards, ids)
    torch.testing.assert_close(with_eps, torch.tensor([-1 / (1 + 1e-4), 1 / (1 + 1e-4), -2 / (2 + 1e-4),
                                                       2 / (2 + 1e-4)], dtype=torch.float64))
    assert ADV_EPS == 1e-4


def flow_grpo_tracker(prompts, rewards, global_std):
    """flow_grpo's PerPromptStatTracker.update (stat_tracking.py at ac4c86e), its formula restated."""
    prompts, rewards = np.array(prompts), np.array(rewards, dtype=np.float64)
    out = np.empty_like(rewards)
    for p in np.unique(prompts):
        group = rewards[prompts == p]
        std = (np.std(rewards) if global_std else np.std(group)) + 1e-4
        out[prompts == p] = (group - np.mean(group)) / std
    return out


@pytest.mark.parametrize("global_std", [False, True])
def test_group_advantages_equal_flow_grpos_tracker(global_std):
    rng = np.random.default_rng(0)
    prompts = np.repeat(["a", "b", "c"], 24)  # group 24, Flow-GRPO's published size
    rng.shuffle(prompts)
    rewards = rng.normal(size=prompts.size)
    ids = [ord(p) for p in prompts]
    ours = group_advantages(rewards, ids, global_std=global_std).numpy()
    np.testing.assert_allclose(ours, flow_grpo_tracker(prompts, rewards, global_std), rtol=1e-12, atol=1e-12)


def test_a_group_of_one_is_refused():
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages([1.0, 2.0, 3.0], [0, 0, 1])
    with pytest.raises(ValueError, match="3 rewards but 2 group ids"):
        group_advantages([1.0, 2.0, 3.0], [0, 0])
    with pytest.raises(ValueError, match="finite"):
        group_advantages([1.0, float("nan")], [0, 0])


def test_equal_rewards_give_zero_advantages():
    assert group_advantages([0.5, 0.5, 0.5], [1, 1, 1]).tolist() == [0.0, 0.0, 0.0]


def test_grpo_loss_by_hand():
    """Ratio 1: the loss is mean(-A) = -1.5; ratio 1.5, clip 0.2: A = 1 takes the clipped 1.2, A = -1 the
    unclipped 1.5: mean(-1.2, 1.5) = 0.15, clip_frac 1."""
    zero = torch.zeros(2)
    out = grpo_loss(zero, zero, torch.tensor([1.0, 2.0]), clip_range=1e-4, adv_clip_max=5.0)
    assert out["loss"].item() == -1.5 and out["kl"].item() == 0.0 and out["clip_frac"].item() == 0.0
    assert math.isnan(out["kl_exact"].item())
    up = torch.full((2,), math.log(1.5))
    out = grpo_loss(up, zero, torch.tensor([1.0, -1.0]), clip_range=0.2, adv_clip_max=5.0)
    assert out["policy_loss"].item() == pytest.approx(0.15, abs=1e-6)
    assert out["clip_frac"].item() == 1.0
    out = grpo_loss(zero, zero, torch.tensor([10.0, -1.0]), clip_range=1e-4, adv_clip_max=5.0)
    assert out["loss"].item() == -2.0  # the advantage 10 clipped to 5: mean(-5, 1)


def test_kl_terms_by_hand():
    """Rows differ from the reference by 1 and 2 in each of D = 4 dims; sigma_t = 0.5, dt = -0.25, so
    std = 0.25. Flow-GRPO: 1 / (2 * 0.25) = 2 and 4 / 0.5 = 8; exact: 4 / (2 * 0.0625) = 32 and 128;
    K = KL |dt| / D. With beta = 0.04: loss = policy loss + 0.04 * 5."""
    mean = torch.zeros(2, 1, 2, 2)
    ref = torch.stack([torch.ones(1, 2, 2), 2 * torch.ones(1, 2, 2)])
    sigma_t = torch.full((2, 1, 1, 1), 0.5)
    std = sigma_t * math.sqrt(0.25)
    assert flow_grpo_kl(mean, ref, sigma_t).tolist() == [2.0, 8.0]
    assert gaussian_step_kl(mean, ref, std).tolist() == [32.0, 128.0]
    zero = torch.zeros(2)
    out = grpo_loss(zero, zero, torch.tensor([1.0, 2.0]), 1e-4, 5.0, beta=0.04, mean=mean, ref_mean=ref,
                    sigma_t=sigma_t, std=std)
    assert out["kl"].item() == 5.0 and out["kl_exact"].item() == 80.0
    assert out["loss"].item() == pytest.approx(-1.5 + 0.04 * 5.0, abs=1e-7)
    with pytest.raises(ValueError, match="beta > 0 needs"):
        grpo_loss(zero, zero, torch.tensor([1.0, 2.0]), 1e-4, 5.0, beta=0.04)


def test_kls_of_real_steps_relate_as_documented():
    """On the SDE steps of two velocities: the exact KL is torch.distributions' KL summed over dims, and
    flow_grpo_kl = gaussian_step_kl * |dt| / D at every step; gradients reach the policy's velocity only."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, generator=g)
    v_ref = torch.randn(3, 4, 5, 5, generator=g)
    v = (v_ref + 0.1 * torch.randn(3, 4, 5, 5, generator=g)).requires_grad_(True)
    d = 4 * 5 * 5
    for i in range(10):
        pol = flow_sde_step(sched, v, i, x, 0.7, prev_sample=x)
        ref = flow_sde_step(sched, v_ref, i, x, 0.7, prev_sample=x)
        exact = gaussian_step_kl(pol.mean, ref.mean, pol.std)
        dist = torch.distributions.kl_divergence(torch.distributions.Normal(pol.mean, pol.std.expand_as(pol.mean)),
                                                 torch.distributions.Normal(ref.mean, ref.std.expand_as(ref.mean)))
        torch.testing.assert_close(exact, dist.sum(dim=(1, 2, 3)), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(flow_grpo_kl(pol.mean, ref.mean, pol.sigma_t),
                                   exact * pol.dt.reshape(-1).abs() / d, rtol=1e-5, atol=1e-8)
    flow_grpo_kl(pol.mean, ref.mean, pol.sigma_t).sum().backward()
    assert v.grad is not None and float(v.grad.abs().sum()) > 0


def test_the_clipped_surrogate_is_ddpos():
    """One implementation: grpo_loss's policy term is ddpo_loss's (tn_ray.training.ddpo_loss)."""
    from tn_ray.training.ddpo_loss import ddpo_loss

    g = torch.Generator().manual_seed(1)
    lp, old, adv = torch.randn(8, generator=g) * 1e-3, torch.randn(8, generator=g) * 1e-3, torch.randn(8, generator=g)
    ours = grpo_loss(lp, old, adv, 1e-4, 5.0)
    theirs = ddpo_loss(lp, old, adv, 1e-4, 5.0)
    for key in ("policy_loss", "approx_kl", "clip_frac"):
        assert torch.equal(ours[key], theirs[key])


def test_path_kl_sums_the_steps_exact_kls():
    """Two steps, D = 4: step 1 differs by 1 with std 0.5 (KL 4 * 1 / 0.5 = 8), step 2 by 2 with std 1
    (4 * 4 / 2 = 8): path KL 16 for row 0; row 1 equal means: 0. No steps: 0."""
    means = torch.zeros(2, 2, 1, 2, 2)
    ref = means.clone()
    ref[0, 0] += 1.0
    ref[0, 1] += 2.0
    stds = torch.tensor([[0.5, 1.0], [0.5, 1.0]])
    assert path_kl(means, ref, stds).tolist() == [16.0, 0.0]
    assert path_kl(means[:, :0], ref[:, :0], stds[:, :0]).tolist() == [0.0, 0.0]


def test_train_step_indices_are_flow_grpos_first_steps():
    """train_sd3.py: int(num_steps * timestep_fraction) first steps; 10 x 0.99 = 9 (its SD 3.5 configs)."""
    assert train_step_indices(10, 0.99) == list(range(9))
    assert train_step_indices(10, 1.0) == list(range(10))
    assert train_step_indices(3, 0.1) == [0] and train_step_indices(0, 0.5) == []
    with pytest.raises(ValueError, match="timestep_fraction must be in"):
        train_step_indices(10, 0.0)


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(2, 6), min_size=1, max_size=4), seed=st.integers(0, 2**16),
       scale=st.floats(0.01, 100.0), shift=st.floats(-100.0, 100.0))
def test_advantages_are_centred_per_group_and_invariant_to_affine_rewards(sizes, seed, scale, shift):
    """Per group the advantages sum to 0 and (eps = 0) have unit population variance unless the group is
    constant; a positive affine map of the rewards leaves them unchanged; global std: the same up to the factor
    group std / global std."""
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(ids)
    r = rng.normal(size=ids.size)
    adv = group_advantages(r, ids, eps=0.0).numpy()
    for g in range(len(sizes)):
        a = adv[ids == g]
        assert abs(a.sum()) < 1e-9 and abs(np.mean(a**2) - 1) < 1e-9
    np.testing.assert_allclose(group_advantages(r * scale + shift, ids, eps=0.0).numpy(), adv, rtol=1e-6, atol=1e-6)
    glob = group_advantages(r, ids, eps=0.0, global_std=True).numpy()
    for g in range(len(sizes)):
        np.testing.assert_allclose(glob[ids == g], adv[ids == g] * np.std(r[ids == g]) / np.std(r), rtol=1e-9)
