"""``reward_head``: the sweep trainable over the reward head's learning rate, size and auxiliary weight.

Options name a ``tn-ray reward train`` YAML (data, backbone, split, defaults of every
parameter); ``prepare`` loads the labels, computes (or reads from the feature cache) the
embeddings once in the driver, and ships the arrays to every trial. A trial trains one head
with the shared epoch loop, reporting per epoch (``val_auroc``, ``best_val_auroc``, losses)
with a checkpoint through ``tune.report``; ASHA may stop it between epochs and a restored trial
resumes from its checkpoint. Only validation prompts are used: the test prompts stay unseen.
"""
from __future__ import annotations

from typing import Any

from pydantic import Field

from tn_ray.config import StrictModel, load_config
from tn_ray.reward_learning import data, features, train
from tn_ray.reward_learning.config import RewardTrainConfig
from tn_ray.reward_learning.pipeline import build_arrays
from tn_ray.reward_learning.train import epochs
from tn_ray.storage import join_uri
from tn_ray.sweep.trainable import SweepTrainable

SEARCHABLE = {"lr": float, "weight_decay": float, "hidden": int, "layers": int, "dropout": float, "aux_weight": float,
              "temperature": float, "batch_size": int, "kind": str}


class RewardHeadOptions(StrictModel):
    config: str = Field(..., description="a `tn-ray reward train` YAML: data, backbone, feature cache and the defaults "
                                         "of every parameter")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted keys of that YAML set for this sweep, "
                                                                        "e.g. {train.epochs: 40}")


class HeadData:
    """The sweep's shared data: the arrays and every parameter's default."""

    def __init__(self, arrays, params: dict[str, Any]):
        self.arrays, self.params = arrays, params
        self.fingerprint = f"reward_head-{arrays.fingerprint}-{sorted(params.items())}"


def prepare(options: RewardHeadOptions, sweep=None) -> HeadData:
    from tn_ray.cluster import init_ray

    cfg = load_config(options.config, RewardTrainConfig, options.overrides)
    frame = data.load(cfg.data)
    init_ray(sweep.ray if sweep is not None else cfg.ray)
    feats = features.compute(frame, cfg.backbone, cfg.feature_cache or join_uri(cfg.out, "features"), cfg.scoring)
    return HeadData(build_arrays(frame, feats, cfg.loss.target), train.params_of(cfg))


def run_trial(config: dict[str, Any], data: HeadData) -> None:
    """The Tune function trainable: the shared epoch loop with ``tune.report`` and its checkpoints."""
    from ray import tune

    params = {**data.params, **config}

    def report(metrics: dict, folder: str | None) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder) if folder else None)

    epochs(params, data.arrays, report, tune.get_checkpoint())


def check_param(options: RewardHeadOptions, name: str, value: Any) -> str | None:
    if name not in SEARCHABLE:
        return f"unknown parameter '{name}'; expected one of {sorted(SEARCHABLE)}"
    kind = SEARCHABLE[name]
    if kind is str:
        return None if value in ("mse", "bce") else f"kind must be mse or bce, got {value!r}"
    if kind is int and not (isinstance(value, int) and value >= 1):
        return f"{name} must be an integer >= 1, got {value!r}"
    if not isinstance(value, (int, float)):
        return f"{name} must be a number, got {value!r}"
    if name in ("lr", "temperature") and value <= 0:
        return f"{name} must be > 0, got {value!r}"
    if name in ("aux_weight", "weight_decay") and value < 0:
        return f"{name} must be >= 0, got {value!r}"
    if name == "dropout" and not 0 <= value < 1:
        return f"dropout must lie in [0, 1), got {value!r}"
    return None


REWARD_HEAD = SweepTrainable(
    name="reward_head", kind="train", fn=run_trial, options=RewardHeadOptions, prepare=prepare, check_param=check_param,
    description="reward head on cached backbone embeddings (lr, hidden, aux_weight, ...); reports validation AUROC per "
                "epoch, checkpoints",
)
