"""``tn-ray reward train``: labels -> frozen features (once) -> head (Ray Train) -> held-out report.

Flow: read the label files and contrastive sets, split by prompt and check every image (before
any model loads) -> embeddings and backbone rewards from the feature cache, computing only what
is missing on reward actors -> one head per run (the configured one, plus the same head
without the auxiliary loss for the ablation) under a ``TorchTrainer`` with early stopping ->
each head exported as ``<out>/model-<hash>`` (a ``learned:<folder>`` reward) -> metrics on the
validation and test prompts for every learned reward, the backbone and their TextNorm forms,
with calibration.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from tn_ray import provenance
from tn_ray.config import dump_config
from tn_ray.reward_learning import data, features, report, train
from tn_ray.reward_learning.calibration import plot_reliability
from tn_ray.reward_learning.config import RewardTrainConfig
from tn_ray.reward_learning.train import Arrays
from tn_ray.rewards import learned_head
from tn_ray.rewards.revisions import reward_revisions
from tn_ray.scoring.matrix import pad_rows
from tn_ray.storage import check_output_dir, join_uri

log = logging.getLogger(__name__)

LEARNED, ABLATION = "learned", "learned(no aux)"


def build_arrays(frame, feats, target: str):
    keys = frame[["set", "prompt", "image_id", "binary", "fine", "part"]].reset_index(drop=True)
    y = (frame["binary"] if target == "binary" else frame["fine"]).to_numpy(dtype=np.float32)
    digest = hashlib.sha1(json.dumps([list(frame["image_key"]), [list(t) for t in frame["texts"]], list(frame["part"]),
                                      y.tolist()]).encode()).hexdigest()[:12]
    return Arrays(image=feats.image, text=feats.text, text_idx=feats.texts_of(list(frame["texts"])), target=y,
                  keys=keys, fingerprint=digest)


def run_name(label: str, params: dict[str, Any], fingerprint: str) -> str:
    """A Ray Train run name unique to (parameters, data): rerunning the same run resumes it."""
    digest = hashlib.sha1(json.dumps([params, fingerprint], sort_keys=True).encode()).hexdigest()[:10]
    return f"{'head' if label == LEARNED else 'head-noaux'}-{digest}"


def run(cfg: RewardTrainConfig, allow_provenance_change: bool = False) -> dict[str, Any]:
    from tn_ray.cluster import init_ray

    frame = data.load(cfg.data)
    out = check_output_dir(cfg.out)
    provenance.record(out, cfg, allow_change=allow_provenance_change, revisions=reward_revisions([cfg.backbone]))
    dump_config(cfg, out / "config.yaml")
    counts = frame.groupby("part")["prompt"].nunique().to_dict()
    log.info("reward learning: %d images, prompts per part %s, backbone %s", len(frame), counts, cfg.backbone)
    init_ray(cfg.ray)
    feats = features.compute(frame, cfg.backbone, cfg.feature_cache or join_uri(str(out), "features"), cfg.scoring)
    arrays = build_arrays(frame, feats, cfg.loss.target)
    base = train.params_of(cfg)
    runs = {LEARNED: base}
    if cfg.report.compare_without_aux and cfg.loss.aux_weight > 0:
        runs[ABLATION] = {**base, "aux_weight": 0.0}
    summary: dict[str, Any] = {"backbone": cfg.backbone, "features": feats.stats, "images": len(frame),
                               "prompts": {p: int(counts.get(p, 0)) for p in ("train", "val", "test")}, "runs": {}}
    heads = {}
    for label, params in runs.items():
        fitted, last = train.fit(params, arrays, cfg, run_name(label, params, arrays.fingerprint))
        meta = {"backbone": cfg.backbone, "kind": params["kind"], "target": cfg.loss.target,
                "aux_weight": params["aux_weight"], "temperature": params["temperature"], "data": arrays.fingerprint}
        folder = learned_head.export(fitted, str(out), meta)
        heads[label] = fitted
        summary["runs"][label] = {"reward": f"learned:{folder}", "best_epoch": int(last.get("best_epoch", 0)),
                                  "epochs_run": int(last.get("epoch", 0)), "best_val_auroc": last.get("best_val_auroc"),
                                  "ray_path": last.get("ray_path")}
    summary["reward"] = summary["runs"][LEARNED]["reward"]
    (out / "reward_spec.txt").write_text(summary["reward"] + "\n")
    kinds = {label: runs[label]["kind"] for label in heads}
    paths: dict[str, Path] = {}
    for part in ("val", "test"):
        rows = arrays.rows(part)
        if not len(rows):
            continue
        values = {label: report.head_matrix(h, arrays, rows) for label, h in heads.items()}
        values[cfg.backbone] = pad_rows([feats.backbone[i] for i in rows])
        table, per_prompt, per_set, curves = report.evaluate(
            frame.iloc[rows], values, kinds, cfg.report.tau, cfg.report.bins
        )
        table.to_parquet(out / f"rewards_{part}.parquet", index=False)
        per_prompt.to_csv(out / f"per_prompt_{part}.csv", index=False)
        per_set.to_csv(out / f"per_set_{part}.csv", index=False)
        plot_reliability(curves, out / f"reliability_{part}.png", f"{part} prompts, backbone {cfg.backbone}")
        overall = per_set[per_set["set"] == "all"].set_index("reward")
        summary[part] = {
            r: {
                k: (None if np.isnan(v) else float(v))
                for k, v in row.items()
                if k in ("auroc", "auprc", "ap@10", "spearman", "ece", "n_prompts")
            }
            for r, row in overall.iterrows()
        }
        paths[f"per_set_{part}"] = out / f"per_set_{part}.csv"
        paths[f"reliability_{part}"] = out / f"reliability_{part}.png"
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    (out / "summary.md").write_text(summary_markdown(summary, out))
    return {"summary": summary, "paths": {**paths, "summary": out / "summary.json", "summary_md": out / "summary.md"}}


def summary_markdown(summary: dict[str, Any], out: Path) -> str:
    lines = [
        "# Reward learning",
        "",
        f"backbone: {summary['backbone']}; images: {summary['images']}; "
        "prompts train/val/test: "
        f"{summary['prompts']['train']}/{summary['prompts']['val']}/{summary['prompts']['test']}",
        f"features computed this run: {summary['features']}",
        "",
        f"learned reward: `{summary['reward']}`",
        "",
    ]
    for label, r in summary["runs"].items():
        lines.append(f"- {label}: best epoch {r['best_epoch']} of {r['epochs_run']}, val AUROC {r['best_val_auroc']}")
    for part in ("val", "test"):
        if part in summary:
            lines += [
                "",
                f"## {part} prompts (mean over prompts; ECE over images)",
                "",
                "| reward | prompts | AUROC | AUPRC | AP@10 | Spearman | ECE |",
                "|---|---|---|---|---|---|---|",
            ]
            for name, m in summary[part].items():
                cells = [m.get(k) for k in ("auroc", "auprc", "ap@10", "spearman", "ece")]
                lines.append(
                    f"| {name} | {int(m['n_prompts']) if m.get('n_prompts') is not None else '-'} | "
                    + " | ".join("-" if c is None else f"{c:.3f}" for c in cells)
                    + " |"
                )
    lines += ["", f"per set: {out}/per_set_test.csv; calibration: {out}/reliability_test.png", ""]
    return "\n".join(lines)
