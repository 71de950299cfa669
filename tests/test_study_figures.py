"""The study report's image figures (docs/study.md, "The report"): Fig. 4 (best-of-n picks per prompt) and Fig. 5
(the base model and each reward's selected checkpoint) from hand-built run folders of solid-colour PNGs, checked
pixel by pixel; report.html with every table and every figure by relative path; a missing step folder as one line.
No Ray, no model: seconds."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tn_ray.config import validate
from tn_ray.errors import InputError
from tn_ray.experiments.study import figures as sf
from tn_ray.experiments.study.cell_keys import bestofn_runs, grid_cells
from tn_ray.experiments.study.config import StudyConfig
from tn_ray.experiments.study.report import write_report

REPO = Path(__file__).resolve().parents[1]
TRUTH = "brightness"
ROWS = {"raw": "clip:tiny", "judge": TRUTH}  # row -> its column (the judge row selects / trains on the truth)
NS = [2, 4]
BESTOFN_PROMPTS = ["a photo of a red circle", "a photo of two blue squares"]
EVAL_PROMPTS = ["a photo of a green triangle", "a photo of a red square", "a photo of a blue circle"]
EVAL_SEEDS = [3, 1]  # the figure's column of a prompt is its smallest eval seed
SELECTED = {"raw": 20, "judge": 10}  # paper_rule_step of each row's seed-0 cell


class Colours:
    """A distinct, saturated colour per key (never white, black or a grey of the text)."""

    def __init__(self):
        self.of: dict = {}

    def __call__(self, key) -> tuple[int, int, int]:
        if key not in self.of:
            i = len(self.of)
            self.of[key] = (20 + 3 * i, 230 - 2 * i, 60 + (i % 7) * 20)
        return self.of[key]


def png(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def make_grid(tmp_path: Path) -> StudyConfig:
    data = {
        "out": str(tmp_path / "study"),
        "truth": TRUTH,
        "methods": {
            "bestofn": {"config": str(REPO / "sweeps/bestofn_world.yaml"), "n": NS},
            "rwr": {"config": str(REPO / "sweeps/world_rwr.yaml"), "kl": [0]},
        },
        "rewards": {row: {"models": [col], "use": col} for row, col in ROWS.items()},
        "seeds": [0, 1],
        "report": {"resamples": 100},
    }
    return validate(StudyConfig, data)


def make_bestofn(grid, colour: Colours, seed: int) -> dict:
    """A finished best-of-n run: 4 samples per prompt; row raw picks samples 1 (n=2) and 3 (n=4), row judge 0 and 2.
    Returns (prompt_id, row, n) -> (colour, truth) of the picked image."""
    run = next(k for k in bestofn_runs(grid) if k.seed == seed)
    out = Path(run.out)
    rng = np.random.default_rng(seed)
    images, selections, want = [], [], {}
    for pid, prompt in enumerate(BESTOFN_PROMPTS):
        for sample in range(4):
            path = out / "generation" / f"{pid:05d}-{sample:05d}.png"
            png(path, colour(("bestofn", seed, pid, sample)))
            images.append(
                {
                    "prompt_id": pid,
                    "prompt": prompt,
                    "sample": sample,
                    "image_id": f"{pid:05d}-{sample:05d}",
                    "image": str(path),
                    "clip:tiny": float(rng.normal()),
                    TRUTH: round(float(rng.uniform()), 2),
                }
            )
        truth = {r["sample"]: r[TRUTH] for r in images if r["prompt_id"] == pid}
        for row, column in ROWS.items():
            for n in NS:
                sample = {("raw", 2): 1, ("raw", 4): 3, ("judge", 2): 0, ("judge", 4): 2}[(row, n)]
                selections.append(
                    {"prompt_id": pid, "reward": column, "n": n, "k": 1, "rank": 0, "sample": sample, "value": 0.0}
                )
                want[(pid, row, n)] = (colour(("bestofn", seed, pid, sample)), truth[sample])
    pd.DataFrame(images).to_parquet(out / "rewards.parquet", index=False)
    pd.DataFrame(selections).to_parquet(out / "selections.parquet", index=False)
    (out / "done.json").write_text(json.dumps({"cell": run.id}))
    return want


def _scores(key, rng, step: int | None) -> tuple[pd.DataFrame, dict]:
    rows, truth = [], {}
    for pid, prompt in enumerate(EVAL_PROMPTS):
        for s in EVAL_SEEDS:
            truth[(pid, s)] = float(rng.integers(0, 2))
            for column in dict.fromkeys([key.train, TRUTH]):
                value = truth[(pid, s)] if column == TRUTH else float(rng.normal())
                rows.append({"prompt_id": pid, "seed": s, "prompt": prompt, "reward": column, "value": value})
    frame = pd.DataFrame(rows)
    return (frame if step is None else frame.assign(step=step)), truth


def make_cell(key, colour: Colours, selected: int) -> dict:
    """A finished RWR cell: evaluations at steps 10 and 20, each a PNG per (prompt, eval seed) of its own colour.
    Returns (step, prompt_id, eval seed) -> (colour, truth)."""
    out = Path(key.out)
    rng = np.random.default_rng(key.index)
    want = {}
    for step in (0, 10, 20):
        frame, truth = _scores(key, rng, None if step == 0 else step)
        rel = "eval/base.parquet" if step == 0 else f"eval/scores/step-{step:06d}.parquet"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(out / rel, index=False)
        folder = out / ("eval/base" if step == 0 else f"eval/step-{step:06d}")
        for (pid, s), value in truth.items():
            c = colour(("cell", key.id, step, pid, s))
            png(folder / f"{pid:05d}-{s}.png", c)
            want[(step, pid, s)] = (c, value)
    (out / "eval/prompts.json").write_text(json.dumps(EVAL_PROMPTS))
    (out / "selection.json").write_text(json.dumps({"paper_rule_step": selected}))
    (out / "done.json").write_text(json.dumps({"cell": key.id}))
    return want


def make_study(tmp_path: Path):
    grid = make_grid(tmp_path)
    colour = Colours()
    picks = make_bestofn(grid, colour, 0)  # bestofn-s1 not finished
    cells = {}
    for key in grid_cells(grid):
        if key.seed == 1 and key.reward == "judge":
            continue  # unfinished
        cells[(key.reward, key.seed)] = make_cell(key, colour, SELECTED[key.reward] if key.seed == 0 else 10)
    return grid, picks, cells


def tiles(path: Path, expected: list[list[tuple[int, int, int]]]) -> None:
    """The PNG at ``path`` holds each expected colour as exactly one sf.CELL-square tile, tile (r, c) in row band r
    and column band c: equal tops along a row, equal lefts down a column, both increasing."""
    arr = np.asarray(Image.open(path).convert("RGB"))
    tops, lefts = {}, {}
    for r, row in enumerate(expected):
        for c, colour in enumerate(row):
            ys, xs = np.nonzero((arr == np.array(colour, dtype=arr.dtype)).all(axis=-1))
            assert len(ys) == sf.CELL * sf.CELL, f"{path.name}: colour {colour} of tile ({r}, {c}) covers {len(ys)} px"
            assert (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) == (sf.CELL, sf.CELL)
            tops.setdefault(r, set()).add(int(ys.min()))
            lefts.setdefault(c, set()).add(int(xs.min()))
    assert all(len(v) == 1 for v in [*tops.values(), *lefts.values()]), (tops, lefts)
    top = [next(iter(tops[r])) for r in sorted(tops)]
    left = [next(iter(lefts[c])) for c in sorted(lefts)]
    assert top == sorted(top) and len(set(top)) == len(top)
    assert left == sorted(left) and len(set(left)) == len(left)


@pytest.fixture
def captions(monkeypatch):
    """Every caption each figure drew: figure title -> {(row, column key): text}."""
    from tn_ray.analysis import image_grids

    seen: dict[str, dict] = {}
    original = image_grids.prompt_grid

    def recording(prompt, rows, pools, image_of, cell=128, column_label=lambda n: f"n={n}", caption=None):
        drawn = seen.setdefault(prompt, {})

        def record(row, n):
            drawn[(row, n)] = caption(row, n)
            return drawn[(row, n)]

        return original(prompt, rows, pools, image_of, cell, column_label, record if caption else None)

    monkeypatch.setattr(image_grids, "prompt_grid", recording)
    return seen


def test_figures_place_each_picked_and_selected_image_and_caption_it_with_its_truth(tmp_path, monkeypatch, captions):
    monkeypatch.setattr(sf, "MAX_COLUMNS", 2)  # 3 evaluation prompts: the first 2
    grid, picks, cells = make_study(tmp_path)
    paths = write_report(grid)
    out = Path(grid.out)

    # Fig. 4: one per prompt of seed 0's run; rows = reward rows, columns = n
    for pid, prompt in enumerate(BESTOFN_PROMPTS):
        fig = out / f"figures/bestofn_{pid:05d}.png"
        assert paths[f"figures/bestofn_{pid:05d}_png"] == str(fig)
        tiles(fig, [[picks[(pid, row, n)][0] for n in NS] for row in ROWS])
        drawn = captions[f"{prompt} (prompt {pid}, seed 0)"]
        assert drawn == {(row, n): f"{TRUTH} {picks[(pid, row, n)][1]:.3g}" for row in ROWS for n in NS}

    # Fig. 5: rows = base, then each row's seed-0 cell at its selected step; columns = (prompt, smallest eval seed)
    fig = out / "figures/rwr_kl0.png"
    assert paths["figures/rwr_kl0_png"] == str(fig)
    columns = [(0, 1), (1, 1)]
    base = cells[("raw", 0)]  # the first row's cell holds the base model's images
    expected = [[base[(0, *c)][0] for c in columns]]
    expected += [[cells[(row, 0)][(SELECTED[row], *c)][0] for c in columns] for row in ROWS]
    tiles(fig, expected)
    (title,) = [t for t in captions if t.startswith("rwr, kl 0, seed 0:")]
    assert "p0 = a photo of a green triangle; p1 = a photo of a red square" in title
    labels = ["base", *(f"{row} (step {SELECTED[row]})" for row in ROWS)]
    steps = [0, *(SELECTED[row] for row in ROWS)]
    owner = [base, *(cells[(row, 0)] for row in ROWS)]
    assert captions[title] == {
        (label, j): f"{TRUTH} {owned[(step, *c)][1]:.3g}"
        for label, step, owned in zip(labels, steps, owner)
        for j, c in enumerate(columns)
    }
    names = sorted(p.name for p in (out / "figures").iterdir())
    assert names == ["bestofn_00000.png", "bestofn_00001.png", "rwr_kl0.png"]


def test_report_html_holds_every_table_and_every_figure_by_relative_path(tmp_path):
    grid, _, _ = make_study(tmp_path)
    paths = write_report(grid)
    out = Path(grid.out)
    md = (out / "report.md").read_text()
    assert paths["report_html"] == str(out / "report.html")
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)  # the folder travels with its figures
    shutil.rmtree(out)
    page = (moved / "report.html").read_text()

    tables = [ln for ln in md.splitlines() if re.match(r"^\|\s*:?-{3,}", ln)]
    assert len(tables) >= 4 and page.count("<table>") == len(tables)
    for ln in md.splitlines():  # every table row's cells are in the page
        if ln.startswith("|") and ln not in tables:
            for cell in (c.strip() for c in ln.strip("|").split("|")):
                assert f">{cell.replace('&', '&amp;')}</t" in page, cell

    pngs = sorted(str(p.relative_to(moved)) for p in [*moved.glob("*.png"), *moved.glob("figures/*.png")])
    assert {"accuracy_vs_step.png", "truth_vs_n.png", "figures/rwr_kl0.png", "figures/bestofn_00001.png"} <= set(pngs)
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(sources) == pngs  # every figure inline, once, by its path relative to the report
    assert all((moved / s).is_file() for s in sources)
    for rel in pngs:
        assert f"]({rel})" in md
    assert "<h2>Figures</h2>" in page and page.startswith("<!doctype html>")

    # the moved folder's report is made again: best-of-n images found in the run's own generation, where it is now
    again = write_report(grid.model_copy(update={"out": str(moved)}))
    assert again["figures/bestofn_00001_png"] == str(moved / "figures/bestofn_00001.png")


def test_a_selected_step_without_images_is_one_line_naming_its_folder(tmp_path):
    grid, _, _ = make_study(tmp_path)
    key = next(k for k in grid_cells(grid) if k.id == "rwr-judge-kl0-s0")
    folder = Path(key.out) / "eval/step-000010"
    for p in folder.glob("*.png"):
        p.unlink()
    with pytest.raises(InputError) as err:
        write_report(grid)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("cell 2/4 rwr-judge-kl0-s0: ") and f"{folder} holds no images of the selected step 10" in msg

    # a best-of-n image gone: one line naming it
    grid, _, _ = make_study(tmp_path / "again")
    gone = Path(bestofn_runs(grid)[0].out) / "generation/00001-00003.png"
    gone.unlink()
    line = rf"^best-of-n run 1/2 bestofn-s0: {re.escape(str(gone))}: the image raw picked at n = 4 for prompt 1"
    with pytest.raises(InputError, match=line):
        write_report(grid)


def test_prompt_grid_without_captions_keeps_its_layout():
    """best-of-n's own grids (no captions) keep their size: rows of cell + PAD pixels."""
    from tn_ray.analysis.image_grids import PAD, prompt_grid

    def image_of(row, n):
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), (200, 10, 10)).save(buf, format="PNG")
        return buf.getvalue()

    plain = prompt_grid("p", ["a", "b"], [1, 2], image_of, 32)
    captioned = prompt_grid("p", ["a", "b"], [1, 2], image_of, 32, caption=lambda r, n: "truth 1")
    assert captioned.width == plain.width and captioned.height - plain.height == 2 * 12
    assert plain.height - 2 * (32 + PAD) == captioned.height - 2 * (32 + PAD + 12)
