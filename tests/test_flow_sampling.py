"""The tiny flow-matching pipeline sampled with the Flow-GRPO SDE: against diffusers' own pipeline, the
recorded chain against its recomputation, and LoRA's reference model against the base model."""
from __future__ import annotations

import contextlib

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
    """An empty window is the pipeline's own sampling: same generators, the same final latents and images
    (within one grey level), with and without guidance. tiny-sd3 has no T5 encoder, so tn_ray feeds its 256 zero
    tokens as one counted 256 times (tn_ray.diffusion.null_tokens): the latents agree to float rounding
    (|diff| < 1e-4 on latents of about 5; measured about 3e-6), not bit for bit; the count matters (one zero token
    counted once is off by more than 1e-2, so the tolerance catches a miscount); with the fold off
    (fold_null_tokens=False: the pipeline's 256 zeros) they are bit for bit the pipeline's."""
    ours = sample_flow_chains(pipe, PROMPTS, num_steps=STEPS, guidance=guidance, noise_level=0.7, window=(0, 0),
                              generator=gens())
    theirs = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance, generator=gens(),
                  output_type="latent").images
    assert ours.log_probs.shape == (3, 0) and ours.latents.shape[1] == STEPS + 1
    assert ours.prompt_embeds.shape[1] == 77 + 1 and ours.null_copies.tolist() == [256] * 3
    assert (ours.latents[:, -1] - theirs).abs().max() < 1e-4
    plain = sample_flow_chains(pipe, PROMPTS, num_steps=STEPS, guidance=guidance, noise_level=0.7, window=(0, 0),
                               generator=gens(), fold_null_tokens=False)
    assert plain.prompt_embeds.shape[1] == 77 + 256 and plain.null_copies.tolist() == [1] * 3
    assert torch.equal(plain.latents[:, -1], theirs)
    once = sample_flow_chains(pipe, PROMPTS, num_steps=STEPS, guidance=guidance, noise_level=0.7, window=(0, 0),
                              generator=gens(), fold_null_tokens=False, max_sequence_length=1)
    assert (once.latents[:, -1] - theirs).abs().max() > 1e-2
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


def world_flow_pipeline():
    """The world-flow pipeline as Trainer.pipeline() builds and packages it (the shipped world autoencoder and
    text encoder, a 2-block transformer of the world-flow test settings), untrained, every transformer weight
    perturbed by 0.05 N(0, 1) (the zero-initialised ones made non-zero)."""
    from tn_ray.diffusion.world.settings import WorldGeneratorConfig
    from tn_ray.diffusion.world.train import Trainer

    cfg = WorldGeneratorConfig(threads=1, denoiser="transformer", parts_from="world", train={"objective": "flow"},
                               transformer={"layers": 2, "heads": 2, "head_dim": 8})
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        trainer = Trainer(cfg, work, progress=lambda s: None)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in trainer.denoiser.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return trainer.pipeline(ema=False)


