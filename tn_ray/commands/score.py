"""``tn-ray score``: score a folder of images (a manifest) with reward models and TextNorm."""
from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("score", help="score images listed in a manifest; write score matrices and TextNorm")
    p.add_argument("--manifest", required=True, help="CSV with columns image (path, relative to the CSV) and prompt")
    p.add_argument("--contrast", help="JSON {prompt: [contrastive prompts]}; without it only raw rewards")
    p.add_argument("--models", nargs="+", default=["clip", "pickscore"], help="reward model specs")
    p.add_argument("--tau", type=float, default=1.0, help="TextNorm temperature (reward units)")
    p.add_argument("--out", default="results/score", help="output folder")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch")
    p.set_defaults(func=run)


def run(args) -> int:
    import pandas as pd

    from tn_ray.config import ScoringConfig
    from tn_ray.scoring.workers import init_ray
    from tn_ray.scoring.matrix import model_slug
    from tn_ray.scoring.pipeline import score_matrices
    from tn_ray.textnorm.equations import textnorm

    manifest = Path(args.manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest not found: {manifest}")
    df = pd.read_csv(manifest)
    missing_cols = {"image", "prompt"} - set(df.columns)
    if missing_cols:
        raise ValueError(f"{manifest}: missing column(s) {sorted(missing_cols)}; expected image, prompt")
    df["image"] = [str((manifest.parent / p).resolve()) for p in df["image"]]
    absent = [p for p in df["image"] if not Path(p).is_file()]
    if absent:
        raise FileNotFoundError(f"{len(absent)} of {len(df)} images in {manifest} do not exist, e.g. {absent[:3]}")
    sets = json.loads(Path(args.contrast).read_text()) if args.contrast else {}
    df = df.assign(set=df.get("set", "default"), image_id=df["image"].map(lambda p: Path(p).name),
                   image_key=df["image"],
                   texts=[[p, *[x for x in dict.fromkeys(sets.get(p, [])) if x != p]] for p in df["prompt"]])
    out = Path(args.out)
    init_ray()
    matrices = score_matrices(df, args.models, out / "cache", ScoringConfig(batch_size=args.batch_size), out_dir=out / "scores")
    table = df[["set", "prompt", "image"]].copy()
    for model, m in matrices.items():
        table[model] = m.raw
        table[f"textnorm({model})"] = textnorm(m.values, args.tau)
    table.to_csv(out / "rewards.csv", index=False)
    print(table.head(10).to_string(index=False))
    print(f"score matrices: {out / 'scores'} ({', '.join(model_slug(m) for m in matrices)}); rewards: {out / 'rewards.csv'}")
    return 0
