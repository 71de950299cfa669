"""``tn-ray tia2 eval``: score the benchmark's images, apply TextNorm, compute the metrics.

Flow: validate everything (sets, models, labels, contrastive sets, every image file) before
any model loads -> score matrices per model (cached; only missing rewards are computed) ->
reward columns (raw, TextNorm, ensembles; pure array functions) -> per-prompt and per-set
metrics -> tables and a bar plot, with the authors' released metrics over the same prompts as
reference rows (``release: clip``, ...; :mod:`tn_ray.analysis.paper`) and per-prompt
differences from them.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import Field, field_validator, model_validator

from tn_ray import provenance
from tn_ray.analysis import metrics, paper
from tn_ray.config import RayConfig, ScoringConfig, StrictModel, dump_config
from tn_ray.data import tia2
from tn_ray.errors import InputError
from tn_ray.prompts.contrast import load_contrast, texts_for
from tn_ray.rewards import parse
from tn_ray.rewards.availability import check_weights
from tn_ray.rewards.revisions import reward_revisions
from tn_ray.rewards.units import Reading
from tn_ray.scoring.images import check_images
from tn_ray.scoring.matrix import ScoreMatrix
from tn_ray.storage import Store, check_output_dir
from tn_ray.textnorm.columns import ColumnSpec, SetParams, check_ensembles, reward_columns

log = logging.getLogger(__name__)


class Tia2EvalConfig(StrictModel):
    images: str | None = Field(None, description="folder with one sub-folder per set holding the label files' image "
                                                 "names")
    tia2_dir: str | None = Field(None, description="local copy of the TIA2 labels/prompts; None = $TN_RAY_TIA2_DIR or "
                                                   "download")
    out: str = Field("results/tia2/eval", description="output folder for tables, plot and score matrices")
    cache_dir: str | None = Field(None, description="reward cache folder; None = <out>/cache")
    models: list[str] = Field(
        default_factory=lambda: ["clip", "pickscore"],
        min_length=1,
        description="reward model specs, e.g. clip, clip:tiny, pickscore:/local/path",
    )
    sets: list[Literal["comprehensive", "counting", "composition"]] = Field(
        default_factory=lambda: list(tia2.SETS), description="TIA2 sets to evaluate"
    )
    max_prompts: int | None = Field(
        None, ge=1, description="evaluate only the first N prompts of each set (count); None = all"
    )
    contrast: str = Field(
        "released",
        description="contrastive sets: 'released' (TIA2's) or a JSON file {prompt: "
        "[x1..xm]} per set, with {set} in the path",
    )
    dedupe: bool = Field(
        True,
        description="drop repeated prompts inside a contrastive set and a set's own x0 (TIA2's "
        "release: 32 composition sets repeat a prompt, 41 repeats; one "
        "comprehensive set holds its x0); false = use the sets exactly as released. "
        "Counts: contrast_summary.json",
    )
    textnorm: dict[str, SetParams] = Field(
        default_factory=lambda: {"default": SetParams()},
        description="TextNorm parameters per set name; 'default' for the rest",
    )
    ensembles: list[ColumnSpec] = Field(
        default_factory=list, description="ensembles to evaluate next to the single models"
    )
    release_params: list[Reading] = Field(
        default_factory=list,
        description="also evaluate the paper's TextNorm (ImageReward + PickScore ensembles, mean "
        "on "
        "composition) with the TIA2 release's per-prompt scale and lambda, one column per reading of `scale`: "
        "'temperature' (tau on the authors' reward values) and/or 'multiplier' (rewards x scale); needs an imagereward "
        "and a pickscore model (any weights). Which reading is right could not be verified without the images",
    )
    scoring: ScoringConfig = Field(
        default_factory=ScoringConfig, description="Ray scoring: batch size, actors, resources"
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="where Ray runs")

    @field_validator("models")
    @classmethod
    def _known_models(cls, v: list[str]) -> list[str]:
        return [str(parse(m)) for m in v]

    @model_validator(mode="after")
    def _ensembles(self) -> Tia2EvalConfig:
        object.__setattr__(self, "ensembles", check_ensembles(self.ensembles, self.models))
        names = {m.split(":")[0] for m in self.models}
        missing = [m for m in paper.RELEASE_MEMBERS if m not in names]
        if self.release_params and missing:
            raise ValueError(
                f"release_params: the paper's TextNorm needs models {list(paper.RELEASE_MEMBERS)}; "
                f"{missing} not among models {self.models}"
            )
        return self

    def params(self, set_name: str) -> SetParams:
        return self.textnorm.get(set_name, self.textnorm.get("default", SetParams()))


def collect_items(cfg: Tia2EvalConfig, contrast_stats: dict | None = None) -> pd.DataFrame:
    """Rows to score (keys, labels, image path, texts), checked before any model loads; per set, what
    the contrastive sets held (repeats, own x0: :func:`tn_ray.prompts.contrast.texts_for`) goes into
    ``contrast_stats``."""
    if not cfg.images:
        raise InputError("no image folder given (--images DIR, or `images:` in the config)")
    if Path(cfg.images).is_file():
        raise InputError(f"--images {cfg.images}: a file, not a folder with one sub-folder of images per set")
    root = tia2.resolve_dir(cfg.tia2_dir)
    images = Store(cfg.images)  # a local folder or a cloud URI
    frames = []
    for set_name in cfg.sets:
        labels = tia2.load_labels(set_name, root)
        if cfg.max_prompts:
            keep = labels["prompt"].drop_duplicates().iloc[: cfg.max_prompts]
            labels = labels[labels["prompt"].isin(keep)]
        sets = load_contrast(cfg.contrast, tia2_dir=root, set_name=set_name)
        origin = "TIA2's released sets" if cfg.contrast == "released" else cfg.contrast.format(set=set_name)
        df = labels.assign(
            image=[images.uri(f"{set_name}/{n}") for n in labels["image_id"]],
            image_key=[f"{set_name}/{n}" for n in labels["image_id"]],
            texts=texts_for(
                list(labels["prompt"]),
                sets,
                origin,
                dedupe=cfg.dedupe,
                stats=(contrast_stats if contrast_stats is not None else {}).setdefault(set_name, {}),
            ),
        )
        frames.append(df)
    items = pd.concat(frames, ignore_index=True)
    paths = list(items["image"])
    present = {f for s in cfg.sets for f in images.list_files(s)}
    missing = [uri for uri, key in zip(paths, items["image_key"]) if key not in present]
    if missing:
        by_set = pd.Series([k.split("/")[0] for k in items["image_key"] if k not in present]).value_counts().to_dict()
        raise InputError(
            f"{len(missing)} of {len(paths)} images are missing under {cfg.images} "
            f"(per set: {by_set}), e.g. {missing[:3]}"
        )
    check_images(paths, str(cfg.images))
    return items


def reward_table(
    items: pd.DataFrame, matrices: dict[str, ScoreMatrix], cfg: Tia2EvalConfig, ranking: bool = False
) -> pd.DataFrame:
    """Per image: keys, labels and every reward column (per-set TextNorm parameters); with
    ``ranking``, TextNorm columns in their order-preserving log form (what metrics rank)."""
    out = items[["set", "prompt", "image_id", "binary", "fine"]].copy()
    values = {model: m.values for model, m in matrices.items()}
    params = {s: cfg.params(s) for s in out["set"].unique()}
    for name, col in reward_columns(
        values, params, cfg.ensembles, groups=out["set"].to_numpy(), ranking=ranking
    ).items():
        out[name] = col
    if cfg.release_params:
        released = paper.release_params(tia2.resolve_dir(cfg.tia2_dir), cfg.sets)
        for name, col in paper.release_columns(out, values, released, cfg.release_params, ranking).items():
            out[name] = col
    return out


def plot(per_set: pd.DataFrame, path: Path, metric_names=("auroc", "auprc", "ap@10", "spearman")) -> None:
    """Horizontal bars per set and metric; reference rows (``release: ...``) in grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(per_set["set"].unique())
    if not sets:  # every prompt had unanimous labels: no metric to draw (the tables say so)
        log.warning("no prompt with mixed labels: %s not drawn", path)
        return
    fig, axes = plt.subplots(
        len(sets),
        len(metric_names),
        figsize=(4 * len(metric_names), 0.4 * per_set["reward"].nunique() * len(sets) + 2),
        squeeze=False,
    )
    for i, s in enumerate(sets):
        sub = per_set[per_set["set"] == s]
        colors = ["tab:gray" if r.startswith(paper.PREFIX) else "tab:blue" for r in sub["reward"]]
        for j, metric in enumerate(metric_names):
            ax = axes[i][j]
            ax.barh(sub["reward"], sub[metric], color=colors)
            ax.set_title(f"{s}: {metric}", fontsize=9)
            ax.tick_params(labelsize=7)
            if j:
                ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reference(items: pd.DataFrame, cfg: Tia2EvalConfig) -> pd.DataFrame:
    """The released per-prompt metrics of exactly the evaluated prompts (those with mixed labels,
    as :func:`metrics.per_prompt` keeps), empty (with a warning) when the TIA2 copy has no
    ``alignment_scores/`` and without a set (a warning) whose evaluated prompts it does not all cover;
    read before any model loads, so a malformed file fails first."""
    root = tia2.resolve_dir(cfg.tia2_dir)
    if not (root / "alignment_scores").is_dir():
        log.warning("%s has no alignment_scores/: no paper reference rows", root)
        return paper.prompt_table(root, [])
    evaluated = {s: set(g["prompt"]) for s, g in items.groupby("set", sort=False)}
    return paper.prompt_table(root, list(evaluated), evaluated, strict=False)


