"""The paper's reference rows: the authors' released per-prompt metrics, averaged per set."""
import json
import math
import re

import pytest

from tn_ray.cli import main
from tn_ray.data import tia2
from tn_ray.experiments import paper

RELEASED_METRICS = {"auroc": "auroc", "auprc": "auprc", "ap5": "ap@5", "ap10": "ap@10", "ap25": "ap@25",
                    "spearman": "spearman", "kendall": "kendall"}


def independent_means(tia2_dir, set_name):
    """From the raw files: prompts whose binary labels (>= 2 of 3 say 1) are not unanimous, then
    the plain mean of every released metric over them, per released reward."""
    raw = json.loads((tia2_dir / f"human_annotations/human_labels_{set_name}.json").read_text())
    binary: dict[str, set] = {}
    for rec in raw.values():
        binary.setdefault(rec["caption"], set()).add(int(list(rec["human_labels"]).count(1) >= 2))
    mixed = [p for p, values in binary.items() if len(values) == 2]
    released = json.loads((tia2_dir / f"alignment_scores/alignment_scores_{set_name}.json").read_text())
    rewards = [r for r in released[mixed[0]] if r != "human"]
    return len(mixed), {r: {name: math.fsum(released[p][r][key] for p in mixed) / len(mixed)
                            for key, name in RELEASED_METRICS.items()} for r in rewards}


def test_reference_rows_reproduce_the_released_means(tia2_dir):
    table = paper.per_set(tia2_dir)
    assert list(table["set"].unique()) == list(tia2.SETS)
    for set_name in tia2.SETS:
        n, means = independent_means(tia2_dir, set_name)
        rows = table[table["set"] == set_name].set_index("reward")
        textnorm = "textnorm_mean" if set_name == "composition" else "textnorm_ur"
        assert sorted(rows.index) == sorted(f"paper: {'textnorm' if r == textnorm else r}" for r in means)
        assert {"paper: clip", "paper: pickscore", "paper: textnorm"} <= set(rows.index)
        for reward, values in means.items():
            row = rows.loc[paper.paper_name(reward)]
            assert row["n_prompts"] == n
            for name, want in values.items():
                assert row[name] == pytest.approx(want, rel=1e-13, abs=1e-15), (set_name, reward, name)


def test_paper_command_prints_the_table(tia2_dir, tmp_path, capsys):
    assert main(["tia2", "paper", "--tia2-dir", str(tia2_dir), "--sets", "counting", "--out", str(tmp_path / "p.md")]) == 0
    printed = capsys.readouterr().out
    text = (tmp_path / "p.md").read_text()
    assert text in printed and "## counting (146 prompts)" in text and "composition" not in text
    _, means = independent_means(tia2_dir, "counting")
    assert re.search(rf"\| paper: pickscore +\| +{means['pickscore']['auroc']:.3f} \|", text)


def test_a_subset_of_prompts_gives_rows_over_that_subset(tia2_dir):
    labels = tia2.load_labels("composition", tia2_dir)
    chosen = list(labels["prompt"].drop_duplicates().iloc[:7])
    table = paper.prompt_table(tia2_dir, ["composition"], {"composition": chosen})
    released = tia2.load_alignment_scores("composition", tia2_dir)
    kept = [p for p in chosen if p in released]
    assert list(table["prompt"].unique()) == kept and len(table) == 5 * len(kept)
    row = table[(table["prompt"] == kept[0]) & (table["reward"] == "paper: clip")].iloc[0]
    assert row["ap@10"] == released[kept[0]]["clip"]["ap10"] and row["n_images"] == 50


def test_a_malformed_release_is_named(tia2_dir, tmp_path):
    root = tmp_path / "tia2"
    (root / "alignment_scores").mkdir(parents=True)
    (root / "human_annotations").symlink_to(tia2_dir / "human_annotations")
    released = tia2.load_alignment_scores("counting", tia2_dir)
    first = next(iter(released))
    broken = {**released, first: {**released[first], "clip": {"auroc": 0.5}}}
    (root / "alignment_scores/alignment_scores_counting.json").write_text(json.dumps(broken))
    with pytest.raises(tia2.Tia2Error, match=r"alignment_scores_counting.json: prompt .* reward 'clip' has keys \['auroc'\]"):
        paper.prompt_table(root, ["counting"])
    del broken[first]
    (root / "alignment_scores/alignment_scores_counting.json").write_text(json.dumps(broken))
    tia2.load_alignment_scores.cache_clear()
    with pytest.raises(tia2.Tia2Error, match="1 prompt.* with mixed labels have no released metrics"):
        paper.prompt_table(root, ["counting"])
    # tia2 eval (strict=False): a set whose evaluated prompts the release does not all cover has no
    # reference rows (other prompts' means would not be comparable); the other sets keep theirs
    table = paper.prompt_table(root, ["counting"], strict=False)
    assert table.empty
    (root / "alignment_scores/alignment_scores_composition.json").symlink_to(
        tia2_dir / "alignment_scores/alignment_scores_composition.json")
    table = paper.prompt_table(root, ["counting", "composition"], strict=False)
    assert set(table["set"]) == {"composition"} and len(table) == len(paper.prompt_table(tia2_dir, ["composition"]))
