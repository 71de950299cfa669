"""``rwr``: RWR as a sweep training trainable (``trainable: rwr`` in a sweep YAML).

``options: {config: <an RWR YAML>, overrides: {...}}`` fixes everything but the swept
parameters. ``prepare`` runs once per sweep in the driver: it generates and scores the base
model's images and keeps the top-k (shared by every trial: the swept parameters do not
change the data). Each trial then runs a Ray Train ``TorchTrainer`` inside its Tune function
(Ray Train V2) whose reports reach Tune through ``TuneReportCallback``: one per evaluation,
with the training reward, each judge, the selection counts (``eval_wins``) and the URI of
the checkpoint written at that step. ASHA may stop a trial between evaluations. A trial's
run folder is ``<base out>/trials/<parameters>``, fixed by its parameters, so a killed sweep
resumed with ``--resume`` continues each trial from its newest checkpoint.

Swept parameters: ``beta`` (KL coefficient), ``lr``, ``weighting``, ``temperature``,
``lora_rank``.
"""
from __future__ import annotations

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
from tn_ray.training.outputs import write_outputs
from tn_ray.training.preflight import check_run
from tn_ray.training.rwr import RwrConfig, RwrMethod, load_pretrain, prepare_data
from tn_ray.training.sample_weights import WEIGHTINGS, reward_weights

# swept parameter -> RwrConfig key
KEYS = {"beta": "beta", "lr": "optimizer.lr", "weighting": "weighting", "temperature": "temperature",
        "lora_rank": "policy.lora.rank"}
PARAMS = tuple(KEYS)


@dataclass
class RwrSweepData(FineTuneSweepData):
    prompts: list[str] | None = None
    examples: Any = None  # pandas frame of kept images
    pretrain: Any = None  # the optional pre-training term's images (rwr.load_pretrain), shared by every trial


def prepare(options: FineTuneSweepOptions, sweep=None) -> RwrSweepData:
    from tn_ray.cluster import init_ray

    cfg = base_config(options, RwrConfig)
    prompts = resolve_prompts(cfg)
    check_run(cfg, prompts)
    pretrain = load_pretrain(cfg.pretrain, cfg.seed, cfg.generation.height) if cfg.pretrain is not None else None
    init_ray(sweep.ray if sweep is not None else cfg.ray)
    data = prepare_data(cfg, prompts)
    return RwrSweepData(cfg.model_dump(mode="json"), RwrConfig, KEYS, fingerprint=f"rwr-{cfg.model_dump_json()}",
                        prompts=prompts, examples=data, pretrain=pretrain)


def train(config: dict[str, Any], data: RwrSweepData) -> None:
    """The Tune function: a TorchTrainer whose reports reach Tune; reports written when done."""
    from tn_ray.training.loop import fit

    cfg = trial_config(config, data)
    examples = data.examples.copy()
    examples["weight"] = reward_weights(examples["reward"].to_numpy(), examples["prompt_id"].to_numpy(), cfg.weighting,
                                        cfg.temperature)
    fit(cfg, RwrMethod, {"examples": examples, "pretrain": data.pretrain}, tune_callbacks())
    write_outputs(cfg, data.prompts)


def check_param(options: FineTuneSweepOptions, name: str, value: Any) -> str | None:
    if name not in PARAMS:
        return f"unknown parameter '{name}'; expected one of {list(PARAMS)}"
    if name == "weighting":

        return None if value in WEIGHTINGS else f"weighting must be one of {list(WEIGHTINGS)}, got {value!r}"
    if name == "lora_rank":
        return None if isinstance(value, int) and value >= 1 else f"lora_rank must be an integer >= 1, got {value!r}"
    if not isinstance(value, (int, float)):
        return f"{name} must be a number, got {value!r}"
    if name == "beta" and value < 0:
        return f"beta (KL coefficient) must be >= 0, got {value!r}"
    if name in ("lr", "temperature") and value <= 0:
        return f"{name} must be > 0, got {value!r}"
    return None


RWR = SweepTrainable(
    name="rwr", kind="train", fn=train, options=FineTuneSweepOptions, prepare=prepare, check_param=check_param,
    description="RWR fine-tuning with LoRA (beta, lr, weighting, temperature, lora_rank); a report + checkpoint per "
                "evaluation",
)
