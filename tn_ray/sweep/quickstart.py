"""The quickstart's sweep step: tune TextNorm's tau on the score matrices the TIA2 step wrote."""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml


def step(out: Path) -> dict[str, Path]:
    from .config import SweepConfig
    from .evaluators import Tia2SweepOptions, evaluate_tia2, prepare_tia2
    from .runner import run_sweep

    sweep_dir = out / "sweep"
    shutil.rmtree(sweep_dir, ignore_errors=True)  # the demo starts fresh on every run
    cfg = SweepConfig(name="quickstart-tau", trainable="tia2_textnorm",
                      options={"run_dir": str(out / "tia2_eval"), "models": ["clip:tiny"]},
                      space={"tau": {"loguniform": [0.01, 10.0]}}, num_samples=12, max_concurrent_trials=2,
                      out=str(sweep_dir), verbose=0)
    paths = run_sweep(cfg)
    best = yaml.safe_load(Path(paths["best"]).read_text())
    baseline = evaluate_tia2({"tau": 1.0}, prepare_tia2(Tia2SweepOptions(**cfg.options), cfg))["objective"]
    print(f"tau sweep of textnorm(clip:tiny), objective = mean AP@5/10/25 per set ({best['trials']} trials): "
          f"best tau {best['params']['tau']:.4g} -> {best['value']:.4f}; tau = 1 (the evaluation above) -> {baseline:.4f}")
    return {k: Path(v) for k, v in paths.items()}
