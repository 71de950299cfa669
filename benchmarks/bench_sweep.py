"""Sweep speed on a C300-sized problem: 300 prompts x 50 images = 15,000 images, 33 prompts
per image (x0 + 32 contrastive), 2 reward models, synthetic score matrices.

Prints, side by side in one run: one TextNorm evaluation (mean-ensemble of both models,
objective = mean AP@5/10/25) through the sweep's vectorised path and through the per-prompt
reference path (tn_ray.textnorm.equations + tn_ray.analysis.metrics.per_prompt, pandas/sklearn), their ratio and
agreement; then the wall time of a 100-trial Ray Tune + Optuna sweep over tau, lambda and
the ensemble kind on the same matrices. Last line: one JSON object.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_sweep.py [--trials 100]
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

PROMPTS, IMAGES, COLUMNS, MODELS = 300, 50, 33, ("synth-a", "synth-b")


def make_run(root: Path, seed: int = 0) -> Path:
    """A `tn-ray tia2 eval`-shaped folder: scores/<model>.parquet + rewards.parquet."""
    from tn_ray.scoring.matrix import ScoreMatrix, model_slug

    rng = np.random.default_rng(seed)
    n = PROMPTS * IMAGES
    keys = pd.DataFrame({"set": "c300", "prompt": np.repeat([f"prompt {p}" for p in range(PROMPTS)], IMAGES),
                         "image_id": [f"image_{i}.jpg" for i in range(n)]})
    quality = rng.normal(size=n)
    binary = (quality + rng.normal(scale=1.0, size=n) > 0).astype(int)
    labels = keys.assign(binary=binary, fine=np.clip((quality + 1.5) / 3, 0, 1))
    texts = [[p] + [f"{p} / contrast {j}" for j in range(COLUMNS - 1)] for p in keys["prompt"]]
    for m, model in enumerate(MODELS):
        values = rng.normal(scale=0.5, size=(n, COLUMNS)) + rng.normal(size=(n, 1))  # image-specific offset
        values[:, 0] += (0.6 + 0.2 * m) * quality
        ScoreMatrix(model, keys.copy(), texts, values).save(root / "scores" / f"{model_slug(model)}.parquet")
    labels.to_parquet(root / "rewards.parquet", index=False)
    return root


def reference_eval(run: Path, params: dict) -> float:
    """The same objective through the per-prompt path of tn_ray.analysis.metrics (pandas/sklearn)."""
    from tn_ray.analysis import metrics
    from tn_ray.scoring.matrix import ScoreMatrix, model_slug
    from tn_ray.textnorm.columns import combine

    frame = pd.read_parquet(run / "rewards.parquet")
    mats = [ScoreMatrix.load(run / "scores" / f"{model_slug(m)}.parquet").align(frame).values for m in MODELS]
    frame["reward"] = combine(
        dict(zip(MODELS, mats)), MODELS, [params["tau"]] * len(MODELS), params["kind"], params["lam"]
    )
    table = metrics.per_set(metrics.per_prompt(frame, ["reward"]))
    return float(table[["ap@5", "ap@10", "ap@25"]].mean(axis=1).iloc[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=100)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from tn_ray.sweep.config import SweepConfig
    from tn_ray.sweep.runner import run_sweep
    from tn_ray.sweep.trainables.evaluators import Tia2SweepOptions, evaluate_tia2, prepare_tia2

    tmp = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    try:
        t = time.perf_counter()
        run = make_run(tmp / "run")
        print(
            f"synthetic C300 matrices: {PROMPTS * IMAGES} images x {COLUMNS} prompts x {len(MODELS)} models "
            f"(written in {time.perf_counter() - t:.1f} s)"
        )
        sweep = SweepConfig(
            name="bench-c300",
            trainable="tia2_textnorm",
            options={"run_dir": str(run)},
            space={
                "tau": {"loguniform": [0.01, 10]},
                "lam": {"uniform": [0, 5]},
                "kind": {"choice": ["mean", "uncertainty"]},
            },
            num_samples=args.trials,
            max_concurrent_trials=2,
            out=str(tmp / "sweep"),
            verbose=0,
            ray={"num_cpus": 2},
        )
        t = time.perf_counter()
        data = prepare_tia2(Tia2SweepOptions(run_dir=str(run)), sweep)
        print(f"load once per sweep (ScoreMatrix.load + align + layout): {time.perf_counter() - t:.2f} s")

        params = {"tau": 0.5, "kind": "mean", "lam": 0.0}
        evaluate_tia2(params, data)  # warm-up
        fast = []
        for _ in range(5):
            t = time.perf_counter()
            got = evaluate_tia2(params, data)["objective"]
            fast.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = reference_eval(run, params)
        ref_s = time.perf_counter() - t
        fast_s = statistics.median(fast)
        print(f"one evaluation, vectorised (median of 5): {fast_s:.4f} s  objective {got:.6f}")
        print(f"one evaluation, per-prompt reference:      {ref_s:.4f} s  objective {ref:.6f}")
        print(
            f"speed-up: {ref_s / fast_s:.1f}x; |difference| = {abs(got - ref):.2e}; goal < 2 s: "
            f"{'met' if fast_s < 2 else 'NOT met'}"
        )

        t = time.perf_counter()
        paths = run_sweep(sweep)
        sweep_s = time.perf_counter() - t
        trials = pd.read_csv(paths["trials"])
        print(
            f"{len(trials)}-trial sweep (Ray Tune + OptunaSearch, 2 concurrent, local Ray on this machine): "
            f"{sweep_s:.1f} s wall, {sweep_s / len(trials):.2f} s per trial; best objective "
            f"{trials['objective'].max():.4f} (Ray start included)"
        )
        print(json.dumps({"c300_eval_seconds": round(fast_s, 4), "sweep_100_trials_seconds": round(sweep_s, 1)}))
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
