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

from dataclasses import dataclass
from typing import Any

from pydantic import Field

from tn_ray.config import StrictModel
from tn_ray.sweep.registry import SweepTrainable

PARAMS = ("kl_coef", "lr", "clip_range", "lora_rank", "tau", "lam")


class DDPOSweepOptions(StrictModel):
    config: str = Field(..., description="the DDPO YAML every trial starts from (DDPOConfig)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted keys overriding the YAML for every trial, e.g. {max_steps: 100}")


@dataclass
class DDPOSweepData:
    cfg: dict
    fingerprint: str = ""


def base_config(options: DDPOSweepOptions):
    from tn_ray.config import load_config
    from tn_ray.training.ddpo import DDPOConfig

    cfg = load_config(options.config, DDPOConfig, options.overrides)
    # every report carries the evaluation metrics Tune and ASHA compare
    return cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"every": cfg.eval.every})})


def prepare(options: DDPOSweepOptions, sweep=None) -> DDPOSweepData:
    from tn_ray.training.config import resolve_prompts

    cfg = base_config(options)
    resolve_prompts(cfg)  # a missing prompts file fails before any trial starts
    return DDPOSweepData(cfg.model_dump(mode="json"), fingerprint=f"ddpo-{cfg.model_dump_json()}")


def trial_config(params: dict[str, Any], data: DDPOSweepData):
    from tn_ray.storage import join_uri
    from tn_ray.training.ddpo import DDPOConfig

    raw = dict(data.cfg)
    slug = ",".join(f"{k}={params[k]}" for k in sorted(params) if k in PARAMS)
    update: dict[str, Any] = {"out": join_uri(raw["out"], "trials", slug or "default")}
    train = dict(raw["train"])
    for key in ("kl_coef", "clip_range"):
        if key in params:
            train[key] = float(params[key])
    update["train"] = train
    if "lr" in params:
        update["optimizer"] = {**raw["optimizer"], "lr": float(params["lr"])}
    if "lora_rank" in params:
        update["policy"] = {**raw["policy"], "lora": {**raw["policy"]["lora"], "rank": int(params["lora_rank"])}}
    if "tau" in params or "lam" in params:
        tn = dict(raw["reward"]["textnorm"])
        tn.update({k: float(params[k]) for k in ("tau", "lam") if k in params})
        update["reward"] = {**raw["reward"], "textnorm": tn}
    update["logging"] = {**raw["logging"], "progress_bar": False}
    return DDPOConfig.model_validate({**raw, **update})


def train(config: dict[str, Any], data: DDPOSweepData) -> None:
    """The Tune function: reward actors, a TorchTrainer whose reports reach Tune, reports written when done."""
    from tn_ray.training.ddpo import run

    run(trial_config(config, data))


def check_param(options: DDPOSweepOptions, name: str, value: Any) -> str | None:
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
    name="ddpo", kind="train", fn=train, options=DDPOSweepOptions, prepare=prepare, check_param=check_param,
    description="DDPO fine-tuning with LoRA (kl_coef, lr, clip_range, lora_rank, tau, lam); a report + checkpoint per evaluation",
)
