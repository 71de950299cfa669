"""``tn-ray grpo CONFIG``: Flow-GRPO fine-tuning of a flow-matching (SD 3) model with LoRA and a KL to the base
model, on the same core as DDPO (resumes a killed run)."""
from __future__ import annotations

from tn_ray.commands.options import add_run_options, allow_change, load, print_run


def add_parser(sub) -> None:
    p = sub.add_parser("grpo", help="fine-tune a flow-matching (SD 3) model with GRPO (Flow-GRPO: groups of G images "
                                    "per prompt, PPO clip), LoRA and a KL to the base model")
    p.add_argument("config", help="YAML config (GRPOConfig), e.g. sweeps/grpo_tiny.yaml; keys in docs/grpo.md")
    p.add_argument("--out", help="run folder or cloud URI (overrides `out`); rerunning the same command resumes")
    add_run_options(p, "train.beta=0.01")
    p.add_argument("--max-steps", type=int, help="GRPO epochs (overrides `max_steps`)")
    p.set_defaults(func=run)


def run(args) -> int:
    from tn_ray.training.grpo import GRPOConfig
    from tn_ray.training.grpo import run as grpo_run

    cfg = load(args, GRPOConfig, out=args.out, max_steps=args.max_steps)
    paths = grpo_run(cfg, allow_provenance_change=allow_change(args))
    print_run(paths, unit="epoch")
    return 0
