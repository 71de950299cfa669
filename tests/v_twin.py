"""An epsilon UNet's exact v-prediction twin, for tests of the parameterization-free KL and loss.

``VTwin(unet, alphas_cumprod)`` returns ``v = (eps - sqrt(1 - a_t) x_t) / sqrt(a_t)`` where the
wrapped UNet returns eps, i.e. the velocity whose conversion back (``sqrt(a_t) v + sqrt(1 - a_t) x_t``)
is the same eps: the same model in the other parameterization. It forwards the adapter switches
``Policy.reference`` uses, so a tn_ray policy can run on it unchanged.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch


class VTwin(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.inner = unet
        self.config = unet.config
        self.register_buffer("acp", alphas_cumprod.detach().to(torch.float64).clone(), persistent=False)

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict: bool = True, **kwargs):
        eps = self.inner(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs).sample
        t = torch.as_tensor(timestep).long().reshape(-1).cpu()
        if t.numel() == 1:
            t = t.expand(sample.shape[0])
        a = self.acp[t].reshape(-1, *([1] * (sample.ndim - 1))).to(sample.device)
        v = ((eps.double() - (1 - a).sqrt() * sample.double()) / a.sqrt()).to(eps.dtype)
        return SimpleNamespace(sample=v) if return_dict else (v,)

    def disable_adapters(self) -> None:
        self.inner.disable_adapters()

    def enable_adapters(self) -> None:
        self.inner.enable_adapters()
