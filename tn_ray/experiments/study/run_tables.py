"""What the report reads of a finished run: a fine-tuning cell's evaluation tables and selected step
(:func:`cell_tables`), a best-of-n run's picks (:func:`bestofn_tables`); and tables as report.json rows
(:func:`json_records`)."""

from __future__ import annotations

import json
from typing import Any

from tn_ray.analysis.finetune_report import cell_images
from tn_ray.analysis.study_report import picked
from tn_ray.errors import InputError
from tn_ray.experiments.study.cell_keys import CellKey
from tn_ray.experiments.study.config import StudyConfig
from tn_ray.storage import Store
from tn_ray.training.evaluation import read_scores


def cell_tables(key: CellKey) -> tuple[Any, int]:
    """(:func:`tn_ray.analysis.finetune_report.cell_images` of a finished cell, the step its selection.json's
    paper rule selected); reads ``eval/``, ``eval/path_kl/`` (if any) and ``selection.json``."""
    import pandas as pd

    store = Store(key.out)
    scores, base = read_scores(key.out)
    if base is None or not store.exists("selection.json"):
        raise InputError(
            f"{key.label}: {store.uri('')} has done.json but no evaluation (eval/base.parquet) or no "
            "selection.json; delete its done.json and rerun to resume it"
        )
    parts = [store.read_table(rel).to_pandas() for rel in store.list_files("eval/path_kl", ".parquet")]
    try:
        images = cell_images(scores, base, key.train, key.truth, pd.concat(parts, ignore_index=True) if parts else None)
    except ValueError as err:
        raise InputError(f"{key.label}: {store.uri('eval')}: {err}") from None
    selected = int(json.loads(store.read_text("selection.json"))["paper_rule_step"])
    return images.assign(method=key.method, reward=key.reward, kl=key.kl, seed=key.seed), selected


def bestofn_tables(grid: StudyConfig, run: CellKey) -> Any:
    """:func:`tn_ray.analysis.study_report.picked` of a finished best-of-n run, with ``method`` and ``seed``;
    reads its ``rewards.parquet`` and ``selections.parquet``."""

    store = Store(run.out)
    if not (store.exists("rewards.parquet") and store.exists("selections.parquet")):
        raise InputError(
            f"{run.label}: {store.uri('')} has done.json but no rewards.parquet / selections.parquet; delete its "
            "done.json and rerun to resume it"
        )
    rewards = store.read_table("rewards.parquet").to_pandas()
    selections = store.read_table("selections.parquet").to_pandas()
    rows = {row: rc.use for row, rc in grid.rewards.items()}
    try:
        images = picked(rewards, selections, rows, grid.truth, grid.methods[run.method].n)
    except ValueError as err:
        raise InputError(f"{run.label}: {store.uri('')}: {err}") from None
    return images.assign(method=run.method, seed=run.seed)


def json_records(frame) -> list[dict]:
    """Rows as JSON-ready dicts, every float exact (NaN as null)."""
    import math

    def plain(v):
        v = v.item() if hasattr(v, "item") else v
        return None if isinstance(v, float) and math.isnan(v) else v

    return [{k: plain(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]
