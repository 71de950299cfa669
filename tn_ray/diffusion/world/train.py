"""Training the world generator: an autoencoder phase, then the denoiser with its text encoder.

Phase 1 trains the ``AutoencoderKL`` on renders (pixel MSE + a small KL term, as latent
diffusion's autoencoders) and sets its ``scaling_factor`` to 1 / std of the latents. Phase 2
freezes it and trains the ``UNet2DConditionModel`` and the ``CLIPTextModel`` jointly on fresh
(render, caption) pairs with the objective named in the settings (``ddpm``: epsilon or v
prediction, as ``diffusers``' text-to-image example), captions dropped to '' with probability
``uncond_prob`` for classifier-free guidance, and an EMA of the weights saved.

The flow-matching variant (``denoiser: transformer``, objective ``flow``: :func:`flow_loss`) has
no autoencoder phase: it loads the autoencoder and text encoder of a world pipeline
(``parts_from``), frozen, and trains only an ``SD3Transformer2DModel`` on the same data, with the
text encoded exactly as ``StableDiffusion3Pipeline.encode_prompt`` encodes it for sampling.

Resumable: ``state.pt`` in the work folder holds the phase, step, models, optimizer, EMA and the
random states every ``checkpoint_every`` steps; a rerun continues from it bit for bit.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tn_ray.diffusion.null_tokens import T5_TOKENS, NullTokensAttnProcessor
from tn_ray.diffusion.world import data, models, package
from tn_ray.diffusion.world.settings import WorldGeneratorConfig
from tn_ray.diffusion.world.tokenizer import world_tokenizer
from tn_ray.errors import InputError

log = logging.getLogger(__name__)


def lr_lambda(warmup: int, steps: int, floor: float = 0.1) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to ``floor``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def ddpm_loss(unet, scheduler, latents, hidden, generator):
    """diffusers' text-to-image loss: MSE between the UNet's output and the noise (epsilon) or
    the velocity (v_prediction) at a uniform random timestep."""
    import torch
    import torch.nn.functional as F

    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    noisy = scheduler.add_noise(latents, noise, t)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = scheduler.get_velocity(latents, noise, t)
    pred = unet(noisy, t, encoder_hidden_states=hidden).sample
    return F.mse_loss(pred.float(), target.float())


def flow_loss(transformer, scheduler, latents, cond: dict, generator, density: str = "logit_normal",
              logit_mean: float = 0.0, logit_std: float = 1.0):
    """Rectified flow as diffusers' ``train_dreambooth_sd3.py`` trains SD 3 (without output preconditioning):
    u from ``compute_density_for_timestep_sampling`` (``density`` logit_normal, or uniform), the scheduler's
    (shifted) timestep and sigma at index u x num_train_timesteps, x_t = (1 - sigma) x0 + sigma noise, target
    noise - x0, MSE weighted by ``compute_loss_weighting_for_sd3`` (1 for these densities). ``cond``: the
    transformer's ``encoder_hidden_states`` and ``pooled_projections``."""
    import torch
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    scheme = {"logit_normal": "logit_normal", "uniform": "none"}[density]
    noise = torch.randn(latents.shape, generator=generator)
    u = compute_density_for_timestep_sampling(scheme, latents.shape[0], logit_mean=logit_mean, logit_std=logit_std,
                                              generator=generator)
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    sigmas = scheduler.sigmas[indices].to(latents.dtype).view(-1, *[1] * (latents.ndim - 1))
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    pred = transformer(hidden_states=noisy, timestep=timesteps, return_dict=False, **cond)[0]
    target = noise - latents
    weighting = compute_loss_weighting_for_sd3(scheme, sigmas)
    return torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(latents.shape[0], -1),
                      1).mean()


def _ddpm(trainer, latents, texts):
    hidden = encode_text(trainer.tokenizer, trainer.text, texts)
    return ddpm_loss(trainer.denoiser, trainer.scheduler, latents, hidden, trainer.gen)


def _flow(trainer, latents, texts):
    t = trainer.cfg.train
    return flow_loss(trainer.denoiser, trainer.scheduler, latents, encode_flow_text(trainer.encoder, texts, 1),
                     trainer.gen, t.timestep_density, t.logit_mean, t.logit_std)


