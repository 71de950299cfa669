"""GRPO on flow-matching models (Flow-GRPO, Liu et al. 2025) with LoRA, a KL to the base model, and
rewards scored asynchronously by the long-lived Ray reward actors: the same core as DDPO.

One GRPO epoch per core step (:class:`tn_ray.training.loop.Method`), in every Ray Train worker:

1. **sample** ``sample.num_batches_per_epoch`` batches; each draws ``sample.prompts_per_batch`` prompts
   and samples a group of ``sample.group_size`` (G) images of each with the Flow-GRPO SDE
   (:func:`tn_ray.diffusion.flow_sampling.sample_flow_chains`: SDE steps with log-probs inside
   ``sample.window``, ODE elsewhere); each batch's decoded images go to the reward actors at once
   (DDPO's :func:`~tn_ray.training.ddpo.submit_images`), the next batch samples while they score;
2. **rewards**: collected and turned into the configured column exactly as DDPO
   (:func:`~tn_ray.training.ddpo.collect_rewards`);
3. **advantages**: every worker's rewards gathered (:func:`tn_ray.training.advantages.gather_rewards`),
   (r - mean of the prompt's rewards this epoch) / (std + 1e-4), the std of the prompt's group or, with
   ``train.global_std``, of the whole epoch (:func:`tn_ray.training.grpo_loss.group_advantages`;
   flow_grpo's tracker, cleared each epoch);
4. **train** ``train.num_inner_epochs`` passes: samples shuffled, the first ``timestep_fraction`` of each
   chain's stochastic steps (:func:`~tn_ray.training.grpo_loss.train_step_indices`, as flow_grpo), minibatches
   of ``train.batch_size``; one backward per (minibatch, trained step) of
   :func:`~tn_ray.training.grpo_loss.grpo_loss` (PPO clip + ``beta`` x Flow-GRPO's KL to the reference,
   the transformer with adapters disabled), accumulated into ``train.updates_per_inner_epoch`` optimizer
   steps, clipped to ``optimizer.max_grad_norm`` (:class:`tn_ray.training.optim.Optimization`).

Checkpoints, exact resume, logging, Ray Train and evaluation (held-out judges, the path KL, the paper's
checkpoint rule, the overoptimization monitor: :mod:`tn_ray.training.evaluation`, with the flow-matching
policy's chains of :meth:`tn_ray.training.policy.FlowPolicy.path_kl_means`) are the core's
(:mod:`tn_ray.training.loop`). Randomness
comes from generators seeded by (seed, epoch, rank, ...), so a resumed run repeats an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from tn_ray.config import OutputLocation, StrictModel
from tn_ray.diffusion.flow_sampling import (
    FlowChains,
    check_flow_pipeline,
    decode_flow_images,
    flow_step_log_prob,
    sample_flow_chains,
)
from tn_ray.diffusion.flow_sde import check_noise_level, check_window
from tn_ray.diffusion.seeds import seeds_of
from tn_ray.training.advantages import gather_rewards, gather_rows
from tn_ray.training.config import EvalBlock, FineTuneConfig, OptimizerBlock, PolicyBlock, require_prompts
from tn_ray.training.ddpo import collect_rewards, record_samples, run_method, submit_images
from tn_ray.training.ema import EMA, EMABlock
from tn_ray.training.grpo_loss import group_advantages, grpo_loss, train_step_indices
from tn_ray.training.loop import Method
from tn_ray.training.policy import check_policy_kind

GRPO_PIPELINE = "stabilityai/stable-diffusion-3.5-medium"  # Flow-GRPO's SD 3.5 configs


class GRPOSampleBlock(StrictModel):
    num_steps: int = Field(
        10, ge=1, description="denoising steps T of every sampled chain (count; Flow-GRPO sample.num_steps: 10)"
    )
    guidance_scale: float = Field(
        4.5, ge=0, description="classifier-free guidance when sampling and rescoring (unitless; <= 1: none; "
        "Flow-GRPO sample.guidance_scale: 4.5)"
    )
    noise_level: float = Field(
        0.7, description="the SDE's noise level a, sigma_t = a sqrt(t / (1 - t)) (unitless, in (0, 1]; "
        "Flow-GRPO sample.noise_level: 0.7)"
    )
    window: tuple[int, int] | None = Field(
        None, description="(start, stop): half-open step indices sampled by the SDE and trained (MixGRPO); "
        "the rest by the ODE; None = every step"
    )
    group_size: int = Field(
        24, description="G: images per prompt in one group (count, >= 2; Flow-GRPO sample.num_image_per_prompt: 24)"
    )
    prompts_per_batch: int = Field(
        1, ge=1, description="prompts per sampling call, per worker; a call samples prompts_per_batch x group_size "
        "images and sends them to the reward actors as one request"
    )
    num_batches_per_epoch: int = Field(
        2, ge=1, description="sampling calls per epoch per worker; samples per epoch = prompts_per_batch x "
        "group_size x num_batches_per_epoch x scaling.num_workers (images)"
    )
    height: int | None = Field(None, ge=8, multiple_of=8, description="image height (pixels); None = the pipeline's")
    width: int | None = Field(None, ge=8, multiple_of=8, description="image width (pixels); None = the pipeline's")

    @field_validator("group_size")
    @classmethod
    def _group(cls, g: int) -> int:
        if g < 2:
            raise ValueError(f"GRPO needs a group of G >= 2 images per prompt, got {g}")
        return g

    @field_validator("noise_level")
    @classmethod
    def _noise(cls, a: float) -> float:
        return check_noise_level(a)

    @model_validator(mode="after")
    def _sample(self) -> GRPOSampleBlock:
        try:
            check_window(self.window, self.num_steps)
        except ValueError as e:
            raise ValueError(f"sample.window: {e}") from None
        return self

    @property
    def batch_images(self) -> int:
        return self.prompts_per_batch * self.group_size

    @property
    def stochastic_steps(self) -> int:
        start, stop = self.window if self.window is not None else (0, self.num_steps)
        return stop - start


class GRPOTrainBlock(StrictModel):
    batch_size: int = Field(
        8, ge=1, description="samples per training minibatch, per worker (images); must divide the samples per "
        "worker; one backward per (minibatch, trained step)"
    )
    updates_per_inner_epoch: int = Field(
        1, ge=1, description="optimizer steps per pass over the epoch's samples: gradients accumulate over "
        "(minibatches / updates) x trained steps backward passes (Flow-GRPO: gradient_accumulation_steps)"
    )
    num_inner_epochs: int = Field(1, ge=1, description="passes over each epoch's samples (Flow-GRPO: 1)")
    timestep_fraction: float = Field(
        0.99, gt=0, le=1, description="the first int(S x fraction) of the S stochastic steps are trained, at least "
        "one (Flow-GRPO train.timestep_fraction: 0.99)"
    )
    clip_range: float = Field(
        1e-4, gt=0, description="PPO clip range eps on the ratio of dimension-averaged log-probs (unitless; "
        "Flow-GRPO train.clip_range: 1e-4)"
    )
    adv_clip_max: float = Field(5.0, gt=0, description="advantages clipped to +-adv_clip_max (std units; Flow-GRPO 5)")
    beta: float = Field(
        0.04, ge=0, description="KL weight on Flow-GRPO's KL (mean over dims of (mean - ref mean)^2 / (2 sigma_t^2)) "
        "to the base model (Flow-GRPO train.beta: 0.04 GenEval/OCR, 0.01 PickScore; 0 = no reference forward)"
    )
    global_std: bool = Field(
        True, description="advantages divide by the std of the whole epoch's rewards, not the group's (Flow-GRPO "
        "sample.global_std: True); the mean is always the prompt's"
    )


class GRPOConfig(FineTuneConfig):
    """``tn-ray grpo CONFIG.yaml``: every key of the fine-tuning core plus prompts, sample and train."""

    out: OutputLocation = Field("results/grpo", description="run folder or cloud URI: config, checkpoints, samples")
    max_steps: int = Field(
        1000, ge=1, description="GRPO epochs (count): each samples, scores and trains once; checkpoint.every counts "
        "epochs"
    )
    policy: PolicyBlock = Field(
        default_factory=lambda: PolicyBlock(pipeline=GRPO_PIPELINE, lora={"rank": 32, "alpha": 64}),
        description="a flow-matching (SD 3) pipeline, precision and LoRA on its transformer (Flow-GRPO: SD 3.5 "
        "medium, r 32, alpha 64)"
    )
    optimizer: OptimizerBlock = Field(
        default_factory=lambda: OptimizerBlock(lr=3e-4, weight_decay=1e-4),
        description="AdamW (Flow-GRPO base.py: lr 3e-4, weight decay 1e-4, max grad norm 1)",
    )
    eval: EvalBlock = Field(
        default_factory=lambda: EvalBlock(num_inference_steps=40, guidance_scale=4.5),
        description="periodic evaluation on fixed prompts and seeds (every `every` epochs): ODE images (the "
        "pipeline's own sampling; Flow-GRPO sample.eval_num_steps: 40, guidance 4.5), judges, the path KL (flow "
        "SDE chains at kl_noise_level), checkpoint selection",
    )
    prompts: list[str] | None = Field(
        None, description="training prompts; each group draws one uniformly; None (and no prompts_file) = every "
        "prompt of reward.contrast's sets"
    )
    prompts_file: str | None = Field(
        None, description="text file of training prompts, one per line (blank lines skipped); appended to `prompts`"
    )
    sample: GRPOSampleBlock = Field(
        default_factory=GRPOSampleBlock, description="sampling: steps, guidance, noise level, window, group size"
    )
    train: GRPOTrainBlock = Field(
        default_factory=GRPOTrainBlock, description="policy-gradient training: minibatches, inner epochs, "
        "timestep fraction, clipping, KL, advantages"
    )
    ema: EMABlock = Field(
        default_factory=EMABlock, description="an EMA of the LoRA weights (tn_ray/training/ema.py): updated every "
        "`every` optimizer steps; evaluation and the checkpoints' LoRA files use it (Flow-GRPO train.ema)"
    )

    @model_validator(mode="after")
    def _grpo(self) -> GRPOConfig:
        check_policy_kind(self.policy.pipeline, flow=True, method="grpo")
        require_prompts(bool(self.prompts or self.prompts_file), self.reward)
        per_worker = self.sample.batch_images * self.sample.num_batches_per_epoch
        if per_worker % self.train.batch_size:
            raise ValueError(f"train.batch_size: {self.train.batch_size} does not divide the {per_worker} samples per "
                             "worker (sample.prompts_per_batch x group_size x num_batches_per_epoch)")
        minibatches = per_worker // self.train.batch_size
        if minibatches % self.train.updates_per_inner_epoch:
            raise ValueError(f"train.updates_per_inner_epoch: {self.train.updates_per_inner_epoch} does not divide "
                             f"the {minibatches} minibatches of an inner epoch")
        schedule = self.optimizer.schedule != "constant" or self.optimizer.warmup_steps
        if self.optimizer_steps_per_epoch > 1 and schedule:
            raise ValueError("optimizer.schedule: learning-rate schedules count epochs; with more than one optimizer "
                             "step per epoch use schedule 'constant'")
        if self.sample.stochastic_steps < 1:
            raise ValueError("sample.window: no SDE step to train on (an empty window)")
        return self

    @property
    def optimizer_steps_per_epoch(self) -> int:
        return self.train.num_inner_epochs * self.train.updates_per_inner_epoch


class GRPO(Method):
    name = "grpo"

    def __init__(self, cfg: GRPOConfig, policy, optim, ctx, data):
        super().__init__(cfg, policy, optim, ctx, data)
        check_flow_pipeline(policy.pipe)
        policy.pipe.set_progress_bar_config(disable=True)
        self.ema = EMA(policy.trainable_parameters(), cfg.ema) if cfg.ema.enabled else None

    # --- the EMA of the LoRA weights: evaluated, exported, resumed ---------------------------
    def evaluation_weights(self):
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def state_dict(self) -> dict:
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.ema is None:
            return
        if "ema" not in state:
            raise ValueError("ema.enabled: the checkpoint has no EMA state (it was written with ema disabled)")
        self.ema.load_state_dict(state["ema"])

    def train_prompts(self) -> list[str]:
        return list(self.data.prompts)

    # --- 1-2: sampling groups while the actors score ------------------------------------
    def sample_epoch(self, step: int):
        """(chains, prompt ids, reward column, seconds sampling, seconds waiting for rewards)."""

        cfg, s = self.cfg, self.cfg.sample
        pipe = self.policy.pipe
        parts = []
        self.policy.model.eval()
        t0 = time.perf_counter()
        for b in range(s.num_batches_per_epoch):
            rng = np.random.default_rng(seeds_of(cfg.seed, step, self.ctx.rank, b, 0, n=1)[0])
            ids = np.repeat(rng.integers(len(self.data.prompts), size=s.prompts_per_batch), s.group_size).tolist()
            gens = [torch.Generator("cpu").manual_seed(x)
                    for x in seeds_of(cfg.seed, step, self.ctx.rank, b, 1, n=len(ids))]
            chains = sample_flow_chains(pipe, [self.data.prompts[i] for i in ids], ids, num_steps=s.num_steps,
                                        guidance=s.guidance_scale, noise_level=s.noise_level, window=s.window,
                                        generator=gens, height=s.height, width=s.width,
                                        autocast=self.policy.autocast())
            images = decode_flow_images(pipe, chains.latents[:, -1])
            submit_images(self.data, images, [self.data.texts[i] for i in ids])
            parts.append(chains)
        t1 = time.perf_counter()
        chains = FlowChains.cat(parts)
        column, wait = collect_rewards(cfg, self.data, chains.prompt_ids.tolist())
        return chains, chains.prompt_ids.cpu().numpy(), column, t1 - t0, wait

    # --- 3: advantages from every worker's rewards --------------------------------------
    def advantages(self, prompt_ids: np.ndarray, rewards: np.ndarray) -> np.ndarray:
        """This worker's advantages, from all workers' rewards grouped by prompt (2 workers = 1 with the rows)."""

        ids, all_rewards, start = gather_rewards(prompt_ids, rewards)
        adv = group_advantages(all_rewards, ids, global_std=self.cfg.train.global_std)
        return np.asarray(adv, dtype=np.float64)[start:start + len(rewards)]

    # --- 4: the policy-gradient passes ------------------------------------------------------
    def train_epoch(self, step: int, chains, advantages: torch.Tensor) -> dict[str, float]:
        cfg, tr, s = self.cfg, self.cfg.train, self.cfg.sample
        policy, model = self.policy, self.policy.train_model
        sched = policy.pipe.scheduler
        n, S = chains.log_probs.shape
        trained = train_step_indices(S, tr.timestep_fraction)
        minibatches = n // tr.batch_size
        per_update = minibatches // tr.updates_per_inner_epoch
        accum = per_update * len(trained)  # backward passes per optimizer step
        # kl_exact (logs only) needs the reference model's step: NaN without the KL term, so not logged then
        keys = ("loss", "policy_loss", "kl", "approx_kl", "clip_frac") + (("kl_exact",) if tr.beta > 0 else ())
        logs: dict[str, list[float]] = {k: [] for k in keys}
        updates: list[dict[str, float]] = []
        first_kl = None
        policy.model.train()
        for inner in range(tr.num_inner_epochs):
            g = torch.Generator().manual_seed(seeds_of(cfg.seed, step, self.ctx.rank, 2, inner, n=1)[0])
            order = torch.randperm(n, generator=g)
            for mb in range(minibatches):
                rows = order[mb * tr.batch_size:(mb + 1) * tr.batch_size]
                part = chains.select(rows)
                adv = advantages[rows.to(advantages.device)]
                for j in trained:
                    last = (mb % per_update == per_update - 1) and j == trained[-1]
                    sync = model.no_sync() if (hasattr(model, "no_sync") and not last) else contextlib.nullcontext()
                    with sync:
                        with policy.autocast():
                            out = flow_step_log_prob(model, sched, part, j, s.guidance_scale, s.noise_level)
                        ref = None
                        if tr.beta > 0:
                            with torch.no_grad(), policy.reference(), policy.autocast():
                                ref = flow_step_log_prob(policy.model, sched, part, j, s.guidance_scale,
                                                         s.noise_level)
                        loss = grpo_loss(out.log_prob, part.log_probs[:, j], adv, tr.clip_range, tr.adv_clip_max,
                                         tr.beta, out.mean, None if ref is None else ref.mean, out.sigma_t, out.std)
                        self.optim.backward(loss["loss"] / accum)
                    for key in keys:
                        logs[key].append(float(loss[key].detach()))
                    if first_kl is None:
                        first_kl = float(loss["approx_kl"])
                    if last:
                        updates.append(self.optim.step())
                        if self.ema is not None:
                            self.ema.step()
        metrics = {key: float(np.mean(v)) for key, v in logs.items()}
        metrics.update(beta=tr.beta, lr=updates[-1]["lr"], grad_norm=float(np.mean([u["grad_norm"] for u in updates])),
                       first_approx_kl=first_kl, optimizer_steps=len(updates), trained_steps=len(trained))
        return metrics

    # --- one epoch ----------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        chains, prompt_ids, rewards, sample_s, wait_s = self.sample_epoch(step)
        adv = self.advantages(prompt_ids, rewards)
        record_samples(self.cfg, self.ctx.rank, self.data.prompts, step, prompt_ids, rewards, adv)
        advantages = torch.as_tensor(adv, dtype=torch.float32, device=chains.latents.device)
        t1 = time.perf_counter()
        metrics = self.train_epoch(step, chains, advantages)
        all_rewards, _ = gather_rows(torch.as_tensor(rewards, dtype=torch.float64))
        epoch_s = time.perf_counter() - t0
        metrics.update(reward_mean=float(all_rewards.mean()), reward_std=float(all_rewards.std(unbiased=False)),
                       sample_s=sample_s, reward_wait_s=wait_s, train_s=time.perf_counter() - t1, epoch_s=epoch_s,
                       reward_idle_fraction=wait_s / epoch_s, epoch=step)
        return metrics


def run(cfg: GRPOConfig, allow_provenance_change: bool = False, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """The whole GRPO run: reward actors up, Ray Train fit (resuming from ``cfg.out``); the output paths.
    Shares DDPO's driver (:func:`tn_ray.training.ddpo.run_method`)."""

    return run_method(cfg, GRPO, allow_provenance_change, callbacks)
