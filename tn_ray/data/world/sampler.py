"""A stand-in for a text-to-image model with known errors: scenes for a prompt that match it
with probability ``p_match`` and otherwise err in one controlled way.

Given a mismatch, the error type is drawn from ``error_weights`` restricted to the types that
apply to the prompt's kind (renormalised); each type changes one slot of a matching scene:
``count`` (its count off by one), ``colour`` / ``shape`` (all its objects recoloured /
reshaped to a (colour, shape) no slot uses), ``missing`` (the slot removed; two-slot prompts
only), ``relation`` (the two objects' cells swapped; spatial only). The oracle's verdict of
every drawn scene is exactly its intended error (tests check it).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import Field, field_validator

from tn_ray.config import StrictModel
from tn_ray.data.world.grammar import COMPOSITION_MAX, WorldPrompt
from tn_ray.data.world.oracle import holds
from tn_ray.data.world.scenes import CELLS, COLORS, MAX_OBJECTS, SHAPES, Obj, Scene, place

SAMPLED_ERRORS = ("count", "colour", "shape", "missing", "relation")
APPLICABLE = {"counting": ("count", "colour", "shape"), "colours": ("count", "colour", "shape"),
              "composition": ("count", "colour", "shape", "missing"),
              "spatial": ("colour", "shape", "missing", "relation")}


class SamplerConfig(StrictModel):
    p_match: float = Field(0.3, ge=0, le=1, description="probability that a drawn scene matches its prompt "
                                                        "(probability)")
    error_weights: dict[str, float] = Field(
        default_factory=lambda: {e: 1.0 for e in SAMPLED_ERRORS},
        description="relative weight of each error type given a mismatch (count, colour, shape, missing, relation); "
                    "renormalised over the types that apply to a prompt's kind")

    @field_validator("error_weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(SAMPLED_ERRORS))
        if unknown:
            raise ValueError(f"unknown error types {unknown}; known: {list(SAMPLED_ERRORS)}")
        if any(w < 0 for w in v.values()) or not any(w > 0 for w in v.values()):
            raise ValueError(f"error weights must be >= 0 with at least one > 0, got {v}")
        return v

    def error_probs(self, kind: str) -> dict[str, float]:
        """P(error type | mismatch) for prompts of ``kind``."""
        w = {e: self.error_weights.get(e, 0.0) for e in APPLICABLE[kind]}
        total = sum(w.values())
        if total == 0:
            raise ValueError(f"no error type with weight > 0 applies to {kind} prompts ({list(APPLICABLE[kind])})")
        return {e: x / total for e, x in w.items()}


@dataclass(frozen=True)
class Sample:
    scene: Scene
    error: str | None  # the error it was drawn with; None = a match


def _cells(rng: np.random.Generator, n: int) -> list[int]:
    return [int(c) for c in rng.choice(CELLS, size=n, replace=False)]


def _matching_cells(prompt: WorldPrompt, rng: np.random.Generator) -> list[int]:
    """Cells for the slots' objects (slot by slot), the relation holding for spatial prompts."""

    while True:
        cells = _cells(rng, prompt.n_objects)
        if not prompt.relation:
            return cells
        a, b = (Obj("circle", "red", c) for c in cells)
        if holds(prompt.relation, a, b):
            return cells


def _slot_keys(prompt: WorldPrompt) -> list[list[tuple[str, str]]]:
    return [[s.key] * s.count for s in prompt.slots]


def _free(prompt: WorldPrompt, rng: np.random.Generator, i: int, attr: str) -> str:
    used = {s.key for s in prompt.slots}
    slot = prompt.slots[i]
    if attr == "color":
        options = [c for c in COLORS if c != slot.color and (c, slot.shape) not in used]
    else:
        options = [s for s in SHAPES if s != slot.shape and (slot.color, s) not in used]
    return str(rng.choice(options))


def _new_count(prompt: WorldPrompt, i: int, rng: np.random.Generator) -> int:
    n = prompt.slots[i].count
    room = MAX_OBJECTS - (prompt.n_objects - n)
    top = room if prompt.kind != "composition" else min(room, COMPOSITION_MAX + 1)
    options = [m for m in (n - 1, n + 1) if 1 <= m <= top]
    return int(rng.choice(options))


def draw_scene(prompt: WorldPrompt, error: str | None, rng: np.random.Generator) -> Scene:
    """A scene for ``prompt`` that matches it (``error`` None) or has exactly ``error``."""
    groups = _slot_keys(prompt)
    i = int(rng.integers(len(groups)))
    if error == "count":
        groups[i] = [groups[i][0]] * _new_count(prompt, i, rng)
    elif error == "colour":
        groups[i] = [(_free(prompt, rng, i, "color"), prompt.slots[i].shape)] * len(groups[i])
    elif error == "shape":
        groups[i] = [(prompt.slots[i].color, _free(prompt, rng, i, "shape"))] * len(groups[i])
    elif error == "missing":
        groups[i] = []
    elif error not in (None, "relation"):
        raise ValueError(f"unknown error type {error!r}")
    if error in (None, "relation"):
        cells = _matching_cells(prompt, rng)
        if error == "relation":
            cells = cells[::-1]  # the two objects swap cells: the relation now holds the other way
    else:
        cells = _cells(rng, sum(len(g) for g in groups))
    return place([k for g in groups for k in g], cells)


def draw(prompt: WorldPrompt, cfg: SamplerConfig, rng: np.random.Generator) -> Sample:
    """One scene for ``prompt``: a match with probability ``p_match``, else a controlled error."""
    if rng.random() < cfg.p_match:
        return Sample(draw_scene(prompt, None, rng), None)
    probs = cfg.error_probs(prompt.kind)
    error = str(rng.choice(list(probs), p=list(probs.values())))
    return Sample(draw_scene(prompt, error, rng), error)


def pool(prompt: WorldPrompt, n: int, cfg: SamplerConfig, seed: int) -> list[Sample]:
    """``n`` independent scenes for ``prompt`` (a best-of-n pool), seeded."""
    rng = np.random.default_rng(seed)
    return [draw(prompt, cfg, rng) for _ in range(n)]
