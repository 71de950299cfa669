"""The loss terms of reward fine-tuning, as pure functions of tensors, and the epsilon space they live in.

Shapes: ``pred``, ``target``, ``ref_pred`` are (batch, C, H, W) noise predictions / noise;
``weights`` is (batch,). Every squared norm is a mean over the latent dimensions (as the
diffusers training scripts and DPOK do), so values do not grow with the image size.

**The KL term is in epsilon space, for every parameterization.** A UNet's output is first
converted to its noise prediction with :func:`to_epsilon` (the scheduler's ``alphas_cumprod``;
for v-prediction ``eps = sqrt(a_t) v + sqrt(1 - a_t) x_t``), so beta means the same for an epsilon
model and its exact v-parameterized twin. (In v space the squared difference is
``||eps_1 - eps_2||^2 / a_t``: up to 1 / a_999 = 214x larger at the noisiest step of Stable
Diffusion's schedule.) **The denoising term is in the model's native space by default**
(:func:`training_target`: velocity for v-prediction, as the model was trained): in epsilon space a
v-model's per-sample error is weighted by a_t, ~0 at the noisy steps where a scene's layout is decided
(on the world pipeline's cosine schedule RWR then learned half as much; docs/rwr.md, "Which space").

RWR (the paper's eq. 4, Lee et al. 2023), on noisy latents ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``::

    L = (1/B) sum_i w_i * ||eps_i - eps_theta(x_t,i, t_i, c_i)||^2          (weighted denoising)
      + beta * (1/B) sum_i ||eps_theta(x_t,i, t_i, c_i) - eps_theta0(x_t,i, t_i, c_i)||^2   (KL surrogate)

The second term is DPOK's (Fan et al. 2023) surrogate of the KL to the base model: between two
Gaussian denoising steps of the same variance sigma_t^2 the KL is exactly
``||mu_1 - mu_2||^2 / (2 sigma_t^2)``, and the step's mean is affine in eps with a
t-dependent slope, so the KL of one step is ``w_t * sum_d (eps_theta - eps_theta0)^2`` with
the per-timestep weight ``w_t`` of :func:`ddpm_kl_weight` (DDPM steps, RWR's timesteps) or
:func:`ddim_kl_weight` (DDIM steps, DDPO's). The surrogate drops ``w_t`` (and sums over
timesteps sampled uniformly), as DPOK's code does: it is the KL up to a *t-dependent* factor,
not a constant one. Both predictions are evaluated on the same noisy latents;
``eps_theta0`` is the same UNet with its LoRA adapters disabled.

Evaluation measures the exact KL instead (:func:`gaussian_step_kl` per step, :func:`path_kl` over a
sampled DDIM chain, in nats): ``eval_path_kl`` of :class:`tn_ray.training.evaluation.Evaluator`.
"""
from __future__ import annotations

import torch

from tn_ray.diffusion.ddim import alphas_at

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
DENOISE_SPACES = ("native", "epsilon")


