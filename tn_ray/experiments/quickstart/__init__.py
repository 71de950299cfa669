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
5. :func:`bestofn_step` -- best-of-n with the world pipeline (a small Stable Diffusion trained on the world,
   shipped): generate -> score -> select, judged by ``worldjudge`` (exact truth).
6. :func:`rwr_step` -- RWR on the world pipeline (LoRA, Ray Train): curves, the selected checkpoint, the
   judge's accuracy before and after with a paired CI.
7. :func:`ddpo_step` -- DDPO on the world pipeline (LoRA, asynchronous reward actors): the same outputs.

Steps 5-7 read their settings from YAML files shipped in this package (``bestofn_world.yaml``,
``rwr_world.yaml``, ``ddpo_world.yaml``; ``sweeps/`` links to the same files, which the docs
show), only their ``out`` set to the quickstart's folders. A line whose CI covers 0 says it is a
smoke run, not a result.

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
from tn_ray.analysis.bestofn_selection import gain_over_base
from tn_ray.analysis.finetune_report import cell_images
from tn_ray.analysis.goodhart import mean_ci
from tn_ray.config import RayConfig, ScoringConfig, load_config
from tn_ray.data.tia2 import load_prompt_sets
from tn_ray.data.world.labels import make
from tn_ray.data.world.scenes import COLORS, SHAPES
from tn_ray.experiments.world import ensure_models, quickstart_step
from tn_ray.prompts.overlap import per_prompt, per_set
from tn_ray.prompts.settings import RulesConfig, SourcesConfig
from tn_ray.prompts.synthesize import SynthesisConfig, synthesize
from tn_ray.storage import read_json
from tn_ray.sweep.config import SweepConfig
from tn_ray.sweep.runner import run_sweep
from tn_ray.sweep.trainables.evaluators import Tia2SweepOptions, evaluate_tia2, prepare_tia2
from tn_ray.textnorm.columns import EnsembleSpec, SetParams
from tn_ray.training.checkpoint_selection import describe_selection
from tn_ray.training.evaluation import read_scores

TINY_MODELS = ["clip:tiny", "pickscore:tiny"]
WORLD_MODELS = ["worldclip", "clip:tiny"]  # worldclip: trained on the world on first use (cached)
WORLD_DATA = {"per_kind": 4, "images_per_prompt": 16}

SETTINGS = Path(__file__).parent  # the packaged YAMLs of the steps (sweeps/ links to them)


def settings(name: str, model, **overrides):
    """The packaged ``name`` (e.g. ``rwr_tiny.yaml``) as ``model``, with dotted-key ``overrides``."""

    return load_config(SETTINGS / name, model, overrides)


def world_step(out: Path) -> dict[str, Path]:
    return quickstart_step(out)


def tia2_step(out: Path) -> dict[str, Path]:
    """Score the world's labelled benchmark with worldclip and clip:tiny; TextNorm, ensembles, metrics."""
    from tn_ray.experiments.tia2_eval import Tia2EvalConfig, run

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


def paired_line(what: str, base: float, after: float, diff: float, lo: float, hi: float, unit: str) -> str:
    """``what``: base -> after, the paired difference with its 95% CI; when the CI covers 0 the line says
    the run is a smoke run, not a result."""
    verdict = ("the CI covers 0: a smoke run, not a result" if lo <= 0 <= hi
               else "an improvement" if lo > 0 else "a loss")
    return (f"{what}: {base:.1%} -> {after:.1%} (paired difference {diff:+.1%}, 95% CI [{lo:+.1%}, {hi:+.1%}] over "
            f"{unit}; {verdict})")


def bestofn_step(out: Path) -> dict[str, Path]:
    """Best-of-n on the world pipeline (``bestofn_world.yaml``): 8 prompts, n = 4 and 8, selected by worldclip raw
    and with TextNorm and by worldjudge, judged by worldjudge (exact truth)."""
    from tn_ray.experiments.bestofn import BestOfNConfig, run

    cfg = settings("bestofn_world.yaml", BestOfNConfig, out=str(out / "bestofn"))
    paths = run(cfg)
    rewards, selections = pd.read_parquet(paths["rewards"]), pd.read_parquet(paths["selections"])
    n = max(cfg.pools)
    print(f"best-of-n on the world pipeline, top-1 of n = {n} judged by worldjudge (exact truth; base = one "
          "unselected image):")
    for selector in ("worldclip", "textnorm(worldclip)", "worldjudge"):
        base, top, diff, lo, hi = gain_over_base(rewards, selections, selector, "worldjudge", n)
        print("  " + paired_line(f"selected by {selector}", base, top, diff, lo, hi, f"{rewards['prompt_id'].nunique()}"
                                 " prompts"))
    return paths


