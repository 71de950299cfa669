"""LoRA on a flow-matching pipeline's transformer, and its reference model (the adapters disabled).

The pieces :class:`tn_ray.training.policy.Policy` gives a UNet pipeline, for the transformer of a
:class:`diffusers.StableDiffusion3Pipeline`, working on the pipeline object: every base weight
frozen, one adapter added with ``transformer.add_adapter(LoraConfig(...))`` on the joint attention's
projections (:data:`tn_ray.diffusion.pipelines.SD3_LORA_TARGETS`, as diffusers' SD3 LoRA example
and flow_grpo), trainable parameters upcast to float32, and the reference model as the same
transformer with its adapters disabled for one forward (no second transformer in memory).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from tn_ray.diffusion.pipelines import SD3_LORA_TARGETS
from tn_ray.training.config import ADAPTER


def add_flow_lora(pipe, rank: int = 4, lora_alpha: float | None = None, target_modules: Sequence[str] | None = None,
                  init_lora_weights: bool | str = True, seed: int = 0) -> list[torch.nn.Parameter]:
    """Freeze the pipeline's models, put one LoRA adapter (``ADAPTER``) on its transformer; returns the
    trainable (adapter) parameters, in float32. ``lora_alpha`` None = ``rank`` (scale 1)."""
    from peft import LoraConfig

    if getattr(pipe, "transformer", None) is None:
        raise ValueError(f"{type(pipe).__name__} has no transformer: flow-matching LoRA needs an SD3-style pipeline")
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False)
    device = pipe.transformer.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # the A matrices: the same in every worker and every resumed run
        pipe.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank if lora_alpha is None else lora_alpha,
                                                init_lora_weights=init_lora_weights,
                                                target_modules=list(target_modules or SD3_LORA_TARGETS)),
                                     adapter_name=ADAPTER)
    params = [p for p in pipe.transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


@contextlib.contextmanager
def flow_reference(pipe):
    """Within this block the pipeline's transformer is the base model (adapters disabled)."""
    pipe.transformer.disable_adapters()
    try:
        yield
    finally:
        pipe.transformer.enable_adapters()
