"""Win / tie / lose per pair of rewards and criterion, as the paper's Figure 6.

Answers are "set1" / "tie" / "set2" per criterion; the key maps sets to rewards. A pair is
reported as (A, B) with A < B alphabetically, from A's side: A wins, ties, B wins. Each rate comes
with its count and a Clopper-Pearson (exact binomial) confidence interval from
``scipy.stats.binomtest(count, n).proportion_ci``.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from scipy.stats import binomtest

from tn_ray.labeling.tasks import CRITERIA, Task

OUTCOMES = ("win", "tie", "lose")


def outcomes(task: Task, answers: list[dict]) -> pd.DataFrame:
    """One row per (answer, criterion): reward_a, reward_b, criterion, outcome (from A's side)."""
    rows = []
    for a in answers:
        set1, set2 = task.key[a["item_id"]]
        first, second = sorted((set1, set2))
        for crit in CRITERIA:
            choice = a["value"][crit]
            winner = {"set1": set1, "set2": set2}.get(choice)
            outcome = "tie" if winner is None else ("win" if winner == first else "lose")
            rows.append({"question": a["item_id"], "annotator": a["annotator"], "reward_a": first,
                         "reward_b": second, "criterion": crit, "outcome": outcome})
    return pd.DataFrame(rows, columns=["question", "annotator", "reward_a", "reward_b", "criterion", "outcome"])


def tally(task: Task, answers: list[dict], confidence: float = 0.95) -> pd.DataFrame:
    """Counts, rates and binomial CIs per (reward_a, reward_b, criterion)."""
    df = outcomes(task, answers)
    rows = []
    for (ra, rb, crit), g in df.groupby(["reward_a", "reward_b", "criterion"], sort=True):
        n = len(g)
        row = {"reward_a": ra, "reward_b": rb, "criterion": crit, "n": n}
        for o in OUTCOMES:
            k = int((g["outcome"] == o).sum())
            ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
            row.update({o: k, f"{o}_rate": k / n, f"{o}_lo": ci.low, f"{o}_hi": ci.high})
        rows.append(row)
    cols = ["reward_a", "reward_b", "criterion", "n"] + [
        f"{o}{s}" for o in OUTCOMES for s in ("", "_rate", "_lo", "_hi")
    ]
    return pd.DataFrame(rows, columns=cols)


def markdown(table: pd.DataFrame, confidence: float = 0.95) -> str:
    pct = round(100 * confidence)
    def fmt(r, o):
        return f"{r[o]} ({100 * r[o + '_rate']:.0f}%, {pct}% CI {100 * r[o + '_lo']:.0f}-{100 * r[o + '_hi']:.0f}%)"

    view = pd.DataFrame(
        {
            "A": table["reward_a"],
            "B": table["reward_b"],
            "criterion": table["criterion"],
            "answers": table["n"],
            "A wins": [fmt(r, "win") for _, r in table.iterrows()],
            "tie": [fmt(r, "tie") for _, r in table.iterrows()],
            "B wins": [fmt(r, "lose") for _, r in table.iterrows()],
        }
    )
    return (
        "# Human evaluation: win / tie / lose\n\nCounts with rates and exact (Clopper-Pearson) binomial "
        f"{pct}% confidence intervals; A wins = the annotators preferred A's set.\n\n"
        + view.to_markdown(index=False)
        + "\n"
    )


def bar_chart(table: pd.DataFrame, path: str | Path) -> Path:
    """Stacked horizontal bars (A wins / tie / B wins) per pair and criterion, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r.reward_a} vs {r.reward_b}\n{r.criterion}" for r in table.itertuples()]
    fig, ax = plt.subplots(figsize=(8, 0.9 * len(table) + 1.2))
    left = [0.0] * len(table)
    for o, color, name in zip(OUTCOMES, ("#2e7d32", "#9e9e9e", "#c62828"), ("A wins", "tie", "B wins")):
        rates = list(table[f"{o}_rate"])
        ax.barh(labels, rates, left=left, color=color, label=name)
        for y, (x0, w, k) in enumerate(zip(left, rates, table[o])):
            if w > 0.06:
                ax.text(x0 + w / 2, y, f"{100 * w:.0f}% ({k})", ha="center", va="center", color="white", fontsize=8)
        left = [a + b for a, b in zip(left, rates)]
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("share of answers")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
