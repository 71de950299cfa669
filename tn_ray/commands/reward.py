"""``tn-ray reward train CONFIG.yaml``: learn a reward from good/bad labels (docs/reward_learning.md)."""
from __future__ import annotations

from tn_ray.commands.options import add_run_options, allow_change, load


def add_parser(sub) -> None:
    p = sub.add_parser("reward", help="reward learning from human labels")
    s = p.add_subparsers(dest="reward_command", required=True)
    t = s.add_parser("train", help="train a reward head on TIA2-format labels; writes learned:<folder> and held-out "
                                   "metrics")
    t.add_argument("config", help="YAML config (RewardTrainConfig)")
    add_run_options(t, "loss.aux_weight=0")
    t.set_defaults(func=train)


def train(args) -> int:
    from tn_ray.reward_learning.config import RewardTrainConfig
    from tn_ray.reward_learning.pipeline import run

    cfg = load(args, RewardTrainConfig)
    result = run(cfg, allow_provenance_change=allow_change(args))
    print(result["paths"]["summary_md"].read_text())
    print(f"reward: {result['summary']['reward']}")
    return 0
