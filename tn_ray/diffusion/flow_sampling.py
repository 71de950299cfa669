"""Sampling a flow-matching pipeline with the Flow-GRPO SDE, recording the chain, and a step's log-prob recomputed.

:func:`sample_flow_chains` runs the loop of diffusers' :class:`~diffusers.StableDiffusion3Pipeline`
(its ``encode_prompt``, ``prepare_latents``, timesteps with the scheduler's shift or dynamic shift,
classifier-free guidance with the unconditional rows first) with the steps of
:mod:`tn_ray.diffusion.flow_sde`: the SDE step inside a window of steps, the scheduler's Euler
step outside it (MixGRPO), and keeps what GRPO trains on: every latent, each stochastic step's
log-probability, the timesteps, prompt ids and text embeddings. With an empty window it is the
pipeline's own ODE sampling (same generators, same latents). :func:`flow_step_log_prob` recomputes
stochastic steps under the transformer as it is now, with the guidance of sampling, so on unchanged
weights the importance ratio is exactly 1.

Without a T5 encoder (``text_encoder_3 is None``: ``tiny-sd3``, ``world-flow``) the pipeline's 256 zero tokens
in T5's place are fed as one zero token counted 256 times in attention (:mod:`tn_ray.diffusion.null_tokens`:
the same function up to float rounding, about 4x faster on these small models); the chains record the folded
embeddings and the count (``null_copies``), and every rescoring uses them the same way, so the ratio stays
exactly 1. Pipelines with a T5 encoder are sampled as before.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from tn_ray.diffusion.flow_sde import (
    FlowStepOutput,
    check_noise_level,
    check_window,
    flow_ode_step,
    flow_sde_step,
    in_window,
)
from tn_ray.diffusion.null_tokens import null_copies, null_token_attention


@dataclass
class FlowChains:
    """Sampled chains of B images over T steps, S of them stochastic (tensors on the sampling device)."""

    latents: torch.Tensor  # (B, T + 1, C, h, w): x at t = 1, ..., x at t = 0
    log_probs: torch.Tensor  # (B, S) float32: log p(x_{t+dt} | x_t) of each stochastic step at sampling (dim mean)
    steps: torch.Tensor  # (B, S) long: the step index (0..T-1) of each stochastic step
    timesteps: torch.Tensor  # (B, T) float: the scheduler's timestep of every step
    prompt_ids: torch.Tensor  # (B,) long: index of each image's prompt in the caller's prompt list
    prompt_embeds: torch.Tensor  # (B, L, D)
    pooled_embeds: torch.Tensor  # (B, P)
    negative_embeds: torch.Tensor  # (B, L, D): of "" (the unconditional branch)
    negative_pooled_embeds: torch.Tensor  # (B, P)
    null_copies: torch.Tensor  # (B,) long: how many zero tokens the embeddings' last token stands for (1: none)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def copies(self) -> int:
        """The count of the embeddings' last token in attention (:func:`null_token_attention`), one for all rows."""
        counts = self.null_copies.unique().tolist()
        if len(counts) != 1:
            raise ValueError(f"chains with different null-token counts {counts} cannot be rescored together")
        return int(counts[0])

    def states(self, j: int) -> torch.Tensor:
        """x_t of the j-th stochastic step, (B, C, h, w)."""
        return self.latents[torch.arange(len(self)), self.steps[:, j]]

    def next_latents(self, j: int) -> torch.Tensor:
        """x_{t+dt} of the j-th stochastic step, (B, C, h, w)."""
        return self.latents[torch.arange(len(self)), self.steps[:, j] + 1]

    def select(self, rows: torch.Tensor | Sequence[int]) -> FlowChains:
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.latents.device)
        return FlowChains(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def to(self, device) -> FlowChains:
        return FlowChains(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @classmethod
    def cat(cls, parts: Sequence[FlowChains]) -> FlowChains:
        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})


def check_flow_pipeline(pipe) -> None:
    """ValueError unless ``pipe`` is a flow-matching pipeline (a transformer and a FlowMatchEulerDiscreteScheduler)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if getattr(pipe, "transformer", None) is None or not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        raise ValueError(f"flow-matching sampling needs a transformer and a FlowMatchEulerDiscreteScheduler; "
                         f"{type(pipe).__name__} has {type(pipe.scheduler).__name__} (a UNet pipeline: use DDPO's "
                         "sample_chains)")


def encode_flow_prompts(pipe, prompts: Sequence[str], max_sequence_length: int = 256, copies: int = 1):
    """(embeds, pooled, negative embeds of "", negative pooled) through the pipeline's ``encode_prompt``.
    ``copies`` > 1 (a pipeline without T5: :func:`tn_ray.diffusion.null_tokens.null_copies`): the T5 zeros
    folded to ``max_sequence_length // copies`` tokens, the last counted ``copies`` times when attended."""
    if copies > 1 and getattr(pipe, "text_encoder_3", None) is not None:
        raise ValueError("the T5 encoder's tokens differ: only a pipeline without T5 has zero tokens to fold")
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=pipe._execution_device,
            do_classifier_free_guidance=True, max_sequence_length=max_sequence_length // copies)
    return embeds, pooled, negative, negative_pooled


