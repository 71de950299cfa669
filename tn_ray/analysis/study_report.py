"""The best-of-n rows of ``tn-ray study``'s report: the truth of the image each reward picks vs n, pure pandas.

A best-of-n run of the study (one per seed) leaves ``rewards.parquet`` (one row per image: prompt_id, sample and
every reward column, the truth's among them) and ``selections.parquet`` (the top-1 sample per prompt, reward
column and n). Nothing here reads a file: the study (:mod:`tn_ray.experiments.study.run_tables`) passes the tables in.

- :func:`picked`: one run's images, one row per (reward row, n, prompt_id) with the picked image's ``truth`` and
  ``truth_pool`` (the truth's mean over the prompt's whole pool of max(n) samples: the expected truth of one
  image drawn at random, what selection is measured against);
- :func:`table`: per (method, reward, n): ``seeds``, ``prompts``, ``truth`` (mean over seeds of each seed's mean
  over prompts: :func:`tn_ray.analysis.bestofn_selection.summary`'s number per seed), the paired difference from
  the same reward's smallest n (``vs_first``: n=1 in the shipped grids) and from the random image (``vs_pool``),
  each with a bootstrap CI over (seed, prompt) (:func:`tn_ray.analysis.goodhart.mean_ci`);
- :func:`versus`: per (method, n, reward), the paired difference of its picked image's truth from the reference
  row's (the study's first reward row) on the same (seed, prompt), with its CI: TextNorm vs raw at equal n.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import pandas as pd

from tn_ray.analysis.goodhart import format_ci, mean_ci

KEYS = ["method", "reward", "n"]


def picked(
    rewards: pd.DataFrame, selections: pd.DataFrame, rows: Mapping[str, str], truth: str, ns: Sequence[int]
) -> pd.DataFrame:
    """Per (reward row, n, prompt_id): the top-1 image's ``sample`` and ``truth``, and ``truth_pool``. ``rows``:
    reward row name -> its column. ``ValueError`` naming a missing column or selection."""
    missing = [c for c in [truth, *rows.values()] if c not in rewards.columns]
    if missing:
        raise ValueError(f"rewards.parquet lacks the columns {missing}")
    pool = rewards[rewards["sample"] < max(ns)].groupby("prompt_id")[truth].mean()
    top = selections[(selections["k"] == 1) & (selections["rank"] == 0)]
    value = rewards.set_index(["prompt_id", "sample"])[truth]
    out = []
    for row, column in rows.items():
        for n in ns:
            sel = top[(top["reward"] == column) & (top["n"] == n)].sort_values("prompt_id")
            if sel.empty:
                raise ValueError(f"selections.parquet has no top-1 of reward {column!r} at n = {n}")
            out.append(
                pd.DataFrame(
                    {
                        "reward": row,
                        "n": int(n),
                        "prompt_id": sel["prompt_id"].to_numpy(),
                        "sample": sel["sample"].to_numpy(),
                        "truth": value.reindex(pd.MultiIndex.from_frame(sel[["prompt_id", "sample"]])).to_numpy(),
                        "truth_pool": pool.reindex(sel["prompt_id"]).to_numpy(),
                    }
                )
            )
    return pd.concat(out, ignore_index=True)


def table(images: pd.DataFrame, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per (method, reward, n) from :func:`picked` rows of every run (with ``method`` and ``seed``): see the module
    doc. The units of each CI are resampled in (seed, prompt_id) order, so an interval is a function of the data."""
    first = images.groupby(["method", "reward"])["n"].transform("min")
    base = images[images["n"] == first].set_index(["method", "reward", "seed", "prompt_id"])["truth"]
    images = images.assign(
        truth_first=base.reindex(pd.MultiIndex.from_frame(images[["method", "reward", "seed", "prompt_id"]])).to_numpy()
    )
    rows = []
    for key, g in images.groupby(KEYS, sort=True):
        g = g.sort_values(["seed", "prompt_id"])
        per_seed = g.groupby("seed")["truth"].mean()
        d_first = mean_ci((g["truth"] - g["truth_first"]).to_numpy(), confidence, resamples, seed)
        d_pool = mean_ci((g["truth"] - g["truth_pool"]).to_numpy(), confidence, resamples, seed)
        rows.append(
            {
                **dict(zip(KEYS, key)),
                "seeds": int(g["seed"].nunique()),
                "prompts": int(g["prompt_id"].nunique()),
                "truth": float(per_seed.mean()),
                "truth_pool": float(g.groupby("seed")["truth_pool"].mean().mean()),
                "vs_first": d_first[0],
                "vs_first_low": d_first[1],
                "vs_first_high": d_first[2],
                "vs_pool": d_pool[0],
                "vs_pool_low": d_pool[1],
                "vs_pool_high": d_pool[2],
            }
        )
    out = pd.DataFrame(rows)
    out["n"] = out["n"].astype("int64")
    return out


