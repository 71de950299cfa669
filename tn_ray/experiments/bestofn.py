"""``tn-ray bestofn CONFIG``: generate n images per prompt, score, normalize, keep the best.

Flow: prompts and contrastive sets checked before any model loads -> seeded, sharded,
resumable generation (:mod:`tn_ray.diffusion.generation`) streaming into the reward actors, which
score each image as it is made (:mod:`tn_ray.experiments.bestofn_stream`; ``stream: false``:
generate first, score after) -> score matrices per reward model from the cache
(:func:`tn_ray.scoring.batch_scoring.score_matrices`, which computes whatever is missing) -> reward columns: each raw
model, its TextNorm, each ensemble -> top-k per prompt, reward and nested pool n
(:mod:`tn_ray.analysis.bestofn_selection`) -> selections Parquet, overoptimization summary, per-prompt grids,
blinded human-evaluation pages.

Outputs under ``out``::

    config.yaml  generation/  cache/  scores/<model_slug>.parquet  rewards.parquet
    selections.parquet  summary.csv  summary.md  grids/<prompt_id>.png
    human_eval/index.html (+ pages, images)  human_eval_key.csv

A score matrix has keys set='bestofn', prompt, image_id, prompt_id (int), sample (int).
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from pydantic import Field, field_validator, model_validator

from tn_ray import provenance
from tn_ray.analysis.bestofn_selection import select, summary, summary_markdown
from tn_ray.analysis.human_eval import HumanEvalConfig, export
from tn_ray.config import RayConfig, ScoringConfig, StrictModel, dump_config
from tn_ray.data import tia2
from tn_ray.diffusion.generation import GenerationConfig, generate
from tn_ray.diffusion.pipelines import check_scheduler, check_source, pipeline_revisions
from tn_ray.errors import InputError
from tn_ray.experiments.bestofn_stream import generate_and_score
from tn_ray.prompts.contrast import generates, load_contrast, sets_for, texts_for
from tn_ray.rewards import parse
from tn_ray.rewards.availability import check_weights
from tn_ray.rewards.revisions import reward_revisions
from tn_ray.scoring.batch_scoring import generated_items
from tn_ray.scoring.matrix import ScoreMatrix
from tn_ray.storage import check_output_dir, read_any
from tn_ray.textnorm.columns import (
    ColumnSpec,
    SetParams,
    check_ensembles,
    check_service,
    reward_columns,
    reward_names,
)

log = logging.getLogger(__name__)

SET_NAME = "bestofn"


class BestOfNConfig(StrictModel):
    out: str = Field("results/bestofn", description="run folder: generation (unless generation.out), scores, "
                                                    "selections, reports")
    prompts: list[str] | None = Field(None, description="prompts x0; None = every prompt of the contrastive-set "
                                                        "source, in its order")
    contrast: str = Field("released:comprehensive", description="contrastive sets: 'released' or 'released:<TIA2 set>' "
                                                                "(the authors' sets) or a JSON file {x0: [x1..xm]}")
    tia2_dir: str | None = Field(None, description="local copy of the TIA2 prompt sets for contrast='released...'; "
                                                   "None = $TN_RAY_TIA2_DIR or download")
    max_prompts: int | None = Field(None, ge=1, description="first N prompts only (count); None = all")
    prompts_per_set: int | None = Field(None, ge=1, description="with contrast 'released' and no `prompts`: the first "
                                                                "N "
                                        "prompts of each TIA2 set, in release order (the paper: 30 per set; it does "
                                        "not "
                                        "list them); applied before max_prompts")
    pools: list[int] = Field(default_factory=lambda: [16, 64, 256], min_length=1, description="nested pool sizes n: "
                                                                                              "the first n samples of "
                                                                                              "a prompt (images)")
    top_k: list[int] = Field(default_factory=lambda: [1, 4], min_length=1, description="how many images each selection "
                                                                                       "keeps (images)")
    models: list[str] = Field(default_factory=lambda: ["clip", "pickscore"], min_length=1, description="reward model "
                                                                                                       "specs, e.g. "
                                                                                                       "clip, "
                                                                                                       "pickscore:tiny")
    textnorm: SetParams = Field(default_factory=SetParams, description="TextNorm temperature(s) and the ensembles' "
                                                                       "lambda")
    ensembles: list[ColumnSpec] = Field(default_factory=list, description="ensembles selected with next to the "
                                                                            "single models")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="text-to-image generation; "
                                                                                       "samples_per_prompt defaults to "
                                                                                       "the largest pool")
    scoring: ScoringConfig = Field(default_factory=ScoringConfig, description="Ray scoring: batch size, actors, "
                                                                              "resources")
    cache_dir: str | None = Field(None, description="reward cache folder; None = <out>/cache")
    grids: bool = Field(True, description="write one PNG grid per prompt (rows = rewards, columns = n)")
    grid_cell: int = Field(128, ge=16, description="grid cell size (pixels)")
    human_eval: HumanEvalConfig | None = Field(default_factory=HumanEvalConfig, description="blinded side-by-side "
                                                                                            "export; None = skip")
    stream: bool = Field(True, description="generate and score in one streaming pipeline, both actor pools at once "
                                           "(docs/bestofn.md); False = generate everything, then score")
    reward_share: float = Field(0.25, gt=0, le=1, description="with stream: the share of one GPU (of one CPU without "
                                                              "GPUs) each reward actor requests unless "
                                                              "scoring.gpus_per_actor / cpus_per_actor is set; "
                                                              "generation gets what is left")
    ray: RayConfig = Field(default_factory=RayConfig, description="where Ray runs")
    service: str | None = Field(None, description="a warm reward service that scores the images instead of reward "
                                                  "actors (docs/serve.md): http(s)://host:port (its token, if any, "
                                                  "from TN_RAY_SERVE_TOKEN) or serve:<app name> in the same Ray "
                                                  "cluster; it must serve `models`. None = reward actors")

    @field_validator("service")
    @classmethod
    def _service_url(cls, v: str | None) -> str | None:
        return check_service(v)

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
    def _consistent(self) -> BestOfNConfig:
        gen = self.generation
        if "samples_per_prompt" not in gen.model_fields_set:
            gen.samples_per_prompt = max(self.pools)
        elif gen.samples_per_prompt < max(self.pools):
            raise ValueError(f"generation.samples_per_prompt ({gen.samples_per_prompt}) is smaller than the largest "
                             f"pool {max(self.pools)}")
        if self.prompts_per_set and (self.prompts or self.contrast != "released"):
            raise ValueError("prompts_per_set: takes the first N prompts of each TIA2 set, so it needs contrast "
                             f"'released' and no `prompts` (got contrast '{self.contrast}'"
                             f"{', prompts given' if self.prompts else ''})")
        if generates(self.contrast) and not self.prompts:
            raise ValueError(f"prompts: required when contrast is '{self.contrast}', a source that makes sets "
                             "for given prompts (only a set file or 'released' lists prompts of its own)")
        if max(self.top_k) > min(self.pools):
            raise ValueError(f"top_k {self.top_k} exceeds the smallest pool {min(self.pools)}")
        object.__setattr__(self, "ensembles", check_ensembles(self.ensembles, self.models))
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
        return reward_names(self.models, self.ensembles)


def resolve_prompts(cfg: BestOfNConfig, contrast: dict[str, list[str]]) -> list[str]:
    if cfg.prompts:
        prompts = list(cfg.prompts)
    elif cfg.prompts_per_set:
        prompts = tia2.first_prompts(cfg.prompts_per_set, tia2.resolve_dir(cfg.tia2_dir))
    else:
        prompts = list(contrast)
    prompts = prompts[: cfg.max_prompts or None]
    if not prompts:
        raise InputError("no prompts: set `prompts` or give a non-empty contrastive-set source")
    texts_for(prompts, contrast, cfg.contrast)  # every prompt has a non-empty set, or an error names it
    return prompts


def score_items(manifest: pd.DataFrame, contrast: dict[str, list[str]], origin: str) -> pd.DataFrame:
    """The rows ``score_matrices`` takes; the image key is content-addressed (valid across runs)."""
    return generated_items(manifest, SET_NAME, texts_for([str(p) for p in manifest["prompt"]], contrast, origin))


def reward_table(items: pd.DataFrame, matrices: dict[str, ScoreMatrix], cfg: BestOfNConfig) -> pd.DataFrame:
    """Per image: its keys and every reward column (each raw model, its TextNorm, each ensemble)."""
    out = items[["prompt_id", "prompt", "sample", "image_id", "image"]].reset_index(drop=True).copy()
    values = {m: matrices[m].align(items[["set", "prompt", "image_id"]]).values for m in cfg.models}
    groups = (
        tia2.sets_of(list(out["prompt"]), tia2.resolve_dir(cfg.tia2_dir))
        if any(e.per_group for e in cfg.ensembles)
        else None
    )
    for name, col in reward_columns(values, cfg.textnorm, cfg.ensembles, groups).items():
        out[name] = col
    return out


def run(cfg: BestOfNConfig, generate_only: bool = False, allow_provenance_change: bool = False) -> dict[str, Path]:
    from tn_ray.analysis.image_grids import prompt_grid, save_grid
    from tn_ray.cluster import init_ray
    from tn_ray.scoring.batch_scoring import score_matrices

    # everything a user can get wrong is checked before Ray starts or a model loads
    if generates(cfg.contrast):  # a source that makes sets (rules, llm, world) for the given prompts
        contrast = sets_for(cfg.contrast, cfg.prompts)
    else:
        contrast = load_contrast(cfg.contrast, tia2_dir=cfg.tia2_dir)
    prompts = resolve_prompts(cfg, contrast)
    if any(e.per_group for e in cfg.ensembles):
        tia2.sets_of(prompts, tia2.resolve_dir(cfg.tia2_dir))  # a kind per TIA2 set needs each prompt's set
    check_source(cfg.generation.pipeline, cfg.generation.revision)
    check_scheduler(cfg.generation.scheduler)
    if not generate_only and not cfg.service:  # a service scores with its own weights
        check_weights(cfg.models)
    out = check_output_dir(cfg.out)
    gen = cfg.generation.model_copy(update={"out": cfg.generation.out or str(out / "generation")})
    check_output_dir(gen.out)
    if cfg.cache_dir:
        check_output_dir(cfg.cache_dir)
    resolved = cfg.model_copy(update={"generation": gen})
    provenance.record(
        out,
        resolved,
        allow_change=allow_provenance_change,
        revisions={**pipeline_revisions([(gen.pipeline, gen.revision)]), **reward_revisions(cfg.models)},
    )
    dump_config(resolved, out / "config.yaml")
    n_max = max(cfg.pools)
    log.info("best-of-n: %d prompts, pools %s, models %s", len(prompts), cfg.pools, cfg.models)
    init_ray(cfg.ray)
    cache_dir = cfg.cache_dir or out / "cache"
    if cfg.stream and not generate_only:  # rewards computed as the images are made
        texts = dict(zip(prompts, texts_for(prompts, contrast, cfg.contrast)))
        manifest = generate_and_score(
            prompts,
            texts,
            gen,
            cfg.models,
            cache_dir,
            cfg.scoring,
            set_name=SET_NAME,
            score_below=n_max,
            reward_share=cfg.reward_share,
            ray_cfg=cfg.ray,
            service=cfg.service,
        )
    else:
        manifest = generate(prompts, gen, cfg.ray)
    paths: dict[str, Path] = {"generation": Path(gen.out) if "://" not in gen.out else gen.out}
    if generate_only:
        return paths
    manifest = manifest[manifest["sample"] < n_max].reset_index(drop=True)
    items = score_items(manifest, contrast, cfg.contrast)
    # after streaming: every reward is cached and nothing is computed; otherwise what is missing
    matrices = score_matrices(items, cfg.models, cache_dir, cfg.scoring, out_dir=out / "scores", service=cfg.service)
    rewards = reward_table(items, matrices, cfg)
    names = cfg.reward_names()
    paths.update(
        {
            "scores": out / "scores",
            "rewards": out / "rewards.parquet",
            "selections": out / "selections.parquet",
            "summary_csv": out / "summary.csv",
            "summary_md": out / "summary.md",
        }
    )
    rewards.to_parquet(paths["rewards"], index=False)

    selections = select(rewards, names, cfg.pools, cfg.top_k)
    selections = selections.merge(
        rewards[["prompt_id", "sample", "prompt", "image_id", "image"]], on=["prompt_id", "sample"], how="left"
    )
    selections.to_parquet(paths["selections"], index=False)
    table = summary(rewards, selections, names)
    table.to_csv(paths["summary_csv"], index=False)
    paths["summary_md"].write_text(summary_markdown(table))

    if cfg.grids:
        top1 = selections[(selections["k"] == 1) & (selections["rank"] == 0)].set_index(["prompt_id", "reward", "n"])[
            "image"
        ]
        for pid, prompt in enumerate(prompts):
            def image(r, n, pid=pid):
                return read_any(top1[(pid, r, n)])

            grid = prompt_grid(prompt, names, cfg.pools, image, cfg.grid_cell)
            save_grid(grid, out / "grids" / f"{pid:05d}.png")
        paths["grids"] = out / "grids"
    if cfg.human_eval is not None:
        he = cfg.human_eval
        pairs = he.pairs or [(m, f"textnorm({m})") for m in cfg.models]
        export(
            selections,
            rewards,
            [tuple(p) for p in pairs],
            he.n or n_max,
            he.k,
            he.seed,
            out / "human_eval",
            out / "human_eval_key.csv",
            read_any,
            he.max_prompts,
        )
        paths.update({"human_eval": out / "human_eval" / "index.html", "human_eval_key": out / "human_eval_key.csv"})
    return paths
