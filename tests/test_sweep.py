"""Sweeps (Ray Tune + Optuna): vectorised metrics, TextNorm / best-of-n evaluators, the tau
sweep vs a grid, the SIGKILL resume, YAML validation, ASHA + checkpoints of a training
trainable, and the held-out protocol. Every number is checked against an independent path
(tn_ray.textnorm.equations + tn_ray.analysis.metrics, or pandas)."""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tn_ray.analysis import metrics
from tn_ray.config import ConfigError
from tn_ray.scoring.matrix import ScoreMatrix, model_slug
from tn_ray.sweep import fast_metrics
from tn_ray.sweep.config import SweepConfig
from tn_ray.sweep.ledger import TrialLedger
from tn_ray.sweep.runner import load, load_and_run, run_sweep
from tn_ray.sweep.trainables import toy
from tn_ray.sweep.trainables.evaluators import (
    BestOfNSweepOptions,
    Tia2SweepOptions,
    evaluate_bestofn,
    evaluate_tia2,
    prepare_bestofn,
    prepare_tia2,
)
from tn_ray.textnorm.equations import ensemble, textnorm

REPO = Path(__file__).resolve().parents[1]
TINY = ["clip:tiny", "pickscore:tiny"]


# ---------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, ray_session) -> Path:
    """`tia2 eval` output (score matrices + labels) of the tiny models on the quickstart benchmark."""
    from tn_ray.config import ScoringConfig
    from tn_ray.data.shapes import make
    from tn_ray.experiments.tia2_eval import Tia2EvalConfig, run

    root = tmp_path_factory.mktemp("tiny_run")
    tia2_dir, images = make(root / "data")
    run(Tia2EvalConfig(images=str(images), tia2_dir=str(tia2_dir), out=str(root / "eval"), models=TINY,
                       sets=["counting", "composition"], scoring=ScoringConfig(batch_size=32)))
    return root / "eval"


def reference_objective(run_dir: Path, params: dict, prompts: set[str] | None = None) -> float:
    """The TIA2 objective through the per-prompt path: tn_ray.textnorm.equations + tn_ray.analysis.metrics."""
    frame = pd.read_parquet(run_dir / "rewards.parquet")[["set", "prompt", "image_id", "binary", "fine"]]
    members = params.get("members", TINY)
    normalized = []
    for m in members:
        values = ScoreMatrix.load(run_dir / "scores" / f"{model_slug(m)}.parquet").align(frame).values
        normalized.append(textnorm(values, params.get(f"tau[{m}]", params.get("tau", 1.0))))
    frame["reward"] = ensemble(np.stack(normalized), params.get("kind", "mean"), params.get("lam", 0.0))
    if prompts is not None:
        frame = frame[frame["prompt"].isin(prompts)]
    per_set = metrics.per_set(metrics.per_prompt(frame, ["reward"]))
    return float(per_set[["ap@5", "ap@10", "ap@25"]].mean(axis=1).mean())


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tau_sweep(run_dir: Path, out: Path, **extra) -> dict:
    return {"name": "tau", "trainable": "tia2_textnorm",
            "options": {"run_dir": str(run_dir), "models": ["clip:tiny"]},
            "space": {"tau": {"loguniform": [0.01, 10.0]}}, "num_samples": 8, "max_concurrent_trials": 2,
            "seed": 0, "out": str(out), "verbose": 0, "experiment_checkpoint_s": 0.5, **extra}


# ---------------------------------------------------------------------------------------
# vectorised metrics == tn_ray.analysis.metrics
# ---------------------------------------------------------------------------------------

group = st.integers(2, 14).flatmap(lambda n: st.tuples(
    st.lists(st.sampled_from([-1.0, 0.0, 0.25, 0.5, 2.0]), min_size=n, max_size=n),  # scores with ties
    st.lists(st.integers(0, 1), min_size=n, max_size=n).filter(lambda b: 0 < sum(b) < len(b)),
    st.lists(st.sampled_from([0.0, 1 / 3, 0.5, 2 / 3, 1.0]), min_size=n, max_size=n)))


