"""Reward learning on labelled synthetic data: does the learned head beat its frozen backbone on
held-out prompts, with and without the prompt-classification loss, and how calibrated is it?

Writes a labelled benchmark in TIA2's layout (the synthetic world, ``tn_ray.data.world``, whose
labels are the oracle's verdicts flipped with probability ``--label-noise`` per annotator; the
quickstart's shapes when the world module is absent) under ``--data``, then runs
``tn-ray reward train`` on it (``sweeps/reward_train.yaml`` with the backbone, data and seeds
given here): the configured head (auxiliary weight ``--aux``) and the same head without the
auxiliary loss, each on ``--seeds`` split seeds. Prints per seed and averaged, side by side: test
AUROC (mean over held-out prompts) of the learned rewards, the backbone's raw score and their
TextNorm forms, and the ECE of the learned rewards. Last line: one JSON object.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_reward_learning.py --backbone worldclip --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def make_data(root: Path, per_kind: int, images_per_prompt: int, label_noise: float) -> tuple[str, list[str]]:
    """(which generator, set names) of the labelled data under ``root`` (written once)."""
    try:
        from tn_ray.data.world.labels import make
    except ImportError:
        from tn_ray.data.shapes import make as make_shapes

        if not (root / "tia2").exists():
            make_shapes(root, images_per_prompt=images_per_prompt)
        return "shapes", ["counting", "composition"]
    if not (root / "tia2").exists():
        make(root, per_kind=per_kind, images_per_prompt=images_per_prompt, label_noise=label_noise)
    sets = sorted(p.stem.removeprefix("human_labels_") for p in (root / "tia2" / "human_annotations").glob("*.json"))
    return "world", sets


def main() -> None:
    from tn_ray.config import load_config
    from tn_ray.reward_learning.config import RewardTrainConfig
    from tn_ray.reward_learning.pipeline import run

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="worldclip", help="frozen dual encoder (worldclip, clip:tiny, ...)")
    ap.add_argument("--data", default="results/reward_learning/data", help="where the labelled data is written")
    ap.add_argument("--out", default="results/reward_learning/bench", help="run folders")
    ap.add_argument("--per-kind", type=int, default=12, help="world prompts per prompt kind (the grammar has room for "
                                                             "about 12)")
    ap.add_argument("--images-per-prompt", type=int, default=16)
    ap.add_argument("--label-noise", type=float, default=0.05, help="probability an annotator's label is flipped")
    ap.add_argument("--aux", type=float, default=0.5, help="weight of the prompt-classification loss")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="split seeds (one run each)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more config overrides")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from tn_ray.config import parse_set

    data = Path(args.data).resolve()
    kind, sets = make_data(data, args.per_kind, args.images_per_prompt, args.label_noise)
    rows = []
    for seed in args.seeds:
        over = {"backbone": args.backbone, "out": f"{args.out}/{args.backbone.replace(':', '_')}-seed{seed}",
                "feature_cache": f"{args.out}/features", "data.split.seed": seed, "loss.aux_weight": args.aux,
                "data.contrast": str(data / "tia2" / "prompts" / "prompt_set_{set}.json"),
                "data.sets": {s: {"labels": str(data / "tia2" / "human_annotations" / f"human_labels_{s}.json"),
                                  "images": str(data / "images" / s)} for s in sets}, **parse_set(args.set)}
        cfg = load_config(REPO / "sweeps" / "reward_train.yaml", RewardTrainConfig, over)
        summary = run(cfg)["summary"]
        for reward, m in summary["test"].items():
            rows.append({"seed": seed, "reward": reward, "test_auroc": m["auroc"], "test_auprc": m["auprc"],
                         "test_spearman": m["spearman"], "test_ece": m.get("ece"), "test_prompts": m["n_prompts"]})
        print(f"seed {seed}: {summary['prompts']} prompts, features computed {summary['features']}")
    table = pd.DataFrame(rows)
    print(f"\ndata: {kind} ({', '.join(sets)}), backbone {args.backbone}, aux weight {args.aux}, label noise "
          f"{args.label_noise}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    mean = table.groupby("reward", sort=False)[["test_auroc", "test_auprc", "test_spearman", "test_ece"]].mean()
    print("\nmean over seeds:\n" + mean.to_string(float_format=lambda v: f"{v:.3f}"))
    learned, ablation, backbone = mean.loc["learned"], mean.loc["learned(no aux)"], mean.loc[args.backbone]
    print(f"test AUROC learned - backbone raw: {learned['test_auroc'] - backbone['test_auroc']:+.3f} (aux {args.aux}), "
          f"{ablation['test_auroc'] - backbone['test_auroc']:+.3f} (no aux)")
    print(json.dumps({"data": kind, "backbone": args.backbone, "seeds": args.seeds,
                      "test_auroc": {r: round(float(v), 4) for r, v in mean["test_auroc"].items()},
                      "test_ece": {r: round(float(v), 4) for r, v in mean["test_ece"].dropna().items()}}))


if __name__ == "__main__":
    main()
