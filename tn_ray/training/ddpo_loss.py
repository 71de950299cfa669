"""DDPO's objective (the paper's eq. 5) as pure functions of tensors.

Per trained timestep t of a minibatch of sampled chains, with ``log_prob`` the current
policy's log p_theta(x_{t-1} | x_t, c) and ``old_log_prob`` the one recorded at sampling::

    ratio_i = exp(log_prob_i - old_log_prob_i)
    L_clip  = mean_i max(-A_i ratio_i, -A_i clip(ratio_i, 1 - eps, 1 + eps))     (PPO surrogate)
    approx_kl = 0.5 mean_i (log_prob_i - old_log_prob_i)^2,  clip_frac = mean_i [|ratio_i - 1| > eps]

which is ddpo-pytorch's and trl's ``calculate_loss``. trl's DDPO has no divergence term; the
regularizer of eq. 5 (lambda, ``kl_coef``) is DPOK's (Fan et al. 2023, whose code uses the
squared difference of the guided noise predictions)::

    L = L_clip + kl_coef(epoch) * mean_i ||eps_theta(x_t,i) - eps_theta0(x_t,i)||^2

on the sampled x_t, with ``eps_theta0`` the same UNet with its LoRA adapters disabled, both
guided predictions converted to epsilon space (:func:`tn_ray.training.losses.to_epsilon`, so
a v-prediction model gives the same term as its epsilon twin), and ``kl_coef(epoch)`` ramped
linearly from 0 over ``kl_warmup_epochs``. The exact KL between the policy's and the base
model's DDIM steps (equal variance sigma_t^2) is ``w_t * sum_d (eps_theta - eps_theta0)^2`` with
the t-dependent ``w_t`` of :func:`tn_ray.training.losses.ddim_kl_weight`; the surrogate drops
``w_t`` (KL up to a t-dependent factor, not a constant one).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tn_ray.training.losses import kl_surrogate


@dataclass
class ClippedLoss:
    loss: torch.Tensor  # scalar: the PPO clipped surrogate (to minimize)
    approx_kl: torch.Tensor  # scalar: 0.5 mean (log-ratio)^2, no gradient
    clip_frac: torch.Tensor  # scalar: share of rows whose ratio left [1 - eps, 1 + eps], no gradient
    ratio: torch.Tensor  # (B,)


def clipped_surrogate(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                      clip_range: float, adv_clip_max: float) -> ClippedLoss:
    """The PPO clipped surrogate of one timestep's minibatch (advantages clipped to +-adv_clip_max)."""
    adv = advantages.to(log_prob).clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob.to(log_prob))
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        approx_kl = 0.5 * ((log_prob - old_log_prob.to(log_prob)) ** 2).mean()
        clip_frac = ((ratio - 1.0).abs() > clip_range).float().mean()
    return ClippedLoss(loss, approx_kl, clip_frac, ratio)


def kl_weight(kl_coef: float, epoch: int, warmup_epochs: int = 0) -> float:
    """``kl_coef`` ramped linearly from 0 at epoch 0 to full at ``warmup_epochs`` (0: full from the start)."""
    if warmup_epochs <= 0:
        return float(kl_coef)
    return float(kl_coef) * min(1.0, epoch / warmup_epochs)


def kl_to_base(policy_eps: torch.Tensor, base_eps: torch.Tensor) -> torch.Tensor:
    """``mean_i ||eps_theta - eps_theta0||^2`` of noise predictions (epsilon space; mean over latent dims;
    the base prediction is a constant)."""
    return kl_surrogate(policy_eps, base_eps).mean()


def ddpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
              adv_clip_max: float, kl_coef: float = 0.0, policy_eps: torch.Tensor | None = None,
              base_eps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Eq. 5 on one timestep's minibatch: ``{"loss", "policy_loss", "kl", "approx_kl", "clip_frac"}``.

    ``kl`` is the regularizer's value (logged whenever both predictions are given);
    ``kl_coef > 0`` requires them.
    """
    clip = clipped_surrogate(log_prob, old_log_prob, advantages, clip_range, adv_clip_max)
    if policy_eps is None or base_eps is None:
        if kl_coef > 0:
            raise ValueError("kl_coef > 0 needs the policy's and the base model's noise predictions")
        kl = torch.zeros((), dtype=clip.loss.dtype, device=clip.loss.device)
    else:
        kl = kl_to_base(policy_eps, base_eps)
    return {"loss": clip.loss + kl_coef * kl, "policy_loss": clip.loss, "kl": kl, "approx_kl": clip.approx_kl,
            "clip_frac": clip.clip_frac}
