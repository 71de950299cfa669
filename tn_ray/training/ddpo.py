"""DDPO (Black et al. 2023; the paper's eq. 5) with LoRA, a KL regularizer toward the base model,
and rewards scored asynchronously by long-lived Ray reward actors.

One DDPO epoch per core step (:class:`tn_ray.training.loop.Method`), in every Ray Train worker:

1. **sample** ``sample.num_batches_per_epoch`` batches of ``sample.batch_size`` images with the
   current policy, recording each chain (:func:`tn_ray.diffusion.sampling.sample_chains`); each
   batch's decoded images go to the reward actors at once (``RewardPool.submit``: futures), and the
   next batch samples while they score;
2. **rewards**: the futures are collected (``RewardPool.collect``) (the wait is logged as ``reward_wait_s``) and turned
into
   the configured column (raw, TextNorm or an ensemble) by ``RewardConfig.column``;
3. **advantages** per prompt from every worker's rewards (:mod:`tn_ray.training.advantages`);
4. **train** ``train.num_inner_epochs`` passes: samples shuffled, each chain's timesteps shuffled
   and the first ``timestep_fraction`` kept, minibatches of ``train.batch_size``; one backward
   per (minibatch, timestep) of :func:`tn_ray.training.ddpo_loss.ddpo_loss`, gradients
   accumulated over timesteps and minibatches into ``train.updates_per_inner_epoch`` optimizer
   steps (Table 4: one), clipped to ``optimizer.max_grad_norm``.

Evaluation, checkpoint selection, the overoptimization monitor, checkpoints, resume and
logging are the core's (:mod:`tn_ray.training.loop`). Randomness comes from generators seeded
by (seed, epoch, rank, ...), so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import Field, model_validator

from tn_ray.config import OutputLocation, StrictModel
from tn_ray.diffusion.sampling import Chains, decode_images, guided_noise, sample_chains, step_log_prob, use_ddim
from tn_ray.diffusion.seeds import seeds_of
from tn_ray.errors import InputError
from tn_ray.scoring.matrix import pad_rows
from tn_ray.scoring.service_pool import reward_pool
from tn_ray.storage import Store
from tn_ray.training.advantages import PerPromptStatTracker, gather_rows, shared_advantages
from tn_ray.training.config import (
    EvalBlock,
    FineTuneConfig,
    OptimizerBlock,
    PolicyBlock,
    require_prompts,
    resolve_prompts,
)
from tn_ray.training.ddpo_loss import ddpo_loss, kl_weight
from tn_ray.training.evaluation import reward_groups
from tn_ray.training.loop import Method
from tn_ray.training.losses import to_epsilon
from tn_ray.training.outputs import write_outputs
from tn_ray.training.policy import check_policy_kind
from tn_ray.training.preflight import check_run, record_provenance

log = logging.getLogger(__name__)

DDPO_PIPELINE = "stabilityai/stable-diffusion-2-1-base"  # Table 4 (DDPO)


class SampleBlock(StrictModel):
    num_steps: int = Field(
        50,
        ge=1,
        description="denoising steps T of every sampled chain (count); trained timesteps = T x train.timestep_fraction",
    )
    guidance_scale: float = Field(
        5.0,
        ge=0,
        description="classifier-free guidance when sampling, applied identically "
        "when log-probs are recomputed (unitless; <= 1: none)",
    )
    eta: float = Field(
        1.0,
        gt=0,
        le=1,
        description="DDIM eta: the step's noise std is eta x the DDPM posterior std "
        "(unitless; > 0 so steps have a log-probability)",
    )
    batch_size: int = Field(
        8,
        ge=1,
        description="images per sampling call, per worker (images); its decoded images go "
        "to the reward actors as one request",
    )
    num_batches_per_epoch: int = Field(
        32,
        ge=1,
        description="sampling calls per epoch per worker; samples per epoch = "
        "batch_size x num_batches_per_epoch x scaling.num_workers "
        "(Table 4: 256)",
    )


class TrainBlock(StrictModel):
    batch_size: int = Field(
        64,
        ge=1,
        description="samples per training minibatch, per worker (Table 4: 64); must "
        "divide sample.batch_size x sample.num_batches_per_epoch; one "
        "backward per (minibatch, trained timestep)",
    )
    updates_per_inner_epoch: int = Field(
        1,
        ge=1,
        description="optimizer steps per pass over the epoch's samples "
        "(Table 4: one per iteration); gradients accumulate over "
        "(minibatches / updates) x trained timesteps backward "
        "passes",
    )
    num_inner_epochs: int = Field(
        1,
        ge=1,
        description="passes over each epoch's samples (count); optimizer steps per "
        "epoch = num_inner_epochs x updates_per_inner_epoch",
    )
    timestep_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="share of each chain's timesteps trained on, a fresh "
        "random subset per sample and pass (ddpo-pytorch's "
        "timestep_fraction)",
    )
    clip_range: float = Field(
        1e-4, gt=0, description="PPO clip range eps: the ratio is clipped to [1 - eps, 1 + eps] (unitless)"
    )
    adv_clip_max: float = Field(
        5.0, gt=0, description="advantages are clipped to [-adv_clip_max, adv_clip_max] (standard deviations)"
    )
    kl_coef: float = Field(
        0.0,
        ge=0,
        description="eq. 5's lambda: weight of mean_d (eps_theta - eps_base)^2 added to "
        "the loss (guided noise predictions in epsilon space for every "
        "parameterization, adapters off for the base; unitless). trl's DDPO "
        "has no such term (= 0)",
    )
    kl_warmup_epochs: int = Field(
        0, ge=0, description="kl_coef ramps linearly from 0 over this many epochs (0: full weight from the first epoch)"
    )
    per_prompt_stat_tracking: bool = Field(
        True,
        description="standardize rewards per prompt over a buffer of its "
        "recent rewards (else by the whole epoch's batch)",
    )
    stat_buffer_size: int = Field(
        16, ge=1, description="rewards kept per prompt for its mean / std (count, across all workers)"
    )
    stat_min_count: int = Field(
        16,
        ge=1,
        description="a prompt's buffer is used once it holds this many rewards; "
        "before, the epoch's batch mean / std (count)",
    )


class DDPOConfig(FineTuneConfig):
    """``tn-ray ddpo CONFIG.yaml``: every key of the fine-tuning core plus prompts, sample and train."""

    out: OutputLocation = Field(
        "results/ddpo", description="run folder or cloud URI: config, checkpoints, eval.csv, curves, grids, selection"
    )
    max_steps: int = Field(
        500,
        ge=1,
        description="DDPO epochs (count; Table 4: up to 500): each samples, scores and "
        "trains once; eval.every and checkpoint.every count epochs too",
    )
    policy: PolicyBlock = Field(
        default_factory=lambda: PolicyBlock(pipeline=DDPO_PIPELINE),
        description="base pipeline (Table 4: SD 2.1 base), precision and LoRA adapter",
    )
    optimizer: OptimizerBlock = Field(
        default_factory=lambda: OptimizerBlock(lr=3e-4, weight_decay=1e-4),
        description="AdamW (Table 4 DDPO: lr 3e-4, weight decay 1e-4, betas (0.9, 0.999), eps 1e-8, max grad norm 1)",
    )
    eval: EvalBlock = Field(
        default_factory=lambda: EvalBlock(guidance_scale=5.0),
        description="periodic evaluation on "
        "fixed prompts and "
        "seeds (every `every` "
        "epochs), judges, "
        "checkpoint selection",
    )
    prompts: list[str] | None = Field(
        None,
        description="training prompts; each sampled image draws one uniformly; "
        "None (and no prompts_file) = every prompt of "
        "reward.contrast's sets",
    )
    prompts_file: str | None = Field(
        None, description="text file of training prompts, one per line (blank lines skipped); appended to `prompts`"
    )
    sample: SampleBlock = Field(
        default_factory=SampleBlock,
        description="sampling: steps, guidance, eta, batch sizes (ddpo-pytorch's config.sample)",
    )
    train: TrainBlock = Field(
        default_factory=TrainBlock,
        description="policy-gradient training: minibatches, inner "
        "epochs, clipping, KL regularizer, advantages "
        "(ddpo-pytorch's config.train)",
    )

    @model_validator(mode="after")
    def _ddpo(self) -> DDPOConfig:
        check_policy_kind(self.policy.pipeline, flow=False, method="ddpo")
        require_prompts(bool(self.prompts or self.prompts_file), self.reward)
        per_worker = self.sample.batch_size * self.sample.num_batches_per_epoch
        if per_worker % self.train.batch_size:
            raise ValueError(
                f"train.batch_size: {self.train.batch_size} does not divide the {per_worker} samples per "
                "worker "
                f"(sample.batch_size x sample.num_batches_per_epoch)"
            )
        minibatches = per_worker // self.train.batch_size
        if minibatches % self.train.updates_per_inner_epoch:
            raise ValueError(
                f"train.updates_per_inner_epoch: {self.train.updates_per_inner_epoch} does not divide the "
                f"{minibatches} minibatches of an inner epoch"
            )
        if self.optimizer_steps_per_epoch > 1 and (
            self.optimizer.schedule != "constant" or self.optimizer.warmup_steps
        ):
            raise ValueError(
                "optimizer.schedule: learning-rate schedules count epochs; with more than one optimizer "
                "step "
                "per epoch (train.num_inner_epochs x train.updates_per_inner_epoch) use schedule "
                "'constant'"
            )
        if int(self.sample.num_steps * self.train.timestep_fraction) < 1:
            raise ValueError(
                "train.timestep_fraction: trains on no timestep (sample.num_steps x timestep_fraction < 1)"
            )
        return self

    @property
    def optimizer_steps_per_epoch(self) -> int:
        return self.train.num_inner_epochs * self.train.updates_per_inner_epoch

    @property
    def train_timesteps(self) -> int:
        return int(self.sample.num_steps * self.train.timestep_fraction)


@dataclass
class DDPOData:
    """What every worker gets: prompts, the texts each prompt is scored against, the reward actors."""

    prompts: list[str]
    texts: list[list[str]]  # per prompt: [x0] or [x0, x1..xm] (contrastive prompts for TextNorm)
    pools: dict[str, Any] = field(default_factory=dict)  # reward model -> its RewardPool (long-lived actors)


class DDPO(Method):
    name = "ddpo"

    def __init__(self, cfg: DDPOConfig, policy, optim, ctx, data: DDPOData):
        super().__init__(cfg, policy, optim, ctx, data)
        use_ddim(policy.pipe)
        policy.pipe.set_progress_bar_config(disable=True)
        tr = cfg.train
        self.stat_tracker = (
            PerPromptStatTracker(tr.stat_buffer_size, tr.stat_min_count) if tr.per_prompt_stat_tracking else None
        )

    def train_prompts(self) -> list[str]:
        return list(self.data.prompts)

    def state_dict(self) -> dict:
        return {"tracker": self.stat_tracker.state_dict() if self.stat_tracker is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        if self.stat_tracker is not None and state.get("tracker"):
            self.stat_tracker.load_state_dict(state["tracker"])

    # --- 1-2: sampling while the actors score ------------------------------------------
    def sample_epoch(self, step: int):
        """(chains, prompt ids, reward column, seconds sampling, seconds waiting for rewards)."""

        cfg, s = self.cfg, self.cfg.sample
        pipe = self.policy.pipe
        parts = []
        pipe.unet.eval()
        t0 = time.perf_counter()
        for b in range(s.num_batches_per_epoch):
            rng = np.random.default_rng(seeds_of(cfg.seed, step, self.ctx.rank, b, 0, n=1)[0])
            ids = rng.integers(len(self.data.prompts), size=s.batch_size).tolist()
            gens = [
                torch.Generator("cpu").manual_seed(x)
                for x in seeds_of(cfg.seed, step, self.ctx.rank, b, 1, n=s.batch_size)
            ]
            chains = sample_chains(
                pipe,
                [self.data.prompts[i] for i in ids],
                ids,
                num_steps=s.num_steps,
                guidance=s.guidance_scale,
                eta=s.eta,
                generator=gens,
                autocast=self.policy.autocast(),
            )
            images, texts = decode_images(pipe, chains.latents[:, -1]), [self.data.texts[i] for i in ids]
            submit_images(self.data, images, texts)  # returns at once: the next batch samples while they score
            parts.append(chains)
        t1 = time.perf_counter()
        chains = Chains.cat(parts)
        column, wait = collect_rewards(cfg, self.data, chains.prompt_ids.tolist())
        return chains, chains.prompt_ids.cpu().numpy(), column, t1 - t0, wait

    # --- 4: the policy-gradient passes ------------------------------------------------
    def base_eps(self, latents, timesteps, embeds, negative):
        """The base model's guided noise prediction at x_t (adapters off, no graph), in epsilon space."""

        with torch.no_grad(), self.policy.reference(), self.policy.autocast():
            out = guided_noise(self.policy.unet, latents, timesteps, embeds, negative, self.cfg.sample.guidance_scale)
        return to_epsilon(self.policy.pipe.scheduler, out, timesteps, latents)

    def train_epoch(self, step: int, chains, advantages: torch.Tensor) -> dict[str, float]:
        cfg, tr = self.cfg, self.cfg.train
        policy, unet = self.policy, self.policy.train_unet
        sched = policy.pipe.scheduler
        n, T = chains.log_probs.shape
        k = cfg.train_timesteps
        kl_coef = kl_weight(tr.kl_coef, step - 1, tr.kl_warmup_epochs)
        minibatches = n // tr.batch_size
        per_update = minibatches // tr.updates_per_inner_epoch
        accum = per_update * k  # backward passes per optimizer step
        logs: dict[str, list[float]] = {"loss": [], "policy_loss": [], "kl": [], "approx_kl": [], "clip_frac": []}
        updates: list[dict[str, float]] = []
        first_kl = None
        policy.unet.train()
        for inner in range(tr.num_inner_epochs):
            g = torch.Generator().manual_seed(seeds_of(cfg.seed, step, self.ctx.rank, 2, inner, n=1)[0])
            order = torch.randperm(n, generator=g)
            time_perm = torch.stack([torch.randperm(T, generator=g) for _ in range(n)])[:, :k]
            for mb in range(minibatches):
                rows = order[mb * tr.batch_size : (mb + 1) * tr.batch_size]
                part = chains.select(rows)
                adv = advantages[rows.to(advantages.device)]
                for j in range(k):
                    cols = time_perm[rows, j].to(part.latents.device)
                    idx = torch.arange(len(rows), device=part.latents.device)
                    x_t, x_prev = part.states[idx, cols], part.next_latents[idx, cols]
                    t, old = part.timesteps[idx, cols], part.log_probs[idx, cols]
                    last = (mb % per_update == per_update - 1) and j == k - 1
                    sync = unet.no_sync() if (hasattr(unet, "no_sync") and not last) else contextlib.nullcontext()
                    with sync:
                        with policy.autocast():
                            log_prob, guided = step_log_prob(
                                unet,
                                sched,
                                x_t,
                                t,
                                x_prev,
                                part.prompt_embeds,
                                part.negative_embeds,
                                cfg.sample.guidance_scale,
                                cfg.sample.eta,
                            )
                        # the regularizer compares noise predictions (epsilon space, also for v-prediction models)
                        base = self.base_eps(x_t, t, part.prompt_embeds, part.negative_embeds) if kl_coef > 0 else None
                        eps = to_epsilon(sched, guided, t, x_t) if base is not None else None
                        out = ddpo_loss(log_prob, old, adv, tr.clip_range, tr.adv_clip_max, kl_coef, eps, base)
                        self.optim.backward(out["loss"] / accum)
                    for key in logs:
                        logs[key].append(float(out[key].detach()))
                    if first_kl is None:
                        first_kl = float(out["approx_kl"])
                    if last:
                        updates.append(self.optim.step())
        metrics = {key: float(np.mean(v)) for key, v in logs.items()}
        metrics.update(
            kl_coef=kl_coef,
            lr=updates[-1]["lr"],
            grad_norm=float(np.mean([u["grad_norm"] for u in updates])),
            first_approx_kl=first_kl,
            optimizer_steps=len(updates),
        )
        return metrics

    # --- one epoch ------------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        chains, prompt_ids, rewards, sample_s, wait_s = self.sample_epoch(step)
        adv = shared_advantages(prompt_ids, rewards, self.stat_tracker, self.cfg.train.adv_clip_max)
        self.record_samples(step, prompt_ids, rewards, adv)
        advantages = torch.as_tensor(adv, dtype=torch.float32, device=chains.latents.device)
        t1 = time.perf_counter()
        metrics = self.train_epoch(step, chains, advantages)
        all_rewards, _ = gather_rows(torch.as_tensor(rewards, dtype=torch.float64))
        epoch_s = time.perf_counter() - t0
        metrics.update(
            reward_mean=float(all_rewards.mean()),
            reward_std=float(all_rewards.std(unbiased=False)),
            sample_s=sample_s,
            reward_wait_s=wait_s,
            train_s=time.perf_counter() - t1,
            epoch_s=epoch_s,
            reward_idle_fraction=wait_s / epoch_s,
            epoch=step,
        )
        return metrics

    def record_samples(self, step: int, prompt_ids: np.ndarray, rewards: np.ndarray, advantages: np.ndarray) -> None:
        record_samples(self.cfg, self.ctx.rank, self.data.prompts, step, prompt_ids, rewards, advantages)


