"""``tn-ray sweep sweeps/<name>.yaml [--resume]``: Ray Tune + Optuna over a registered trainable."""
from __future__ import annotations

from pathlib import Path

from tn_ray.commands.options import add_run_options, allow_change, overrides


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="hyper-parameter sweep (Ray Tune + Optuna) from a YAML file")
    p.add_argument("config", nargs="?", help="sweep YAML (see sweeps/)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep (finished trials kept)")
    p.add_argument("--num-samples", type=int, help="override `num_samples`")
    p.add_argument("--storage-path", help="override `storage_path` (local folder or cloud URI)")
    p.add_argument("--out", help="override `out` (summary folder)")
    add_run_options(p, "ray.address=auto")
    p.add_argument("--list", action="store_true", help="list the registered trainables and exit")
    p.set_defaults(func=run)


def run(args) -> int:
    from tn_ray.sweep import registry
    from tn_ray.sweep.runner import load_and_run

    if args.list or not args.config:
        if not args.list:
            print("tn-ray sweep: give a sweep YAML (e.g. sweeps/tia2_counting.yaml); registered trainables:")
        for name in registry.available():
            entry = registry.get(name)
            print(f"  {name:<20} [{entry.kind}] {entry.description}")
        return 0 if args.list else 2

    given = overrides(args, num_samples=args.num_samples, storage_path=args.storage_path, out=args.out)
    paths = load_and_run(args.config, resume=args.resume, overrides=given, allow_provenance_change=allow_change(args))
    best = Path(paths["best"]).read_text()
    print(f"\nbest configuration ({paths['best']}):\n{best}")
    if "heldout_md" in paths:
        print(Path(paths["heldout_md"]).read_text())
    for k, v in paths.items():
        print(f"{k:>12}: {v}")
    return 0
