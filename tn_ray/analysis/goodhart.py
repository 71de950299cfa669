"""Best-of-n accuracy against exact truth (the Goodhart curve): pure functions.

For a pool of N scored images of one prompt, each right or wrong, best-of-n draws n of them
uniformly without replacement and keeps the highest-scored one (ties broken uniformly at
random). :func:`expected_accuracy` is the exact probability that the kept image is right, an
average over every n-subset of the pool (a U-statistic: far less variance than one draw).
With the images sorted by score and a tie group at sorted positions a..b (1-based), the kept
image lies in the group with probability ``(C(N-a+1, n) - C(N-b, n)) / C(N, n)``, and is then
any member of the group alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats
from scipy.special import gammaln


def _ratio(m: np.ndarray, n: int, total: int) -> np.ndarray:
    """C(m, n) / C(total, n), 0 where m < n."""
    m = np.asarray(m, dtype=float)
    ok = m >= n
    logr = (
        gammaln(np.where(ok, m, n) + 1)
        - gammaln(np.where(ok, m, n) - n + 1)
        - gammaln(total + 1)
        + gammaln(total - n + 1)
    )
    return np.where(ok, np.exp(logr), 0.0)


def expected_accuracy(scores: Sequence[float], correct: Sequence[bool], n: int) -> float:
    """P(the best of n images drawn from the pool is correct); see the module doc."""
    s = np.asarray(scores, dtype=float)
    c = np.asarray(correct, dtype=float)
    total = len(s)
    if not 1 <= n <= total:
        raise ValueError(f"n must be in 1..{total} (the pool), got {n}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    order = np.argsort(-s, kind="stable")
    s, c = s[order], c[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # 0-based first index of each tie group
    ends = np.r_[starts[1:], total]  # exclusive
    p = _ratio(total - starts, n, total) - _ratio(total - ends, n, total)
    means = np.add.reduceat(c, starts) / (ends - starts)
    return float(np.dot(p, means))


def curves(table: pd.DataFrame, selectors: Sequence[str], ns: Sequence[int]) -> pd.DataFrame:
    """Per (prompt, selector, n) the expected accuracy. ``table``: one row per image with
    ``prompt``, ``correct`` and a score column per selector."""
    rows = []
    for prompt, g in table.groupby("prompt", sort=False):
        for sel in selectors:
            for n in ns:
                rows.append(
                    {
                        "prompt": prompt,
                        "selector": sel,
                        "n": n,
                        "accuracy": expected_accuracy(g[sel].to_numpy(), g["correct"].to_numpy(), n),
                    }
                )
    return pd.DataFrame(rows)


def format_ci(mean: float, lo: float, hi: float) -> str:
    """``+0.125 [-0.042, +0.292]``: a difference and its interval as every report prints them."""
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def mean_ci(
    x: Sequence[float] | np.ndarray, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``x`` with a percentile bootstrap CI (``scipy.stats.bootstrap``,
    ``resamples`` resamples drawn from ``numpy.random.default_rng(seed)``); fewer than two values, or
    all equal, give the mean as both bounds. The one CI of this module (and of the fine-tuning report)."""
    x = np.asarray(x, dtype=float)
    mean = float(x.mean())
    if len(x) < 2 or np.ptp(x) == 0:
        return mean, mean, mean
    ci = stats.bootstrap(
        (x,),
        np.mean,
        confidence_level=confidence,
        n_resamples=resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    ).confidence_interval
    return mean, float(ci.low), float(ci.high)


def bootstrap_summary(
    per_prompt: pd.DataFrame, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """Mean accuracy over prompts per (selector, n) with a percentile bootstrap CI over prompts."""
    rows = []
    for (sel, n), g in per_prompt.groupby(["selector", "n"], sort=False):
        mean, lo, hi = mean_ci(g["accuracy"].to_numpy(), confidence, resamples, seed)
        rows.append(
            {
                "selector": sel,
                "n": int(n),
                "accuracy": mean,
                "ci_low": lo,
                "ci_high": hi,
                "n_prompts": len(g),
            }
        )
    return pd.DataFrame(rows)


def paired_difference(
    per_prompt: pd.DataFrame, a: str, b: str, n: int, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean over prompts of accuracy(a) - accuracy(b) at pool size n, with a percentile
    bootstrap CI over prompts (paired: both selectors on the same prompts and pools)."""
    at = per_prompt[per_prompt["n"] == n].pivot(index="prompt", columns="selector", values="accuracy")
    return mean_ci((at[a] - at[b]).to_numpy(), confidence, resamples, seed)


def overoptimization(
    summary: pd.DataFrame,
    per_prompt: pd.DataFrame,
    baseline: str,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Per selector: its peak accuracy (and the n of the peak), its accuracy at the largest n,
    the drop from peak to there (the Goodhart drop; 0 if the curve never falls), and its paired
    difference from ``baseline`` at the largest n with a bootstrap CI over prompts."""
    top = int(summary["n"].max())
    rows = []
    for sel, g in summary.groupby("selector", sort=False):
        peak = g.loc[g["accuracy"].idxmax()]
        last = float(g.loc[g["n"] == top, "accuracy"].iloc[0])
        diff, lo, hi = paired_difference(per_prompt, sel, baseline, top, confidence, resamples, seed)
        rows.append(
            {
                "selector": sel,
                "peak": float(peak["accuracy"]),
                "peak n": int(peak["n"]),
                f"n={top}": last,
                "drop": last - float(peak["accuracy"]),
                f"vs {baseline} at n={top}": f"{diff:+.3f} [{lo:+.2f}, {hi:+.2f}]",
            }
        )
    return pd.DataFrame(rows)
