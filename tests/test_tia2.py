"""TIA2: label conventions, statistics, and `tia2 eval` end to end under Ray on tiny models."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydantic import ValidationError
from scipy import stats as sps
from sklearn.metrics import average_precision_score, roc_auc_score

from tn_ray.cli import main
from tn_ray.data import tia2
from tn_ray.errors import InputError
from tn_ray.experiments.tia2_eval import Tia2EvalConfig, run
from tn_ray.scoring.matrix import ScoreMatrix, model_slug
from tn_ray.textnorm.columns import EnsembleSpec, SetParams

MODELS = ["clip:tiny", "pickscore:tiny"]


def test_label_conventions_match_the_readme(tia2_dir):
    raw = json.loads((tia2_dir / "human_annotations/human_labels_counting.json").read_text())
    df = tia2.load_labels("counting", tia2_dir)
    assert len(df) == len(raw) == 7500
    for name, rec in list(raw.items())[:500]:
        row = df[df["image_id"] == name].iloc[0]
        labels = rec["human_labels"]
        assert row["binary"] == int(labels.count(1) >= 2)
        assert row["fine"] == pytest.approx(np.mean([0.5 if x == -1 else x for x in labels]))


def test_stats(tia2_dir, tmp_path):
    per_set, sub = tia2.stats(tia2_dir)
    assert per_set.set_index("set").loc["all", "images"] == 27500
    assert per_set.set_index("set").loc["all", "prompts"] == 550
    assert per_set.set_index("set")["prompts"].to_dict() == {
        "comprehensive": 100,
        "counting": 150,
        "composition": 300,
        "all": 550,
    }
    assert sub["images"].sum() == 5000
    assert main(["tia2", "stats", "--tia2-dir", str(tia2_dir), "--out", str(tmp_path / "s.md")]) == 0
    text = (tmp_path / "s.md").read_text()
    assert "| counting      |       150 |     7500 |    43.27 |   56.73 |" in text  # the paper's two decimals
    assert "| comprehensive |       100 |     5000 |    47.22 |   52.78 |" in text and "| 39.00 |" not in text


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tia2_dir):
    """A TIA2-layout image folder for the first 2 prompts of each set (random 32 px JPEGs)."""
    root = tmp_path_factory.mktemp("tia2_images")
    rng = np.random.default_rng(0)
    for s in tia2.SETS:
        labels = tia2.load_labels(s, tia2_dir)
        keep = labels[labels["prompt"].isin(labels["prompt"].drop_duplicates().iloc[:2])]
        (root / s).mkdir()
        for name in keep["image_id"]:
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / s / name)
    return root


def config(bench, out, **kw):
    base = dict(
        images=str(bench),
        out=str(out),
        models=MODELS,
        max_prompts=2,
        textnorm={"default": SetParams(tau=0.7, lam=2.0), "counting": SetParams(tau=0.3, lam=0.5)},
        ensembles=[
            EnsembleSpec(name="ens-mean", members=MODELS, kind="mean"),
            EnsembleSpec(name="ens-unc", members=MODELS, kind="uncertainty"),
        ],
    )
    base.update(kw)
    return Tia2EvalConfig(**base)


def independent_ap_at_k(labels, scores, k):
    """The benchmark's AP@k: sklearn's average precision on the k highest scores (ties at the cut
    by image order); 0 when they hold no good image."""
    top = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
    rel = [labels[i] for i in top]
    return average_precision_score(rel, [scores[i] for i in top]) if any(rel) else 0.0


@pytest.fixture(scope="module")
def first_run(bench, tmp_path_factory, ray_session, tia2_dir):
    out = tmp_path_factory.mktemp("eval")
    return out, run(config(bench, out))


def test_metrics_equal_sklearn_and_scipy_on_the_stored_matrices(first_run, tia2_dir):
    out, paths = first_run
    table = pd.read_parquet(paths["per_prompt"])
    matrices = {m: ScoreMatrix.load(out / "scores" / f"{model_slug(m)}.parquet") for m in MODELS}
    labels = pd.concat([tia2.load_labels(s, tia2_dir) for s in tia2.SETS])
    checked = 0
    for (set_name, prompt), g in table.groupby(["set", "prompt"]):
        lab = labels[(labels["set"] == set_name) & (labels["prompt"] == prompt)]
        cols = {}
        for m, mat in matrices.items():
            rows = mat.keys.reset_index().merge(lab[["set", "image_id"]], on=["set", "image_id"])["index"].to_numpy()
            v = mat.values[rows]
            tau = 0.3 if set_name == "counting" else 0.7
            e = np.exp((v - np.nanmax(v, axis=1, keepdims=True)) / tau)
            cols[m] = v[:, 0]
            cols[f"textnorm({m})"] = e[:, 0] / np.nansum(e, axis=1)
        tn = np.stack([cols[f"textnorm({m})"] for m in MODELS])
        lam = 0.5 if set_name == "counting" else 2.0
        cols["ens-mean"] = tn.mean(0)
        cols["ens-unc"] = tn.mean(0) - lam * tn.var(0)
        b, fine = lab["binary"].to_numpy(), lab["fine"].to_numpy()
        for _, r in g.iterrows():
            s = cols[r["reward"]]
            assert r["auroc"] == pytest.approx(roc_auc_score(b, s))
            assert r["auprc"] == pytest.approx(average_precision_score(b, s))
            for k in (5, 10, 25):
                assert r[f"ap@{k}"] == pytest.approx(independent_ap_at_k(list(b), s, k))
            assert r["spearman"] == pytest.approx(sps.spearmanr(s, fine)[0])
            assert r["kendall"] == pytest.approx(sps.kendalltau(s, fine)[0])
            checked += 1
    assert checked == len(table) >= 6 * 5  # every reward of every non-excluded prompt
    summary = pd.read_csv(paths["per_set_csv"])
    assert set(summary["reward"]) == {*MODELS, *(f"textnorm({m})" for m in MODELS), "ens-mean", "ens-unc"}
    assert paths["plot"].stat().st_size > 1000 and "## counting" in paths["per_set_md"].read_text()


def test_paper_rows_and_differences_over_the_evaluated_prompts(first_run, tia2_dir):
    out, paths = first_run
    table = pd.read_parquet(paths["per_prompt"])
    evaluated = {s: set(g["prompt"]) for s, g in table.groupby("set")}
    reference = pd.read_csv(paths["paper_per_set"])
    assert set(reference["reward"]) == {
        "release: clip",
        "release: blip2",
        "release: imagereward",
        "release: pickscore",
        "release: textnorm",
    }
    for (s, reward), row in reference.set_index(["set", "reward"]).iterrows():
        released = tia2.load_alignment_scores(s, tia2_dir)
        name = {"release: textnorm": "textnorm_mean" if s == "composition" else "textnorm_ur"}.get(
            reward, reward[len("release: ") :]
        )
        assert row["n_prompts"] == len(evaluated[s])
        assert row["ap@10"] == pytest.approx(np.mean([released[p][name]["ap10"] for p in evaluated[s]]), rel=1e-12)
    md = paths["per_set_md"].read_text()
    assert "| release: pickscore " in md and "| release: textnorm " in md
    diff = pd.read_csv(paths["paper_diff"])
    # clip:tiny and pickscore:tiny are compared with the paper's clip and pickscore, every metric, every prompt
    assert set(zip(diff["reward"], diff["paper_reward"])) == {
        ("clip:tiny", "release: clip"),
        ("pickscore:tiny", "release: pickscore"),
    }
    assert len(diff) == 2 * len(table[table["reward"] == "clip:tiny"]) * 7
    r = diff.iloc[0]
    ours = table[(table["set"] == r["set"]) & (table["prompt"] == r["prompt"]) & (table["reward"] == r["reward"])]
    assert r["ours"] == pytest.approx(ours[r["metric"]].iloc[0])
    key = r["metric"].replace("@", "")
    assert r["paper"] == tia2.load_alignment_scores(r["set"], tia2_dir)[r["prompt"]]["clip"][key]
    assert r["diff"] == pytest.approx(r["ours"] - r["paper"])


def test_rows_are_complete_score_matrices(first_run, tia2_dir):
    out, _ = first_run
    mat = ScoreMatrix.load(out / "scores" / f"{model_slug('clip:tiny')}.parquet")
    assert len(mat) == 300
    released = {s: tia2.load_prompt_sets(s, tia2_dir) for s in tia2.SETS}
    for i in range(0, 300, 37):
        s, p = mat.keys.loc[i, "set"], mat.keys.loc[i, "prompt"]
        assert mat.texts[i][0] == p and set(mat.texts[i][1:]) == set(released[s][p]) - {p}
        assert np.isfinite(mat.values[i, : len(mat.texts[i])]).all()


def test_rerun_computes_nothing_and_new_prompts_only_what_is_missing(first_run, bench, tia2_dir, tmp_path):
    out, paths = first_run
    run(config(bench, out))
    assert json.loads((out / "scoring_summary.json").read_text()) == {
        m: {"computed": 0, "cached": v["cached"]} for m, v in json.loads(paths["scoring_summary"].read_text()).items()
    }
    # one extra contrastive prompt for one counting prompt: only its 50 images are scored, once
    sets = {s: tia2.load_prompt_sets(s, tia2_dir) for s in tia2.SETS}
    first = tia2.load_labels("counting", tia2_dir)["prompt"].iloc[0]
    sets["counting"][first] = sets["counting"][first] + ["a photo of a purple elephant"]
    for s, d in sets.items():
        (tmp_path / f"{s}.json").write_text(json.dumps(d))
    run(
        config(bench, out, models=["clip:tiny"], ensembles=[], contrast=str(tmp_path / "{set}.json")),
        allow_provenance_change=True,
    )  # the same folder with other settings: said, and allowed
    assert json.loads((out / "scoring_summary.json").read_text())["clip:tiny"]["computed"] == 50


def test_bad_input_is_named_before_any_scoring(bench, tmp_path, monkeypatch, tia2_dir):
    import tn_ray.scoring.batch_scoring

    monkeypatch.setattr(
        tn_ray.scoring.batch_scoring, "score_matrices", lambda *a, **k: pytest.fail("scored despite bad input")
    )
    broken = tmp_path / "imgs"
    shutil.copytree(bench, broken)
    victims = sorted((broken / "counting").iterdir())[:3]
    for v in victims:
        v.unlink()
    with pytest.raises(InputError, match=r"3 of 300 images are missing .*'counting': 3"):
        run(config(broken, tmp_path / "o"))
    for v in victims:
        v.write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match="3 of 300 images .* cannot be read"):
        run(config(broken, tmp_path / "o"))
    with pytest.raises(ValidationError, match="members \\['clip'\\] are not among models"):  # fails as the config loads
        run(config(bench, tmp_path / "o", ensembles=[EnsembleSpec(name="e", members=["clip", "pickscore:tiny"])]))


def test_config_errors_name_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [clip:tiny]\nsets: [counting, counitng]\nbatch: 3\n")
    assert main(["tia2", "eval", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "key 'sets.1'" in err and "counitng" in err and "key 'batch': unknown key" in err
    bad.write_text("models: [clip:tiny, blip3]\n")
    assert main(["tia2", "eval", str(bad)]) == 2
    assert "unknown reward model 'blip3'" in capsys.readouterr().err


def test_release_params_need_the_papers_members_and_add_one_column_per_reading(bench, tmp_path, tia2_dir):
    from types import SimpleNamespace

    from tn_ray.analysis import metrics, paper
    from tn_ray.config import ConfigError, validate
    from tn_ray.experiments.tia2_eval import collect_items, reward_table

    with pytest.raises(ConfigError, match=r"release_params.*\['imagereward'\] not among models"):
        validate(Tia2EvalConfig, {"models": ["clip:tiny", "pickscore:tiny"], "release_params": ["temperature"]})
    cfg = config(
        bench,
        tmp_path,
        models=["imagereward:tiny", "pickscore:tiny"],
        ensembles=[],
        tia2_dir=str(tia2_dir),
        release_params=["temperature", "multiplier"],
    )
    items = collect_items(cfg)
    rng = np.random.default_rng(0)
    m = max(len(t) for t in items["texts"])
    matrices = {
        mod: SimpleNamespace(
            values=np.where(
                np.arange(m)[None] < items["texts"].map(len).to_numpy()[:, None],
                rng.normal(size=(len(items), m)) * 0.05,
                np.nan,
            )
        )
        for mod in cfg.models
    }
    table = reward_table(items, matrices, cfg)
    ranks = reward_table(items, matrices, cfg, ranking=True)
    params = paper.release_params(tia2_dir, cfg.sets)
    for reading in ("temperature", "multiplier"):
        name = paper.release_column_name(reading)
        covered = items.merge(params, on=["set", "prompt"], how="left")["scale"].notna().to_numpy()
        assert np.isfinite(table[name].to_numpy()[covered]).all() and np.isnan(table[name].to_numpy()[~covered]).all()
        per_prompt = metrics.per_prompt(ranks, [name])
        assert set(per_prompt["prompt"]) <= set(params["prompt"]) and len(per_prompt) > 0
