"""The paper's experiments against exact truth, in the synthetic world (docs/world.md).

1. A labelled benchmark in TIA2's layout (``tn_ray.data.world.labels``), scored by the
   world-trained proxies through ``tia2_eval.run`` (Ray reward actors, the reward cache,
   ``textnorm.columns``, ``analysis.metrics``) once per contrastive-set source: ``rules``
   (``tn_ray.prompts.build("rules")`` with the world's coloured shapes as its vocabulary) and
   ``world`` (the world's own sets: every prompt one attribute away, TIA2's "released" here).
   Metrics against the oracle's labels, per prompt kind.
2. Best-of-n: per prompt a pool of ``pool`` scenes from the sampler (known match rate),
   scored the same way; for n = 1..pool the exact expected oracle accuracy of the image each
   selector keeps (``goodhart.expected_accuracy``), averaged over prompts with a bootstrap CI.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pandas as pd
from pydantic import Field, field_validator, model_validator

from tn_ray import prompts as sources
from tn_ray import provenance
from tn_ray.analysis import goodhart
from tn_ray.config import RayConfig, ScoringConfig, StrictModel, dump_config
from tn_ray.data import tia2
from tn_ray.data.world import grammar, labels, oracle, sampler, scenes
from tn_ray.data.world.sampler import SamplerConfig
from tn_ray.data.world.scenes import COLORS, SHAPES
from tn_ray.prompts.contrast import texts_for
from tn_ray.rewards import parse
from tn_ray.rewards.revisions import reward_revisions
from tn_ray.rewards.worldclip import ensure, parse_source
from tn_ray.textnorm.columns import ColumnSpec, EnsembleSpec, SetParams, check_ensembles, reward_columns

log = logging.getLogger(__name__)

CONTRASTS = ("rules", "world")


class BestOfNWorldConfig(StrictModel):
    per_kind: int = Field(8, ge=1, description="prompts of each of the four kinds (count)")
    pool: int = Field(256, ge=1, description="scenes drawn per prompt; every n <= pool is evaluated on subsets of it "
                                             "(images)")
    ns: list[int] = Field(
        default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256],
        min_length=1,
        description="best-of-n sizes (images), each <= pool",
    )
    sampler: SamplerConfig = Field(
        default_factory=lambda: SamplerConfig(p_match=0.25),
        description="the generator: match probability and error mix",
    )
    seed: int = Field(1, ge=0, description="seed of the prompts and pools (other than the benchmark's)")
    resamples: int = Field(
        2000, ge=100, description="bootstrap resamples over prompts for the confidence intervals (count)"
    )
    confidence: float = Field(0.95, gt=0, lt=1, description="confidence level of the intervals (probability)")

    @model_validator(mode="after")
    def _ns(self) -> BestOfNWorldConfig:
        bad = [n for n in self.ns if not 1 <= n <= self.pool]
        if bad:
            raise ValueError(f"ns {bad} are not in 1..pool ({self.pool})")
        return self


class WorldConfig(StrictModel):
    out: str = Field("results/world", description="output folder")
    seed: int = Field(0, ge=0, description="seed of the benchmark's prompts, scenes and renderings")
    per_kind: int = Field(8, ge=1, description="benchmark prompts of each of the four kinds (count)")
    images_per_prompt: int = Field(24, ge=2, description="benchmark images per prompt (images)")
    size: int = Field(64, ge=32, le=128, description="rendered image side (px)")
    p_match: float = Field(
        0.5, gt=0, lt=1, description="share of benchmark images that match their prompt (probability)"
    )
    models: list[str] = Field(
        default_factory=lambda: ["worldclip", "worldclip:seed=1", "worldclip:seed=2"],
        min_length=1,
        description="reward models; the first is 'the proxy' of the best-of-n plot, all form the ensembles",
    )
    textnorm: SetParams = Field(
        default_factory=lambda: SetParams(tau=1.0, lam=1.0),
        description="TextNorm temperature and the uncertainty ensemble's lambda",
    )
    ensembles: list[ColumnSpec] | None = Field(
        None, description="ensembles; None = mean and uncertainty over every model when there are two or more"
    )
    contrasts: list[str] = Field(
        default_factory=lambda: list(CONTRASTS),
        min_length=1,
        description="contrastive-set sources: 'rules' and/or 'world'",
    )
    bestofn: BestOfNWorldConfig = Field(
        default_factory=BestOfNWorldConfig, description="the best-of-n (Goodhart) experiment"
    )
    scoring: ScoringConfig = Field(default_factory=lambda: ScoringConfig(batch_size=64), description="Ray scoring")
    ray: RayConfig = Field(default_factory=RayConfig, description="where Ray runs")

    @field_validator("contrasts")
    @classmethod
    def _contrasts(cls, v: list[str]) -> list[str]:
        bad = [c for c in v if c not in CONTRASTS]
        if bad:
            raise ValueError(f"unknown contrast sources {bad}; known: {list(CONTRASTS)}")
        return list(dict.fromkeys(v))

    @model_validator(mode="after")
    def _models(self) -> WorldConfig:
        models = [str(parse(m)) for m in self.models]
        object.__setattr__(self, "models", models)
        ens = self.ensembles
        if ens is None:
            ens = (
                [
                    EnsembleSpec(name="ensemble-mean", members=models, kind="mean"),
                    EnsembleSpec(name="ensemble-uncertainty", members=models, kind="uncertainty"),
                ]
                if len(models) > 1
                else []
            )
        object.__setattr__(self, "ensembles", check_ensembles(ens, models))
        return self


def rules_sets(prompts: list[str]) -> dict[str, list[str]]:
    """Contrastive sets of the ``rules`` source with the world's coloured shapes as its vocabulary."""

    cfg = sources.SourcesConfig(
        rules=sources.RulesConfig(max_count=6, vocabulary=[f"{c} {s}" for c in COLORS for s in SHAPES])
    )
    return {s.x0: s.prompts for s in sources.build("rules", cfg).generate(prompts)}


