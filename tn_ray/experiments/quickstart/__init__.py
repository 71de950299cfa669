"""The quickstart: the whole flow on the embedded default (local Ray, tiny models, data it makes).

Steps, in the order they run (each returns the paths of its outputs):

1. :func:`tia2_step` -- a small labelled benchmark in TIA2's layout (the synthetic world,
   ``tn_ray.data.world``, exact labels), scored by the world-trained proxy ``worldclip`` and
   clip:tiny on Ray actors -> TextNorm and ensembles -> metrics.
2. :func:`world_step` -- the world's experiment (docs/world.md): proxy AUROC vs the oracle, raw
   and with TextNorm, and best-of-n oracle-accuracy curves.
3. :func:`prompts_step` -- contrastive sets built by the ``rules`` source on Ray Data, and their
   overlap with the benchmark's own sets.
4. :func:`sweep_step` -- a tau sweep (Ray Tune + Optuna) on the score matrices of step 1.
5. :func:`bestofn_step` -- best-of-n with the tiny diffusion pipeline: generate -> score -> select.
6. :func:`rwr_step` -- a tiny RWR run (LoRA, Ray Train): curves and the selected checkpoint.
7. :func:`ddpo_step` -- a tiny DDPO run (LoRA, asynchronous reward actors): the same outputs.

Steps 5-7 read their settings from YAML files shipped in this package (``bestofn_tiny.yaml``,
``rwr_tiny.yaml``, ``ddpo_tiny.yaml``; ``sweeps/`` links to the same files, which the docs
show), only their ``out`` (and best-of-n's ``contrast``) set to the quickstart's folders.

:func:`run` runs them in that order and prints where everything is.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from tn_ray import provenance

TINY_MODELS = ["clip:tiny", "pickscore:tiny"]
WORLD_MODELS = ["worldclip", "clip:tiny"]  # worldclip: trained on the world on first use (cached)
WORLD_DATA = {"per_kind": 4, "images_per_prompt": 16}

SETTINGS = Path(__file__).parent  # the packaged YAMLs of the steps (sweeps/ links to them)


def settings(name: str, model, **overrides):
    """The packaged ``name`` (e.g. ``rwr_tiny.yaml``) as ``model``, with dotted-key ``overrides``."""
    from tn_ray.config import load_config

    return load_config(SETTINGS / name, model, overrides)


def world_step(out: Path) -> dict[str, Path]:
    from tn_ray.experiments.world import quickstart_step

    return quickstart_step(out)


def tia2_step(out: Path) -> dict[str, Path]:
    """Score the world's labelled benchmark with worldclip and clip:tiny; TextNorm, ensembles, metrics."""
    from tn_ray.config import RayConfig, ScoringConfig
    from tn_ray.data.world.labels import make
    from tn_ray.experiments.tia2_eval import Tia2EvalConfig, run
    from tn_ray.experiments.world import ensure_models
    from tn_ray.textnorm.columns import EnsembleSpec, SetParams

    tia2_dir, images = make(out / "data", **WORLD_DATA)
    ensure_models(WORLD_MODELS)  # trains worldclip here once, not in each reward actor
    cfg = Tia2EvalConfig(
        images=str(images), tia2_dir=str(tia2_dir), out=str(out / "tia2_eval"), models=WORLD_MODELS,
        sets=["counting", "composition", "comprehensive"], textnorm={"default": SetParams(tau=1.0, lam=1.0)},
        ensembles=[EnsembleSpec(name="ensemble-mean", members=WORLD_MODELS, kind="mean"),
                   EnsembleSpec(name="ensemble-uncertainty", members=WORLD_MODELS, kind="uncertainty")],
        scoring=ScoringConfig(batch_size=16), ray=RayConfig(num_cpus=os.cpu_count()),
    )
    return run(cfg)


