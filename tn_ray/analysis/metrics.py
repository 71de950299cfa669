"""Per-prompt ranking metrics of a reward against human labels (sklearn / scipy).

For one prompt with images i = 1..N, reward s_i, binary label b_i (good = 1) and
fine-grained human score h_i:

- ``auroc``: ``sklearn.metrics.roc_auc_score(b, s)``.
- ``auprc``: ``sklearn.metrics.average_precision_score(b, s)``, the step-wise area under the
  precision-recall curve.
- ``ap@k``: average precision over the k highest-scored images only, as the benchmark's
  released per-prompt metrics compute it: ``sklearn.metrics.average_precision_score`` applied
  to the top k (images ranked by s descending, ties at the k-th place broken by image order;
  inside the top k, tied scores are one threshold, as sklearn groups them). Without ties
  ``AP@k = sum_{j<=k} precision@j * b_(j) / P_k`` with P_k = good images among the top k;
  0 when the top k hold no good image. (The information-retrieval convention, dividing by
  ``min(k, P)`` with P = all good images of the prompt, gives other numbers and is not used.)
- ``spearman`` / ``kendall``: ``scipy.stats.spearmanr`` / ``kendalltau`` (tau-b) of s vs h.

A prompt whose binary labels are all equal has no ranking to judge and is excluded from the
averages, as in the benchmark. Spearman and Kendall are undefined (NaN) for a prompt whose
rewards or human scores are all equal; the set means skip those prompts and ``n_corr`` says how
many prompts they average (``n_prompts`` counts all). ``n_tied``: images whose reward equals
another image's of the same prompt (TextNorm columns are ranked in their log form, so only true
ties and the uncertainty ensemble's can remain; see :func:`tn_ray.textnorm.columns.combine`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score

AP_KS = (5, 10, 25)
METRICS = ("auroc", "auprc", "ap@5", "ap@10", "ap@25", "spearman", "kendall")


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, descending, ties by index (stable)."""
    return np.argsort(-np.asarray(scores, dtype=float), kind="stable")[:k]


def ap_at_k(labels: np.ndarray, scores: np.ndarray, k: int) -> float:
    """The benchmark's AP@k: sklearn's average precision on the top k images; 0 if none is good."""
    top = top_k(scores, k)
    rel = np.asarray(labels, dtype=int)[top]
    if rel.sum() == 0:
        return 0.0
    return float(average_precision_score(rel, np.asarray(scores, dtype=float)[top]))


def prompt_metrics(scores: np.ndarray, binary: np.ndarray, fine: np.ndarray) -> dict[str, float]:
    scores = np.asarray(scores, dtype=float)
    binary = np.asarray(binary, dtype=int)
    out = {"auroc": float(roc_auc_score(binary, scores)), "auprc": float(average_precision_score(binary, scores))}
    for k in AP_KS:
        out[f"ap@{k}"] = ap_at_k(binary, scores, k)
    constant = np.ptp(scores) == 0 or np.ptp(fine) == 0
    out["spearman"] = float("nan") if constant else float(stats.spearmanr(scores, fine).statistic)
    out["kendall"] = float("nan") if constant else float(stats.kendalltau(scores, fine).statistic)
    return out


def per_prompt(frame: pd.DataFrame, reward_columns: list[str]) -> pd.DataFrame:
    """``frame``: one row per image with set, prompt, binary, fine and one column per reward.

    Returns one row per (set, prompt, reward) with every metric; prompts whose binary labels
    are all equal are left out.
    """
    rows = []
    for (set_name, prompt), g in frame.groupby(["set", "prompt"], sort=False):
        b = g["binary"].to_numpy()
        if b.min() == b.max():
            continue
        for reward in reward_columns:
            scores = g[reward].to_numpy()
            if np.isnan(scores).any():  # a column undefined for this prompt (e.g. no released parameters)
                continue
            rows.append({"set": set_name, "prompt": prompt, "reward": reward, "n_images": len(g),
                         **prompt_metrics(scores, b, g["fine"].to_numpy()), "n_tied": tied(scores)})
    return pd.DataFrame(rows, columns=["set", "prompt", "reward", "n_images", *METRICS, "n_tied"])


def tied(scores: np.ndarray) -> int:
    """How many of the scores equal another one (each member of a tie counts)."""
    _, counts = np.unique(np.asarray(scores, dtype=float), return_counts=True)
    return int(counts[counts > 1].sum())


def per_set(prompt_table: pd.DataFrame) -> pd.DataFrame:
    """Mean of every metric over the (non-excluded) prompts of each set, per reward; ``n_prompts``
    prompts, of which ``n_corr`` have a defined Spearman / Kendall (the others are skipped by
    their means), and ``n_tied`` tied images in all (absent from tables without that column)."""
    by = prompt_table.groupby(["set", "reward"], sort=False)
    agg = by[list(METRICS)].mean()
    agg["n_prompts"] = by.size()
    agg["n_corr"] = by["spearman"].count()
    if "n_tied" in prompt_table:
        agg["n_tied"] = by["n_tied"].sum().astype(int)
    return agg.reset_index()
