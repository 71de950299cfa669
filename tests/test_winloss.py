"""The study report's paper-shaped sections (docs/study.md): win / tie / loss of the selected images
(tn_ray/analysis/winloss.py) against hand computations and an independent recomputation, its invariants, the human
tallies from the labelling app's real answer database (and the line when there is none), and the gain per sample and
per estimated device-hour (tn_ray/analysis/efficiency.py). Hand-built cell folders only: no Ray, no model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats

from tn_ray.analysis import efficiency as ef
from tn_ray.analysis import winloss as wl
from tn_ray.config import validate
from tn_ray.experiments.study.cell_keys import bestofn_runs, grid_cells
from tn_ray.experiments.study.config import CostBlock, StudyConfig
from tn_ray.experiments.study.cost import count_prompts, counts, estimate
from tn_ray.experiments.study.plan import plan
from tn_ray.experiments.study.report import write_report

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of two red circles", "a photo of a green triangle", "a photo of a blue circle"]
EVAL_SEEDS = [0, 1]
TRUTH = "brightness"
JUDGE = "clip:tiny"


def ci(d, confidence=0.95, resamples=200, seed=1) -> tuple[float, float, float]:
    d = np.asarray(d, dtype=float)
    if len(d) < 2 or np.ptp(d) == 0:
        return float(d.mean()), float(d.mean()), float(d.mean())
    res = stats.bootstrap(
        (d,),
        np.mean,
        confidence_level=confidence,
        n_resamples=resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    ).confidence_interval
    return float(d.mean()), float(res.low), float(res.high)


# --- the pure functions, by hand --------------------------------------------------------------------


def test_three_images_give_exact_shares_and_the_mirror():
    a, b = [0.9, 0.5, 0.1], [0.2, 0.5, 0.4]  # win, tie, loss
    got = wl.compare(a, b, resamples=200)
    assert (got["pairs"], got["wins"], got["ties"], got["losses"]) == (3, 1, 1, 1)
    assert got["win"] == got["tie"] == got["loss"] == pytest.approx(1 / 3)
    np.testing.assert_allclose([got["net"], got["net_low"], got["net_high"]], ci([1, 0, -1], seed=0), atol=1e-12)
    back = wl.compare(b, a, resamples=200)
    assert (back["wins"], back["ties"], back["losses"]) == (got["losses"], got["ties"], got["wins"])
    assert back["net"] == -got["net"]
    nan = wl.compare([1.0, np.nan, 0.0, 1.0], [0.0, 1.0, 0.0, 1.0])  # the NaN pair is left out
    assert (nan["pairs"], nan["wins"], nan["ties"], nan["losses"]) == (3, 1, 2, 0)
    assert nan["win"] + nan["tie"] + nan["loss"] == pytest.approx(1.0)


def _judged(values: dict) -> pd.DataFrame:
    """values[(reward, step, column)] = per-image values of prompts 0, 1, 2 (eval seed 0, cell seed 0)."""
    return pd.DataFrame(
        [
            {
                "method": "rwr",
                "reward": r,
                "kl": 0.0,
                "seed": 0,
                "step": step,
                "prompt_id": p,
                "eval_seed": 0,
                "column": col,
                "value": v,
            }
            for (r, step, col), vs in values.items()
            for p, v in enumerate(vs)
        ]
    )


def test_finetune_rows_vs_base_and_vs_each_other_by_hand():
    judged = _judged(
        {
            ("raw", 0, "truth"): [0, 1, 1],
            ("raw", 10, "truth"): [1, 1, 0],  # selected: win, tie, loss
            ("raw", 20, "truth"): [1, 1, 1],
            ("raw", 0, "clip"): [0.1, 0.2, 0.3],
            ("raw", 10, "clip"): [0.5, 0.6, 0.7],  # three wins under its training reward
            ("tn", 0, "truth"): [0, 1, 1],
            ("tn", 20, "truth"): [1, 1, 1],  # selected: win, tie, tie
            ("tn", 0, "tn(clip)"): [0.0, 0.0, 0.0],
            ("tn", 20, "tn(clip)"): [0.0, -1.0, 0.0],
        }
    )
    trains = {"raw": "clip", "tn": "tn(clip)"}
    got = wl.finetune(judged, {("rwr", "raw", 0.0, 0): 10, ("rwr", "tn", 0.0, 0): 20}, trains, "truth", resamples=200)
    rows = {(r.a, r.b, r.column): r for r in got.itertuples()}
    assert set(rows) == {
        ("raw", "base", "truth"),
        ("raw", "base", "clip"),
        ("tn", "base", "truth"),
        ("tn", "base", "tn(clip)"),
        ("raw", "tn", "truth"),  # the only column both cells scored
    }
    expect = {
        ("raw", "base", "truth"): (1, 1, 1, "truth"),
        ("raw", "base", "clip"): (3, 0, 0, "raw's training reward"),
        ("tn", "base", "truth"): (1, 2, 0, "truth"),
        ("tn", "base", "tn(clip)"): (0, 2, 1, "tn's training reward"),
        ("raw", "tn", "truth"): (0, 2, 1, "truth"),  # raw's [1, 1, 0] vs tn's [1, 1, 1]
    }
    for k, (w, t, lo, role) in expect.items():
        r = rows[k]
        assert (r.pairs, r.wins, r.ties, r.losses, r.role) == (3, w, t, lo, role)
        assert (r.win, r.tie, r.loss) == pytest.approx((w / 3, t / 3, lo / 3))
        assert r.win + r.tie + r.loss == pytest.approx(1.0)
        assert r.net == pytest.approx((w - lo) / 3) and r.kind == "finetune" and pd.isna(r.n)
    # the mirror: the rows in the other order give tn vs raw with wins and losses swapped
    back = wl.finetune(
        judged,
        {("rwr", "raw", 0.0, 0): 10, ("rwr", "tn", 0.0, 0): 20},
        dict(reversed(trains.items())),
        "truth",
        resamples=200,
    )
    m = back[(back["a"] == "tn") & (back["b"] == "raw")].iloc[0]
    r = rows[("raw", "tn", "truth")]
    assert (m.wins, m.ties, m.losses, m.net, m.net_low, m.net_high) == (
        r.losses,
        r.ties,
        r.wins,
        -r.net,
        -r.net_high,
        -r.net_low,
    )
    with pytest.raises(ValueError, match="selected step 30 was not evaluated"):
        wl.finetune(judged, {("rwr", "raw", 0.0, 0): 30, ("rwr", "tn", 0.0, 0): 20}, trains, "truth")


def test_bestofn_rows_by_hand():
    picks = pd.DataFrame(
        [
            {"method": "bestofn", "seed": 0, "reward": r, "n": n, "prompt_id": p, "truth": v}
            for r, n, vs in (
                ("raw", 1, [0, 1, 0]),
                ("raw", 4, [1, 1, 0]),
                ("tn", 1, [0, 1, 0]),
                ("tn", 4, [1, 0, 1]),
            )
            for p, v in enumerate(vs)
        ]
    )
    base = pd.DataFrame({"method": "bestofn", "seed": 0, "prompt_id": [0, 1, 2], "truth_base": [0.0, 1.0, 0.0]})
    got = wl.bestofn(picks, base, ["raw", "tn"], "judge", resamples=200)
    rows = {(r.a, r.b, r.n): (r.wins, r.ties, r.losses) for r in got.itertuples()}
    assert rows == {
        ("raw", wl.RANDOM, 4): (1, 2, 0),
        ("tn", wl.RANDOM, 4): (2, 0, 1),
        ("raw", "tn", 1): (0, 3, 0),  # n = 1 is sample 0 for every row
        ("raw", "tn", 4): (1, 1, 1),
    }
    assert set(got["column"]) == {"judge"} and got["kl"].isna().all()
    gains = ef.bestofn_gain(picks, base).set_index(["reward", "n"])["truth_gain"]
    assert gains[("raw", 4)] == pytest.approx(1 / 3) and gains[("tn", 4)] == pytest.approx(1 / 3)
    assert gains[("raw", 1)] == 0


def test_gain_per_sample_and_per_device_hour_arithmetic():
    cost = CostBlock(image_step_s=0.035, train_step_s=0.05, score_s=0.01)
    work = ef.bestofn_work(prompts=8, n=4, steps=20, models=2)
    assert (work["images"], work["image_steps"], work["scores"]) == (32, 640, 64)
    assert estimate(cost, work) == pytest.approx(640 * 0.035 + 64 * 0.01)  # 23.04 s
    costs = pd.DataFrame(
        [
            {
                "kind": "finetune",
                "method": "rwr",
                "reward": "raw",
                "kl": 0.0,
                "n": None,
                "seed": s,
                "prompts": 8,
                "samples_per_prompt": 128,
                "samples": 1664,
                "eval_images": 640,
                "device_s": secs,
            }
            for s, secs in ((0, 3000.0), (1, 4200.0))
        ]
        + [
            {
                "kind": "bestofn",
                "method": "bestofn",
                "reward": "raw",
                "kl": np.nan,
                "n": 4,
                "seed": 0,
                "prompts": 8,
                "samples_per_prompt": 4,
                "samples": 32,
                "eval_images": 0,
                "device_s": 23.04,
            }
        ]
    )
    gains = pd.DataFrame(
        [
            {"kind": "finetune", "method": "rwr", "reward": "raw", "kl": 0.0, "n": None, "truth_gain": 0.1},
            {"kind": "bestofn", "method": "bestofn", "reward": "raw", "kl": np.nan, "n": 4, "truth_gain": 0.25},
        ]
    )
    got = ef.table(costs, gains)
    assert list(got["kind"]) == ["finetune", "bestofn"] and list(got.columns) == ef.COLUMNS
    ft, bon = got.iloc[0], got.iloc[1]
    assert ft["cells"] == 2 and ft["device_h"] == pytest.approx(3600 / 3600)  # mean of 3000 s and 4200 s = 1 h
    assert ft["gain_per_1k_samples"] == pytest.approx(0.1 / 1664 * 1000)
    assert ft["gain_per_device_h"] == pytest.approx(0.1)
    assert pd.isna(ft["n"]) and bon["n"] == 4 and pd.isna(bon["kl"])
    assert bon["device_h"] == pytest.approx(23.04 / 3600)
    assert bon["gain_per_1k_samples"] == pytest.approx(0.25 / 32 * 1000)  # 7.8125
    assert bon["gain_per_device_h"] == pytest.approx(0.25 / (23.04 / 3600))  # 39.0625
    md = "\n".join(ef.markdown(got, "judge", "2 CPU cores"))
    assert "**estimated**" in md and "| n 4 " in md and "+39.06" in md and "+0.0601 " in md


# --- the report: hand-built study folders -----------------------------------------------------------


def grid_of(tmp_path: Path):
    return validate(
        StudyConfig,
        {
            "out": str(tmp_path / "g"),
            "truth": TRUTH,
            "methods": {"rwr": {"config": str(REPO / "sweeps/world_rwr.yaml"), "kl": [0]}},
            "rewards": {
                "raw": {"models": ["worldclip:tiny"], "use": "worldclip:tiny"},
                "tn": {"models": ["worldclip:tiny"], "use": "textnorm(worldclip:tiny)", "contrast": "world"},
            },
            "seeds": [0, 1],
            "report": {"resamples": 200, "seed": 1},
        },
    )


def _frame(rng, columns: list[str], step: int | None) -> pd.DataFrame:
    rows = [
        {
            "prompt_id": pid,
            "seed": s,
            "prompt": prompt,
            "reward": col,
            "value": float(rng.integers(0, 2)) if col == TRUTH else float(rng.integers(0, 3)),  # ties happen
        }
        for pid, prompt in enumerate(PROMPTS)
        for s in EVAL_SEEDS
        for col in columns
    ]
    frame = pd.DataFrame(rows)
    return frame if step is None else frame.assign(step=step)


def make_cells(grid, rng) -> dict:
    """Finished cells as a run leaves them (eval/, selection.json, done.json with the config it ran under,
    evaluation PNGs and the blinded comparison of the selected checkpoint vs the base model)."""
    from tn_ray.storage import Store
    from tn_ray.training.outputs import write_human_eval

    configs = {c.key.id: c.config for c in plan(grid)}
    selected = {}
    for key in grid_cells(grid):
        out = Path(key.out)
        (out / "eval/scores").mkdir(parents=True)
        columns = [key.train, TRUTH, JUDGE]
        _frame(rng, columns, None).to_parquet(out / "eval/base.parquet", index=False)
        for step in (10, 20):
            _frame(rng, columns, step).to_parquet(out / f"eval/scores/step-{step:06d}.parquet", index=False)
        selected[key.id] = int(rng.choice([10, 20]))
        (out / "selection.json").write_text(json.dumps({"paper_rule_step": selected[key.id]}))
        for folder in ("base", f"step-{selected[key.id]:06d}"):
            (out / "eval" / folder).mkdir()
            for pid in range(len(PROMPTS)):
                for s in EVAL_SEEDS:
                    Image.new("RGB", (4, 4), (pid * 60, s * 90, 7)).save(out / "eval" / folder / f"{pid:05d}-{s}.png")
        write_human_eval(Store(key.out), PROMPTS, EVAL_SEEDS, selected[key.id], key.seed)
        done = {"cell": key.id, "config": configs[key.id].model_dump(mode="json")}
        (out / "done.json").write_text(json.dumps(done))
    return selected


def independent_winloss(grid, selected: dict) -> dict:
    """Per (a, b, column): (wins, ties, losses, net CI), recomputed from the parquet files with plain pandas."""
    values = {}
    for key in grid_cells(grid):
        out = Path(key.out)
        frames = [pd.read_parquet(out / "eval/base.parquet").assign(step=0)]
        frames += [pd.read_parquet(p) for p in sorted((out / "eval/scores").glob("*.parquet"))]
        for row in pd.concat(frames).itertuples():
            values[(key.reward, key.seed, row.step, row.prompt_id, row.seed, row.reward)] = row.value
    units = [(s, p, e) for s in grid.seeds for p in range(len(PROMPTS)) for e in EVAL_SEEDS]
    step = {(k.reward, k.seed): selected[k.id] for k in grid_cells(grid)}
    out = {}

    def tally(signs):
        signs = np.asarray(signs)
        return int((signs > 0).sum()), int((signs == 0).sum()), int((signs < 0).sum()), ci(signs)

    for r in grid.rewards:
        for col in (grid.rewards[r].use, TRUTH, JUDGE):
            out[(r, "base", col)] = tally(
                [np.sign(values[(r, s, step[(r, s)], p, e, col)] - values[(r, s, 0, p, e, col)]) for s, p, e in units]
            )
    for col in (TRUTH, JUDGE):
        out[("raw", "tn", col)] = tally(
            [
                np.sign(values[("raw", s, step[("raw", s)], p, e, col)] - values[("tn", s, step[("tn", s)], p, e, col)])
                for s, p, e in units
            ]
        )
    return out


def _answer_all(cell: Path, prefer) -> int:
    """Answers every question of the cell's comparison in the labelling app's answer database (its real
    AnswerStore, where `tn-ray label serve --export` keeps them): ``prefer(annotator, prompt_id, criterion)`` is
    "checkpoint", "base" or "tie"; returns the number of answers."""
    from tn_ray.labeling.store import AnswerStore
    from tn_ray.labeling.tasks import CRITERIA, load_comparison

    task = load_comparison(cell / "human_eval")
    prompt_of = {i.item_id: PROMPTS.index(i.prompt) for i in task.items}
    store = AnswerStore(cell / "human_eval_answers.sqlite", task, per_item=2)
    n = 0
    for name in ("ann", "ben"):
        store.login(name, None)
        while (item := store.assign_next(name)) is not None:
            set1, _ = task.key[item]
            value = {}
            for crit in CRITERIA:
                want = prefer(name, prompt_of[item], crit)
                value[crit] = "tie" if want == "tie" else ("set1" if (set1 == "base") == (want == "base") else "set2")
            store.answer(name, item, value)
            n += 1
    return n


def test_report_winloss_matches_an_independent_recomputation_and_says_no_human_answers(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    grid = grid_of(tmp_path)
    selected = make_cells(grid, np.random.default_rng(5))
    paths = write_report(grid)
    out = Path(grid.out)
    assert {"winloss_csv", "efficiency_csv"} <= set(paths) and "human_winloss_csv" not in paths

    got = pd.read_csv(out / "winloss.csv")
    want = independent_winloss(grid, selected)
    assert len(got) == len(want) == 8
    for r in got.itertuples():
        w = want[(r.a, r.b, r.column)]
        assert (r.wins, r.ties, r.losses, r.pairs) == (*w[:3], 12)
        np.testing.assert_allclose([r.net, r.net_low, r.net_high], w[3], atol=1e-12)
        assert r.win + r.tie + r.loss == pytest.approx(1.0)
    md = (out / "report.md").read_text()
    assert "## Win / tie / loss of the selected images (automatic; truth `brightness`)" in md
    assert "## Truth (brightness) at the checkpoint the paper's rule selected" in md  # the old sections stay
    no_answers = next(ln for ln in md.splitlines() if ln.startswith("No human answers yet"))
    assert f"`tn-ray label serve --export {out}/cells/<cell id>/human_eval`" in no_answers
    assert "tn-ray study CONFIG --report-only" in no_answers
    js = json.loads((out / "report.json").read_text())
    assert js["human_answers"] == 0 and "human_winloss" not in js
    records = pd.DataFrame(js["winloss"])
    assert records["n"].isna().all() and got["n"].isna().all()  # fine-tuning rows have no n (null in JSON)
    pd.testing.assert_frame_equal(records.drop(columns="n"), got.drop(columns="n"), check_dtype=False)

    # per sample and per device-hour: each cell's counted work (the dry run's counts) at the study's cost
    eff = pd.read_csv(out / "efficiency.csv").set_index("reward")
    cells = {c.key.id: c for c in plan(grid)}
    report = pd.read_csv(out / "report.csv").set_index("reward")
    for reward in grid.rewards:
        works = [counts(cells[f"rwr-{reward}-kl0-s{s}"]) for s in grid.seeds]
        seconds = np.mean([estimate(grid.cost, w) for w in works])
        row = eff.loc[reward]
        assert row["device_h"] == pytest.approx(seconds / 3600)
        assert row["samples"] == works[0]["images"] + works[0]["eval_images"]
        assert row["truth_gain"] == pytest.approx(report.loc[reward, "diff_selected"], abs=1e-12)
        assert row["gain_per_1k_samples"] == pytest.approx(row["truth_gain"] / row["samples"] * 1000)
        assert row["gain_per_device_h"] == pytest.approx(row["truth_gain"] / row["device_h"])
    assert "## Gain per sample and per estimated device-hour" in md and "Work not counted" not in md


def test_report_tallies_human_answers_from_the_labelling_app(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    grid = grid_of(tmp_path)
    make_cells(grid, np.random.default_rng(6))

    def prefer(name, prompt_id, crit):  # ann: the checkpoint's alignment, ties on quality; ben: base, but prompt 0
        if crit == "alignment":
            return "checkpoint" if name == "ann" else "base"
        return "tie" if name == "ann" else ("checkpoint" if prompt_id == 0 else "base")

    answered = sum(_answer_all(Path(k.out), prefer) for k in grid_cells(grid) if k.reward == "raw")
    assert answered == 2 * 3 * 2  # 2 cells x 3 questions (prompts) x 2 annotators
    paths = write_report(grid)
    assert "human_winloss_csv" in paths
    got = pd.read_csv(Path(grid.out) / "human_winloss.csv").set_index("criterion")
    assert set(got["reward"]) == {"raw"} and set(got["cells"]) == {2} and set(got["answers"]) == {12}
    assert tuple(got.loc["alignment", ["wins", "ties", "losses"]]) == (6, 0, 6)  # ann 6 wins, ben 6 losses
    assert tuple(got.loc["quality", ["wins", "ties", "losses"]]) == (2, 6, 4)  # ann ties; ben 1 win, 2 losses x 2
    assert got.loc["quality", "net"] == pytest.approx((2 - 4) / 12)
    for crit in ("alignment", "quality"):
        assert got.loc[crit, ["win", "tie", "loss"]].sum() == pytest.approx(1.0)
    md = (Path(grid.out) / "report.md").read_text()
    assert "No human answers yet" not in md and "12 answers from 2 annotators." in md
    assert json.loads((Path(grid.out) / "report.json").read_text())["human_answers"] == 12


def test_report_bestofn_rows_read_the_runs_and_count_n_samples_per_prompt(tmp_path, monkeypatch):
    """Best-of-n runs (hand-made rewards.parquet and the real selection of it): the pick vs sample 0 and the rows
    vs each other under the truth, recomputed by hand; the cost of a cell at n is n images per prompt."""
    from tn_ray.analysis.bestofn_selection import select
    from tn_ray.config import read_yaml

    monkeypatch.chdir(REPO)
    data = read_yaml(str(REPO / "sweeps/study_tiny.yaml"))
    data.update(out=str(tmp_path / "g"), seeds=[0, 1], report={"resamples": 200, "seed": 1})
    entry = data["methods"]["bestofn"]
    data["methods"] = {"bestofn": {**entry, "n": [1, 4], "overrides": {**entry["overrides"], "max_prompts": 4}}}
    data["rewards"] = {
        "clip": {"models": ["clip:tiny"], "use": "clip:tiny"},
        "bright": {"models": [TRUTH], "use": TRUTH},
    }
    grid = validate(StudyConfig, data)
    runs = {c.key.id: c for c in plan(grid)}
    rng = np.random.default_rng(7)
    truth, picked = {}, {}
    for run in bestofn_runs(grid):
        cfg = runs[run.id].config
        prompts = count_prompts(cfg)
        out = Path(run.out)
        (out / "images").mkdir(parents=True)
        rewards = pd.DataFrame(
            [
                {
                    "prompt_id": p,
                    "sample": s,
                    "prompt": f"prompt {p}",
                    "image": str(out / "images" / f"{p}-{s}.png"),  # the figures read the picked images
                    "clip:tiny": float(rng.normal()),
                    TRUTH: float(rng.integers(0, 2)),
                }
                for p in range(prompts)
                for s in range(cfg.generation.samples_per_prompt)
            ]
        )
        for path in rewards["image"]:
            Image.new("RGB", (4, 4), (9, 9, 9)).save(path)
        rewards.to_parquet(out / "rewards.parquet", index=False)
        select(rewards, ["clip:tiny", TRUTH], [1, 4], [1]).to_parquet(out / "selections.parquet", index=False)
        (out / "done.json").write_text(json.dumps({"cell": run.id, "config": cfg.model_dump(mode="json")}))
        for p, g in rewards.groupby("prompt_id"):
            pool = g[g["sample"] < 4]
            truth[(run.seed, p)] = g.loc[g["sample"] == 0, TRUTH].item()
            picked[("clip", run.seed, p)] = pool.sort_values(["clip:tiny", "sample"], ascending=[False, True])[
                TRUTH
            ].iloc[0]
            picked[("bright", run.seed, p)] = pool[TRUTH].max()
    write_report(grid)
    got = pd.read_csv(Path(grid.out) / "winloss.csv")
    assert set(got["kind"]) == {"bestofn"} and set(got["column"]) == {TRUTH}
    assert count_prompts(runs["bestofn-s0"].config) >= 3 and set(got["pairs"]) == {len(truth)}
    units = sorted(truth)

    def signs(a, b):
        return np.sign(np.array(a) - np.array(b))

    want = {
        ("clip", wl.RANDOM, 4): signs([picked[("clip", *u)] for u in units], [truth[u] for u in units]),
        ("bright", wl.RANDOM, 4): signs([picked[("bright", *u)] for u in units], [truth[u] for u in units]),
        ("clip", "bright", 1): np.zeros(len(units)),
        ("clip", "bright", 4): signs([picked[("clip", *u)] for u in units], [picked[("bright", *u)] for u in units]),
    }
    assert len(got) == len(want)
    for r in got.itertuples():
        s = want[(r.a, r.b, r.n)]
        assert (r.pairs, r.wins, r.ties, r.losses) == (len(s), (s > 0).sum(), (s == 0).sum(), (s < 0).sum())
        np.testing.assert_allclose([r.net, r.net_low, r.net_high], ci(s), atol=1e-12)
    eff = pd.read_csv(Path(grid.out) / "efficiency.csv").set_index(["reward", "n"])
    cfg = runs["bestofn-s0"].config
    prompts, steps = count_prompts(cfg), cfg.generation.num_inference_steps
    for (reward, n), row in eff.iterrows():
        models = 2 if reward == "clip" else 1  # the row's models and the truth
        seconds = prompts * n * steps * grid.cost.image_step_s + prompts * n * models * grid.cost.score_s
        assert (row["samples_per_prompt"], row["samples"], row["cells"]) == (n, prompts * n, 2)
        assert row["device_h"] == pytest.approx(seconds / 3600)
        gain = np.mean([picked[(reward, *u)] - truth[u] for u in units]) if n == 4 else 0.0
        assert row["truth_gain"] == pytest.approx(gain)
    md = (Path(grid.out) / "report.md").read_text()
    assert "### Best-of-n: each reward's top-1 pick vs the n = 1 image" in md
    assert "No human answers: only fine-tuning cells export a comparison" in md
