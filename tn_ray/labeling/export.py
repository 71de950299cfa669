"""Labelling answers out in the TIA2 label format, which :func:`tn_ray.data.tia2.load_labels`
(and so ``tia2 eval``, ``tia2 stats`` and reward learning) reads unchanged.

TIA2 has exactly three labels per image (1 good, 0 bad, -1 inconclusive; our "skip" is -1). An
item with three or more answers gets its three earliest annotators' current labels (a relabel
replaces that annotator's label, it does not reorder them); items with fewer are left out and
listed, so a half-done session never yields short label lists.
"""
from __future__ import annotations

import json
from pathlib import Path

from tn_ray.labeling.tasks import Task
from tn_ray.storage import Store

TIA2_LABELS = 3


def tia2_labels(task: Task, answers: list[dict]) -> tuple[dict, list[str]]:
    """({image: {"image", "caption", "human_labels"}}, item ids left out for lack of answers)."""
    by_item: dict[str, list[dict]] = {}
    for a in sorted(answers, key=lambda a: (a["first_at"], a["annotator"])):
        by_item.setdefault(a["item_id"], []).append(a)
    out, short = {}, []
    for item in task.items:
        got = by_item.get(item.item_id, [])
        if len(got) < TIA2_LABELS:
            short.append(item.item_id)
            continue
        out[item.item_id] = {"image": item.item_id, "caption": item.prompt,
                             "human_labels": [int(a["value"]) for a in got[:TIA2_LABELS]]}
    return out, short


def write_json(data: dict, path: str | Path) -> Path:
    """Atomic write (temporary file + rename, through :class:`tn_ray.storage.Store`) of a JSON document."""
    path = Path(path)
    Store(path.parent).write_text(path.name, json.dumps(data, indent=1))
    return path
