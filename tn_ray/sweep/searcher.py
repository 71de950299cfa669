"""The sweep's search algorithm: Ray Tune's ``OptunaSearch``, seeded, resumable.

The YAML space becomes Optuna distributions (``loguniform``/``uniform`` -> FloatDistribution,
``choice``/``grid`` -> CategoricalDistribution); a grid space uses Optuna's ``GridSampler``
(every point once), anything else the seeded ``TPESampler``. Optuna's categorical values must
be scalars, so a choice over lists (``members: {choice: [[clip], [clip, pickscore]]}``) is
searched as JSON text and decoded before the trial sees it (:func:`decode`).

Resume (ray issue 30861 reported ``Tuner.restore`` dropping the searcher's state; Ray now
restores it from the experiment snapshot, which this runner checks in its resume test). The
remaining gap is the snapshot interval: trials that finished after the last snapshot are
unknown to the restored searcher. Every configuration's result is in the sweep's ledger, and a
trial whose configuration is there is answered from it, never evaluated again. What a resumed
sweep draws then depends on the concurrency:

* ``max_concurrent_trials: 1``: the restored sampler (its RNG state and the same finished
  trials as when it first drew) draws again exactly what it drew after the snapshot; those
  configurations are answered from the ledger. The resumed sweep runs exactly the N
  configurations an uninterrupted one runs, in the same order.
* ``max_concurrent_trials > 1``: what TPE draws after its random start-up trials depends on
  which trials had finished when it drew, i.e. on timing: two uninterrupted runs with the same
  seed already differ. On restore :class:`LedgerOptunaSearch` enqueues the ledger's
  configurations the snapshot lost, so each is part of the resumed sweep (no evaluation is
  wasted) and ``suggest`` redraws any repeat. What holds for every kill moment: N trials, N
  distinct configurations, each evaluated exactly once, every configuration evaluated before
  the kill among them. While every draw is independent of results (TPE's start-up trials:
  ``num_samples`` <= 10; a grid) the N configurations are also those an uninterrupted run draws.

``tests/test_sweep_resume.py`` drives the searcher as Tune does and checks each statement for
every kill moment and many completion orders.
"""
from __future__ import annotations

import json
import logging
import pickle
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from ray.tune.search.optuna import OptunaSearch

from tn_ray.sweep.config import SweepConfig
from tn_ray.sweep.ledger import TrialLedger

log = logging.getLogger(__name__)

_SCALARS = (type(None), bool, int, float, str)


def encoded_params(cfg: SweepConfig) -> list[str]:
    """Parameters whose values are searched as JSON text (choices over lists or mappings)."""
    return [name for name, p in cfg.space.items()
            if p.values is not None and not all(isinstance(v, _SCALARS) for v in p.values)]


def encode_value(value: Any) -> Any:
    return value if isinstance(value, _SCALARS) else json.dumps(value, sort_keys=True)


def decode(config: dict[str, Any], encoded: list[str]) -> dict[str, Any]:
    """A trial configuration with JSON-encoded choices turned back into their values."""
    return {k: (json.loads(v) if k in encoded and isinstance(v, str) else v) for k, v in config.items()}


def distributions(cfg: SweepConfig) -> dict[str, BaseDistribution]:
    enc = set(encoded_params(cfg))
    out: dict[str, BaseDistribution] = {}
    for name, p in cfg.space.items():
        if p.loguniform is not None:
            out[name] = FloatDistribution(*p.loguniform, log=True)
        elif p.uniform is not None:
            out[name] = FloatDistribution(*p.uniform)
        else:
            out[name] = CategoricalDistribution([encode_value(v) if name in enc else v for v in p.values])
    return out


class LedgerOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that, when restored, replays the ledger's configurations it lost."""

    MAX_REDRAWS = 50

    def __init__(self, *args, ledger_root: str, replay: bool = True, **kwargs):
        self._ledger_root = ledger_root
        self._replay = replay  # enqueue the ledger's configurations on restore (see the module docstring)
        self.replayed: list[dict[str, Any]] = []
        self._taken: set[str] = set()  # configurations already handed to a trial
        self._replays: set[str] = set()  # enqueued ledger configurations not handed out yet
        super().__init__(*args, **kwargs)

    def suggest(self, trial_id: str):
        """Optuna's suggestion, redrawn while it repeats a configuration already run.

        A seeded sampler restored from a snapshot proposes again what it proposed after that
        snapshot, i.e. the very configurations the ledger replays; and TPE may repeat a point
        of a discrete space. Either way a repeat would waste a trial, so it is discarded
        (marked failed, which TPE ignores) and drawn again.
        """
        config = None
        for _ in range(self.MAX_REDRAWS):
            config = super().suggest(trial_id)
            if config is None:
                return None
            key = self._params_key(self._ot_trials[trial_id].params)
            if key in self._replays:
                self._replays.discard(key)
            elif key in self._taken:
                self._ot_study.tell(self._ot_trials.pop(trial_id), state=optuna.trial.TrialState.FAIL)
                continue
            self._taken.add(key)
            return config
        log.warning("no new configuration after %d draws (space exhausted?); running a repeat", self.MAX_REDRAWS)
        return config

    def restore(self, checkpoint_path: str):
        try:
            super().restore(checkpoint_path)
        except (EOFError, pickle.UnpicklingError) as err:
            # a driver killed while Tune copied or wrote this file leaves it empty or cut short; refusing it would
            # make Tune restart the whole experiment (every trial from scratch), so Optuna starts afresh instead and
            # the trials Tune restores resume from their checkpoints (the ledger, when on, replays the finished ones)
            log.warning("searcher state %s is unreadable (%s: written when the driver was killed); Optuna's history "
                        "starts afresh, the trials resume from their checkpoints", checkpoint_path, err)
        self._taken = {self._params_key(t.params) for t in self._ot_trials.values()}
        self._replays = set()
        self.replayed = []
        if not self._replay:
            log.info("searcher restored: %d trials known to Optuna; the rest is drawn again as it was",
                     len(self._ot_trials))
            return
        for record in TrialLedger(self._ledger_root).results():
            params = {k: record["config"][k] for k in self._space if k in record["config"]}
            key = self._params_key(params)
            if len(params) == len(self._space) and key not in self._taken and key not in self._replays:
                self._ot_study.enqueue_trial(params)
                self._replays.add(key)
                self.replayed.append(params)
        log.info("searcher restored: %d trials known to Optuna, %d finished configurations replayed from the ledger",
                 len(self._ot_trials), len(self.replayed))

    @staticmethod
    def _params_key(params: dict[str, Any]) -> str:
        return json.dumps(params, sort_keys=True, default=str)


def make_searcher(cfg: SweepConfig, ledger_root: str, metric: str, mode: str) -> LedgerOptunaSearch:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = distributions(cfg)
    sampler = None
    if cfg.is_grid:
        sampler = optuna.samplers.GridSampler({k: list(d.choices) for k, d in space.items()}, seed=cfg.seed)
    enc = set(encoded_params(cfg))
    points = [{k: (encode_value(v) if k in enc else v) for k, v in p.items()} for p in cfg.points_to_evaluate]
    return LedgerOptunaSearch(space=space, metric=metric, mode=mode, sampler=sampler,
                              seed=None if sampler else cfg.seed, points_to_evaluate=points or None,
                              ledger_root=ledger_root, replay=cfg.max_concurrent_trials > 1)
