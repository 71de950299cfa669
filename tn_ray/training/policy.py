"""The policy: a text-to-image pipeline whose UNet (`Policy`) or flow-matching transformer (`FlowPolicy`) carries one
LoRA adapter (peft).

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

from tn_ray.diffusion.flow_sampling import flow_chain_means, sample_flow_chains
from tn_ray.diffusion.pipelines import TINY_SD3, WORLD_FLOW
from tn_ray.diffusion.sampling import chain_means, sample_chains
from tn_ray.training.config import ADAPTER, LoraBlock, PolicyBlock
from tn_ray.training.flow_policy import adapters_disabled, add_flow_lora

LORA_FILE = "pytorch_lora_weights.safetensors"


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: None = full precision (``no``, or ``auto`` on CPU)."""
    if mixed_precision == "auto":
        return torch.float16 if device.type == "cuda" else None
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def is_flow_source(source: str) -> bool:
    """Whether a ``policy.pipeline`` names a flow-matching (Stable Diffusion 3) pipeline, without loading it:
    ``tiny-sd3``, ``world-flow``, a local diffusers folder whose ``model_index.json`` names a StableDiffusion3
    class, or a hub id containing ``stable-diffusion-3``."""
    import json

    if source in (TINY_SD3, WORLD_FLOW):
        return True
    index = Path(source) / "model_index.json"
    if index.is_file():
        return "StableDiffusion3" in str(json.loads(index.read_text()).get("_class_name", ""))
    return "stable-diffusion-3" in source.lower()


def check_policy_kind(source: str, flow: bool, method: str) -> None:
    """ValueError (one line, naming ``policy.pipeline``) when a UNet pipeline is given where a flow-matching
    one is needed (``flow``) or the other way round."""
    if is_flow_source(source) != flow:
        need, other = ("a flow-matching (SD 3) pipeline, e.g. 'tiny-sd3'", "a UNet pipeline") if flow else (
            "a UNet pipeline, e.g. 'tiny'", "a flow-matching (SD 3) pipeline: use `tn-ray grpo`")
        raise ValueError(f"policy.pipeline: {method} needs {need}; {source!r} is {other}")


class Policy:
    """A pipeline + LoRA on its UNet; ``pipe`` generates with the adapter enabled.

    :class:`FlowPolicy` is the same for a flow-matching pipeline's transformer; :meth:`load` picks the one
    the pipeline needs. Shared code works on ``self.model`` (the UNet or the transformer) and
    ``self.train_model`` (the module forwards with gradients go through: a DDP wrapper on several workers).
    """

    model_attr = "unet"

    def __init__(self, pipe, lora: LoraBlock, mixed_precision: str = "auto", seed: int = 0,
                 gradient_checkpointing: bool = False):
        self.pipe = pipe
        model = getattr(pipe, self.model_attr, None)
        if model is None:
            other = "Policy" if self.model_attr != "unet" else "FlowPolicy"
            raise ValueError(f"{type(self).__name__} needs a pipeline with a {self.model_attr}; "
                             f"{type(pipe).__name__} has none (use {other})")
        self.model = model
        self.device = pipe.device
        self.amp_dtype = autocast_dtype(mixed_precision, self.device)
        self._add_adapter(lora, seed)
        if gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.model.train()
        self.train_model = self.model

    def _add_adapter(self, lora: LoraBlock, seed: int) -> None:
        from peft import LoraConfig

        for module in (self.pipe.unet, self.pipe.vae, self.pipe.text_encoder):
            module.requires_grad_(False)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)  # LoRA A matrices: the same in every worker and every resumed run
            self.model.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.lora_alpha, init_lora_weights=lora.init,
                                              target_modules=list(lora.target_modules)), adapter_name=ADAPTER)
        for p in self.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()

    # the UNet names DDPO, RWR and evaluation use
    @property
    def unet(self):
        return self.model

    @unet.setter
    def unet(self, module) -> None:
        self.model = module

    @property
    def train_unet(self):
        return self.train_model

    @train_unet.setter
    def train_unet(self, module) -> None:
        self.train_model = module

    @classmethod
    def load(cls, block: PolicyBlock, device: str | None = None, seed: int = 0) -> Policy:
        """The pipeline of ``block`` with its LoRA: a :class:`FlowPolicy` for a flow-matching pipeline."""
        from tn_ray.diffusion.pipelines import load_pipeline

        pipe = load_pipeline(block.pipeline, None, block.dtype, device, block.revision)
        kind = FlowPolicy if getattr(pipe, "transformer", None) is not None else Policy
        if cls is not Policy and kind is not cls:
            raise ValueError(f"policy.pipeline: {block.pipeline!r} loads a {type(pipe).__name__}, not one "
                             f"{cls.__name__} takes")
        return kind(pipe, block.lora, block.mixed_precision, seed, block.gradient_checkpointing)

    # --- parameters and the reference model ---------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self):
        """Within this block the UNet (transformer) is the base model (adapters disabled)."""
        with adapters_disabled(self.model):
            yield

    def wrap_ddp(self) -> None:
        """Data-parallel gradients of the adapter over Ray Train's process group (world size > 1)."""
        import ray.train.torch

        self.train_model = ray.train.torch.prepare_model(self.model, move_to_device=False)

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

    # --- the path KL of evaluation -----------------------------------------------------------
    @torch.no_grad()
    def path_kl_means(self, prompts: list[str], prompt_ids: list[int], generators: list[torch.Generator], block):
        """(means, base means, stds) of one stochastic DDIM chain per prompt (eta = ``block.kl_eta``, ``block``'s
        steps, guidance and size; (B, T, C, h, w), (B, T, C, h, w), (B, T)): the policy's step means as sampled
        and the base model's (adapters disabled) on the same states, for :func:`tn_ray.training.losses.path_kl`.
        A DDIM scheduler built from the pipeline's config samples; the pipeline's own is left as it was."""
        from diffusers import DDIMScheduler

        pipe, own = self.pipe, self.pipe.scheduler
        pipe.scheduler = DDIMScheduler.from_config(own.config)
        means, stds = [], []
        try:
            chains = sample_chains(pipe, prompts, prompt_ids, num_steps=block.num_inference_steps,
                                   guidance=block.guidance_scale, eta=block.kl_eta, generator=generators,
                                   autocast=self.autocast(), height=block.height, width=block.width,
                                   on_step=lambda step: (means.append(step.mean), stds.append(step.std)))
            with self.reference():
                ref, _ = chain_means(pipe.unet, pipe.scheduler, chains, block.guidance_scale, block.kl_eta,
                                     self.autocast())
        finally:
            pipe.scheduler = own
        return torch.stack(means, dim=1), ref, torch.stack(stds, dim=1)

    # --- adapter state -----------------------------------------------------------------
    def lora_state(self) -> dict[str, torch.Tensor]:
        """The adapter's weights (peft names, CPU copies)."""
        from peft.utils import get_peft_model_state_dict

        return {
            k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.model, adapter_name=ADAPTER).items()
        }

    def load_lora_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put saved adapter weights into the one active adapter (never a second adapter)."""
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, state, adapter_name=ADAPTER)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise ValueError(
                f"LoRA state does not fit this policy: unexpected keys {unexpected[:3]} "
                f"(rank / target_modules changed since the checkpoint?)"
            )
        missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
        if missing:
            raise ValueError(f"LoRA state lacks {len(missing)} adapter weights, e.g. {missing[:3]}")
        self.model.set_adapter(ADAPTER)

    def save_lora(self, folder: str | Path) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` into ``folder``: peft's key names under ``unet.``, which
        ``pipe.load_lora_weights(folder)`` loads as they are. (Converted to diffusers' older ``lora.down/up``
        names first, as its training scripts do, an adapter on conv as well as attention layers lost every
        attention weight on loading: tests/test_training_core.py.)"""
        from peft.utils import get_peft_model_state_dict

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._save_layers(folder, get_peft_model_state_dict(self.model, adapter_name=ADAPTER))
        return folder / LORA_FILE

    def _save_layers(self, folder: Path, layers: dict) -> None:
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)


class FlowPolicy(Policy):
    """A flow-matching pipeline (``StableDiffusion3Pipeline``) + LoRA on its transformer, through
    :func:`tn_ray.training.flow_policy.add_flow_lora` (targets: ``lora.target_modules`` when set, else
    :data:`tn_ray.diffusion.pipelines.SD3_LORA_TARGETS`); the reference is the transformer with adapters
    disabled (:func:`~tn_ray.training.flow_policy.flow_reference`); :meth:`save_lora` writes the LoRA under
    ``transformer.``, which ``StableDiffusion3Pipeline.load_lora_weights(folder)`` loads."""

    model_attr = "transformer"

    def _add_adapter(self, lora: LoraBlock, seed: int) -> None:
        targets = list(lora.target_modules) if "target_modules" in lora.model_fields_set else None
        add_flow_lora(self.pipe, lora.rank, lora.lora_alpha, targets, lora.init, seed)

    @property
    def transformer(self):
        return self.model

    @torch.no_grad()
    def path_kl_means(self, prompts: list[str], prompt_ids: list[int], generators: list[torch.Generator], block):
        """(means, base means, stds) of one Flow-GRPO SDE chain per prompt, every step stochastic (noise level
        ``block.kl_noise_level``, ``block``'s steps, guidance and size; (B, T, C, h, w), (B, T, C, h, w), (B, T)):
        the policy's step means as sampled and the base transformer's (adapters disabled) on the same states
        (:func:`tn_ray.diffusion.flow_sampling.flow_chain_means`). The steps share their std (sigma_t does not
        depend on the model), so each step's KL is ``|mean - base mean|^2 / (2 std^2)``."""

        means, stds = [], []

        def record(i, step) -> None:
            means.append(step.mean)
            stds.append(step.std.reshape(-1))

        chains = sample_flow_chains(self.pipe, prompts, prompt_ids, num_steps=block.num_inference_steps,
                                    guidance=block.guidance_scale, noise_level=block.kl_noise_level,
                                    generator=generators, height=block.height, width=block.width,
                                    autocast=self.autocast(), on_step=record)
        with self.reference():
            ref, _ = flow_chain_means(self.model, self.pipe.scheduler, chains, block.guidance_scale,
                                      block.kl_noise_level, self.autocast())
        return torch.stack(means, dim=1), ref, torch.stack(stds, dim=1)

    @property
    def unet(self):
        raise AttributeError("a FlowPolicy has a transformer, not a UNet (DDPO and RWR need a UNet pipeline)")

    def _save_layers(self, folder: Path, layers: dict) -> None:
        from diffusers import StableDiffusion3Pipeline

        StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=layers, safe_serialization=True)
