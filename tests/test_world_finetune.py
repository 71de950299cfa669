"""``tn-ray world finetune`` (docs/world.md, "Fine-tuning against exact truth"): the grid's cells and their
configs, errors named before Ray starts, the report against an independent recomputation from hand-made cell
folders, and a killed 2-cell grid resumed without rerunning its finished cell (Ray, tiny pipeline)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from tn_ray.config import ConfigError, load_config, validate
from tn_ray.errors import InputError
from tn_ray.experiments.study import runner, tune_runs
from tn_ray.experiments.study.cell_keys import grid_cells
from tn_ray.experiments.study.config import GridConfig
from tn_ray.experiments.study.plan import plan
from tn_ray.experiments.study.report import write_report

REPO = Path(__file__).resolve().parents[1]
FULL = REPO / "sweeps" / "world_finetune.yaml"
TINY = REPO / "sweeps" / "world_finetune_tiny.yaml"


def grid_dict(**changes) -> dict:
    """A small grid on the world base configs (read from the repository, so any working folder does)."""
    data = {
        "out": "unused",
        "truth": "brightness",
        "methods": {
            "rwr": {"config": str(REPO / "sweeps/world_rwr.yaml"), "kl_key": "beta", "kl": [0, 1]},
            "ddpo": {"config": str(REPO / "sweeps/world_ddpo.yaml"), "kl_key": "train.kl_coef", "kl": [0.5]},
        },
        "rewards": {
            "textnorm": {"models": ["worldclip:tiny"], "use": "textnorm(worldclip:tiny)", "contrast": "world"},
            "truth": {"models": ["brightness"], "use": "brightness"},
        },
        "seeds": [0, 1],
    }
    data.update(changes)
    return data


# --- the grid's cells --------------------------------------------------------------------------


def test_cells_are_the_product_with_kl_seed_reward_and_truth_judge_at_their_keys(tmp_path):
    grid = validate(GridConfig, grid_dict(out=str(tmp_path / "g"), overrides={"max_steps": 7, "eval": {"every": 7}}))
    cells = plan(grid)
    assert len(cells) == (2 + 1) * 2 * 2
    assert [c.key.id for c in cells[:4]] == [
        "rwr-textnorm-kl0-s0",
        "rwr-textnorm-kl1-s0",
        "rwr-truth-kl0-s0",
        "rwr-truth-kl1-s0",
    ]  # seed-major: every combination's first seed first
    assert len({c.key.out for c in cells}) == len(cells)
    for c in cells:
        cfg, k = c.config, c.key
        assert (cfg.beta if k.kind == "rwr" else cfg.train.kl_coef) == k.kl and cfg.seed == k.seed
        assert cfg.out == str(tmp_path / "g" / "cells" / k.id) and cfg.policy.pipeline == "world"
        assert (cfg.max_steps, cfg.eval.every) == (7, 7)  # a nested override merges: eval's other keys stay
        assert cfg.eval.seeds == list(range(16 if k.kind == "rwr" else 4)) and cfg.eval.guidance_scale == 3.0
        assert cfg.reward.use == k.train == grid.rewards[k.reward].use
        # the truth is a held-out judge, unless the cell trains on it: then its training column is the truth's
        assert cfg.judge_names() == ([] if k.reward == "truth" else ["brightness"]) and k.truth == "brightness"


def test_the_full_grid_is_48_cells(tmp_path):
    """sweeps/world_finetune.yaml: 2 methods x 4 rewards x 2 kl x 3 seeds; `worldjudge` replaced by a stand-in
    (`brightness`) until it is registered, then the file as it is too."""
    from tn_ray.rewards import parse

    stand_in = {"truth": "brightness", "rewards.worldjudge": {"models": ["brightness"], "use": "brightness"}}
    variants = [stand_in]
    try:
        parse("worldjudge")
        variants.append({})
    except KeyError:
        pass
    for extra in variants:
        grid = load_config(FULL, GridConfig, {"out": str(tmp_path / "g"), **extra})
        cells = plan(grid, str(FULL))
        assert len(cells) == 48 and len({c.key.id for c in cells}) == 48
        assert {c.key.id for c in cells if c.key.train == c.key.truth} == {
            f"{m}-worldjudge-kl{k}-s{s}" for m in ("rwr", "ddpo") for k in (0, 1) for s in (0, 1, 2)
        }
        ensemble = next(c for c in cells if c.key.reward == "ensemble").config.reward
        assert ensemble.use == "mean3" and ensemble.contrast == "world"


def test_dry_run_prints_the_grid_and_runs_nothing(tmp_path, capsys):
    from tn_ray.cli import main

    out = tmp_path / "g"
    assert main(["world", "finetune", str(TINY), "--dry-run", "--set", f"out={out}"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].startswith("2 runs, 2 cells: 12 images sampled") and printed[1].startswith(
        "cell 1/2 rwr-textnorm-kl1-s0: rwr"
    )
    assert printed[2].startswith("cell 2/2 ddpo-textnorm-kl1-s0: ddpo") and printed[2].endswith(": new")
    assert not out.exists()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"methods": {"rwr": {"config": "sweeps/world_rwr.yaml", "kl_key": "train.kl_coef", "kl": [0]}}},
            "methods.rwr.kl_key: 'train.kl_coef' is not a key of RwrConfig; rwr's KL coefficient is 'beta'",
        ),
        (
            {"methods": {"ppo": {"config": "sweeps/world_rwr.yaml", "kl_key": "beta", "kl": [0]}}},
            "methods.ppo.method: 'ppo' is not a method",
        ),
        ({"rewards": {"x": {"models": ["nomodel"], "use": "nomodel"}}}, "key 'rewards.x': unknown reward model"),
        (
            {"rewards": {"x": {"models": ["brightness"], "use": "mean3"}}},
            "key 'rewards.x': use: 'mean3' is not a reward column",
        ),
        ({"truth": "nomodel"}, "truth: unknown reward model 'nomodel'"),
        ({"overrides": {"train": {"kl_coef": 2}}}, "overrides: 'train.kl_coef' is set per cell by the grid"),
        ({"seeds": [0, 0]}, "seeds: repeated seed"),
    ],
)
def test_grid_errors_name_the_key(change, expected):
    with pytest.raises(ConfigError) as err:
        validate(GridConfig, grid_dict(**change), "grid.yaml")
    assert expected in str(err.value)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"methods.rwr.overrides": {"generation": {"nonsense": 1}}},
            "grid.yaml: cell 1/2 rwr-textnorm-kl0-s0 (sweeps/world_rwr.yaml): key 'generation.nonsense': unknown key",
        ),
        (
            {"overrides": {"top_k": 9999}},  # more than the base config's samples, whatever they are now
            "grid.yaml: cell 1/2 rwr-textnorm-kl0-s0 (sweeps/world_rwr.yaml): top_k (9999) exceeds "
            "generation.samples_per_prompt (",
        ),
        (
            {"methods.rwr.config": "sweeps/nothing.yaml"},
            "grid.yaml: methods.rwr.config: config file not found: sweeps/nothing.yaml",
        ),
        ({"overrides": {"eval": {"enabled": False}}}, "grid.yaml: cell 1/2 rwr-textnorm-kl0-s0: eval.enabled is false"),
        ({"overrides": {"ray": {"num_cpus": 1}}, "methods.rwr.overrides": {"ray": {"num_cpus": 2}}}, None),
    ],
)
def test_cell_errors_are_one_line_naming_the_cell_and_key_before_ray_starts(change, expected, monkeypatch, tmp_path):
    """A cell whose config does not validate fails the whole grid in one line naming the grid file, the cell
    and the key; nothing is written and Ray is never started."""
    import tn_ray.cluster
    from tn_ray.config import apply_overrides

    def no_ray(*a, **k):
        raise AssertionError("Ray started before the cells were validated")

    monkeypatch.setattr(tn_ray.cluster, "init_ray", no_ray)
    monkeypatch.chdir(REPO)
    data = grid_dict(out=str(tmp_path / "g"), seeds=[0])
    data["methods"] = {"rwr": {"config": "sweeps/world_rwr.yaml", "kl_key": "beta", "kl": [0, 1]}}
    data["rewards"] = {"textnorm": data["rewards"]["textnorm"]}
    grid = validate(GridConfig, apply_overrides(data, change))
    if expected is None:  # a valid grid: the same checks pass (and nothing runs here)
        assert [c.key.id for c in plan(grid)] == ["rwr-textnorm-kl0-s0", "rwr-textnorm-kl1-s0"]
        return
    with pytest.raises(ConfigError) as err:
        runner.run(grid, "grid.yaml", echo=lambda line: None)
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "g").exists()


# --- the report, on hand-made cells ----------------------------------------------------------------


PROMPTS = ["a photo of two red circles", "a photo of a green triangle", "a photo of a blue circle"]
EVAL_SEEDS = [0, 1]


def _write(path: Path, frame: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)


def _pngs(out: Path, step: int) -> None:
    """The evaluation images of a step (0: the base model's) as a finished run leaves them, one tiny PNG each (the
    report's figures read them)."""
    from PIL import Image

    folder = out / ("eval/base" if step == 0 else f"eval/step-{step:06d}")
    folder.mkdir(parents=True, exist_ok=True)
    for pid in range(len(PROMPTS)):
        for s in EVAL_SEEDS:
            Image.new("RGB", (4, 4), (40 * pid, 100, 50 * s + step % 200)).save(folder / f"{pid:05d}-{s}.png")


def _images(rng, columns: list[str], truth: str, step: int | None) -> pd.DataFrame:
    rows = []
    for pid, prompt in enumerate(PROMPTS):
        for s in EVAL_SEEDS:
            for col in columns:
                value = float(rng.integers(0, 2)) if col == truth else float(rng.normal(20, 3))
                rows.append({"prompt_id": pid, "seed": s, "prompt": prompt, "reward": col, "value": value})
    frame = pd.DataFrame(rows)
    return frame if step is None else frame.assign(step=step)[["step", *frame.columns]]


def make_cells(grid: GridConfig, rng, skip: set[str], short: set[str]) -> dict:
    """Cell folders as a finished run leaves them: eval/base.parquet, eval/scores/step-*.parquet (steps 10, 20,
    30; 10 and 20 only for ``short``), selection.json, done.json; ``skip``: cells left unfinished."""
    selected = {}
    for key in grid_cells(grid):
        out = Path(key.out)
        columns = list(dict.fromkeys([key.train, key.truth, "clip:tiny"]))  # another judge the report ignores
        _write(out / "eval/base.parquet", _images(rng, columns, key.truth, None))
        steps = [10, 20] if key.id in short else [10, 20, 30]
        for step in [0, *steps]:
            _pngs(out, step)
        for step in steps:
            _write(out / f"eval/scores/step-{step:06d}.parquet", _images(rng, columns, key.truth, step))
        selected[key.id] = int(rng.choice(steps))
        (out / "selection.json").write_text(json.dumps({"paper_rule_step": selected[key.id]}))
        if key.id not in skip:
            (out / "done.json").write_text(json.dumps({"cell": key.id}))
    return selected


def add_path_kl(grid: GridConfig, rng, cells: set[str]) -> None:
    for key in grid_cells(grid):
        if key.id not in cells:
            continue
        for rel in (Path(key.out) / "eval/scores").glob("*.parquet"):
            scores = pd.read_parquet(rel)
            kl = (
                scores[["prompt_id", "seed", "prompt", "step"]]
                .drop_duplicates()
                .assign(path_kl=lambda f: rng.gamma(2.0, f["step"] / 10))
            )
            _write(Path(key.out) / "eval/path_kl" / rel.name, kl)


def independent(grid: GridConfig, cells_done: list, selected: dict, boot: dict) -> tuple[dict, dict]:
    """The report's numbers recomputed from the parquet files with plain pandas and scipy."""

    def ci(d: np.ndarray) -> tuple[float, float, float]:
        if len(d) < 2 or np.ptp(d) == 0:
            return float(d.mean()), float(d.mean()), float(d.mean())
        res = stats.bootstrap(
            (d,),
            np.mean,
            confidence_level=boot["confidence"],
            n_resamples=boot["resamples"],
            method="percentile",
            rng=np.random.default_rng(boot["seed"]),
        ).confidence_interval
        return float(d.mean()), float(res.low), float(res.high)

    per_image = []
    for key in cells_done:
        out = Path(key.out)
        base = pd.read_parquet(out / "eval/base.parquet").assign(step=0)
        scores = pd.concat([pd.read_parquet(p) for p in sorted((out / "eval/scores").glob("*.parquet"))])
        kl_files = sorted((out / "eval/path_kl").glob("*.parquet"))
        kl = pd.concat([pd.read_parquet(p) for p in kl_files]) if kl_files else None
        for frame in (base, scores):
            t = frame[frame["reward"] == key.truth].set_index(["step", "prompt_id", "seed"])["value"]
            r = frame[frame["reward"] == key.train].set_index(["step", "prompt_id", "seed"])["value"]
            for (step, pid, s), v in t.items():
                bt = base[(base["reward"] == key.truth) & (base["prompt_id"] == pid) & (base["seed"] == s)]
                br = base[(base["reward"] == key.train) & (base["prompt_id"] == pid) & (base["seed"] == s)]
                path_kl = 0.0 if step == 0 else np.nan
                if kl is not None and step > 0:
                    hit = kl[(kl["step"] == step) & (kl["prompt_id"] == pid) & (kl["seed"] == s)]
                    path_kl = float(hit["path_kl"].iloc[0])
                per_image.append(
                    {
                        "cell": key.id,
                        "group": (key.method, key.reward, key.kl),
                        "seed": key.seed,
                        "step": step,
                        "pid": pid,
                        "es": s,
                        "truth": v,
                        "d": v - bt["value"].iloc[0],
                        "train": r[(step, pid, s)],
                        "win": r[(step, pid, s)] > br["value"].iloc[0],
                        "path_kl": path_kl,
                    }
                )
    images = pd.DataFrame(per_image).sort_values(["seed", "pid", "es"])
    curve = {}
    for (group, step), g in images.groupby(["group", "step"]):
        by_cell = g.groupby("cell")
        kls = g["path_kl"].dropna()
        curve[(*group, step)] = {
            "seeds": g["cell"].nunique(),
            "truth": by_cell["truth"].mean().mean(),
            "ci": ci(g["d"].to_numpy()),
            "train": by_cell["train"].mean().mean(),
            "train_wins": by_cell["win"].mean().mean(),
            "path_kl": kls.mean() if len(kls) else np.nan,
        }
    summary = {}
    for group, g in images.groupby("group"):
        cell_means = g[g["step"] > 0].groupby(["cell", "step"])["truth"].mean()
        chosen = {}
        for cell, m in cell_means.groupby(level=0):
            m = m.droplevel(0)
            chosen[cell] = {
                "selected": selected[cell],
                "best": int(m[m == m.max()].index.min()),
                "final": int(m.index.max()),
            }
        row = {"seeds": len(chosen)}
        for which in ("selected", "best", "final"):
            at = pd.concat([g[(g["cell"] == c) & (g["step"] == s[which])] for c, s in chosen.items()])
            row[f"truth_{which}"] = at.groupby("cell")["truth"].mean().mean()
            row[f"diff_{which}"] = ci(at.sort_values(["seed", "pid", "es"])["d"].to_numpy())
        row["truth_base"] = g[g["step"] == 0].groupby("cell")["truth"].mean().mean()
        row["regret"] = row["truth_best"] - row["truth_selected"]
        row["selected_steps"] = ", ".join(
            str(chosen[c]["selected"]) for c in sorted(chosen, key=lambda c: g.loc[g["cell"] == c, "seed"].iloc[0])
        )
        summary[group] = row
    # each reward row against the first, at each cell's selected step, image by image
    first = next(iter(grid.rewards))
    chosen = images[[selected[c] == st for c, st in zip(images["cell"], images["step"])]]
    versus = {}
    for (method, reward, kl), g in chosen.groupby("group"):
        if reward == first:
            continue
        ref = chosen[chosen["group"] == (method, first, kl)]
        m = g.merge(ref, on=["seed", "pid", "es"], suffixes=("", "_ref")).sort_values(["seed", "pid", "es"])
        versus[(method, kl, reward)] = {
            "pairs": len(m),
            "truth": m["truth"].mean(),
            "truth_reference": m["truth_ref"].mean(),
            "ci": ci((m["truth"] - m["truth_ref"]).to_numpy()),
        }
    return curve, summary, versus


def test_report_numbers_equal_an_independent_recomputation(tmp_path):
    data = grid_dict(out=str(tmp_path / "g"), truth="clip:tiny", report={"resamples": 300, "seed": 3})
    data["rewards"]["truth"] = {"models": ["clip:tiny"], "use": "clip:tiny"}  # this row trains on the truth
    grid = validate(GridConfig, data)
    rng = np.random.default_rng(0)
    skip, short = {"ddpo-textnorm-kl0.5-s1"}, {"rwr-truth-kl1-s1"}
    selected = make_cells(grid, rng, skip, short)
    done = [k for k in grid_cells(grid) if k.id not in skip]
    boot = {"confidence": 0.95, "resamples": 300, "seed": 3}
    out = tmp_path / "g"

    for with_kl in (False, True):
        if with_kl:
            add_path_kl(grid, rng, {"rwr-textnorm-kl0-s0", "rwr-textnorm-kl0-s1"})
        paths = write_report(grid)
        assert (out / "accuracy_vs_step.png").stat().st_size > 0
        assert (out / "accuracy_vs_path_kl.png").is_file() is with_kl and (
            "accuracy_vs_path_kl_png" in paths
        ) is with_kl
        curve, summary, versus = independent(grid, done, selected, boot)

        got = pd.read_csv(out / "curve.csv")
        assert len(got) == len(curve)
        for row in got.itertuples():
            want = curve[(row.method, row.reward, row.kl, row.step)]
            assert row.seeds == want["seeds"]
            np.testing.assert_allclose(
                [row.truth, row.truth_diff, row.truth_diff_low, row.truth_diff_high, row.train, row.train_wins],
                [want["truth"], *want["ci"], want["train"], want["train_wins"]],
                rtol=1e-12,
                atol=1e-12,
            )
            np.testing.assert_allclose(row.path_kl, want["path_kl"], rtol=1e-12, equal_nan=True)
        short_row = got[(got["method"] == "rwr") & (got["reward"] == "truth") & (got["kl"] == 1) & (got["step"] == 30)]
        assert short_row["seeds"].tolist() == [1]  # seed 1 of that cell stopped at step 20

        report = pd.read_csv(out / "report.csv")
        assert len(report) == len(summary) == 6
        md = (out / "report.md").read_text()
        for row in report.itertuples():
            want = summary[(row.method, row.reward, row.kl)]
            assert (row.seeds, row.selected_steps) == (want["seeds"], want["selected_steps"])
            np.testing.assert_allclose(
                [
                    row.truth_base,
                    row.truth_selected,
                    row.truth_best,
                    row.truth_final,
                    row.regret,
                    row.diff_selected,
                    row.diff_selected_low,
                    row.diff_selected_high,
                    row.diff_final,
                    row.diff_final_low,
                    row.diff_final_high,
                ],
                [
                    want["truth_base"],
                    want["truth_selected"],
                    want["truth_best"],
                    want["truth_final"],
                    want["regret"],
                    *want["diff_selected"],
                    *want["diff_final"],
                ],
                rtol=1e-12,
                atol=1e-12,
            )
            line = next(
                ln
                for ln in md.splitlines()
                if ln.startswith(f"| {row.method} ") and f"| {row.reward} " in ln and f"| {row.kl:g} " in ln
            )
            d = want["diff_selected"]
            assert f"| {want['truth_selected']:.3f} " in line and f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" in line

        # the reward rows against the first (textnorm), paired at the selected checkpoints; ddpo at kl 0.5 lacks
        # textnorm's seed-1 cell, so only seed 0's images pair
        pairs = pd.read_csv(out / "versus.csv")
        assert sorted(zip(pairs["method"], pairs["kl"], pairs["reward"])) == sorted(versus)
        for row in pairs.itertuples():
            want = versus[(row.method, row.kl, row.reward)]
            assert row.reference == "textnorm" and row.pairs == want["pairs"]
            np.testing.assert_allclose(
                [row.truth, row.truth_reference, row.diff, row.low, row.high],
                [want["truth"], want["truth_reference"], *want["ci"]],
                rtol=1e-12,
                atol=1e-12,
            )
            d = want["ci"]
            shown = [
                [c.strip() for c in ln.strip("|").split("|")] for ln in md.splitlines() if ln.count("|") == 9
            ]
            assert [
                row.method, f"{row.kl:g}", row.reward, "textnorm", str(want["pairs"]), f"{want['truth']:.3f}",
                f"{want['truth_reference']:.3f}", f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]",
            ] in shown
        ddpo = pairs[pairs["method"] == "ddpo"].iloc[0]
        rwr = pairs[pairs["method"] == "rwr"].iloc[0]
        assert ddpo["pairs"] * 2 == rwr["pairs"]

        js = json.loads((out / "report.json").read_text())
        pd.testing.assert_frame_equal(pd.DataFrame(js["versus"]), pairs, check_dtype=False)
        assert js["cells_missing"] == sorted(skip) and len(js["cells_finished"]) == 11 and js["truth"] == "clip:tiny"
        pd.testing.assert_frame_equal(pd.DataFrame(js["summary"]), report, check_dtype=False)
        assert "11 of 12 cells finished (not yet: ddpo-textnorm-kl0.5-s1)" in md