# --- pieces GRPO (tn_ray.training.grpo) shares ------------------------------------------------
def submit_images(data: DDPOData, images: np.ndarray, texts: list[list[str]]) -> None:
    """Send a batch's decoded images to every reward model's actors (returns at once: futures)."""
    for pool in data.pools.values():
        pool.submit(images, texts)


def collect_rewards(cfg: FineTuneConfig, data: DDPOData, prompt_ids: Sequence[int]) -> tuple[np.ndarray, float]:
    """Every submitted batch's scores, in submission order, turned into the configured reward column
    (``cfg.reward.column``: raw, TextNorm or an ensemble); (column, seconds waited). Non-finite rewards:
    an :class:`~tn_ray.errors.InputError`."""

    t0 = time.perf_counter()
    values = {m: pad_rows([row for rows in pool.collect() for row in rows]) for m, pool in data.pools.items()}
    wait = time.perf_counter() - t0
    groups = reward_groups(cfg.reward, [data.prompts[i] for i in prompt_ids])
    column = np.asarray(cfg.reward.column(values, groups), dtype=np.float64)
    if not np.isfinite(column).all():
        raise InputError(
            f"reward '{cfg.reward.use}' is not finite for {int((~np.isfinite(column)).sum())} sampled images"
        )
    return column, wait


