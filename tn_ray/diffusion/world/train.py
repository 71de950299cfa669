"""Training the world generator: an autoencoder phase, then the denoiser with its text encoder.

Phase 1 trains the ``AutoencoderKL`` on renders (pixel MSE + a small KL term, as latent
diffusion's autoencoders) and sets its ``scaling_factor`` to 1 / std of the latents. Phase 2
freezes it and trains the ``UNet2DConditionModel`` and the ``CLIPTextModel`` jointly on fresh
(render, caption) pairs with the objective named in the settings (``ddpm``: epsilon or v
prediction, as ``diffusers``' text-to-image example), captions dropped to '' with probability
``uncond_prob`` for classifier-free guidance, and an EMA of the weights saved. The objective is
the one plug-in point: a flow-matching denoiser trains on the same data, text encoder and
autoencoder by adding an objective.

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

from tn_ray.diffusion.world import data, models
from tn_ray.diffusion.world.settings import WorldGeneratorConfig

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


OBJECTIVES = {"ddpm": ddpm_loss}


def trajectory(cfg: WorldGeneratorConfig) -> dict:
    """The settings a training run's path depends on (all but where it stops): a work folder resumes only
    under equal ones."""
    out = cfg.model_dump(mode="json")
    out["train"].pop("stop_at")
    return out


def encode_text(tokenizer, text_encoder, texts):
    """As ``StableDiffusionPipeline.encode_prompt``: max-length padding, no attention mask, the
    last hidden state."""
    ids = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


class Trainer:
    """The two phases, checkpointed in ``work`` (``state.pt``, ``log.jsonl``)."""

    def __init__(self, cfg: WorldGeneratorConfig, work: Path, progress: Callable[[str], None] = print):
        import torch

        from tn_ray.diffusion.world.tokenizer import world_tokenizer

        self.cfg, self.work, self.progress = cfg, Path(work), progress
        self.work.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.tokenizer = world_tokenizer()
        self.vae = models.autoencoder(cfg)
        self.text = models.text_encoder(cfg, self.tokenizer)
        self.unet = models.unet(cfg)
        self.scheduler = models.ddpm_scheduler(cfg)
        self.rng = np.random.default_rng(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.phase, self.step, self.elapsed = "autoencoder", 0, 0.0
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
            params = list(self.unet.parameters()) + list(self.text.parameters())
            self.opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=1e-2)
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(t.warmup, t.steps))
            self.ema = EMAModel(params, decay=t.ema_decay, use_ema_warmup=True)

    def _save(self):
        import torch

        state = {
            "phase": self.phase, "step": self.step, "elapsed": self.elapsed,
            "vae": self.vae.state_dict(), "text": self.text.state_dict(), "unet": self.unet.state_dict(),
            "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "scaling_factor": self.vae.config.scaling_factor,
            "rng": self.rng.bit_generator.state, "gen": self.gen.get_state(), "torch": torch.get_rng_state(),
            "config": trajectory(self.cfg),
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
        if state["config"] != trajectory(self.cfg):
            from tn_ray.errors import InputError

            raise InputError(f"{path} was written with other settings; use another --work folder or delete it")
        self.phase = state["phase"]
        self.vae.load_state_dict(state["vae"])
        self.vae.register_to_config(scaling_factor=state["scaling_factor"])
        self.text.load_state_dict(state["text"])
        self.unet.load_state_dict(state["unet"])
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
            latents = latents * self.vae.config.scaling_factor
        hidden = encode_text(self.tokenizer, self.text, texts)
        return OBJECTIVES[t.objective](self.unet, self.scheduler, latents, hidden, self.gen)

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
        """The trained pipeline (float32), with the EMA weights when ``ema``."""
        import copy

        from diffusers import StableDiffusionPipeline

        unet, text = copy.deepcopy(self.unet), copy.deepcopy(self.text)
        if ema and self.ema is not None:
            self.ema.copy_to(list(unet.parameters()) + list(text.parameters()))
        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=text, tokenizer=self.tokenizer, unet=unet,
            scheduler=models.ddim_scheduler(self.cfg), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe
