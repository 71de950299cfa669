"""``tn-ray tia2 eval``: score the benchmark's images, apply TextNorm, compute the metrics.

Flow: validate everything (sets, models, labels, contrastive sets, every image file) before
any model loads -> score matrices per model (cached; only missing rewards are computed) ->
reward columns (raw, TextNorm, ensembles; pure array functions) -> per-prompt and per-set
metrics -> tables and a bar plot.
"""
from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from tn_ray.experiments import metrics

from tn_ray.data import tia2
from tn_ray.config import RayConfig, ScoringConfig, StrictModel, dump_config
from tn_ray.rewards import parse
from tn_ray.scoring.matrix import ScoreMatrix
from tn_ray.storage import Store
from tn_ray.textnorm.equations import ensemble, textnorm

log = logging.getLogger(__name__)


class SetParams(StrictModel):
    tau: float = Field(1.0, gt=0, description="TextNorm temperature for every model on this set (reward units)")
    tau_per_model: dict[str, float] = Field(default_factory=dict, description="temperature overrides by model spec, e.g. {'clip': 0.5} (reward units)")
    lam: float = Field(0.0, ge=0, description="lambda of the uncertainty-regularized ensembles on this set (1/reward^2)")

    def tau_for(self, model: str) -> float:
        name = model.split(":")[0]
        return self.tau_per_model.get(model, self.tau_per_model.get(name, self.tau))


class EnsembleSpec(StrictModel):
    name: str = Field(..., description="column name of this ensemble in the tables")
    members: list[str] = Field(..., min_length=2, description="model specs averaged (each must be in `models`)")
    kind: Literal["mean", "uncertainty"] = Field("mean", description="mean (eq. 2) or mean - lambda * variance (eq. 3)")
    textnorm: bool = Field(True, description="ensemble TextNorm-normalized rewards (True) or raw rewards (False)")


class Tia2EvalConfig(StrictModel):
    images: str | None = Field(None, description="folder with one sub-folder per set holding the label files' image names")
    tia2_dir: str | None = Field(None, description="local copy of the TIA2 labels/prompts; None = $TN_RAY_TIA2_DIR or download")
    out: str = Field("results/tia2/eval", description="output folder for tables, plot and score matrices")
    cache_dir: str | None = Field(None, description="reward cache folder; None = <out>/cache")
    models: list[str] = Field(default_factory=lambda: ["clip", "pickscore"], min_length=1, description="reward model specs, e.g. clip, clip:tiny, pickscore:/local/path")
    sets: list[Literal["comprehensive", "counting", "composition"]] = Field(default_factory=lambda: list(tia2.SETS), description="TIA2 sets to evaluate")
    max_prompts: int | None = Field(None, ge=1, description="evaluate only the first N prompts of each set (count); None = all")
    contrast: str = Field("released", description="contrastive sets: 'released' (TIA2's) or a JSON file {prompt: [x1..xm]} per set, with {set} in the path")
    textnorm: dict[str, SetParams] = Field(default_factory=lambda: {"default": SetParams()}, description="TextNorm parameters per set name; 'default' for the rest")
    ensembles: list[EnsembleSpec] = Field(default_factory=list, description="ensembles to evaluate next to the single models")
    scoring: ScoringConfig = Field(default_factory=ScoringConfig, description="Ray scoring: batch size, actors, resources")
    ray: RayConfig = Field(default_factory=RayConfig, description="where Ray runs")

    @field_validator("models")
    @classmethod
    def _known_models(cls, v: list[str]) -> list[str]:
        return [str(parse(m)) for m in v]

    def params(self, set_name: str) -> SetParams:
        return self.textnorm.get(set_name, self.textnorm.get("default", SetParams()))


class InputError(ValueError):
    """Bad benchmark input (missing images, unknown members...), found before scoring."""


def _contrast_sets(cfg: Tia2EvalConfig, set_name: str, root: Path) -> dict[str, list[str]]:
    if cfg.contrast == "released":
        return tia2.load_prompt_sets(set_name, root)
    path = Path(cfg.contrast.format(set=set_name))
    if not path.is_file():
        raise InputError(f"contrastive set file for set '{set_name}' not found: {path}")
    return json.loads(path.read_text())


def _unreadable(path: str) -> str | None:
    import io

    from PIL import Image

    from tn_ray.storage import read_any

    try:
        with Image.open(io.BytesIO(read_any(path))) as im:
            im.verify()
        return None
    except Exception as err:  # any decoder error means the file cannot be scored
        return f"{path.rsplit('/', 1)[-1]}: {type(err).__name__}"