# objective -> fn(trainer, latents, texts) -> loss
OBJECTIVES = {"ddpm": _ddpm, "flow": _flow}
# settings the UNet path never reads: left out of its trajectory, so work folders from before they existed resume
_TRANSFORMER_ONLY = ("denoiser", "transformer", "parts_from")
_FLOW_ONLY = ("timestep_density", "logit_mean", "logit_std", "shift")


def trajectory(cfg: WorldGeneratorConfig) -> dict:
    """The settings a training run's path depends on (all but where it stops): a work folder resumes only
    under equal ones."""
    out = cfg.model_dump(mode="json")
    out["train"].pop("stop_at")
    if cfg.denoiser == "unet":
        for key in _TRANSFORMER_ONLY:
            out.pop(key)
        for key in _FLOW_ONLY:
            out["train"].pop(key)
    return out


def encode_text(tokenizer, text_encoder, texts):
    """As ``StableDiffusionPipeline.encode_prompt``: max-length padding, no attention mask, the
    last hidden state."""
    ids = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def encode_flow_text(encoder, texts, t5_tokens: int = T5_TOKENS) -> dict:
    """The transformer's text inputs as ``StableDiffusion3Pipeline`` computes them when sampling (its own
    ``encode_prompt``: both CLIP encoders, ``t5_tokens`` zeros in the T5 encoder's place), no gradient (the
    text encoder is frozen). Training passes 1 zero token and counts it ``T5_TOKENS`` times in attention
    (:class:`tn_ray.diffusion.null_tokens.NullTokensAttnProcessor`): the same function as the pipeline's 256 zeros."""
    import torch

    with torch.no_grad():
        embeds, _, pooled, _ = encoder.encode_prompt(prompt=list(texts), prompt_2=None, prompt_3=None,
                                                     device=torch.device("cpu"), do_classifier_free_guidance=False,
                                                     max_sequence_length=t5_tokens)
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def parts_folder(source: str) -> Path:
    """The folder ``parts_from`` names ('world' = the shipped weights, sha256-checked)."""

    if source == "world":
        package.check_weights(package.WEIGHTS)
        return package.WEIGHTS
    folder = Path(source)
    if not (folder / "vae").is_dir() or not (folder / "text_encoder").is_dir():
        raise InputError(f"parts_from: {folder} is not a world pipeline folder (no vae/ and text_encoder/); use "
                         "'world' or a folder written by `tn-ray world train-generator`")
    return folder


def load_parts(cfg: WorldGeneratorConfig):
    """(autoencoder, world CLIPTextModel) of ``cfg.parts_from`` in float32, frozen, checked against the settings
    (``autoencoder`` and ``text.hidden`` must describe them); the autoencoder's ``shift_factor`` set to 0 (the
    UNet path's latents are unshifted; StableDiffusion3Pipeline needs a number)."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    folder = parts_folder(cfg.parts_from)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch.float32)
    have = (tuple(vae.config.block_out_channels), vae.config.latent_channels, text.config.hidden_size)
    want = (tuple(cfg.autoencoder.channels), cfg.autoencoder.latent_channels, cfg.text.hidden)
    if have != want:
        raise InputError(f"parts_from {cfg.parts_from}: autoencoder channels, latent channels and text width are "
                         f"{have}, the settings say {want}; set autoencoder.channels, autoencoder.latent_channels "
                         "and text.hidden to the parts'")
    if vae.config.shift_factor is None:
        vae.register_to_config(shift_factor=0.0)
    vae.requires_grad_(False)
    text.requires_grad_(False)
    return vae, text


def parts_revision(cfg: WorldGeneratorConfig) -> str | None:
    """A digest of the parts' weight files (what a work folder and the record pin), None for the UNet."""
    import hashlib

    if cfg.parts_from is None:
        return None

    folder = parts_folder(cfg.parts_from)
    files = {k: v for k, v in package.file_hashes(folder).items() if k.split("/")[0] in ("vae", "text_encoder")}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]


