"""``tn-ray ddpo CONFIG``: DDPO policy-gradient fine-tuning with LoRA and a KL regularizer (resumes a killed run)."""
from __future__ import annotations

from tn_ray.commands.options import add_run_options, allow_change, load, print_run


def add_parser(sub) -> None:
    p = sub.add_parser("ddpo", help="fine-tune a diffusion model with DDPO (policy gradient, eq. 5), LoRA and a KL to "
                                    "the base model")
    p.add_argument("config", help="YAML config (DDPOConfig), e.g. sweeps/ddpo_tiny.yaml; keys in docs/ddpo.md")
    p.add_argument("--out", help="run folder or cloud URI (overrides `out`); rerunning the same command resumes")
    add_run_options(p, "optimizer.lr=3e-5")
    p.add_argument("--max-steps", type=int, help="DDPO epochs (overrides `max_steps`)")
    p.set_defaults(func=run)


def run(args) -> int:
    from tn_ray.training.ddpo import DDPOConfig
    from tn_ray.training.ddpo import run as ddpo_run

    cfg = load(args, DDPOConfig, out=args.out, max_steps=args.max_steps)
    paths = ddpo_run(cfg, allow_provenance_change=allow_change(args))
    print_run(paths, unit="epoch")
    return 0