def collect_items(cfg: Tia2EvalConfig) -> pd.DataFrame:
    """Rows to score (keys, labels, image path, texts), checked before any model loads."""
    if not cfg.images:
        raise InputError("no image folder given (--images DIR, or `images:` in the config)")
    root = tia2.resolve_dir(cfg.tia2_dir)
    images = Store(cfg.images)  # a local folder or a cloud URI
    frames = []
    for set_name in cfg.sets:
        labels = tia2.load_labels(set_name, root)
        if cfg.max_prompts:
            keep = labels["prompt"].drop_duplicates().iloc[: cfg.max_prompts]
            labels = labels[labels["prompt"].isin(keep)]
        sets = _contrast_sets(cfg, set_name, root)
        no_set = sorted(set(labels["prompt"]) - set(sets))
        if no_set:
            raise InputError(f"{len(no_set)} prompts of set '{set_name}' have no contrastive set in "
                             f"{cfg.contrast}, e.g. {no_set[:3]}")
        df = labels.assign(
            image=[images.uri(f"{set_name}/{n}") for n in labels["image_id"]],
            image_key=[f"{set_name}/{n}" for n in labels["image_id"]],
            texts=[[p, *[x for x in dict.fromkeys(sets[p]) if x != p]] for p in labels["prompt"]],
        )
        frames.append(df)
    items = pd.concat(frames, ignore_index=True)
    paths = list(items["image"])
    present = {f for s in cfg.sets for f in images.list_files(s)}
    missing = [uri for uri, key in zip(paths, items["image_key"]) if key not in present]
    if missing:
        by_set = pd.Series([k.split("/")[0] for k in items["image_key"] if k not in present]).value_counts().to_dict()
        raise InputError(f"{len(missing)} of {len(paths)} images are missing under {cfg.images} "
                         f"(per set: {by_set}), e.g. {missing[:3]}")
    with ThreadPoolExecutor(8) as pool:
        bad = [b for b in pool.map(_unreadable, paths) if b]
    if bad:
        raise InputError(f"{len(bad)} of {len(paths)} images under {cfg.images} cannot be read, e.g. {bad[:3]}")
    return items


def reward_columns(items: pd.DataFrame, matrices: dict[str, ScoreMatrix], cfg: Tia2EvalConfig) -> pd.DataFrame:
    """Per image: each model's raw reward, its TextNorm, and each ensemble (per-set params)."""
    out = items[["set", "prompt", "image_id", "binary", "fine"]].copy()
    normalized: dict[str, np.ndarray] = {}
    for model, m in matrices.items():
        out[model] = m.raw
        tn = np.empty(len(m))
        for set_name in out["set"].unique():
            rows = (out["set"] == set_name).to_numpy()
            tn[rows] = textnorm(m.values[rows], cfg.params(set_name).tau_for(model))
        normalized[model] = tn
        out[f"textnorm({model})"] = tn
    for ens in cfg.ensembles:
        stack = np.stack([normalized[m] if ens.textnorm else matrices[m].raw for m in ens.members])
        col = np.empty(len(out))
        for set_name in out["set"].unique():
            rows = (out["set"] == set_name).to_numpy()
            col[rows] = ensemble(stack[:, rows], ens.kind, cfg.params(set_name).lam)
        out[ens.name] = col
    return out


def plot(per_set: pd.DataFrame, path: Path, metric_names=("auroc", "auprc", "ap@10", "spearman")) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(per_set["set"].unique())
    fig, axes = plt.subplots(len(sets), len(metric_names), figsize=(4 * len(metric_names), 0.4 * per_set["reward"].nunique() * len(sets) + 2), squeeze=False)
    for i, s in enumerate(sets):
        sub = per_set[per_set["set"] == s]
        for j, metric in enumerate(metric_names):
            ax = axes[i][j]
            ax.barh(sub["reward"], sub[metric], color="tab:blue")
            ax.set_title(f"{s}: {metric}", fontsize=9)
            ax.tick_params(labelsize=7)
            if j:
                ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: Tia2EvalConfig) -> dict[str, Path]:
    from tn_ray.scoring.workers import init_ray
    from tn_ray.scoring.pipeline import score_matrices

    for ens in cfg.ensembles:
        unknown = [m for m in (str(parse(x)) for x in ens.members) if m not in cfg.models]
        if unknown:
            raise InputError(f"ensemble '{ens.name}': members {unknown} are not among models {cfg.models}")
        ens.members = [str(parse(x)) for x in ens.members]
    items = collect_items(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    log.info("TIA2 eval: %d images, %d prompts, sets %s, models %s", len(items), items["prompt"].nunique(), cfg.sets, cfg.models)
    init_ray(cfg.ray)
    counts: dict[str, dict[str, int]] = {}
    matrices = score_matrices(items, cfg.models, cfg.cache_dir or out / "cache", cfg.scoring,
                              out_dir=out / "scores", stats=counts)
    (out / "scoring_summary.json").write_text(json.dumps(counts, indent=1))
    rewards = reward_columns(items, matrices, cfg)
    names = [c for c in rewards.columns if c not in ("set", "prompt", "image_id", "binary", "fine")]
    rewards.to_parquet(out / "rewards.parquet", index=False)
    prompt_table = metrics.per_prompt(rewards, names)
    set_table = metrics.per_set(prompt_table)
    paths = {"per_prompt": out / "per_prompt.parquet", "per_set_csv": out / "per_set.csv",
             "per_set_md": out / "per_set.md", "plot": out / "per_set.png", "scores": out / "scores",
             "rewards": out / "rewards.parquet", "scoring_summary": out / "scoring_summary.json"}
    prompt_table.to_parquet(paths["per_prompt"], index=False)
    prompt_table.to_csv(out / "per_prompt.csv", index=False)
    set_table.to_csv(paths["per_set_csv"], index=False)
    md = ["# TIA2 evaluation", "", f"models: {', '.join(cfg.models)}; contrastive sets: {cfg.contrast}", ""]
    for s, g in set_table.groupby("set", sort=False):
        md += [f"## {s} ({int(g['n_prompts'].iloc[0])} prompts)", "",
               g.drop(columns=["set"]).to_markdown(index=False, floatfmt=".3f"), ""]
    paths["per_set_md"].write_text("\n".join(md))
    plot(set_table, paths["plot"])
    return paths