def finetune_lines(out: str, method: str) -> list[str]:
    """The quickstart's report of a fine-tuning run: worldjudge accuracy of the base model vs the checkpoint the
    paper's rule selected, paired by (prompt, eval seed)."""

    selection = read_json(Path(out) / "selection.json")
    scores, base = read_scores(out)
    images = cell_images(scores, base, train=selection["training_reward"]["column"], truth="worldjudge")
    step = int(selection["step"])
    at = images[images["step"] == step]
    diff, lo, hi = mean_ci((at["truth"] - at["truth_base"]).to_numpy())
    return [*describe_selection(selection, unit="epoch" if method == "DDPO" else "step"),
            paired_line(f"worldjudge accuracy, base -> selected {step}", float(at["truth_base"].mean()),
                        float(at["truth"].mean()), diff, lo, hi, f"{len(at)} images (prompt x eval seed)")]


def rwr_step(out: Path) -> dict[str, Path]:
    """RWR on the world pipeline (``rwr_world.yaml``: LoRA, textnorm(worldclip) reward, worldjudge judge) on Ray
    Train: curves, the selected checkpoint, the judge's accuracy before and after."""
    from tn_ray.training.rwr import RwrConfig, run

    cfg = settings("rwr_world.yaml", RwrConfig, out=str(out / "rwr"))
    paths = run(cfg)
    print(f"RWR (world pipeline, reward {cfg.reward.use}, judge worldjudge):")
    for line in finetune_lines(cfg.out, "RWR"):
        print("  " + line)
    print(f"  curves: {paths['curves']}\n  selected checkpoint: {paths['selected_checkpoint']}\n  eval table: "
          f"{paths['eval_csv']}")
    return {k: Path(v) for k, v in paths.items()}  # a local run: every output is a local path


def ddpo_step(out: Path) -> dict[str, Path]:
    """DDPO on the world pipeline (``ddpo_world.yaml``: LoRA, rewards on reward actors, KL to base): curves, the
    selected checkpoint, the judge's accuracy before and after."""
    from tn_ray.training.ddpo import DDPOConfig, epoch_rewards, run

    cfg = settings("ddpo_world.yaml", DDPOConfig, out=str(out / "ddpo"))
    paths = run(cfg)
    curve = epoch_rewards(cfg.out)
    print(f"DDPO (world pipeline, reward {cfg.reward.use}, judge worldjudge): training reward per epoch "
          f"{', '.join(f'{v:.4f}' for v in curve['reward_mean'])}")
    for line in finetune_lines(cfg.out, "DDPO"):
        print("  " + line)
    print(f"  curves: {paths['curves']}\n  selected checkpoint: {paths['selected_checkpoint']}\n  eval table: "
          f"{paths['eval_csv']}")
    return {k: Path(v) for k, v in paths.items() if isinstance(v, str)}


STEPS: list[tuple[str, Callable[[Path], dict]]] = [
    ("TIA2-style evaluation (score -> TextNorm -> metrics)", tia2_step),
    ("the world: proxy rewards vs exact truth, best-of-n oracle accuracy (docs/world.md)", world_step),
    ("contrastive sets by rules on Ray Data (+ overlap with the benchmark's sets)", prompts_step),
    ("tau sweep on the stored score matrices (Ray Tune + Optuna)", sweep_step),
    ("best-of-n on the world pipeline, judged by exact truth (generate -> score -> select)", bestofn_step),
    ("RWR fine-tuning with LoRA on the world pipeline, judged by exact truth (docs/rwr.md)", rwr_step),
    ("DDPO fine-tuning with LoRA on the world pipeline, judged by exact truth (docs/ddpo.md)", ddpo_step),
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