@pytest.mark.parametrize("source", [TINY_SD3, "world-flow"])
def test_folded_null_tokens_sample_the_pipelines_256_zero_tokens_with_lora_on_and_off(source):
    """sample_flow_chains on one zero token counted 256 times (the default without T5) against the pipeline's
    256 zero tokens (fold_null_tokens=False): the same latents and log-probs to float rounding, with a LoRA
    adapter (non-zero) enabled and disabled (the reference); the rescored steps give the folded chains'
    log-probs exactly (ratio 1) and the path-KL means agree with the 256-token ones; the processor swap leaves
    the transformer's processors (diffusers' own) and its state dict (LoRA weights included) as they were."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from tn_ray.training.flow_policy import add_flow_lora, flow_reference

    pipe = load_pipeline(TINY_SD3) if source == TINY_SD3 else world_flow_pipeline()
    assert pipe.text_encoder_3 is None
    add_flow_lora(pipe, rank=4, seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for n, p in pipe.transformer.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    kwargs = dict(num_steps=3, guidance=GUIDANCE, noise_level=0.7)
    for adapters in ("enabled", "disabled"):
        with flow_reference(pipe) if adapters == "disabled" else contextlib.nullcontext():
            one = sample_flow_chains(pipe, PROMPTS, generator=gens(7), **kwargs)
            full = sample_flow_chains(pipe, PROMPTS, generator=gens(7), fold_null_tokens=False, **kwargs)
            assert one.prompt_embeds.shape[1] + 255 == full.prompt_embeds.shape[1]
            scale = full.latents.abs().max()
            assert (one.latents - full.latents).abs().max() < 1e-5 * scale, adapters
            torch.testing.assert_close(one.log_probs, full.log_probs, rtol=0, atol=1e-5)
            for j in range(3):
                with torch.no_grad():
                    out = flow_step_log_prob(pipe.transformer, pipe.scheduler, one, j, GUIDANCE, 0.7)
                assert torch.equal(out.log_prob, one.log_probs[:, j]), (adapters, j)
            means, _ = flow_chain_means(pipe.transformer, pipe.scheduler, one, GUIDANCE, 0.7)
            as_full = one.select(range(len(one)))
            as_full.prompt_embeds, as_full.negative_embeds = full.prompt_embeds, full.negative_embeds
            as_full.null_copies = full.null_copies
            full_means, _ = flow_chain_means(pipe.transformer, pipe.scheduler, as_full, GUIDANCE, 0.7)
            assert (means - full_means).abs().max() < 1e-5 * full_means.abs().max(), adapters
    assert all(type(p) is JointAttnProcessor2_0 for p in pipe.transformer.attn_processors.values())
    after = pipe.transformer.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
    assert any("lora_B" in k for k in after)


def test_pipelines_with_t5_keep_their_tokens():
    """null_copies is 1 for a pipeline with a T5 encoder (its tokens differ: nothing to fold, processors kept);
    folding is refused there; chains of different counts cannot be rescored together."""
    from types import SimpleNamespace

    from tn_ray.diffusion.flow_sampling import FlowChains, encode_flow_prompts
    from tn_ray.diffusion.null_tokens import NullTokensAttnProcessor, null_copies, null_token_attention

    assert null_copies(SimpleNamespace(text_encoder_3=object())) == 1
    assert null_copies(SimpleNamespace(text_encoder_3=None), 256) == 256
    with pytest.raises(ValueError, match="only a pipeline without T5"):
        encode_flow_prompts(SimpleNamespace(text_encoder_3=object()), PROMPTS, copies=256)
    with null_token_attention(object(), 1):  # count 1: nothing is swapped
        pass
    with pytest.raises(ValueError, match="copies must be >= 1"):
        NullTokensAttnProcessor(0)
    chains = FlowChains(*[torch.zeros(2, 1)] * 9, null_copies=torch.tensor([1, 256]))
    with pytest.raises(ValueError, match="different null-token counts"):
        chains.copies()


def test_evaluation_images_fold_the_zero_tokens_and_match_the_pipelines_own():
    """Evaluation images of a flow run (tn_ray.training.evaluation.generate_images) and the world generator's
    held-out images come from the pipeline's own sampling with the prompt embeddings folded
    (flow_sampling.pipeline_prompts): the same latents as the plain pipeline's 256 zeros to float rounding, the
    same PNG images within one grey level; the transformer's processors are diffusers' again afterwards."""
    import io
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from tn_ray.diffusion.flow_sampling import pipeline_prompts
    from tn_ray.training.evaluation import generate_images

    pipe = load_pipeline(TINY_SD3)
    before = {k: type(v).__name__ for k, v in pipe.transformer.attn_processors.items()}
    with pipeline_prompts(pipe, PROMPTS) as inputs:
        assert inputs["prompt_embeds"].shape[1] == 77 + 1  # one zero token, counted 256 times
        folded = pipe(**inputs, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=gens(),
                      output_type="latent").images
    assert {k: type(v).__name__ for k, v in pipe.transformer.attn_processors.items()} == before
    plain = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=gens(),
                 output_type="latent").images
    assert 0 < (folded - plain).abs().max() < 1e-4  # not the same computation, the same function

    block = SimpleNamespace(batch_size=2, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=None,
                            width=None)
    pngs = generate_images(SimpleNamespace(pipe=pipe), PROMPTS[:2], [5, 6], block)
    want = pipe([p for p in PROMPTS[:2] for _ in (5, 6)], num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                generator=[torch.Generator("cpu").manual_seed(s) for _ in PROMPTS[:2] for s in (5, 6)],
                output_type="np").images
    got = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in pngs]).astype(int)
    assert len(pngs) == 4 and (abs(got - (want * 255).round()) <= 1).all()