@contextlib.contextmanager
def pipeline_prompts(pipe, prompts: Sequence[str], max_sequence_length: int = 256):
    """The prompt arguments of ``pipe(**inputs, ...)`` (the pipeline's own sampling) for ``prompts``: the prompts
    themselves, or for an SD 3 pipeline without T5 (``tiny-sd3``, ``world-flow``) their embeddings with the zero
    tokens folded into one while, inside this block, the transformer counts it ``max_sequence_length`` times:
    the pipeline's images up to float rounding, 3-4x faster (:mod:`tn_ray.diffusion.null_tokens`)."""
    copies = null_copies(pipe, max_sequence_length) if getattr(pipe, "transformer", None) is not None else 1
    if copies == 1:
        yield {"prompt": list(prompts)}
        return
    embeds, pooled, negative, negative_pooled = encode_flow_prompts(pipe, prompts, max_sequence_length, copies)
    with null_token_attention(pipe.transformer, copies):
        yield {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": negative,
               "negative_pooled_prompt_embeds": negative_pooled}


def set_flow_timesteps(pipe, num_steps: int, latents: torch.Tensor) -> torch.Tensor:
    """The scheduler's timesteps for ``num_steps`` as StableDiffusion3Pipeline sets them (``mu`` of the
    dynamic shift from the latents' size when the scheduler is configured so)."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

    cfg = pipe.scheduler.config
    kwargs = {}
    if cfg.get("use_dynamic_shifting", None):
        patch = pipe.transformer.config.patch_size
        seq_len = (latents.shape[-2] // patch) * (latents.shape[-1] // patch)
        kwargs["mu"] = calculate_shift(seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                       cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
    timesteps, _ = retrieve_timesteps(pipe.scheduler, num_steps, latents.device, **kwargs)
    return timesteps


def guided_velocity(transformer, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor,
                    pooled: torch.Tensor, negative_embeds: torch.Tensor, negative_pooled: torch.Tensor,
                    guidance: float, copies: int = 1) -> torch.Tensor:
    """``v_u + g (v_c - v_u)`` in one batched forward, unconditional rows first (StableDiffusion3Pipeline's
    order); g <= 1: the conditional velocity alone. ``timesteps``: (B,). ``copies``: the count of the
    embeddings' last token in attention (:func:`tn_ray.diffusion.null_tokens.null_token_attention`)."""
    with null_token_attention(transformer, copies):
        if guidance <= 1.0:
            return transformer(hidden_states=latents, timestep=timesteps, encoder_hidden_states=embeds,
                               pooled_projections=pooled, return_dict=False)[0]
        out = transformer(hidden_states=torch.cat([latents, latents]), timestep=torch.cat([timesteps, timesteps]),
                          encoder_hidden_states=torch.cat([negative_embeds, embeds]),
                          pooled_projections=torch.cat([negative_pooled, pooled]), return_dict=False)[0]
    uncond, cond = out.chunk(2)
    return uncond + guidance * (cond - uncond)


def decode_flow_images(pipe, latents: torch.Tensor) -> np.ndarray:
    """(B, H, W, 3) uint8 images of final latents (the VAE's scaling and shift, the pipeline's image processor)."""
    with torch.no_grad():
        z = latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.vae.decode(z, return_dict=False)[0]
    arr = pipe.image_processor.postprocess(image, output_type="np")
    return (arr * 255).round().astype(np.uint8)


