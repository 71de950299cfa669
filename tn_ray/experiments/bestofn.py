"""``tn-ray bestofn CONFIG``: generate n images per prompt, score, normalize, keep the best.

Flow: prompts and contrastive sets checked before any model loads -> seeded, sharded,
resumable generation (:mod:`tn_ray.diffusion.generation`) -> score matrices per reward model on the
reward actors (:func:`tn_ray.scoring.pipeline.score_matrices`, cached) -> reward columns: each raw
model, its TextNorm, each ensemble -> top-k per prompt, reward and nested pool n
(:mod:`tn_ray.experiments.selection`) -> selections Parquet, overoptimization summary, per-prompt grids,
blinded human-evaluation pages.

Outputs under ``out``::

    config.yaml  generation/  cache/  scores/<model_slug>.parquet  rewards.parquet
    selections.parquet  summary.csv  summary.md  grids/<prompt_id>.png
    human_eval/index.html (+ pages, images)  human_eval_key.csv

A score matrix has keys set='bestofn', prompt, image_id, prompt_id (int), sample (int).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from tn_ray.data import tia2
from tn_ray.config import RayConfig, ScoringConfig, StrictModel, dump_config
from tn_ray.diffusion.generation import GenerationConfig, generate
from tn_ray.experiments.human_eval import HumanEvalConfig
from tn_ray.rewards import parse
from tn_ray.scoring.matrix import ScoreMatrix
from tn_ray.textnorm.equations import ensemble, textnorm
from tn_ray.experiments.tia2_eval import EnsembleSpec, SetParams

log = logging.getLogger(__name__)

SET_NAME = "bestofn"


class BestOfNConfig(StrictModel):
    out: str = Field("results/bestofn", description="run folder: generation (unless generation.out), scores, selections, reports")
    prompts: list[str] | None = Field(None, description="prompts x0; None = every prompt of the contrastive-set source, in its order")
    contrast: str = Field("released:comprehensive", description="contrastive sets: 'released' or 'released:<TIA2 set>' (the authors' sets) or a JSON file {x0: [x1..xm]}")
    tia2_dir: str | None = Field(None, description="local copy of the TIA2 prompt sets for contrast='released...'; None = $TN_RAY_TIA2_DIR or download")
    max_prompts: int | None = Field(None, ge=1, description="first N prompts only (count); None = all")
    pools: list[int] = Field(default_factory=lambda: [16, 64, 256], min_length=1, description="nested pool sizes n: the first n samples of a prompt (images)")
    top_k: list[int] = Field(default_factory=lambda: [1, 4], min_length=1, description="how many images each selection keeps (images)")
    models: list[str] = Field(default_factory=lambda: ["clip", "pickscore"], min_length=1, description="reward model specs, e.g. clip, pickscore:tiny")
    textnorm: SetParams = Field(default_factory=SetParams, description="TextNorm temperature(s) and the ensembles' lambda")
    ensembles: list[EnsembleSpec] = Field(default_factory=list, description="ensembles selected with next to the single models")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="text-to-image generation; samples_per_prompt defaults to the largest pool")
    scoring: ScoringConfig = Field(default_factory=ScoringConfig, description="Ray scoring: batch size, actors, resources")
    cache_dir: str | None = Field(None, description="reward cache folder; None = <out>/cache")
    grids: bool = Field(True, description="write one PNG grid per prompt (rows = rewards, columns = n)")
    grid_cell: int = Field(128, ge=16, description="grid cell size (pixels)")
    human_eval: HumanEvalConfig | None = Field(default_factory=HumanEvalConfig, description="blinded side-by-side export; None = skip")
    ray: RayConfig = Field(default_factory=RayConfig, description="where Ray runs")

    @field_validator("models")
    @classmethod
    def _known_models(cls, v: list[str]) -> list[str]:
        return [str(parse(m)) for m in v]

    @field_validator("pools", "top_k")
    @classmethod
    def _sorted_unique(cls, v: list[int]) -> list[int]:
        if any(x < 1 for x in v):
            raise ValueError(f"sizes must be >= 1, got {v}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _consistent(self) -> "BestOfNConfig":
        gen = self.generation
        if "samples_per_prompt" not in gen.model_fields_set:
            gen.samples_per_prompt = max(self.pools)
        elif gen.samples_per_prompt < max(self.pools):
            raise ValueError(f"generation.samples_per_prompt ({gen.samples_per_prompt}) is smaller than the largest pool {max(self.pools)}")
        if max(self.top_k) > min(self.pools):
            raise ValueError(f"top_k {self.top_k} exceeds the smallest pool {min(self.pools)}")
        for ens in self.ensembles:
            members = [str(parse(m)) for m in ens.members]
            unknown = [m for m in members if m not in self.models]
            if unknown:
                raise ValueError(f"ensemble '{ens.name}': members {unknown} are not among models {self.models}")
            ens.members = members
        if self.human_eval is not None:
            he = self.human_eval
            if he.k not in self.top_k:
                raise ValueError(f"human_eval.k = {he.k} is not one of top_k {self.top_k}")
            if he.n is not None and he.n not in self.pools:
                raise ValueError(f"human_eval.n = {he.n} is not one of pools {self.pools}")
            names = self.reward_names()
            for pair in he.pairs:
                bad = [r for r in pair if r not in names]
                if bad or pair[0] == pair[1]:
                    raise ValueError(f"human_eval.pairs: {list(pair)} must name two different rewards among {names}")
        return self

    def reward_names(self) -> list[str]:
        """Columns selected with: each raw model, its TextNorm, each ensemble."""
        return [*self.models, *(f"textnorm({m})" for m in self.models), *(e.name for e in self.ensembles)]


class InputError(ValueError):
    """Bad prompts or contrastive sets, found before any model loads."""


def load_contrast(cfg: BestOfNConfig) -> dict[str, list[str]]:
    """{x0: [x1..xm]} from TIA2's released sets or a JSON file (checked, with the file named)."""
    if cfg.contrast == "released" or cfg.contrast.startswith("released:"):
        name = cfg.contrast.partition(":")[2]
        sets = [name] if name else list(tia2.SETS)
        if any(s not in tia2.SETS for s in sets):
            raise InputError(f"contrast: unknown TIA2 set {name!r}; expected one of {list(tia2.SETS)}")
        root = tia2.resolve_dir(cfg.tia2_dir)
        merged: dict[str, list[str]] = {}
        for s in sets:
            for x0, xs in tia2.load_prompt_sets(s, root).items():
                merged.setdefault(x0, xs)
        return merged
    path = Path(cfg.contrast)
    if not path.is_file():
        raise InputError(f"contrast: file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"contrast: {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, list) and all(isinstance(x, str) for x in v)
                                             for k, v in data.items()):
        raise InputError(f"contrast: {path} must map each prompt to a list of contrastive prompts ({{x0: [x1, ...]}})")
    return data


