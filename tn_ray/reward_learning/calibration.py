"""Calibration of a predicted probability of "good": expected calibration error and the
reliability diagram.

With B equal-width bins over [0, 1] (a probability of exactly 1 falls in the last bin),
``ECE = sum_b (n_b / N) * |mean label in b - mean probability in b|`` (empty bins count 0).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd


def reliability(prob: np.ndarray, label: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Per bin: lower edge, upper edge, count, mean probability, fraction good (NaN when empty)."""
    prob, label = np.asarray(prob, dtype=np.float64), np.asarray(label, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(prob, edges[1:-1], right=False), 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(idx, weights=prob, minlength=bins) / count
        acc = np.bincount(idx, weights=label, minlength=bins) / count
    return pd.DataFrame({"low": edges[:-1], "high": edges[1:], "count": count, "confidence": conf, "accuracy": acc})


def expected_calibration_error(prob: np.ndarray, label: np.ndarray, bins: int = 10) -> float:
    table = reliability(prob, label, bins)
    full = table["count"] > 0
    gap = (table.loc[full, "accuracy"] - table.loc[full, "confidence"]).abs()
    return float((table.loc[full, "count"] * gap).sum() / max(int(table["count"].sum()), 1))


def plot_reliability(curves: Mapping[str, pd.DataFrame], path: str | Path, title: str = "") -> None:
    """One line per model (mean probability vs fraction good per non-empty bin) and the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfect calibration")
    for name, table in curves.items():
        full = table[table["count"] > 0]
        ax.plot(full["confidence"], full["accuracy"], marker="o", label=name)
    ax.set_xlabel("predicted probability of good")
    ax.set_ylabel("fraction labelled good")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
