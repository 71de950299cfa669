"""The paper's checkpoint selection rule, on evaluation tables.

For every evaluated checkpoint and reward column, count the evaluation images (one per
(prompt, seed)) that score higher than the base model's image of the same (prompt, seed).
The selected checkpoint is the *earliest* one at which the count under the selection judge
reaches its maximum.

Tables: ``scores`` has columns step, prompt_id, seed, reward (column name), value; ``base``
the same without step (the base model's images, generated once).
"""
from __future__ import annotations

import pandas as pd

KEYS = ["prompt_id", "seed", "reward"]


def win_counts(scores: pd.DataFrame, base: pd.DataFrame) -> pd.DataFrame:
    """Per (step, reward): ``wins`` (images beating the base image of their (prompt, seed), strictly),
    ``images`` (compared), ``mean`` (the checkpoint's mean value) and ``base_mean``."""
    merged = scores.merge(base[KEYS + ["value"]].rename(columns={"value": "base_value"}), on=KEYS, how="left",
                          validate="many_to_one")
    missing = merged["base_value"].isna()
    if missing.any():
        row = merged[missing].iloc[0]
        raise ValueError(f"no base-model score for prompt_id {row['prompt_id']}, seed {row['seed']}, reward {row['reward']!r}")
    merged["win"] = merged["value"] > merged["base_value"]
    out = merged.groupby(["step", "reward"], sort=True).agg(
        wins=("win", "sum"), images=("win", "size"), mean=("value", "mean"), base_mean=("base_value", "mean"))
    out = out.reset_index()
    out["wins"] = out["wins"].astype("int64")
    return out


def select_checkpoint(counts: pd.DataFrame, judge: str) -> int:
    """The earliest step whose win count under ``judge`` is the maximum over all steps."""
    rows = counts[counts["reward"] == judge]
    if rows.empty:
        raise ValueError(f"no evaluation counts for judge {judge!r}; rewards evaluated: {sorted(counts['reward'].unique())}")
    best = rows["wins"].max()
    return int(rows.loc[rows["wins"] == best, "step"].min())
