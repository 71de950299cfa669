"""Config blocks every fine-tuning method shares (RWR, DDPO): policy + LoRA, optimizer,
evaluation, checkpoints, monitor, logging, Ray Train scaling.

A method's config subclasses :class:`FineTuneConfig` and overrides defaults that differ
(``OptimizerBlock`` defaults are the paper's Table 4 for RWR; DDPO passes its own).
Cross-field checks live in validators so a bad config fails before Ray starts.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tn_ray.config import OutputLocation, RayConfig, ScoringConfig, StrictModel
from tn_ray.data import tia2
from tn_ray.diffusion.flow_sde import check_noise_level
from tn_ray.diffusion.pipelines import DEFAULT_PIPELINE, DTYPES, WORLD, WORLD_LORA_TARGETS
from tn_ray.errors import InputError
from tn_ray.prompts.contrast import generates, load_contrast
from tn_ray.textnorm.columns import RewardConfig

ADAPTER = "default"  # the name of the one LoRA adapter (peft) every policy carries
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # UNet attention projections (diffusers' LoRA example)


def require_prompts(given: bool, reward: RewardConfig) -> None:
    """``ValueError`` for a config without training prompts whose ``reward.contrast`` cannot list
    any: a prompt source (``rules``, ``llm``) makes sets for given prompts only."""

    if not given and generates(reward.contrast):
        raise ValueError(f"prompts: required when reward.contrast is '{reward.contrast}', a source that makes sets for "
                         "given prompts (only a set file or 'released' lists prompts of its own)")


def resolve_prompts(cfg: FineTuneConfig) -> list[str]:
    """The training prompts of a fine-tuning config (RWR, DDPO), one resolver for every method: its
    ``prompts``, then the lines of its ``prompts_file`` (where the method has one; blank lines
    skipped); with neither, :meth:`FineTuneConfig.default_prompts` (``prompts_per_set`` of each TIA2
    set, else every prompt of ``reward.contrast``'s sets); then the first ``max_prompts`` (where the
    method has one). :class:`InputError` for a missing prompts file or no prompt at all."""
    from pathlib import Path

    prompts = list(getattr(cfg, "prompts", None) or [])
    prompts_file = getattr(cfg, "prompts_file", None)
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise InputError(f"prompts_file: {path} not found")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif not prompts:
        prompts = cfg.default_prompts()
    prompts = prompts[: getattr(cfg, "max_prompts", None) or None]
    if not prompts:
        keys = "`prompts` or `prompts_file`" if hasattr(cfg, "prompts_file") else "`prompts`"
        raise InputError(f"prompts: no training prompts (set {keys}, or a non-empty reward.contrast source)")
    return prompts


class LoraBlock(StrictModel):
    rank: int = Field(4, ge=1, description="LoRA rank r of every adapted projection (count)")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; the update is scaled by alpha / rank (unitless); "
                                                        "None = rank (scale 1)")
    target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_TARGETS),
        min_length=1,
        description="UNet module names adapted (peft target_modules); default: the attention projections, or for "
                    "policy.pipeline 'world' every attention, feed-forward, conv and time projection "
                    "(tn_ray.diffusion.pipelines.WORLD_LORA_TARGETS: attention-only LoRA barely moves that small UNet)",
    )
    init: Literal["gaussian", "default"] = Field(
        "gaussian",
        description="peft init_lora_weights: gaussian (A ~ N(0, "
        "1/r), B = 0, as diffusers' example) or "
        "peft's default; B = 0 either way, so step 0 "
        "is the base model",
    )

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class PolicyBlock(StrictModel):
    pipeline: str = Field(
        DEFAULT_PIPELINE,
        description="base text-to-image pipeline: hub id, local diffusers folder, or 'tiny' (random small config, CPU)",
    )
    revision: str | None = Field(
        None,
        description="hub revision of `pipeline` (commit hash, branch or tag) passed to "
        "from_pretrained; None = the default branch; the resolved commit is "
        "recorded in provenance.json",
    )
    dtype: Literal[DTYPES] = Field(
        "auto", description="dtype of the frozen base weights: auto = float16 on GPU, float32 on CPU"
    )
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto",
        description="autocast of forward passes: "
        "auto = fp16 on GPU (the "
        "paper), none on CPU; LoRA "
        "weights always train in float32",
    )
    lora: LoraBlock = Field(default_factory=LoraBlock, description="the adapter: rank, alpha, target modules")
    gradient_checkpointing: bool = Field(
        False, description="recompute UNet activations in backward (less memory, about 30 % more time)"
    )

    @model_validator(mode="after")
    def _world_targets(self) -> PolicyBlock:
        if self.pipeline == WORLD and "target_modules" not in self.lora.model_fields_set:
            self.lora.target_modules = list(WORLD_LORA_TARGETS)
        return self


class OptimizerBlock(StrictModel):
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate (per step); Table 4: 1e-5 for RWR, 3e-4 for DDPO")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW decoupled weight decay (per step, times lr)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW (beta1, beta2)")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="clip the global L2 norm of LoRA gradients to this; None = no clipping"
    )
    schedule: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        "constant", description="learning-rate schedule over max_steps (diffusers.optimization.get_scheduler)"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warm-up of the learning rate (optimizer steps)")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"betas must lie in [0, 1), got {list(v)}")
        return v


class JudgeBlock(RewardConfig):
    """A held-out judge: a reward column training never sees (same keys as ``reward``)."""


class EvalBlock(StrictModel):
    enabled: bool = Field(
        True,
        description="evaluate at all; False = no evaluation images, no selection or monitor (benchmarks, smoke tests)",
    )
    every: int = Field(
        100, ge=1, description="evaluate (and checkpoint) every N training steps; the last step is always evaluated"
    )
    prompts: list[str] | None = Field(
        None, description="evaluation prompts; None = the first `max_prompts` training prompts"
    )
    max_prompts: int = Field(
        8, ge=1, description="evaluation prompts taken from the training prompts when `prompts` is None (count)"
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2, 3],
        min_length=1,
        description="initial-noise seeds per evaluation prompt: the same for the base model and every checkpoint",
    )
    num_inference_steps: int = Field(50, ge=1, description="denoising steps of evaluation images (count)")
    guidance_scale: float = Field(7.5, ge=0, description="classifier-free guidance of evaluation images (unitless)")
    height: int | None = Field(
        None, ge=8, multiple_of=8, description="evaluation image height (pixels); None = the pipeline's default"
    )
    width: int | None = Field(
        None, ge=8, multiple_of=8, description="evaluation image width (pixels); None = the pipeline's default"
    )
    batch_size: int = Field(8, ge=1, description="images per diffusers call during evaluation (images)")
    base_images: OutputLocation | None = Field(
        None,
        description="a folder (or cloud URI) of base-model evaluation images shared by runs: read from "
        "<base_images>/<tag>/ when all are there, else generated and written there, then copied into the run's "
        "eval/base/ as always; <tag> digests what fixes them (the policy block without lora, the prompts, seeds, "
        "steps, guidance, size and batch_size here), so runs share only identical images. None: each run "
        "generates its own. `tn-ray study` sets <study out>/shared/eval-base for its fine-tuning cells",
    )
    path_kl: bool = Field(
        True,
        description="measure the path KL to the base model at every evaluation (metric eval_path_kl, nats: the "
        "mean over evaluation images of the KL between the policy's and the base model's stochastic chains (DDIM "
        "at kl_eta for a UNet policy, the Flow-GRPO SDE at kl_noise_level for a flow-matching one), estimated "
        "on one policy chain per (prompt, seed); per image in eval/path_kl/). Costs one extra stochastic "
        "sampling pass (num_inference_steps guided forwards) plus one base-model forward per step, per "
        "evaluation image: about twice the model work of the evaluation images themselves",
    )
    kl_eta: float = Field(
        1.0,
        gt=0,
        description="DDIM eta of the path-KL chains of a UNet policy (unitless, > 0; 1.0 = DDPO's sampling): the "
        "step noise sigma_t = eta * the DDPM posterior std; path KLs compare only at the same eta (they grow "
        "without bound as eta -> 0); flow-matching policies use kl_noise_level",
    )
    kl_noise_level: float = Field(
        0.7,
        description="noise level a of the path-KL chains of a flow-matching policy (GRPO; unitless, in (0, 1]; "
        "Flow-GRPO's sample.noise_level 0.7): every step of the chain is the Flow-GRPO SDE with sigma_t = "
        "a sqrt(t / (1 - t)); path KLs compare only at the same a. UNet policies use kl_eta instead",
    )
    judges: list[JudgeBlock] = Field(
        default_factory=list, description="held-out judge rewards, each a reward config; its column name is its `use`"
    )
    select_by: str | None = Field(
        None,
        description="column whose win counts over the base model select the "
        "checkpoint; None = the training reward: the paper's rule (Section "
        "5, 'as measured by the reward model'). Naming a judge is an "
        "override, reported as not the paper's rule; judges are monitors "
        "either way and selection.json gives each judge's own view",
    )

    @field_validator("kl_noise_level")
    @classmethod
    def _kl_noise_level(cls, a: float) -> float:
        return check_noise_level(a)


class CheckpointBlock(StrictModel):
    every: int = Field(
        100,
        ge=1,
        description="save LoRA + optimizer + RNG + data position every N steps (also at "
        "every evaluation and the last step)",
    )
    keep_last: int | None = Field(
        None,
        ge=1,
        description="keep only the N newest unevaluated checkpoints (evaluated "
        "ones are kept for selection); None = keep all",
    )


class MonitorBlock(StrictModel):
    window: int = Field(
        3,
        ge=1,
        description="evaluations looked back over: flag when over the last `window` "
        "evaluation intervals the training reward rose while every judge fell "
        "(count)",
    )
    tolerance: float = Field(
        0.0, ge=0, description="a rise / fall must exceed this (reward units of each column) to count"
    )
    stop_on_overoptimization: bool = Field(
        False, description="end the run (after checkpointing) the first time the monitor flags"
    )


class LoggingBlock(StrictModel):
    tensorboard: bool = Field(
        True,
        description="write per-step losses, rewards, KL and learning rate as TensorBoard "
        "events under <out>/tensorboard",
    )
    wandb_project: str | None = Field(
        None, description="Weights & Biases project (Ray's W&B integration); None = no W&B"
    )
    wandb_mode: Literal["online", "offline", "disabled"] = Field(
        "online", description="W&B mode; offline writes runs locally for `wandb sync`"
    )
    progress_bar: bool = Field(True, description="a tqdm progress bar of training steps (rank 0)")


class ScalingBlock(StrictModel):
    num_workers: int = Field(1, ge=1, description="Ray Train data-parallel workers (one per GPU)")
    use_gpu: bool | None = Field(None, description="one GPU per worker; None = when the cluster has GPUs")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per Train worker (count)")
    max_failures: int = Field(
        0, ge=-1, description="worker-group restarts Ray Train attempts from the last checkpoint (-1 = unlimited)"
    )


class FineTuneConfig(StrictModel):
    """What every fine-tuning run shares; methods add their own keys."""

    out: OutputLocation = Field(
        "results/finetune",
        description="run folder or cloud URI: config, checkpoints, eval.csv, curves, grids, selection",
    )
    seed: int = Field(0, ge=0, description="seed of noise, timesteps, data order and LoRA init")
    max_steps: int = Field(1000, ge=1, description="optimizer steps of the run (count); Table 4: up to 1,000 for RWR")
    policy: PolicyBlock = Field(default_factory=PolicyBlock, description="base pipeline, precision and LoRA adapter")
    optimizer: OptimizerBlock = Field(
        default_factory=OptimizerBlock, description="AdamW, schedule and gradient clipping"
    )
    reward: RewardConfig = Field(
        ...,
        description="the training reward: models, which column (raw, textnorm(...), "
        "ensemble), TextNorm params, contrastive source",
    )
    prompts_per_set: int | None = Field(
        None,
        ge=1,
        description="with reward.contrast 'released' and no training "
        "prompts given: the "
        "first N prompts of each TIA2 set, in release order (the paper: '10 prompts "
        "from the 30' of "
        "each set; it does not list them, and the first 10 are inside best-of-n's "
        "first 30)",
    )
    eval: EvalBlock = Field(
        default_factory=EvalBlock,
        description="periodic evaluation on fixed prompts and seeds, judges, checkpoint selection",
    )
    checkpoint: CheckpointBlock = Field(
        default_factory=CheckpointBlock, description="checkpoint frequency and retention"
    )
    monitor: MonitorBlock = Field(
        default_factory=MonitorBlock, description="overoptimization monitor (training reward up, judges down)"
    )
    logging: LoggingBlock = Field(default_factory=LoggingBlock, description="TensorBoard, W&B, progress bar")
    scaling: ScalingBlock = Field(default_factory=ScalingBlock, description="Ray Train workers and resources")
    scoring: ScoringConfig = Field(
        default_factory=lambda: ScoringConfig(batch_size=16),
        description="reward actors used to score data and evaluation images",
    )
    stop_after_steps: int | None = Field(
        None,
        ge=1,
        description="end this invocation after this step (checkpointed) "
        "though max_steps is larger; rerunning continues "
        "(operations/tests)",
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="where Ray runs")

    @model_validator(mode="after")
    def _prompts_per_set(self) -> FineTuneConfig:
        if self.prompts_per_set and self.reward.contrast != "released":
            raise ValueError(
                "prompts_per_set: takes the first N prompts of each TIA2 set, so it needs "
                "reward.contrast "
                f"'released' (got '{self.reward.contrast}')"
            )
        return self

    @model_validator(mode="after")
    def _judges(self) -> FineTuneConfig:
        names = self.judge_names()
        if len(set(names)) != len(names):
            raise ValueError(f"eval.judges: two judges use the same column {names}")
        if self.reward.use in names:
            raise ValueError(f"eval.judges: judge '{self.reward.use}' is the training reward; a judge must be held out")
        if self.eval.select_by is not None and self.eval.select_by not in [*names, self.reward.use]:
            raise ValueError(
                f"eval.select_by: '{self.eval.select_by}' is neither a judge {names} nor the training "
                f"reward '{self.reward.use}'"
            )
        return self

    def default_prompts(self) -> list[str]:
        """Training prompts when none are given: ``prompts_per_set`` of each TIA2 set, else every
        prompt of ``reward.contrast``'s sets (in its order)."""

        if self.prompts_per_set:
            return tia2.first_prompts(self.prompts_per_set, tia2.resolve_dir(None))
        return list(load_contrast(self.reward.contrast))

    def judge_names(self) -> list[str]:
        return [j.use for j in self.eval.judges]

    @property
    def selection_column(self) -> str:
        """The column whose wins over the base model select the checkpoint: the training reward (the
        paper's rule) unless ``eval.select_by`` overrides it."""
        return self.eval.select_by if self.eval.select_by is not None else self.reward.use

    @property
    def paper_rule(self) -> bool:
        """Whether the checkpoint is selected by the paper's rule (wins under the training reward)."""
        return self.selection_column == self.reward.use
