"""Running a study (:func:`run`): the plan checked, each unfinished run's preflight, then the unfinished runs as
the trials of one Ray Tune experiment (``tune_runs``; :func:`run_cell` is a trial's body and writes the run's
``done.json``), then the report."""

from __future__ import annotations

import json
import time
from typing import Any

from tn_ray.config import ConfigError
from tn_ray.diffusion.pipelines import check_scheduler, check_source
from tn_ray.errors import InputError, TnRayError
from tn_ray.experiments.study.config import METHODS, StudyConfig, load_target
from tn_ray.experiments.study.dry_run import describe
from tn_ray.experiments.study.plan import Cell, plan
from tn_ray.experiments.study.report import write_report
from tn_ray.experiments.study.state import DONE, changed, read_done, status
from tn_ray.experiments.world import ensure_models
from tn_ray.prompts.contrast import generates, load_contrast, sets_for
from tn_ray.rewards.availability import check_weights
from tn_ray.storage import Store, read_any
from tn_ray.training.preflight import check_run


def _preflight_bestofn(cfg: Any) -> None:
    """What ``tn-ray bestofn`` checks before Ray starts: prompts and contrastive sets, pipeline, weights."""
    from tn_ray.experiments.bestofn import resolve_prompts

    contrast = (
        sets_for(cfg.contrast, cfg.prompts)
        if generates(cfg.contrast)
        else load_contrast(cfg.contrast, tia2_dir=cfg.tia2_dir)
    )
    resolve_prompts(cfg, contrast)
    check_source(cfg.generation.pipeline, cfg.generation.revision)
    check_scheduler(cfg.generation.scheduler)
    if not cfg.service:
        check_weights(cfg.models)


def preflight(cells: list[Cell]) -> None:
    """Each unfinished run's preflight (pipeline and reward weights found, prompts and contrastive sets), and
    the world proxies trained here once (before Ray actors load them); an error names the run."""
    from tn_ray.training.config import resolve_prompts

    models = []
    for cell in cells:
        cfg = cell.config
        try:
            if cell.key.kind == "bestofn":
                _preflight_bestofn(cfg)
                models += cfg.models
                continue
            check_run(cfg, resolve_prompts(cfg))
        except TnRayError as err:
            raise InputError(f"{cell.key.label}: {err}") from err
        models += [*cfg.reward.models, *(m for j in cfg.eval.judges for m in j.models)]
    ensure_models(list(dict.fromkeys(models)))


def run_cell(cell: Cell, allow_provenance_change: bool = False) -> dict[str, Any]:
    """The run of the cell's method (resuming from its folder), then its ``done.json``; returns the record."""

    start = time.time()
    paths = load_target(METHODS[cell.key.kind][1])(cell.config, allow_provenance_change=allow_provenance_change)
    done = {
        "cell": cell.key.id,
        "method": cell.key.method,
        "reward": cell.key.reward,
        "kl": None if cell.key.kind == "bestofn" else cell.key.kl,
        "seed": cell.key.seed,
        "cells": [c.id for c in cell.cells],
        "wall_s": round(time.time() - start, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "paths": {k: str(v) for k, v in paths.items()},
        "config": cell.config.model_dump(mode="json"),
    }
    Store(cell.key.out).write_text(DONE, json.dumps(done, indent=1))
    return done


def run(
    grid: StudyConfig,
    source: str = "grid",
    allow_provenance_change: bool = False,
    echo=None,
    resume: bool = True,
) -> dict[str, Any]:
    """The unfinished runs as one Tune experiment (a trial per run, ``grid.trials``), then the report. With
    ``resume`` a finished run is skipped and a started one continued (a finished run whose config changed is an
    error, or with ``allow_provenance_change`` is continued under the new one); without it a study folder holding
    any started run is an error (``tn-ray study`` without --resume). Progress lines
    (``cell 3/48 rwr-textnorm-kl1-s0: ...``) go to ``echo`` (default: printed). Returns the report's paths."""
    import yaml

    echo = echo or (lambda line: print(line, flush=True))
    cells = plan(grid, source)
    if not resume:
        started = [c.key.id for c in cells if status(c) != "new"]
        if started:
            raise ConfigError(
                f"{source}: out {grid.out} already holds {len(started)} started or finished runs (e.g. {started[0]}); "
                "add --resume to continue the study, or set a new `out`"
            )
    todo: list[Cell] = []
    for cell in cells:
        done = read_done(cell.key.out)
        diff = changed(cell, done) if done else []
        if diff and not allow_provenance_change:
            shown = "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")
            raise ConfigError(
                f"{source}: {cell.key.label}: finished under another config ({shown}); use a new `out`, "
                "or add --allow-provenance-change to continue it under this one"
            )
        if done is None or diff:
            todo.append(cell)
    Store(grid.out).write_text("grid.yaml", yaml.safe_dump(grid.model_dump(mode="json"), sort_keys=False))
    echo(describe(grid, cells)[0])
    if todo:
        preflight(todo)
    pending = {cell.key.id for cell in todo}
    for cell in cells:
        if cell.key.id not in pending:
            echo(f"{cell.key.label}: finished before, skipped")
    if todo:
        from tn_ray.experiments.study.tune_runs import run_trials

        started = _start_ray(todo)
        try:
            run_trials(grid, todo, {c.key.id: status(c) for c in todo}, run_cell, _done_line, echo,
                       allow_provenance_change)
        finally:
            if started:
                import ray

                ray.shutdown()
    paths = write_report(grid)
    echo(f"report: {paths['report_md']}")
    return paths


def _start_ray(todo: list[Cell]) -> bool:
    """Ray up for the cells (their shared `ray` block); True when started here (and so stopped here)."""
    if not todo:
        return False
    import ray

    from tn_ray.cluster import init_ray

    if ray.is_initialized():
        return False
    init_ray(todo[0].config.ray)
    return True


def _done_line(cell: Cell) -> str:
    """``done in 212 s; the paper's rule selects step 50 (...)``: the run's ``done.json`` in a progress line."""
    done = read_done(cell.key.out) or {}
    return f"done in {done.get('wall_s', 0):.0f} s; {_selected(done)}" if done else "ended without done.json"


def _selected(done: dict) -> str:
    if done.get("kl") is None and "selections" in done["paths"]:
        return f"{len(done.get('cells', []))} best-of-n cells selected from one generation"
    path = done["paths"].get("selection")
    if not path:
        return "no checkpoint evaluated"

    sel = json.loads(read_any(path))
    return f"the paper's rule selects step {sel['paper_rule_step']} ({sel['training_reward']['column']})"
