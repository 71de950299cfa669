"""The policy: a text-to-image pipeline whose UNet carries one LoRA adapter (peft).

As diffusers' own LoRA training example: every base weight is frozen, the adapter is added
with ``unet.add_adapter(LoraConfig(...))`` on the attention projections, and the trainable
(adapter) parameters are upcast to float32 so they train in full precision under fp16/bf16
autocast. The base model is the *same* UNet with its adapters disabled for one forward
(:meth:`Policy.reference`, as diffusers' Diffusion-DPO example): no second UNet in memory.

Adapter state: :meth:`lora_state` / :meth:`load_lora_state` go through peft's
``get/set_peft_model_state_dict`` into the one adapter ``default`` (loading a saved LoRA with
``load_lora_weights`` after ``add_adapter`` would add a *second* adapter and leave the
trained one inactive: trl issue 2505). :meth:`save_lora` writes diffusers' LoRA format,
which a plain pipeline loads with ``pipe.load_lora_weights(folder)``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from tn_ray.training.config import LoraBlock, PolicyBlock

ADAPTER = "default"
LORA_FILE = "pytorch_lora_weights.safetensors"


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: None = full precision (``no``, or ``auto`` on CPU)."""
    if mixed_precision == "auto":
        return torch.float16 if device.type == "cuda" else None
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


class Policy:
    """A pipeline + LoRA on its UNet; ``pipe`` generates with the adapter enabled."""

    def __init__(self, pipe, lora: LoraBlock, mixed_precision: str = "auto", seed: int = 0,
                 gradient_checkpointing: bool = False):
        from peft import LoraConfig

        self.pipe = pipe
        self.unet = pipe.unet
        self.device = pipe.device
        self.amp_dtype = autocast_dtype(mixed_precision, self.device)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.requires_grad_(False)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)  # LoRA A matrices: the same in every worker and every resumed run
            self.unet.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.lora_alpha, init_lora_weights=lora.init,
                                             target_modules=list(lora.target_modules)), adapter_name=ADAPTER)
        for p in self.unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.train()
        self.train_unet = self.unet  # the module forward passes that need gradients go through (DDP wrapper)

    @classmethod
    def load(cls, block: PolicyBlock, device: str | None = None, seed: int = 0) -> Policy:
        from tn_ray.diffusion.pipelines import load_pipeline

        pipe = load_pipeline(block.pipeline, None, block.dtype, device, block.revision)
        return cls(pipe, block.lora, block.mixed_precision, seed, block.gradient_checkpointing)

    # --- parameters and the reference model ---------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.unet.named_parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self):
        """Within this block the UNet is the base model (adapters disabled)."""
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()

    def wrap_ddp(self) -> None:
        """Data-parallel gradients of the adapter over Ray Train's process group (world size > 1)."""
        import ray.train.torch

        self.train_unet = ray.train.torch.prepare_model(self.unet, move_to_device=False)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # --- forward passes ----------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder hidden states (batch, tokens, dim) of ``prompts``, no classifier-free pair."""
        embeds, _ = self.pipe.encode_prompt(list(prompts), self.device, 1, do_classifier_free_guidance=False)
        return embeds

    def noise_pred(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """The policy's UNet output (noise, or v for v-prediction models), with gradients into LoRA."""
        with self.autocast():
            return self.train_unet(latents, timesteps, encoder_hidden_states=embeds).sample

    @torch.no_grad()
    def reference_pred(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """The base model's output on the same inputs: the same UNet, adapters disabled, no graph."""
        with self.reference(), self.autocast():
            return self.unet(latents, timesteps, encoder_hidden_states=embeds).sample

    # --- adapter state -----------------------------------------------------------------
    def lora_state(self) -> dict[str, torch.Tensor]:
        """The adapter's weights (peft names, CPU copies)."""
        from peft.utils import get_peft_model_state_dict

        return {
            k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.unet, adapter_name=ADAPTER).items()
        }

    def load_lora_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put saved adapter weights into the one active adapter (never a second adapter)."""
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.unet, state, adapter_name=ADAPTER)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise ValueError(
                f"LoRA state does not fit this policy: unexpected keys {unexpected[:3]} "
                f"(rank / target_modules changed since the checkpoint?)"
            )
        missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
        if missing:
            raise ValueError(f"LoRA state lacks {len(missing)} adapter weights, e.g. {missing[:3]}")
        self.unet.set_adapter(ADAPTER)

    def save_lora(self, folder: str | Path) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` into ``folder``: peft's key names under ``unet.``, which
        ``pipe.load_lora_weights(folder)`` loads as they are. (Converted to diffusers' older ``lora.down/up``
        names first, as its training scripts do, an adapter on conv as well as attention layers lost every
        attention weight on loading: tests/test_training_core.py.)"""
        from diffusers import StableDiffusionPipeline
        from peft.utils import get_peft_model_state_dict

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        layers = get_peft_model_state_dict(self.unet, adapter_name=ADAPTER)
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
        return folder / LORA_FILE
