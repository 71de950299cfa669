"""Which generated images RWR trains on, and with what weight: pure functions of rewards.

``top_k_per_group`` keeps the k best images of each prompt (the paper: 10 of 100);
``reward_weights`` turns their rewards into the per-image weights ``w_i`` of eq. 4:

- ``value``: the reward itself (must be >= 0: a negative weight would push the model away);
- ``minmax``: ``(r - min) / (max - min)`` within each prompt (1 where a prompt's rewards are equal);
- ``softmax``: ``N * softmax(r / temperature)`` over all kept images (the DDPO authors' RWR
  baseline), scaled by N so the weights average 1 and the loss keeps the denoising scale.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from tn_ray.errors import InputError

WEIGHTINGS = ("value", "minmax", "softmax")
Weighting = Literal["value", "minmax", "softmax"]


def top_k_per_group(rewards: Sequence[float], groups: Sequence, k: int) -> np.ndarray:
    """Indices of the ``k`` highest rewards of each group (ties: the lower index first), sorted by
    group in order of first appearance, then by descending reward."""
    r = np.asarray(rewards, dtype=np.float64)
    g = np.asarray(groups, dtype=object)
    if np.isnan(r).any():
        raise InputError(f"{int(np.isnan(r).sum())} rewards are NaN; every generated image needs a reward")
    out = []
    for key in dict.fromkeys(g.tolist()):
        idx = np.flatnonzero(g == key)
        order = idx[np.lexsort((idx, -r[idx]))]
        out.extend(order[:k].tolist())
    return np.asarray(out, dtype=np.int64)


def reward_weights(rewards: Sequence[float], groups: Sequence, kind: Weighting = "value",
                   temperature: float = 1.0) -> np.ndarray:
    """Per-image weights ``w_i`` (float64) of the kept images; see the module docstring."""
    r = np.asarray(rewards, dtype=np.float64)
    if kind == "value":
        if (r < 0).any():
            raise InputError(f"weighting 'value' needs rewards >= 0 (got min {r.min():.4g}); use 'minmax' or 'softmax' "
                             "for a reward that can be negative")
        return r.copy()
    if kind == "minmax":
        g = np.asarray(groups, dtype=object)
        w = np.ones_like(r)
        for key in dict.fromkeys(g.tolist()):
            m = g == key
            lo, hi = r[m].min(), r[m].max()
            if hi > lo:
                w[m] = (r[m] - lo) / (hi - lo)
        return w
    if kind == "softmax":
        if temperature <= 0:
            raise ValueError(f"softmax temperature must be > 0, got {temperature}")
        z = r / temperature
        e = np.exp(z - z.max())
        return len(r) * e / e.sum()
    raise ValueError(f"unknown weighting {kind!r}; expected one of {WEIGHTINGS}")
