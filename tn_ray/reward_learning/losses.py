"""The reward-learning losses (Lee et al. 2023, eqs. 2-3), as pure functions of tensors.

- Label loss: ``mse`` = mean((r - y)^2) of the reward against the label y (binary 0/1, or the
  fine-grained mean label in [0, 1]); ``bce`` = mean binary cross-entropy of sigmoid(r) vs y.
- Prompt-classification loss: for each image labelled good, the cross-entropy of the softmax
  over its rewards of [x0, x1..xm] (divided by a temperature T) with x0 as the class:
  ``-log( exp(r(x0,y)/T) / sum_j exp(r(xj,y)/T) )``, averaged over the good images (0 when a
  batch has none); contrastive sets of different sizes are masked. It is the training-time
  twin of TextNorm, which scores the same softmax at test time.
- Total: ``label + aux_weight * prompt_classification`` (aux_weight 0 turns it off).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def label_loss(reward: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    if kind == "mse":
        return ((reward - target) ** 2).mean()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(reward, target)
    raise ValueError(f"unknown label loss {kind!r}; expected mse or bce")


def prompt_classification_loss(rewards: torch.Tensor, mask: torch.Tensor, good: torch.Tensor,
                               temperature: float = 1.0) -> torch.Tensor:
    """``rewards`` (n, 1 + m): column 0 = x0; ``mask`` (n, 1 + m) True where the text exists;
    ``good`` (n,) True for images labelled good."""
    logits = (rewards / temperature).masked_fill(~mask, float("-inf"))
    ce = -torch.log_softmax(logits, dim=-1)[:, 0]
    weight = good.to(rewards.dtype)
    return (ce * weight).sum() / weight.sum().clamp_min(1.0)


def total_loss(rewards: torch.Tensor, mask: torch.Tensor, target: torch.Tensor, good: torch.Tensor, kind: str = "mse",
               aux_weight: float = 0.0, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """``{"loss", "label", "aux"}`` of a batch; ``rewards[:, 0]`` is the reward of the image's own prompt."""
    label = label_loss(rewards[:, 0], target, kind)
    aux = prompt_classification_loss(rewards, mask, good, temperature) if aux_weight > 0 else rewards.new_zeros(())
    return {"loss": label + aux_weight * aux, "label": label, "aux": aux}


def probability(reward, kind: str = "mse"):
    """The predicted probability that an image is good: sigmoid(r) for bce, r clipped to [0, 1] for mse
    (works on tensors and numpy arrays)."""
    import numpy as np

    if isinstance(reward, torch.Tensor):
        return torch.sigmoid(reward) if kind == "bce" else reward.clamp(0.0, 1.0)
    r = np.asarray(reward, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-r)) if kind == "bce" else np.clip(r, 0.0, 1.0)
