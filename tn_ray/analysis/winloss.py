"""Win / tie / loss of the images a study selected (the automatic analogue of the paper's Fig. 6), and the human
tallies of the labelling app's comparisons: pure pandas.

An image *wins* against its pair when it scores higher under a column, *ties* when equal and *loses* when lower;
``net`` = share of wins - share of losses (the mean of sign(a - b)), with a percentile bootstrap CI over the paired
units (:func:`tn_ray.analysis.goodhart.mean_ci`, units resampled in sorted order so an interval is a function of
the data). Pairs where either value is missing are left out.

- :func:`finetune`: per fine-tuning (method, kl, reward row) the images of the checkpoint the paper's rule selected
  vs the base model's image of the same (seed, prompt, eval seed), under every column its cells scored (the truth,
  other judges, the training reward); and per (method, kl) each reward row's selected images vs every later row's
  (grid order) at the same (seed, prompt, eval seed), under every column both cells scored. B vs A is the mirror of
  A vs B (wins and losses swapped, ``net`` negated), so each unordered pair is listed once.
- :func:`bestofn`: per (method, reward, n > 1) the truth of the top-1 pick vs the n = 1 pick (sample 0: one random
  image, the same for every row) of the same (seed, prompt); and each row vs every later row at equal n.
- :func:`human`: per (method, kl, reward row, criterion) the labelling app's answers to a cell's comparison task
  (the selected checkpoint's evaluation images vs the base model's, ``human_eval/``) from the checkpoint's side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from tn_ray.analysis.goodhart import format_ci, mean_ci

COLUMNS = [
    "kind",
    "method",
    "kl",
    "n",
    "a",
    "b",
    "column",
    "role",
    "pairs",
    "wins",
    "ties",
    "losses",
    "win",
    "tie",
    "loss",
    "net",
    "net_low",
    "net_high",
]
FT_UNIT = ["seed", "prompt_id", "eval_seed"]
BON_UNIT = ["seed", "prompt_id"]
BASE = "base"
RANDOM = "n=1 (random image)"
HUMAN_COLUMNS = [
    "method",
    "kl",
    "reward",
    "criterion",
    "cells",
    "steps",
    "answers",
    "wins",
    "ties",
    "losses",
    "win",
    "tie",
    "loss",
    "net",
]


def compare(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> dict:
    """Win / tie / loss of ``a`` against ``b`` (paired, in the units' order): counts, shares and ``net`` = win -
    loss with its bootstrap CI; pairs with a NaN are left out (no pair: shares NaN)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = ~(np.isnan(a) | np.isnan(b))
    sign = np.sign(a[keep] - b[keep])
    n = len(sign)
    wins, ties, losses = int((sign > 0).sum()), int((sign == 0).sum()), int((sign < 0).sum())
    if n == 0:
        nan = float("nan")
        return dict(pairs=0, wins=0, ties=0, losses=0, win=nan, tie=nan, loss=nan, net=nan, net_low=nan, net_high=nan)
    net, lo, hi = mean_ci(sign, confidence, resamples, seed)
    return dict(
        pairs=n,
        wins=wins,
        ties=ties,
        losses=losses,
        win=wins / n,
        tie=ties / n,
        loss=losses / n,
        net=net,
        net_low=lo,
        net_high=hi,
    )


def judged_images(scores: pd.DataFrame, base: pd.DataFrame) -> pd.DataFrame:
    """One fine-tuning cell's evaluation scores in long form, every column kept: step (0 = the base model),
    prompt_id, eval_seed, column, value (``scores`` / ``base`` as ``eval/scores`` and ``eval/base.parquet``)."""
    frames = [scores, base.assign(step=0)] if len(scores) else [base.assign(step=0)]
    rows = pd.concat([f[["step", "prompt_id", "seed", "reward", "value"]] for f in frames], ignore_index=True)
    rows = rows.rename(columns={"seed": "eval_seed", "reward": "column"})
    rows["step"] = rows["step"].astype("int64")
    return rows[["step", "prompt_id", "eval_seed", "column", "value"]]


def _role(column: str, truth: str, trains: Mapping[str, str]) -> str:
    """What a column is to the compared rows: the truth, a row's training reward (named), or another judge."""
    mine = [row for row, col in trains.items() if col == column]
    if column == truth:
        return "truth" + (f" (= {', '.join(mine)}'s training reward)" if mine else "")
    if mine:
        return f"{', '.join(mine)}'s training reward"
    return "judge"


def _row(kind: str, method, kl, n, a, b, column, role, result: dict) -> dict:
    return {"kind": kind, "method": method, "kl": kl, "n": n, "a": a, "b": b, "column": column, "role": role, **result}


def _frame(rows: list[dict]) -> pd.DataFrame:
    out = pd.DataFrame(rows, columns=COLUMNS)
    out["n"] = out["n"].astype("Int64")
    return out


def finetune(
    judged: pd.DataFrame,
    selected: Mapping[tuple, int],
    trains: Mapping[str, str],
    truth: str,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """:data:`COLUMNS` rows (``kind`` finetune, ``n`` null) from :func:`judged_images` rows of every cell (with
    method, reward, kl, seed); ``selected[(method, reward, kl, seed)]``: the step the paper's rule selected;
    ``trains``: reward row -> its training column. ``b`` = ``base`` for the rows vs the base model, else another
    row (rows in the order of ``trains``). ``ValueError`` when a selected step was not evaluated."""
    cell = ["method", "reward", "kl", "seed"]
    cells = judged[cell].drop_duplicates()
    chosen = [int(selected[k]) for k in cells.itertuples(index=False, name=None)]
    judged = judged.merge(cells.assign(selected=chosen), on=cell)
    hit = (judged["step"] == judged["selected"]).groupby([judged[c] for c in cell]).any()
    if not hit.all():
        key = hit.index[~hit.to_numpy()][0]
        raise ValueError(f"cell {key}: the selected step {int(selected[key])} was not evaluated")
    at = judged[judged["step"] == judged["selected"]].drop(columns=["step", "selected"])
    base = judged[judged["step"] == 0].drop(columns=["step", "selected"])
    rows = []
    pair = ["method", "reward", "kl", *FT_UNIT, "column"]
    both = at.merge(base, on=pair, suffixes=("", "_base")).sort_values(["method", "kl", "reward", "column", *FT_UNIT])
    for (method, kl, reward, column), g in both.groupby(["method", "kl", "reward", "column"], sort=True):
        result = compare(g["value"], g["value_base"], confidence, resamples, seed)
        role = _role(column, truth, {reward: trains[reward]})
        rows.append(_row("finetune", method, kl, None, reward, BASE, column, role, result))
    order = list(trains)
    for (method, kl), g in at.groupby(["method", "kl"], sort=True):
        present = [r for r in order if r in set(g["reward"])]
        for i, ra in enumerate(present):
            for rb in present[i + 1 :]:
                a = g[g["reward"] == ra].drop(columns=["reward", "method", "kl"])
                b = g[g["reward"] == rb].drop(columns=["reward", "method", "kl"])
                m = a.merge(b, on=[*FT_UNIT, "column"], suffixes=("_a", "_b")).sort_values(["column", *FT_UNIT])
                for column, c in m.groupby("column", sort=True):
                    result = compare(c["value_a"], c["value_b"], confidence, resamples, seed)
                    role = _role(column, truth, {ra: trains[ra], rb: trains[rb]})
                    rows.append(_row("finetune", method, kl, None, ra, rb, column, role, result))
    return _frame(rows)


def bestofn_base(rewards: pd.DataFrame, truth: str) -> pd.DataFrame:
    """Per prompt_id the truth of sample 0 (the n = 1 pool: one random image, the same for every row), from a
    best-of-n run's ``rewards.parquet``."""
    first = rewards[rewards["sample"] == 0]
    return pd.DataFrame({"prompt_id": first["prompt_id"].to_numpy(), "truth_base": first[truth].to_numpy()})


def bestofn(
    picks: pd.DataFrame,
    base: pd.DataFrame,
    rows_order: Sequence[str],
    truth: str,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """:data:`COLUMNS` rows (``kind`` bestofn, ``kl`` NaN, ``column`` = the truth) from
    :func:`tn_ray.analysis.study_report.picked` rows of every run (with method and seed) and :func:`bestofn_base`
    rows of every run (with method and seed): each row's pick at each n > 1 vs the n = 1 image, and each row vs
    every later row (``rows_order``) at equal n."""
    unit = ["method", *BON_UNIT]
    both = picks.merge(base, on=unit, how="left").sort_values(["method", "n", "reward", *BON_UNIT])
    rows = []
    for (method, n, reward), g in both[both["n"] > 1].groupby(["method", "n", "reward"], sort=True):
        result = compare(g["truth"], g["truth_base"], confidence, resamples, seed)
        rows.append(_row("bestofn", method, float("nan"), int(n), reward, RANDOM, truth, "truth", result))
    for (method, n), g in picks.groupby(["method", "n"], sort=True):
        present = [r for r in rows_order if r in set(g["reward"])]
        for i, ra in enumerate(present):
            for rb in present[i + 1 :]:
                a = g[g["reward"] == ra][[*BON_UNIT, "truth"]]
                b = g[g["reward"] == rb][[*BON_UNIT, "truth"]]
                m = a.merge(b, on=BON_UNIT, suffixes=("_a", "_b")).sort_values(BON_UNIT)
                result = compare(m["truth_a"], m["truth_b"], confidence, resamples, seed)
                rows.append(_row("bestofn", method, float("nan"), int(n), ra, rb, truth, "truth", result))
    return _frame(rows)


def human(outcomes: pd.DataFrame) -> pd.DataFrame:
    """:data:`HUMAN_COLUMNS` rows from :func:`tn_ray.labeling.tally.outcomes` rows of every cell's answers (with
    method, reward, kl, seed), where one side of each question is ``base`` and the other the checkpoint (``step
    N``): counts and shares from the checkpoint's side (``win``: the annotator preferred the checkpoint's images),
    ``net`` = win - loss, ``cells`` (cells with answers) and ``steps`` (the compared checkpoints, in seed order)."""
    if outcomes.empty:
        return pd.DataFrame(columns=HUMAN_COLUMNS)
    base_first = outcomes["reward_a"] == BASE
    if not (base_first | (outcomes["reward_b"] == BASE)).all():
        bad = outcomes[~(base_first | (outcomes["reward_b"] == BASE))].iloc[0]
        raise ValueError(f"question {bad['question']}: compares {bad['reward_a']} with {bad['reward_b']}, not {BASE}")
    mirror = {"win": "lose", "lose": "win", "tie": "tie"}
    side = np.where(base_first, outcomes["outcome"].map(mirror), outcomes["outcome"])
    ckpt = np.where(base_first, outcomes["reward_b"], outcomes["reward_a"])
    frame = outcomes.assign(side=side, checkpoint=ckpt)
    rows = []
    for (method, kl, reward, criterion), g in frame.groupby(["method", "kl", "reward", "criterion"], sort=True):
        n = len(g)
        wins, ties, losses = (int((g["side"] == o).sum()) for o in ("win", "tie", "lose"))
        steps = g.sort_values("seed").drop_duplicates("seed")["checkpoint"].str.removeprefix("step ")
        rows.append(
            {
                "method": method,
                "kl": kl,
                "reward": reward,
                "criterion": criterion,
                "cells": int(g["seed"].nunique()),
                "steps": ", ".join(steps),
                "answers": n,
                "wins": wins,
                "ties": ties,
                "losses": losses,
                "win": wins / n,
                "tie": ties / n,
                "loss": losses / n,
                "net": (wins - losses) / n,
            }
        )
    return pd.DataFrame(rows, columns=HUMAN_COLUMNS)


# --- report ---------------------------------------------------------------------------------


def _ci(mean: float, lo: float, hi: float) -> str:
    return "" if np.isnan(mean) else format_ci(mean, lo, hi)


def _share(v: float) -> str:
    return "" if np.isnan(v) else f"{v:.3f}"


def _view(table: pd.DataFrame, pct: int, grid_key: str) -> str:
    shown = pd.DataFrame(
        {
            "method": table["method"],
            grid_key: table["kl"].map(lambda k: f"{k:g}")
            if grid_key == "kl"
            else table["n"].map(lambda n: "" if pd.isna(n) else str(int(n))),
            "A": table["a"],
            "B": table["b"],
            "column": table["column"],
            "role": table["role"],
            "pairs": table["pairs"].astype(str),
            "A wins": table["win"].map(_share),
            "tie": table["tie"].map(_share),
            "B wins": table["loss"].map(_share),
            f"win - loss [{pct}% CI]": [_ci(*r) for r in table[["net", "net_low", "net_high"]].to_numpy(dtype=float)],
        }
    )
    return shown.to_markdown(index=False, disable_numparse=True)


def markdown(table: pd.DataFrame, truth: str, confidence: float) -> list[str]:
    """The automatic win / tie / loss section of report.md from :func:`finetune` and :func:`bestofn` rows."""
    pct = int(round(confidence * 100))
    lines = [
        f"## Win / tie / loss of the selected images (automatic; truth `{truth}`)",
        "",
        "The automatic analogue of the paper's Fig. 6. A wins when its image scores higher than B's paired image "
        "under the column, ties when equal; `win - loss` is the mean of sign(A - B) with a "
        f"{pct}% percentile bootstrap CI over the paired units; B vs A is the mirror (wins and losses swapped).",
        "",
    ]
    ft = table[table["kind"] == "finetune"]
    if len(ft):
        lines += [
            "### Fine-tuning: the checkpoint the paper's rule selected vs the base model, and reward rows vs each "
            "other",
            "",
            "Paired per (seed, prompt, eval seed): each cell at its own selected step; B = `base` is the base "
            "model's image, otherwise another reward row's selected image at the same method and kl. Every column "
            "the cells scored (the truth, other judges, the training rewards) is a row.",
            "",
            _view(ft, pct, "kl"),
            "",
        ]
    bon = table[table["kind"] == "bestofn"]
    if len(bon):
        lines += [
            "### Best-of-n: each reward's top-1 pick vs the n = 1 image and vs each other at equal n",
            "",
            f"Under the truth, paired per (seed, prompt); `{RANDOM}` is sample 0 of the pool, the same unselected "
            "image for every row.",
            "",
            _view(bon, pct, "n"),
            "",
        ]
    return lines


def human_markdown(table: pd.DataFrame | None, note: str) -> list[str]:
    """The human tallies section: the table from :func:`human`, or ``note`` (one line) when there is none."""
    lines = ["## Win / tie / loss by human raters (the labelling app's comparisons)", ""]
    if table is None or table.empty:
        return [*lines, note, ""]
    shown = pd.DataFrame(
        {
            "method": table["method"],
            "kl": table["kl"].map(lambda k: f"{k:g}"),
            "reward": table["reward"],
            "criterion": table["criterion"],
            "cells": table["cells"].astype(str),
            "steps": table["steps"],
            "answers": table["answers"].astype(str),
            "checkpoint wins": [f"{w} ({r:.3f})" for w, r in zip(table["wins"], table["win"])],
            "tie": [f"{w} ({r:.3f})" for w, r in zip(table["ties"], table["tie"])],
            "base wins": [f"{w} ({r:.3f})" for w, r in zip(table["losses"], table["loss"])],
            "win - loss": table["net"].map(lambda v: f"{v:+.3f}"),
        }
    )
    return [
        *lines,
        "Each fine-tuning cell's blinded comparison (`human_eval/`): per prompt, the selected checkpoint's evaluation "
        "images vs the base model's; counts (shares) from the checkpoint's side, over every annotator's answer. "
        + note,
        "",
        shown.to_markdown(index=False, disable_numparse=True),
        "",
    ]
