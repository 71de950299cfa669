"""The one loader and validator of contrastive-set files, and the one builder of ``[x0, *X]``.

A contrastive-set source is ``released`` (TIA2's sets, all three merged), ``released:<set>``,
a JSON file ``{x0: [x1, ..., xm]}`` (``{set}`` in the path expands to a TIA2 set name), or,
for a given list of prompts (:func:`sets_for`), a prompt source that makes sets (``rules``,
``llm``: :mod:`tn_ray.prompts`).
Every file is checked to be ``{str: [str, ...]}`` (:func:`tn_ray.data.sets.validate_sets`), naming the file and the
first offending
prompt; every command (``score``, ``tia2 eval``, best-of-n, fine-tuning, sweeps) reads sets
through :func:`load_contrast` and builds text lists through :func:`texts_for`, so a prompt
without a set is an error naming it, never a silent TextNorm of 1.0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from tn_ray.data import tia2
from tn_ray.data.sets import validate_sets
from tn_ray.errors import InputError
from tn_ray.prompts import SOURCES
from tn_ray.storage import read_json

log = logging.getLogger(__name__)


def load_contrast(
    source: str, *, tia2_dir: str | os.PathLike | None = None, set_name: str | None = None
) -> dict[str, list[str]]:
    """``{x0: [x1..xm]}`` from ``released``, ``released:<set>`` or a JSON file (validated)."""

    if source == "released" or source.startswith("released:"):
        name = source.partition(":")[2] or set_name
        sets = [name] if name else list(tia2.SETS)
        tia2.check_sets(sets)
        root = tia2.resolve_dir(tia2_dir)
        merged: dict[str, list[str]] = {}
        for s in sets:
            for x0, xs in tia2.load_prompt_sets(s, root).items():
                merged.setdefault(x0, xs)
        return merged

    path = Path(source.format(set=set_name) if set_name and "{set}" in source else source)
    return validate_sets(read_json(path, "contrastive-set file"), str(path))


def generates(source: str) -> bool:
    """Whether ``source`` is a prompt source that makes sets for given prompts (``rules``, ``llm``)
    rather than a stored set file (``released...``, a JSON file)."""

    return source in SOURCES and source != "released"


def sets_for(
    source: str, prompts: Sequence[str], *, tia2_dir: str | os.PathLike | None = None, set_name: str | None = None
) -> dict[str, list[str]]:
    """``{x0: [x1..xm]}`` covering ``prompts`` from any source: a prompt source that makes sets
    (``rules``, ``llm``, through :func:`tn_ray.prompts.build`; a prompt it cannot serve is left
    out, so :func:`texts_for` names it) or a stored one (:func:`load_contrast`)."""
    if generates(source):
        from tn_ray.prompts import build

        made = build(source).generate(list(dict.fromkeys(prompts)))
        return {c.x0: list(c.prompts) for c in made if c.ok}
    return load_contrast(source, tia2_dir=tia2_dir, set_name=set_name)


def clean_set(x0: str, xs: Sequence[str], dedupe: bool = True) -> tuple[list[str], int, bool]:
    """``xs`` as used for TextNorm: with ``dedupe``, repeated prompts once (first occurrence kept) and
    ``x0`` itself left out; without, exactly as given. Returns (prompts, repeats found, x0 in xs)."""
    unique = list(dict.fromkeys(xs))
    repeats, has_x0 = len(xs) - len(unique), x0 in unique
    return ([x for x in unique if x != x0] if dedupe else list(xs)), repeats, has_x0


def texts_for(
    prompts: Sequence[str],
    sets: Mapping[str, Sequence[str]],
    origin: str,
    *,
    dedupe: bool = True,
    stats: dict | None = None,
) -> list[list[str]]:
    """``[x0, x1..xm]`` per prompt; with ``dedupe`` (the default) repeated contrastive prompts are kept
    once and x0 itself is left out, otherwise the set is used exactly as given (``dedupe: false``
    reproduces a released set that repeats prompts or holds its own x0).

    What was found is logged (one line: counts and an example) and, when ``stats`` is a dict, counted
    there over the distinct prompts: ``sets``, ``sets_with_duplicates``, ``duplicates`` (repeats),
    ``sets_with_x0``, ``dedupe``, ``example``.
    A prompt with no set, or an empty one, is an :class:`InputError` naming the prompt and
    ``origin``: its TextNorm would be 1.0 whatever the image.
    """
    out = []
    cache: dict[str, list[str]] = {}
    found = {
        "sets": 0,
        "sets_with_duplicates": 0,
        "duplicates": 0,
        "sets_with_x0": 0,
        "dedupe": dedupe,
        "example": None,
    }
    for p in prompts:
        if p not in cache:
            if p not in sets:
                missing = sorted({q for q in prompts if q not in sets})
                raise InputError(f"{len(missing)} prompt(s) have no contrastive set in {origin}, e.g. {missing[:3]}")
            xs, repeats, has_x0 = clean_set(p, sets[p], dedupe)
            if not [x for x in xs if x != p]:
                raise InputError(
                    f"prompt {p!r} has an empty contrastive set in {origin} (TextNorm needs at least one "
                    "contrastive prompt; its TextNorm would be 1.0 for every image)"
                )
            found["sets"] += 1
            found["sets_with_duplicates"] += repeats > 0
            found["duplicates"] += repeats
            found["sets_with_x0"] += has_x0
            if (repeats or has_x0) and found["example"] is None:
                found["example"] = p
            cache[p] = [p, *xs]
        out.append(cache[p])
    if found["sets_with_duplicates"] or found["sets_with_x0"]:
        log.info(
            "contrastive sets of %s: %d of %d sets repeat a prompt (%d repeats), %d hold their own x0; %s (e.g. %r)",
            origin,
            found["sets_with_duplicates"],
            found["sets"],
            found["duplicates"],
            found["sets_with_x0"],
            "removed (dedupe: true)" if dedupe else "kept as given (dedupe: false)",
            found["example"],
        )
    if stats is not None:
        stats.update(found)
    return out
