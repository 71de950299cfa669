"""The judge: whether each image shows exactly what its prompt says, from the pixels alone.

Each image is read back into a scene (:mod:`.reading`) and the oracle (:mod:`.oracle`) decides the
(scene, prompt) pair. Three outcomes, kept apart so that a loss of image quality and a loss of
alignment never look the same:

- ``match``: the image parses and its scene matches the prompt;
- ``wrong scene``: the image parses, its scene does not match (``errors``: the oracle's);
- ``unparseable``: the image cannot be read (``problem`` says why); no alignment is claimed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tn_ray.data.world import grammar, oracle
from tn_ray.data.world.reading import Reading, read_scenes
from tn_ray.data.world.scenes import Obj, Scene
from tn_ray.errors import InputError

STATUSES = ("match", "wrong scene", "unparseable")


@dataclass(frozen=True)
class Verdict:
    status: str  # one of STATUSES
    errors: tuple[str, ...] = ()  # the oracle's error types (oracle.ERRORS order) when the scene is wrong
    problem: str | None = None  # why the image is unparseable

    @property
    def match(self) -> bool:
        return self.status == "match"

    @property
    def error(self) -> str | None:
        """The oracle's error types, comma-joined ("count", "colour,extra", ...); None unless a wrong scene."""
        return ",".join(self.errors) or None


def parse_prompts(prompts: Sequence[str | grammar.WorldPrompt]) -> list[grammar.WorldPrompt]:
    """The meaning of each prompt; :class:`InputError` naming the first the world's grammar cannot parse."""
    out = []
    for p in prompts:
        if isinstance(p, grammar.WorldPrompt):
            out.append(p)
            continue
        meaning = grammar.parse(p) if isinstance(p, str) else None
        if meaning is None:
            raise InputError(
                f"prompt {p!r} is not in the world's grammar (e.g. 'a photo of two red circles', 'a photo of a "
                "blue square to the left of a green triangle'; docs/world.md)"
            )
        out.append(meaning)
    return out


def decide(reading: Reading, prompt: grammar.WorldPrompt) -> Verdict:
    """The verdict of one read image for one prompt's meaning."""
    if not reading.parsed:
        return Verdict("unparseable", problem=reading.problem)
    errors = oracle.judge(reading.scene or _unchecked(reading.objects), prompt).errors
    return Verdict("wrong scene", errors) if errors else Verdict("match")


def judge(images: Sequence[Any], prompts: Sequence[str | grammar.WorldPrompt]) -> list[Verdict]:
    """Per (image, prompt) pair, its :class:`Verdict`. Prompts are parsed before any image is read; an
    image object passed several times is read once. Images: RGB PIL images or H x W x 3 uint8 arrays,
    square, 32..128 px (:class:`InputError` otherwise)."""
    if len(images) != len(prompts):
        raise InputError(f"{len(images)} images but {len(prompts)} prompts: the judge takes (image, prompt) pairs")
    meanings = parse_prompts(prompts)
    first: dict[int, int] = {}
    unique = []
    for im in images:
        if id(im) not in first:
            first[id(im)] = len(unique)
            unique.append(im)
    readings = read_scenes(unique)
    return [decide(readings[first[id(im)]], p) for im, p in zip(images, meanings)]


def _unchecked(objects: tuple[Obj, ...]) -> Scene:
    """A scene of more than ``MAX_OBJECTS`` objects, which ``Scene`` refuses but the oracle can judge:
    an image of seven well-formed objects is a wrong scene for every prompt, not an unreadable one."""
    scene = object.__new__(Scene)
    object.__setattr__(scene, "objects", tuple(sorted(objects, key=lambda o: o.cell)))
    return scene