def ensure_models(models: list[str]) -> None:
    """Train world proxies missing from the cache here, once, before Ray actors load them."""

    for m in models:
        spec = parse(m)
        if spec.name == "worldclip":
            ensure(parse_source(spec.source))


def contrast_sets(prompts: list[str], source: str) -> dict[str, list[str]]:
    """``{x0: [x1..xm]}`` of ``source``: ``rules`` or ``world`` (every prompt one attribute away)."""
    return rules_sets(prompts) if source == "rules" else labels.contrast_sets([grammar.parse(p) for p in prompts])


def cache_dir(cfg: WorldConfig, out: Path) -> Path:
    """The reward cache of this run's images: keyed by every setting that changes an image,
    so a run with another seed or size in the same folder never reads stale rewards."""
    import hashlib

    key = cfg.model_dump(mode="json", include={"seed", "per_kind", "images_per_prompt", "size", "p_match", "bestofn"})
    return out / "cache" / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def prescore(cfg: WorldConfig, frames: list[pd.DataFrame], cache: Path) -> None:
    """Score every image once per model against the union of its prompt's contrastive sets
    (one Ray actor pool per model); every later lookup is a cache hit."""
    from tn_ray.scoring.batch_scoring import score_matrices

    items = pd.concat(frames, ignore_index=True)
    x0s = list(dict.fromkeys(items["prompt"]))
    per_source = [
        dict(zip(x0s, texts_for(x0s, contrast_sets(x0s, c), f"the world's '{c}' sets"))) for c in cfg.contrasts
    ]
    union = {p: list(dict.fromkeys(x for texts in per_source for x in texts[p])) for p in x0s}  # x0 first
    items = items.assign(texts=[union[p] for p in items["prompt"]])
    score_matrices(items[["set", "prompt", "image_id", "image_key", "image", "texts"]], cfg.models, cache, cfg.scoring)


# --- 1. the benchmark ------------------------------------------------------------------
def benchmark_items(cfg: WorldConfig, out: Path) -> tuple[Path, Path, pd.DataFrame]:
    """Write the labelled benchmark; (tia2 dir, images dir, one row per image keyed as ``tia2 eval`` keys it)."""
    tia2_dir, images = labels.make(out / "data", cfg.per_kind, cfg.images_per_prompt, cfg.size, cfg.seed, cfg.p_match)
    world = pd.read_parquet(out / "data" / "world.parquet")
    items = world.assign(
        image_key=world["set"] + "/" + world["image_id"],
        image=[str(images / s / i) for s, i in zip(world["set"], world["image_id"])],
    )
    return tia2_dir, images, items


