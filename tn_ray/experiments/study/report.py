"""The study's report (:func:`write_report`): report.md, report.json and report.html from the finished runs, with
the fine-tuning and best-of-n tables and plots, the paper-shaped sections and the figures."""

from __future__ import annotations

import json
from typing import Any

from tn_ray.analysis import finetune_report as fr
from tn_ray.analysis import study_report as sr
from tn_ray.errors import InputError
from tn_ray.experiments.study.cell_keys import bestofn_runs, grid_cells
from tn_ray.experiments.study.config import StudyConfig
from tn_ray.experiments.study.figures import write_figures, write_html
from tn_ray.experiments.study.paper_sections import paper_sections
from tn_ray.experiments.study.run_tables import bestofn_tables, cell_tables, json_records
from tn_ray.experiments.study.state import DONE, read_done
from tn_ray.storage import Store


def write_report(grid: StudyConfig) -> dict[str, str]:
    """The report of the finished runs (those with done.json) under ``grid.out``: report.md and report.json, and
    for fine-tuning cells report.csv (one row per method, reward row and kl), curve.csv (per step), cells.csv (per
    cell), accuracy_vs_step.png and, when cells recorded path KL, accuracy_vs_path_kl.png; for best-of-n cells
    bestofn.csv (per method, reward row and n), bestofn_cells.csv (per seed too), bestofn_versus.csv (each row vs
    the first row at equal n) and truth_vs_n.png; :func:`~tn_ray.experiments.study.paper_sections.paper_sections`'
    winloss.csv, efficiency.csv and, when some cell has human answers, human_winloss.csv; figures/ (image grids:
    the paper's Fig. 4 and 5 on the study's images, :mod:`tn_ray.experiments.study.figures`) and report.html
    (report.md rendered, figures inline)."""
    import pandas as pd

    store = Store(grid.out)
    keys, runs = grid_cells(grid), bestofn_runs(grid)
    finished = [k for k in keys if read_done(k.out) is not None]
    ran = [k for k in runs if read_done(k.out) is not None]
    missing = [k.id for k in keys if k not in finished]
    if not finished and not ran:
        raise InputError(f"{grid.out}: no finished cell (none has {DONE}) to report on; run the grid first")
    r = grid.report
    done_part = f"{len(finished)} of {len(keys)} cells finished" + (
        f" (not yet: {', '.join(missing)})" if missing else ""
    )
    header = [
        f"Grid `{grid.out}`: "
        + (done_part + "; " if keys else "")
        + f"truth column `{grid.truth}`; training rewards: "
        + ", ".join(f"{row} = `{rc.use}`" for row, rc in grid.rewards.items())
        + "."
    ]
    if runs:
        header[0] = header[0].replace("cells finished", "fine-tuning cells finished", 1) if keys else header[0]
        header.append(
            f"Best-of-n: {len(ran)} of {len(runs)} runs finished (one generation per seed, shared by its reward x n "
            "cells)"
            + (f"; not yet: {', '.join(k.id for k in runs if k not in ran)}" if len(ran) < len(runs) else "")
            + "."
        )
    report: dict[str, Any] = {
        "truth": grid.truth,
        "cells_total": len(keys),
        "cells_finished": [k.id for k in finished],
        "cells_missing": missing,
        "bestofn_runs_finished": [k.id for k in ran],
        "confidence": r.confidence,
    }
    names = ["report.md", "report.json"]
    sections = []
    if finished:
        frames, selected = [], {}
        for key in finished:
            images, step = cell_tables(key)
            frames.append(images)
            selected[key.key] = step
        images = pd.concat(frames, ignore_index=True)
        curve = fr.curve(images, r.confidence, r.resamples, r.seed)
        cells = fr.cell_table(images, selected)
        summary = fr.selection_table(images, cells, r.confidence, r.resamples, r.seed)
        pairs = fr.versus(images, cells, next(iter(grid.rewards)), r.confidence, r.resamples, r.seed)
        text = fr.markdown(summary, curve, grid.truth, r.confidence, header, pairs)
        if runs:  # one report of both: the title says so
            text = f"# Study: best-of-n and fine-tuning against {grid.truth}" + text[text.index("\n") :]
        sections.append(text)
        store.write_text("report.csv", summary.to_csv(index=False))
        store.write_text("curve.csv", curve.to_csv(index=False))
        store.write_text("cells.csv", cells.to_csv(index=False))
        store.write_text("versus.csv", pairs.to_csv(index=False))
        report.update(
            {
                "summary": json_records(summary),
                "curve": json_records(curve),
                "cells": json_records(cells),
                "versus": json_records(pairs),
            }
        )
        store.write_bytes("accuracy_vs_step.png", fr.plot_accuracy_vs_step(curve, grid.truth))
        names += ["report.csv", "curve.csv", "cells.csv", "versus.csv", "accuracy_vs_step.png"]
        kl_png = fr.plot_accuracy_vs_path_kl(curve, grid.truth)
        if kl_png is not None:
            store.write_bytes("accuracy_vs_path_kl.png", kl_png)
            names.append("accuracy_vs_path_kl.png")
    else:
        sections.append("\n".join([f"# Study: best-of-n against {grid.truth}", "", *header, ""]))
    if ran:
        picks = pd.concat([bestofn_tables(grid, k) for k in ran], ignore_index=True)
        rows = sr.table(picks, r.confidence, r.resamples, r.seed)
        per_seed = picks.groupby([*sr.KEYS, "seed"], sort=True)["truth"].mean().reset_index()
        pairs = sr.versus(picks, next(iter(grid.rewards)), r.confidence, r.resamples, r.seed)
        sections.append(sr.markdown(rows, grid.truth, r.confidence, pairs))
        store.write_text("bestofn.csv", rows.to_csv(index=False))
        store.write_text("bestofn_versus.csv", pairs.to_csv(index=False))
        store.write_text("bestofn_cells.csv", per_seed.to_csv(index=False))
        store.write_bytes("truth_vs_n.png", sr.plot(rows, grid.truth))
        report.update(
            {
                "bestofn": json_records(rows),
                "bestofn_cells": json_records(per_seed),
                "bestofn_versus": json_records(pairs),
            }
        )
        names += ["bestofn.csv", "bestofn_cells.csv", "bestofn_versus.csv", "truth_vs_n.png"]
    text, files, records = paper_sections(grid, finished, ran)  # win/tie/loss, human tallies, gain per GPU-hour
    sections.append(text)
    for name, body in files.items():
        store.write_text(name, body)
    report.update(records)
    names += list(files)
    plots = [n for n in names if n.endswith(".png")]
    figures, figure_files = write_figures(grid, finished, ran, plots)  # Fig. 4, 5
    sections.append(figures)
    names += [*figure_files, "report.html"]
    store.write_text("report.md", "\n".join(sections))
    write_html(grid, "\n".join(sections))
    store.write_text("report.json", json.dumps(report, indent=1))
    return {name.replace(".", "_"): store.uri(name) for name in names}
