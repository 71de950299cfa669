"""Trainables the sweep runner knows by name: ``trainable:`` in a sweep YAML -> a
:class:`~tn_ray.sweep.trainable.SweepTrainable` (what one is: :mod:`tn_ray.sweep.trainable`),
imported on first use. tn_ray's own live in :mod:`tn_ray.sweep.trainables`; a user's own is
registered with ``register("mine", "mypackage.trainables:TRAINABLE")`` or named in the YAML as
``module:attribute``.
"""
from __future__ import annotations

import importlib

from tn_ray.errors import UnknownName
from tn_ray.sweep.trainable import SweepTrainable

# name -> "module:attribute" (imported on first use, so listing names imports nothing heavy)
_REGISTRY: dict[str, str | SweepTrainable] = {
    "tia2_textnorm": "tn_ray.sweep.trainables.evaluators:TIA2_TEXTNORM",
    "bestofn_selection": "tn_ray.sweep.trainables.evaluators:BESTOFN_SELECTION",
    "toy_regression": "tn_ray.sweep.trainables.toy:TOY_REGRESSION",
    "reward_head": "tn_ray.sweep.trainables.reward_head:REWARD_HEAD",
    "rwr": "tn_ray.sweep.trainables.rwr:RWR",
    "ddpo": "tn_ray.sweep.trainables.ddpo:DDPO",
    "grpo": "tn_ray.sweep.trainables.grpo:GRPO",
}


def register(name: str, target: str | SweepTrainable) -> None:
    """Make ``name`` usable as ``trainable:`` in a sweep YAML."""
    _REGISTRY[name] = target


def available() -> list[str]:
    return sorted(_REGISTRY)


def _import(target: str) -> SweepTrainable:
    module, _, attr = target.partition(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise UnknownName(f"trainable '{target}' cannot be imported: {err}") from None
    if not isinstance(obj, SweepTrainable):
        raise UnknownName(f"'{target}' is a {type(obj).__name__}, not a tn_ray.sweep.trainable.SweepTrainable")
    return obj


def get(name: str) -> SweepTrainable:
    """The trainable registered as ``name``, or imported from ``'module:attribute'``."""
    if name in _REGISTRY:
        target = _REGISTRY[name]
        return target if isinstance(target, SweepTrainable) else _import(target)
    if ":" in name:
        return _import(name)
    raise UnknownName(f"unknown trainable '{name}'; registered: {', '.join(available())} "
                   "(or give 'package.module:attribute')")