@settings(max_examples=60, deadline=None)
@given(st.lists(group, min_size=1, max_size=6))
def test_vectorised_metrics_equal_the_per_prompt_reference(groups):
    codes = np.concatenate([[i] * len(g[0]) for i, g in enumerate(groups)])
    s, b, f = (np.concatenate([g[j] for g in groups]).astype(float) for j in range(3))
    index = fast_metrics.group_index(codes)
    mask = index >= 0
    got = fast_metrics.prompt_metrics(fast_metrics.gather(s, index), fast_metrics.gather(b, index, 0),
                                      fast_metrics.gather(f, index), mask)
    for i, (gs, gb, gf) in enumerate(groups):
        want = metrics.prompt_metrics(np.array(gs), np.array(gb), np.array(gf))
        for name in metrics.METRICS:
            assert got[name][i] == pytest.approx(want[name], abs=1e-12, nan_ok=True), name


def test_group_index_keeps_input_order_inside_groups():
    codes = np.array([2, 0, 2, 1, 0, 2])
    index = fast_metrics.group_index(codes)
    assert index.tolist() == [[1, 4, -1], [3, -1, -1], [0, 2, 5]]


# ---------------------------------------------------------------------------------------
# evaluators on stored matrices
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [
    {"tau": 0.05, "members": ["clip:tiny"]},
    {"tau": 3.0, "members": ["pickscore:tiny"]},
    {"tau[clip:tiny]": 0.5, "tau[pickscore:tiny]": 2.0, "kind": "uncertainty", "lam": 4.0},
    {"tau": 1.0, "kind": "mean"},
])
def test_tia2_evaluator_equals_the_reference_path(tiny_run, params):
    cfg = SweepConfig.model_validate(tau_sweep(tiny_run, tiny_run / "unused"))
    data = prepare_tia2(Tia2SweepOptions(run_dir=str(tiny_run)), cfg)
    assert evaluate_tia2(params, data)["objective"] == pytest.approx(reference_objective(tiny_run, params), abs=1e-12)


def test_tau_sweep_is_at_least_as_good_as_the_grid(tiny_run, ray_session, tmp_path):
    paths = run_sweep(SweepConfig.model_validate(tau_sweep(tiny_run, tmp_path / "s", num_samples=16)))
    best = yaml.safe_load(Path(paths["best"]).read_text())
    trials = pd.read_csv(paths["trials"])
    assert len(trials) == 16 and trials["tau"].nunique() == 16 and (trials["status"] == "ok").all()
    # the reported value is what the independent per-prompt path gives for that tau
    assert best["value"] == pytest.approx(reference_objective(tiny_run, {"tau": best["params"]["tau"],
                                                                          "members": ["clip:tiny"]}), abs=1e-12)
    grid = {t: reference_objective(tiny_run, {"tau": t, "members": ["clip:tiny"]}) for t in np.geomspace(0.01, 10, 7)}
    assert best["value"] >= max(grid.values()) - 0.01, (best, grid)
    for name in ("trials", "best", "plot"):
        assert Path(paths[name]).stat().st_size > 0
        assert (Path(paths["experiment"]) / "summary" / Path(paths[name]).name).is_file()
    # the matrices went to the trials through the object store, never re-read there
    assert trials["from_ledger"].eq(0).all()


# ---------------------------------------------------------------------------------------
# resume after SIGKILL of the driver
# ---------------------------------------------------------------------------------------