def sample_flow_chains(
    pipe,
    prompts: Sequence[str],
    prompt_ids: Sequence[int] | None = None,
    *,
    num_steps: int,
    guidance: float,
    noise_level: float,
    window: tuple[int, int] | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    latents: torch.Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
    max_sequence_length: int = 256,
    autocast=None,
    on_step: Callable[[int, FlowStepOutput], None] | None = None,
    fold_null_tokens: bool = True,
) -> FlowChains:
    """One image per prompt with the pipeline's transformer (adapters as they are), recording the chain.

    ``window``: (start, stop) step indices sampled by the SDE (None: all; (k, k): none, the pipeline's ODE).
    ``generator``: one CPU generator per row for reproducible rows; it draws the initial latents (unless
    ``latents`` are given) and then each stochastic step's noise. ``autocast``: a mixed-precision context;
    the steps run in float32. ``on_step(i, out)``: every step's output in order. ``fold_null_tokens``
    (without a T5 encoder): the ``max_sequence_length`` zero tokens as one counted that many times
    (:mod:`tn_ray.diffusion.null_tokens`; False: the pipeline's own zero tokens, for comparisons).
    """

    check_flow_pipeline(pipe)
    window = check_window(window, num_steps)
    check_noise_level(noise_level)
    n = len(prompts)
    prompt_ids = list(range(n)) if prompt_ids is None else list(prompt_ids)
    device = pipe._execution_device
    copies = null_copies(pipe, max_sequence_length) if fold_null_tokens else 1
    embeds, pooled, negative, negative_pooled = encode_flow_prompts(pipe, prompts, max_sequence_length, copies)
    default = pipe.default_sample_size * pipe.vae_scale_factor
    x = pipe.prepare_latents(n, pipe.transformer.config.in_channels, height or default, width or default,
                             embeds.dtype, device, generator, latents)
    sched = pipe.scheduler
    timesteps = set_flow_timesteps(pipe, num_steps, x)
    chain, log_probs, steps = [x], [], []
    with torch.no_grad(), autocast or contextlib.nullcontext(), null_token_attention(pipe.transformer, copies):
        for i, t in enumerate(timesteps):
            v = guided_velocity(pipe.transformer, x, t.expand(n), embeds, pooled, negative, negative_pooled, guidance)
            if in_window(i, window, num_steps):
                out = flow_sde_step(sched, v, i, x, noise_level, generator=generator)
                log_probs.append(out.log_prob)
                steps.append(i)
            else:
                out = flow_ode_step(sched, v, i, x)
            if on_step is not None:
                on_step(i, out)
            x = out.prev_sample
            chain.append(x)
    return FlowChains(
        latents=torch.stack(chain, dim=1),
        log_probs=(torch.stack(log_probs, dim=1) if log_probs else torch.zeros(n, 0, device=device)),
        steps=torch.as_tensor(steps, dtype=torch.long, device=device).repeat(n, 1),
        timesteps=timesteps.to(device).repeat(n, 1),
        prompt_ids=torch.as_tensor(prompt_ids, dtype=torch.long, device=device),
        prompt_embeds=embeds,
        pooled_embeds=pooled,
        negative_embeds=negative,
        negative_pooled_embeds=negative_pooled,
        null_copies=torch.full((n,), copies, dtype=torch.long, device=device),
    )


def flow_step_log_prob(transformer, scheduler, chains: FlowChains, j: int, guidance: float,
                       noise_level: float) -> FlowStepOutput:
    """The j-th stochastic step of every row of ``chains`` rescored under ``transformer`` as it is now, with
    gradients (through the mean): its ``log_prob`` over the recorded ``old`` one is the PPO ratio, its ``mean``
    and ``sigma_t`` feed the KL. ``scheduler`` holds the sampling schedule (``set_timesteps`` as sampled)."""
    rows = torch.arange(len(chains), device=chains.steps.device)
    idx = chains.steps[:, j]
    x = chains.states(j)
    v = guided_velocity(transformer, x, chains.timesteps[rows, idx], chains.prompt_embeds, chains.pooled_embeds,
                        chains.negative_embeds, chains.negative_pooled_embeds, guidance, chains.copies())
    return flow_sde_step(scheduler, v, idx, x, noise_level, prev_sample=chains.next_latents(j))


def flow_chain_means(transformer, scheduler, chains: FlowChains, guidance: float, noise_level: float,
                     autocast=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(means, stds) of every stochastic step of ``chains`` under ``transformer`` as it is now, no gradients:
    (B, S, C, h, w) and (B, S) float32, each step recomputed as sampled. Inside
    :func:`tn_ray.training.flow_policy.flow_reference` they are the base model's on the policy's states: the
    path KL (:func:`tn_ray.training.losses.path_kl`) compares the two."""
    means, stds = [], []
    with torch.no_grad(), autocast or contextlib.nullcontext(), null_token_attention(transformer, chains.copies()):
        for j in range(chains.steps.shape[1]):
            out = flow_step_log_prob(transformer, scheduler, chains, j, guidance, noise_level)
            means.append(out.mean)
            stds.append(out.std.reshape(-1))
    if not means:
        empty = chains.latents[:, :0].to(torch.float32)
        return empty, torch.zeros(len(chains), 0, device=chains.latents.device)
    return torch.stack(means, dim=1), torch.stack(stds, dim=1)