def versus(
    images: pd.DataFrame, reference: str, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Per (method, n, reward other than ``reference``) from :func:`picked` rows of every run: ``pairs`` (the
    (seed, prompt) units both rows picked in), ``diff`` [``low``, ``high``]: mean of truth - the reference row's
    truth over those units, bootstrap CI resampled in (seed, prompt_id) order."""
    unit = ["method", "n", "seed", "prompt_id"]
    ref = images[images["reward"] == reference].set_index(unit)["truth"]
    rows = []
    for (method, n, reward), g in images[images["reward"] != reference].groupby(["method", "n", "reward"], sort=True):
        g = g.sort_values(["seed", "prompt_id"])
        base = ref.reindex(pd.MultiIndex.from_frame(g[unit])).to_numpy()
        keep = ~pd.isna(base)
        diff, lo, hi = mean_ci((g["truth"].to_numpy()[keep] - base[keep]), confidence, resamples, seed)
        rows.append(
            {
                "method": method,
                "n": int(n),
                "reward": reward,
                "reference": reference,
                "pairs": int(keep.sum()),
                "diff": diff,
                "low": lo,
                "high": hi,
            }
        )
    return pd.DataFrame(rows, columns=["method", "n", "reward", "reference", "pairs", "diff", "low", "high"])


def markdown(rows: pd.DataFrame, truth: str, confidence: float, pairs: pd.DataFrame | None = None) -> str:
    """The best-of-n section of report.md, every number formatted from ``rows`` (:func:`table`) and ``pairs``
    (:func:`versus`; None or empty: no such table)."""
    pct = int(round(confidence * 100))
    first = rows.groupby(["method", "reward"])["n"].transform("min")
    shown = pd.DataFrame(
        {
            "method": rows["method"],
            "reward": rows["reward"],
            "n": rows["n"].astype(str),
            "seeds": rows["seeds"].astype(str),
            "prompts": rows["prompts"].astype(str),
            f"truth ({truth})": rows["truth"].map(lambda v: f"{v:.3f}"),
            "random image": rows["truth_pool"].map(lambda v: f"{v:.3f}"),
            f"vs smallest n [{pct}% CI]": [
                "" if n == f else format_ci(*r)
                for n, f, r in zip(rows["n"], first, rows[["vs_first", "vs_first_low", "vs_first_high"]].to_numpy())
            ],
            f"vs random image [{pct}% CI]": [
                format_ci(*r) for r in rows[["vs_pool", "vs_pool_low", "vs_pool_high"]].to_numpy()
            ],
        }
    )
    return "\n".join(
        [
            f"## Best-of-n: truth ({truth}) of the image each reward picks, vs n",
            "",
            "Means over seeds of each seed's mean over prompts; `random image`: the truth's mean over each "
            "prompt's whole pool (one image drawn at random); differences paired per (seed, prompt), with "
            f"{pct}% percentile bootstrap CIs over those.",
            "",
            shown.to_markdown(index=False, disable_numparse=True),
            "",
            *_versus_lines(pairs, truth, pct),
        ]
    )


def _versus_lines(pairs: pd.DataFrame | None, truth: str, pct: int) -> list[str]:
    if pairs is None or pairs.empty:
        return []
    ref = pairs["reference"].iloc[0]
    shown = pd.DataFrame(
        {
            "method": pairs["method"],
            "n": pairs["n"].astype(str),
            "reward": pairs["reward"],
            "pairs": pairs["pairs"].astype(str),
            f"truth minus {ref}'s [{pct}% CI]": [format_ci(*r) for r in pairs[["diff", "low", "high"]].to_numpy()],
        }
    )
    return [
        f"### Each reward vs `{ref}` at the same n ({truth} of the picked images, paired per (seed, prompt))",
        "",
        shown.to_markdown(index=False, disable_numparse=True),
        "",
    ]


def plot(rows: pd.DataFrame, truth: str) -> bytes:
    """PNG: the truth of the picked image vs n (log scale), a line per (method, reward), the random image dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colors = matplotlib.colormaps["tab10"]
    for i, ((method, reward), g) in enumerate(rows.groupby(["method", "reward"], sort=False)):
        g = g.sort_values("n")
        ax.plot(g["n"], g["truth"], color=colors(i % 10), marker="o", label=f"{method}: {reward}")
        ax.plot(g["n"], g["truth_pool"], color=colors(i % 10), linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("n (images per prompt; log scale)")
    ax.set_ylabel(f"{truth} of the picked image (mean)")
    ax.set_title("best-of-n: truth vs n (dotted: a random image)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
