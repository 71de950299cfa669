"""Contrastive-set files checked: ``{x0: [x1, ..., xm]}``, every contrastive prompt a non-empty string.

The one validator of contrastive sets, below both the TIA2 reader (:mod:`tn_ray.data.tia2`, the
released sets) and the loader every command uses (:mod:`tn_ray.prompts.contrast`).
"""
from __future__ import annotations

import json

from tn_ray.errors import InputError


def validate_sets(data: object, origin: str) -> dict[str, list[str]]:
    """``data`` as ``{x0: [x1..xm]}``; :class:`InputError` naming ``origin`` and the bad entry."""
    if not isinstance(data, dict):
        raise InputError(f"{origin}: contrastive sets must be a JSON object {{prompt: [contrastive prompts]}}, "
                         f"got a {type(data).__name__}")
    for x0, xs in data.items():
        if not isinstance(xs, list):
            raise InputError(f"{origin}: the set of prompt {x0!r} must be a list of prompts, got a {type(xs).__name__} "
                             f"({json.dumps(xs)[:60]})")
        bad = [x for x in xs if not isinstance(x, str) or not x.strip()]
        if bad:
            raise InputError(f"{origin}: the set of prompt {x0!r} holds {bad[0]!r}; every contrastive prompt must be "
                             "a non-empty string")
    return data
