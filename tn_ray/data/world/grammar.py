"""Prompts about scenes, in four kinds mirroring TIA2's sets, and their exact parser.

- ``counting``: "a photo of three red circles" (one slot, count 1..5);
- ``colours``: "a photo of a green triangle" (one object: its colour and shape);
- ``composition``: "a photo of a red circle and two blue squares" (two slots, counts 1..2);
- ``spatial``: "a photo of a red circle to the left of a blue square" (two single objects and
  a relation: left of, right of, above, below, read on the grid's columns / rows).

A prompt means the whole scene: exactly the described objects, no others (the oracle's rule).
TIA2 has three sets; ``TIA2_SET`` files counting and composition under their own names and
colours and spatial under ``comprehensive`` (with a subcategory each).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from tn_ray.data.world.scenes import COLORS, MAX_OBJECTS, SHAPES, Scene

KINDS = ("counting", "colours", "composition", "spatial")
TIA2_SET = {
    "counting": "counting",
    "composition": "composition",
    "colours": "comprehensive",
    "spatial": "comprehensive",
}
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
COUNTING_MAX = 5
COMPOSITION_MAX = 2
PREFIX = "a photo of "


@dataclass(frozen=True)
class Slot:
    count: int
    color: str
    shape: str

    @property
    def key(self) -> tuple[str, str]:
        return self.color, self.shape


@dataclass(frozen=True)
class WorldPrompt:
    """A prompt's meaning: its kind, one or two slots and (spatial only) a relation."""

    kind: str
    slots: tuple[Slot, ...]
    relation: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown prompt kind {self.kind!r}")
        if len({s.key for s in self.slots}) != len(self.slots):
            raise ValueError(f"slots repeat a (colour, shape): {self.slots}")
        if (self.relation is not None) != (self.kind == "spatial") or (
            self.relation and self.relation not in RELATIONS
        ):
            raise ValueError(f"relation {self.relation!r} does not fit kind {self.kind!r}")

    @property
    def text(self) -> str:
        phrases = [_phrase(s, self.kind == "counting") for s in self.slots]
        joiner = f" {RELATIONS[self.relation]} " if self.relation else " and "
        return PREFIX + joiner.join(phrases)

    def with_slot(self, i: int, **change) -> WorldPrompt:
        slots = list(self.slots)
        slots[i] = replace(slots[i], **change)
        return replace(self, slots=tuple(slots))

    @property
    def n_objects(self) -> int:
        return sum(s.count for s in self.slots)


def _phrase(slot: Slot, number_for_one: bool) -> str:
    if slot.count == 1:
        return f"{'one' if number_for_one else 'a'} {slot.color} {slot.shape}"
    return f"{NUMBER_WORDS[slot.count]} {slot.color} {slot.shape}s"


_COUNT = r"(a|an|one|two|three|four|five|six)"
_NP = rf"{_COUNT} ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})s?"
_REL = "|".join(re.escape(v) for v in RELATIONS.values())
_PAIR = re.compile(rf"^{PREFIX}{_NP} (and|{_REL}) {_NP}$")
_ONE = re.compile(rf"^{PREFIX}{_NP}$")


def _count(word: str) -> int:
    return 1 if word in ("a", "an") else NUMBER_WORDS.index(word)


def parse(text: str) -> WorldPrompt | None:
    """The meaning of ``text`` if it is in the grammar (any counts 1..6), else None."""
    text = text.strip().lower()
    if m := _ONE.match(text):
        n = _count(m.group(1))
        kind = "colours" if m.group(1) in ("a", "an") else "counting"
        return WorldPrompt(kind, (Slot(n, m.group(2), m.group(3)),))
    if m := _PAIR.match(text):
        a = Slot(_count(m.group(1)), m.group(2), m.group(3))
        b = Slot(_count(m.group(5)), m.group(6), m.group(7))
        if a.key == b.key:
            return None
        if m.group(4) == "and":
            return WorldPrompt("composition", (a, b))
        if a.count != 1 or b.count != 1:
            return None
        rel = next(k for k, v in RELATIONS.items() if v == m.group(4))
        return WorldPrompt("spatial", (a, b), rel)
    return None


