"""``tn-ray world run|labels|train|train-generator|finetune``: the synthetic world with exact truth (docs/world.md)."""
from __future__ import annotations

from pathlib import Path

from tn_ray.commands.options import add_run_options, allow_change, load, overrides
from tn_ray.commands.study import run_study
from tn_ray.errors import InputError


def add_parser(sub) -> None:
    p = sub.add_parser("world", help="synthetic world with exact truth: benchmark, proxy rewards, best-of-n vs the "
                                     "oracle")
    s = p.add_subparsers(dest="world_command", required=True)

    r = s.add_parser("run", help="benchmark metrics and best-of-n curves of raw / TextNorm / ensemble proxies vs the "
                                 "oracle")
    r.add_argument("config", nargs="?", help="YAML config (WorldConfig); flags override it")
    r.add_argument("--out", help="output folder (overrides `out`)")
    add_run_options(r, "bestofn.pool=64")
    r.set_defaults(func=run)

    lab = s.add_parser("labels", help="write the world's labelled benchmark in TIA2's layout (for `tia2 stats|eval`)")
    lab.add_argument("--out", default="results/world/data", help="folder: <out>/tia2 (labels, sets) and <out>/images")
    lab.add_argument("--per-kind", type=int, default=8, help="prompts per kind (counting, colours, composition, "
                                                             "spatial)")
    lab.add_argument("--images-per-prompt", type=int, default=24, help="images per prompt")
    lab.add_argument("--size", type=int, default=64, help="image side (32..128 px)")
    lab.add_argument("--p-match", type=float, default=0.5, help="share of images that match their prompt")
    lab.add_argument("--label-noise", type=float, default=0.0, help="probability that each of the three labels is "
                                                                    "flipped")
    lab.add_argument("--seed", type=int, default=0, help="seed")
    lab.set_defaults(func=write_labels)

    t = s.add_parser("train", help="train (or find in the cache) world proxy rewards, e.g. worldclip worldclip:seed=1")
    t.add_argument("models", nargs="*", default=["worldclip"], help="worldclip specs")
    t.set_defaults(func=train)

    g = s.add_parser("train-generator", help="train the world text-to-image pipeline (autoencoder, text encoder, "
                                             "UNet; or a flow-matching transformer on the shipped autoencoder and text "
                                             "encoder), evaluate it on held-out prompts, write a diffusers folder")
    g.add_argument("config", nargs="?", help="YAML (WorldGeneratorConfig; sweeps/world_generator.yaml holds the "
                                             "shipped weights' settings, sweeps/world_generator_flow.yaml the "
                                             "flow-matching variant's); flags override it")
    g.add_argument("--work", default="results/world/generator/work", help="resumable training state (state.pt, "
                                                                         "log.jsonl)")
    g.add_argument("--out", default="results/world/generator/pipeline", help="the trained folder; "
                   "tn_ray/diffusion/world/weights is the one the package ships")
    add_run_options(g, "train.steps=100", provenance=False)
    g.set_defaults(func=train_generator)

    f = s.add_parser(
        "finetune",
        help="fine-tune with RWR and DDPO over training rewards x KL coefficients x seeds, judge every evaluation "
        "image with exact truth, report",
    )
    f.add_argument(
        "config",
        help="YAML grid (StudyConfig, as `tn-ray study`), e.g. sweeps/world_finetune.yaml; rerunning the same "
        "command skips finished cells and resumes the unfinished one",
    )
    f.add_argument(
        "--dry-run",
        action="store_true",
        help="validate every cell's config, print the grid (each cell and its state) and the cell count; run nothing",
    )
    f.add_argument("--report-only", action="store_true", help="write the report from the finished cells; run nothing")
    add_run_options(f, "overrides.max_steps=20")
    f.set_defaults(func=finetune)


def run(args) -> int:
    from tn_ray.experiments.world import WorldConfig
    from tn_ray.experiments.world import run as run_world

    cfg = load(args, WorldConfig, out=args.out)
    paths = run_world(cfg, allow_provenance_change=allow_change(args))
    print(Path(paths["summary_md"]).read_text())
    for k, v in paths.items():
        print(f"{k:>16}: {v}")
    return 0


def write_labels(args) -> int:
    from tn_ray.data.world.labels import make

    if not 32 <= args.size <= 128:
        raise InputError(f"--size {args.size}: the world renders 32..128 px")
    if args.per_kind < 1 or args.images_per_prompt < 2:
        raise InputError(f"--per-kind must be >= 1 and --images-per-prompt >= 2; got {args.per_kind}, "
                         f"{args.images_per_prompt}")
    if not 0 < args.p_match < 1 or not 0 <= args.label_noise <= 1:
        raise InputError(f"--p-match must be in (0, 1) and --label-noise in [0, 1]; got {args.p_match}, "
                         f"{args.label_noise}")
    tia2_dir, images = make(Path(args.out), args.per_kind, args.images_per_prompt, args.size, args.seed, args.p_match,
                            args.label_noise)
    print(f"labels and contrastive sets: {tia2_dir}\nimages: {images}\n"
          f"evaluate: tn-ray tia2 eval --tia2-dir {tia2_dir} --images {images} --models worldclip")
    return 0


def train(args) -> int:
    import json

    from tn_ray.rewards import parse
    from tn_ray.rewards.worldclip import ensure, parse_source

    for m in args.models:
        spec = parse(m)
        if spec.name != "worldclip":
            raise InputError(f"'{m}' is not a world proxy (worldclip[:source])")
        path = ensure(parse_source(spec.source))
        print(f"{spec}: {path}\n  {json.dumps(json.loads(path.with_suffix('.json').read_text()))}")
    return 0


def train_generator(args) -> int:
    from tn_ray.diffusion.world.build import build
    from tn_ray.diffusion.world.settings import WorldGeneratorConfig

    cfg = load(args, WorldGeneratorConfig)
    rec = build(cfg, Path(args.work), Path(args.out))
    print(f"world pipeline: {args.out} (training {rec['training_wall_s']:.0f} s; record in {args.out}/training.json)")
    return 0


def finetune(args) -> int:
    """`tn-ray study` on a grid of fine-tuning methods (the same code); a rerun resumes, as it always has."""
    from tn_ray.experiments.study.config import load_study

    return run_study(load_study(args.config, overrides(args)), args, True, allow_change(args))
