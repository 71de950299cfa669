"""``tn-ray study`` (docs/study.md): the dry run's grid and counted cost with no Ray, bad input named in one line
before Ray starts, and the tiny study (one best-of-n run of 2 cells + one RWR cell, tiny pipeline) killed after its
best-of-n run, resumed with --resume without rerunning it, and reported with the cells' own numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from cli_output import cli_stderr

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "sweeps" / "study_tiny.yaml"


@pytest.fixture
def no_ray(monkeypatch):
    import tn_ray.cluster

    def refuse(*a, **k):
        raise AssertionError("Ray started")

    monkeypatch.setattr(tn_ray.cluster, "init_ray", refuse)
    monkeypatch.chdir(REPO)  # the studies name their base configs from the repository root


def test_dry_run_prints_runs_and_counted_cost_and_starts_nothing(tmp_path, capsys, no_ray):
    import ray

    from tn_ray.cli import main

    out = tmp_path / "s"
    was_up = ray.is_initialized()
    assert main(["study", str(TINY), "--dry-run", "--set", f"out={out}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"study {out}: 2 runs, 3 cells (1 rewards x [bestofn (n [1, 4]); rwr (beta [0.5])]")
    assert lines[1].startswith("best-of-n run 1/1 bestofn-s0: bestofn (sweeps/bestofn_tiny.yaml), 2 cells")
    assert lines[1].endswith("4 images, 0 eval images, ~0 s: new")
    assert lines[2].startswith("cell 1/1 rwr-clip-kl0.5-s0: rwr")
    assert lines[2].endswith("4 images, 2 eval images, ~0 s: new")
    # counted by hand: best-of-n 1 prompt x 4 samples x 3 steps = 12 image-steps, 4 images x 2 models scored; RWR
    # 4 images x 3 steps + (base + 1 evaluation) x 1 prompt x 1 seed x 3 steps = 18, 1 step x batch 2 trained,
    # 4 x 1 model + 2 eval images x 2 models scored; 30 x 0.01 + 2 x 0.03 + 16 x 0.005 = 0.44 s
    assert lines[-1] == (
        "2 runs, 3 cells: 8 images sampled (30 image-steps with evaluation), 1 optimizer steps (2 trained "
        "image-steps), 2 evaluation images, 16 reward scores; estimated 0 s on 2 CPU cores (image_step_s 0.01, "
        "train_step_s 0.03, score_s 0.005)"
    )
    assert not out.exists() and ray.is_initialized() == was_up


@pytest.mark.parametrize(
    ("name", "runs", "cells", "hours"),
    [
        ("study_world", 21, 45, " h on 2 CPU cores (image_step_s 0.035"),
        ("study_world_grpo", 3, 3, " s on 2 CPU cores (image_step_s 0.035"),
        ("study_sd21", 93, 135, "on 1 A100 GPU (estimated)"),
    ],
)
def test_shipped_studies_validate_and_price(name, runs, cells, hours, tmp_path, capsys, no_ray):
    from tn_ray.cli import main

    assert main(["study", f"sweeps/{name}.yaml", "--dry-run", "--set", f"out={tmp_path / 's'}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith(f"{runs} runs, {cells} cells: ") and hours in lines[-1]
    assert len(lines) == runs + 2


def write(tmp_path: Path, change: dict) -> str:
    from tn_ray.config import apply_overrides

    data = apply_overrides(yaml.safe_load(TINY.read_text()), change)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**data, "out": str(tmp_path / "s")}))
    return str(path)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"rewards.clip": {"models": ["clip:tiny"], "use": "pickscore:tiny"}},
            "key 'rewards.clip': use: 'pickscore:tiny' is not a reward column of this config",
        ),
        ({"methods.bestofn.kl": [0, 1]}, "methods.bestofn.kl: best-of-n has no KL coefficient"),
        ({"methods.rwr.kl": None}, "methods.rwr.kl: rwr needs its KL grid"),
        ({"methods.rwr.n": [4]}, "methods.rwr.n: an n list is for best-of-n; rwr takes a KL grid"),
        ({"methods.bestofn.overrides.pools": [8]}, "methods.bestofn.overrides: 'pools' is set per run by the study"),
        ({"truth": "nomodel"}, "truth: unknown reward model 'nomodel'"),
        (
            {"methods.bestofn.overrides.generation": {"samples_per_prompt": 2}},
            "methods.bestofn.n: n = 4 is larger than the samples per prompt (generation.samples_per_prompt = 2",
        ),
        (
            {
                "rewards.tn": {"models": ["clip:tiny"], "use": "textnorm(clip:tiny)", "contrast": "rules"},
                "rewards.tn2": {"models": ["pickscore:tiny"], "use": "textnorm(pickscore:tiny)", "contrast": "world"},
            },
            "rewards.tn2.contrast: 'world' differs from rewards.tn.contrast 'rules'",
        ),
        ({"methods.bestofn.config": "sweeps/nothing.yaml"}, "methods.bestofn.config: config file not found"),
    ],
)
def test_bad_input_is_one_line_naming_it_before_ray_starts(change, expected, tmp_path, capsys, no_ray):
    from tn_ray.cli import main

    assert main(["study", write(tmp_path, change)]) != 0
    err = cli_stderr(capsys).strip()
    assert expected in err and "\n" not in err, err
    assert not (tmp_path / "s").exists()


# --- the tiny study, killed and resumed (Ray) -------------------------------------------------------------


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_a_killed_study_resumes_without_rerunning_finished_runs_and_reports_their_numbers(
    ray_session, study_runs, tmp_path, monkeypatch, capsys
):
    from tn_ray.cli import main

    study_runs.kill("rwr")  # the study killed as its RWR cell starts
    monkeypatch.chdir(REPO)
    out = tmp_path / "s"
    argv = ["study", str(TINY), "--set", f"out={out}"]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "1 of 2 runs failed (rwr-clip-kl0.5-s0: killed while this cell starts)" in err and "--resume" in err
    assert study_runs.counts() == {"bestofn": 1, "rwr": 1}
    run_dir, cell_dir = out / "cells" / "bestofn-s0", out / "cells" / "rwr-clip-kl0.5-s0"
    assert (run_dir / "done.json").is_file() and not (cell_dir / "done.json").exists()
    assert (out / "tune" / "attempt-1").is_dir()  # the runs were the trials of one Tune experiment

    assert main(argv) != 0  # without --resume a started study is refused, naming the flag
    assert "add --resume to continue the study" in capsys.readouterr().err

    study_runs.revive("rwr")
    before = _mtimes(run_dir)
    assert main([*argv, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "best-of-n run 1/1 bestofn-s0: finished before, skipped" in printed
    assert "cell 1/1 rwr-clip-kl0.5-s0: starting" in printed
    assert "cell 1/1 rwr-clip-kl0.5-s0: done in" in printed
    assert study_runs.counts() == {"bestofn": 1, "rwr": 2} and _mtimes(run_dir) == before
    assert (out / "tune" / "attempt-2" / "rwr-clip-kl0.5-s0").is_dir()  # a second experiment, of the one run left

    before = _mtimes(out / "cells")
    assert main([*argv, "--resume"]) == 0
    assert study_runs.counts() == {"bestofn": 1, "rwr": 2} and _mtimes(out / "cells") == before
    assert not (out / "tune" / "attempt-3").exists()  # nothing left to run: no experiment
    capsys.readouterr()

    # the report's numbers are the cells' own: best-of-n per seed = the run's summary.csv (brightness of clip:tiny's
    # pick at each n); RWR = the truth's mean over the cell's evaluation images at the base model and selected step
    md = (out / "report.md").read_text()
    summary = pd.read_csv(run_dir / "summary.csv")
    per_seed = pd.read_csv(out / "bestofn_cells.csv")
    rows = pd.read_csv(out / "bestofn.csv")
    assert sorted(per_seed["n"]) == [1, 4] and len(rows) == 2
    for n in (1, 4):
        own = summary[(summary["selector"] == "clip:tiny") & (summary["judge"] == "brightness") & (summary["n"] == n)]
        mine = per_seed[(per_seed["reward"] == "clip") & (per_seed["n"] == n)]["truth"]
        np.testing.assert_allclose(mine.to_numpy(), own["mean"].to_numpy()[:1], rtol=1e-12)
        row = rows[rows["n"] == n].iloc[0]
        assert row["truth"] == pytest.approx(float(mine.iloc[0]), rel=1e-12) and f"| {row['truth']:.3f} " in md
    report = pd.read_csv(out / "report.csv").iloc[0]
    selected = json.loads((cell_dir / "selection.json").read_text())["paper_rule_step"]
    at_step = pd.read_parquet(cell_dir / f"eval/scores/step-{selected:06d}.parquet")
    base = pd.read_parquet(cell_dir / "eval/base.parquet")
    assert report["truth_selected"] == pytest.approx(at_step.loc[at_step["reward"] == "brightness", "value"].mean())
    assert report["truth_base"] == pytest.approx(base.loc[base["reward"] == "brightness", "value"].mean())
    assert "1 of 1 fine-tuning cells finished" in md and "Best-of-n: 1 of 1 runs finished" in md
    assert (out / "truth_vs_n.png").stat().st_size > 0 and (out / "accuracy_vs_step.png").stat().st_size > 0


def test_bestofn_tables_equal_an_independent_recomputation():
    """study_report.table and .versus on hand-made picks: means over seeds of per-seed means, paired differences
    from the smallest n, the random image and the first reward row, bootstrap CIs as scipy computes them."""
    from scipy import stats

    from tn_ray.analysis import study_report as sr

    rng = np.random.default_rng(4)
    units = [(s, p) for s in (0, 1) for p in range(5)]
    pool = {u: rng.uniform(0.2, 0.6) for u in units}
    picks = pd.DataFrame(
        [
            {
                "method": "bestofn",
                "reward": r,
                "n": n,
                "seed": s,
                "prompt_id": p,
                "truth": float(rng.integers(0, 2)),
                "truth_pool": pool[(s, p)],
            }
            for r in ("raw", "tn")
            for n in (1, 4)
            for s, p in units
        ]
    ).sample(frac=1, random_state=1)  # row order must not matter

    def ci(d):
        d = np.asarray(d, dtype=float)
        if np.ptp(d) == 0:
            return d.mean(), d.mean(), d.mean()
        res = stats.bootstrap(
            (d,), np.mean, confidence_level=0.9, n_resamples=500, method="percentile", rng=np.random.default_rng(2)
        ).confidence_interval
        return d.mean(), res.low, res.high

    def at(r, n):
        return picks[(picks["reward"] == r) & (picks["n"] == n)].set_index(["seed", "prompt_id"])["truth"].sort_index()

    rows = sr.table(picks, 0.9, 500, 2).set_index(["reward", "n"])
    pairs = sr.versus(picks, "raw", 0.9, 500, 2).set_index(["reward", "n"])
    for r in ("raw", "tn"):
        for n in (1, 4):
            got = rows.loc[(r, n)]
            assert got["truth"] == pytest.approx(at(r, n).groupby(level=0).mean().mean(), abs=1e-12)
            np.testing.assert_allclose(
                got[["vs_first", "vs_first_low", "vs_first_high"]].to_numpy(dtype=float),
                ci(at(r, n) - at(r, 1)),
                atol=1e-12,
            )
            rand = at(r, n) - pd.Series(pool).rename_axis(["seed", "prompt_id"]).sort_index()
            np.testing.assert_allclose(
                got[["vs_pool", "vs_pool_low", "vs_pool_high"]].to_numpy(dtype=float), ci(rand), atol=1e-12
            )
            if r == "tn":
                np.testing.assert_allclose(
                    pairs.loc[("tn", n), ["diff", "low", "high"]].to_numpy(dtype=float),
                    ci(at("tn", n) - at("raw", n)),
                    atol=1e-12,
                )
    assert list(pairs.index) == [("tn", 1), ("tn", 4)] and set(pairs["pairs"]) == {10}
    md = sr.markdown(sr.table(picks, 0.9, 500, 2), "judge", 0.9, sr.versus(picks, "raw", 0.9, 500, 2))
    d = ci(at("tn", 4) - at("raw", 4))
    assert "### Each reward vs `raw` at the same n" in md and f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]" in md


def _two_rwr_cells(tmp_path: Path) -> str:
    """The tiny study without best-of-n and with two RWR cells of seed 0 (kl 0.5 and 1)."""
    data = yaml.safe_load(TINY.read_text())
    del data["methods"]["bestofn"]
    data["methods"]["rwr"]["kl"] = [0.5, 1]
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({**data, "out": str(tmp_path / "s")}))
    return str(path)


def test_rwr_cells_of_a_seed_share_one_generation_and_the_dry_run_counts_it_once(
    ray_session, tmp_path, monkeypatch, capsys
):
    from tn_ray.cli import main
    from tn_ray.experiments.study.config import load_study
    from tn_ray.experiments.study.plan import plan

    monkeypatch.chdir(REPO)
    config = _two_rwr_cells(tmp_path)
    out = tmp_path / "s"
    first, second = plan(load_study(config))
    shared = first.config.generation.out
    assert shared == second.config.generation.out and shared.startswith(str(out / "shared" / "rwr-generation-seed0-"))
    assert first.config.cache_dir == second.config.cache_dir == str(out / "shared" / "rwr-cache")
    # another generation block (here: its steps) is another folder, never the same one
    other = plan(load_study(config, {"methods.rwr.overrides.generation.num_inference_steps": 2}))[0]
    assert other.config.generation.out != shared

    # dry run: the second cell's generation is counted 0 times, its training images' scores too (cached)
    assert main(["study", config, "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].endswith("4 images, 2 eval images, ~0 s: new")
    assert lines[2].endswith("0 images (reuses rwr-clip-kl0.5-s0's generation), 2 eval images, ~0 s: new")
    # 4 images x 3 steps once + 2 x (base + 1 evaluation) x 3 steps = 24 image-steps; 4 x 1 model once + 2 x 2 eval
    # images x 2 models = 12 scores; 2 x 2 trained image-steps; 24 x 0.01 + 4 x 0.03 + 12 x 0.005 = 0.42 s
    assert lines[-1] == (
        "2 runs, 2 cells: 4 images sampled (24 image-steps with evaluation), 2 optimizer steps (4 trained "
        "image-steps), 4 evaluation images, 12 reward scores; estimated 0 s on 2 CPU cores (image_step_s 0.01, "
        "train_step_s 0.03, score_s 0.005)"
    )

    # each run is a Tune trial in its own process: the wrapper (pickled by value) counts, in that process, the images
    # each run's generation makes and the scores it computes, into a file
    from tn_ray.experiments.study import runner

    log = tmp_path / "counts.jsonl"

    def counted_run(cell, allow_provenance_change=False, _run=runner.run_cell, _log=str(log)):
        import json as _json

        import tn_ray.diffusion.generation as generation
        import tn_ray.scoring.batch_scoring as batch_scoring

        prepare, score = generation.prepare, batch_scoring.score_into_cache

        def record(*row):
            with open(_log, "a") as f:
                f.write(_json.dumps(row) + "\n")

        def counted_prepare(prompts, cfg):
            store, wanted, todo = prepare(prompts, cfg)
            record("made", cfg.out, len(todo))
            return store, wanted, todo

        def counted_score(*a, **k):
            n = score(*a, **k)
            record("scored", n)
            return n

        generation.prepare, batch_scoring.score_into_cache = counted_prepare, counted_score
        try:
            return _run(cell, allow_provenance_change)
        finally:
            generation.prepare, batch_scoring.score_into_cache = prepare, score

    monkeypatch.setattr(runner, "run_cell", counted_run)
    assert main(["study", config]) == 0
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    made = [tuple(r[1:]) for r in rows if r[0] == "made"]
    computed = [r[1] for r in rows if r[0] == "scored"]
    assert made == [(shared, 4), (shared, 0)]  # the second cell makes 0 new images
    assert computed[0] == 4 and computed[1] == 0  # and scores none: the shared cache has them
    frames = [pd.read_parquet(out / "cells" / c / "data.parquet") for c in ("rwr-clip-kl0.5-s0", "rwr-clip-kl1-s0")]
    assert frames[0]["image"].tolist() == frames[1]["image"].tolist()  # built from the same images
    assert all(p.startswith(shared) for p in frames[0]["image"])
    pd.testing.assert_frame_equal(frames[0], frames[1])  # one reward: the same kept images and weights
    assert not any((out / "cells" / c / "generation").exists() for c in ("rwr-clip-kl0.5-s0", "rwr-clip-kl1-s0"))
    # the base model's evaluation images: generated by the first cell into shared/eval-base/<tag>/ (written once,
    # before the first cell finished), read by the second; each cell keeps its own copy in eval/base/
    tags = list((out / "shared" / "eval-base").iterdir())
    assert len(tags) == 1
    shared_pngs = sorted(tags[0].glob("*.png"))
    first_done = (out / "cells" / "rwr-clip-kl0.5-s0" / "done.json").stat().st_mtime_ns
    assert shared_pngs and all(p.stat().st_mtime_ns < first_done for p in shared_pngs)
    for c in ("rwr-clip-kl0.5-s0", "rwr-clip-kl1-s0"):
        own = out / "cells" / c / "eval" / "base"
        assert [p.read_bytes() for p in shared_pngs] == [(own / p.name).read_bytes() for p in shared_pngs]
    assert len(list((Path(shared) / "images").rglob("*.png"))) == 4


def test_fine_tuning_cells_share_base_images_only_when_identical(tmp_path):
    """Every fine-tuning cell of a study reads / writes its base model's evaluation images under
    <out>/shared/eval-base/<tag>: the tag is equal across rewards, KL values and LoRA settings (the base model is
    the policy with adapters disabled) and differs when the images would (evaluation steps, seeds, pipeline)."""
    from tn_ray.experiments.study.config import load_study
    from tn_ray.experiments.study.plan import plan
    from tn_ray.training.evaluation import base_images_tag, eval_prompts

    config = _two_rwr_cells(tmp_path)
    first, second = plan(load_study(config))

    def tag(cell):
        return base_images_tag(cell.config, eval_prompts(cell.config, cell.config.prompts or []))

    assert first.config.eval.base_images == second.config.eval.base_images == str(tmp_path / "s/shared/eval-base")
    assert tag(first) == tag(second)
    same = first.config.model_copy(update={"policy": first.config.policy.model_copy(
        update={"lora": first.config.policy.lora.model_copy(update={"rank": 64})})})
    assert base_images_tag(same, ["a"]) == base_images_tag(first.config, ["a"])
    for change in ({"num_inference_steps": 9}, {"seeds": [1, 2]}, {"guidance_scale": 1.0}):
        other = first.config.model_copy(update={"eval": first.config.eval.model_copy(update=change)})
        assert base_images_tag(other, ["a"]) != base_images_tag(first.config, ["a"]), change
    assert base_images_tag(first.config, ["b"]) != base_images_tag(first.config, ["a"])


def test_a_grpo_cell_runs_in_a_study_and_the_report_holds_its_numbers(ray_session, tmp_path, monkeypatch, capsys):
    """A GRPO cell (tiny-sd3, ``sweeps/grpo_tiny.yaml``, 1 epoch) through the study's own path: a Tune trial, the
    cell's evaluation with the truth added as its held-out judge, and the report's truth equal to the cell's own
    evaluation files."""
    from tn_ray.cli import main

    monkeypatch.chdir(REPO)
    out = tmp_path / "s"
    study = {
        "out": str(out), "truth": "brightness",
        "methods": {"grpo": {"config": "sweeps/grpo_tiny.yaml", "kl": [0.04]}},
        "rewards": {"clip": {"models": ["clip:tiny"], "use": "clip:tiny"}},
        "seeds": [0],
        "overrides": {"max_steps": 1, "eval": {"every": 1, "seeds": [0], "judges": []}, "checkpoint": {"every": 1}},
        "cost": {"device": "2 CPU cores", "image_step_s": 0.01, "train_step_s": 0.03, "score_s": 0.005},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    assert main(["study", str(path)]) == 0
    assert "cell 1/1 grpo-clip-kl0.04-s0: done in" in capsys.readouterr().out
    cell = out / "cells" / "grpo-clip-kl0.04-s0"
    assert (cell / "done.json").is_file() and (out / "tune" / "attempt-1").is_dir()
    report = pd.read_csv(out / "report.csv")
    assert list(report["method"]) == ["grpo"] and float(report["kl"].iloc[0]) == 0.04
    selected = json.loads((cell / "selection.json").read_text())["paper_rule_step"]
    at_step = pd.read_parquet(cell / f"eval/scores/step-{selected:06d}.parquet")
    base = pd.read_parquet(cell / "eval/base.parquet")
    truth = at_step.loc[at_step["reward"] == "brightness", "value"]
    assert len(truth) == 2  # 2 prompts x 1 eval seed, scored by the truth the study added
    assert report["truth_selected"].iloc[0] == pytest.approx(truth.mean())
    assert report["truth_base"].iloc[0] == pytest.approx(base.loc[base["reward"] == "brightness", "value"].mean())
    assert "| grpo " in (out / "report.md").read_text()
