"""The study report's image figures (the paper's Fig. 4 and 5, on the study's own images) and its HTML page.

:func:`write_figures` is the one call :func:`tn_ray.experiments.study.report.write_report` makes: it reads the finished
runs' stored images and writes, under ``<out>/figures/``,

- per best-of-n entry and prompt (Fig. 4): ``<entry>_<prompt id>.png``, one row per reward row and one column per
  n, each image the row's top-1 among the prompt's first n samples (``selections.parquet`` via
  ``run_tables.bestofn_tables``, the image from ``rewards.parquet``'s ``image`` path), of the
  run of the study's first seed that finished;
- per fine-tuning (method, kl) (Fig. 5): ``<method>_kl<kl>.png``, rows = the base model then each reward row's
  checkpoint the paper's rule selected (the cell's ``selection.json``), of the study's first seed with a finished
  cell of that (method, kl); columns = the smallest eval seed of each of the first :data:`MAX_COLUMNS` evaluation
  prompts (the same in every row), each image from the cell's ``eval/base/`` or ``eval/step-<6-digit step>/``.

Every image is captioned with the truth's score of that image. The grids are drawn by
:func:`tn_ray.analysis.image_grids.prompt_grid` (the grid maker of best-of-n's own per-prompt grids). It returns
the report's figure section (markdown, every path relative to the study folder) and the files written;
:func:`write_html` renders the finished report.md to report.html (:mod:`tn_ray.analysis.report_html`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from typing import Any

from tn_ray.analysis.report_html import markdown_to_html
from tn_ray.errors import InputError
from tn_ray.experiments.study.run_tables import bestofn_tables, cell_tables
from tn_ray.storage import Store, join_uri, read_any
from tn_ray.training.checkpoint import step_name

FIGURES = "figures"
MAX_COLUMNS = 8  # evaluation images per fine-tuning figure
CELL = 96  # pixels of each image in a figure


def _value(v: float) -> str:
    return f"{v:.3g}"


def _decoded(data: bytes, where: str) -> bytes:
    """``data`` if it is an image PIL reads, else an :class:`InputError` naming ``where``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(f"{where}: not a readable image ({err})") from None
    return data


def _save(store: Any, rel: str, grid: Any) -> None:
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    store.write_bytes(rel, buf.getvalue())


def _bestofn_grid(grid: Any, run: Any, ns: Sequence[int], pid: int, title: str, at: Any, image: Any) -> Any:
    """One prompt's Fig. 4: ``at`` = the run's picks by (prompt_id, reward row, n), ``image`` = its image paths by
    (prompt_id, sample)."""
    from tn_ray.analysis.image_grids import prompt_grid

    def image_of(row: str, n: int) -> bytes:
        path = str(image.get((pid, int(at.loc[(pid, row, n), "sample"]))))
        marker = f"/cells/{run.id}/"  # a study folder moved whole: the run's own generation, where it is now
        for candidate in dict.fromkeys([path, join_uri(run.out, path.split(marker, 1)[1]) if marker in path else path]):
            try:
                return _decoded(read_any(candidate), f"{run.label}: {candidate}")
            except FileNotFoundError:
                continue
        raise InputError(
            f"{run.label}: {path}: the image {row} picked at n = {n} for prompt {pid} is missing "
            "(its generation folder was moved or deleted)"
        )

    def caption(row: str, n: int) -> str:
        return f"{grid.truth} {_value(at.loc[(pid, row, n), 'truth'])}"

    return prompt_grid(title, list(grid.rewards), ns, image_of, CELL, caption=caption)


def bestofn_figures(grid: Any, ran: Sequence[Any], store: Any) -> tuple[list[str], list[str]]:
    """Fig. 4 of each best-of-n entry (see the module doc): (markdown lines, files written)."""

    lines: list[str] = []
    files: list[str] = []
    for method, entry in grid.methods.items():
        runs = {k.seed: k for k in ran if k.method == method}
        seed = next((s for s in grid.seeds if s in runs), None)
        if seed is None:
            continue
        run = runs[seed]
        picks = bestofn_tables(grid, run)
        rewards = Store(run.out).read_table("rewards.parquet").to_pandas()
        image = rewards.set_index(["prompt_id", "sample"])["image"]
        prompts = rewards.drop_duplicates("prompt_id").set_index("prompt_id")["prompt"].sort_index()
        at = picks.set_index(["prompt_id", "reward", "n"])
        lines += [
            f"### {method}: the image each reward picks at each n (seed {seed})",
            "",
            f"One figure per prompt: rows = reward rows, columns = n; each image is the row's top-1 among the "
            f"prompt's first n samples, captioned with its truth ({grid.truth}).",
            "",
        ]
        for pid, prompt in prompts.items():
            rel = f"{FIGURES}/{method}_{int(pid):05d}.png"
            _save(
                store,
                rel,
                _bestofn_grid(grid, run, entry.n, int(pid), f"{prompt} (prompt {pid}, seed {seed})", at, image),
            )
            files.append(rel)
            lines += [f"![{method}, prompt {pid}: {prompt}]({rel})", ""]
    return lines, files


def _step_folder(step: int) -> str:
    return "eval/base" if step == 0 else f"eval/{step_name(step)}"


