"""TextNorm and reward ensembles: pure array functions over score matrices.

A score matrix ``S`` has one row per image and columns ``[x0, x1, ..., xm]``: ``S[i, 0]``
is the reward of image i for its own prompt, ``S[i, 1:]`` the rewards for the contrastive
prompts. Rows of prompts with fewer contrastive prompts are padded with NaN, which counts
as "no prompt" (probability zero).
"""
from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

ENSEMBLE_KINDS = ("mean", "uncertainty")


def log_textnorm(scores: np.ndarray, tau: float | np.ndarray = 1.0) -> np.ndarray:
    """``log r_X(x0, y)``: finite for any input, so it also ranks images whose probability
    underflows float64 (an x0 reward more than ~745 * tau below the best contrastive one)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim < 1 or s.shape[-1] < 1:
        raise ValueError(f"score matrix needs at least one column (x0); got shape {s.shape}")
    tau = np.asarray(tau, dtype=np.float64)
    if np.any(~(tau > 0)):
        raise ValueError(f"tau must be > 0, got {tau}")
    if np.isnan(s[..., 0]).any():
        raise ValueError("column 0 (the reward of x0) contains NaN")
    z = s / tau[..., None] if tau.ndim else s / tau
    z = np.where(np.isnan(z), -np.inf, z)
    return z[..., 0] - logsumexp(z, axis=-1)


def textnorm(scores: np.ndarray, tau: float | np.ndarray = 1.0) -> np.ndarray:
    """Eq. 1 of the paper: softmax probability of column 0 at temperature ``tau``.

    ``r_X(x0, y) = exp(r(x0,y)/tau) / sum_{x in {x0} u X} exp(r(x,y)/tau)``, computed as
    ``exp(s0 - logsumexp(s))`` so any reward scale is stable. ``scores``: (n, m+1) or
    (..., n, m+1); ``tau`` > 0, a scalar or broadcastable to the leading dimensions.
    Returns an array of shape ``scores.shape[:-1]`` with values in (0, 1].
    """
    return np.exp(log_textnorm(scores, tau))


def log_mean_ensemble(log_normalized: np.ndarray) -> np.ndarray:
    """``log`` of the mean ensemble (eq. 2) of k models from their ``log r_X``, shape (k, n):
    ``logsumexp(log r) - log k``, finite where every member underflows, so images whose
    ensemble reward is below float64's range still rank by it (no ties at 0)."""
    r = np.asarray(log_normalized, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"ensemble expects (models, images), got shape {r.shape}")
    return logsumexp(r, axis=0) - np.log(r.shape[0])


def ensemble(normalized: np.ndarray, kind: str = "mean", lam: float | np.ndarray = 0.0) -> np.ndarray:
    """Ensemble of k models' rewards, ``normalized`` of shape (k, n).

    ``mean`` (eq. 2): the mean over models. ``uncertainty`` (eq. 3): the mean minus
    ``lam`` times the variance across models (population variance, ddof=0); ``lam`` is a
    scalar or one value per image (per-prompt lambdas, as the TIA2 release tunes them).
    """
    r = np.asarray(normalized, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"ensemble expects (models, images), got shape {r.shape}")
    if kind not in ENSEMBLE_KINDS:
        raise ValueError(f"unknown ensemble kind {kind!r}; expected one of {ENSEMBLE_KINDS}")
    mean = r.mean(axis=0)
    if kind == "mean":
        return mean
    lam = np.asarray(lam, dtype=np.float64)
    if np.any(~(lam >= 0)):
        raise ValueError(f"lambda must be >= 0, got {lam}")
    return mean - lam * r.var(axis=0)
