"""The Flow-GRPO SDE step of a flow-matching model, with the Gaussian log-probability of its outcome.

A rectified-flow model (Stable Diffusion 3, FLUX) predicts the velocity ``v(x_t, t)`` of the
interpolation ``x_t = (1 - t) x_0 + t eps`` and samples by the ODE ``dx = v dt`` from t = 1 (noise)
to t = 0 (data), so every step has ``dt = t_next - t < 0``. Flow-GRPO (Liu et al. 2025) turns the
ODE into an SDE with the same marginals by adding the score term ``-(x + (1 - t) v) / t`` of this
interpolation::

    x_{t+dt} = x_t + [v + sigma_t^2 / (2 t) (x_t + (1 - t) v)] dt + sigma_t sqrt(|dt|) eps,
    sigma_t  = a sqrt(t / (1 - t)),

with noise level ``a`` (Flow-GRPO's ``noise_level``, 0.7 by default). At t = 1 the ratio is
infinite; as flow_grpo does, the denominator's t = 1 is replaced by the scheduler's second sigma
(``sigmas[1]``, the largest t below 1), the numerator keeps t = 1. One step is thus the Gaussian
``N(mean, std^2 I)`` with ``std = sigma_t sqrt(|dt|)``; :func:`flow_sde_step` draws it (or scores a
given outcome, for the PPO ratio) and returns its log-probability averaged over the latent
dimensions (Flow-GRPO's convention, as ddpo-pytorch's) and summed (the exact log-density).

:func:`flow_ode_step` is the plain Euler step ``x + dt v`` of diffusers'
:class:`~diffusers.FlowMatchEulerDiscreteScheduler` (the same float32 formula), for steps outside
a stochastic window (MixGRPO: only a window of steps is stochastic and trained).

Everything comes from the scheduler's state (``sigmas`` after ``set_timesteps``), so a shift,
dynamic shifting or custom sigmas are followed, never copied. Formulas read in flow_grpo at commit
ac4c86e8cae021841f1fde853d340e0db67690dd (``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``,
``sde_step_with_logprob``); the code here is tn_ray's own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tn_ray.diffusion.ddim import gaussian_step, per_row

FLOW_GRPO_COMMIT = "ac4c86e8cae021841f1fde853d340e0db67690dd"
MAX_NOISE_LEVEL = 1.0  # tn_ray's bound: Flow-GRPO uses 0.7; see check_noise_level


@dataclass
class FlowStepOutput:
    prev_sample: torch.Tensor  # x_{t+dt}, (B, ...), dtype of the input sample
    log_prob: torch.Tensor | None  # (B,) float32: mean over latent dims of log N(prev; mean, std^2); None (ODE)
    log_prob_sum: torch.Tensor | None  # (B,) float32: the same summed over latent dims (the exact log-density)
    mean: torch.Tensor  # (B, ...) float32: the step's mean (the ODE step's outcome for an ODE step)
    std: torch.Tensor  # (B, 1, ...) float32: the step's standard deviation sigma_t sqrt(|dt|); 0 for an ODE step
    sigma_t: torch.Tensor  # (B, 1, ...) float32: sigma_t alone (flow_grpo's std_dev_t, its KL's denominator)
    dt: torch.Tensor  # (B, 1, ...) float32: t_next - t (< 0)


def check_noise_level(noise_level: float) -> float:
    """``noise_level`` (Flow-GRPO's ``a``) as a float in (0, MAX_NOISE_LEVEL], else ValueError naming it.

    0 is the ODE (no log-probability: use :func:`flow_ode_step`, or leave the step out of the window).
    The upper bound is tn_ray's choice: the SDE's coefficient of x_t in the mean is
    ``1 - a^2 |dt| / (2 (1 - t))``, which on the first step of any schedule (|dt| = 1 - sigmas[1]) is
    ``1 - a^2 / 2`` and reverses sign at a = sqrt(2); Flow-GRPO's published runs use 0.7.
    """
    a = float(noise_level)
    if not (math.isfinite(a) and 0.0 < a <= MAX_NOISE_LEVEL):
        raise ValueError(f"noise_level must be in (0, {MAX_NOISE_LEVEL:g}] (Flow-GRPO's a, 0.7 in its configs; "
                         f"0 is the ODE: leave the step out of the stochastic window), got {noise_level!r}")
    return a


def step_sigmas(scheduler, step_index: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, t_next)`` per row, float32 on CPU, of a (B,) tensor (or int) of step indices into the
    scheduler's schedule (``scheduler.sigmas[i]``, ``scheduler.sigmas[i + 1]``)."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None or getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("the scheduler has no schedule: call scheduler.set_timesteps(num_steps) first")
    sigmas = sigmas.to(torch.float32).cpu()
    i = torch.as_tensor(step_index).long().cpu().reshape(-1)
    if bool((i < 0).any()) or bool((i >= len(sigmas) - 1).any()):
        raise ValueError(f"step index out of range 0..{len(sigmas) - 2}: {i.tolist()}")
    return sigmas[i], sigmas[i + 1]


def step_index_of(scheduler, timestep: torch.Tensor | float) -> torch.Tensor:
    """The (B,) step indices of timesteps of the scheduler's ``timesteps`` (exact match, as flow_grpo's
    ``index_for_timestep``; the first occurrence)."""
    ts = scheduler.timesteps.cpu()
    t = torch.as_tensor(timestep).cpu().reshape(-1).to(ts.dtype)
    hits = t[:, None] == ts[None, :]
    if not bool(hits.any(dim=1).all()):
        raise ValueError(f"timesteps {t.tolist()} are not all in the scheduler's schedule")
    return hits.float().argmax(dim=1)


def sde_sigma(t: torch.Tensor, sigma_max: float, noise_level: float) -> torch.Tensor:
    """``sigma_t = a sqrt(t / (1 - t'))``, t' = t except t = 1 -> ``sigma_max`` (flow_grpo's clamp)."""
    denom = 1 - torch.where(t == 1, torch.as_tensor(sigma_max, dtype=t.dtype), t)
    return noise_level * torch.sqrt(t / denom)


def flow_sde_step(scheduler, model_output: torch.Tensor, step_index: torch.Tensor | int, sample: torch.Tensor,
                  noise_level: float, generator: torch.Generator | list[torch.Generator] | None = None,
                  prev_sample: torch.Tensor | None = None) -> FlowStepOutput:
    """One SDE step of the scheduler's schedule from ``sample`` = x_t given the (guided) velocity.

    ``step_index``: the step's index into ``scheduler.sigmas`` (one int, or one per row). With
    ``prev_sample``: its log-probability under this step (training; gradients flow through the mean
    only, the sample is detached). Otherwise x_{t+dt} is drawn with ``generator`` (``randn_tensor``,
    one generator per row allowed) and rounded to the sample's dtype before it is scored, so the
    recorded latent is the one whose log-probability is returned. Computed in float32.
    """
    a = check_noise_level(noise_level)
    if prev_sample is not None and generator is not None:
        raise ValueError("give either a generator (draw x_{t+dt}) or prev_sample (score it), not both")
    device = sample.device
    x = sample.to(torch.float32)
    v = model_output.to(torch.float32)
    t, t_next = step_sigmas(scheduler, step_index)
    t = t.expand(x.shape[0]) if t.numel() == 1 else t
    t_next = t_next.expand(x.shape[0]) if t_next.numel() == 1 else t_next
    sigma_max = float(scheduler.sigmas[1]) if len(scheduler.sigmas) > 1 else 0.0
    sig = sde_sigma(t, sigma_max, a)
    t, dt, sig = (per_row(z, x.ndim).to(device) for z in (t, t_next - t, sig))
    mean = x + (v + sig**2 / (2 * t) * (x + (1 - t) * v)) * dt
    std = sig * torch.sqrt(-dt)
    prev, elementwise = gaussian_step(mean, std, model_output, sample.dtype, generator, prev_sample)
    dims = tuple(range(1, elementwise.ndim))
    return FlowStepOutput(prev.to(sample.dtype), elementwise.mean(dim=dims), elementwise.sum(dim=dims), mean, std,
                          sig, dt)


def flow_ode_step(scheduler, model_output: torch.Tensor, step_index: torch.Tensor | int,
                  sample: torch.Tensor) -> FlowStepOutput:
    """The Euler step ``x + dt v`` of FlowMatchEulerDiscreteScheduler.step (float32, cast to the model
    output's dtype as it does); no log-probability (``std`` 0)."""
    x = sample.to(torch.float32)
    t, t_next = step_sigmas(scheduler, step_index)
    if t.numel() == 1:  # one step for the batch: the scheduler's 0-dim dt and its very arithmetic (dtype promotion)
        dt = (t_next - t).reshape(())
        prev = x + dt * model_output
        dt_rows = per_row(dt.reshape(1).expand(x.shape[0]), x.ndim).to(x.device)
    else:
        dt_rows = per_row(t_next - t, x.ndim).to(x.device)
        prev = x + dt_rows * model_output
    zero = torch.zeros_like(dt_rows)
    return FlowStepOutput(prev.to(model_output.dtype), None, None, prev.to(torch.float32), zero, zero, dt_rows)


def in_window(step: int, window: tuple[int, int] | None, num_steps: int) -> bool:
    """Whether step ``step`` (0-based) is stochastic: ``window`` = (start, stop) of step indices, half-open
    (MixGRPO's sliding window); None = every step."""
    if window is None:
        return 0 <= step < num_steps
    start, stop = window
    return start <= step < stop


def check_window(window: tuple[int, int] | None, num_steps: int) -> tuple[int, int] | None:
    """``window`` as (start, stop) with 0 <= start <= stop <= num_steps, else ValueError naming it."""
    if window is None:
        return None
    try:
        start, stop = (int(w) for w in window)
    except (TypeError, ValueError):
        raise ValueError(f"window must be (start, stop) step indices, got {window!r}") from None
    if not 0 <= start <= stop <= num_steps:
        raise ValueError(f"window {window!r} must satisfy 0 <= start <= stop <= num_steps = {num_steps}")
    return start, stop
