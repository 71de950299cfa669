"""Rule-built vs released TIA2 contrastive sets: Jaccard per set, side by side with the
composition rules restricted to quantity changes (no vocabulary substitutions).

Run: HF_HUB_OFFLINE=1 TN_RAY_TIA2_DIR=../shared/tia2 .venv/bin/python benchmarks/prompt_overlap.py
Last line: {"jaccard_counting": ..., "jaccard_composition": ..., "jaccard_composition_no_substitutions": ...,
            "coverage_counting": ..., "coverage_composition": ...}
"""
from __future__ import annotations

import json

from tn_ray.data.tia2 import resolve_dir
from tn_ray.prompts.overlap import per_prompt, per_set
from tn_ray.prompts.settings import RulesConfig


def main() -> dict:
    root = resolve_dir()
    full = per_set(per_prompt(root)).set_index("set")
    no_subs = per_set(per_prompt(root, sets=("composition",), cfg=RulesConfig(max_substitutions=0))).set_index("set")
    print(full.to_markdown(floatfmt=".3f"))
    print("\ncomposition without substitutions:")
    print(no_subs.to_markdown(floatfmt=".3f"))
    print(f"\nsubstitutions: composition Jaccard {no_subs.loc['composition', 'jaccard mean']:.3f} -> "
          f"{full.loc['composition', 'jaccard mean']:.3f}, set size {no_subs.loc['composition', 'mean |rules|']:.0f} "
          "-> "
          f"{full.loc['composition', 'mean |rules|']:.0f}, coverage of the released sets "
          f"{no_subs.loc['composition', 'coverage mean']:.3f} -> {full.loc['composition', 'coverage mean']:.3f}")
    return {"jaccard_counting": round(float(full.loc["counting", "jaccard mean"]), 4),
            "jaccard_composition": round(float(full.loc["composition", "jaccard mean"]), 4),
            "jaccard_composition_no_substitutions": round(float(no_subs.loc["composition", "jaccard mean"]), 4),
            "coverage_counting": round(float(full.loc["counting", "coverage mean"]), 4),
            "coverage_composition": round(float(full.loc["composition", "coverage mean"]), 4)}


if __name__ == "__main__":
    print(json.dumps(main()))
