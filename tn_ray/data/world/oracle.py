"""The oracle: whether a scene matches a prompt, exactly, and which attribute is wrong.

A prompt means the whole scene: for each slot exactly ``count`` objects of its (colour,
shape), no other object, and (spatial) every object of the first slot in the relation to
every object of the second on the grid (left of = a smaller column, above = a smaller row).

Errors, per slot whose (colour, shape) is not present ``count`` times:
- ``count``: the (colour, shape) is there, but not ``count`` times;
- ``colour``: absent, but an unclaimed object of the slot's shape in another colour is there;
- ``shape``: absent, but an unclaimed object of the slot's colour in another shape is there;
- ``missing``: absent, and nothing stands in for it;
then ``extra`` for objects no slot accounts for, and ``relation`` when every slot is right but
the relation does not hold. A match is a verdict without errors.
"""
from __future__ import annotations

from dataclasses import dataclass

from tn_ray.data.world.grammar import WorldPrompt
from tn_ray.data.world.scenes import Obj, Scene

ERRORS = ("count", "colour", "shape", "missing", "extra", "relation")


@dataclass(frozen=True)
class Verdict:
    errors: tuple[str, ...]  # sorted by ERRORS' order; empty = the scene matches

    @property
    def match(self) -> bool:
        return not self.errors


def holds(relation: str, a: Obj, b: Obj) -> bool:
    """Whether ``a`` is ``relation`` ``b`` on the grid."""
    return {"left": a.col < b.col, "right": a.col > b.col, "above": a.row < b.row, "below": a.row > b.row}[relation]


def judge(scene: Scene, prompt: WorldPrompt) -> Verdict:
    """The exact verdict of ``scene`` for ``prompt``."""
    counts = scene.counts()
    required = {s.key for s in prompt.slots}
    claimed: set[tuple[str, str]] = set()
    errors: set[str] = set()
    for slot in prompt.slots:
        have = counts.get(slot.key, 0)
        if have:
            claimed.add(slot.key)
            if have != slot.count:
                errors.add("count")
            continue
        free = sorted(k for k in counts if k not in required and k not in claimed)
        same_shape = [k for k in free if k[1] == slot.shape]
        same_color = [k for k in free if k[0] == slot.color]
        if same_shape:
            errors.add("colour")
            claimed.add(same_shape[0])
        elif same_color:
            errors.add("shape")
            claimed.add(same_color[0])
        else:
            errors.add("missing")
    if set(counts) - claimed:
        errors.add("extra")
    if not errors and prompt.relation:
        first, second = (scene.of(*s.key) for s in prompt.slots)
        if not all(holds(prompt.relation, a, b) for a in first for b in second):
            errors.add("relation")
    return Verdict(tuple(e for e in ERRORS if e in errors))


def matches(scene: Scene, prompt: WorldPrompt) -> bool:
    return judge(scene, prompt).match
