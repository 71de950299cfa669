"""``tn-ray quickstart``: the whole flow on the embedded default (local Ray, tiny models);
the steps are in :mod:`tn_ray.experiments.quickstart`."""
from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("quickstart", help="run the main job on tiny models under a local Ray")
    p.add_argument("--out", default="results/quickstart", help="output folder")
    p.set_defaults(func=run)


def run(args) -> int:
    from tn_ray.experiments.quickstart import run as run_quickstart

    run_quickstart(Path(args.out))
    return 0