def alpha_bar(scheduler, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``alphas_cumprod[t]`` per row, float32, shaped (B, 1, ..., 1) to broadcast against ``like``."""
    acp = scheduler.alphas_cumprod.to(torch.float32).cpu()
    t = torch.as_tensor(timesteps).long().cpu().reshape(-1)
    if t.numel() == 1 and like.shape[0] != 1:
        t = t.expand(like.shape[0])
    if t.numel() != like.shape[0]:
        raise ValueError(f"{t.numel()} timesteps for a batch of {like.shape[0]}")
    return acp[t].reshape((-1,) + (1,) * (like.ndim - 1)).to(like.device)


def to_epsilon(scheduler, model_output: torch.Tensor, timesteps: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """The noise prediction of a UNet output at noisy latents ``sample`` = x_t (float32, gradients kept).

    ``scheduler.config.prediction_type`` says what the output is, ``scheduler.alphas_cumprod``
    gives a_t (the same formulas as ``DDIMScheduler.step``): ``epsilon`` as is;
    ``v_prediction``: ``sqrt(a_t) v + sqrt(1 - a_t) x_t``; ``sample`` (an x0 prediction):
    ``(x_t - sqrt(a_t) x0) / sqrt(1 - a_t)``. diffusers has no stateless helper for this
    (``get_velocity`` goes the other way; ``DPMSolverMultistepScheduler.convert_model_output``
    reads the scheduler's inference step index, not a training timestep).
    """
    kind = scheduler.config.prediction_type
    out = model_output.float()
    if kind == "epsilon":
        return out
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"unsupported prediction_type {kind!r} ({', '.join(PREDICTION_TYPES)})")
    a = alpha_bar(scheduler, timesteps, out)
    x_t = sample.float()
    if kind == "v_prediction":
        return a.sqrt() * out + (1 - a).sqrt() * x_t
    return (x_t - a.sqrt() * out) / (1 - a).sqrt()


def ddpm_kl_weight(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """``w_t`` with KL(p_1(x_{t-1}|x_t) || p_2(x_{t-1}|x_t)) = w_t * sum_d (eps_1 - eps_2)^2 for DDPM steps
    (``DDPMScheduler.step``) of the same variance: ``w_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - a_t))``
    (Ho et al. 2020, eq. 12's weight), with sigma_t^2 the scheduler's ``variance_type``:
    ``fixed_small`` (the posterior variance, Stable Diffusion's) gives ``beta_t / (2 alpha_t (1 - a_{t-1}))``,
    infinite at t = 0 where the step is deterministic; ``fixed_large`` (sigma_t^2 = beta_t) gives
    ``beta_t / (2 alpha_t (1 - a_t))``. Float64, shape (B,)."""
    betas = scheduler.betas.double().cpu()
    acp = scheduler.alphas_cumprod.double().cpu()
    t = torch.as_tensor(timesteps).long().cpu().reshape(-1)
    beta, a_t = betas[t], acp[t]
    a_prev = torch.where(t > 0, acp[(t - 1).clamp(min=0)], torch.ones_like(a_t))
    kind = scheduler.config.variance_type
    if kind == "fixed_small":
        var = (1 - a_prev) / (1 - a_t) * beta
    elif kind == "fixed_large":
        var = beta
    else:
        raise ValueError(f"ddpm_kl_weight: variance_type {kind!r} (fixed_small, fixed_large)")
    return beta**2 / (2 * var * (1 - beta) * (1 - a_t))


def ddim_kl_weight(scheduler, timesteps: torch.Tensor, eta: float) -> torch.Tensor:
    """``w_t`` for the stochastic DDIM step of :mod:`tn_ray.diffusion.ddim` (DDPO's policy, after
    ``set_timesteps``): the step's mean is ``sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma_t^2) eps`` with
    ``x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)``, so ``mu_1 - mu_2 = c_t (eps_1 - eps_2)`` with
    ``c_t = sqrt(1 - a_prev - sigma_t^2) - sqrt(a_prev (1 - a_t) / a_t)`` and
    ``w_t = c_t^2 / (2 sigma_t^2)`` (no x0 clipping, as every Stable Diffusion config). Float64, shape (B,)."""

    a_t, a_prev = (a.double() for a in alphas_at(scheduler, torch.as_tensor(timesteps).reshape(-1)))
    var = eta**2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    c = (1 - a_prev - var).sqrt() - (a_prev * (1 - a_t) / a_t).sqrt()
    return c**2 / (2 * var)


def per_sample_sq_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``mean_d (a - b)^2`` per sample (float32): shape (batch,)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)


def gaussian_step_kl(mean_p: torch.Tensor, mean_r: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """``KL(N(mean_p, std^2 I) || N(mean_r, std^2 I)) = sum_d (mean_p - mean_r)^2 / (2 std^2)`` per row, in nats
    (float32, shape (batch,)): the exact KL of one denoising step of the policy and of the base model, which
    share the step's variance. ``std`` is one value per row ((batch,) or (batch, 1, ..., 1), as
    :func:`tn_ray.diffusion.ddim.ddim_step` returns it) or a scalar. The squared distance is
    :func:`per_sample_sq_error` times the number of latent dims: for DDIM steps without x0 clipping this is
    ``ddim_kl_weight * sum_d (eps_p - eps_r)^2``, the KL that :func:`kl_surrogate` approximates without ``w_t``."""
    dims = mean_p[0].numel()
    std = torch.as_tensor(std, dtype=torch.float32, device=mean_p.device)
    std = std.reshape(-1) if std.numel() > 1 else std.reshape(()).expand(mean_p.shape[0])
    if std.shape[0] != mean_p.shape[0]:
        raise ValueError(f"std has {std.shape[0]} values for a batch of {mean_p.shape[0]} (one per row)")
    return per_sample_sq_error(mean_p, mean_r) * dims / (2 * std**2)


def path_kl(means_p: torch.Tensor, means_r: torch.Tensor, stds: torch.Tensor) -> torch.Tensor:
    """The KL (nats) between the policy's and the base model's laws of a whole denoising chain, estimated on
    one chain per row: ``sum_t gaussian_step_kl(mean_p[t], mean_r[t], std[t])``, shape (batch,). By the chain
    rule the path KL is ``E_policy[sum_t KL(p_theta(.|x_t) || p_0(.|x_t))]`` (the initial noise is shared),
    and each term is exact for a given state x_t, so a chain sampled from the policy gives an unbiased
    estimate. ``means_p``, ``means_r``: (batch, T, C, h, w) step means on the same states x_t; ``stds``:
    (batch, T) or (batch, T, 1, 1, 1). A chain with no stochastic step (T = 0) has path KL 0."""
    if means_p.shape != means_r.shape:
        raise ValueError(f"shapes differ: {tuple(means_p.shape)} vs {tuple(means_r.shape)}")
    b, t = means_p.shape[:2]
    if t == 0:
        return torch.zeros(b, dtype=torch.float32, device=means_p.device)
    stds = torch.as_tensor(stds).reshape(b, t, -1)
    if stds.shape[-1] != 1:
        raise ValueError(f"stds must be one value per (row, step), got shape {tuple(stds.shape)}")
    step = gaussian_step_kl(means_p.flatten(0, 1), means_r.flatten(0, 1), stds.reshape(b * t))
    return step.reshape(b, t).sum(dim=1)


def weighted_denoising(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(1/B) sum_i w_i ||target_i - pred_i||^2``: the reward-weighted likelihood surrogate."""
    err = per_sample_sq_error(pred, target)
    if weights.shape != err.shape:
        raise ValueError(f"weights of shape {tuple(weights.shape)} for a batch of {err.shape[0]}")
    return (weights.to(err) * err).mean()


