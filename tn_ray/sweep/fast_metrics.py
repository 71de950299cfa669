"""The metrics of :mod:`tn_ray.analysis.metrics`, vectorised over prompts for sweeps.

A sweep evaluates one reward setting (tau, lambda, members) thousands of times on the same
score matrices, so the per-prompt pandas/sklearn loop of :mod:`tn_ray.analysis.metrics` (about a
second for 300 prompts) would dominate. Here the images of each prompt are laid out as one
row of a padded ``(prompts, max images)`` array and every metric is computed for all prompts
at once with numpy. Each function returns exactly what :func:`tn_ray.analysis.metrics.prompt_metrics`
returns for that prompt (same tie handling; checked against it in the tests).

Padding: ``mask[p, j]`` is False where prompt p has fewer than j+1 images; padded scores and
labels are ignored.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from tn_ray.analysis.metrics import AP_KS, METRICS


def group_index(codes: np.ndarray) -> np.ndarray:
    """``(groups, max size)`` row indices of each group in input order, -1 where padded.

    ``codes``: (n,) group number per row, 0..P-1. Rows keep their input order inside a group
    (this order breaks ties in AP@k, as in :func:`tn_ray.analysis.metrics.ap_at_k`).
    """
    codes = np.asarray(codes, dtype=np.int64)
    if codes.size == 0:
        return np.full((0, 0), -1, dtype=np.int64)
    order = np.argsort(codes, kind="stable")
    counts = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(len(codes)) - starts[codes[order]]
    index = np.full((len(counts), counts.max()), -1, dtype=np.int64)
    index[codes[order], pos] = order
    return index


def gather(values: np.ndarray, index: np.ndarray, fill: float = np.nan) -> np.ndarray:
    """``values[index]`` with ``fill`` where ``index`` is -1 (padding)."""
    out = np.asarray(values)[np.where(index >= 0, index, 0)]
    return np.where(index >= 0, out, fill)


def _descending(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per row, the column order by score descending, ties by column, padding last."""
    key = np.where(mask, -scores, np.inf)
    return np.argsort(key, axis=1, kind="stable")


def _average_ranks(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Ascending ranks 1..n_p of the valid entries of each row, ties averaged (padding ranks
    above every valid entry, so it never shifts them)."""
    return rankdata(np.where(mask, x, np.inf), method="average", axis=1)


def auroc(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Area under the ROC curve per prompt (Mann-Whitney U with tie-averaged ranks)."""
    labels = np.where(mask, labels, 0).astype(np.float64)
    ranks = _average_ranks(scores, mask)
    pos = labels.sum(axis=1)
    neg = mask.sum(axis=1) - pos
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * labels).sum(axis=1) - pos * (pos + 1) / 2) / (pos * neg)


def _step_ap(s: np.ndarray, rel: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """sklearn's step-wise average precision per row of rows already sorted by score descending
    (``s``), ``rel`` 0/1 labels, ``valid`` False at padding (which sorts last); NaN without positives.

    A threshold ends where the next score differs (or the valid entries end); each threshold adds
    (recall gained) * (precision at it), so tied scores count as one threshold, as in sklearn.
    """
    tp = np.cumsum(rel, axis=1)
    seen = np.arange(1, s.shape[1] + 1)[None, :]
    end = np.ones_like(valid)
    end[:, :-1] = (s[:, 1:] != s[:, :-1]) | ~valid[:, 1:]
    end &= valid
    # true positives at the previous threshold (tp never decreases along the row)
    reached = np.maximum.accumulate(np.where(end, tp, 0.0), axis=1)
    prev = np.concatenate([np.zeros((len(tp), 1)), reached[:, :-1]], axis=1)
    pos = rel.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(end, (tp - prev) / pos * (tp / seen), 0.0)
    return np.where(pos[:, 0] > 0, terms.sum(axis=1), np.nan)


def _sorted(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray, k: int | None = None):
    """(scores, labels, valid) per row in descending score order (ties by column), first k columns."""
    labels = np.where(mask, labels, 0).astype(np.float64)
    order = _descending(scores, mask)[:, :k]
    s = np.take_along_axis(np.where(mask, scores, -np.inf), order, axis=1)
    return s, np.take_along_axis(labels, order, axis=1), np.take_along_axis(mask, order, axis=1)


def auprc(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Average precision per prompt, sklearn's step-wise sum over distinct score thresholds."""
    return _step_ap(*_sorted(scores, labels, mask))


def ap_at_k(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """The benchmark's AP@k per prompt: sklearn's average precision on the k highest-scored images
    (ties at the k-th place by column); 0 when they hold no good image."""
    ap = _step_ap(*_sorted(scores, labels, mask, k))
    return np.where(np.isnan(ap), 0.0, ap)


def _constant(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask, x, -np.inf).max(axis=1) == np.where(mask, x, np.inf).min(axis=1)


def spearman(scores: np.ndarray, fine: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Spearman correlation per prompt: Pearson of tie-averaged ranks; NaN if either is constant."""
    rs = np.where(mask, _average_ranks(scores, mask), 0.0)
    rf = np.where(mask, _average_ranks(fine, mask), 0.0)
    n = mask.sum(axis=1, keepdims=True)
    ds = np.where(mask, rs - rs.sum(axis=1, keepdims=True) / n, 0.0)
    df = np.where(mask, rf - rf.sum(axis=1, keepdims=True) / n, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ds * df).sum(axis=1) / np.sqrt((ds ** 2).sum(axis=1) * (df ** 2).sum(axis=1))
    return np.where(_constant(scores, mask) | _constant(fine, mask), np.nan, rho)


def kendall(scores: np.ndarray, fine: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Kendall's tau-b per prompt (scipy's default); NaN if either is constant."""
    pair = mask[:, :, None] & mask[:, None, :]
    ds = np.sign(scores[:, :, None] - scores[:, None, :])
    df = np.sign(fine[:, :, None] - fine[:, None, :])
    ds = np.where(pair, ds, 0)
    df = np.where(pair, df, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = (ds * df).sum(axis=(1, 2)) / np.sqrt(np.abs(ds).sum(axis=(1, 2)) * np.abs(df).sum(axis=(1, 2)))
    return np.where(_constant(scores, mask) | _constant(fine, mask), np.nan, tau)


def prompt_metrics(scores: np.ndarray, binary: np.ndarray, fine: np.ndarray, mask: np.ndarray,
                   names: tuple[str, ...] | list[str] = METRICS) -> dict[str, np.ndarray]:
    """The requested metrics for every prompt (row); padded arrays of shape (prompts, images)."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; expected some of {list(METRICS)}")
    scores = np.asarray(scores, dtype=np.float64)
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name == "auroc":
            out[name] = auroc(scores, binary, mask)
        elif name == "auprc":
            out[name] = auprc(scores, binary, mask)
        elif name.startswith("ap@"):
            k = int(name[3:])
            assert k in AP_KS
            out[name] = ap_at_k(scores, binary, mask, k)
        elif name == "spearman":
            out[name] = spearman(scores, fine, mask)
        else:
            out[name] = kendall(scores, fine, mask)
    return out
