"""The tiny flow-matching pipeline sampled with the Flow-GRPO SDE: against diffusers' own pipeline, the
recorded chain against its recomputation, and LoRA's reference model against the base model."""
from __future__ import annotations

import pytest
import torch

from tn_ray.diffusion.flow_sampling import (
    decode_flow_images,
    flow_chain_means,
    flow_step_log_prob,
    sample_flow_chains,
)
from tn_ray.diffusion.pipelines import TINY_SD3, load_pipeline

PROMPTS = ["a red cube", "two blue balls", "a red cube"]
STEPS = 4
GUIDANCE = 4.5


def gens(seed: int = 0):
    return [torch.Generator().manual_seed(seed + r) for r in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(TINY_SD3)


@pytest.mark.parametrize("guidance", [GUIDANCE, 1.0])
def test_ode_path_equals_the_diffusers_pipeline(pipe, guidance):
    """An empty window is the pipeline's own sampling: same generators, the same final latents (bit for bit,
    with and without guidance) and images (within one grey level)."""
    ours = sample_flow_chains(pipe, PROMPTS, num_steps=STEPS, guidance=guidance, noise_level=0.7, window=(0, 0),
                              generator=gens())
    theirs = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance, generator=gens(),
                  output_type="latent").images
    assert ours.log_probs.shape == (3, 0) and ours.latents.shape[1] == STEPS + 1
    assert torch.equal(ours.latents[:, -1], theirs)
    images = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance, generator=gens(),
                  output_type="np").images
    assert (abs(decode_flow_images(pipe, ours.latents[:, -1]).astype(int) - (images * 255).round()) <= 1).all()


def test_recorded_chain_equals_its_recomputation(pipe):
    """Every stochastic step rescored with the same weights gives the recorded log-prob exactly (ratio 1);
    a window (1, 3) records 2 steps and leaves the others to the ODE; rows are reproducible by generator."""
    full = sample_flow_chains(pipe, PROMPTS, [0, 1, 0], num_steps=STEPS, guidance=GUIDANCE, noise_level=0.7,
                              generator=gens(10))
    assert full.log_probs.shape == (3, STEPS) and full.steps[0].tolist() == list(range(STEPS))
    for j in range(STEPS):
        with torch.no_grad():
            out = flow_step_log_prob(pipe.transformer, pipe.scheduler, full, j, GUIDANCE, 0.7)
        assert torch.equal(torch.exp(out.log_prob - full.log_probs[:, j]), torch.ones(3))
    window = sample_flow_chains(pipe, PROMPTS, num_steps=STEPS, guidance=GUIDANCE, noise_level=0.7, window=(1, 3),
                                generator=gens(10))
    assert window.steps[0].tolist() == [1, 2] and window.log_probs.shape == (3, 2)
    ode = sample_flow_chains(pipe, PROMPTS, num_steps=STEPS, guidance=GUIDANCE, noise_level=0.7, window=(0, 0),
                             generator=gens(10))
    assert torch.equal(window.latents[:, 0], full.latents[:, 0])
    assert torch.equal(window.latents[:, :2], ode.latents[:, :2])  # the ODE up to the window's start
    assert not torch.allclose(window.latents[:, 2], ode.latents[:, 2])
    for j in range(2):
        with torch.no_grad():
            out = flow_step_log_prob(pipe.transformer, pipe.scheduler, window, j, GUIDANCE, 0.7)
        assert torch.equal(out.log_prob, window.log_probs[:, j])
    one = sample_flow_chains(pipe, PROMPTS[1:2], num_steps=STEPS, guidance=GUIDANCE, noise_level=0.7,
                             generator=[torch.Generator().manual_seed(11)])
    torch.testing.assert_close(one.latents[0], full.latents[1], rtol=1e-5, atol=1e-5)


