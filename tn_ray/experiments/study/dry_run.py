"""``--dry-run``: the grid as lines (:func:`describe`), one per run with its state, counted work and estimated
time, then the totals."""

from __future__ import annotations

from tn_ray.experiments.study.config import StudyConfig
from tn_ray.experiments.study.cost import counts, estimate
from tn_ray.experiments.study.plan import Cell
from tn_ray.experiments.study.state import status


def _shape(grid: StudyConfig) -> str:
    parts = []
    for name, e in grid.methods.items():
        grid_of = f"n {e.n}" if (e.method or name) == "bestofn" else f"{e.kl_key} {[float(k) for k in e.kl]}"
        parts.append(f"{name} ({grid_of})")
    return f"{len(grid.rewards)} rewards x [{'; '.join(parts)}] x {len(grid.seeds)} seeds"


def _hours(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def describe(grid: StudyConfig, cells: list[Cell]) -> list[str]:
    """The grid (``--dry-run``): one line per run with its state, counted work and estimated time, then the
    totals and the per-unit costs they used."""
    n_cells = sum(len(c.cells) for c in cells)
    lines = [f"study {grid.out}: {len(cells)} runs, {n_cells} cells ({_shape(grid)}); truth: {grid.truth}"]
    total = dict.fromkeys(("images", "image_steps", "train_steps", "trained_image_steps", "eval_images", "scores"), 0)
    seconds = 0.0
    seen: set = set()
    first: dict[str, str] = {}  # RWR generation folder -> the first cell that makes it
    for cell in cells:
        k, cfg = cell.key, cell.config
        work = counts(cell, seen)
        secs = estimate(grid.cost, work)
        total = {key: total[key] + work[key] for key in total}
        seconds += secs
        images = f"{work['images']} images"
        if k.kind == "rwr":
            folder = cfg.generation.out or k.out
            if first.setdefault(folder, k.id) != k.id:
                images += f" (reuses {first[folder]}'s generation)"
        cost = f"{images}, {work['eval_images']} eval images, ~{_hours(secs)}"
        if k.kind == "bestofn":
            rows = list(dict.fromkeys(c.reward for c in cell.cells))
            lines.append(
                f"{k.label}: bestofn ({cell.base_config}), {len(cell.cells)} cells = rewards {rows} x n "
                f"{cfg.pools}, {cfg.generation.samples_per_prompt} samples per prompt, seed {k.seed}; {cost}: "
                f"{status(cell)}"
            )
            continue
        truth = "truth = the training reward" if k.truth == k.train else f"truth judge {k.truth}"
        contrast = f" [contrast {cfg.reward.contrast}]" if cfg.reward.needs_contrast else ""
        lines.append(
            f"{k.label}: {k.kind} ({cell.base_config}), reward {k.reward} = {k.train}{contrast}, "
            f"{cell.kl_key}={k.kl:g}, seed {k.seed}, {truth}, max_steps {cfg.max_steps}; {cost}: {status(cell)}"
        )
    c = grid.cost
    lines.append(
        f"{len(cells)} runs, {n_cells} cells: {total['images']} images sampled ({total['image_steps']} image-steps "
        f"with evaluation), {total['train_steps']} optimizer steps ({total['trained_image_steps']} trained "
        f"image-steps), {total['eval_images']} evaluation images, {total['scores']} reward scores; estimated "
        f"{_hours(seconds)} on {c.device} (image_step_s {c.image_step_s:g}, train_step_s {c.train_step_s:g}, "
        f"score_s {c.score_s:g})"
    )
    return lines