def benchmark(
    cfg: WorldConfig, out: Path, tia2_dir: Path, images: Path, items: pd.DataFrame, cache: Path
) -> pd.DataFrame:
    """tia2 eval of the world's benchmark per contrast source; per-prompt metrics with kind and contrast."""
    from tn_ray.experiments.tia2_eval import Tia2EvalConfig, run

    sets = list(dict.fromkeys(grammar.TIA2_SET.values()))
    frames = []
    for contrast in cfg.contrasts:
        source = "released"  # the world's own sets, written next to its labels
        if contrast == "rules":
            folder = out / "contrast"
            folder.mkdir(parents=True, exist_ok=True)
            for s in sets:
                (folder / f"rules_{s}.json").write_text(
                    json.dumps(rules_sets(list(tia2.load_prompt_sets(s, tia2_dir))), indent=1)
                )
            source = str(folder / "rules_{set}.json")
        ecfg = Tia2EvalConfig(
            images=str(images),
            tia2_dir=str(tia2_dir),
            out=str(out / f"eval_{contrast}"),
            cache_dir=str(cache),
            models=cfg.models,
            sets=sets,
            contrast=source,
            textnorm={"default": cfg.textnorm},
            ensembles=cfg.ensembles,
            scoring=cfg.scoring,
            ray=cfg.ray,
        )
        paths = run(ecfg)
        frames.append(pd.read_parquet(paths["per_prompt"]).assign(contrast=contrast))
    kinds = items.drop_duplicates("prompt").set_index("prompt")["kind"]
    table = pd.concat(frames, ignore_index=True)
    table["kind"] = table["prompt"].map(kinds)
    raw = table["reward"].isin(cfg.models)  # raw rewards do not depend on the contrastive sets: keep one copy
    table = table[~raw | (table["contrast"] == cfg.contrasts[0])].copy()
    table.loc[table["reward"].isin(cfg.models), "contrast"] = "-"
    return table


def metric_table(per_prompt: pd.DataFrame, metric: str = "auroc") -> pd.DataFrame:
    """Mean ``metric`` over prompts: rows reward x contrast, columns the prompt kinds and all."""
    wide = per_prompt.pivot_table(
        index=["reward", "contrast"], columns="kind", values=metric, aggfunc="mean", sort=False
    )
    wide = wide.reindex(columns=[k for k in grammar.KINDS if k in wide.columns])
    wide["all"] = per_prompt.groupby(["reward", "contrast"], sort=False)[metric].mean()
    return wide.reset_index()


# --- 2. best-of-n --------------------------------------------------------------------------
def bestofn_items(cfg: WorldConfig, out: Path) -> pd.DataFrame:
    """The pools: one row per image with its prompt, kind, oracle verdict and file."""
    b = cfg.bestofn
    rows = []
    folder = out / "bestofn" / "images"
    for p_id, prompt in enumerate(grammar.prompt_list(b.per_kind, seed=b.seed)):
        (folder / str(p_id)).mkdir(parents=True, exist_ok=True)
        for q, s in enumerate(sampler.pool(prompt, b.pool, b.sampler, seed=b.seed * 100_003 + p_id)):
            path = folder / str(p_id) / f"{q}.png"
            scenes.render(s.scene, cfg.size, seed=q).save(path)
            verdict = oracle.judge(s.scene, prompt)
            rows.append(
                {
                    "set": grammar.TIA2_SET[prompt.kind],
                    "prompt": prompt.text,
                    "image_id": f"{p_id}/{q}",
                    "image_key": f"bestofn/{p_id}/{q}",
                    "image": str(path),
                    "kind": prompt.kind,
                    "correct": verdict.match,
                    "errors": ",".join(verdict.errors),
                }
            )
    return pd.DataFrame(rows)


def selector_scores(items: pd.DataFrame, cfg: WorldConfig, cache: Path) -> tuple[pd.DataFrame, list[str]]:
    """Every selector's score per pool image: raw proxies, TextNorm and ensembles per contrast
    source (through ``reward_columns``), plus ``oracle`` (the truth) and ``random``."""
    from tn_ray.scoring.batch_scoring import score_matrices

    table = items[["prompt", "kind", "correct", "errors"]].copy()
    x0s = list(dict.fromkeys(items["prompt"]))
    names: list[str] = list(cfg.models)
    for contrast in cfg.contrasts:
        texts = texts_for(list(items["prompt"]), contrast_sets(x0s, contrast), f"the world's '{contrast}' sets")
        matrices = score_matrices(items.assign(texts=texts), cfg.models, cache, cfg.scoring)
        values = {m: mat.values for m, mat in matrices.items()}
        for name, col in reward_columns(values, cfg.textnorm, cfg.ensembles, ranking=True).items():  # selection ranks
            if name in cfg.models:
                table[name] = col  # a raw reward: the same whatever the contrastive sets
            else:
                table[f"{name} [{contrast}]"] = col
                names.append(f"{name} [{contrast}]")
    table["oracle"] = table["correct"].astype(float)
    table["random"] = 0.0
    return table, [*names, "oracle", "random"]