def resolve_prompts(cfg: BestOfNConfig, contrast: dict[str, list[str]]) -> list[str]:
    prompts = list(cfg.prompts) if cfg.prompts else list(contrast)
    prompts = prompts[: cfg.max_prompts or None]
    if not prompts:
        raise InputError("no prompts: set `prompts` or give a non-empty contrastive-set source")
    missing = [p for p in prompts if p not in contrast]
    if missing:
        raise InputError(f"{len(missing)} prompts have no contrastive set in {cfg.contrast}, e.g. {missing[:3]}")
    return prompts


def contrast_texts(prompt: str, contrast: dict[str, list[str]]) -> list[str]:
    return [prompt, *[x for x in dict.fromkeys(contrast[prompt]) if x != prompt]]


def score_items(manifest: pd.DataFrame, contrast: dict[str, list[str]]) -> pd.DataFrame:
    """The rows ``score_matrices`` takes; the image key is content-addressed (valid across runs)."""
    return pd.DataFrame({
        "set": SET_NAME, "prompt": manifest["prompt"].astype(str).to_numpy(), "image_id": manifest["image_id"].to_numpy(),
        "prompt_id": manifest["prompt_id"].astype("int64").to_numpy(), "sample": manifest["sample"].astype("int64").to_numpy(),
        "image_key": [f"{SET_NAME}/{i}/{h}" for i, h in zip(manifest["image_id"], manifest["sha256"])],
        "image": manifest["image"].to_numpy(),
        "texts": [contrast_texts(p, contrast) for p in manifest["prompt"]],
    })


def reward_columns(items: pd.DataFrame, matrices: dict[str, ScoreMatrix], cfg: BestOfNConfig) -> pd.DataFrame:
    """Per image: each model's raw reward, its TextNorm, and each ensemble."""
    out = items[["prompt_id", "prompt", "sample", "image_id", "image"]].reset_index(drop=True).copy()
    normalized: dict[str, np.ndarray] = {}
    for model in cfg.models:
        m = matrices[model].align(items[["set", "prompt", "image_id"]])
        out[model] = m.raw
        normalized[model] = textnorm(m.values, cfg.textnorm.tau_for(model))
        out[f"textnorm({model})"] = normalized[model]
    for ens in cfg.ensembles:
        stack = np.stack([normalized[m] if ens.textnorm else out[m].to_numpy() for m in ens.members])
        out[ens.name] = ensemble(stack, ens.kind, cfg.textnorm.lam)
    return out


