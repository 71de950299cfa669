"""Evaluation trainables: TextNorm settings scored on stored score matrices.

A trial's parameters describe one reward (any subset may be searched, the rest default):

- ``tau`` (default 1.0): TextNorm temperature of every member; ``tau[<model>]`` overrides it
  for one model (e.g. ``tau[clip]``).
- ``members`` (default: every model of the options): models ensembled (a list; one model =
  that model alone).
- ``kind`` (default ``mean``): ``mean`` (eq. 2) or ``uncertainty`` (eq. 3, mean - lam * var).
- ``lam`` (default 0.0): lambda of the uncertainty ensemble.
- ``normalize`` (default ``textnorm``): ``textnorm`` or ``raw`` (ensemble of plain rewards:
  the baseline TextNorm is compared with).

``tia2_textnorm`` scores the reward against human labels (mean of AP@5/10/25 per prompt set
by default, or any metric of :mod:`tn_ray.analysis.metrics`); ``bestofn_selection`` picks, per prompt,
the sample the reward ranks first and scores it with held-out reward models.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator

from tn_ray.analysis.metrics import METRICS
from tn_ray.config import StrictModel
from tn_ray.sweep import fast_metrics
from tn_ray.sweep.score_data import (
    BestOfNScores,
    LabelledScores,
    find_matrices,
    gather,
    load_bestofn,
    load_labelled,
    pick_models,
    split_mask,
)
from tn_ray.sweep.trainable import SweepTrainable
from tn_ray.textnorm.columns import combine
from tn_ray.textnorm.equations import ENSEMBLE_KINDS

REWARD_PARAMS = ("tau", "tau[<model>]", "members", "kind", "lam", "normalize")
_TAU_OF = re.compile(r"^tau\[(.+)\]$")


@dataclass(frozen=True)
class RewardSetting:
    members: tuple[str, ...]
    taus: tuple[float, ...]
    kind: str
    lam: float
    normalize: str


def reward_setting(params: dict[str, Any], models: list[str]) -> RewardSetting:
    """The reward a trial's parameters describe (defaults for what is not given)."""
    members = tuple(params.get("members") or models)
    tau = float(params.get("tau", 1.0))
    taus = tuple(float(params.get(f"tau[{m}]", tau)) for m in members)
    return RewardSetting(members, taus, str(params.get("kind", "mean")), float(params.get("lam", 0.0)),
                         str(params.get("normalize", "textnorm")))


def compute_reward(values: np.ndarray, models: list[str], setting: RewardSetting) -> np.ndarray:
    """(images,) reward of ``setting`` from the stacked matrices ``values`` (models, images, cols),
    in the order-preserving form of :func:`combine` (both evaluators only rank images: a small
    tau must not tie them at 0)."""
    return combine({m: values[models.index(m)] for m in setting.members}, setting.members, setting.taus,
                   setting.kind, setting.lam, normalize=setting.normalize == "textnorm", ranking=True)


def check_reward_param(models: list[str], name: str, value: Any) -> str | None:
    """Why ``value`` is not valid for reward parameter ``name`` (None if it is)."""
    m = _TAU_OF.match(name)
    if m and m.group(1) not in models:
        return f"no model '{m.group(1)}' among {models}"
    if name == "tau" or m:
        return None if isinstance(value, (int, float)) and value > 0 else f"temperature must be > 0, got {value!r}"
    if name == "lam":
        return None if isinstance(value, (int, float)) and value >= 0 else f"lambda must be >= 0, got {value!r}"
    if name == "kind":
        return (
            None if value in ENSEMBLE_KINDS else f"ensemble kind must be one of {list(ENSEMBLE_KINDS)}, got {value!r}"
        )
    if name == "normalize":
        return None if value in ("textnorm", "raw") else f"normalize must be 'textnorm' or 'raw', got {value!r}"
    if name == "members":
        if not isinstance(value, list) or not value:
            return f"members must be a non-empty list of models, got {value!r}"
        unknown = [x for x in value if x not in models]
        return f"unknown members {unknown}; models: {models}" if unknown else None
    return f"unknown parameter '{name}'; expected one of {list(REWARD_PARAMS)}"


