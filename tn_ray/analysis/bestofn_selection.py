"""Best-of-n selection over nested pools, and the overoptimization summary: pure pandas.

Input: a reward table with one row per image (``prompt_id``, ``sample`` and one column per
reward: each raw model, its TextNorm, each ensemble). The pool of size n of a prompt is its
samples ``0..n-1``, so the pools are nested (16 within 64 within 256) and one generation
serves every n. Ties are broken by the lower sample index, so a selection is reproducible.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from tn_ray.analysis.goodhart import mean_ci


def check_table(rewards: pd.DataFrame, reward_names: Sequence[str], pools: Sequence[int]) -> None:
    missing = [c for c in ["prompt_id", "sample", *reward_names] if c not in rewards.columns]
    if missing:
        raise KeyError(f"reward table lacks columns {missing}")
    bad = [c for c in reward_names if not np.isfinite(rewards[c].to_numpy(dtype=float)).all()]
    if bad:
        raise ValueError(f"reward columns {bad} contain NaN or infinite values; selection would be ill-defined")
    counts = rewards[rewards["sample"] < max(pools)].groupby("prompt_id")["sample"].nunique()
    short = counts[counts < max(pools)]
    if len(short):
        raise ValueError(f"{len(short)} prompts have fewer than {max(pools)} samples (e.g. prompt_id "
                         f"{int(short.index[0])}: {int(short.iloc[0])}); pools need samples 0..n-1")


def select(rewards: pd.DataFrame, reward_names: Sequence[str], pools: Sequence[int], ks: Sequence[int]) -> pd.DataFrame:
    """Top-k images per prompt, reward and pool size.

    Returns one row per (prompt_id, reward, n, k, rank) with the selected ``sample`` and its
    ``value`` under the selecting reward; rank 0 is the best.
    """
    check_table(rewards, reward_names, pools)
    long = rewards.melt(
        id_vars=["prompt_id", "sample"], value_vars=list(reward_names), var_name="reward", value_name="value"
    )
    kmax = max(ks)
    out = []
    for n in sorted(pools):
        pool = long[long["sample"] < n].sort_values(
            ["reward", "prompt_id", "value", "sample"], ascending=[True, True, False, True], kind="mergesort"
        )
        pool = pool.assign(rank=pool.groupby(["reward", "prompt_id"], sort=False).cumcount())
        top = pool[pool["rank"] < kmax]
        for k in sorted(ks):
            out.append(top[top["rank"] < k].assign(n=n, k=k))
    sel = pd.concat(out, ignore_index=True)
    order = {r: i for i, r in enumerate(reward_names)}
    sel = sel.sort_values(
        ["prompt_id", "reward", "n", "k", "rank"], key=lambda c: c.map(order) if c.name == "reward" else c
    )
    return sel[["prompt_id", "reward", "n", "k", "rank", "sample", "value"]].reset_index(drop=True)


def summary(rewards: pd.DataFrame, selections: pd.DataFrame, reward_names: Sequence[str]) -> pd.DataFrame:
    """Mean (over prompts) of every judge reward of the top-1 image chosen by every selector.

    One row per (selector, n, judge): ``mean``, its standard error ``sem`` and ``n_prompts``.
    n = 1 (the pool {sample 0}: an unselected image, the same for every selector) is the
    baseline. Selecting with one reward and judging with another shows over-optimization:
    the selector's own reward rises with n by construction, the others may not.
    """
    top1 = selections[(selections["k"] == 1) & (selections["rank"] == 0)][["prompt_id", "reward", "n", "sample"]]
    first = rewards.loc[rewards["sample"] == 0, ["prompt_id", "sample"]]
    base = pd.concat([first.assign(reward=r, n=1) for r in reward_names], ignore_index=True)
    chosen = pd.concat([base, top1], ignore_index=True).rename(columns={"reward": "selector"})
    judged = chosen.merge(rewards[["prompt_id", "sample", *reward_names]], on=["prompt_id", "sample"], how="left")
    long = judged.melt(
        id_vars=["selector", "n", "prompt_id"], value_vars=list(reward_names), var_name="judge", value_name="v"
    )
    g = long.groupby(["selector", "n", "judge"], sort=False)["v"]
    table = (
        g.mean()
        .rename("mean")
        .to_frame()
        .join(g.sem(ddof=1).rename("sem"))
        .join(g.size().rename("n_prompts"))
        .reset_index()
    )
    order = {r: i for i, r in enumerate(reward_names)}
    return table.sort_values(
        ["judge", "selector", "n"],
        key=lambda c: c.map(order) if c.name in ("judge", "selector") else c,
        kind="mergesort",
    ).reset_index(drop=True)


def summary_markdown(table: pd.DataFrame) -> str:
    """One table per judge: rows = selector, columns = n (mean selected reward)."""
    lines = [
        "# Best-of-n: mean reward of the selected image (top-1), per judge",
        "",
        "Rows select, the table's judge scores; n = 1 is an unselected image (sample 0), the same for every row. "
        "A selector's own reward rises with n by construction; the other judges show whether "
        "the gain transfers or the selector over-optimizes.",
        "",
    ]
    for judge, g in table.groupby("judge", sort=False):
        wide = g.pivot_table(index="selector", columns="n", values="mean", sort=False)
        wide.columns = [f"n={c}" for c in wide.columns]
        lines += [f"## judged by {judge}", "", wide.reset_index().to_markdown(index=False, floatfmt=".4g"), ""]
    return "\n".join(lines)


def gain_over_base(
    rewards: pd.DataFrame, selections: pd.DataFrame, selector: str, judge: str, n: int, confidence: float = 0.95
) -> tuple[float, float, float, float, float]:
    """(base, top-1, gain, low, high): the judge's mean over prompts of the base model's images (every
    sample of the pool: the expected value of one unselected image), of the top-1 image ``selector``
    picks from the first ``n``, and their paired difference over prompts with a bootstrap CI
    (:func:`tn_ray.analysis.goodhart.mean_ci`)."""

    base = rewards.groupby("prompt_id")[judge].mean()
    top = selections[(selections["reward"] == selector) & (selections["n"] == n) & (selections["k"] == 1)
                     & (selections["rank"] == 0)]
    picked = top.merge(rewards[["prompt_id", "sample", judge]], on=["prompt_id", "sample"])
    picked = picked.set_index("prompt_id")[judge]
    diff = (picked - base.reindex(picked.index)).sort_index()
    mean, lo, hi = mean_ci(diff.to_numpy(), confidence)
    return float(base.mean()), float(picked.mean()), mean, lo, hi
