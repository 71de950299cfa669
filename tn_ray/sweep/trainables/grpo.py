"""``grpo``: GRPO (Flow-GRPO on flow-matching pipelines) as a sweep training trainable (``trainable: grpo``).

The same trainable as ``ddpo`` (:mod:`tn_ray.sweep.trainables.ddpo`: one Tune function running the method on
DDPO's driver, one report + checkpoint per evaluation, a trial folder ``<base out>/trials/<parameters>`` that
``--resume`` continues) with GRPO's config and method. ``options: {config: <a GRPO YAML>, overrides: {...}}``.

Swept parameters: ``beta`` (the KL weight, ``train.beta``: Flow-GRPO's 0.04 GenEval / OCR, 0.01 PickScore),
``lr``, ``clip_range``, ``noise_level`` (the SDE's a, in (0, 1]), ``lora_rank``, and the reward's TextNorm
``tau`` and ensemble ``lam``. ``sweeps/grpo_kl.yaml`` is a beta grid.
"""
from __future__ import annotations

from typing import Any

from tn_ray.diffusion.flow_sde import check_noise_level
from tn_ray.sweep.trainable import SweepTrainable
from tn_ray.sweep.trainables.ddpo import MethodSweepData, check_number, prepare_method, train
from tn_ray.sweep.trainables.finetune import FineTuneSweepOptions

# swept parameter -> GRPOConfig key
KEYS = {
    "beta": "train.beta",
    "lr": "optimizer.lr",
    "clip_range": "train.clip_range",
    "noise_level": "sample.noise_level",
    "lora_rank": "policy.lora.rank",
    "tau": "reward.textnorm.tau",
    "lam": "reward.textnorm.lam",
}
PARAMS = tuple(KEYS)


def prepare(options: FineTuneSweepOptions, sweep=None) -> MethodSweepData:
    from tn_ray.training.grpo import GRPO, GRPOConfig

    return prepare_method(options, GRPOConfig, GRPO, KEYS, "grpo")


def check_param(options: FineTuneSweepOptions, name: str, value: Any) -> str | None:
    error = check_number(name, value, PARAMS, non_negative=("beta", "lam"), positive=("lr", "clip_range", "tau"))
    if error is None and name == "noise_level":

        try:
            check_noise_level(value)
        except ValueError as e:
            return str(e)
    return error


GRPO = SweepTrainable(
    name="grpo",
    kind="train",
    fn=train,
    options=FineTuneSweepOptions,
    prepare=prepare,
    check_param=check_param,
    description="GRPO (Flow-GRPO) fine-tuning of a flow-matching model with LoRA (beta, lr, clip_range, noise_level, "
    "lora_rank, tau, lam); a report + checkpoint per evaluation",
)
