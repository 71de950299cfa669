"""Held-out evaluation of learned rewards against their frozen backbone.

For the validation and test prompts, each reward's score matrix (rows = images, columns =
[x0, x1..xm]) becomes reward columns through :func:`tn_ray.textnorm.columns.reward_columns`
(the raw reward and ``textnorm(...)``), and the columns are judged per prompt and per set by
:mod:`tn_ray.analysis.metrics` (AUROC, AUPRC, AP@k, Spearman, Kendall). Calibration (ECE
and the reliability diagram) is reported for the learned rewards, whose output is a
probability of "good" (sigmoid for a bce head, clipped for an mse head).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from tn_ray.analysis import metrics
from tn_ray.reward_learning.calibration import expected_calibration_error, reliability
from tn_ray.reward_learning.losses import probability
from tn_ray.reward_learning.train import batch_rewards
from tn_ray.textnorm.columns import SetParams, reward_columns

KEYS = ["set", "prompt", "image_id", "binary", "fine"]


def head_matrix(head, arrays, rows: np.ndarray) -> np.ndarray:
    """(rows, 1 + max m) rewards of a head for each row's [x0, x1..xm], NaN-padded."""
    import torch

    head.eval()
    with torch.no_grad():
        r, mask = batch_rewards(head, arrays, rows)
    return np.where(mask.cpu().numpy(), r.cpu().numpy().astype(np.float64), np.nan)


def evaluate(keys: pd.DataFrame, values: Mapping[str, np.ndarray], kinds: Mapping[str, str], tau: float,
             bins: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, pd.DataFrame]]:
    """(rewards per image, per-prompt metrics, per-set metrics + ECE, reliability tables).

    ``values[name]`` is a reward's score matrix over ``keys``' rows; ``kinds[name]`` the loss
    kind of a learned reward (its calibration is reported), absent for a backbone.
    """
    table = keys[KEYS].reset_index(drop=True).copy()
    columns = reward_columns(dict(values), SetParams(tau=tau))
    for name, col in columns.items():
        table[name] = col
    names = list(columns)
    prompt_table = metrics.per_prompt(table, names)
    set_table = metrics.per_set(prompt_table)
    curves: dict[str, pd.DataFrame] = {}
    ece_rows = []
    for name, kind in kinds.items():
        prob = probability(table[name].to_numpy(), kind)
        curves[name] = reliability(prob, table["binary"].to_numpy(), bins)
        for set_name, g in table.assign(_p=prob).groupby("set", sort=False):
            ece_rows.append(
                {"set": set_name, "reward": name, "ece": expected_calibration_error(g["_p"], g["binary"], bins)}
            )
        ece_rows.append({"set": "all", "reward": name, "ece": expected_calibration_error(prob, table["binary"], bins)})
    if ece_rows:
        set_table = set_table.merge(pd.DataFrame(ece_rows), on=["set", "reward"], how="left")
    overall = pd.DataFrame(
        [
            {
                "set": "all",
                "reward": r,
                "n_prompts": int((prompt_table["reward"] == r).sum()),
                **prompt_table.loc[prompt_table["reward"] == r, list(metrics.METRICS)].mean().to_dict(),
                "ece": next((e["ece"] for e in ece_rows if e["set"] == "all" and e["reward"] == r), np.nan),
            }
            for r in names
        ]
    )
    return table, prompt_table, pd.concat([set_table, overall], ignore_index=True), curves
