"""DDPO: loss and advantages against trl 0.23.1, the regularizer, and the training loop on the tiny pipeline."""
from __future__ import annotations

import contextlib
import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tn_ray.diffusion.pipelines import load_pipeline
from tn_ray.diffusion.sampling import sample_chains, step_log_prob
from tn_ray.training.advantages import PerPromptStatTracker, shared_advantages
from tn_ray.training.ddpo_loss import clipped_surrogate, ddpo_loss, kl_weight

STEPS = 6
GUIDANCE = 5.0


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


@pytest.fixture(scope="module")
def chains(pipe):
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    return sample_chains(pipe, ["a red cube", "a blue ball", "a cat", "a dog"], [0, 1, 2, 3], num_steps=STEPS,
                         guidance=GUIDANCE, eta=1.0, generator=gens)


def trl_self(pipe, clip_range: float, adv_clip_max: float, eta: float = 1.0):
    """A minimal stand-in for DDPOTrainer's ``self``: what calculate_loss reads, trl's own pieces."""
    from trl.models.modeling_sd_base import scheduler_step
    from trl.trainer.ddpo_trainer import DDPOTrainer

    config = SimpleNamespace(train_cfg=True, sample_guidance_scale=GUIDANCE, sample_eta=eta,
                             train_adv_clip_max=adv_clip_max, train_clip_range=clip_range)
    stand_in = SimpleNamespace(config=config, autocast=contextlib.nullcontext,
                               sd_pipeline=SimpleNamespace(unet=pipe.unet,
                                                           scheduler_step=functools.partial(scheduler_step, pipe.scheduler)))
    stand_in.loss = functools.partial(DDPOTrainer.loss, stand_in)
    return stand_in


@pytest.mark.parametrize("clip_range", [1e-4, 0.2])
def test_clipped_loss_approx_kl_clip_fraction_equal_trl(pipe, chains, clip_range):
    """Same chains, advantages and (perturbed) old log-probs: trl's calculate_loss and ours agree
    (1e-6 absolute) at every timestep; clipping is exercised (clip fraction strictly between 0 and 1)."""
    from trl.trainer.ddpo_trainer import DDPOTrainer

    g = torch.Generator().manual_seed(0)
    advantages = torch.randn(4, generator=g) * 4  # some beyond adv_clip_max
    scale = clip_range * torch.tensor([0.3, 0.3, 5.0, 5.0])[:, None]  # two rows inside the clip range, two beyond
    old = chains.log_probs + torch.randn(chains.log_probs.shape, generator=g).clamp(-1, 1) * scale
    stand_in = trl_self(pipe, clip_range, adv_clip_max=5.0)
    fracs = []
    with torch.no_grad():
        for j in range(STEPS):
            t = chains.timesteps[:, j]
            loss, approx_kl, clipfrac = DDPOTrainer.calculate_loss(
                stand_in, chains.states[:, j], t, chains.next_latents[:, j], old[:, j], advantages,
                torch.cat([chains.negative_embeds, chains.prompt_embeds]))
            lp, _ = step_log_prob(pipe.unet, pipe.scheduler, chains.states[:, j], t, chains.next_latents[:, j],
                                  chains.prompt_embeds, chains.negative_embeds, GUIDANCE, 1.0)
            ours = clipped_surrogate(lp, old[:, j], advantages, clip_range, adv_clip_max=5.0)
            torch.testing.assert_close(ours.loss, loss, atol=1e-6, rtol=0)
            torch.testing.assert_close(ours.approx_kl, approx_kl, atol=1e-6, rtol=0)
            torch.testing.assert_close(ours.clip_frac, clipfrac, atol=0, rtol=0)
            fracs.append(float(clipfrac))
    assert 0 < np.mean(fracs) < 1


def test_ratio_one_and_zero_approx_kl_right_after_sampling(pipe, chains):
    """Unchanged weights: the recomputed log-probs equal the recorded ones bit for bit."""
    with torch.no_grad():
        for j in range(STEPS):
            lp, _ = step_log_prob(pipe.unet, pipe.scheduler, chains.states[:, j], chains.timesteps[:, j],
                                  chains.next_latents[:, j], chains.prompt_embeds, chains.negative_embeds, GUIDANCE, 1.0)
            out = clipped_surrogate(lp, chains.log_probs[:, j], torch.ones(4), 1e-4, 5.0)
            assert torch.equal(out.ratio, torch.ones(4)) and float(out.approx_kl) == 0.0 and float(out.clip_frac) == 0.0


def test_per_prompt_tracker_equals_trl():
    """Several epochs of rewards with repeated prompts: trl's tracker and ours give the same advantages."""
    from trl.trainer.utils import PerPromptStatTracker as TrlTracker

    rng = np.random.default_rng(0)
    ours, theirs = PerPromptStatTracker(buffer_size=5, min_count=3), TrlTracker(buffer_size=5, min_count=3)
    for _ in range(5):
        ids = rng.integers(0, 4, size=10)
        rewards = rng.normal(size=10)
        np.testing.assert_allclose(ours.update(ids, rewards), theirs.update(ids, rewards), rtol=0, atol=1e-12)


def test_advantages_without_distributed_are_clipped_tracker_output():
    tracker, reference = PerPromptStatTracker(4, 2), PerPromptStatTracker(4, 2)
    ids, rewards = np.array([0, 0, 1, 1, 1]), np.array([0.0, 10.0, 1.0, 2.0, 30.0])
    got = shared_advantages(ids, rewards, tracker, adv_clip_max=1.0)
    np.testing.assert_allclose(got, np.clip(reference.update(ids, rewards), -1, 1))


def test_kl_regularizer_and_warmup():
    g = torch.Generator().manual_seed(0)
    pol, base = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    lp = torch.zeros(3)
    out = ddpo_loss(lp, lp, torch.ones(3), 1e-4, 5.0, kl_coef=0.5, policy_eps=pol, base_eps=base)
    expected_kl = ((pol - base) ** 2).mean()
    torch.testing.assert_close(out["kl"], expected_kl)
    torch.testing.assert_close(out["loss"], -1.0 + 0.5 * expected_kl)
    assert [kl_weight(2.0, e, 4) for e in (0, 2, 4, 9)] == [0.0, 1.0, 2.0, 2.0] and kl_weight(2.0, 0, 0) == 2.0
    with pytest.raises(ValueError, match="kl_coef > 0"):
        ddpo_loss(lp, lp, torch.ones(3), 1e-4, 5.0, kl_coef=0.1)