def _driver(yaml_path: Path, ray_session, log: Path, *args: str) -> subprocess.Popen:
    address = ray_session.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "tn_ray.cli", "sweep", str(yaml_path), "--set", f"ray.address={address}", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 1800) -> None:
    """SIGKILL ``proc`` once ``ready()`` (polled state; the deadline is generous for a loaded machine)."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, "the driver finished (or failed) before it could be killed"
        assert time.time() < deadline, "timed out waiting to kill the driver"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


# a kill/resume across processes: minutes on a loaded 2-core machine (its module fixture counts too);
# the deadlines inside wait on observable state, this only raises the hang guard
@pytest.mark.timeout(2400)
def test_sigkill_mid_sweep_then_resume_runs_n_distinct_trials_none_twice(tiny_run, ray_session, tmp_path):
    """Whatever moment the kill lands (trials in flight, concurrency 2): N trials of N distinct
    configurations, each evaluated exactly once, every configuration evaluated before the kill
    among them. (That they are the configurations an uninterrupted run draws holds at
    concurrency 1 or within TPE's random start-up trials only, where draws do not depend on
    timing: tests/test_sweep_resume.py checks that for every kill moment.)"""
    # trials take milliseconds: kill early (3 finished) with a wide margin to n, so a slow
    # poll on a loaded machine still kills the driver mid-sweep
    n = 16
    cfg = write_yaml(tmp_path / "sweep.yaml", tau_sweep(tiny_run, tmp_path / "killed", num_samples=n))
    ledger = TrialLedger(str(tmp_path / "killed" / "tune" / "tau-ledger"))
    proc = _driver(cfg, ray_session, tmp_path / "driver.log")
    _kill_when(proc, lambda: len(ledger.results()) >= 3)
    _wait_until(lambda: not _other_jobs_actors_alive(ray_session), "the killed driver's trials to end")
    evaluated_at_kill = {r["key"] for r in ledger.results()}
    assert proc.returncode == -signal.SIGKILL and len(evaluated_at_kill) < n, len(evaluated_at_kill)

    with pytest.raises(ConfigError, match="--resume"):  # an existing sweep is never silently restarted
        load_and_run(cfg)
    paths = load_and_run(cfg, resume=True)

    trials = pd.read_csv(paths["trials"])
    evaluations = ledger.evaluations()
    print(f"resume test: killed with {len(evaluated_at_kill)}/{n} configurations finished; after resume "
          f"{len(trials)} trials, {trials['trial_id'].nunique()} distinct ids, {trials['tau'].nunique()} distinct "
          "taus, "
          f"{len(evaluations)} evaluations of {len({e['key'] for e in evaluations})} configurations")
    assert len(trials) == n and trials["trial_id"].nunique() == n and (trials["status"] == "ok").all()
    assert trials["tau"].nunique() == n  # n distinct configurations
    assert len(evaluations) == n and len({e["key"] for e in evaluations}) == n  # none evaluated twice
    results = ledger.results()
    assert {round(t, 12) for t in trials["tau"]} == {round(r["config"]["tau"], 12) for r in results}
    assert evaluated_at_kill <= {r["key"] for r in results}  # nothing evaluated before the kill is lost

    # the Optuna searcher was restored, not restarted: its final study holds exactly these n
    # configurations as completed trials, and TPE's random start-up draws are an uninterrupted run's
    import ray.cloudpickle as pickle

    state_file = sorted(glob.glob(str(Path(paths["experiment"]) / "searcher-state-*.pkl")))[-1]
    study = pickle.loads(Path(state_file).read_bytes())["_ot_study"]
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert sorted(round(t.params["tau"], 12) for t in complete) == sorted(round(t, 12) for t in trials["tau"])


def _other_jobs_actors_alive(ray) -> bool:
    """Whether an actor of another Ray job (the killed driver's trials) is still alive: Ray ends
    a dead driver's actors, and a trial in flight may finish its ledger write meanwhile."""
    from ray._private.state import actors  # the GCS's actor table (the state API needs the dashboard)

    mine = ray.get_runtime_context().get_job_id()
    return any(a["JobID"] != mine and a["State"] != "DEAD" for a in actors().values())


def _wait_until(ready, what: str, timeout: float = 900) -> None:
    """Poll observable state until ``ready()``, with a deadline generous for a loaded machine."""
    deadline = time.time() + timeout
    while not ready():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------
# YAML validation: the error names the key
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, key", [
    ({"num_sample": 3}, "num_sample"),
    ({"space": {"tau": {"loguniform": [0.0, 1.0]}}}, "space.tau"),
    ({"space": {"tau": {"uniform": [2.0, 1.0]}}}, "space.tau"),
    ({"space": {"tau": {"loguniform": [0.1, 1.0], "uniform": [0, 1]}}}, "space.tau"),
    ({"space": {"taux": {"loguniform": [0.1, 1.0]}}}, "space.taux"),
    ({"space": {"tau[nope]": {"loguniform": [0.1, 1.0]}}}, "space.tau[nope]"),
    ({"space": {"kind": {"choice": ["mean", "median"]}}}, "space.kind"),
    ({"space": {"lam": {"uniform": [-1.0, 1.0]}}}, "space.lam"),
    ({"space": {"members": {"choice": [["clip:tiny", "hps"]]}}}, "space.members"),
    ({"options": {"run_dri": "x"}}, "options.run_dri"),
    ({"options": {"run_dir": "/no/such/run"}}, "options"),
    ({"options": {"run_dir": "DIR", "objective": ["ap@7"]}}, "options.objective"),
    ({"mode": "maximize"}, "mode"),
    ({"max_concurrent_trials": 0}, "max_concurrent_trials"),
    ({"trainable": "no_such_trainable"}, "trainable"),
    ({"scheduler": {"max_t": 2, "grace_period": 5}}, "scheduler"),
    ({"space": {"tau": {"grid": [0.1, 1.0]}, "lam": {"uniform": [0, 1]}}}, "space"),
    ({"fixed": {"fold": 1}}, "fixed.fold"),
    ({"fixed": {"lam": -2.0}}, "fixed.lam"),
    ({"points_to_evaluate": [{"tau": 50.0}]}, "points_to_evaluate"),
    ({"space": {"tau": {"grid": [0.1, 1.0]}}, "num_samples": 3}, "num_samples"),
])
def test_bad_yaml_is_rejected_naming_the_key(tiny_run, tmp_path, change, key):
    data = tau_sweep(tiny_run, tmp_path / "never")
    data["options"] = {"run_dir": str(tiny_run)}
    for k, v in change.items():
        if k == "options" and v.get("run_dir") == "DIR":
            v = {**v, "run_dir": str(tiny_run)}
        data[k] = v
    with pytest.raises(ConfigError) as err:
        load(write_yaml(tmp_path / "bad.yaml", data))
    assert f"key '{key}'" in str(err.value), str(err.value)
    assert not (tmp_path / "never").exists()  # nothing started


