"""Per-prompt advantages for DDPO: rewards standardized by their prompt's recent statistics.

:class:`PerPromptStatTracker` is ddpo-pytorch's (and trl's) tracker: each prompt keeps a
buffer of its last ``buffer_size`` rewards; once it holds ``min_count`` of them the prompt's
rewards are standardized by the buffer's mean and std, before that by the whole batch's.
Advantages are clipped to ``[-adv_clip_max, adv_clip_max]``.

Across Ray Train workers, :func:`shared_advantages` gathers every worker's (prompt id, reward)
in rank order, runs the same tracker update on the whole epoch in every worker (so every
worker's buffers stay identical) and returns this worker's rows: the advantages equal a
single worker's on the same samples in rank order.
"""
from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import torch


class PerPromptStatTracker:
    """Buffers of recent rewards per prompt (keys: prompt ids or prompt strings)."""

    def __init__(self, buffer_size: int, min_count: int):
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size and min_count must be >= 1, got {buffer_size}, {min_count}")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.stats: dict[Any, deque] = {}

    def update(self, prompts: np.ndarray, rewards: np.ndarray) -> np.ndarray:
        """Add this epoch's rewards to the buffers and return the (unclipped) advantages, float64."""
        prompts = np.asarray(prompts)
        rewards = np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        for prompt in np.unique(prompts):
            rows = prompts == prompt
            buf = self.stats.setdefault(prompt.item(), deque(maxlen=self.buffer_size))
            buf.extend(rewards[rows].tolist())
            ref = rewards if len(buf) < self.min_count else np.asarray(buf)
            advantages[rows] = (rewards[rows] - ref.mean()) / (ref.std() + 1e-6)
        return advantages

    def state_dict(self) -> dict[str, Any]:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "stats": {k: list(v) for k, v in self.stats.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.stats = {k: deque(v, maxlen=self.buffer_size) for k, v in state["stats"].items()}


def batch_advantages(rewards: np.ndarray) -> np.ndarray:
    """Without per-prompt tracking: rewards standardized by the whole batch (ddpo-pytorch's default)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return (rewards - rewards.mean()) / (rewards.std() + 1e-6)


def gather_rows(values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All workers' ``values`` (1-d, possibly different lengths) concatenated in rank order, and
    where this worker's rows start; the local tensor itself outside torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values, 0
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    n = torch.tensor([values.numel()], dtype=torch.long, device=device)
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, n)
    counts = [int(c) for c in counts]
    padded = torch.zeros(max(counts), dtype=values.dtype, device=device)
    padded[: values.numel()] = values.to(device)
    parts = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    start = sum(counts[: dist.get_rank()])
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu(), start


def gather_rewards(prompt_ids: np.ndarray, rewards: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Every worker's (prompt ids, rewards) in rank order, and where this worker's rows start."""
    ids, start = gather_rows(torch.as_tensor(np.asarray(prompt_ids), dtype=torch.long))
    all_rewards, _ = gather_rows(torch.as_tensor(np.asarray(rewards), dtype=torch.float64))
    return ids.numpy(), all_rewards.numpy(), start


def shared_advantages(prompt_ids: np.ndarray, rewards: np.ndarray, stat_tracker: PerPromptStatTracker | None,
                      adv_clip_max: float) -> np.ndarray:
    """This worker's clipped advantages, computed from every worker's rewards (see module doc)."""
    ids, all_rewards, start = gather_rewards(prompt_ids, rewards)
    adv = stat_tracker.update(ids, all_rewards) if stat_tracker is not None else batch_advantages(all_rewards)
    return np.clip(adv[start : start + len(rewards)], -adv_clip_max, adv_clip_max)