def test_ode_window_steps_do_not_need_a_noise_level_but_bad_ones_are_refused(pipe):
    with pytest.raises(ValueError, match="noise_level must be in"):
        sample_flow_chains(pipe, PROMPTS, num_steps=STEPS, guidance=GUIDANCE, noise_level=0.0, generator=gens())
    with pytest.raises(ValueError, match="0 <= start <= stop"):
        sample_flow_chains(pipe, PROMPTS, num_steps=STEPS, guidance=GUIDANCE, noise_level=0.7, window=(4, 9))
    unet = load_pipeline("tiny")
    with pytest.raises(ValueError, match="needs a transformer and a FlowMatchEulerDiscreteScheduler"):
        sample_flow_chains(unet, PROMPTS, num_steps=STEPS, guidance=GUIDANCE, noise_level=0.7)


def test_lora_reference_is_the_base_model_and_gradients_reach_the_adapter():
    """LoRA on the attention projections (B matrices made non-zero): the policy's samples differ from the
    base model's; inside flow_reference they are the base model's exactly; the path KL of the policy's chains
    to the reference is positive (and 0 of the reference to itself); the rescored log-prob has gradients into
    the adapter only."""
    from tn_ray.training.flow_policy import add_flow_lora, flow_reference
    from tn_ray.training.losses import path_kl

    pipe = load_pipeline(TINY_SD3)
    kwargs = dict(num_steps=4, guidance=GUIDANCE, noise_level=0.7)
    base = sample_flow_chains(pipe, PROMPTS, generator=gens(3), **kwargs)
    params = add_flow_lora(pipe, rank=4, seed=0)
    names = [n for n, p in pipe.transformer.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names) and all(p.dtype == torch.float32 for p in params)
    assert any("add_q_proj" in n for n in names) and any("attn.to_q" in n for n in names)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for n, p in pipe.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    policy = sample_flow_chains(pipe, PROMPTS, generator=gens(3), **kwargs)
    assert not torch.allclose(policy.latents[:, -1], base.latents[:, -1], atol=1e-4)
    with flow_reference(pipe):
        ref = sample_flow_chains(pipe, PROMPTS, generator=gens(3), **kwargs)
    assert torch.equal(ref.latents, base.latents) and torch.equal(ref.log_probs, base.log_probs)
    means, stds = flow_chain_means(pipe.transformer, pipe.scheduler, policy, GUIDANCE, 0.7)
    with flow_reference(pipe):
        ref_means, _ = flow_chain_means(pipe.transformer, pipe.scheduler, policy, GUIDANCE, 0.7)
    assert means.shape == policy.latents[:, 1:].shape and stds.shape == policy.log_probs.shape
    assert bool((path_kl(means, ref_means, stds) > 0).all())
    assert path_kl(ref_means, ref_means, stds).tolist() == [0.0] * len(PROMPTS)
    out = flow_step_log_prob(pipe.transformer, pipe.scheduler, policy, 1, GUIDANCE, 0.7)
    torch.testing.assert_close(out.log_prob, policy.log_probs[:, 1], rtol=0, atol=0)
    out.log_prob.sum().backward()
    assert all(p.grad is not None for p in params) and any(float(p.grad.abs().sum()) > 0 for p in params)
    assert all(p.grad is None for p in pipe.transformer.parameters() if not p.requires_grad)


def test_ratio_is_one_in_bfloat16_and_under_autocast(pipe):
    """bfloat16 weights (latents recorded in bfloat16, steps in float32), and float32 weights under CPU
    bfloat16 autocast: every rescored step gives the recorded log-prob exactly."""
    low = load_pipeline(TINY_SD3, dtype="bfloat16")
    chains = sample_flow_chains(low, PROMPTS, num_steps=3, guidance=GUIDANCE, noise_level=0.7, generator=gens(2))
    assert chains.latents.dtype == torch.bfloat16 and chains.log_probs.dtype == torch.float32
    for j in range(3):
        with torch.no_grad():
            assert torch.equal(flow_step_log_prob(low.transformer, low.scheduler, chains, j, GUIDANCE, 0.7).log_prob,
                               chains.log_probs[:, j])
    chains = sample_flow_chains(pipe, PROMPTS, num_steps=3, guidance=GUIDANCE, noise_level=0.7, generator=gens(2),
                                autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    for j in range(3):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = flow_step_log_prob(pipe.transformer, pipe.scheduler, chains, j, GUIDANCE, 0.7)
        assert torch.equal(out.log_prob, chains.log_probs[:, j])
