"""The stochastic DDIM step and the chain sampler against diffusers, trl 0.23.1 and torch.distributions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tn_ray.diffusion.ddim import ddim_step
from tn_ray.diffusion.pipelines import load_pipeline
from tn_ray.diffusion.sampling import decode_images, sample_chains, step_log_prob

STEPS = 10


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


def scheduler(**overrides):
    from diffusers import DDIMScheduler

    base = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                set_alpha_to_one=False, steps_offset=1)
    s = DDIMScheduler(**{**base, **overrides})
    s.set_timesteps(STEPS)
    return s


def inputs(seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_step_equals_trl_scheduler_step(prediction_type):
    """Same inputs, same generator: trl's next latent and log-prob, at every timestep of the schedule
    (tolerance 1e-6 absolute: both run the same float32 formulas)."""
    from trl.models.modeling_sd_base import scheduler_step

    sched = scheduler(prediction_type=prediction_type)
    eps, x = inputs(0, n=len(sched.timesteps))
    t = sched.timesteps.clone()  # one row per timestep, the last step included
    ours = ddim_step(sched, eps, t, x, eta=1.0, generator=torch.Generator().manual_seed(1))
    theirs = scheduler_step(sched, eps, t, x, eta=1.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours.prev_sample, theirs.latents, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.log_prob, theirs.log_probs, atol=1e-6, rtol=0)
    # scoring a given next latent (training)
    nxt = torch.randn_like(x)
    ours = ddim_step(sched, eps, t, x, eta=0.7, prev_sample=nxt)
    theirs = scheduler_step(sched, eps, t, x, eta=0.7, prev_sample=nxt)
    torch.testing.assert_close(ours.log_prob, theirs.log_probs, atol=1e-6, rtol=0)


def test_final_step_follows_diffusers_where_trl_clamps():
    """With set_alpha_to_one=True, trl clamps the last previous timestep to 0 (alpha_bar_0) while
    DDIMScheduler uses final_alpha_cumprod = 1: we follow diffusers, and agree with trl elsewhere."""
    from trl.models.modeling_sd_base import scheduler_step

    sched = scheduler(set_alpha_to_one=True)
    eps, x = inputs(1, n=len(sched.timesteps))
    t = sched.timesteps.clone()
    nxt = torch.randn_like(x)
    ours = ddim_step(sched, eps, t, x, eta=1.0, prev_sample=nxt).log_prob
    theirs = scheduler_step(sched, eps, t, x, eta=1.0, prev_sample=nxt).log_probs
    torch.testing.assert_close(ours[:-1], theirs[:-1], atol=1e-6, rtol=0)
    assert not torch.allclose(ours[-1], theirs[-1])
    # diffusers' own step gives our next latent at the last timestep
    out = sched.step(eps[-1:], int(t[-1]), x[-1:], eta=1.0, generator=torch.Generator().manual_seed(3))
    ours = ddim_step(sched, eps[-1:], t[-1:], x[-1:], eta=1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours.prev_sample, out.prev_sample, atol=1e-6, rtol=0)


@settings(max_examples=25, deadline=None)
@given(eta=st.floats(0.05, 1.0), step=st.integers(0, STEPS - 1), seed=st.integers(0, 1000))
def test_log_prob_equals_torch_normal(eta, step, seed):
    """An independent computation: torch.distributions.Normal(mean, std) of DDIM eq. 12/16, mean over dims."""
    sched = scheduler()
    eps, x = inputs(seed, n=2)
    t = sched.timesteps[step].repeat(2)
    out = ddim_step(sched, eps, t, x, eta=eta, generator=torch.Generator().manual_seed(seed))
    acp = sched.alphas_cumprod.double()
    prev_t = int(t[0]) - 1000 // STEPS
    a_t, a_prev = acp[int(t[0])], (acp[prev_t] if prev_t >= 0 else torch.as_tensor(sched.final_alpha_cumprod).double())
    x0 = (x.double() - (1 - a_t).sqrt() * eps.double()) / a_t.sqrt()
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps.double()
    expected = torch.distributions.Normal(mean, sigma).log_prob(out.prev_sample.double()).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob.double(), expected, atol=2e-5, rtol=1e-5)


def test_eta_must_be_positive():
    sched = scheduler()
    eps, x = inputs(0, 1)
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddim_step(sched, eps, sched.timesteps[:1], x, eta=0.0)


def test_sampler_equals_plain_pipeline_and_log_probs_recompute_exactly(pipe):
    """Same generators: the recorded chain ends in the plain pipe(..., eta=1) images; recomputing each
    step's log-prob with the same guidance gives the recorded one exactly (ratio 1)."""
    prompts = ["a red cube", "a blue ball", "a cat"]
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    chains = sample_chains(pipe, prompts, [0, 1, 2], num_steps=STEPS, guidance=5.0, eta=1.0, generator=gens())
    assert chains.latents.shape[:2] == (3, STEPS + 1) and chains.log_probs.shape == (3, STEPS)
    latents = pipe(prompts, num_inference_steps=STEPS, guidance_scale=5.0, eta=1.0, generator=gens(),
                   output_type="latent").images
    assert torch.equal(latents, chains.latents[:, -1])
    images = pipe(prompts, num_inference_steps=STEPS, guidance_scale=5.0, eta=1.0, generator=gens()).images
    assert np.array_equal(np.stack([np.asarray(i) for i in images]), decode_images(pipe, chains.latents[:, -1]))
    with torch.no_grad():
        for j in range(STEPS):
            lp, _ = step_log_prob(pipe.unet, pipe.scheduler, chains.states[:, j], chains.timesteps[:, j],
                                  chains.next_latents[:, j], chains.prompt_embeds, chains.negative_embeds, 5.0, 1.0)
            assert torch.equal(lp, chains.log_probs[:, j])
