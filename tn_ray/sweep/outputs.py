"""What a finished sweep leaves behind: all trials (CSV), the best configuration (YAML) and
the objective against each searched parameter (PNG)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from ray.tune.result import AUTO_RESULT_KEYS

from tn_ray.sweep.config import SweepConfig
from tn_ray.sweep.searcher import decode

# Tune's own bookkeeping in every result; everything else is the trainable's metrics
_TUNE_KEYS = set(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_tag", "should_checkpoint", "checkpoint_dir_name"}


def _show(value: Any) -> Any:
    return "+".join(map(str, value)) if isinstance(value, list) else value


def trials_table(grid, cfg: SweepConfig, encoded: list[str]) -> pd.DataFrame:
    """One row per trial: id, status, searched parameters (decoded), every reported metric."""
    rows = []
    for result in grid:
        config = decode(result.config or {}, encoded)
        metrics = result.metrics or {}
        row: dict[str, Any] = {"trial_id": metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_"),
                               "status": "error" if result.error else "ok"}
        row.update({name: _show(config.get(name)) for name in cfg.space})
        row.update({k: v for k, v in metrics.items() if k not in _TUNE_KEYS and not isinstance(v, dict)})
        row["epochs"] = metrics.get("training_iteration")
        row["seconds"] = metrics.get("time_total_s")
        rows.append(row)
    df = pd.DataFrame(rows)
    if cfg.metric in df:
        df = df.sort_values(cfg.metric, ascending=cfg.mode == "min", na_position="last", kind="stable")
    return df.reset_index(drop=True)


def best_record(table: pd.DataFrame, grid, cfg: SweepConfig, encoded: list[str]) -> dict[str, Any]:
    ok = table[(table["status"] == "ok") & table[cfg.metric].notna()] if cfg.metric in table else table.iloc[:0]
    if ok.empty:
        raise ValueError(f"sweep '{cfg.name}': no trial reported '{cfg.metric}' (see the trial errors above)")
    best_id = ok.iloc[0]["trial_id"]
    result = next(r for r in grid if (r.metrics or {}).get("trial_id") == best_id)
    params = {k: v for k, v in decode(result.config, encoded).items() if k in cfg.space}
    metrics = {k: v for k, v in result.metrics.items() if k not in _TUNE_KEYS and isinstance(v, (int, float))}
    return {"sweep": cfg.name, "metric": cfg.metric, "mode": cfg.mode, "value": float(ok.iloc[0][cfg.metric]),
            "trial_id": str(best_id), "params": params, "fixed": dict(cfg.fixed), "metrics": metrics,
            "trials": int(len(table)), "errored": int((table["status"] == "error").sum())}


def plot_objective(table: pd.DataFrame, cfg: SweepConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(cfg.space)
    ok = table[table["status"] == "ok"]
    y = pd.to_numeric(ok[cfg.metric], errors="coerce") if cfg.metric in ok else pd.Series(np.nan, index=ok.index)
    best = (y.idxmax() if cfg.mode == "max" else y.idxmin()) if y.notna().any() else None
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        spec = cfg.space[name]
        if spec.values is not None:  # categorical: one column per value, jittered
            labels = [str(_show(v)) for v in spec.values]
            pos = {lab: i for i, lab in enumerate(labels)}
            xs = pd.Series([pos.get(str(v), np.nan) for v in ok[name]], index=ok.index, dtype=float)
            jitter = np.random.default_rng(0).uniform(-0.12, 0.12, len(xs))
            ax.scatter(xs + jitter, y, s=18, alpha=0.75)
            ax.set_xticks(range(len(labels)), labels, rotation=30 if max(map(len, labels)) > 6 else 0, fontsize=7)
        else:
            xs = pd.to_numeric(ok[name], errors="coerce")
            ax.scatter(xs, y, s=18, alpha=0.75)
            if spec.loguniform is not None:
                ax.set_xscale("log")
        if best is not None:
            ax.scatter([xs[best]], [y[best]], marker="*", s=160, color="tab:red", zorder=3)
        ax.set_xlabel(name)
        ax.set_ylabel(cfg.metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{cfg.name}: {cfg.metric} ({cfg.mode}) over {len(ok)} trials", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(table: pd.DataFrame, best: dict[str, Any], cfg: SweepConfig, out: Path, stem: str = "") -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"trials": out / f"{stem}trials.csv", "best": out / f"{stem}best.yaml",
             "plot": out / f"{stem}objective_vs_params.png"}
    table.to_csv(paths["trials"], index=False)
    paths["best"].write_text(yaml.safe_dump(json.loads(json.dumps(best, default=float)), sort_keys=False))
    plot_objective(table, cfg, paths["plot"])
    return paths
