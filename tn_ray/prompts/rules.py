"""Rule-based contrastive prompts for counting and composition prompts.

- One object ("a realistic photo of three deer"): every other quantity 1..``max_count``
  of the same object ("... of a deer", "... of two deer", "... of four deer", ...).
- Two objects ("a realistic photo of a deer and a truck"): each object alone, every other
  pair of quantities in 1..``composition_max_count``, then each object replaced by each
  vocabulary class (first object, then second), keeping its quantity.

Plurals and articles come from ``inflect``; x0 itself and duplicates are never returned and
the order is a pure function of x0 and the settings.
"""
from __future__ import annotations

from collections.abc import Sequence

from tn_ray.prompts.base import ContrastSet, clean
from tn_ray.prompts.quantities import QuantityPrompt, Slot, parse
from tn_ray.prompts.settings import RulesConfig

NOT_PARSED = ("rules: no '<quantity> <object>' phrase found (the rules handle counting prompts like "
              "'a photo of three deer' and composition prompts like 'a photo of a deer and a truck')")


def counting(q: QuantityPrompt, cfg: RulesConfig) -> list[str]:
    slot = q.slots[0]
    return [q.render(q.with_slot(0, count=n)) for n in range(1, cfg.max_count + 1) if n != slot.count]


def composition(q: QuantityPrompt, cfg: RulesConfig) -> list[str]:
    a, b = q.slots
    out = []
    if cfg.singles:
        out += [q.render((a,)), q.render((Slot(count=b.count, noun=b.noun),))]
    n = cfg.composition_max_count
    out += [q.render((Slot(i, a.noun), Slot(j, b.noun))) for i in range(1, n + 1) for j in range(1, n + 1)
            if (i, j) != (a.count, b.count)]
    taken = {a.noun.lower(), b.noun.lower()}
    subs = [w for w in cfg.vocabulary if w.lower() not in taken][: cfg.max_substitutions]
    for i in range(2):
        out += [q.render(q.with_slot(i, noun=w)) for w in subs]
    return out


def contrast(x0: str, cfg: RulesConfig | None = None) -> list[str]:
    """The rule-based contrastive prompts of ``x0`` ([] when it has no quantity phrase)."""
    cfg = cfg or RulesConfig()
    q = parse(x0)
    if q is None:
        return []
    made = counting(q, cfg) if len(q.slots) == 1 else composition(q, cfg)
    return clean(x0, made)


class RulesSource:
    name = "rules"

    def __init__(self, cfg: RulesConfig | None = None):
        self.cfg = cfg or RulesConfig()

    def one(self, x0: str) -> ContrastSet:
        prompts = contrast(x0, self.cfg)
        return ContrastSet(x0, prompts, self.name, None if prompts else NOT_PARSED)

    def generate(self, x0s: Sequence[str]) -> list[ContrastSet]:
        return [self.one(x) for x in x0s]