def _draw(ax, summary: pd.DataFrame, selectors: list[str], title: str) -> None:
    for sel in selectors:
        g = summary[summary["selector"] == sel].sort_values("n")
        style = {"oracle": dict(color="black", ls=":"), "random": dict(color="gray", ls="--")}.get(sel, {})
        ax.plot(g["n"], g["accuracy"], marker="o", ms=3, label=sel, **style)
        ax.fill_between(g["n"], g["ci_low"], g["ci_high"], alpha=0.12, color=ax.lines[-1].get_color())
    ax.set_xscale("log", base=2)
    ax.set_xlabel("n (best-of-n pool size)")
    ax.set_ylabel("oracle accuracy of the selected image")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)


def plot_curves(summary: pd.DataFrame, by_kind: pd.DataFrame, selectors: list[str], path: Path, title: str) -> None:
    """All prompts (left, with the legend) and one panel per prompt kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(by_kind["kind"]))
    fig = plt.figure(figsize=(14, 6.5))
    grid = fig.add_gridspec(2, 1 + (len(kinds) + 1) // 2, width_ratios=[2] + [1] * ((len(kinds) + 1) // 2))
    _draw(fig.add_subplot(grid[:, 0]), summary, selectors, "all prompts")
    fig.axes[0].legend(fontsize=7, loc="lower right")
    for i, kind in enumerate(kinds):
        _draw(fig.add_subplot(grid[i % 2, 1 + i // 2]), by_kind[by_kind["kind"] == kind], selectors, kind)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_selectors(cfg: WorldConfig, names: list[str]) -> list[str]:
    """The plot's lines: the first proxy raw, its TextNorm per source, the ensembles, oracle, random."""
    m0 = cfg.models[0]
    keep = [
        m0,
        *(n for n in names if n.startswith(f"textnorm({m0})")),
        *(n for n in names if any(n.startswith(e.name + " ") for e in cfg.ensembles)),
    ]
    return [*keep, "oracle", "random"]


def curve_table(summary: pd.DataFrame, selectors: list[str]) -> pd.DataFrame:
    """Rows selectors, columns n: 'accuracy [low, high]'."""
    cell = summary.assign(
        v=[
            f"{a:.3f} [{lo:.2f}, {hi:.2f}]"
            for a, lo, hi in zip(summary["accuracy"], summary["ci_low"], summary["ci_high"])
        ]
    )
    wide = cell.pivot(index="selector", columns="n", values="v").reindex(selectors)
    wide.columns = [f"n={c}" for c in wide.columns]
    return wide.reset_index()


def bestofn(cfg: WorldConfig, out: Path, items: pd.DataFrame, cache: Path) -> dict[str, Path]:
    b = cfg.bestofn
    table, names = selector_scores(items, cfg, cache)
    folder = out / "bestofn"
    table.to_parquet(folder / "scores.parquet", index=False)
    per_prompt = goodhart.curves(table, names, b.ns).merge(table[["prompt", "kind"]].drop_duplicates(), on="prompt")
    per_prompt.to_csv(folder / "per_prompt.csv", index=False)
    summary = goodhart.bootstrap_summary(per_prompt, b.confidence, b.resamples, seed=b.seed)
    by_kind = pd.concat(
        [
            goodhart.bootstrap_summary(g, b.confidence, b.resamples, seed=b.seed).assign(kind=k)
            for k, g in per_prompt.groupby("kind", sort=False)
        ],
        ignore_index=True,
    )
    summary.to_csv(folder / "summary.csv", index=False)
    by_kind.to_csv(folder / "summary_by_kind.csv", index=False)
    selectors = plot_selectors(cfg, names)
    title = (
        f"best-of-n in the world: {items['prompt'].nunique()} prompts, pools of {b.pool}, "
        f"p_match={b.sampler.p_match}, seed={b.seed}; bands: {int(b.confidence * 100)}% bootstrap CI over prompts"
    )
    plot_curves(summary, by_kind, selectors, folder / "goodhart.png", title)
    drops = goodhart.overoptimization(summary, per_prompt, cfg.models[0], b.confidence, b.resamples, seed=b.seed)
    drops.to_csv(folder / "overoptimization.csv", index=False)
    return {
        "bestofn_summary": folder / "summary.csv",
        "bestofn_by_kind": folder / "summary_by_kind.csv",
        "overoptimization": folder / "overoptimization.csv",
        "_drops": drops,
        "bestofn_plot": folder / "goodhart.png",
        "bestofn_scores": folder / "scores.parquet",
        "_summary": summary,
        "_selectors": selectors,
        "_names": names,
    }