def run(cfg: BestOfNConfig, generate_only: bool = False) -> dict[str, Path]:
    from tn_ray.scoring.workers import init_ray
    from tn_ray.experiments.human_eval import export
    from tn_ray.experiments.image_grids import prompt_grid, save_grid
    from tn_ray.scoring.pipeline import score_matrices
    from tn_ray.experiments.selection import select, summary, summary_markdown
    from tn_ray.storage import read_any

    contrast = load_contrast(cfg)
    prompts = resolve_prompts(cfg, contrast)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = cfg.generation.model_copy(update={"out": cfg.generation.out or str(out / "generation")})
    dump_config(cfg.model_copy(update={"generation": gen}), out / "config.yaml")
    n_max = max(cfg.pools)
    log.info("best-of-n: %d prompts, pools %s, models %s", len(prompts), cfg.pools, cfg.models)
    init_ray(cfg.ray)
    manifest = generate(prompts, gen, cfg.ray)
    paths: dict[str, Path] = {"generation": Path(gen.out) if "://" not in gen.out else gen.out}
    if generate_only:
        return paths
    manifest = manifest[manifest["sample"] < n_max].reset_index(drop=True)
    items = score_items(manifest, contrast)
    matrices = score_matrices(items, cfg.models, cfg.cache_dir or out / "cache", cfg.scoring, out_dir=out / "scores")
    rewards = reward_columns(items, matrices, cfg)
    names = cfg.reward_names()
    paths.update({"scores": out / "scores", "rewards": out / "rewards.parquet", "selections": out / "selections.parquet",
                  "summary_csv": out / "summary.csv", "summary_md": out / "summary.md"})
    rewards.to_parquet(paths["rewards"], index=False)

    selections = select(rewards, names, cfg.pools, cfg.top_k)
    selections = selections.merge(rewards[["prompt_id", "sample", "prompt", "image_id", "image"]], on=["prompt_id", "sample"], how="left")
    selections.to_parquet(paths["selections"], index=False)
    table = summary(rewards, selections, names)
    table.to_csv(paths["summary_csv"], index=False)
    paths["summary_md"].write_text(summary_markdown(table))

    if cfg.grids:
        top1 = selections[(selections["k"] == 1) & (selections["rank"] == 0)].set_index(["prompt_id", "reward", "n"])["image"]
        for pid, prompt in enumerate(prompts):
            grid = prompt_grid(prompt, names, cfg.pools, lambda r, n: read_any(top1[(pid, r, n)]), cfg.grid_cell)
            save_grid(grid, out / "grids" / f"{pid:05d}.png")
        paths["grids"] = out / "grids"
    if cfg.human_eval is not None:
        he = cfg.human_eval
        pairs = he.pairs or [(m, f"textnorm({m})") for m in cfg.models]
        export(selections, rewards, [tuple(p) for p in pairs], he.n or n_max, he.k, he.seed, out / "human_eval",
               out / "human_eval_key.csv", read_any, he.max_prompts)
        paths.update({"human_eval": out / "human_eval" / "index.html", "human_eval_key": out / "human_eval_key.csv"})
    return paths


QUICKSTART_CONTRAST = {
    "a photo of three red circles": ["a photo of one red circle", "a photo of two red circles",
                                     "a photo of four red circles", "a photo of three blue circles"],
    "a photo of a blue square and a green circle": ["a photo of a green square and a blue circle", "a photo of a blue square",
                                                    "a photo of a green circle", "a photo of two blue squares and a green circle"],
    "a watercolor painting of a lighthouse at dusk": ["an oil painting of a lighthouse at dusk",
                                                      "a watercolor painting of a lighthouse at noon", "a photo of a lighthouse at dusk"],
}


def quickstart_step(out: Path, models: list[str]) -> dict[str, Path]:
    """The quickstart's best-of-n: tiny pipeline, 3 prompts, n = 16 (pools 4 and 16), 32 px."""
    from tn_ray.experiments.tia2_eval import EnsembleSpec

    root = out / "bestofn"
    root.mkdir(parents=True, exist_ok=True)
    contrast = root / "contrast.json"
    contrast.write_text(json.dumps(QUICKSTART_CONTRAST, indent=1))
    cfg = BestOfNConfig(
        out=str(root), contrast=str(contrast), pools=[4, 16], top_k=[1, 4], models=models,
        textnorm=SetParams(tau=1.0, lam=1.0),
        ensembles=[EnsembleSpec(name="ensemble-mean", members=models, kind="mean"),
                   EnsembleSpec(name="ensemble-uncertainty", members=models, kind="uncertainty")],
        generation=GenerationConfig(pipeline="tiny", num_inference_steps=3, height=32, width=32,
                                    pipeline_batch_size=8, batch_size=16),
        scoring=ScoringConfig(batch_size=32), grid_cell=64,
        human_eval=HumanEvalConfig(pairs=[("ensemble-uncertainty", models[0])], k=4),
    )
    paths = run(cfg)
    table = pd.read_csv(paths["summary_csv"])
    judge = "ensemble-uncertainty"
    wide = table[table["judge"] == judge].pivot_table(index="selector", columns="n", values="mean", sort=False)
    wide.columns = [f"n={c}" for c in wide.columns]
    print(f"best-of-n, top-1 image judged by {judge} (random tiny models: the numbers only show the flow):")
    print(wide.reset_index().to_markdown(index=False, floatfmt=".4f"))
    return paths
