"""AdamW over the adapter, its learning-rate schedule, gradient clipping and fp16 loss scaling.

One object so a method never touches the optimizer directly: ``backward(loss)`` (scaled
when training in fp16), then ``step()`` (unscale, clip the global norm, step, schedule,
zero the gradients). A method may call ``backward`` several times before one ``step``
(gradient accumulation over timesteps, as DDPO).
"""
from __future__ import annotations

import torch

from tn_ray.training.config import OptimizerBlock


class Optimization:
    def __init__(self, params: list[torch.nn.Parameter], block: OptimizerBlock, max_steps: int,
                 device: torch.device, amp_dtype: torch.dtype | None = None):
        from diffusers.optimization import get_scheduler

        self.params = list(params)
        self.block = block
        self.optimizer = torch.optim.AdamW(self.params, lr=block.lr, betas=tuple(block.betas),
                                           weight_decay=block.weight_decay, eps=block.eps)
        self.scheduler = get_scheduler(block.schedule, self.optimizer, num_warmup_steps=block.warmup_steps,
                                       num_training_steps=max_steps)
        # loss scaling only for fp16 (bf16 has float32's exponent range)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> dict[str, float]:
        """Apply the accumulated gradients; returns the learning rate used and the gradient norm
        before clipping."""
        lr = float(self.scheduler.get_last_lr()[0])
        self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.block.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.block.max_grad_norm)
        else:
            norm = (
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                if grads
                else torch.zeros(())
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"lr": lr, "grad_norm": float(norm)}

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
