"""``tn-ray sweep``: a Ray Tune ``Tuner`` with a seeded ``OptunaSearch``, resumable.

Flow: validate the YAML (keys, ranges, the trainable's options and parameters) -> the
trainable's ``prepare`` loads the shared data once (score matrices...) -> Ray starts ->
one Tune experiment per sweep (plus one per fold for the held-out protocol), the data shipped
to trials through the object store (``tune.with_parameters``) -> trials CSV, best config and
plots under ``results/sweeps/<name>/`` and the experiment folder.

Layout (``storage`` = ``storage_path``, or ``<out>/tune``): the Tune experiment is
``<storage>/<name>`` (``<name>-fold<k>`` per fold) and its ledger ``<storage>/<name>-ledger``.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from tn_ray import provenance
from tn_ray.config import ConfigError, dump_config, load_config, validate
from tn_ray.storage import check_output_dir, join_uri
from tn_ray.sweep import outputs, registry
from tn_ray.sweep.config import SweepConfig
from tn_ray.sweep.ledger import TrialLedger, config_key, resolve_uri
from tn_ray.sweep.searcher import decode, encoded_params, make_searcher
from tn_ray.sweep.trainable import RESERVED, SweepTrainable

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# validation (before anything starts)
# ---------------------------------------------------------------------------------------


def _fail(source: str, key: str, message: str) -> ConfigError:
    return ConfigError(f"invalid configuration in {source}:\n  key '{key}': {message}")


def check(cfg: SweepConfig, source: str = "<config>") -> tuple[SweepTrainable, Any]:
    """The trainable and its validated options; :class:`ConfigError` naming the bad key."""
    try:
        entry = registry.get(cfg.trainable)
    except KeyError as err:
        raise _fail(source, "trainable", err.args[0]) from None
    options = validate(entry.options, cfg.options, source, prefix=("options",))
    for section, names in (("space", cfg.space), ("fixed", cfg.fixed)):
        reserved = [k for k in names if k in RESERVED]
        if reserved:
            raise _fail(source, f"{section}.{reserved[0]}", f"'{reserved[0]}' is reserved for the held-out protocol "
                                                            "(`heldout:`)")
    if cfg.heldout and not entry.supports_folds:
        raise _fail(source, "heldout", f"trainable '{entry.name}' does not support the held-out protocol")
    if entry.kind == "train" and cfg.scheduler is None:
        log.info("no scheduler: every trial of '%s' runs to the end (add `scheduler:` for ASHA)", entry.name)
    if entry.check_param is not None:
        values = [(f"space.{n}", n, v) for n, spec in cfg.space.items() for v in spec.candidates()]
        values += [(f"fixed.{n}", n, v) for n, v in cfg.fixed.items()]
        values += [
            (f"points_to_evaluate[{i}].{n}", n, v) for i, p in enumerate(cfg.points_to_evaluate) for n, v in p.items()
        ]
        for key, name, value in values:
            try:
                problem = entry.check_param(options, name, value)
            except (FileNotFoundError, ValueError) as err:  # the options point at missing / bad data
                raise _fail(source, "options", str(err)) from None
            if problem:
                raise _fail(source, key, problem)
    return entry, options


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepConfig:
    """Read and fully validate a sweep YAML (``overrides``: dotted keys -> values)."""
    cfg = load_config(path, SweepConfig, overrides)
    check(cfg, str(path))
    return cfg


# ---------------------------------------------------------------------------------------
# trials
# ---------------------------------------------------------------------------------------


def evaluation_trial(
    config: dict[str, Any], *, fn, data, ledger_root: str, fingerprint: str, encoded: list[str]
) -> None:
    """A Tune trial around a pure ``evaluate(params, data)``: ledger first, then evaluate once."""
    from ray import tune

    ledger = TrialLedger(ledger_root)
    key = config_key(config, fingerprint)
    record = ledger.get(key)
    if record is not None:  # evaluated before (by a run the driver lost): answer, don't recompute
        tune.report({**record["metrics"], "from_ledger": 1})
        return
    start = time.perf_counter()
    metrics = fn(decode(config, encoded), data)
    ledger.put(key, config, metrics, tune.get_context().get_trial_id(), time.perf_counter() - start)
    tune.report({**metrics, "from_ledger": 0})


def training_trial(config: dict[str, Any], *, fn, data, encoded: list[str]) -> None:
    """A Tune trial around ``train(config, data)`` (it reports and checkpoints itself)."""
    fn(decode(config, encoded), data)


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _trainable(entry: SweepTrainable, cfg: SweepConfig, data: Any, ledger_root: str, fingerprint: str):
    from ray import tune

    encoded = encoded_params(cfg)
    if entry.kind == "evaluate":
        fn = tune.with_parameters(
            evaluation_trial, fn=entry.fn, data=data, ledger_root=ledger_root, fingerprint=fingerprint, encoded=encoded
        )
    else:
        fn = tune.with_parameters(training_trial, fn=entry.fn, data=data, encoded=encoded)
    return tune.with_resources(fn, {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu})


@dataclass
class Experiment:
    name: str
    storage: str
    fixed: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return join_uri(self.storage, self.name)

    @property
    def ledger_root(self) -> str:
        return join_uri(self.storage, f"{self.name}-ledger")


def run_experiment(cfg: SweepConfig, entry: SweepTrainable, data: Any, exp: Experiment, resume: bool):
    """Run (or resume) one Tune experiment; returns its ``ResultGrid``."""
    from ray.tune import CheckpointConfig, RunConfig, TuneConfig, Tuner
    from ray.tune.schedulers import ASHAScheduler

    logging.getLogger("tensorboardX").setLevel(logging.WARNING)  # one line per metric name with '@' otherwise
    # how often Tune snapshots trial states + searcher for Tuner.restore (read when fit() starts)
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = str(cfg.experiment_checkpoint_s)
    # Tune snapshots whenever a trial has checkpointed `keep_checkpoints` times (so a resume
    # never points at a deleted checkpoint) and warns about it each time: that is intended here
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    trainable = _trainable(entry, cfg, data, exp.ledger_root, getattr(data, "fingerprint", ""))
    if Tuner.can_restore(exp.path):
        if not resume:
            raise ConfigError(
                f"sweep experiment '{exp.name}' already exists at {exp.path}: "
                "add --resume to continue it, or change `name` / `out`"
            )
        log.info("resuming %s (finished trials kept, searcher state restored)", exp.path)
        tuner = Tuner.restore(exp.path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        scheduler = None
        if cfg.scheduler is not None:
            s = cfg.scheduler
            scheduler = ASHAScheduler(
                time_attr=s.time_attr,
                metric=cfg.metric,
                mode=cfg.mode,
                max_t=s.max_t,
                grace_period=s.grace_period,
                reduction_factor=s.reduction_factor,
            )
        tuner = Tuner(
            trainable,
            param_space=dict(exp.fixed),
            tune_config=TuneConfig(
                search_alg=make_searcher(cfg, exp.ledger_root, cfg.metric, cfg.mode),
                scheduler=scheduler,
                num_samples=cfg.trials,
                max_concurrent_trials=cfg.max_concurrent_trials,
                reuse_actors=entry.kind == "evaluate",
                trial_dirname_creator=trial_dirname,
            ),
            run_config=RunConfig(
                name=exp.name,
                storage_path=exp.storage,
                verbose=cfg.verbose,
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            ),
        )
    start = time.time()
    grid = tuner.fit()
    log.info(
        "experiment %s: %d trials (%d errored) in %.1f s", exp.name, len(grid), len(grid.errors), time.time() - start
    )
    return grid


# ---------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------


def _check_resumable(cfg: SweepConfig, out: Path, resume: bool) -> None:
    saved = out / "sweep.yaml"
    if not (resume and saved.is_file()):
        return
    before = SweepConfig.model_validate(yaml.safe_load(saved.read_text())).search_fingerprint()
    now = cfg.search_fingerprint()
    changed = sorted(k for k in now if now[k] != before.get(k))
    if changed:
        raise ConfigError(
            f"cannot resume sweep '{cfg.name}': {', '.join(changed)} changed since it started "
            f"(saved config: {saved}); resume with the same settings or use a new `name`"
        )


def _warn_resources(cfg: SweepConfig) -> None:
    import ray

    have = ray.cluster_resources()
    for name, want in (("CPU", cfg.resources.cpu), ("GPU", cfg.resources.gpu)):
        if want > have.get(name, 0):
            log.warning(
                "each trial asks for %s %s but the cluster has %s now: trials wait until an autoscaler "
                "adds nodes (set resources.%s lower to run here)",
                want,
                name,
                have.get(name, 0),
                name.lower(),
            )


def _upload(paths: dict[str, Path], target: str) -> None:
    """Copy the summary files into the sweep's (local or cloud) experiment folder."""
    from pyarrow import fs as pafs

    fs, base = pafs.FileSystem.from_uri(target) if "://" in target else (pafs.LocalFileSystem(), target)
    fs.create_dir(base, recursive=True)
    for p in paths.values():
        if Path(p).is_file():
            pafs.copy_files(
                str(Path(p).resolve()),
                f"{base}/{Path(p).name}",
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=fs,
            )


