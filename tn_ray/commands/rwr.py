"""``tn-ray rwr CONFIG``: reward-weighted regression fine-tuning with LoRA (resumes a killed run)."""
from __future__ import annotations

from tn_ray.commands.options import add_run_options, allow_change, load, print_run


def add_parser(sub) -> None:
    p = sub.add_parser("rwr", help="fine-tune a diffusion model with reward-weighted regression and LoRA (eq. 4)")
    p.add_argument("config", help="YAML config (RwrConfig), e.g. sweeps/rwr_tiny.yaml")
    p.add_argument("--out", help="run folder or cloud URI (overrides `out`); rerunning the same command resumes")
    add_run_options(p, "optimizer.lr=3e-5")
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides `max_steps`)")
    p.set_defaults(func=run)


def run(args) -> int:
    from tn_ray.training.rwr import RwrConfig
    from tn_ray.training.rwr import run as rwr_run

    cfg = load(args, RwrConfig, out=args.out, max_steps=args.max_steps)
    paths = rwr_run(cfg, allow_provenance_change=allow_change(args))
    print_run(paths, unit="step")
    return 0
