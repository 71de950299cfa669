"""Settings of the world generator and of its training (``sweeps/world_generator.yaml``; the flow-matching
variant: ``sweeps/world_generator_flow.yaml``)."""
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


class TransformerSettings(StrictModel):
    """The flow-matching denoiser: an ``SD3Transformer2DModel`` (MMDiT, as Stable Diffusion 3.0)."""

    patch_size: int = Field(2, ge=1, description="latent pixels per token side (a 16 x 16 latent at patch 2 is 8 x 8 "
                                                 "= 64 image tokens)")
    layers: int = Field(6, ge=1, description="joint transformer blocks (count)")
    heads: int = Field(4, ge=1, description="attention heads per block (count)")
    head_dim: int = Field(32, ge=4, description="channels per head; the model width is heads x head_dim (channels)")


class DenoiserTraining(StrictModel):
    objective: Literal["ddpm", "flow"] = Field(
        "ddpm", description="the denoiser's training objective: ddpm (the UNet: epsilon or v prediction, diffusers' "
                            "text-to-image example) or flow (the transformer: rectified flow as diffusers' "
                            "train_dreambooth_sd3.py, x_t = (1 - sigma) x0 + sigma noise, target noise - x0)")
    prediction_type: Literal["epsilon", "v_prediction"] = Field("v_prediction", description="what the UNet predicts "
                                                                                            "(ddpm only)")
    beta_schedule: Literal["scaled_linear", "squaredcos_cap_v2", "linear"] = Field(
        "squaredcos_cap_v2", description="noise schedule of the DDPM training and the DDIM sampler (the cosine "
                                         "schedule suits small images; ddpm only)")
    timestep_density: Literal["logit_normal", "uniform"] = Field(
        "logit_normal", description="flow only: how training draws u in [0, 1) (then sigma = the scheduler's "
                                    "shifted sigma at index u x 1000): logit_normal = sigmoid(N(logit_mean, "
                                    "logit_std)), SD 3's, more steps at mid noise; uniform = every noise level alike "
                                    "(diffusers' compute_density_for_timestep_sampling 'logit_normal' / 'none')")
    logit_mean: float = Field(0.0, description="flow, logit_normal: mean of the normal before the sigmoid (0 = centred "
                                               "on u = 0.5)")
    logit_std: float = Field(1.0, gt=0, description="flow, logit_normal: its standard deviation")
    shift: float = Field(1.0, gt=0, description="flow only: FlowMatchEulerDiscreteScheduler's shift of the training "
                                                "sigmas and of the sampler shipped with the pipeline, sigma' = s sigma "
                                                "/ (1 + (s - 1) sigma); SD 3 uses 3.0 at 1024 px (more pixels need "
                                                "more noise), the world's 16 x 16 latents 1.0 (no shift)")
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
    steps: int = Field(20, ge=1, description="sampler steps the evaluation and the experiments sample with (DDIM for "
                                             "the UNet, flow-matching Euler for the transformer)")
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
    denoiser: Literal["unet", "transformer"] = Field(
        "unet", description="unet: a StableDiffusionPipeline, its UNet, text encoder and autoencoder all trained "
                            "here (train.objective ddpm); transformer: a StableDiffusion3Pipeline whose "
                            "SD3Transformer2DModel is the only part trained (train.objective flow), on the autoencoder "
                            "and text encoder of `parts_from`, frozen")
    transformer: TransformerSettings = TransformerSettings()
    parts_from: str | None = Field(
        None, description="denoiser transformer only: a world pipeline folder (a StableDiffusionPipeline written by "
                          "this command; 'world' = the shipped one) whose autoencoder and text encoder the transformer "
                          "trains on, frozen (no autoencoder phase); `autoencoder` and `text.hidden` must describe "
                          "them. None for the UNet, which trains its own")
    train: DenoiserTraining = DenoiserTraining()
    sampling: SamplingDefaults = SamplingDefaults()
    eval_per_kind: int = Field(40, ge=1, description="held-out prompts per kind in the final evaluation")
    eval_images: int = Field(4, ge=1, description="images per evaluation prompt")

    @model_validator(mode="after")
    def _denoiser(self):
        if self.denoiser == "unet":
            if self.train.objective != "ddpm":
                raise ValueError(f"train.objective '{self.train.objective}' needs denoiser: transformer (the UNet "
                                 "trains with ddpm)")
            if self.parts_from is not None:
                raise ValueError("parts_from is for denoiser: transformer (the UNet trains its own autoencoder and "
                                 "text encoder); remove it")
        else:
            if self.train.objective != "flow":
                raise ValueError(f"denoiser 'transformer' needs train.objective: flow (got '{self.train.objective}')")
            if self.parts_from is None:
                raise ValueError("denoiser 'transformer' needs parts_from: a world pipeline folder ('world' = the "
                                 "shipped one) whose autoencoder and text encoder it trains on")
        return self

    @model_validator(mode="after")
    def _shapes(self):
        if self.text.hidden % self.text.heads:
            raise ValueError(f"text.heads ({self.text.heads}) must divide text.hidden ({self.text.hidden})")
        factor = 2 ** (len(self.autoencoder.channels) - 1)
        latent = self.size // factor
        if self.denoiser == "transformer":
            p = self.transformer.patch_size
            if self.size % factor or latent % p:
                raise ValueError(f"size {self.size} px with {len(self.autoencoder.channels)} autoencoder blocks gives "
                                 f"a {self.size / factor:g} px latent, which transformer.patch_size {p} does not "
                                 "divide")
            return self
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