def run_sweep(
    cfg: SweepConfig, resume: bool = False, source: str = "<config>", allow_provenance_change: bool = False
) -> dict[str, Path | str]:
    """Run (or resume) the sweep ``cfg``; returns the paths of its outputs."""
    from ray.tune import Tuner

    from tn_ray.cluster import init_ray

    entry, options = check(cfg, source)
    out = Path(cfg.out_dir())
    storage = resolve_uri(cfg.storage_path or str(out / "tune"))
    main = Experiment(cfg.name, storage, dict(cfg.fixed))
    if not resume and Tuner.can_restore(main.path):
        raise ConfigError(
            f"sweep '{cfg.name}' already exists at {main.path}: add --resume to continue it, or change `name` / `out`"
        )
    if resume and not Tuner.can_restore(main.path):
        raise ConfigError(
            f"--resume: sweep '{cfg.name}' has nothing to resume at {main.path} (it never started "
            "there); run it without --resume, or check `name` / `out` / `storage_path`"
        )
    _check_resumable(cfg, out, resume)
    check_output_dir(out)  # the summary folder and Tune's storage, named before any work
    check_output_dir(storage)
    log.info("sweep %s: trainable %s, %d trials, storage %s", cfg.name, entry.name, cfg.trials, storage)
    data = entry.prepare(options, cfg) if entry.prepare is not None else options
    provenance.record(out, cfg, allow_change=allow_provenance_change)
    dump_config(cfg, out / "sweep.yaml")
    init_ray(cfg.ray)
    _warn_resources(cfg)
    encoded = encoded_params(cfg)
    grid = run_experiment(cfg, entry, data, main, resume)
    table = outputs.trials_table(grid, cfg, encoded)
    best = outputs.best_record(table, grid, cfg, encoded)
    paths = outputs.write(table, best, cfg, out)
    if cfg.heldout is not None:
        paths.update(run_heldout(cfg, entry, data, storage, resume, best, out))
    _upload(paths, join_uri(main.path, "summary"))
    paths["experiment"] = main.path
    paths["out"] = out
    return paths