def test_cli_reports_a_bad_key_in_one_line(tiny_run, tmp_path, capsys):
    from tn_ray.cli import main

    data = tau_sweep(tiny_run, tmp_path / "never")
    data["space"] = {"tau": {"logunifrom": [0.1, 1.0]}}
    assert main(["sweep", str(write_yaml(tmp_path / "bad.yaml", data))]) == 2
    err = capsys.readouterr().err
    assert "key 'space.tau.logunifrom': unknown key" in err and "Traceback" not in err


def test_grid_space_runs_every_point_once(tiny_run, ray_session, tmp_path):
    data = tau_sweep(tiny_run, tmp_path / "grid")
    data.pop("num_samples")
    data["space"] = {
        "tau": {"grid": [0.1, 10.0]},
        "members": {"grid": [["clip:tiny"], ["clip:tiny", "pickscore:tiny"]]},
    }
    data["options"] = {"run_dir": str(tiny_run)}
    trials = pd.read_csv(run_sweep(SweepConfig.model_validate(data))["trials"])
    assert len(trials) == 4
    assert set(zip(trials["tau"], trials["members"])) == {
        (t, m) for t in (0.1, 10.0) for m in ("clip:tiny", "clip:tiny+pickscore:tiny")
    }
    row = trials[(trials["tau"] == 0.1) & (trials["members"] == "clip:tiny+pickscore:tiny")].iloc[0]
    assert row["objective"] == pytest.approx(reference_objective(tiny_run, {"tau": 0.1}), abs=1e-12)


# ---------------------------------------------------------------------------------------
# training trainable: ASHA, checkpoints, resume
# ---------------------------------------------------------------------------------------


def toy_sweep(out: Path, **extra) -> dict:
    return {
        "name": "toy",
        "trainable": "toy_regression",
        "options": {"epochs": 4, "samples": 256, "steps_per_epoch": 10},
        "space": {"lr": {"loguniform": [1e-6, 0.1]}},
        "metric": "val_loss",
        "mode": "min",
        "out": str(out),
        "verbose": 0,
        "seed": 0,
        **extra,
    }


def reference_toy(options: dict, params: dict) -> list[float]:
    """val_loss per epoch of an uninterrupted fit, outside Tune."""
    data = toy.prepare(toy.ToyOptions(**options))
    state = toy.new_state(params, data)
    return [toy.fit_epoch(state, params, data)["val_loss"] for _ in range(data.options.epochs)]


def test_asha_stops_the_bad_trial_and_every_epoch_checkpoints(ray_session, tmp_path):
    data = toy_sweep(
        tmp_path / "asha",
        num_samples=2,
        max_concurrent_trials=1,
        points_to_evaluate=[{"lr": 0.05}, {"lr": 1e-6}],
        scheduler={"max_t": 4, "grace_period": 1, "reduction_factor": 2},
    )
    paths = run_sweep(SweepConfig.model_validate(data))
    trials = pd.read_csv(paths["trials"]).set_index("lr")
    assert trials.loc[0.05, "epochs"] == 4 and trials.loc[1e-6, "epochs"] == 1  # ASHA stopped it at the first rung
    good = reference_toy(data["options"], {"lr": 0.05})
    assert trials.loc[0.05, "val_loss"] == pytest.approx(good[-1], rel=1e-6)
    assert trials.loc[1e-6, "val_loss"] > 2 * good[0]
    checkpoints = sorted(glob.glob(str(Path(paths["experiment"]) / "trial_*" / "checkpoint_*" / "state.pt")))
    assert len(checkpoints) >= 3  # newest 2 of the good trial + the stopped one's only epoch