def record_samples(cfg: FineTuneConfig, rank: int, prompts: Sequence[str], step: int, prompt_ids: np.ndarray,
                   rewards: np.ndarray, advantages: np.ndarray) -> None:
    """``samples/epoch-<step>-rank-<rank>.parquet``: prompt id, prompt, reward, advantage of every sample."""
    import pandas as pd
    import pyarrow as pa

    frame = pd.DataFrame(
        {
            "epoch": step,
            "rank": rank,
            "prompt_id": prompt_ids,
            "prompt": [prompts[i] for i in prompt_ids],
            "reward": rewards,
            "advantage": advantages,
        }
    )
    Store(cfg.out).write_table(
        f"samples/epoch-{step:06d}-rank-{rank}.parquet", pa.Table.from_pandas(frame, preserve_index=False)
    )


def prepare(cfg: FineTuneConfig, allow_provenance_change: bool = False) -> DDPOData:
    """Driver side, before Ray Train starts: prompts, scoring texts (contrastive sets checked) and
    one :class:`tn_ray.scoring.workers.RewardPool` of long-lived actors per reward model."""
    from tn_ray.cluster import init_ray

    prompts = resolve_prompts(cfg)
    texts = check_run(cfg, prompts)  # every user error before Ray starts or a model loads
    record_provenance(cfg, allow_provenance_change)
    init_ray(cfg.ray)
    return DDPOData(prompts, texts, {m: reward_pool(m, cfg.scoring, cfg.reward.service) for m in cfg.reward.models})


