"""What a sweep trainable is (:class:`SweepTrainable`); :mod:`tn_ray.sweep.registry` knows them by name.

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
store (``tune.with_parameters``). tn_ray's own trainables live in :mod:`tn_ray.sweep.trainables`;
a user's own is registered with ``register("mine", "mypackage.trainables:TRAINABLE")``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from tn_ray.config import StrictModel

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
