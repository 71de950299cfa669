"""The world as a labelled benchmark in TIA2's layout, so ``tia2 stats`` / ``tia2 eval`` read it.

``make(root)`` writes, for prompts of the four kinds (``grammar.TIA2_SET`` maps them onto
TIA2's three sets) and scenes drawn by the sampler:

- ``root/tia2/human_annotations/human_labels_<set>.json``: per image its caption and three
  labels, all equal to the oracle's verdict (1 = match; ``label_noise`` flips each with that
  probability, to imitate annotators);
- ``root/tia2/prompts/prompt_set_<set>.json``: the world's own contrastive sets (every prompt
  one attribute away, ``grammar.perturbations``), TIA2's "released" sets here;
- ``root/tia2/comprehensive_subcategories.json``: colours / spatial for the comprehensive set;
- ``root/images/<set>/<image>.png`` and ``root/world.parquet`` (per image: kind, the oracle's
  errors, the drawn error, the scene as JSON) for breakdowns by error type.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from tn_ray.data.world import grammar, oracle, sampler, scenes


def contrast_sets(prompts: list[grammar.WorldPrompt]) -> dict[str, list[str]]:
    """The world's contrastive set of each prompt: the texts one attribute away."""
    return {p.text: list(dict.fromkeys(q.text for _, q in grammar.perturbations(p))) for p in prompts}


def make(root: Path, per_kind: int = 6, images_per_prompt: int = 16, size: int = 64, seed: int = 0,
         p_match: float = 0.5, label_noise: float = 0.0) -> tuple[Path, Path]:
    """Write the benchmark under ``root`` (see the module doc); returns (tia2 dir, images dir)."""
    rng = np.random.default_rng(seed)
    tia2_dir, img_dir = Path(root) / "tia2", Path(root) / "images"
    for sub in ("human_annotations", "prompts"):
        (tia2_dir / sub).mkdir(parents=True, exist_ok=True)
    prompts = grammar.prompt_list(per_kind, seed=seed)
    cfg = sampler.SamplerConfig(p_match=p_match)
    labels: dict[str, dict] = {s: {} for s in dict.fromkeys(grammar.TIA2_SET.values())}
    sets: dict[str, dict] = {s: {} for s in labels}
    rows = []
    for p_id, prompt in enumerate(prompts):
        set_name = grammar.TIA2_SET[prompt.kind]
        (img_dir / set_name).mkdir(parents=True, exist_ok=True)
        sets[set_name].update(contrast_sets([prompt]))
        for q in range(images_per_prompt):
            sample = sampler.draw(prompt, cfg, rng)
            verdict = oracle.judge(sample.scene, prompt)
            name = f"image_{p_id}_{q}.png"
            scenes.render(sample.scene, size, seed=int(rng.integers(2**31))).save(img_dir / set_name / name)
            truth = int(verdict.match)
            human = [truth if rng.random() >= label_noise else 1 - truth for _ in range(3)]
            labels[set_name][name] = {"image": name, "caption": prompt.text, "human_labels": human}
            rows.append({"set": set_name, "image_id": name, "prompt": prompt.text, "kind": prompt.kind,
                         "match": truth, "errors": ",".join(verdict.errors), "drawn_error": sample.error or "",
                         "scene": json.dumps(sample.scene.to_dict())})
    for set_name in labels:
        (tia2_dir / "human_annotations" / f"human_labels_{set_name}.json").write_text(
            json.dumps(labels[set_name], indent=1)
        )
        (tia2_dir / "prompts" / f"prompt_set_{set_name}.json").write_text(json.dumps(sets[set_name], indent=1))
    subcats = {p.text: p.kind for p in prompts if grammar.TIA2_SET[p.kind] == "comprehensive"}
    (tia2_dir / "comprehensive_subcategories.json").write_text(json.dumps(subcats, indent=1))
    pd.DataFrame(rows).to_parquet(Path(root) / "world.parquet", index=False)
    return tia2_dir, img_dir