def _cell_reader(key: Any, step: int) -> Callable[[int, int], bytes]:
    """(prompt_id, eval seed) -> the cell's evaluation image at ``step``; an :class:`InputError` naming the folder
    when it holds no image at all (or the one image asked for is missing)."""

    store, folder = Store(key.out), _step_folder(step)
    what = "the base model" if step == 0 else f"the selected step {step} (selection.json's paper_rule_step)"
    if not store.list_files(folder, ".png"):
        raise InputError(
            f"{key.label}: {store.uri(folder)} holds no images of {what}; the report's figure needs the cell's "
            "evaluation images (rerun the cell, or restore the folder)"
        )

    def read(pid: int, seed: int) -> bytes:
        rel = f"{folder}/{pid:05d}-{seed}.png"
        if not store.exists(rel):
            raise InputError(
                f"{key.label}: {store.uri(rel)}: no evaluation image of {what} (prompt {pid}, seed {seed})"
            )
        return _decoded(store.read_bytes(rel), f"{key.label}: {store.uri(rel)}")

    return read


def _truths(images: Any, step: int) -> dict[tuple[int, int], float]:
    """(prompt_id, eval seed) -> the truth's score of the image at ``step`` (:func:`cell_images` rows)."""
    at = images[images["step"] == step]
    return {(int(p), int(s)): float(v) for p, s, v in at[["prompt_id", "eval_seed", "truth"]].to_numpy()}


def finetune_figures(grid: Any, finished: Sequence[Any], store: Any) -> tuple[list[str], list[str]]:
    """Fig. 5 of each fine-tuning (method, kl) (see the module doc): (markdown lines, files written)."""
    from tn_ray.analysis.image_grids import prompt_grid

    lines: list[str] = []
    files: list[str] = []
    combos = list(dict.fromkeys((k.method, k.kl) for k in finished))
    for method, kl in combos:
        keys = [k for k in finished if (k.method, k.kl) == (method, kl)]
        seed = next(s for s in grid.seeds if any(k.seed == s for k in keys))
        cells = [next((k for k in keys if k.reward == row and k.seed == seed), None) for row in grid.rewards]
        cells = [k for k in cells if k is not None]
        first = cells[0]
        tables = {key: cell_tables(key) for key in cells}  # (images with truth per step, selected step)
        base = tables[first][0]
        pairs = base[base["step"] == 0].groupby("prompt_id")["eval_seed"].min().sort_index().head(MAX_COLUMNS)
        columns = [(int(p), int(s)) for p, s in pairs.items()]
        truth = {"base": _truths(base, 0)}
        readers = {"base": _cell_reader(first, 0)}
        for key, (images, step) in tables.items():
            label = f"{key.reward} (step {step})"
            truth[label], readers[label] = _truths(images, step), _cell_reader(key, step)
            missing = [c for c in columns if c not in truth[label]]
            if missing:
                raise InputError(
                    f"{key.label}: {Store(key.out).uri('eval')}: step {step} has no score of prompt {missing[0][0]}, "
                    f"eval seed {missing[0][1]} (the base model's images have)"
                )
        try:
            texts = json.loads(Store(first.out).read_text("eval/prompts.json"))
        except (FileNotFoundError, ValueError):
            texts = []

        def prompt_of(pid: int, texts: list = texts) -> str:
            return texts[pid] if 0 <= pid < len(texts) else f"prompt {pid}"

        legend = "; ".join(f"p{p} = {prompt_of(p)}" for p, _ in columns)
        title = (
            f"{method}, kl {kl:g}, seed {seed}: the base model and each reward's checkpoint selected by the paper's "
            f"rule; captions: {grid.truth}. Columns: {legend}"
        )
        rows = list(readers)

        def image_of(row: str, j: int, readers: dict = readers, columns: list = columns) -> bytes:
            return readers[row](*columns[j])

        def caption(row: str, j: int, truth: dict = truth, columns: list = columns) -> str:
            return f"{grid.truth} {_value(truth[row][columns[j]])}"

        grid_image = prompt_grid(
            title,
            rows,
            list(range(len(columns))),
            image_of,
            CELL,
            column_label=lambda j, columns=columns: f"p{columns[j][0]} seed {columns[j][1]}",
            caption=caption,
        )
        rel = f"{FIGURES}/{method}_kl{kl:g}.png"
        _save(store, rel, grid_image)
        files.append(rel)
        lines += [
            f"### {method}, kl {kl:g}: the base model and each reward's selected checkpoint (seed {seed})",
            "",
            f"Rows: the base model, then each reward row's checkpoint selected by the paper's rule; columns: the "
            f"smallest eval seed of each of the first {len(columns)} evaluation prompts ({legend}); captions: the "
            f"truth ({grid.truth}) of each image.",
            "",
            f"![{method}, kl {kl:g}]({rel})",
            "",
        ]
    return lines, files


def write_figures(
    grid: Any, finished: Sequence[Any], ran: Sequence[Any], plots: Sequence[str]
) -> tuple[str, list[str]]:
    """The report's "Figures" section (markdown: ``plots``, the report's own PNGs, then the image grids) and the
    files it wrote under ``<out>/figures/``. ``finished`` / ``ran``: the finished fine-tuning cells and best-of-n
    runs (their tables read by :mod:`tn_ray.experiments.study.run_tables`)."""

    store = Store(grid.out)
    lines = ["## Figures", ""]
    for rel in plots:
        lines += [f"![{rel}]({rel})", ""]
    b_lines, b_files = bestofn_figures(grid, ran, store)
    f_lines, f_files = finetune_figures(grid, finished, store)
    return "\n".join([*lines, *b_lines, *f_lines]), [*b_files, *f_files]


def write_html(grid: Any, markdown_text: str) -> str:
    """report.html beside report.md: ``markdown_text`` rendered (tables, figures inline by relative path)."""

    Store(grid.out).write_text("report.html", markdown_to_html(markdown_text, f"study report: {grid.out}"))
    return "report.html"
