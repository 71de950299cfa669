"""``tn-ray quickstart``: the whole flow on the embedded default (local Ray, tiny models).

Steps (each prints where its outputs are): make a small TIA2-layout benchmark -> score it
with clip:tiny and pickscore:tiny on Ray actors -> TextNorm and ensembles -> metrics.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

TINY_MODELS = ["clip:tiny", "pickscore:tiny"]


def add_parser(sub) -> None:
    p = sub.add_parser("quickstart", help="run the main job on tiny models under a local Ray")
    p.add_argument("--out", default="results/quickstart", help="output folder")
    p.set_defaults(func=run)


def step_tia2(out: Path) -> dict:
    from tn_ray.config import RayConfig, ScoringConfig
    from tn_ray.data.shapes import make
    from tn_ray.experiments.tia2_eval import EnsembleSpec, SetParams, Tia2EvalConfig, run as eval_run

    tia2_dir, images = make(out / "data")
    cfg = Tia2EvalConfig(
        images=str(images), tia2_dir=str(tia2_dir), out=str(out / "tia2_eval"), models=TINY_MODELS,
        sets=["counting", "composition"], textnorm={"default": SetParams(tau=1.0, lam=1.0)},
        ensembles=[EnsembleSpec(name="ensemble-mean", members=TINY_MODELS, kind="mean"),
                   EnsembleSpec(name="ensemble-uncertainty", members=TINY_MODELS, kind="uncertainty")],
        scoring=ScoringConfig(batch_size=16), ray=RayConfig(num_cpus=os.cpu_count()),
    )
    return eval_run(cfg)


STEPS = [("TIA2-style evaluation (score -> TextNorm -> metrics)", step_tia2)]


def step_prompts(out: Path) -> dict:
    from tn_ray.prompts.quickstart import step

    return step(out)


STEPS.append(("contrastive sets by rules on Ray Data (+ overlap with the benchmark's sets)", step_prompts))


def step_sweep(out: Path) -> dict:
    from tn_ray.sweep.quickstart import step

    return step(out)


STEPS.append(("tau sweep on the stored score matrices (Ray Tune + Optuna)", step_sweep))


def step_bestofn(out: Path) -> dict:
    from tn_ray.experiments.bestofn import quickstart_step

    return quickstart_step(out, TINY_MODELS)


STEPS.append(("best-of-n: tiny diffusion pipeline, 3 prompts, n = 16 (generate -> score -> select)", step_bestofn))


def run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny models never touch the hub
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    printed = []
    for i, (title, step) in enumerate(STEPS, 1):
        print(f"\n=== quickstart step {i}/{len(STEPS)}: {title}", flush=True)
        paths = step(out)
        if "per_set_md" in paths:
            print(Path(paths["per_set_md"]).read_text())
        printed.append((title, paths))
    print(f"\nquickstart finished in {time.time() - start:.0f} s; outputs:")
    for title, paths in printed:
        print(f"  {title}:")
        for k, v in paths.items():
            print(f"    {k:>12}: {v}")
    return 0