def prompts_step(out: Path) -> dict[str, Path]:
    """Rule-built contrastive sets for the benchmark's prompts on Ray Data (the substitution
    vocabulary is its own coloured shapes), and their overlap with the benchmark's sets."""
    from tn_ray.config import RayConfig
    from tn_ray.data.tia2 import load_prompt_sets
    from tn_ray.data.world.labels import make
    from tn_ray.data.world.scenes import COLORS, SHAPES
    from tn_ray.prompts.overlap import per_prompt, per_set
    from tn_ray.prompts.settings import RulesConfig, SourcesConfig
    from tn_ray.prompts.synthesize import SynthesisConfig, synthesize

    tia2_dir = out / "data" / "tia2"
    if not (tia2_dir / "prompts").is_dir():
        make(out / "data", **WORLD_DATA)
    folder = out / "prompts"
    folder.mkdir(parents=True, exist_ok=True)
    rules = RulesConfig(max_count=4, vocabulary=[f"{c} {s}" for c in COLORS for s in SHAPES])
    prompts = [x0 for s in ("counting", "composition", "comprehensive") for x0 in load_prompt_sets(s, tia2_dir)]
    (folder / "prompts.json").write_text(json.dumps(prompts, indent=1))
    cfg = SynthesisConfig(input=str(folder / "prompts.json"), out=str(folder / "rules.json"), source="rules", workers=2,
                          batch_size=4, sources=SourcesConfig(rules=rules), ray=RayConfig(num_cpus=os.cpu_count()))
    paths = synthesize(cfg)
    table = per_set(per_prompt(tia2_dir, cfg=rules))
    md = ["# Rule-built vs the quickstart's contrastive sets", "", table.to_markdown(index=False, floatfmt=".3f"), ""]
    paths["per_set_md"] = folder / "overlap.md"
    paths["per_set_md"].write_text("\n".join(md))
    return paths


def sweep_step(out: Path) -> dict[str, Path]:
    """Tune TextNorm's tau of worldclip on the score matrices of the TIA2 step."""
    import yaml

    from tn_ray.sweep.config import SweepConfig
    from tn_ray.sweep.runner import run_sweep
    from tn_ray.sweep.trainables.evaluators import Tia2SweepOptions, evaluate_tia2, prepare_tia2

    sweep_dir = out / "sweep"
    shutil.rmtree(sweep_dir, ignore_errors=True)  # the demo starts fresh on every run
    cfg = SweepConfig(name="quickstart-tau", trainable="tia2_textnorm",
                      options={"run_dir": str(out / "tia2_eval"), "models": ["worldclip"]},
                      space={"tau": {"loguniform": [0.01, 10.0]}}, num_samples=12, max_concurrent_trials=2,
                      out=str(sweep_dir), verbose=0)
    paths = run_sweep(cfg)
    best = yaml.safe_load(Path(paths["best"]).read_text())
    baseline = evaluate_tia2({"tau": 1.0}, prepare_tia2(Tia2SweepOptions(**cfg.options), cfg))["objective"]
    print(f"tau sweep of textnorm(worldclip), objective = mean AP@5/10/25 per set ({best['trials']} trials): "
          f"best tau {best['params']['tau']:.4g} -> {best['value']:.4f}; tau = 1 (the evaluation above) -> "
          f"{baseline:.4f}")
    return {k: Path(v) for k, v in paths.items()}


def bestofn_step(out: Path) -> dict[str, Path]:
    """Best-of-n with the tiny pipeline (``bestofn_tiny.yaml``): 3 prompts, n = 16 (pools 4 and 16), 32 px."""
    from tn_ray.experiments.bestofn import BestOfNConfig, run

    cfg = settings("bestofn_tiny.yaml", BestOfNConfig, out=str(out / "bestofn"),
                   contrast=str(SETTINGS / "bestofn_tiny_contrast.json"))
    paths = run(cfg)
    table = pd.read_csv(paths["summary_csv"])
    judge = "ensemble-uncertainty"
    wide = table[table["judge"] == judge].pivot_table(index="selector", columns="n", values="mean", sort=False)
    wide.columns = [f"n={c}" for c in wide.columns]
    print(f"best-of-n, top-1 image judged by {judge} (random tiny models: the numbers only show the flow):")
    print(wide.reset_index().to_markdown(index=False, floatfmt=".4f"))
    return paths