# --- the whole experiment ----------------------------------------------------------------
def run(cfg: WorldConfig, allow_provenance_change: bool = False) -> dict[str, Path]:
    from tn_ray.cluster import init_ray

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    provenance.record(out, cfg, allow_change=allow_provenance_change, revisions=reward_revisions(cfg.models))
    dump_config(cfg, out / "config.yaml")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ensure_models(cfg.models)
    init_ray(cfg.ray)
    cache = cache_dir(cfg, out)
    tia2_dir, images, bench_items = benchmark_items(cfg, out)
    bon_items = bestofn_items(cfg, out)
    prescore(cfg, [bench_items, bon_items], cache)
    per_prompt = benchmark(cfg, out, tia2_dir, images, bench_items, cache)
    per_prompt.to_csv(out / "benchmark_per_prompt.csv", index=False)
    auroc, auprc = metric_table(per_prompt, "auroc"), metric_table(per_prompt, "auprc")
    bon = bestofn(cfg, out, bon_items, cache)
    summary, drops = bon.pop("_summary"), bon.pop("_drops")
    bon.pop("_selectors")
    bon.pop("_names")
    curves = curve_table(summary, list(dict.fromkeys(summary["selector"])))
    b = cfg.bestofn
    md = [
        "# The world: proxy rewards against exact truth",
        "",
        f"models: {', '.join(cfg.models)}; TextNorm tau={cfg.textnorm.tau}, lambda={cfg.textnorm.lam}; "
        f"benchmark seed {cfg.seed}: {cfg.per_kind} prompts per kind x {cfg.images_per_prompt} images "
        f"({cfg.size} px, {cfg.p_match:.0%} matching)",
        "",
        "## AUROC against the oracle (mean over prompts)",
        "",
        auroc.to_markdown(index=False, floatfmt=".3f"),
        "",
        "## AUPRC against the oracle (mean over prompts)",
        "",
        auprc.to_markdown(index=False, floatfmt=".3f"),
        "",
        f"## Best-of-n: oracle accuracy of the selected image ({b.per_kind} prompts per kind, pools of {b.pool}, "
        f"p_match={b.sampler.p_match}, seed {b.seed}; [{int(b.confidence * 100)}% bootstrap CI over prompts])",
        "",
        curves.to_markdown(index=False),
        "",
        f"## Over-optimization: peak, last, drop, and the paired difference from {cfg.models[0]} (raw) at the "
        "largest n",
        "",
        drops.to_markdown(index=False, floatfmt=".3f"),
        "",
    ]
    paths = {
        "summary_md": out / "summary.md",
        "auroc_csv": out / "auroc.csv",
        "curves_md": out / "bestofn" / "curves.md",
        "per_prompt": out / "benchmark_per_prompt.csv",
        **bon,
    }
    (out / "summary.md").write_text("\n".join(md))
    auroc.to_csv(out / "auroc.csv", index=False)
    paths["curves_md"].write_text(curves.to_markdown(index=False) + "\n")
    return paths


# --- the quickstart's step -----------------------------------------------------------------
def quickstart_config(out: Path) -> WorldConfig:
    """The world at quickstart size: 4 prompts per kind, pools of 64, one proxy (``worldclip``,
    shared with the quickstart's TIA2 step, so it trains once); no ensembles (``world run`` has them)."""
    return WorldConfig(
        out=str(out / "world"),
        models=["worldclip"],
        per_kind=4,
        images_per_prompt=16,
        bestofn=BestOfNWorldConfig(per_kind=4, pool=64, ns=[1, 2, 4, 8, 16, 32, 64], resamples=1000),
        ray=RayConfig(num_cpus=os.cpu_count()),
    )


def quickstart_step(out: Path) -> dict[str, Path]:
    """Benchmark AUROC and best-of-n curves vs the oracle at quickstart size; prints both tables."""
    cfg = quickstart_config(out)
    paths = run(cfg)
    text = Path(paths["summary_md"]).read_text()
    print(text[text.index("## AUROC") : text.index("## AUPRC")].rstrip())
    print("\nbest-of-n, oracle accuracy of the selected image [95% bootstrap CI over prompts]:")
    print(Path(paths["curves_md"]).read_text())
    return paths