@pytest.mark.timeout(2400)  # a kill/resume across processes (see above)
def test_training_trial_resumes_from_its_checkpoint_after_sigkill(ray_session, tmp_path):
    options = {"epochs": 8, "samples": 512, "steps_per_epoch": 500, "batch_size": 256}
    data = toy_sweep(
        tmp_path / "toy",
        num_samples=1,
        options=options,
        points_to_evaluate=[{"lr": 0.02}],
        experiment_checkpoint_s=0.5,
        keep_checkpoints=None,
    )
    cfg = write_yaml(tmp_path / "toy.yaml", data)
    proc = _driver(cfg, ray_session, tmp_path / "toy.log")
    experiment = tmp_path / "toy" / "tune" / "toy"

    def snapshot_knows_a_checkpoint() -> bool:  # Tune's saved state points at epoch >= 2's checkpoint
        states = glob.glob(str(experiment / "experiment_state-*.json"))
        return any(re.search(r"checkpoint_00000[1-9]", Path(f).read_text(errors="ignore")) for f in states)

    _kill_when(proc, snapshot_knows_a_checkpoint)
    _wait_until(lambda: not _other_jobs_actors_alive(ray_session), "the killed driver's trials to end")
    paths = load_and_run(cfg, resume=True)
    rows = [
        json.loads(line)
        for f in glob.glob(str(experiment / "trial_*" / "result.json"))
        for line in Path(f).read_text().splitlines()
    ]
    resumed = [r for r in rows if r["resumed_from"] > 0]
    assert resumed, rows
    first = resumed[0]
    assert first["epoch"] == first["resumed_from"] + 1  # continued after its checkpoint, not from epoch 1
    final = pd.read_csv(paths["trials"]).iloc[0]
    assert final["epoch"] == 8
    # bit-for-bit the trajectory of a fit that was never interrupted
    assert final["val_loss"] == pytest.approx(reference_toy(options, {"lr": 0.02})[-1], rel=1e-6)


# ---------------------------------------------------------------------------------------
# best-of-n selection and the held-out protocol
# ---------------------------------------------------------------------------------------


def make_bestofn_run(root: Path, prompts: int = 12, samples: int = 8, seed: int = 0) -> Path:
    """Score matrices in the best-of-n run format (keys set='bestofn', prompt, image_id,
    prompt_id, sample), for two selector models and one judge that shares their signal."""
    rng = np.random.default_rng(seed)
    n = prompts * samples
    quality = rng.normal(size=n)
    keys = pd.DataFrame(
        {
            "set": "bestofn",
            "prompt": np.repeat([f"prompt {p}" for p in range(prompts)], samples),
            "image_id": [f"{p}_{s}.png" for p in range(prompts) for s in range(samples)],
            "prompt_id": np.repeat(np.arange(prompts), samples),
            "sample": np.tile(np.arange(samples), prompts),
        }
    )
    order = rng.permutation(n)  # rows stored out of order: the loader must sort by (prompt_id, sample)
    for model, weight in (("sel-a", 1.0), ("sel-b", 0.5), ("judge", 2.0)):
        values = rng.normal(scale=0.7, size=(n, 5)) + rng.normal(size=(n, 1))
        values[:, 0] += weight * quality
        texts = [[p] + [f"{p} ({j})" for j in range(4)] for p in keys["prompt"]]
        m = ScoreMatrix(model, keys.iloc[order], [texts[i] for i in order], values[order])
        m.save(root / "scores" / f"{model_slug(model)}.parquet")
    return root


def reference_bestofn(root: Path, params: dict, pool: int | None) -> float:
    """Per prompt, argmax of the selector over the pool; mean z-scored judge score (pandas)."""
    load = {m: ScoreMatrix.load(root / "scores" / f"{model_slug(m)}.parquet") for m in ("sel-a", "sel-b", "judge")}
    keys = load["sel-a"].keys
    frame = keys[["prompt_id", "sample"]].copy()
    members = params.get("members", ["sel-a", "sel-b"])
    parts = [textnorm(load[m].align(keys).values, params.get("tau", 1.0)) for m in members]
    frame["reward"] = ensemble(np.stack(parts), params.get("kind", "mean"), params.get("lam", 0.0))
    frame["judge"] = load["judge"].align(keys).raw
    if pool is not None:
        frame = frame[frame["sample"] < pool]
    z = (frame["judge"] - frame["judge"].mean()) / frame["judge"].std(ddof=0)
    frame = frame.assign(z=z).sort_values(["prompt_id", "sample"])
    picked = frame.loc[frame.groupby("prompt_id")["reward"].idxmax()]
    return float(picked["z"].mean())


