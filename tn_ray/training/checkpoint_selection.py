"""The paper's checkpoint selection rule, on evaluation tables, and the judges' view beside it.

The paper (Section 5): "We choose the earliest checkpoint at which the number of generated
images with higher scores, *as measured by the reward model*, than those generated using SD
v2.1 reaches the maximum. Hence, a better aligned reward model improves fine-tuning by
providing (a) more aligned signals for optimization and (b) a better measure based on which
to select checkpoints." The reward model is the one training optimizes, so the rule's column
is the **training reward**.

For every evaluated checkpoint and reward column, count the evaluation images (one per
(prompt, seed)) that score strictly higher than the base model's image of the same (prompt,
seed). The selected checkpoint is the *earliest* one at which the count under the selection
column reaches its maximum: by default the training reward (the paper's rule); ``eval.select_by``
may name a held-out judge instead (an override, reported as *not* the paper's rule). Judges
stay monitors: :func:`selection_summary` reports, for each judge, its own earliest-maximum
checkpoint and its counts and means at the selected checkpoint.

Tables: ``scores`` has columns step, prompt_id, seed, reward (column name), value; ``base``
the same without step (the base model's images, generated once).
"""
from __future__ import annotations

from typing import Any

import pandas as pd

KEYS = ["prompt_id", "seed", "reward"]

PAPER_RULE = ("the paper's rule (Section 5): the earliest checkpoint at which the number of evaluation images scoring "
              "higher than the base model's image of the same (prompt, seed), as measured by the training reward, "
              "reaches its maximum")


def win_counts(scores: pd.DataFrame, base: pd.DataFrame) -> pd.DataFrame:
    """Per (step, reward): ``wins`` (images beating the base image of their (prompt, seed), strictly),
    ``images`` (compared), ``mean`` (the checkpoint's mean value) and ``base_mean``."""
    merged = scores.merge(base[KEYS + ["value"]].rename(columns={"value": "base_value"}), on=KEYS, how="left",
                          validate="many_to_one")
    missing = merged["base_value"].isna()
    if missing.any():
        row = merged[missing].iloc[0]
        raise ValueError(f"no base-model score for prompt_id {row['prompt_id']}, seed {row['seed']}, reward "
                         f"{row['reward']!r}")
    merged["win"] = merged["value"] > merged["base_value"]
    out = merged.groupby(["step", "reward"], sort=True).agg(
        wins=("win", "sum"), images=("win", "size"), mean=("value", "mean"), base_mean=("base_value", "mean"))
    out = out.reset_index()
    out["wins"] = out["wins"].astype("int64")
    return out


def select_checkpoint(counts: pd.DataFrame, column: str) -> int:
    """The earliest step whose win count under ``column`` is the maximum over all steps."""
    rows = counts[counts["reward"] == column]
    if rows.empty:
        raise ValueError(f"no evaluation counts for column {column!r}; rewards evaluated: "
                         f"{sorted(counts['reward'].unique())}")
    best = rows["wins"].max()
    return int(rows.loc[rows["wins"] == best, "step"].min())


def _at(counts: pd.DataFrame, column: str, step: int) -> dict[str, Any]:
    row = counts[(counts["reward"] == column) & (counts["step"] == step)].iloc[0]
    return {
        "wins": int(row["wins"]),
        "images": int(row["images"]),
        "mean": float(row["mean"]),
        "base_mean": float(row["base_mean"]),
    }


def _view(counts: pd.DataFrame, column: str, selected: int) -> dict[str, Any]:
    rows = counts[counts["reward"] == column].sort_values("step")
    own = select_checkpoint(counts, column)
    return {
        "earliest_max_step": own,
        "wins_at_earliest_max": int(rows.loc[rows["step"] == own, "wins"].iloc[0]),
        "counts": {int(s): int(w) for s, w in rows[["step", "wins"]].itertuples(index=False)},
        "at_selected": _at(counts, column, selected),
    }


def selection_summary(
    counts: pd.DataFrame, train_reward: str, judges: list[str], select_by: str | None = None
) -> dict[str, Any]:
    """The selection and both views. ``counts``: :func:`win_counts` rows of the evaluated checkpoints
    (steps > 0). ``select_by`` None (or the training reward) = the paper's rule."""
    column = select_by or train_reward
    paper = column == train_reward
    selected = select_checkpoint(counts, column)
    paper_step = select_checkpoint(counts, train_reward)
    at = _at(counts, column, selected)
    if paper:
        rule = PAPER_RULE
    else:
        rule = (
            "eval.select_by override: the earliest checkpoint with the most evaluation images beating the base "
            "model's "
            f"image of the same (prompt, seed) under the judge {column!r}; NOT the paper's rule, which counts "
            "under "
            f"the training reward {train_reward!r} (it selects step {paper_step})"
        )
    return {
        "selected_by": column,
        "role": "training reward" if paper else "judge",
        "paper_rule": paper,
        "rule": rule,
        "step": selected,
        "wins": at["wins"],
        "images": at["images"],
        "paper_rule_step": paper_step,
        "counts": _view(counts, column, selected)["counts"],
        "training_reward": {"column": train_reward, **_view(counts, train_reward, selected)},
        "judges": {j: _view(counts, j, selected) for j in judges},
    }


def describe_selection(sel: dict[str, Any], unit: str = "step") -> list[str]:
    """Printable lines: the selection (saying whether it is the paper's rule) and the judges' view."""
    tr = sel["training_reward"]
    if sel["paper_rule"]:
        lines = [
            f"selected checkpoint: {unit} {sel['step']}, by the training reward {sel['selected_by']} (the paper's "
            "rule): "
            f"{sel['wins']} of {sel['images']} evaluation images beat the base model's"
        ]
    else:
        lines = [
            f"selected checkpoint: {unit} {sel['step']}, by the judge {sel['selected_by']} (eval.select_by "
            "override, "
            f"not the paper's rule): {sel['wins']} of {sel['images']} evaluation images beat the base model's; "
            f"the paper's rule (training reward {tr['column']}) selects {unit} {sel['paper_rule_step']}"
        ]
    for name, view in sel["judges"].items():
        a = view["at_selected"]
        role = "selects: the override" if name == sel["selected_by"] else "monitor"
        lines.append(
            f"  judge {name} ({role}): its own earliest maximum is {unit} {view['earliest_max_step']} "
            f"({view['wins_at_earliest_max']} of {a['images']}); at {unit} {sel['step']}: {a['wins']} of "
            f"{a['images']} beat the base model's, mean {a['mean']:.4g} vs base {a['base_mean']:.4g}"
        )
    return lines
