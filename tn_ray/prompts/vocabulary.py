"""The object vocabulary of TIA2's counting and composition sets: CIFAR-10 + 15 COCO classes.

``VOCABULARY`` lists the 25 singular nouns in alphabetical order (the order the rules use
for substitutions). :func:`derive` recovers them from the benchmark's own prompt files,
so a test can check the constant against the data.
"""
from __future__ import annotations

from pathlib import Path

from tn_ray.data.tia2 import load_prompt_sets
from tn_ray.prompts.quantities import parse

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
COCO15 = ("apple", "book", "cake", "carrot", "chair", "cup", "fork", "laptop", "microwave", "orange",
          "suitcase", "teddy bear", "toaster", "umbrella", "vase")
VOCABULARY = tuple(sorted(CIFAR10 + COCO15))


def derive(root: Path) -> list[str]:
    """The singular nouns of TIA2's counting and composition prompts (x0s), sorted."""

    nouns: set[str] = set()
    for set_name in ("counting", "composition"):
        for x0 in load_prompt_sets(set_name, Path(root)):
            parsed = parse(x0)
            if parsed is None:
                raise ValueError(f"TIA2 {set_name} prompt {x0!r} has no quantity phrase")
            nouns.update(s.noun for s in parsed.slots)
    return sorted(nouns)
