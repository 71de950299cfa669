"""``ddpo``: DDPO as a sweep training trainable (``trainable: ddpo`` in a sweep YAML), and what every method on
DDPO's driver (:func:`tn_ray.training.ddpo.run_method`: DDPO, GRPO) shares as a trainable.

``options: {config: <a DDPO YAML>, overrides: {...}}`` fixes everything but the swept
parameters. Each trial starts its own long-lived reward actors, runs a Ray Train
``TorchTrainer`` inside its Tune function (Ray Train V2) whose reports reach Tune through
``TuneReportCallback`` (one per evaluation, every ``eval.every`` epochs: training reward,
judges, ``eval_wins``, the checkpoint URI), writes the run's reports, and releases the actors.
ASHA may stop a trial between evaluations. A trial's run folder is
``<base out>/trials/<parameters>``, fixed by its parameters, so a killed sweep resumed with
``--resume`` continues each trial from its newest checkpoint.

Swept parameters: ``kl_coef`` (eq. 5's lambda), ``lr``, ``clip_range``, ``lora_rank``, and
the reward's TextNorm ``tau`` and ensemble ``lam``. The ``grpo`` trainable
(:mod:`tn_ray.sweep.trainables.grpo`) is :func:`prepare_method`, :func:`train` and :func:`check_number`
with GRPO's config, method and keys.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from tn_ray.sweep.trainable import SweepTrainable
from tn_ray.sweep.trainables.finetune import (
    FineTuneSweepData,
    FineTuneSweepOptions,
    base_config,
    trial_config,
    tune_callbacks,
)
from tn_ray.training.config import resolve_prompts
from tn_ray.training.ddpo import run_method

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


@dataclass
class MethodSweepData(FineTuneSweepData):
    """:class:`FineTuneSweepData` plus the :class:`tn_ray.training.loop.Method` every trial runs on DDPO's driver."""

    method: type | None = None  # DDPO or GRPO


def prepare_method(options: FineTuneSweepOptions, config_class: type, method: type, keys: Mapping[str, str],
                   name: str) -> MethodSweepData:
    """The sweep's data for a method on DDPO's driver: the base config (a missing prompts file fails before any
    trial starts), its class, the method and the parameters' keys; ``name`` prefixes the resume fingerprint."""

    cfg = base_config(options, config_class)
    resolve_prompts(cfg)
    return MethodSweepData(cfg.model_dump(mode="json"), config_class, keys,
                           fingerprint=f"{name}-{cfg.model_dump_json()}", method=method)


def prepare(options: FineTuneSweepOptions, sweep=None) -> MethodSweepData:
    from tn_ray.training.ddpo import DDPO, DDPOConfig

    return prepare_method(options, DDPOConfig, DDPO, KEYS, "ddpo")


def train(config: dict[str, Any], data: MethodSweepData) -> None:
    """The Tune function: reward actors, a TorchTrainer whose reports reach Tune, reports written when done."""

    run_method(trial_config(config, data), data.method, callbacks=tune_callbacks())


def check_number(name: str, value: Any, params: Collection[str], non_negative: Collection[str] = (),
                 positive: Collection[str] = ()) -> str | None:
    """The one-line error of a swept value, or None: an unknown name, a ``lora_rank`` that is not an integer >= 1,
    a value that is not a number, below 0 (``non_negative``) or not above 0 (``positive``)."""
    if name not in params:
        return f"unknown parameter '{name}'; expected one of {list(params)}"
    if name == "lora_rank":
        return None if isinstance(value, int) and value >= 1 else f"lora_rank must be an integer >= 1, got {value!r}"
    if not isinstance(value, (int, float)):
        return f"{name} must be a number, got {value!r}"
    if name in non_negative and value < 0:
        return f"{name} must be >= 0, got {value!r}"
    if name in positive and value <= 0:
        return f"{name} must be > 0, got {value!r}"
    return None


def check_param(options: FineTuneSweepOptions, name: str, value: Any) -> str | None:
    return check_number(name, value, PARAMS, non_negative=("kl_coef", "lam"), positive=("lr", "clip_range", "tau"))


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
