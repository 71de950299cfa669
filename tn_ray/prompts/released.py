"""The contrastive sets released with TIA2 (``tn_ray.data.tia2.load_prompt_sets``), looked up by x0."""
from __future__ import annotations

from collections.abc import Sequence

from tn_ray.data import tia2
from tn_ray.prompts.base import ContrastSet, clean
from tn_ray.prompts.settings import ReleasedConfig


class ReleasedSource:
    name = "released"

    def __init__(self, cfg: ReleasedConfig | None = None):
        self.cfg = cfg or ReleasedConfig()
        root = tia2.resolve_dir(self.cfg.tia2_dir)
        self.sets: dict[str, list[str]] = {}
        for set_name in tia2.check_sets(self.cfg.sets):
            for x0, prompts in tia2.load_prompt_sets(set_name, root).items():
                self.sets.setdefault(x0, prompts)

    def one(self, x0: str) -> ContrastSet:
        if x0 not in self.sets:
            return ContrastSet(x0, [], self.name, f"released: not a prompt of the TIA2 sets {self.cfg.sets}")
        return ContrastSet(x0, clean(x0, self.sets[x0]), self.name)

    def generate(self, x0s: Sequence[str]) -> list[ContrastSet]:
        return [self.one(x) for x in x0s]
