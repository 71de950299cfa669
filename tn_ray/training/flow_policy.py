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


def adapter_layers(model: torch.nn.Module) -> list:
    """The peft layers of ``model`` (found once, then cached on it): what :func:`adapters_disabled` toggles."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = getattr(model, "_tn_ray_adapter_layers", None)
    if not layers:  # never cache "none": an adapter added later must be found
        layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        if not layers:
            raise ValueError(f"{type(model).__name__} has no LoRA adapter to disable (add_adapter first)")
        model._tn_ray_adapter_layers = layers
    return layers


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Within this block ``model`` (a UNet or transformer with LoRA) is the base model: the reference.

    The same per-layer calls as diffusers' ``disable_adapters`` / ``enable_adapters`` (peft's
    ``enable_adapters(False / True)``, which also clears and restores the adapters' ``requires_grad``), on the
    layers found once instead of a walk over every module each time: the walk was ~1.6 ms of a ~10 ms
    reference forward of tiny-sd3 (3 per GRPO step with a KL term)."""
    layers = adapter_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def flow_reference(pipe):
    """Within this block the pipeline's transformer is the base model (adapters disabled)."""
    return adapters_disabled(pipe.transformer)