class Trainer:
    """The two phases (the transformer: the denoiser phase only), checkpointed in ``work`` (``state.pt``,
    ``log.jsonl``). ``denoiser`` is the UNet or the transformer."""

    def __init__(self, cfg: WorldGeneratorConfig, work: Path, progress: Callable[[str], None] = print):
        import torch

        self.cfg, self.work, self.progress = cfg, Path(work), progress
        self.work.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.tokenizer = world_tokenizer()
        self.parts = parts_revision(cfg)
        if cfg.denoiser == "unet":
            self.vae = models.autoencoder(cfg)
            self.text = models.text_encoder(cfg, self.tokenizer)
            self.denoiser = models.unet(cfg)
            self.scheduler = models.ddpm_scheduler(cfg)
            self.phase = "autoencoder"
        else:
            from diffusers import StableDiffusion3Pipeline

            self.vae, self.text = load_parts(cfg)
            self.denoiser = models.transformer(cfg)
            self.denoiser.set_attn_processor(NullTokensAttnProcessor(T5_TOKENS))  # 1 zero token = 256
            self.scheduler = models.flow_scheduler(cfg)
            self.phase = "denoiser"
            clip = models.text_encoder_with_projection(self.text).requires_grad_(False)
            # the pipeline's encode_prompt is the text encoding of training (the pipeline holds references)
            self.encoder = StableDiffusion3Pipeline(
                transformer=self.denoiser, scheduler=models.flow_scheduler(cfg), vae=self.vae, text_encoder=clip,
                tokenizer=self.tokenizer, text_encoder_2=clip, tokenizer_2=self.tokenizer, text_encoder_3=None,
                tokenizer_3=None)
            self.encoder.set_progress_bar_config(disable=True)
        self.rng = np.random.default_rng(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step, self.elapsed = 0, 0.0
        self._setup_phase()
        self._resume()

    # --- state ------------------------------------------------------------------------------
    def _setup_phase(self):
        import torch
        from diffusers.training_utils import EMAModel

        if self.phase == "autoencoder":
            a = self.cfg.autoencoder
            self.opt = torch.optim.AdamW(self.vae.parameters(), lr=a.lr, weight_decay=0.0)
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(0, a.steps, 0.0))
            self.ema = None
        else:
            t = self.cfg.train
            self.vae.requires_grad_(False)
            params = list(self.denoiser.parameters())
            if self.cfg.denoiser == "unet":  # trained jointly with the UNet; frozen under the transformer
                params += list(self.text.parameters())
            self.opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=1e-2)
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(t.warmup, t.steps))
            self.ema = EMAModel(params, decay=t.ema_decay, use_ema_warmup=True)

    def _save(self):
        import torch

        state = {
            "phase": self.phase, "step": self.step, "elapsed": self.elapsed,
            "vae": self.vae.state_dict(), "text": self.text.state_dict(),
            self.cfg.denoiser: self.denoiser.state_dict(),
            "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "scaling_factor": self.vae.config.scaling_factor,
            "rng": self.rng.bit_generator.state, "gen": self.gen.get_state(), "torch": torch.get_rng_state(),
            "config": self._trajectory(),
        }
        tmp = self.work / "state.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.work / "state.pt")

    def _resume(self):
        import torch

        path = self.work / "state.pt"
        if not path.exists():
            return
        state = torch.load(path, weights_only=False)
        if state["config"] != self._trajectory():

            raise InputError(f"{path} was written with other settings; use another --work folder or delete it")
        self.phase = state["phase"]
        self.vae.load_state_dict(state["vae"])
        self.vae.register_to_config(scaling_factor=state["scaling_factor"])
        self.text.load_state_dict(state["text"])
        self.denoiser.load_state_dict(state[self.cfg.denoiser])
        self._setup_phase()
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        self.rng.bit_generator.state = state["rng"]
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch"])
        self.progress(f"resumed {path}: {self.phase} phase, step {self.step}")

    def _trajectory(self) -> dict:
        out = trajectory(self.cfg)
        if self.parts is not None:
            out["parts_revision"] = self.parts
        return out

    def _log(self, **row):
        with open(self.work / "log.jsonl", "a") as f:
            f.write(json.dumps({"phase": self.phase, "step": self.step, **row}) + "\n")

    # --- phases -------------------------------------------------------------------------------
    def autoencoder_step(self) -> float:
        import torch.nn.functional as F

        a = self.cfg.autoencoder
        images, _ = data.training_pairs(a.batch, self.cfg.held_out, self.cfg.size, self.rng)
        x = data.to_tensor(images)
        dist = self.vae.encode(x).latent_dist
        recon = self.vae.decode(dist.sample(generator=self.gen)).sample
        loss = F.mse_loss(recon, x) + a.kl_weight * dist.kl().mean()
        return loss

    def denoiser_step(self):
        import torch

        t = self.cfg.train
        images, texts = data.training_pairs(t.batch, self.cfg.held_out, self.cfg.size, self.rng)
        drop = self.rng.random(len(texts)) < t.uncond_prob
        texts = ["" if d else s for d, s in zip(drop, texts)]
        with torch.no_grad():
            latents = self.vae.encode(data.to_tensor(images)).latent_dist.sample(generator=self.gen)
            latents = (latents - (self.vae.config.shift_factor or 0.0)) * self.vae.config.scaling_factor
        return OBJECTIVES[t.objective](self, latents, texts)

    def _set_scaling_factor(self):
        import torch

        with torch.no_grad():
            images, _ = data.training_pairs(256, self.cfg.held_out, self.cfg.size, np.random.default_rng(1))
            z = self.vae.encode(data.to_tensor(images)).latent_dist.mean
        self.vae.register_to_config(scaling_factor=float(1.0 / z.std()))

    def run(self, stop_after: int | None = None) -> None:
        """Train both phases to the end (``stop_after``: return after that many optimizer steps of
        this call, checkpointed, as a crash would; for tests)."""
        import torch

        done = 0
        phases = [("autoencoder", self.cfg.autoencoder.steps, self.autoencoder_step),
                  ("denoiser", self.cfg.train.stop_at or self.cfg.train.steps, self.denoiser_step)]
        for name, total, step_fn in phases:
            if name == "autoencoder" and self.phase != "autoencoder":
                continue
            if name == "denoiser" and self.phase == "autoencoder":
                self._set_scaling_factor()
                self.phase, self.step = "denoiser", 0
                self._setup_phase()
                self._save()
            t0, losses = time.perf_counter(), []
            every = self.cfg.train.checkpoint_every
            params = [p for g in self.opt.param_groups for p in g["params"]]
            while self.step < total:
                loss = step_fn()
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                self.opt.step()
                self.sched.step()
                if self.ema is not None:
                    self.ema.step(params)
                self.step += 1
                done += 1
                losses.append(float(loss.detach()))
                if self.step % every == 0 or self.step == total:
                    self.elapsed += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    mean = float(np.mean(losses))
                    self._log(loss=mean, elapsed_s=round(self.elapsed, 1), lr=self.sched.get_last_lr()[0])
                    self.progress(f"{name} step {self.step}/{total}: loss {mean:.4f} ({self.elapsed:.0f} s so far)")
                    losses = []
                    self._save()
                if stop_after is not None and done >= stop_after:
                    return

    # --- output -------------------------------------------------------------------------------
    def pipeline(self, ema: bool = True):
        """The trained pipeline (float32), with the EMA weights when ``ema``: a StableDiffusionPipeline, or for
        the transformer a StableDiffusion3Pipeline (both text encoders the world one with projection, T5 left
        out)."""
        import copy

        from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        if self.cfg.denoiser == "transformer":
            transformer = copy.deepcopy(self.denoiser)
            transformer.set_attn_processor(JointAttnProcessor2_0())  # diffusers' own, on the pipeline's 256 zeros
            if ema and self.ema is not None:
                self.ema.copy_to(list(transformer.parameters()))
            clip = copy.deepcopy(self.encoder.text_encoder)
            pipe = StableDiffusion3Pipeline(
                transformer=transformer, scheduler=models.flow_scheduler(self.cfg), vae=self.vae, text_encoder=clip,
                tokenizer=self.tokenizer, text_encoder_2=copy.deepcopy(clip), tokenizer_2=self.tokenizer,
                text_encoder_3=None, tokenizer_3=None)
            pipe.set_progress_bar_config(disable=True)
            return pipe
        unet, text = copy.deepcopy(self.denoiser), copy.deepcopy(self.text)
        if ema and self.ema is not None:
            self.ema.copy_to(list(unet.parameters()) + list(text.parameters()))
        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=text, tokenizer=self.tokenizer, unet=unet,
            scheduler=models.ddim_scheduler(self.cfg), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe
