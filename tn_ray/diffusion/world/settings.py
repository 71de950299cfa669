"""Settings of the world generator and of its training (``sweeps/world_generator.yaml``)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tn_ray.config import StrictModel


class AutoencoderSettings(StrictModel):
    channels: tuple[int, ...] = Field((32, 64), description="AutoencoderKL block widths; the latent is the image "
                                                            "downsampled 2^(len-1) times (count)")
    latent_channels: int = Field(4, ge=1, description="latent channels, as SD's VAE (count)")
    steps: int = Field(600, ge=1, description="optimizer steps of the autoencoder phase")
    batch: int = Field(32, ge=1, description="images per step (renders of random matching scenes)")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (cosine decay)")
    kl_weight: float = Field(1e-6, ge=0, description="weight of the KL term against the pixel MSE (in [-1, 1] units), "
                                                     "as latent diffusion's f-autoencoders")


class TextSettings(StrictModel):
    hidden: int = Field(128, ge=8, description="CLIPTextModel width = the UNet's cross-attention width (count)")
    layers: int = Field(2, ge=1, description="transformer layers (count)")
    heads: int = Field(4, ge=1, description="attention heads; must divide hidden")


class UNetSettings(StrictModel):
    channels: tuple[int, ...] = Field((64, 96, 128), description="UNet2DConditionModel block widths, one per "
                                                                 "resolution (count)")
    attention_from: int = Field(1, ge=0, description="index of the first block with cross-attention: blocks before it "
                                                     "are convolution-only (1 = attention at 8x8 and coarser for a "
                                                     "16x16 latent)")
    layers_per_block: int = Field(1, ge=1, description="ResNet layers per block (count)")
    heads: int = Field(4, ge=1, description="attention heads per cross-attention layer")


class DenoiserTraining(StrictModel):
    objective: Literal["ddpm"] = Field("ddpm", description="the denoiser's training objective (a flow-matching "
                                                           "objective plugs in here for the GRPO issue)")
    prediction_type: Literal["epsilon", "v_prediction"] = Field("v_prediction", description="what the UNet predicts")
    beta_schedule: Literal["scaled_linear", "squaredcos_cap_v2", "linear"] = Field(
        "squaredcos_cap_v2", description="noise schedule of the DDPM training and the DDIM sampler (the cosine "
                                         "schedule suits small images)")
    steps: int = Field(2400, ge=1, description="optimizer steps; samples seen = steps x batch")
    batch: int = Field(64, ge=1, description="(image, caption) pairs per step, drawn fresh each step")
    lr: float = Field(5e-4, gt=0, description="peak AdamW learning rate (linear warm-up, then cosine decay to 10%)")
    warmup: int = Field(100, ge=0, description="warm-up steps")
    ema_decay: float = Field(0.999, gt=0, lt=1, description="EMA decay of the saved weights (with diffusers' warm-up)")
    uncond_prob: float = Field(0.1, ge=0, lt=1, description="probability a caption is replaced by '' (for "
                                                            "classifier-free guidance)")
    checkpoint_every: int = Field(100, ge=1, description="steps between resumable checkpoints")
    stop_at: int | None = Field(None, ge=1, description="end training at this step of the `steps`-step schedule "
                                                        "(the learning-rate schedule still spans `steps`); None = "
                                                        "`steps`. A work folder may be continued with another value")

    @model_validator(mode="after")
    def _stop(self):
        if self.stop_at is not None and self.stop_at > self.steps:
            raise ValueError(f"train.stop_at ({self.stop_at}) is past train.steps ({self.steps})")
        return self


class SamplingDefaults(StrictModel):
    steps: int = Field(20, ge=1, description="DDIM steps the evaluation and the experiments sample with")
    guidance: float = Field(3.0, ge=1, description="classifier-free guidance scale")


class WorldGeneratorConfig(StrictModel):
    """The world generator: architecture, its two training phases and how it is evaluated."""

    seed: int = Field(0, ge=0, description="seed of the weights, the data and the noise")
    threads: int = Field(2, ge=1, description="torch CPU threads while training (the weights depend on it: a rerun "
                                              "reproduces them bit for bit with the same count and machine type)")
    size: int = Field(32, ge=32, le=128, description="image side (px); the world renderer's range is 32..128")
    held_out: float = Field(0.2, gt=0, lt=1, description="share of the prompts of each kind never shown in training "
                                                         "(chosen by a hash of the text; evaluation uses them)")
    autoencoder: AutoencoderSettings = AutoencoderSettings()
    text: TextSettings = TextSettings()
    unet: UNetSettings = UNetSettings()
    train: DenoiserTraining = DenoiserTraining()
    sampling: SamplingDefaults = SamplingDefaults()
    eval_per_kind: int = Field(40, ge=1, description="held-out prompts per kind in the final evaluation")
    eval_images: int = Field(4, ge=1, description="images per evaluation prompt")

    @model_validator(mode="after")
    def _shapes(self):
        if self.text.hidden % self.text.heads:
            raise ValueError(f"text.heads ({self.text.heads}) must divide text.hidden ({self.text.hidden})")
        factor = 2 ** (len(self.autoencoder.channels) - 1)
        latent = self.size // factor
        if self.size % factor or latent % 2 ** (len(self.unet.channels) - 1):
            raise ValueError(f"size {self.size} px with {len(self.autoencoder.channels)} autoencoder blocks gives a "
                             f"{self.size / factor:g} px latent, which {len(self.unet.channels)} UNet blocks cannot "
                             "halve at every level")
        if self.unet.attention_from >= len(self.unet.channels):
            raise ValueError(f"unet.attention_from ({self.unet.attention_from}) must be below the number of UNet "
                             f"blocks ({len(self.unet.channels)}): cross-attention is how the text conditions it")
        return self

    @property
    def latent_size(self) -> int:
        return self.size // 2 ** (len(self.autoencoder.channels) - 1)
