"""``tn-ray bestofn CONFIG``: best-of-n generation, scoring, selection and reports."""
from __future__ import annotations

from pathlib import Path

from tn_ray.commands.options import add_run_options, allow_change, load


def add_parser(sub) -> None:
    p = sub.add_parser("bestofn", help="generate n images per prompt, score with every reward and TextNorm, keep the "
                                       "best")
    p.add_argument("config", help="YAML config (BestOfNConfig), e.g. sweeps/bestofn_tiny.yaml")
    p.add_argument("--out", help="run folder (overrides `out`)")
    p.add_argument("--max-prompts", type=int, help="first N prompts only (overrides `max_prompts`)")
    add_run_options(p, "top_k=[1,4]")
    p.add_argument("--generate-only", action="store_true", help="stop after generation (images + manifest)")
    p.set_defaults(func=run)


def run(args) -> int:
    from tn_ray.experiments.bestofn import BestOfNConfig
    from tn_ray.experiments.bestofn import run as bestofn_run

    cfg = load(args, BestOfNConfig, out=args.out, max_prompts=args.max_prompts)
    paths = bestofn_run(cfg, generate_only=args.generate_only, allow_provenance_change=allow_change(args))
    if "summary_md" in paths:
        print(Path(paths["summary_md"]).read_text())
    for k, v in paths.items():
        print(f"{k:>14}: {v}")
    return 0
