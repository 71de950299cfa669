"""``tn-ray score``: score a folder of images (a manifest) with reward models and TextNorm."""
from __future__ import annotations

from pathlib import Path

from tn_ray.errors import InputError
from tn_ray.scoring.images import check_images


def add_parser(sub) -> None:
    p = sub.add_parser("score", help="score images listed in a manifest; write score matrices and TextNorm")
    p.add_argument("--manifest", required=True, help="CSV with columns image (path, relative to the CSV) and prompt")
    p.add_argument("--contrast", help="JSON {prompt: [contrastive prompts]}, 'released' or 'released:<set>'; "
                                      "without it only raw rewards")
    p.add_argument("--models", nargs="+", default=["clip", "pickscore"], help="reward model specs")
    p.add_argument("--tau", type=float, default=1.0, help="TextNorm temperature (reward units, > 0)")
    p.add_argument("--out", default="results/score", help="output folder")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (>= 1)")
    p.set_defaults(func=run)


def read_manifest(manifest: Path):
    """The manifest's rows with absolute image paths; errors name the file, the line, the column."""
    import pandas as pd

    if not manifest.is_file():
        raise InputError(f"manifest not found: {manifest}" if not manifest.exists() else f"manifest {manifest} is not "
                                                                                         "a file")
    try:
        df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    except UnicodeDecodeError as err:
        raise InputError(f"{manifest}: not UTF-8 text (byte {err.start})") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InputError(f"{manifest}: not a readable CSV ({str(err).strip()})") from None
    missing_cols = {"image", "prompt"} - set(df.columns)
    if missing_cols:
        raise InputError(f"{manifest}: missing column(s) {sorted(missing_cols)}; expected image, prompt")
    empty = df.index[(df["image"].str.strip() == "") | (df["prompt"].str.strip() == "")]
    if len(empty):
        raise InputError(f"{manifest}: line {int(empty[0]) + 2} has an empty image or prompt")
    if df.empty:
        raise InputError(f"{manifest}: no rows")
    df["image"] = [str((manifest.parent / p).resolve()) for p in df["image"]]
    dup = df["image"].duplicated()
    if dup.any():
        raise InputError(f"{manifest}: image {df.loc[dup, 'image'].iloc[0]} is listed twice (line "
                         f"{int(dup.idxmax()) + 2})")
    return df


def run(args) -> int:
    from tn_ray.config import ScoringConfig, validate
    from tn_ray.prompts.contrast import load_contrast, texts_for
    from tn_ray.rewards import parse
    from tn_ray.rewards.availability import check_weights
    from tn_ray.storage import check_output_dir
    from tn_ray.textnorm.columns import SetParams, reward_columns

    # everything a user can get wrong is checked before Ray starts or a model loads
    params = validate(SetParams, {"tau": args.tau}, "--tau")
    scoring = validate(ScoringConfig, {"batch_size": args.batch_size}, "command line")
    models = [str(parse(m)) for m in args.models]
    manifest = Path(args.manifest)
    df = read_manifest(manifest)
    sets = load_contrast(args.contrast) if args.contrast else None
    texts = texts_for(list(df["prompt"]), sets, args.contrast) if sets is not None else [[p] for p in df["prompt"]]
    absent = [p for p in df["image"] if not Path(p).is_file()]
    if absent:
        raise InputError(f"{len(absent)} of {len(df)} images in {manifest} do not exist, e.g. {absent[:3]}")
    check_images(list(df["image"]), str(manifest))
    check_weights(models)
    out = check_output_dir(args.out)

    from tn_ray.cluster import init_ray
    from tn_ray.scoring.batch_scoring import score_matrices
    from tn_ray.scoring.matrix import model_slug

    df = df.assign(set=df.get("set", "default"), image_id=df["image"].map(lambda p: Path(p).name),
                   image_key=df["image"], texts=texts)
    init_ray()
    matrices = score_matrices(df, models, out / "cache", scoring, out_dir=out / "scores")
    table = df[["set", "prompt", "image"]].copy()
    columns = reward_columns({m: matrices[m].values for m in models}, params)
    for model in models:
        table[model] = columns[model]
        if sets is not None:
            table[f"textnorm({model})"] = columns[f"textnorm({model})"]
    table.to_csv(out / "rewards.csv", index=False)
    print(table.head(10).to_string(index=False))
    print(f"score matrices: {out / 'scores'} ({', '.join(model_slug(m) for m in matrices)}); rewards: "
          f"{out / 'rewards.csv'}")
    return 0
