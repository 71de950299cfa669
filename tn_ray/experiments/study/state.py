"""A run's state on disk: its ``done.json`` (:func:`read_done`), done / partial / new (:func:`status`) and how
the config it finished under differs from the grid's now (:func:`changed`)."""

from __future__ import annotations

import json

from tn_ray.experiments.study.plan import Cell
from tn_ray.provenance import differences
from tn_ray.storage import Store

DONE = "done.json"


def read_done(out: str) -> dict | None:
    store = Store(out)
    return json.loads(store.read_text(DONE)) if store.exists(DONE) else None


def status(cell: Cell) -> str:
    """``done`` (its run returned: done.json), ``partial`` (a run started: checkpoints, provenance.json or a
    best-of-n generation) or ``new``."""

    store = Store(cell.key.out)
    if store.exists(DONE):
        return "done"
    started = store.exists("provenance.json") or store.list_files("checkpoints") or store.list_files("generation")
    return "partial" if started else "new"


def changed(cell: Cell, done: dict) -> list[str]:
    """How the config a finished cell ran under differs from the grid's now (provenance's comparison)."""

    return differences({"config": done.get("config", {})}, {"config": cell.config.model_dump(mode="json")})
