"""The loss terms of reward fine-tuning, as pure functions of tensors.

Shapes: ``pred``, ``target``, ``ref_pred`` are (batch, C, H, W) noise predictions / noise;
``weights`` is (batch,). Every squared norm is a mean over the latent dimensions (as the
diffusers training scripts and DPOK do), so values do not grow with the image size.

RWR (the paper's eq. 4, Lee et al. 2023)::

    L = (1/B) sum_i w_i * ||eps_i - eps_theta(x_t,i, t_i, c_i)||^2          (weighted denoising)
      + beta * (1/B) sum_i ||eps_theta(x_t,i, t_i, c_i) - eps_theta0(x_t,i, t_i, c_i)||^2   (KL surrogate)

The second term is the KL divergence between the policy's and the base model's Gaussian
denoising steps of equal variance, up to a constant factor (DPOK): both are evaluated on the
same noisy latents; ``eps_theta0`` is the same UNet with its LoRA adapters disabled.
"""
from __future__ import annotations

import torch


def per_sample_sq_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``mean_d (a - b)^2`` per sample (float32): shape (batch,)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)


def weighted_denoising(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(1/B) sum_i w_i ||target_i - pred_i||^2``: the reward-weighted likelihood surrogate."""
    err = per_sample_sq_error(pred, target)
    if weights.shape != err.shape:
        raise ValueError(f"weights of shape {tuple(weights.shape)} for a batch of {err.shape[0]}")
    return (weights.to(err) * err).mean()


def kl_surrogate(pred: torch.Tensor, ref_pred: torch.Tensor) -> torch.Tensor:
    """``||eps_theta - eps_theta0||^2`` per sample: the KL of equal-variance Gaussian steps up to a
    constant; ``ref_pred`` is treated as a constant (no gradient flows into the base model)."""
    return per_sample_sq_error(pred, ref_pred.detach())


def rwr_loss(pred: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor, beta: float = 0.0,
             ref_pred: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Eq. 4's objective on one batch: ``{"loss", "denoise", "kl"}`` (``kl`` is logged even when beta = 0
    if ``ref_pred`` is given; beta > 0 requires it)."""
    denoise = weighted_denoising(pred, noise, weights)
    if ref_pred is None:
        if beta > 0:
            raise ValueError("beta > 0 needs the base model's prediction ref_pred")
        kl = torch.zeros((), dtype=denoise.dtype, device=denoise.device)
    else:
        kl = kl_surrogate(pred, ref_pred).mean()
    return {"loss": denoise + beta * kl, "denoise": denoise, "kl": kl}
