"""GRPO's objective on flow-matching models (Flow-GRPO, Liu et al. 2025) as pure functions of tensors.

A group of G >= 2 images per prompt is sampled with the SDE of :mod:`tn_ray.diffusion.flow_sde`;
each image's advantage is its reward standardized within its group::

    A_i = (r_i - mean_{j in g(i)} r_j) / (std_{j in g(i)} r_j + eps)       (population std, eps = 1e-4)

or, with ``global_std``, divided by the standard deviation of all rewards of the batch (Flow-GRPO's
``sample.global_std = True`` in every published config); the mean is always the group's. Per
trained step, the loss is the PPO clipped surrogate of DDPO (:func:`tn_ray.training.ddpo_loss.
clipped_surrogate`, the one implementation) plus ``beta`` x a KL term to the reference model (the
same transformer with its LoRA adapters disabled) between the two Gaussian steps
``N(mean, std^2 I)`` and ``N(ref_mean, std^2 I)``, which share ``std = sigma_t sqrt(|dt|)``.

Two KLs, and how they relate (D latent dimensions)::

    exact:      KL = sum_d (mean_d - ref_mean_d)^2 / (2 std^2)           (losses.gaussian_step_kl)
    Flow-GRPO:  K  = mean_d (mean_d - ref_mean_d)^2 / (2 sigma_t^2)      (flow_grpo_kl)
                K  = KL * |dt| / D

Flow-GRPO's term averages over dimensions and divides by ``sigma_t^2`` without the ``|dt|`` of
the step's variance, so its published beta (0.04 GenEval / OCR, 0.01 PickScore) means
``beta * |dt| / D`` per unit of exact KL: a step-size- and resolution-dependent weight. We
implement its convention under its own name (that is what its beta and clip range 1e-4 mean) and
log the exact KL beside it. Read in flow_grpo at commit ac4c86e8cae021841f1fde853d340e0db67690dd
(``scripts/train_sd3.py``: the loss; ``flow_grpo/stat_tracking.py``: the advantages).
"""
from __future__ import annotations

import torch

from tn_ray.training.ddpo_loss import clipped_surrogate
from tn_ray.training.losses import gaussian_step_kl  # the exact KL, one implementation for every method

ADV_EPS = 1e-4  # flow_grpo's PerPromptStatTracker: std + 1e-4


def group_advantages(rewards, group_ids, eps: float = ADV_EPS, global_std: bool = False) -> torch.Tensor:
    """(N,) float64 advantages ``(r - group mean) / (std + eps)``; ``group_ids`` (N,) say which rows share a
    prompt (any hashable ints); ``std`` is the group's population std, or the whole batch's with
    ``global_std``. Every group needs at least 2 rows (ValueError naming the groups otherwise)."""
    r = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
    ids = torch.as_tensor(group_ids).reshape(-1)
    if r.numel() != ids.numel():
        raise ValueError(f"{r.numel()} rewards but {ids.numel()} group ids")
    if not bool(torch.isfinite(r).all()):
        raise ValueError("rewards must be finite")
    groups, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    small = groups[counts < 2]
    if small.numel():
        raise ValueError(f"GRPO needs a group of G >= 2 images per prompt; groups {small.tolist()[:5]} have 1 "
                         "(images_per_prompt must be >= 2)")
    n = counts.to(torch.float64)
    mean = torch.zeros(len(groups), dtype=torch.float64).index_add_(0, inverse, r) / n
    centered = r - mean[inverse]
    if global_std:
        std = r.std(unbiased=False).expand(r.shape)
    else:
        var = torch.zeros(len(groups), dtype=torch.float64).index_add_(0, inverse, centered**2) / n
        std = var.sqrt()[inverse]
    return centered / (std + eps)


def _row_dims(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def flow_grpo_kl(mean: torch.Tensor, ref_mean: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """(B,) Flow-GRPO's KL term: ``mean_d (mean - ref_mean)^2 / (2 sigma_t^2)`` (sigma_t without sqrt|dt|;
    the reference mean is a constant)."""
    sq = ((mean - ref_mean.detach().to(mean)) ** 2).mean(dim=_row_dims(mean))
    return sq / (2 * sigma_t.to(mean).reshape(-1) ** 2)


def train_step_indices(num_stochastic: int, timestep_fraction: float) -> list[int]:
    """Which of a chain's S stochastic steps are trained: the first ``int(S * timestep_fraction)``, as
    flow_grpo's train_sd3.py (``range(num_train_timesteps)``, not a random subset); at least one."""
    if not 0.0 < timestep_fraction <= 1.0:
        raise ValueError(f"timestep_fraction must be in (0, 1], got {timestep_fraction!r}")
    return list(range(max(1, int(num_stochastic * timestep_fraction)))) if num_stochastic else []


def grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
              adv_clip_max: float, beta: float = 0.0, mean: torch.Tensor | None = None,
              ref_mean: torch.Tensor | None = None, sigma_t: torch.Tensor | None = None,
              std: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One trained step's minibatch: ``{"loss", "policy_loss", "kl", "kl_exact", "approx_kl", "clip_frac"}``.

    ``loss = clipped surrogate + beta * mean_i flow_grpo_kl_i`` (flow_grpo's ``policy_loss + beta *
    kl_loss``). ``kl`` is that mean (given ``mean``, ``ref_mean`` and ``sigma_t``; ``beta > 0`` requires
    them); ``kl_exact`` the mean exact Gaussian KL (given ``std`` too; else NaN), for logs only.
    """
    clip = clipped_surrogate(log_prob, old_log_prob, advantages, clip_range, adv_clip_max)
    nan = torch.full((), float("nan"), dtype=clip.loss.dtype, device=clip.loss.device)
    if mean is None or ref_mean is None or sigma_t is None:
        if beta > 0:
            raise ValueError("beta > 0 needs the policy's and the reference's step means and sigma_t")
        kl = torch.zeros((), dtype=clip.loss.dtype, device=clip.loss.device)
        kl_exact = nan
    else:
        kl = flow_grpo_kl(mean, ref_mean, sigma_t).mean()
        with torch.no_grad():
            kl_exact = gaussian_step_kl(mean, ref_mean, std).mean() if std is not None else nan
    return {"loss": clip.loss + beta * kl, "policy_loss": clip.loss, "kl": kl, "kl_exact": kl_exact,
            "approx_kl": clip.approx_kl, "clip_frac": clip.clip_frac}
