"""What the ``rwr``, ``ddpo`` and ``grpo`` trainables share: a trial's parameters mapped onto config keys.

Each trainable declares ``KEYS``, a mapping of its swept parameters onto dotted keys of its
config (``{"lr": "optimizer.lr", "tau": "reward.textnorm.tau", ...}``); :func:`trial_config`
applies them with :func:`tn_ray.config.apply_overrides` (the same function as ``--set``), gives
the trial its own run folder ``<out>/trials/<parameters>`` and turns the progress bar off. No
trainable writes a config by hand. :func:`tune_callbacks` are the Ray Train callbacks that
forward a trial's reports to Tune (passed to :func:`tn_ray.training.loop.fit`).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from tn_ray.config import StrictModel, apply_overrides, load_config
from tn_ray.storage import join_uri


class FineTuneSweepOptions(StrictModel):
    config: str = Field(..., description="the RWR, DDPO or GRPO YAML every trial starts from (RwrConfig / DDPOConfig / "
                        "GRPOConfig)")
    overrides: dict[str, Any] = Field(default_factory=dict,
                                      description="dotted keys overriding the YAML for every trial, e.g. {max_steps: "
                                                  "200}")


@dataclass
class FineTuneSweepData:
    """The sweep's shared data: the base config (JSON), its class, and the parameters' config keys."""

    cfg: dict
    config_class: type  # RwrConfig, DDPOConfig or GRPOConfig
    keys: Mapping[str, str] = field(default_factory=dict)  # parameter -> dotted config key
    fingerprint: str = ""


def base_config(options: FineTuneSweepOptions, config_class: type):
    """The YAML with its overrides; every report carries the evaluation metrics Tune and ASHA compare."""

    cfg = load_config(options.config, config_class, options.overrides)
    return cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"every": cfg.eval.every})})


def trial_slug(params: Mapping[str, Any], keys: Mapping[str, str]) -> str:
    """The trial's folder name: its swept parameters, sorted (``beta=0.5,lr=0.001``)."""
    return ",".join(f"{k}={params[k]}" for k in sorted(params) if k in keys) or "default"


def trial_config(params: Mapping[str, Any], data: FineTuneSweepData):
    """The trial's validated config: ``data.cfg`` with each parameter set at its key in ``data.keys``."""

    raw = copy.deepcopy(data.cfg)
    overrides = {data.keys[k]: v for k, v in params.items() if k in data.keys}
    overrides.update(
        {"out": join_uri(raw["out"], "trials", trial_slug(params, data.keys)), "logging.progress_bar": False}
    )
    return data.config_class.model_validate(apply_overrides(raw, overrides, source="sweep trial"))


def tune_callbacks() -> list:
    """Ray Train callbacks of a trial: its reports (metrics + checkpoint) reach Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    return [TuneReportCallback()]