def run_heldout(
    cfg: SweepConfig, entry: SweepTrainable, data: Any, storage: str, resume: bool, full_best: dict[str, Any], out: Path
) -> dict[str, Path]:
    """k-fold over prompts: tune on k-1 folds, report the tuned setting on the unseen fold."""
    assert cfg.heldout is not None
    encoded = encoded_params(cfg)
    rows = []
    for k in range(cfg.heldout.folds):
        exp = Experiment(f"{cfg.name}-fold{k}", storage, {**cfg.fixed, "fold": k, "split": "train"})
        grid = run_experiment(cfg, entry, data, exp, resume)
        table = outputs.trials_table(grid, cfg, encoded)
        best = outputs.best_record(table, grid, cfg, encoded)
        outputs.write(table, best, cfg, out / "folds", stem=f"fold{k}_")
        test = entry.fn({**best["params"], **cfg.fixed, "fold": k, "split": "test"}, data)
        rows.append(
            {
                "fold": str(k),
                "params": json.dumps(best["params"], sort_keys=True),
                "train_prompts": int(best["metrics"].get("n_prompts", 0)),
                "test_prompts": int(test.get("n_prompts", 0)),
                "in_sample": best["value"],
                "held_out": float(test[cfg.metric]),
            }
        )
    rows.append(
        {
            "fold": "all",
            "params": json.dumps(full_best["params"], sort_keys=True),
            "train_prompts": int(full_best["metrics"].get("n_prompts", 0)),
            "test_prompts": 0,
            "in_sample": full_best["value"],
            "held_out": float("nan"),
        }
    )
    table = pd.DataFrame(rows)
    folds = table[table["fold"] != "all"]
    summary = {
        "folds": cfg.heldout.folds,
        "metric": cfg.metric,
        "in_sample_mean": float(folds["in_sample"].mean()),
        "held_out_mean": float(folds["held_out"].mean()),
        "held_out_std": float(folds["held_out"].std(ddof=1)),
        "tuned_on_all_prompts": full_best["value"],
    }
    paths = {"heldout": out / "heldout.csv", "heldout_md": out / "heldout.md"}
    table.to_csv(paths["heldout"], index=False)
    md = [
        f"# Held-out protocol: {cfg.name}",
        "",
        f"{cfg.heldout.folds}-fold split over prompts (seed {cfg.heldout.seed}); each fold's sweep tunes on the "
        f"other folds' prompts and is scored on its own, unseen prompts. Metric: {cfg.metric} ({cfg.mode}).",
        "",
        table.to_markdown(index=False, floatfmt=".4f"),
        "",
        f"- in-sample (mean over folds): {summary['in_sample_mean']:.4f}",
        f"- held-out (mean over folds): {summary['held_out_mean']:.4f} (std {summary['held_out_std']:.4f})",
        f"- tuned and scored on all prompts (the paper's protocol): {summary['tuned_on_all_prompts']:.4f}",
        "",
    ]
    paths["heldout_md"].write_text("\n".join(md))
    (out / "heldout.json").write_text(json.dumps(summary, indent=1))
    paths["heldout_json"] = out / "heldout.json"
    return paths


def load_and_run(
    path: str | Path,
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
    allow_provenance_change: bool = False,
) -> dict[str, Path | str]:
    cfg = load(path, overrides)
    return run_sweep(cfg, resume=resume, source=str(path), allow_provenance_change=allow_provenance_change)


__all__ = ["check", "load", "load_and_run", "run_experiment", "run_sweep"]
