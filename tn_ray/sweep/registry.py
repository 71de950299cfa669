"""Trainables the sweep runner knows by name.

Two kinds share one runner:

- ``evaluate``: a pure function ``evaluate(params, data) -> metrics`` of a trial's parameters
  and the sweep's shared data (score matrices...). The runner wraps it as a Tune function
  trainable that reports once, and records each result in the sweep's ledger so a resumed
  sweep never evaluates a configuration twice. Such trainables can run the held-out protocol
  (``supports_folds``): the runner adds the reserved parameters ``fold`` and ``split``.
- ``train``: a Tune function trainable ``train(config, data)`` that calls
  ``ray.tune.report(metrics, checkpoint=...)`` once per epoch and resumes from
  ``ray.tune.get_checkpoint()``; ASHA may stop it between epochs.

``prepare(options, sweep_config) -> data`` runs once per sweep in the driver (loading score
matrices, building datasets); the runner ships ``data`` to the trials through Ray's object
store (``tune.with_parameters``). Later issues add their trainables (RWR, DDPO) with
``register("rwr", "tn_ray.rwr_sweep:TRAINABLE")``.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from tn_ray.config import StrictModel
from tn_ray.errors import UnknownName

RESERVED = ("fold", "split")


@dataclass(frozen=True)
class SweepTrainable:
    name: str
    kind: Literal["evaluate", "train"]
    fn: Callable[..., Any]  # evaluate(params, data) -> dict | train(config, data) -> None
    options: type[StrictModel]  # the YAML `options:` block
    prepare: Callable[[Any, Any], Any] | None = None  # (options, SweepConfig) -> data; None: data = options
    check_param: Callable[[Any, str, Any], str | None] | None = None  # (options, name, value) -> error or None
    supports_folds: bool = False
    description: str = ""


# name -> "module:attribute" (imported on first use, so listing names imports nothing heavy)
_REGISTRY: dict[str, str | SweepTrainable] = {
    "tia2_textnorm": "tn_ray.sweep.evaluators:TIA2_TEXTNORM",
    "bestofn_selection": "tn_ray.sweep.evaluators:BESTOFN_SELECTION",
    "toy_regression": "tn_ray.sweep.toy:TOY_REGRESSION",
    "reward_head": "tn_ray.reward_learning.sweep:REWARD_HEAD",
    "rwr": "tn_ray.training.rwr_sweep:RWR",
    "ddpo": "tn_ray.training.ddpo_sweep:DDPO",
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
        raise UnknownName(f"'{target}' is a {type(obj).__name__}, not a tn_ray.sweep.registry.SweepTrainable")
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
