"""The fine-tuning grid against exact truth (``tn-ray study``, ``world finetune``): its tables and plots, pure pandas.

A cell of the grid is one fine-tuning run (method x training reward x KL coefficient x seed). Its
evaluations hold, per checkpoint step and per evaluation image (prompt_id, eval_seed), the value of
the training reward and of the truth column (a judge that is 1 when the image matches its prompt,
0 when not; its mean is the accuracy); step 0 is the base model, whose images share the prompts and
eval seeds of every checkpoint's, so each image is paired with the base model's image of the same
(prompt, eval seed). Nothing here reads a file or loads a model: the runner
(:mod:`tn_ray.experiments.study.run_tables`) reads the cells' folders and passes the tables in.

Tables (``KEYS`` = method, reward (the row's name), kl: one combination of the grid; ``seed``: the cell's training
seed):

- :func:`cell_images`: one cell's images, one row per (step, prompt_id, eval_seed) with ``truth``,
  ``train`` (the training reward's value), the base model's ``truth_base`` / ``train_base`` and ``path_kl``;
- :func:`curve`: per (KEYS, step): the truth's mean (mean over seeds of each cell's mean), its paired
  difference from the base model with a bootstrap CI over (seed, prompt, eval seed), and the training
  reward's mean, its difference from the base model and its win rate (the share of images beating the
  base model's: what the paper's checkpoint rule counts);
- :func:`cell_table`: per cell, the checkpoint the paper's rule selected (read from its
  ``selection.json``), the truth's own best checkpoint (the earliest step > 0 of the highest truth
  mean: an oracle no real run has) and the last one, with the truth's mean at each;
- :func:`selection_table`: per KEYS, those means over seeds, the paired differences from the base
  model at each with their CIs, and the regret of the paper's rule (truth at the oracle's checkpoint
  minus truth at the selected one);
- :func:`versus`: per (method, kl) and reward row, the paired difference in truth from a reference row (the
  grid's first), each cell at the checkpoint the paper's rule selected, over the (seed, prompt, eval seed)
  images both rows evaluated.

CIs are :func:`tn_ray.analysis.goodhart.mean_ci` (percentile bootstrap, seeded).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from tn_ray.analysis.goodhart import format_ci, mean_ci

KEYS = ["method", "reward", "kl"]
IMAGE = ["step", "prompt_id", "eval_seed"]
LINE_STYLES = ["-", "--", ":", "-."]


def cell_images(
    scores: pd.DataFrame, base: pd.DataFrame, train: str, truth: str, path_kl: pd.DataFrame | None = None
) -> pd.DataFrame:
    """One cell's evaluation images, step 0 = the base model (see the module doc).

    ``scores``: rows step, prompt_id, seed (the eval seed), reward (column name), value of every
    evaluated checkpoint; ``base``: the same without step. ``train`` and ``truth`` name the training
    reward's and the truth's columns (the same name when the cell trains on the truth). ``path_kl``:
    rows step, prompt_id, seed, path_kl where the cell recorded them (None or empty: NaN; the base
    model's own path KL is 0). ``ValueError`` naming a missing column or a checkpoint image with no
    base-model image."""
    frames = [scores, base.assign(step=0)] if len(scores) else [base.assign(step=0)]
    rows = pd.concat([f[["step", "prompt_id", "seed", "reward", "value"]] for f in frames], ignore_index=True)
    rows = rows.rename(columns={"seed": "eval_seed"})
    wide = rows[rows["reward"].isin([train, truth])].pivot(index=IMAGE, columns="reward", values="value")
    for role, name in (("truth", truth), ("training reward", train)):
        if name not in wide.columns or wide[name].isna().any():
            step = 0 if name not in wide.columns else int(wide.index[wide[name].isna().to_numpy()][0][0])
            found = sorted(set(rows.loc[rows["step"] == step, "reward"]))
            where = "the base model's images" if step == 0 else f"step {step}"
            raise ValueError(f"the {role} column {name!r} is missing at {where} (columns there: {found})")
    out = pd.DataFrame({"truth": wide[truth], "train": wide[train]}).reset_index()
    at_base = out[out["step"] == 0].set_index(["prompt_id", "eval_seed"])
    key = pd.MultiIndex.from_frame(out[["prompt_id", "eval_seed"]])
    if not key.isin(at_base.index).all():
        row = out[~key.isin(at_base.index)].iloc[0]
        raise ValueError(f"no base-model image for prompt_id {row['prompt_id']}, eval seed {row['eval_seed']}")
    out["truth_base"] = at_base["truth"].reindex(key).to_numpy()
    out["train_base"] = at_base["train"].reindex(key).to_numpy()
    out["path_kl"] = np.where(out["step"] == 0, 0.0, np.nan)
    if path_kl is not None and len(path_kl):
        kl = path_kl.rename(columns={"seed": "eval_seed"}).set_index(IMAGE)["path_kl"]
        measured = kl.reindex(pd.MultiIndex.from_frame(out[IMAGE])).to_numpy(dtype=float)
        out["path_kl"] = np.where(np.isnan(measured), out["path_kl"], measured)
    return out.sort_values(IMAGE).reset_index(drop=True)


def _cell_means(images: pd.DataFrame) -> pd.DataFrame:
    """Per (KEYS, seed, step): each cell's mean truth, mean training reward and win rate."""
    return (
        images.assign(win=images["train"] > images["train_base"])
        .groupby([*KEYS, "seed", "step"], sort=True)
        .agg(truth=("truth", "mean"), train=("train", "mean"), wins=("win", "mean"))
        .reset_index()
    )


def _diff(rows: pd.DataFrame, confidence: float, resamples: int, seed: int) -> tuple[float, float, float]:
    """Mean of truth - truth_base over the rows (one per (seed, prompt, eval seed)) with its CI; the units are
    resampled in (seed, prompt_id, eval_seed) order, so the interval is a function of the data alone."""
    rows = rows.sort_values(["seed", "prompt_id", "eval_seed"])
    return mean_ci((rows["truth"] - rows["truth_base"]).to_numpy(), confidence, resamples, seed)


def curve(images: pd.DataFrame, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per (KEYS, step), from :func:`cell_images` rows of every cell (with KEYS and ``seed``): ``seeds``
    (cells evaluated at that step), ``images``, ``truth`` (mean over seeds of each cell's mean),
    ``truth_diff`` [``truth_diff_low``, ``truth_diff_high``] (paired difference from the base model,
    bootstrap CI over (seed, prompt, eval seed)), ``train`` (the training reward's mean over seeds),
    ``train_diff`` (its mean difference from the base model's image), ``train_wins`` (the share of
    images scoring higher than the base model's under the training reward, mean over seeds) and
    ``path_kl`` (mean over the images that have one; NaN when none)."""
    means = dict(iter(_cell_means(images).groupby([*KEYS, "step"], sort=True)))
    rows = []
    for key, g in images.groupby([*KEYS, "step"], sort=True):
        m = means[key]
        diff, lo, hi = _diff(g, confidence, resamples, seed)
        kl = g["path_kl"].dropna()
        rows.append(
            {
                **dict(zip([*KEYS, "step"], key)),
                "seeds": int(g["seed"].nunique()),
                "images": len(g),
                "truth": float(m["truth"].mean()),
                "truth_diff": diff,
                "truth_diff_low": lo,
                "truth_diff_high": hi,
                "train": float(m["train"].mean()),
                "train_diff": float((g["train"] - g["train_base"]).mean()),
                "train_wins": float(m["wins"].mean()),
                "path_kl": float(kl.mean()) if len(kl) else float("nan"),
            }
        )
    out = pd.DataFrame(rows)
    out["step"] = out["step"].astype("int64")
    return out


def cell_table(images: pd.DataFrame, selected: Mapping[tuple, int]) -> pd.DataFrame:
    """Per cell (KEYS + seed): ``selected`` (the step of the paper's rule, from ``selected[(method,
    reward, kl, seed)]``), ``best`` (the earliest step > 0 with the highest truth mean), ``final`` (the
    last evaluated step), the truth's mean at the base model and at each of the three, and the training
    reward's win rate at the selected step. ``ValueError`` when a selected step was not evaluated."""
    means = _cell_means(images)
    rows = []
    for key, g in means.groupby([*KEYS, "seed"], sort=True):
        at = g.set_index("step")
        ckpts = at[at.index > 0]
        step = int(selected[key])
        if step not in ckpts.index:
            raise ValueError(
                f"cell {key}: the selected step {step} is not among its evaluated steps {sorted(ckpts.index.tolist())}"
            )
        best = int(ckpts.index[ckpts["truth"].to_numpy() == ckpts["truth"].max()].min())
        final = int(ckpts.index.max())
        rows.append(
            {
                **dict(zip([*KEYS, "seed"], key)),
                "selected": step,
                "best": best,
                "final": final,
                "truth_base": float(at.loc[0, "truth"]),
                "truth_selected": float(at.loc[step, "truth"]),
                "truth_best": float(at.loc[best, "truth"]),
                "truth_final": float(at.loc[final, "truth"]),
                "train_wins_selected": float(at.loc[step, "wins"]),
            }
        )
    return pd.DataFrame(rows)


def selection_table(
    images: pd.DataFrame, cells: pd.DataFrame, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Per KEYS, over its cells (:func:`cell_table`): ``seeds``, the steps chosen per seed (``selected``,
    ``best``, ``final``, comma-separated in seed order), the truth's mean over seeds at the base model and
    at each, the paired difference from the base model at each with its bootstrap CI over (seed, prompt,
    eval seed) (each cell at its own step), ``regret`` (truth at the oracle's checkpoint minus at the
    selected one, mean over seeds) and the training reward's win rate at the selected step."""
    rows = []
    for key, g in cells.groupby(KEYS, sort=True):
        g = g.sort_values("seed")
        row: dict = {**dict(zip(KEYS, key)), "seeds": len(g)}
        for which in ("selected", "best", "final"):
            row[f"{which}_steps"] = ", ".join(str(int(s)) for s in g[which])
        row["truth_base"] = float(g["truth_base"].mean())
        for which in ("selected", "best", "final"):
            at = g[[*KEYS, "seed", which]].rename(columns={which: "step"})
            paired = images.merge(at, on=[*KEYS, "seed", "step"])
            diff, lo, hi = _diff(paired, confidence, resamples, seed)
            row.update(
                {
                    f"truth_{which}": float(g[f"truth_{which}"].mean()),
                    f"diff_{which}": diff,
                    f"diff_{which}_low": lo,
                    f"diff_{which}_high": hi,
                }
            )
        row["regret"] = float((g["truth_best"] - g["truth_selected"]).mean())
        row["train_wins_selected"] = float(g["train_wins_selected"].mean())
        rows.append(row)
    return pd.DataFrame(rows)


VERSUS = ["method", "kl", "reward", "reference", "pairs", "truth", "truth_reference", "diff", "low", "high"]


def versus(
    images: pd.DataFrame,
    cells: pd.DataFrame,
    reference: str,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Per (method, kl, reward other than ``reference``): each cell's images at its selected step
    (:func:`cell_table`'s ``selected``) paired with the ``reference`` row's cell of the same method, kl and seed
    at that cell's selected step, image by image on (prompt_id, eval_seed): ``pairs`` (the images both have),
    the two rows' truth means over those, ``diff`` [``low``, ``high``]: mean of truth - the reference's truth,
    bootstrap CI resampled in (seed, prompt_id, eval_seed) order. A (method, kl) without the reference row
    has no rows."""
    at = cells[[*KEYS, "seed", "selected"]].rename(columns={"selected": "step"})
    chosen = images.merge(at, on=[*KEYS, "seed", "step"])[[*KEYS, "seed", "prompt_id", "eval_seed", "truth"]]
    unit = ["method", "kl", "seed", "prompt_id", "eval_seed"]
    ref = chosen[chosen["reward"] == reference].drop(columns="reward").rename(columns={"truth": "truth_reference"})
    rows = []
    others = chosen[chosen["reward"] != reference]
    for (method, kl, reward), g in others.groupby(["method", "kl", "reward"], sort=True):
        paired = g.merge(ref, on=unit).sort_values(["seed", "prompt_id", "eval_seed"])
        if paired.empty:
            continue
        diff, lo, hi = mean_ci((paired["truth"] - paired["truth_reference"]).to_numpy(), confidence, resamples, seed)
        rows.append(
            {
                "method": method,
                "kl": kl,
                "reward": reward,
                "reference": reference,
                "pairs": len(paired),
                "truth": float(paired["truth"].mean()),
                "truth_reference": float(paired["truth_reference"].mean()),
                "diff": diff,
                "low": lo,
                "high": hi,
            }
        )
    return pd.DataFrame(rows, columns=VERSUS)


# --- report ---------------------------------------------------------------------------------


def _label(frame: pd.DataFrame) -> pd.Series:
    return frame["method"] + " / " + frame["reward"] + " / kl " + frame["kl"].map(lambda k: f"{k:g}")


def markdown(
    summary: pd.DataFrame,
    curve_rows: pd.DataFrame,
    truth: str,
    confidence: float,
    header: Sequence[str] = (),
    pairs: pd.DataFrame | None = None,
) -> str:
    """report.md: the selection table, the reward rows against the first (``pairs``: :func:`versus`) and the
    curves (truth, its paired difference, the training reward), every number formatted from the tables given
    (the CSV / JSON files hold the same tables unformatted)."""
    pct = int(round(confidence * 100))
    sel = pd.DataFrame(
        {
            "method": summary["method"],
            "reward": summary["reward"],
            "kl": summary["kl"].map(lambda k: f"{k:g}"),
            "seeds": summary["seeds"].astype(str),
            "base": summary["truth_base"].map(lambda v: f"{v:.3f}"),
            "selected steps": summary["selected_steps"],
            "truth at selected": summary["truth_selected"].map(lambda v: f"{v:.3f}"),
            f"vs base [{pct}% CI]": [
                format_ci(*r) for r in summary[["diff_selected", "diff_selected_low", "diff_selected_high"]].to_numpy()
            ],
            "truth's best steps": summary["best_steps"],
            "truth at best": summary["truth_best"].map(lambda v: f"{v:.3f}"),
            "regret": summary["regret"].map(lambda v: f"{v:.3f}"),
            "final steps": summary["final_steps"],
            "truth at final": summary["truth_final"].map(lambda v: f"{v:.3f}"),
            f"final vs base [{pct}% CI]": [
                format_ci(*r) for r in summary[["diff_final", "diff_final_low", "diff_final_high"]].to_numpy()
            ],
            "train wins at selected": summary["train_wins_selected"].map(lambda v: f"{v:.3f}"),
        }
    )
    labelled = curve_rows.assign(run=_label(curve_rows))

    def pivot(values: pd.Series) -> str:
        table = labelled.assign(v=values).pivot(index="run", columns="step", values="v")
        table.columns = ["base" if s == 0 else f"step {s}" for s in table.columns]
        return table.fillna("").reset_index().to_markdown(index=False, disable_numparse=True)

    diff = [format_ci(*r) for r in curve_rows[["truth_diff", "truth_diff_low", "truth_diff_high"]].to_numpy()]
    lines = [
        "# Fine-tuning against exact truth",
        "",
        *header,
        "",
        f"## Truth ({truth}) at the checkpoint the paper's rule selected, at the truth's own best and at the last",
        "",
        "Means over seeds; `vs base`: paired difference from the base model's image of the same (seed, prompt, eval "
        f"seed), {pct}% percentile bootstrap CI over those; `regret`: truth at the truth's own best checkpoint (an "
        "oracle) minus truth at the selected one; `train wins`: share of images beating the base model's under the "
        "training reward (what the paper's rule counts).",
        "",
        sel.to_markdown(index=False, disable_numparse=True),
        "",
        *_versus_lines(pairs, truth, pct),
        f"## Truth ({truth}) vs step (mean over seeds; base = the base model)",
        "",
        pivot(curve_rows["truth"].map(lambda v: f"{v:.3f}")),
        "",
        f"## Truth vs the base model, paired [{pct}% CI over (seed, prompt, eval seed)]",
        "",
        pivot(pd.Series(diff, index=curve_rows.index)),
        "",
        "## The training reward vs step (mean over seeds, each row in its own reward's units)",
        "",
        pivot(curve_rows["train"].map(lambda v: f"{v:.4g}")),
        "",
        "## The training reward's win rate over the base model vs step",
        "",
        pivot(curve_rows["train_wins"].map(lambda v: f"{v:.3f}")),
        "",
    ]
    if curve_rows["path_kl"].notna().any() and (curve_rows.loc[curve_rows["step"] > 0, "path_kl"].notna()).any():
        lines += [
            "## Path KL to the base model vs step (mean over evaluation images)",
            "",
            pivot(curve_rows["path_kl"].map(lambda v: "" if np.isnan(v) else f"{v:.4g}")),
            "",
        ]
    return "\n".join(lines)


def _versus_lines(pairs: pd.DataFrame | None, truth: str, pct: int) -> list[str]:
    if pairs is None or pairs.empty:
        return []
    table = pd.DataFrame(
        {
            "method": pairs["method"],
            "kl": pairs["kl"].map(lambda k: f"{k:g}"),
            "reward": pairs["reward"],
            "vs": pairs["reference"],
            "paired images": pairs["pairs"].astype(str),
            "truth": pairs["truth"].map(lambda v: f"{v:.3f}"),
            "truth of vs": pairs["truth_reference"].map(lambda v: f"{v:.3f}"),
            f"difference [{pct}% CI]": [format_ci(*r) for r in pairs[["diff", "low", "high"]].to_numpy()],
        }
    )
    return [
        f"## Reward rows against `{pairs['reference'].iloc[0]}`: truth ({truth}) at the selected checkpoints, paired",
        "",
        "Each cell at the checkpoint the paper's rule selected, paired image by image with the reference row's cell "
        f"of the same method, kl and seed (same prompts and eval seeds); {pct}% percentile bootstrap CI over (seed, "
        "prompt, eval seed).",
        "",
        table.to_markdown(index=False, disable_numparse=True),
        "",
    ]


def _styles(curve_rows: pd.DataFrame) -> tuple[dict, dict]:
    import matplotlib

    colors = matplotlib.colormaps["tab10"]
    rewards = list(dict.fromkeys(curve_rows["reward"]))
    kls = sorted(dict.fromkeys(curve_rows["kl"]))
    return (
        {r: colors(i % 10) for i, r in enumerate(rewards)},
        {k: LINE_STYLES[i % len(LINE_STYLES)] for i, k in enumerate(kls)},
    )


def _legend(fig, color: dict, style: dict) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, label=f"reward: {r}") for r, c in color.items()]
    handles += [Line2D([], [], color="black", linestyle=s, label=f"kl {k:g}") for k, s in style.items()]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def plot_accuracy_vs_step(curve_rows: pd.DataFrame, truth: str) -> bytes:
    """PNG: one column of panels per method; top the truth's mean vs step, bottom the training reward's
    win rate over the base model; a line per reward row (colour), the KL coefficient as line style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(curve_rows["method"]))
    color, style = _styles(curve_rows)
    fig, axes = plt.subplots(2, len(methods), figsize=(5 * len(methods), 7), squeeze=False, sharex="col")
    for j, method in enumerate(methods):
        for (reward, kl), g in curve_rows[curve_rows["method"] == method].groupby(["reward", "kl"], sort=False):
            kw = dict(color=color[reward], linestyle=style[kl], marker="o", markersize=3)
            axes[0, j].plot(g["step"], g["truth"], **kw)
            axes[1, j].plot(g["step"], g["train_wins"], **kw)
        axes[0, j].set_title(f"{method}: truth ({truth})", fontsize=10)
        axes[0, j].set_ylabel("accuracy (mean truth over seeds)")
        axes[1, j].set_title(f"{method}: the training reward's wins over the base model", fontsize=10)
        axes[1, j].set_ylabel("share of images beating the base")
        axes[1, j].set_ylim(-0.03, 1.03)
        axes[1, j].set_xlabel("step (0 = base model)")
    _legend(fig, color, style)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return _png(fig)


def plot_accuracy_vs_path_kl(curve_rows: pd.DataFrame, truth: str) -> bytes | None:
    """PNG: the truth's mean against the mean path KL to the base model (one panel per method, as
    :func:`plot_accuracy_vs_step`); None when no checkpoint has a path KL."""
    rows = curve_rows[curve_rows["path_kl"].notna()]
    if not (rows["step"] > 0).any():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(rows["method"]))
    color, style = _styles(curve_rows)
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 4), squeeze=False)
    for j, method in enumerate(methods):
        for (reward, kl), g in rows[rows["method"] == method].groupby(["reward", "kl"], sort=False):
            g = g.sort_values("step")
            axes[0, j].plot(
                g["path_kl"], g["truth"], color=color[reward], linestyle=style[kl], marker="o", markersize=3
            )
        axes[0, j].set_title(f"{method}: truth ({truth}) vs path KL", fontsize=10)
        axes[0, j].set_xlabel("path KL to the base model (mean over evaluation images)")
        axes[0, j].set_ylabel("accuracy (mean truth over seeds)")
    _legend(fig, color, style)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return _png(fig)
