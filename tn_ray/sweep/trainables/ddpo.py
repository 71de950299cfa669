"""``ddpo``: DDPO as a sweep training trainable (``trainable: ddpo`` in a sweep YAML).

``options: {config: <a DDPO YAML>, overrides: {...}}`` fixes everything but the swept
parameters. Each trial starts its own long-lived reward actors, runs a Ray Train
``TorchTrainer`` inside its Tune function (Ray Train V2) whose reports reach Tune through
``TuneReportCallback`` (one per evaluation, every ``eval.every`` epochs: training reward,
judges, ``eval_wins``, the checkpoint URI), writes the run's reports, and releases the actors.
ASHA may stop a trial between evaluations. A trial's run folder is
``<base out>/trials/<parameters>``, fixed by its parameters, so a killed sweep resumed with
``--resume`` continues each trial from its newest checkpoint.

Swept parameters: ``kl_coef`` (eq. 5's lambda), ``lr``, ``clip_range``, ``lora_rank``, and
the reward's TextNorm ``tau`` and ensemble ``lam``.
"""
from __future__ import annotations

from typing import Any

from tn_ray.sweep.trainable import SweepTrainable
from tn_ray.sweep.trainables.finetune import (
    FineTuneSweepData,
    FineTuneSweepOptions,
    base_config,
    trial_config,
    tune_callbacks,
)

# swept parameter -> DDPOConfig key
KEYS = {
    "kl_coef": "train.kl_coef",
    "lr": "optimizer.lr",
    "clip_range": "train.clip_range",
    "lora_rank": "policy.lora.rank",
    "tau": "reward.textnorm.tau",
    "lam": "reward.textnorm.lam",
}
PARAMS = tuple(KEYS)


def prepare(options: FineTuneSweepOptions, sweep=None) -> FineTuneSweepData:
    from tn_ray.training.config import resolve_prompts
    from tn_ray.training.ddpo import DDPOConfig

    cfg = base_config(options, DDPOConfig)
    resolve_prompts(cfg)  # a missing prompts file fails before any trial starts
    return FineTuneSweepData(cfg.model_dump(mode="json"), DDPOConfig, KEYS, fingerprint=f"ddpo-{cfg.model_dump_json()}")


def train(config: dict[str, Any], data: FineTuneSweepData) -> None:
    """The Tune function: reward actors, a TorchTrainer whose reports reach Tune, reports written when done."""
    from tn_ray.training.ddpo import run

    run(trial_config(config, data), callbacks=tune_callbacks())


def check_param(options: FineTuneSweepOptions, name: str, value: Any) -> str | None:
    if name not in PARAMS:
        return f"unknown parameter '{name}'; expected one of {list(PARAMS)}"
    if name == "lora_rank":
        return None if isinstance(value, int) and value >= 1 else f"lora_rank must be an integer >= 1, got {value!r}"
    if not isinstance(value, (int, float)):
        return f"{name} must be a number, got {value!r}"
    if name in ("kl_coef", "lam") and value < 0:
        return f"{name} must be >= 0, got {value!r}"
    if name in ("lr", "clip_range", "tau") and value <= 0:
        return f"{name} must be > 0, got {value!r}"
    return None


DDPO = SweepTrainable(
    name="ddpo",
    kind="train",
    fn=train,
    options=FineTuneSweepOptions,
    prepare=prepare,
    check_param=check_param,
    description="DDPO fine-tuning with LoRA (kl_coef, lr, clip_range, lora_rank, tau, lam); a report + checkpoint per "
    "evaluation",
)