def kl_surrogate(pred: torch.Tensor, ref_pred: torch.Tensor) -> torch.Tensor:
    """``mean_d (eps_theta - eps_theta0)^2`` per sample, both noise predictions (epsilon space): the KL
    of the two equal-variance Gaussian steps divided by ``D * w_t`` (module docstring); ``ref_pred``
    is treated as a constant (no gradient flows into the base model)."""
    return per_sample_sq_error(pred, ref_pred.detach())


def rwr_loss(pred: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor, beta: float = 0.0,
             ref_pred: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Eq. 4's objective on one batch of *noise predictions* (epsilon space): ``{"loss", "denoise", "kl"}``
    (``kl`` is logged even when beta = 0 if ``ref_pred`` is given; beta > 0 requires it)."""
    return _with_kl(weighted_denoising(pred, noise, weights), pred, ref_pred, beta)


def _with_kl(denoise: torch.Tensor, eps: torch.Tensor, ref_eps: torch.Tensor | None, beta: float) -> dict:
    """``{"loss", "denoise", "kl"}`` from a denoising term and the batch's noise predictions (epsilon space)."""
    if ref_eps is None:
        if beta > 0:
            raise ValueError("beta > 0 needs the base model's prediction ref_pred")
        kl = torch.zeros((), dtype=denoise.dtype, device=denoise.device)
    else:
        kl = kl_surrogate(eps, ref_eps).mean()
    return {"loss": denoise + beta * kl, "denoise": denoise, "kl": kl}


def rwr_terms(
    scheduler,
    pred: torch.Tensor,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    weights: torch.Tensor,
    beta: float = 0.0,
    ref_pred: torch.Tensor | None = None,
    space: str = "native",
    x0: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`rwr_loss` on raw UNet outputs (``pred``, ``ref_pred``: noise, v or x0 as the scheduler's
    ``prediction_type`` says) at noisy latents ``noisy`` = x_t made from the clean latents ``x0`` and the drawn
    ``noise``. The KL term is always in epsilon space (both outputs converted with :func:`to_epsilon`). The
    denoising term is in ``space``: ``epsilon`` = the noise prediction against ``noise`` (an epsilon model and
    its v-parameterized twin give the same value); ``native`` = the raw output against the target the model was
    trained on (:func:`training_target`, as diffusers' training scripts do), the same as ``epsilon`` for an
    epsilon model, ``1 / a_t`` times it per sample for a v-prediction one, so the noisy timesteps where a
    scene's layout is decided keep their weight (in epsilon space a v-model's cosine schedule weighs them ~0)."""
    if space not in DENOISE_SPACES:
        raise ValueError(f"unknown denoising space {space!r} ({', '.join(DENOISE_SPACES)})")
    eps = to_epsilon(scheduler, pred, timesteps, noisy)
    if space == "native":
        out, target = pred.float(), training_target(scheduler, x0, noise, timesteps)
    else:
        out, target = eps, noise
    ref = to_epsilon(scheduler, ref_pred, timesteps, noisy) if ref_pred is not None else None
    return _with_kl(weighted_denoising(out, target, weights), eps, ref, beta)


def training_target(scheduler, x0: torch.Tensor | None, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to output at ``x_t = add_noise(x0, noise, t)`` (float32), as diffusers'
    training scripts: the noise for ``epsilon``, ``scheduler.get_velocity(x0, noise, t)`` =
    ``sqrt(a_t) noise - sqrt(1 - a_t) x0`` for ``v_prediction``, ``x0`` for ``sample``."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise.float()
    if x0 is None:
        raise ValueError(f"the {kind} target needs the clean latents x0")
    if kind == "v_prediction":
        return scheduler.get_velocity(x0.float(), noise.float(), torch.as_tensor(timesteps).to(x0.device))
    if kind == "sample":
        return x0.float()
    raise ValueError(f"unsupported prediction_type {kind!r} ({', '.join(PREDICTION_TYPES)})")
