"""The study's gains per sample and per estimated device-hour: optimizers compared at equal compute, pure pandas.

Per fine-tuning row (method, reward, kl) and best-of-n row (method, reward, n): the samples one cell (one seed)
generates, its estimated device-hours (the study's ``cost`` block applied to the work ``tn-ray study --dry-run``
counts: estimates, not measurements) and the truth's gain over the base model (fine-tuning: truth at the
checkpoint the paper's rule selected minus the base model's image of the same (seed, prompt, eval seed), the
report's ``diff_selected``; best-of-n: the top-1 pick's truth minus the n = 1 image's of the same (seed, prompt))
per 1,000 samples and per device-hour.

Work counted per cell on its own (a shared generation counted in every cell that uses it, unlike the dry run's
total, which counts it once): what reproducing that row alone costs. Best-of-n counts, at its n, n samples per
prompt (the nested pool of one shared generation: a best-of-n at n needs n images per prompt) and their scores
by the row's models and the truth (a fine-tuning cell's count includes its evaluation's judges likewise).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

COLUMNS = [
    "kind",
    "method",
    "reward",
    "kl",
    "n",
    "cells",
    "prompts",
    "samples_per_prompt",
    "samples",
    "eval_images",
    "device_h",
    "truth_gain",
    "gain_per_1k_samples",
    "gain_per_device_h",
]


def bestofn_work(prompts: int, n: int, steps: int, models: int) -> dict[str, int]:
    """The work of a best-of-n at ``n`` alone (:func:`tn_ray.experiments.study.cost.counts`' keys): ``prompts`` x ``n``
    images of ``steps`` denoising steps, each scored by ``models`` reward models."""
    images = prompts * n
    return {
        "images": images,
        "image_steps": images * steps,
        "train_steps": 0,
        "trained_image_steps": 0,
        "eval_images": 0,
        "scores": images * models,
    }


def finetune_gain(judged: pd.DataFrame, selected: dict, truth: str) -> pd.DataFrame:
    """Per (method, reward, kl): ``truth_gain``, the mean over (seed, prompt, eval seed) of the truth at the
    selected step minus the base model's, from :func:`tn_ray.analysis.winloss.judged_images` rows of every cell
    (with method, reward, kl, seed)."""
    cell = ["method", "reward", "kl", "seed"]
    t = judged[judged["column"] == truth]
    step = [int(selected[k]) for k in t[cell].itertuples(index=False, name=None)]
    at = t[t["step"].to_numpy() == np.asarray(step)]
    base = t[t["step"] == 0]
    m = at.merge(base, on=[*cell, "prompt_id", "eval_seed"], suffixes=("", "_base"))
    d = m.assign(d=m["value"] - m["value_base"]).groupby(["method", "reward", "kl"], sort=True)["d"].mean()
    return d.rename("truth_gain").reset_index()


def bestofn_gain(picks: pd.DataFrame, base: pd.DataFrame) -> pd.DataFrame:
    """Per (method, reward, n): ``truth_gain``, the mean over (seed, prompt) of the pick's truth minus the n = 1
    image's (:func:`tn_ray.analysis.winloss.bestofn_base` rows with method and seed)."""
    m = picks.merge(base, on=["method", "seed", "prompt_id"])
    d = m.assign(d=m["truth"] - m["truth_base"]).groupby(["method", "reward", "n"], sort=True)["d"].mean()
    return d.rename("truth_gain").reset_index()


def table(costs: pd.DataFrame, gains: pd.DataFrame) -> pd.DataFrame:
    """:data:`COLUMNS` from per-cell ``costs`` (kind, method, reward, kl, n, seed, prompts, samples_per_prompt,
    samples, eval_images, device_s: one row per cell; NaN where its work could not be counted) and ``gains`` (kind,
    method, reward, kl, n, truth_gain): costs are means over the row's cells, device_h = device_s / 3600, the
    gain per 1,000 samples = truth_gain / samples x 1000 and per device-hour = truth_gain / device_h."""
    keys = ["kind", "method", "reward", "kl", "n"]
    costs = costs.assign(kl=costs["kl"].fillna(-1.0), n=costs["n"].fillna(-1).astype("int64"))
    gains = gains.assign(kl=gains["kl"].fillna(-1.0), n=gains["n"].fillna(-1).astype("int64"))
    per = (
        costs.groupby(keys, sort=True)
        .agg(
            cells=("seed", "nunique"),
            prompts=("prompts", "mean"),
            samples_per_prompt=("samples_per_prompt", "mean"),
            samples=("samples", "mean"),
            eval_images=("eval_images", "mean"),
            device_s=("device_s", "mean"),
        )
        .reset_index()
    )
    out = per.merge(gains, on=keys, how="left")
    out["device_h"] = out["device_s"] / 3600
    out["gain_per_1k_samples"] = out["truth_gain"] / out["samples"] * 1000
    out["gain_per_device_h"] = out["truth_gain"] / out["device_h"]
    out["kl"] = out["kl"].where(out["kl"] >= 0)
    out["n"] = out["n"].where(out["n"] >= 0).astype("Int64")
    order = {"finetune": 0, "bestofn": 1}
    out = out.sort_values(keys, key=lambda c: c.map(order) if c.name == "kind" else c, kind="mergesort")
    return out[COLUMNS].reset_index(drop=True)


def _num(v: float, fmt: str) -> str:
    return "" if pd.isna(v) else format(v, fmt)


def markdown(rows: pd.DataFrame, truth: str, device: str, notes: Sequence[str] = ()) -> list[str]:
    """The per-sample / per-device-hour section of report.md from :func:`table` rows."""
    shown = pd.DataFrame(
        {
            "method": rows["method"],
            "reward": rows["reward"],
            "kl / n": [
                f"n {int(n)}" if k == "bestofn" else f"kl {kl:g}"
                for k, kl, n in zip(rows["kind"], rows["kl"], rows["n"])
            ],
            "samples per prompt": rows["samples_per_prompt"].map(lambda v: _num(v, "g")),
            "samples per cell": rows["samples"].map(lambda v: _num(v, ".0f")),
            "est. device-h per cell": rows["device_h"].map(lambda v: _num(v, ".3g")),
            f"truth gain ({truth})": rows["truth_gain"].map(lambda v: _num(v, "+.3f")),
            "gain per 1k samples": rows["gain_per_1k_samples"].map(lambda v: _num(v, "+.4g")),
            "gain per est. device-h": rows["gain_per_device_h"].map(lambda v: _num(v, "+.4g")),
        }
    )
    return [
        "## Gain per sample and per estimated device-hour",
        "",
        "Per cell (one seed): samples generated (fine-tuning: training samples and evaluation images, which the "
        "paper's rule selects on; best-of-n at n: n images per prompt, the nested pool of its shared generation) "
        f"and device-hours **estimated** from the study's `cost` block ({device}; the `--dry-run`'s per-unit "
        "seconds applied to each cell's counted work on its own, shared generations counted in every cell that "
        "uses them). `truth gain`: fine-tuning, the selected checkpoint minus the base model (paired, the report's "
        "`vs base`); best-of-n, the pick minus the n = 1 image.",
        *notes,
        "",
        shown.to_markdown(index=False, disable_numparse=True),
        "",
    ]
