"""Sampling that records the whole denoising chain, and the same step's log-prob recomputed.

:func:`sample_chains` runs the Stable Diffusion loop of a diffusers pipeline (its
``prepare_latents``, ``encode_prompt``, VAE and image processor) with the stochastic DDIM
step of :mod:`tn_ray.diffusion.ddim`, and keeps what DDPO trains on: every latent
``x_T .. x_0``, each step's log-probability and timestep, the prompt ids and the text
embeddings. :func:`step_log_prob` recomputes one step's log-probability under the current
UNet with the classifier-free guidance of sampling (same scale, same negative embeddings,
same batching), so on unchanged weights the importance ratio is exactly 1.

With the same generators, the images equal the plain ``pipe(..., eta=eta)`` call's: the
initial latents and every step's noise are drawn in the same order with ``randn_tensor``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from tn_ray.diffusion.ddim import StepOutput, ddim_step


@dataclass
class Chains:
    """Sampled denoising chains of B images over T steps (tensors on the sampling device)."""

    latents: torch.Tensor  # (B, T + 1, C, h, w): x_T, ..., x_0
    log_probs: torch.Tensor  # (B, T) float32: log p(x_{t-1} | x_t) at sampling
    timesteps: torch.Tensor  # (B, T) long: the scheduler's timestep of each step
    prompt_ids: torch.Tensor  # (B,) long: index of each image's prompt in the caller's prompt list
    prompt_embeds: torch.Tensor  # (B, L, D): text embeddings of the prompt
    negative_embeds: torch.Tensor  # (B, L, D): text embeddings of "" (the unconditional branch)

    @property
    def states(self) -> torch.Tensor:
        """x_t of each step, (B, T, C, h, w)."""
        return self.latents[:, :-1]

    @property
    def next_latents(self) -> torch.Tensor:
        """x_{t-1} of each step, (B, T, C, h, w)."""
        return self.latents[:, 1:]

    def __len__(self) -> int:
        return self.latents.shape[0]

    def select(self, rows: torch.Tensor | Sequence[int]) -> Chains:
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.latents.device)
        return Chains(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def to(self, device) -> Chains:
        return Chains(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @classmethod
    def cat(cls, parts: Sequence[Chains]) -> Chains:
        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})


def use_ddim(pipe) -> None:
    """Give ``pipe`` a DDIM scheduler built from its own scheduler config (as ddpo-pytorch does)."""
    from diffusers import DDIMScheduler

    if not isinstance(pipe.scheduler, DDIMScheduler):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)


def encode_prompts(pipe, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt embeddings, negative embeddings of "") through the pipeline's ``encode_prompt``."""
    with torch.no_grad():
        embeds, negative = pipe.encode_prompt(list(prompts), pipe._execution_device, 1, True, negative_prompt=None)
    return embeds, negative