def rwr_step(out: Path) -> dict[str, Path]:
    """A tiny RWR run (``rwr_tiny.yaml``: LoRA, brightness reward, clip:tiny judge) on Ray Train: curves,
    selected checkpoint."""
    from tn_ray.training.checkpoint_selection import describe_selection
    from tn_ray.training.rwr import RwrConfig, run

    paths = run(settings("rwr_tiny.yaml", RwrConfig, out=str(out / "rwr")))
    selection = json.loads(Path(paths["selection"]).read_text())
    print("RWR (tiny, brightness reward, clip:tiny judge): " + "\n".join(describe_selection(selection)))
    print(f"  curves: {paths['curves']}\n  selected checkpoint: {paths['selected_checkpoint']}\n  eval table: "
          f"{paths['eval_csv']}")
    return {k: Path(v) for k, v in paths.items()}  # a local run: every output is a local path


def ddpo_step(out: Path) -> dict[str, Path]:
    """A tiny DDPO run (``ddpo_tiny.yaml``: LoRA, rewards on reward actors, KL to base): curves, selected
    checkpoint."""
    from tn_ray.training.checkpoint_selection import describe_selection
    from tn_ray.training.ddpo import DDPOConfig, epoch_rewards, run

    cfg = settings("ddpo_tiny.yaml", DDPOConfig, out=str(out / "ddpo"))
    paths = run(cfg)
    selection = json.loads(Path(paths["selection"]).read_text())
    curve = epoch_rewards(cfg.out)
    print(f"DDPO (tiny, brightness reward, clip:tiny judge): training reward per epoch "
          f"{', '.join(f'{v:.4f}' for v in curve['reward_mean'])}")
    print("  " + "\n".join(describe_selection(selection, unit="epoch")))
    print(f"  curves: {paths['curves']}\n  selected checkpoint: {paths['selected_checkpoint']}\n  eval table: "
          f"{paths['eval_csv']}")
    return {k: Path(v) for k, v in paths.items() if isinstance(v, str)}


STEPS: list[tuple[str, Callable[[Path], dict]]] = [
    ("TIA2-style evaluation (score -> TextNorm -> metrics)", tia2_step),
    ("the world: proxy rewards vs exact truth, best-of-n oracle accuracy (docs/world.md)", world_step),
    ("contrastive sets by rules on Ray Data (+ overlap with the benchmark's sets)", prompts_step),
    ("tau sweep on the stored score matrices (Ray Tune + Optuna)", sweep_step),
    ("best-of-n: tiny diffusion pipeline, 3 prompts, n = 16 (generate -> score -> select)", bestofn_step),
    ("RWR fine-tuning with LoRA, tiny (docs/rwr.md)", rwr_step),
    ("DDPO fine-tuning with LoRA, tiny (docs/ddpo.md)", ddpo_step),
]


def run(out: Path) -> list[tuple[str, dict]]:
    """Every step in order; prints each step's tables and, at the end, where the outputs are."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny models never touch the hub
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    printed = []
    for i, (title, step) in enumerate(STEPS, 1):
        print(f"\n=== quickstart step {i}/{len(STEPS)}: {title}", flush=True)
        t0 = time.time()
        with provenance.continue_changed():  # a demo: its folders are continued across tn_ray versions
            paths = step(out)
        if "per_set_md" in paths:
            print(Path(paths["per_set_md"]).read_text())
        print(f"(step {i} took {time.time() - t0:.0f} s)", flush=True)
        printed.append((title, paths))
    print(f"\nquickstart finished in {time.time() - start:.0f} s; outputs:")
    for title, paths in printed:
        print(f"  {title}:")
        for k, v in paths.items():
            print(f"    {k:>12}: {v}")
    return printed