@pytest.mark.parametrize("pool", [None, 3])
def test_bestofn_evaluator_equals_a_pandas_selection(tmp_path, pool):
    root = make_bestofn_run(tmp_path / "run")
    cfg = SweepConfig.model_validate(
        {"name": "b", "trainable": "bestofn_selection", "space": {"tau": {"uniform": [0.1, 1]}}}
    )
    data = prepare_bestofn(BestOfNSweepOptions(run_dir=str(root), heldout_models=["judge"], pool_size=pool), cfg)
    for params in ({"tau": 0.2}, {"tau": 5.0, "kind": "uncertainty", "lam": 3.0}, {"members": ["sel-b"], "tau": 1.0}):
        got = evaluate_bestofn(params, data)
        assert got["objective"] == pytest.approx(reference_bestofn(root, params, pool), abs=1e-12)
        assert got["objective"] > got["random_objective"]  # the selectors share the judge's signal


def test_bestofn_sweep(ray_session, tmp_path):
    root = make_bestofn_run(tmp_path / "run")
    data = {
        "name": "bon",
        "trainable": "bestofn_selection",
        "options": {"run_dir": str(root), "heldout_models": ["judge"], "pool_size": 6},
        "space": {
            "tau": {"loguniform": [0.01, 10.0]},
            "kind": {"choice": ["mean", "uncertainty"]},
            "lam": {"uniform": [0.0, 5.0]},
        },
        "num_samples": 4,
        "out": str(tmp_path / "out"),
        "verbose": 0,
    }
    bad = {**data, "space": {"members": {"choice": [["sel-a", "judge"]]}}}
    with pytest.raises(ConfigError, match="key 'space.members'.*judge"):
        load(write_yaml(tmp_path / "bad.yaml", bad))
    cfg = SweepConfig.model_validate(data)
    paths = run_sweep(cfg)
    best = yaml.safe_load(Path(paths["best"]).read_text())
    assert best["trials"] == 4 and best["value"] == pytest.approx(reference_bestofn(root, best["params"], 6), abs=1e-12)
    assert {"judge/selected", "judge/pool_mean", "random_objective"} <= set(pd.read_csv(paths["trials"]).columns)


def test_tia2_heldout_scores_the_tuned_tau_on_unseen_prompts(tiny_run, ray_session, tmp_path):
    data = tau_sweep(tiny_run, tmp_path / "ho", num_samples=4, heldout={"folds": 2, "seed": 0})
    cfg = SweepConfig.model_validate(data)
    paths = run_sweep(cfg)
    table = pd.read_csv(paths["heldout"])
    prepared = prepare_tia2(Tia2SweepOptions(**cfg.options), cfg)
    s = prepared.scores
    folds = table[table["fold"] != "all"]
    assert len(folds) == 2 and folds["test_prompts"].sum() == s.included.sum()  # the folds partition the prompts
    assert (folds["train_prompts"] + folds["test_prompts"] == s.included.sum()).all()
    summary = json.loads(Path(paths["heldout_json"]).read_text())
    assert summary["held_out_mean"] == pytest.approx(folds["held_out"].mean())
    assert "held-out (mean over folds)" in Path(paths["heldout_md"]).read_text()
    for _, row in table[table["fold"] != "all"].iterrows():
        k = int(row["fold"])
        test_prompts = {s.prompts[i] for i in np.flatnonzero(s.folds == k)}
        train_prompts = {s.prompts[i] for i in np.flatnonzero((s.folds != k) & (s.folds >= 0))}
        assert test_prompts and not test_prompts & train_prompts
        params = json.loads(row["params"])
        assert row["held_out"] == pytest.approx(
            reference_objective(tiny_run, {**params, "members": ["clip:tiny"]}, test_prompts), abs=1e-12
        )
        assert row["in_sample"] == pytest.approx(
            reference_objective(tiny_run, {**params, "members": ["clip:tiny"]}, train_prompts), abs=1e-12
        )