def _split(params: dict[str, Any]) -> tuple[int | None, str]:
    fold = params.get("fold")
    return (None if fold is None else int(fold)), str(params.get("split", "all"))


# ---------------------------------------------------------------------------------------
# TIA2: reward vs human labels
# ---------------------------------------------------------------------------------------


class Tia2SweepOptions(StrictModel):
    run_dir: str = Field(..., description="output folder of `tn-ray tia2 eval` (holds scores/ and rewards.parquet)")
    labels: str | None = Field(
        None, description="Parquet file with set, prompt, image_id, binary, fine; None = <run_dir>/rewards.parquet"
    )
    models: list[str] | None = Field(
        None,
        min_length=1,
        description="models whose matrices are loaded (model ids); None = every matrix in <run_dir>/scores",
    )
    sets: list[str] | None = Field(
        None, min_length=1, description="prompt sets evaluated; None = every set in the labels"
    )
    objective: list[str] = Field(
        default_factory=lambda: ["ap@5", "ap@10", "ap@25"],
        min_length=1,
        description="metrics averaged per set, then over sets, into `objective` (names of "
        "tn_ray.analysis.metrics.METRICS)",
    )

    @field_validator("objective")
    @classmethod
    def _metrics(cls, v: list[str]) -> list[str]:
        unknown = [x for x in v if x not in METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; expected some of {list(METRICS)}")
        return v


@dataclass
class Tia2Data:
    scores: LabelledScores
    objective: tuple[str, ...]


def prepare_tia2(options: Tia2SweepOptions, sweep) -> Tia2Data:
    folds = sweep.heldout.folds if sweep.heldout else None
    seed = sweep.heldout.seed if sweep.heldout else 0
    scores = load_labelled(options.run_dir, options.models, options.sets, options.labels, folds, seed)
    return Tia2Data(scores, tuple(options.objective))


def evaluate_tia2(params: dict[str, Any], data: Tia2Data) -> dict[str, float]:
    """Objective of one reward setting: per set, the mean over prompts and metrics."""
    s = data.scores
    reward = compute_reward(s.values, s.models, reward_setting(params, s.models))
    keep = s.included.copy()
    sub = split_mask(s.folds, *_split(params))
    if sub is not None:
        keep &= sub
    idx = s.index[keep]
    mask = idx >= 0
    per_prompt = fast_metrics.prompt_metrics(
        gather(reward, idx, np.nan), s.binary[keep], s.fine[keep], mask, data.objective
    )
    sets = s.prompt_set[keep]
    out: dict[str, float] = {"n_prompts": float(keep.sum())}
    set_objectives = []
    for i, name in enumerate(s.sets):
        rows = sets == i
        if not rows.any():
            continue
        vals = [
            float(np.nanmean(per_prompt[m][rows])) if np.isfinite(per_prompt[m][rows]).any() else np.nan
            for m in data.objective
        ]
        for metric, v in zip(data.objective, vals):
            out[f"{name}/{metric}"] = v
        out[f"{name}/objective"] = float(np.nanmean(vals)) if np.isfinite(vals).any() else np.nan
        set_objectives.append(out[f"{name}/objective"])
    out["objective"] = float(np.nanmean(set_objectives)) if np.isfinite(set_objectives).any() else float("nan")
    return out


def _tia2_models(options: Tia2SweepOptions) -> list[str]:
    return pick_models(find_matrices(f"{options.run_dir}/scores"), options.models, "options.models")


def check_tia2(options: Tia2SweepOptions, name: str, value: Any) -> str | None:
    return check_reward_param(_tia2_models(options), name, value)


TIA2_TEXTNORM = SweepTrainable(
    name="tia2_textnorm",
    kind="evaluate",
    fn=evaluate_tia2,
    options=Tia2SweepOptions,
    prepare=prepare_tia2,
    check_param=check_tia2,
    supports_folds=True,
    description="TextNorm tau / lambda / ensemble on stored TIA2 score matrices vs human labels (objective: mean "
    "AP@5/10/25 per set)",
)


# ---------------------------------------------------------------------------------------
# Best-of-n selection judged by held-out reward models
# ---------------------------------------------------------------------------------------


class BestOfNSweepOptions(StrictModel):
    run_dir: str = Field(
        ..., description="best-of-n run folder holding scores/<model_slug>.parquet (keys: prompt_id, sample)"
    )
    heldout_models: list[str] = Field(
        ...,
        min_length=1,
        description="judges: reward models (model ids) that score the selected images; never selectors",
    )
    selector_models: list[str] | None = Field(
        None,
        min_length=1,
        description="models the selecting reward may use (model ids); None = every other matrix of the run",
    )
    pool_size: int | None = Field(
        None,
        ge=1,
        description="select among the samples with index < pool_size (nested pools 16 < 64 < 256); None = all",
    )
    scale: Literal["zscore", "raw"] = Field(
        "zscore",
        description="judge scores averaged raw, or z-scored per judge over the pool (comparable across judges)",
    )


def prepare_bestofn(options: BestOfNSweepOptions, sweep) -> BestOfNScores:
    folds = sweep.heldout.folds if sweep.heldout else None
    seed = sweep.heldout.seed if sweep.heldout else 0
    return load_bestofn(
        options.run_dir, options.selector_models, options.heldout_models, options.pool_size, options.scale, folds, seed
    )


def evaluate_bestofn(params: dict[str, Any], data: BestOfNScores) -> dict[str, float]:
    """Mean judge score of the sample the reward selects per prompt (argmax over its pool)."""
    reward = compute_reward(data.values, data.models, reward_setting(params, data.models))
    keep = np.ones(len(data.index), bool)
    sub = split_mask(data.folds, *_split(params))
    if sub is not None:
        keep &= sub
    idx, pool = data.index[keep], data.pool[keep]
    ranked = np.where(pool, gather(reward, idx, -np.inf), -np.inf)  # padding is never in the pool
    chosen = np.take_along_axis(idx, ranked.argmax(axis=1)[:, None], axis=1)[:, 0]  # first sample on ties
    out: dict[str, float] = {"n_prompts": float(keep.sum())}
    for j, judge in enumerate(data.judges):
        pooled = np.where(pool, gather(data.judge_raw[j], idx, np.nan), np.nan)
        out[f"{judge}/selected"] = float(data.judge_raw[j, chosen].mean())
        out[f"{judge}/pool_mean"] = float(np.nanmean(np.nanmean(pooled, axis=1)))
    scaled = data.judge_scaled[:, chosen].mean(axis=1)
    out["objective"] = float(scaled.mean())
    # what a random pick from the pool scores on average: the baseline selection must beat
    pooled = np.stack(
        [np.where(pool, gather(data.judge_scaled[j], idx, np.nan), np.nan) for j in range(len(data.judges))]
    )
    out["random_objective"] = float(np.nanmean(np.nanmean(pooled, axis=2), axis=1).mean())
    return out


def check_bestofn(options: BestOfNSweepOptions, name: str, value: Any) -> str | None:
    available = find_matrices(f"{options.run_dir}/scores")
    judges = pick_models(available, options.heldout_models, "options.heldout_models")
    selectors = options.selector_models or [m for m in available if m not in judges]
    if name == "members" and isinstance(value, list):
        judged = [m for m in value if m in judges]
        if judged:
            return f"members {judged} are held-out judges (options.heldout_models); a judge must not select"
    return check_reward_param(selectors, name, value)


BESTOFN_SELECTION = SweepTrainable(
    name="bestofn_selection",
    kind="evaluate",
    fn=evaluate_bestofn,
    options=BestOfNSweepOptions,
    prepare=prepare_bestofn,
    check_param=check_bestofn,
    supports_folds=True,
    description="tau / lambda of the reward that selects the best of n samples, judged by held-out reward models",
)