def guided_noise(unet, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor,
                 negative_embeds: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guided noise prediction ``eps_u + g (eps_c - eps_u)`` (one batched forward, as
    the diffusers pipeline: unconditional rows first); without guidance (g <= 1) the conditional one."""
    if guidance <= 1.0:
        return unet(latents, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]
    t = timesteps.reshape(-1)
    t = torch.cat([t, t]) if t.numel() > 1 else t
    out = unet(torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([negative_embeds, embeds]),
               return_dict=False)[0]
    uncond, cond = out.chunk(2)
    return uncond + guidance * (cond - uncond)


def decode_images(pipe, latents: torch.Tensor) -> np.ndarray:
    """(B, H, W, 3) uint8 images of final latents, with the pipeline's VAE and image processor
    (the values ``output_type='pil'`` would give)."""
    with torch.no_grad():
        image = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False)[0]
    arr = pipe.image_processor.postprocess(image, output_type="np")
    return (arr * 255).round().astype(np.uint8)


def sample_chains(
    pipe,
    prompts: Sequence[str],
    prompt_ids: Sequence[int],
    *,
    num_steps: int,
    guidance: float,
    eta: float,
    generator: torch.Generator | list[torch.Generator] | None = None,
    autocast=None,
    height: int | None = None,
    width: int | None = None,
    on_step: Callable[[StepOutput], None] | None = None,
) -> Chains:
    """Sample one image per prompt with the pipeline's UNet (adapters as they are), recording the chain.

    ``generator``: one CPU generator per row for reproducible rows (as ``tn_ray.diffusion.
    generation``). ``autocast``: a context for mixed precision (e.g. ``torch.autocast('cuda',
    torch.float16)``); the step itself always runs in float32. ``height``, ``width``: pixels (None =
    the pipeline's default). ``on_step``: called with every step's :class:`StepOutput` in order (its
    ``mean`` and ``std`` are the policy's Gaussian step at the recorded state: the evaluation's path KL).
    """
    from diffusers import DDIMScheduler

    if not isinstance(pipe.scheduler, DDIMScheduler):
        raise ValueError(f"DDPO sampling needs a DDIMScheduler, the pipeline has {type(pipe.scheduler).__name__} "
                         "(call tn_ray.diffusion.sampling.use_ddim(pipe))")
    device = pipe._execution_device
    sched = pipe.scheduler
    sched.set_timesteps(num_steps, device=device)
    embeds, negative = encode_prompts(pipe, prompts)
    n = len(prompts)
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor
    latents = pipe.prepare_latents(
        n,
        pipe.unet.config.in_channels,
        height or default,
        width or default,
        embeds.dtype,
        device,
        generator,
    )
    chain, log_probs = [latents], []
    with torch.no_grad(), autocast or contextlib.nullcontext():
        for t in sched.timesteps:
            x_in = sched.scale_model_input(latents, t)
            eps = guided_noise(pipe.unet, x_in, t.reshape(1).to(device), embeds, negative, guidance)
            out = ddim_step(sched, eps, t, latents, eta, generator=generator)
            if on_step is not None:
                on_step(out)
            latents = out.prev_sample
            chain.append(latents)
            log_probs.append(out.log_prob)
    return Chains(
        latents=torch.stack(chain, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        timesteps=sched.timesteps.to(device=device, dtype=torch.long).repeat(n, 1),
        prompt_ids=torch.as_tensor(list(prompt_ids), dtype=torch.long, device=device),
        prompt_embeds=embeds,
        negative_embeds=negative,
    )


def step_log_prob(
    unet,
    scheduler,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    next_latents: torch.Tensor,
    embeds: torch.Tensor,
    negative_embeds: torch.Tensor,
    guidance: float,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_theta(next_latents | latents), guided noise prediction) of one step per row, with
    gradients through the UNet; ``timesteps`` is (B,), the scheduler has the sampling timesteps."""
    x_in = scheduler.scale_model_input(latents, timesteps)
    eps = guided_noise(unet, x_in, timesteps, embeds, negative_embeds, guidance)
    return ddim_step(scheduler, eps, timesteps, latents, eta, prev_sample=next_latents).log_prob, eps


def chain_means(
    unet, scheduler, chains: Chains, guidance: float, eta: float, autocast=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(means, stds) of every recorded step of ``chains`` under ``unet`` as it is now, no gradients:
    (B, T, C, h, w) and (B, T), float32. Each step x_t -> x_{t-1} is recomputed as :func:`sample_chains`
    computed it (the step's one timestep for the whole batch, the same guidance batching and step
    formulas), so on the weights that sampled the chain the means equal the sampled ones bit for bit;
    inside :meth:`tn_ray.training.policy.Policy.reference` they are the base model's on the policy's
    states. ``scheduler`` has the sampling timesteps (``set_timesteps``)."""
    means, stds = [], []
    with torch.no_grad(), autocast or contextlib.nullcontext():
        for i in range(chains.timesteps.shape[1]):
            ts = chains.timesteps[:, i]
            t = ts[:1] if bool((ts == ts[0]).all()) else ts
            x_t = chains.states[:, i]
            x_in = scheduler.scale_model_input(x_t, t)
            eps = guided_noise(unet, x_in, t, chains.prompt_embeds, chains.negative_embeds, guidance)
            out = ddim_step(scheduler, eps, t.cpu(), x_t, eta, prev_sample=chains.next_latents[:, i])
            means.append(out.mean)
            stds.append(out.std.reshape(-1).expand(x_t.shape[0]))
    return torch.stack(means, dim=1), torch.stack(stds, dim=1)