def test_report_refuses_a_cell_without_its_truth_column(tmp_path):
    grid = validate(GridConfig, grid_dict(out=str(tmp_path / "g"), seeds=[0]))
    make_cells(grid, np.random.default_rng(1), set(), set())
    first = grid_cells(grid)[0]
    base = Path(first.out) / "eval/base.parquet"
    frame = pd.read_parquet(base)
    frame[frame["reward"] != "brightness"].to_parquet(base, index=False)
    with pytest.raises(
        InputError,
        match=r"cell 1/6 rwr-textnorm-kl0-s0: .*the truth column 'brightness' is missing at the base model's images",
    ):
        write_report(grid)


# --- a killed grid resumes (Ray) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def world_cache(tmp_path_factory):
    """A fresh cache for worldclip:tiny (trained in the driver once, before Ray actors load it)."""
    path = tmp_path_factory.mktemp("world_cache")
    old = os.environ.get("TN_RAY_CACHE_DIR")
    os.environ["TN_RAY_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("TN_RAY_CACHE_DIR", None)
    else:
        os.environ["TN_RAY_CACHE_DIR"] = old


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_a_killed_grid_resumes_without_rerunning_finished_cells(
    world_cache, ray_session, study_runs, tmp_path, monkeypatch, capsys
):
    """The 2-cell tiny grid (RWR and DDPO on the tiny pipeline) runs; then its second cell is put back to where a
    kill after its first step leaves it; the rerun skips the first cell (its run function is not called, none of
    its files changes) and resumes the second from its step-1 checkpoint (kept as it was)."""
    from tn_ray.cli import main

    monkeypatch.chdir(REPO)  # the grid names its base configs from the repository root
    out = tmp_path / "grid"
    argv = ["world", "finetune", str(TINY), "--set", f"out={out}"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "cell 1/2 rwr-textnorm-kl1-s0: starting" in printed and "cell 2/2 ddpo-textnorm-kl1-s0: done in" in printed
    assert study_runs.counts() == {"ddpo": 1, "rwr": 1}
    first, second = out / "cells" / "rwr-textnorm-kl1-s0", out / "cells" / "ddpo-textnorm-kl1-s0"
    assert json.loads((first / "done.json").read_text())["paths"]["selection"].endswith("selection.json")
    curve = pd.read_csv(out / "curve.csv")
    assert sorted(curve["step"].unique()) == [0, 1, 2] and set(curve["method"]) == {"rwr", "ddpo"}

    # the second cell as a kill after its step-1 checkpoint leaves it
    for rel in ("done.json", "selection.json", "eval/scores/step-000002.parquet"):
        (second / rel).unlink()
    for rel in ("checkpoints/step-000002", "eval/step-000002"):
        shutil.rmtree(second / rel)
    before_first = _mtimes(first)
    kept = {rel: t for rel, t in _mtimes(second).items() if "step-000001" in rel}
    assert any(rel.startswith("checkpoints/step-000001") for rel in kept)

    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "cell 1/2 rwr-textnorm-kl1-s0: finished before, skipped" in printed
    assert "cell 2/2 ddpo-textnorm-kl1-s0: resuming" in printed
    assert study_runs.counts() == {"ddpo": 2, "rwr": 1}
    assert _mtimes(first) == before_first
    after = _mtimes(second)
    assert {rel: after.get(rel) for rel in kept} == kept  # step 1 was not trained or evaluated again
    assert (second / "checkpoints/step-000002").is_dir() and (second / "eval/scores/step-000002.parquet").is_file()
    assert (second / "done.json").is_file()
    assert "2 of 2 cells finished" in (out / "report.md").read_text()


def test_a_finished_cell_whose_config_changed_is_refused_or_continued(tmp_path, monkeypatch):
    """done.json records the config a cell ran under: a rerun under another config names the cell and the key, and
    with --allow-provenance-change runs it again (the method resumes it from its checkpoints). No Ray: the method's
    run is replaced by one that writes a finished cell's files, and Tune's trials by a loop in this process."""
    import tn_ray.training.rwr

    calls = []

    def fake_run(cfg, allow_provenance_change=False):
        calls.append((cfg.max_steps, allow_provenance_change))
        key = next(k for k in grid_cells(grid) if k.out == cfg.out)
        out = Path(cfg.out)
        columns = list(dict.fromkeys([key.train, key.truth]))
        _write(out / "eval/base.parquet", _images(np.random.default_rng(0), columns, key.truth, None))
        _write(out / "eval/scores/step-000001.parquet", _images(np.random.default_rng(1), columns, key.truth, 1))
        _pngs(out, 0)
        _pngs(out, 1)
        (out / "selection.json").write_text(json.dumps({"paper_rule_step": 1}))
        return {"out": cfg.out}

    def in_turn(grid, todo, states, run_cell, describe_done, echo, allow_provenance_change=False):
        for cell in todo:  # the runs in this process, one after another, in place of Tune's trials
            run_cell(cell, allow_provenance_change)

    monkeypatch.setattr(tn_ray.training.rwr, "run", fake_run)
    monkeypatch.setattr(runner, "_start_ray", lambda todo: False)
    monkeypatch.setattr(tune_runs, "run_trials", in_turn)
    data = grid_dict(out=str(tmp_path / "g"), seeds=[0], overrides={"policy": {"pipeline": "tiny"}})
    data["methods"] = {"rwr": {"config": str(REPO / "sweeps/world_rwr.yaml"), "kl_key": "beta", "kl": [1]}}
    data["rewards"] = {"bright": {"models": ["brightness"], "use": "brightness"}}
    grid = validate(GridConfig, data)
    lines = []
    runner.run(grid, "grid.yaml", echo=lines.append)
    runner.run(grid, "grid.yaml", echo=lines.append)
    assert calls == [(200, False)] and lines[-2] == "cell 1/1 rwr-bright-kl1-s0: finished before, skipped"

    grid = validate(GridConfig, {**data, "overrides": {**data["overrides"], "max_steps": 300}})
    with pytest.raises(
        ConfigError,
        match=r"cell 1/1 rwr-bright-kl1-s0: finished under another config "
        r"\(config\.max_steps: 200 -> 300\)",
    ):
        runner.run(grid, "grid.yaml", echo=lines.append)
    runner.run(grid, "grid.yaml", allow_provenance_change=True, echo=lines.append)
    assert calls == [(200, False), (300, True)]
    assert json.loads((tmp_path / "g/cells/rwr-bright-kl1-s0/done.json").read_text())["config"]["max_steps"] == 300
