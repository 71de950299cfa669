"""``tn-ray prompts compare``: how close the rule-built sets are to TIA2's released sets.

Per x0 of the counting and composition sets: Jaccard |R & L| / |R | L| between the rules'
set R and the released set L (prompts compared lower-cased, whitespace-collapsed, without a
trailing period), plus coverage |R & L| / |L| and precision |R & L| / |R|; then their
mean/median per set.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tn_ray.data.tia2 import load_prompt_sets, load_subcategories
from tn_ray.prompts.base import normalize
from tn_ray.prompts.categories import categorize
from tn_ray.prompts.quantities import parse
from tn_ray.prompts.rules import contrast
from tn_ray.prompts.settings import RulesConfig

SETS = ("counting", "composition")


def jaccard(a, b) -> float:
    a, b = {normalize(x) for x in a}, {normalize(x) for x in b}
    return len(a & b) / len(a | b) if a | b else 1.0


def per_prompt(root: Path, sets=SETS, cfg: RulesConfig | None = None) -> pd.DataFrame:
    rows = []
    for set_name in sets:
        for x0, released in load_prompt_sets(set_name, Path(root)).items():
            rules = contrast(x0, cfg)
            r, rel = {normalize(x) for x in rules}, {normalize(x) for x in released if normalize(x) != normalize(x0)}
            both = len(r & rel)
            rows.append({"set": set_name, "x0": x0, "n_rules": len(r), "n_released": len(rel), "shared": both,
                         "jaccard": both / len(r | rel) if r | rel else 1.0,
                         "coverage": both / len(rel) if rel else np.nan,
                         "precision": both / len(r) if r else np.nan})
    return pd.DataFrame(rows)


def per_set(table: pd.DataFrame) -> pd.DataFrame:
    g = table.groupby("set", sort=False)
    return pd.DataFrame({
        "prompts": g.size(), "unparsed": g["n_rules"].apply(lambda s: int((s == 0).sum())),
        "mean |rules|": g["n_rules"].mean(), "mean |released|": g["n_released"].mean(),
        "jaccard mean": g["jaccard"].mean(), "jaccard median": g["jaccard"].median(),
        "jaccard min": g["jaccard"].min(), "jaccard max": g["jaccard"].max(),
        "coverage mean": g["coverage"].mean(), "precision mean": g["precision"].mean(),
    }).reset_index()


def category_agreement(root: Path) -> pd.DataFrame:
    """Per TIA2 subcategory: prompts, share whose categories include it, share where it comes first."""

    rows = [{"subcategory": c, "found": c in categorize(p), "first": categorize(p)[0] == c,
             "n_categories": len(categorize(p))}
            for p, c in load_subcategories(Path(root)).items() if c != "reddit"]
    if not rows:
        return pd.DataFrame(columns=["subcategory", "prompts", "found", "first", "n_categories"])
    df = pd.DataFrame(rows)
    g = df.groupby("subcategory")
    table = pd.DataFrame({"prompts": g.size(), "found": g["found"].mean(), "first": g["first"].mean(),
                          "n_categories": g["n_categories"].mean()}).reset_index()
    total = pd.DataFrame([{"subcategory": "all", "prompts": len(df), "found": df["found"].mean(),
                           "first": df["first"].mean(), "n_categories": df["n_categories"].mean()}])
    return pd.concat([table, total], ignore_index=True)


def compare(root: Path, out_dir: Path, cfg: RulesConfig | None = None) -> dict[str, Path]:
    """Write overlap.md (per set, plus the rules restricted to quantity changes) and the per-prompt CSV."""
    cfg = cfg or RulesConfig()
    table = per_prompt(root, cfg=cfg)
    summary = per_set(table)
    no_subs = per_set(per_prompt(root, sets=("composition",), cfg=cfg.model_copy(update={"max_substitutions": 0})))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"overlap_md": out_dir / "overlap.md", "per_prompt_csv": out_dir / "overlap_per_prompt.csv"}
    table.to_csv(paths["per_prompt_csv"], index=False)
    counting = table[table["set"] == "counting"].assign(
        quantity=lambda d: d["x0"].map(lambda x: parse(x).slots[0].count)
    )
    by_q = counting.groupby("quantity")[["n_rules", "n_released", "jaccard"]].mean().reset_index()
    md = [
        "# Rule-built vs released TIA2 contrastive sets",
        "",
        f"Rules: counting = every other quantity 1..{cfg.max_count}; composition = each object alone, "
        f"every other quantity pair in 1..{cfg.composition_max_count}, substitutions from the "
        f"{len(cfg.vocabulary)}-class vocabulary. Prompts compared lower-cased, whitespace-collapsed, "
        "without trailing period. Jaccard = |R & L| / |R | L|; coverage = |R & L| / |L|; precision = |R & L| / |R|.",
        "",
        "## Per set",
        "",
        summary.to_markdown(index=False, floatfmt=".3f"),
        "",
        "## Counting by quantity of x0",
        "",
        by_q.to_markdown(index=False, floatfmt=".3f"),
        "",
        "## Composition without substitutions (max_substitutions=0)",
        "",
        no_subs.to_markdown(index=False, floatfmt=".3f"),
        "",
        "Released sets quantify up to 8 around x0 (counting) and add 'X-like Y', cartoon and unrelated "
        "LLM-written prompts (composition); three of their eight quantity pairs are written without 'and' "
        "('two airplanes two apples'), so an exact-string rule cannot match them.",
        "",
    ]
    md += [
        "## Failure categories of the comprehensive prompts (few-shot allocation of the llm source)",
        "",
        "Rule-based categories (`tn_ray/prompts/categories.py`) against TIA2's subcategories "
        "(reddit has no counterpart). The cue lists were written with these prompts in view.",
        "",
        category_agreement(root).to_markdown(index=False, floatfmt=".2f"),
        "",
    ]
    paths["overlap_md"].write_text("\n".join(md))
    return paths