def release(data: DDPOData) -> None:
    for pool in data.pools.values():
        pool.shutdown()


def run(cfg: DDPOConfig, allow_provenance_change: bool = False, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """The whole DDPO run: reward actors up, Ray Train fit (resuming from ``cfg.out``), reports; returns
    the output paths (see :func:`tn_ray.training.outputs.write_outputs`). A run folder whose
    provenance.json differs is refused unless ``allow_provenance_change``. ``callbacks``: Ray Train
    callbacks (:func:`tn_ray.training.loop.fit`)."""
    return run_method(cfg, DDPO, allow_provenance_change, callbacks)


def run_method(cfg: FineTuneConfig, method: type[Method], allow_provenance_change: bool = False,
               callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """:func:`run` for any method on :class:`DDPOData` (DDPO, GRPO)."""
    import yaml

    from tn_ray.training.loop import fit

    store = Store(cfg.out)
    data = prepare(cfg, allow_provenance_change)
    store.write_text("config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    try:
        result = fit(cfg, method, data, callbacks)
    finally:
        release(data)
    paths = (
        write_outputs(cfg, data.prompts)
        if cfg.eval.enabled
        else {"out": store.uri(""), "checkpoints": store.uri("checkpoints")}
    )
    paths["samples"] = store.uri("samples")
    paths["ray_result"] = result["ray_path"]
    return paths


def epoch_rewards(out: str) -> Any:
    """Per epoch: mean and std of the sampled images' training reward over all workers (from ``samples/``)."""
    import pandas as pd

    store = Store(out)
    frame = pd.concat(
        [store.read_table(rel).to_pandas() for rel in store.list_files("samples", ".parquet")], ignore_index=True
    )
    return frame.groupby("epoch")["reward"].agg(reward_mean="mean", reward_std="std", samples="size").reset_index()
