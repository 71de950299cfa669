"""The unfinished runs of a study as one Ray Tune experiment (:func:`run_trials`): a trial per run (a fine-tuning
cell, or a best-of-n run whose cells share one generation), its parameter the run's id.

Each trial calls :func:`~tn_ray.experiments.study.runner.run_cell` in a Tune function trainable: the method's own
``run`` (its Ray Train ``TorchTrainer``, Ray Data generation and reward actors start inside the trial, as a sweep
trial's do), which resumes from the run's folder and writes its ``done.json``. Progress lines come from a Tune
callback in the driver. A trial that fails does not stop the others; the failures are named together, in one
line, once every trial has ended. Each invocation of ``tn-ray study`` is one experiment
(``<out>/tune/attempt-<k>``) over the runs not finished yet: the runs' own folders (checkpoints, generation and
score caches, ``done.json``) carry the study across interruptions, so Tune's experiment restore is not used.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tn_ray.errors import TnRayError
from tn_ray.experiments.study.config import StudyConfig
from tn_ray.experiments.study.plan import Cell
from tn_ray.storage import absolute, join_uri

EXPERIMENTS = "tune"  # <out>/tune/attempt-<k>: one Tune experiment per invocation


def cell_trial(
    config: dict[str, Any], *, cells: dict[str, Cell], run_cell: Callable, allow_provenance_change: bool, workdir: str
):
    """The Tune function of one run: the run (resuming from its folder), then one report of its record. It runs in
    the driver's working folder where this machine has it (Tune starts a trial in a folder of its own), so the
    relative paths of the base YAMLs (contrastive sets, prompt files) mean what they mean to ``tn-ray study``."""
    import os

    from ray import tune

    if os.path.isdir(workdir):
        os.chdir(workdir)

    done = run_cell(cells[config["cell"]], allow_provenance_change)
    tune.report({"wall_s": done["wall_s"], "cells": len(done.get("cells", [])), "done": 1})


def experiment_path(grid: StudyConfig) -> tuple[str, str]:
    """(storage path, experiment name) of this invocation: the next free ``attempt-<k>`` under ``<out>/tune``."""
    out = absolute(grid.out)
    if "://" in out:  # no folder listing on every store: a time stamp tells attempts apart
        return join_uri(out, EXPERIMENTS), f"attempt-{int(time.time())}"
    root = Path(out) / EXPERIMENTS
    k = 1 + sum(1 for p in root.glob("attempt-*") if p.is_dir()) if root.is_dir() else 1
    return str(root), f"attempt-{k}"


def _progress(cells: dict[str, Cell], states: dict[str, str], echo: Callable[[str], None], done: Callable):
    from ray.tune import Callback

    class StudyProgress(Callback):
        """One line as each run starts, ends or fails (the driver's view of the trials)."""

        def on_trial_start(self, iteration, trials, trial, **info):
            cell = cells[trial.config["cell"]]
            echo(f"{cell.key.label}: {'resuming' if states[cell.key.id] != 'new' else 'starting'}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            cell = cells[trial.config["cell"]]
            echo(f"{cell.key.label}: {done(cell)}")

        def on_trial_error(self, iteration, trials, trial, **info):
            cell = cells[trial.config["cell"]]
            echo(f"{cell.key.label}: failed (rerun the same command with --resume to resume it)")

    return StudyProgress()


def first_line(error: BaseException | None) -> str:
    """The failing run's own message: the innermost cause's first line (Tune wraps it in a RayTaskError)."""
    while error is not None and getattr(error, "cause", None) is not None and error.cause is not error:
        error = error.cause
    text = str(error).strip().splitlines() if error is not None else []
    lines = [line.strip() for line in text if line.strip() and not line.startswith(("Traceback", "  File", "ray::"))]
    name = type(error).__name__ if error is not None else "error"
    return lines[-1] if lines else name


def run_trials(
    grid: StudyConfig,
    todo: list[Cell],
    states: dict[str, str],
    run_cell: Callable,
    describe_done: Callable,
    echo: Callable[[str], None],
    allow_provenance_change: bool = False,
) -> None:
    """The runs in ``todo`` as the trials of one Tune experiment (``grid.trials``: concurrency and each trial's
    CPUs); raises one :class:`TnRayError` naming every failed run once the others have ended."""
    import logging
    import os

    from ray import tune
    from ray.tune import FailureConfig, RunConfig, TuneConfig, Tuner

    logging.getLogger("tensorboardX").setLevel(logging.WARNING)
    cells = {cell.key.id: cell for cell in todo}
    trainable = tune.with_parameters(
        cell_trial, cells=cells, run_cell=run_cell, allow_provenance_change=allow_provenance_change,
        workdir=os.getcwd(),
    )
    storage, name = experiment_path(grid)
    tuner = Tuner(
        tune.with_resources(trainable, {"cpu": grid.trials.cpu}),
        param_space={"cell": tune.grid_search([cell.key.id for cell in todo])},
        tune_config=TuneConfig(
            max_concurrent_trials=grid.trials.max_concurrent,
            trial_dirname_creator=lambda trial: trial.config["cell"],
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            verbose=0,
            failure_config=FailureConfig(max_failures=0, fail_fast=False),
            callbacks=[_progress(cells, states, echo, describe_done)],
        ),
    )
    results = tuner.fit()
    failed = [(cells[r.config["cell"]], first_line(r.error)) for r in results if r.error is not None]
    if failed:
        shown = "; ".join(f"{cell.key.id}: {msg}" for cell, msg in failed[:3])
        more = f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
        raise TnRayError(
            f"{len(failed)} of {len(todo)} runs failed ({shown}{more}); finished runs are kept: rerun the same "
            "command with --resume to continue"
        )
