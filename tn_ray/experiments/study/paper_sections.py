"""The report's paper-shaped sections (:func:`paper_sections`): win / tie / loss under every scored column, the
human raters' tallies, and the gains per sample and per estimated device-hour (each cell's counted work)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from tn_ray.analysis import efficiency as ef
from tn_ray.analysis import winloss as wl
from tn_ray.analysis.efficiency import bestofn_work
from tn_ray.errors import TnRayError
from tn_ray.experiments.study.cell_keys import CellKey
from tn_ray.experiments.study.config import StudyConfig, config_class
from tn_ray.experiments.study.cost import count_prompts, counts, estimate
from tn_ray.experiments.study.plan import Cell, plan
from tn_ray.experiments.study.run_tables import bestofn_tables, json_records
from tn_ray.experiments.study.state import read_done
from tn_ray.labeling.store import open_answers
from tn_ray.labeling.tally import outcomes
from tn_ray.labeling.tasks import load_comparison
from tn_ray.storage import Store
from tn_ray.training.evaluation import read_scores


def _run_config(grid: StudyConfig, key: CellKey, planned: dict) -> Any:
    """The validated config a finished run ran under (its done.json), else the grid's plan of it now; None when
    neither validates (its work is then not counted)."""
    done = read_done(key.out) or {}
    if "config" in done:
        try:
            return config_class(key.kind).model_validate(done["config"])
        except (ValidationError, TnRayError):
            pass
    if "cells" not in planned:
        try:
            planned["cells"] = {c.key.id: c.config for c in plan(grid)}
        except (TnRayError, ValidationError, OSError):
            planned["cells"] = {}
    return planned["cells"].get(key.id)


def _cost_row(
    grid: StudyConfig, key: CellKey, configs: dict, planned: dict, kind: str, reward: str, kl: float, n: int | None
) -> dict:
    """One cell's counted work for :func:`tn_ray.analysis.efficiency.table` (a fine-tuning cell, or a best-of-n
    run's (reward, n) cell alone: n samples per prompt, scored by the row's models and the truth); only its keys
    when its config is not at hand or its prompts cannot be counted (``configs[run id]`` is then None)."""

    row = {"kind": kind, "method": key.method, "reward": reward, "kl": kl, "n": n, "seed": key.seed}
    if key.id not in configs:
        configs[key.id] = _run_config(grid, key, planned)
    cfg = configs[key.id]
    if cfg is None:
        return row
    try:
        prompts = count_prompts(cfg)
    except (TnRayError, OSError):
        configs[key.id] = None
        return row
    if kind == "bestofn":
        models = len(set(grid.rewards[reward].models) | {grid.truth})
        work = bestofn_work(prompts, n, cfg.generation.num_inference_steps, models)
        per_prompt = n
    else:
        work = counts(Cell(key, cfg, None, "", (key,)))
        per_prompt = work["images"] / prompts
    return {
        **row,
        "prompts": prompts,
        "samples_per_prompt": per_prompt,
        "samples": work["images"] + work["eval_images"],
        "eval_images": work["eval_images"],
        "device_s": estimate(grid.cost, work),
    }


def _human_outcomes(keys: list[CellKey]) -> tuple[Any, list[str]]:
    """The labelling app's answers to each cell's comparison task (``human_eval/`` + ``human_eval_key.csv``,
    answers in ``human_eval_answers.sqlite`` beside them, where ``tn-ray label serve --export`` keeps them) as
    :func:`tn_ray.labeling.tally.outcomes` rows with the cell's keys; and a line per cell whose answers could not
    be read."""
    from pathlib import Path

    import pandas as pd

    frames, problems = [], []
    for key in keys:
        if "://" in key.out:
            continue
        db = Path(key.out) / "human_eval_answers.sqlite"
        if not db.is_file():
            continue
        try:
            task = load_comparison(Path(key.out) / "human_eval")
            answers = open_answers(db, task)
        except TnRayError as err:
            problems.append(f"{key.id}: answers not read ({err})")
            continue
        if answers:
            frames.append(
                outcomes(task, answers).assign(method=key.method, reward=key.reward, kl=key.kl, seed=key.seed)
            )
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), problems


def paper_sections(grid: StudyConfig, finished: list[CellKey], ran: list[CellKey]) -> tuple[str, dict, dict]:
    """The report's paper-shaped sections (docs/study.md): win / tie / loss of the selected images vs the base
    model and vs each other under every scored column (:mod:`tn_ray.analysis.winloss`), the human raters' tallies
    (or how to collect them), and the gains per sample and per estimated device-hour
    (:mod:`tn_ray.analysis.efficiency`). Returns (markdown, {file name: CSV text}, report.json records)."""
    import pandas as pd

    r = grid.report
    boot = (r.confidence, r.resamples, r.seed)
    trains = {row: rc.use for row, rc in grid.rewards.items()}
    tables, gains, costs, planned, configs = [], [], [], {}, {}
    if finished:
        frames, selected = [], {}
        for key in finished:
            scores, base = read_scores(key.out)
            frames.append(
                wl.judged_images(scores, base).assign(method=key.method, reward=key.reward, kl=key.kl, seed=key.seed)
            )
            selected[key.key] = int(json.loads(Store(key.out).read_text("selection.json"))["paper_rule_step"])
        judged = pd.concat(frames, ignore_index=True)
        tables.append(wl.finetune(judged, selected, trains, grid.truth, *boot))
        gains.append(ef.finetune_gain(judged, selected, grid.truth).assign(kind="finetune", n=pd.NA))
        for key in finished:
            costs.append(_cost_row(grid, key, configs, planned, "finetune", key.reward, key.kl, None))
    if ran:
        picks, bases = [], []
        for run in ran:
            picks.append(bestofn_tables(grid, run))
            rewards = Store(run.out).read_table("rewards.parquet").to_pandas()
            bases.append(wl.bestofn_base(rewards, grid.truth).assign(method=run.method, seed=run.seed))
            for row in grid.rewards:
                for n in grid.methods[run.method].n:
                    costs.append(_cost_row(grid, run, configs, planned, "bestofn", row, float("nan"), n))
        picks_all, base_all = pd.concat(picks, ignore_index=True), pd.concat(bases, ignore_index=True)
        tables.append(wl.bestofn(picks_all, base_all, list(grid.rewards), grid.truth, *boot))
        gains.append(ef.bestofn_gain(picks_all, base_all).assign(kind="bestofn", kl=float("nan")))
    winloss = pd.concat(tables, ignore_index=True)
    lines = wl.markdown(winloss, grid.truth, r.confidence)
    files = {"winloss.csv": winloss.to_csv(index=False)}
    records: dict[str, Any] = {"winloss": json_records(winloss)}
    outcomes, problems = _human_outcomes(finished)
    human = wl.human(outcomes) if len(outcomes) else None
    unread = f" Not read: {'; '.join(problems)}." if problems else ""
    if human is not None:
        answered = outcomes[["method", "reward", "kl", "seed", "question", "annotator"]].drop_duplicates()
        note = f"{len(answered)} answers from {outcomes['annotator'].nunique()} annotators.{unread}"
        files["human_winloss.csv"] = human.to_csv(index=False)
        records["human_winloss"] = json_records(human)
    elif finished:
        note = (
            "No human answers yet: serve a fine-tuning cell's comparison with `tn-ray label serve --export "
            f"{grid.out}/cells/<cell id>/human_eval` (answers go to `human_eval_answers.sqlite` beside it), then "
            f"rerun `tn-ray study CONFIG --report-only`.{unread}"
        )
    else:
        note = "No human answers: only fine-tuning cells export a comparison (`human_eval/`); none has finished."
    lines += wl.human_markdown(human, note)
    records["human_answers"] = 0 if human is None else int(len(answered))
    cost_cols = ["kind", "method", "reward", "kl", "n", "seed", "prompts", "samples_per_prompt", "samples"]
    per = ef.table(pd.DataFrame(costs).reindex(columns=[*cost_cols, "eval_images", "device_s"]), pd.concat(gains))
    uncounted = sorted(k for k, cfg in configs.items() if cfg is None)
    notes = [f"Work not counted (no valid config in done.json or the grid): {', '.join(uncounted)}."] * bool(uncounted)
    lines += ef.markdown(per, grid.truth, grid.cost.device, notes)
    files["efficiency.csv"] = per.to_csv(index=False)
    records["efficiency"] = json_records(per)
    return "\n".join(lines), files, records
