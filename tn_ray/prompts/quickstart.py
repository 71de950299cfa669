"""Quickstart step: rule-built contrastive sets for the quickstart benchmark, on Ray Data.

The quickstart's prompts count and compose coloured shapes, so the substitution vocabulary
is its own coloured shapes. Writes the sets, the synthesis report and the overlap (Jaccard)
with the sets shipped beside the quickstart benchmark.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def step(out: Path) -> dict[str, Path]:
    from ..config import RayConfig
    from ..quickstart_data import COLORS, SHAPES, make
    from ..tia2 import load_prompt_sets
    from .overlap import per_prompt, per_set
    from .settings import RulesConfig, SourcesConfig
    from .synthesize import SynthesisConfig, synthesize

    data = out / "data"
    tia2_dir = data / "tia2"
    if not (tia2_dir / "prompts").is_dir():
        make(data)
    folder = out / "prompts"
    folder.mkdir(parents=True, exist_ok=True)
    rules = RulesConfig(max_count=4, vocabulary=[f"{c} {s}" for c in COLORS for s in SHAPES])
    prompts = [x0 for s in ("counting", "composition") for x0 in load_prompt_sets(s, tia2_dir)]
    (folder / "prompts.json").write_text(json.dumps(prompts, indent=1))
    cfg = SynthesisConfig(input=str(folder / "prompts.json"), out=str(folder / "rules.json"), source="rules", workers=2,
                          batch_size=4, sources=SourcesConfig(rules=rules), ray=RayConfig(num_cpus=os.cpu_count()))
    paths = synthesize(cfg)
    table = per_set(per_prompt(tia2_dir, cfg=rules))
    md = ["# Rule-built vs the quickstart's contrastive sets", "", table.to_markdown(index=False, floatfmt=".3f"), ""]
    paths["per_set_md"] = folder / "overlap.md"
    paths["per_set_md"].write_text("\n".join(md))
    return paths