def describe(scene: Scene) -> WorldPrompt | None:
    """The prompt that says exactly what ``scene`` holds (None beyond two kinds of object)."""
    counts = sorted(scene.counts().items(), key=lambda kv: (kv[0][1], kv[0][0]))
    if len(counts) == 1:
        (c, s), n = counts[0]
        return WorldPrompt("colours" if n == 1 else "counting", (Slot(n, c, s),))
    if len(counts) == 2:
        return WorldPrompt("composition", tuple(Slot(n, c, s) for (c, s), n in counts))
    return None


def keys() -> list[tuple[str, str]]:
    return [(c, s) for c in COLORS for s in SHAPES]


def random_prompt(kind: str, rng: np.random.Generator) -> WorldPrompt:
    """A uniformly drawn prompt of ``kind``."""
    ks = keys()
    if kind in ("counting", "colours"):
        c, s = ks[rng.integers(len(ks))]
        n = int(rng.integers(2, COUNTING_MAX + 1)) if kind == "counting" else 1
        return WorldPrompt(kind, (Slot(n, c, s),))
    i, j = rng.choice(len(ks), size=2, replace=False)
    (c1, s1), (c2, s2) = ks[i], ks[j]
    if kind == "composition":
        n1, n2 = (int(x) for x in rng.integers(1, COMPOSITION_MAX + 1, size=2))
        return WorldPrompt(kind, (Slot(n1, c1, s1), Slot(n2, c2, s2)))
    return WorldPrompt(kind, (Slot(1, c1, s1), Slot(1, c2, s2)), str(rng.choice(list(RELATIONS))))


def prompt_list(per_kind: int, seed: int = 0, kinds: tuple[str, ...] = KINDS) -> list[WorldPrompt]:
    """``per_kind`` distinct prompts of each kind, seeded."""
    rng = np.random.default_rng(seed)
    out: list[WorldPrompt] = []
    for kind in kinds:
        seen: set[str] = set()
        while len(seen) < per_kind:
            p = random_prompt(kind, rng)
            if p.text not in seen:
                seen.add(p.text)
                out.append(p)
    return out


def vocabulary() -> list[str]:
    """Every word a prompt of this grammar can use (the proxy's tokenizer is built on it)."""
    words = set(PREFIX.split()) | set(NUMBER_WORDS[1:]) | {"an", "and"} | set(COLORS) | set(SHAPES)
    words |= {s + "s" for s in SHAPES} | {w for v in RELATIONS.values() for w in v.split()}
    return sorted(words)


assert MAX_OBJECTS >= COUNTING_MAX + 1  # a counting error of +1 must still fit a scene


OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def perturbations(prompt: WorldPrompt) -> list[tuple[str, WorldPrompt]]:
    """Prompts one attribute away from ``prompt``, each with the error the oracle finds when a
    scene matching ``prompt`` is judged against it: ``count`` (a slot's count, 1..6 for one-slot
    prompts, 1..3 for two), ``colour`` / ``shape`` (a slot's colour / shape, to a (colour, shape)
    no slot uses), ``extra`` (a slot dropped: the scene then holds an object the prompt does
    not name) and ``relation`` (the opposite relation)."""
    out: list[tuple[str, WorldPrompt]] = []
    used = {s.key for s in prompt.slots}
    one = len(prompt.slots) == 1
    for i, slot in enumerate(prompt.slots):
        if not prompt.relation:
            top = MAX_OBJECTS if one else COMPOSITION_MAX + 1
            out += [("count", prompt.with_slot(i, count=m)) for m in range(1, top + 1) if m != slot.count]
        out += [("colour", prompt.with_slot(i, color=c)) for c in COLORS if (c, slot.shape) not in used]
        out += [("shape", prompt.with_slot(i, shape=s)) for s in SHAPES if (slot.color, s) not in used]
    if not one:
        for slot in prompt.slots:
            kind = "colours" if slot.count == 1 else "counting"
            out.append(("extra", WorldPrompt(kind, (slot,))))
    if prompt.relation:
        out.append(("relation", replace(prompt, relation=OPPOSITE[prompt.relation])))
    return out
