"""The stochastic DDIM step (eta > 0) with the Gaussian log-probability of its outcome.

DDPO treats each denoising step ``x_t -> x_{t-1}`` as a Gaussian policy
``N(mu_theta(x_t, t, c), sigma_t^2 I)`` (DDIM paper eq. 12 and 16). :func:`ddim_step` draws
``x_{t-1}`` (or takes a given one, for training) and returns its log-probability averaged
over the latent dimensions, as ddpo-pytorch and trl do. Everything comes from the state of
diffusers' own :class:`diffusers.DDIMScheduler` (``alphas_cumprod``, ``final_alpha_cumprod``,
``config``, ``num_inference_steps``), so a scheduler configured differently (prediction type,
clipping, ``set_alpha_to_one``) is followed, never a copy of an old scheduler.

Equal to ``diffusers.DDIMScheduler.step`` for the sample (same noise draw, same formulas),
and to trl 0.23.1's ``scheduler_step`` for sample and log-prob: trl clamps the previous
timestep at 0 where diffusers uses ``final_alpha_cumprod``; both agree whenever
``set_alpha_to_one=False`` (Stable Diffusion's configs); we follow diffusers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class StepOutput:
    prev_sample: torch.Tensor  # x_{t-1}, (B, C, H, W), dtype of the input sample
    log_prob: torch.Tensor  # (B,) float32: mean over latent dims of log N(x_{t-1}; mean, std^2)
    mean: torch.Tensor  # (B, C, H, W) float32: mu_theta(x_t, t, c)
    std: torch.Tensor  # (B, 1, 1, 1) float32: sigma_t = eta * sqrt(variance)


def per_row(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """A (B,) tensor shaped to broadcast over (B, ...) of ``ndim`` dims."""
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def gaussian_step(mean: torch.Tensor, std: torch.Tensor, noise_like: torch.Tensor, dtype: torch.dtype, generator=None,
                  prev_sample: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_prev, elementwise log N(x_prev; mean, std^2))`` of one Gaussian policy step, float32.

    ``prev_sample`` given: it is scored (detached). Otherwise it is drawn as diffusers' schedulers
    draw (``randn_tensor`` with ``generator``, of ``noise_like``'s shape, device and dtype: the model
    output's) and rounded to ``dtype`` (the sample's) before it is scored: the log-prob is that of
    the latent the chain records, so a recomputed ratio is exactly 1. Shared by the DDIM step (DDPO)
    and the flow-matching SDE step (GRPO)."""
    from diffusers.utils.torch_utils import randn_tensor

    if prev_sample is None:
        noise = randn_tensor(noise_like.shape, generator=generator, device=noise_like.device, dtype=noise_like.dtype)
        prev = (mean + std * noise.to(torch.float32)).to(dtype).to(torch.float32)
    else:
        prev = prev_sample.to(torch.float32)
    prev = prev.detach()
    return prev, -((prev - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)


def alphas_at(scheduler, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha_bar_t, alpha_bar_{t-1})`` per row, float32, for a (B,) tensor of timesteps.

    The previous timestep is ``t - num_train_timesteps // num_inference_steps`` (as
    ``DDIMScheduler.step``); below 0 it is the scheduler's ``final_alpha_cumprod``.
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("the scheduler has no timesteps: call scheduler.set_timesteps(num_steps) first")
    acp = scheduler.alphas_cumprod.to(torch.float32).cpu()
    t = timestep.long().cpu()
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32)
    a_t = acp[t]
    a_prev = torch.where(prev >= 0, acp[prev.clamp(min=0)], final)
    return a_t, a_prev


def ddim_step(scheduler, model_output: torch.Tensor, timestep: torch.Tensor | int, sample: torch.Tensor, eta: float,
              generator: torch.Generator | list[torch.Generator] | None = None,
              prev_sample: torch.Tensor | None = None) -> StepOutput:
    """One DDIM step with noise ``eta`` (> 0) from ``sample`` = x_t given the guided noise prediction.

    ``prev_sample`` given: its log-probability under this step (training; gradients flow
    through the mean only, the sample is detached). Otherwise x_{t-1} is drawn with
    ``generator`` exactly as ``DDIMScheduler.step`` draws it (``randn_tensor``). Computed in
    float32 whatever the model's dtype.
    """
    if eta <= 0:
        raise ValueError(f"eta must be > 0 for a stochastic step with a log-probability, got {eta}")
    if prev_sample is not None and generator is not None:
        raise ValueError("give either a generator (draw x_{t-1}) or prev_sample (score it), not both")
    cfg = scheduler.config
    device = sample.device
    x_t = sample.to(torch.float32)
    out = model_output.to(torch.float32)
    t = torch.as_tensor(timestep, device="cpu").reshape(-1).expand(x_t.shape[0])
    a_t, a_prev = (per_row(a, x_t.ndim).to(device) for a in alphas_at(scheduler, t))
    b_t = 1 - a_t
    if cfg.prediction_type == "epsilon":
        x0 = (x_t - b_t**0.5 * out) / a_t**0.5
        eps = out
    elif cfg.prediction_type == "sample":
        x0 = out
        eps = (x_t - a_t**0.5 * x0) / b_t**0.5
    elif cfg.prediction_type == "v_prediction":
        x0 = a_t**0.5 * x_t - b_t**0.5 * out
        eps = a_t**0.5 * out + b_t**0.5 * x_t
    else:
        raise ValueError(f"unsupported prediction_type {cfg.prediction_type!r} (epsilon, sample, v_prediction)")
    if cfg.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    # eps stays the model's even when x0 was clipped (DDIMScheduler's and trl's use_clipped_model_output=False)
    # the formulas and their order of operations are DDIMScheduler.step's (eq. 12 and 16 of the DDIM paper)
    variance = ((1 - a_prev) / b_t) * (1 - a_t / a_prev)  # sigma_t^2 / eta^2
    std = eta * variance**0.5
    mean = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
    prev, log_prob = gaussian_step(mean, std, model_output, sample.dtype, generator, prev_sample)
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return StepOutput(prev.to(sample.dtype), log_prob, mean, std)
