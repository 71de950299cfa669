"""An exponential moving average (EMA) of the trained LoRA weights, as Flow-GRPO's ``train.ema``.

After optimizer step n (n = 1, 2, ... counted over the whole run) the average moves toward the weights
when n is a multiple of ``every``: ``ema <- d ema + (1 - d) w`` with ``d = min(decay, (1 + n) / (10 + n))``
(``warmup``; Flow-GRPO's ``EMAModuleWrapper.get_current_decay``) or ``d = decay``. The averaged weights
are what evaluation scores and what a checkpoint exports (its LoRA file); the trained weights and the
average's state (step count, weights) go into the checkpoint's state so a resumed run continues exactly.

Not diffusers' ``EMAModel``: it counts its own updates (decay 0 on the first, (1 + k) / (10 + k) after the
k-th) and has no update interval, so Flow-GRPO's schedule (every 8 optimizer steps, decay 0.9 on the
optimizer step count) cannot be written with it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from pydantic import Field

from tn_ray.config import StrictModel


class EMABlock(StrictModel):
    enabled: bool = Field(
        False, description="keep an EMA of the LoRA weights; evaluation and the checkpoints' LoRA files use it "
        "(Flow-GRPO train.ema: True in its GRPO configs)"
    )
    decay: float = Field(
        0.9, ge=0, lt=1, description="d: the average keeps d of itself per EMA update, ema <- d ema + (1 - d) w "
        "(unitless, per update; Flow-GRPO 0.9: with every 8, about the last 20 x 8 = 160 optimizer steps)"
    )
    every: int = Field(
        8, ge=1, description="optimizer steps between EMA updates (count; Flow-GRPO update_step_interval 8)"
    )
    warmup: bool = Field(
        True, description="the update after optimizer step n uses min(decay, (1 + n) / (10 + n)) (Flow-GRPO's "
        "get_current_decay), so early updates follow the weights more closely; False = decay from the start"
    )


def ema_decay(n: int, decay: float, warmup: bool = True) -> float:
    """The decay of the EMA update after optimizer step ``n`` (1-based)."""
    return min(decay, (1 + n) / (10 + n)) if warmup else decay


@torch.no_grad()
def ema_update(average: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], d: float) -> None:
    """In place: ``average <- d average + (1 - d) weights``, tensor by tensor."""
    for a, w in zip(average, weights, strict=True):
        a.add_(w.detach().to(a.dtype) - a, alpha=1 - d)


class EMA:
    """The moving average of ``params`` (the policy's trainable LoRA parameters), updated by :meth:`step`
    after every optimizer step."""

    def __init__(self, params: Sequence[torch.nn.Parameter], block: EMABlock):
        self.params = list(params)
        self.block = block
        self.average = [p.detach().clone() for p in self.params]
        self.steps = 0  # optimizer steps seen

    def step(self) -> float | None:
        """Count one optimizer step; update the average when the count is a multiple of ``every``.
        Returns the decay used, None when this step did not update."""
        self.steps += 1
        if self.steps % self.block.every:
            return None
        d = ema_decay(self.steps, self.block.decay, self.block.warmup)
        ema_update(self.average, self.params, d)
        return d

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within this block the parameters hold the average (evaluation, export); restored after."""
        trained = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, a in zip(self.params, self.average, strict=True):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, t in zip(self.params, trained, strict=True):
                    p.copy_(t)

    def state_dict(self) -> dict:
        return {"steps": self.steps, "average": [a.detach().cpu().clone() for a in self.average]}

    def load_state_dict(self, state: dict) -> None:
        average = state["average"]
        shapes = [tuple(a.shape) for a in self.average]
        if [tuple(a.shape) for a in average] != shapes:
            raise ValueError(f"EMA state does not fit this policy: {len(average)} tensors for {len(shapes)} LoRA "
                             "parameters or other shapes (rank / target_modules changed since the checkpoint?)")
        with torch.no_grad():
            for a, s in zip(self.average, average, strict=True):
                a.copy_(s)
        self.steps = int(state["steps"])