def run(cfg: Tia2EvalConfig, allow_provenance_change: bool = False) -> dict[str, Path]:
    from tn_ray.cluster import init_ray
    from tn_ray.scoring.batch_scoring import score_matrices

    contrast_stats: dict[str, dict] = {}
    items = collect_items(cfg, contrast_stats)
    paper_prompts = reference(items, cfg)
    check_weights(cfg.models)
    out = check_output_dir(cfg.out)  # a file in its place or no write permission: named before Ray starts
    provenance.record(out, cfg, allow_change=allow_provenance_change, revisions=reward_revisions(cfg.models))
    dump_config(cfg, out / "config.yaml")
    (out / "contrast_summary.json").write_text(json.dumps(contrast_stats, indent=1))
    log.info(
        "TIA2 eval: %d images, %d prompts, sets %s, models %s",
        len(items),
        items["prompt"].nunique(),
        cfg.sets,
        cfg.models,
    )
    init_ray(cfg.ray)
    counts: dict[str, dict[str, int]] = {}
    matrices = score_matrices(
        items, cfg.models, cfg.cache_dir or out / "cache", cfg.scoring, out_dir=out / "scores", stats=counts
    )
    (out / "scoring_summary.json").write_text(json.dumps(counts, indent=1))
    rewards = reward_table(items, matrices, cfg)
    names = [c for c in rewards.columns if c not in ("set", "prompt", "image_id", "binary", "fine")]
    rewards.to_parquet(out / "rewards.parquet", index=False)
    prompt_table = metrics.per_prompt(reward_table(items, matrices, cfg, ranking=True), names)
    set_table = metrics.per_set(prompt_table)
    paper_table = metrics.per_set(paper_prompts)
    paths = {
        "per_prompt": out / "per_prompt.parquet",
        "per_set_csv": out / "per_set.csv",
        "per_set_md": out / "per_set.md",
        "plot": out / "per_set.png",
        "scores": out / "scores",
        "rewards": out / "rewards.parquet",
        "scoring_summary": out / "scoring_summary.json",
        "contrast_summary": out / "contrast_summary.json",
        "paper_per_set": out / "paper_per_set.csv",
        "paper_diff": out / "paper_diff.csv",
    }
    prompt_table.to_parquet(paths["per_prompt"], index=False)
    prompt_table.to_csv(out / "per_prompt.csv", index=False)
    set_table.to_csv(paths["per_set_csv"], index=False)
    paper_table.to_csv(paths["paper_per_set"], index=False)
    paper.differences(prompt_table, paper_prompts, cfg.models).to_csv(paths["paper_diff"], index=False)
    both = pd.concat([set_table, *([paper_table] if len(paper_table) else [])], ignore_index=True)
    both = both.iloc[both["set"].map({s: i for i, s in enumerate(cfg.sets)}).argsort(kind="stable")]
    md = [
        "# TIA2 evaluation",
        "",
        f"models: {', '.join(cfg.models)}; contrastive sets: {cfg.contrast}",
        "",
        "`release: ...` rows: the benchmark authors' released per-prompt metrics over the same prompts "
        "(`tn-ray tia2 paper` puts them beside the paper's Table 2).",
        "",
    ]
    for s, g in both.groupby("set", sort=False):
        md += [
            f"## {s} ({int(g['n_prompts'].iloc[0])} prompts)",
            "",
            g.drop(columns=["set"]).to_markdown(index=False, floatfmt=".3f"),
            "",
        ]
    paths["per_set_md"].write_text("\n".join(md))
    plot(both, paths["plot"])
    return paths
