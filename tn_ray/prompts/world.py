"""``world``: the synthetic world's contrastive sets, made for any prompt of its grammar.

The set of a world prompt is every prompt one attribute away from it (a count, a colour, a
shape, a dropped object, the opposite relation: :func:`tn_ray.data.world.grammar.perturbations`),
the same sets ``tn-ray world labels`` writes as the world's "released" ones. A prompt the
grammar cannot parse gets no set (its ``error`` says so), so TextNorm over it fails by name.
"""
from __future__ import annotations

from collections.abc import Sequence

from tn_ray.data.world import grammar
from tn_ray.data.world.labels import contrast_sets
from tn_ray.prompts.base import ContrastSet


class WorldSource:
    name = "world"

    def generate(self, x0s: Sequence[str]) -> list[ContrastSet]:
        out = []
        for x0 in x0s:
            parsed = grammar.parse(x0)
            if parsed is None:
                out.append(ContrastSet(x0, [], self.name, "not a prompt of the world grammar (docs/world.md)"))
            else:
                out.append(ContrastSet(x0, contrast_sets([parsed])[parsed.text], self.name))
        return out
