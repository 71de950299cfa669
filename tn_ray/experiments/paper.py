"""The benchmark authors' released per-prompt metrics as reference rows (``paper: clip``, ...).

The released files (``alignment_scores/alignment_scores_<set>.json``, downloaded with the labels)
hold, per prompt with mixed labels, the metrics of every baseline reward and of TextNorm. They
are laid out here exactly as :func:`tn_ray.experiments.metrics.per_prompt` lays out a user's run
(one row per set, prompt and reward), so the project's own :func:`metrics.per_set` aggregates
them and a user's per-prompt table can be compared with them row by row.

Reward names: ``paper: <released name>``, except TextNorm (``textnorm_ur``, the
uncertainty-regularised ensemble, for comprehensive and counting; ``textnorm_mean`` for
composition), which is ``paper: textnorm`` in every set. Other keys of a released entry (the
TextNorm ensemble's ``scale`` and ``lambda``) are its parameters, not metrics, and are left out.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

from tn_ray.data import tia2
from tn_ray.experiments import metrics
from tn_ray.rewards.base import RewardSpec

log = logging.getLogger(__name__)

PREFIX = "paper: "
RENAMED = {"textnorm_ur": "textnorm", "textnorm_mean": "textnorm"}
METRIC_KEYS = {"auroc": "auroc", "auprc": "auprc", "ap5": "ap@5", "ap10": "ap@10", "ap25": "ap@25",
               "spearman": "spearman", "kendall": "kendall"}
assert set(METRIC_KEYS.values()) == set(metrics.METRICS)


def paper_name(released: str) -> str:
    return PREFIX + RENAMED.get(released, released)


def prompt_table(root: Path, sets: Iterable[str] = tia2.SETS,
                 prompts: Mapping[str, Iterable[str]] | None = None, strict: bool = True) -> pd.DataFrame:
    """The released metrics, one row per (set, prompt, reward) in :func:`metrics.per_prompt`'s
    columns, prompts in label-file order; prompts with unanimous labels are excluded (as the
    benchmark and :func:`metrics.per_prompt` do). ``prompts``: per set, keep only these.
    A prompt with mixed labels but no released metrics is an error, or with ``strict=False``
    leaves its whole set out (a warning): reference rows over other prompts than the user's
    would not be comparable."""
    rows = []
    for set_name in tia2.check_sets(sets):
        labels = tia2.load_labels(set_name, root)
        by_prompt = labels.groupby("prompt", sort=False)["binary"]
        n_images = by_prompt.size()
        mixed = [p for p, lo, hi in zip(n_images.index, by_prompt.min(), by_prompt.max()) if lo != hi]
        if prompts is not None:
            wanted = set(prompts.get(set_name, ()))
            mixed = [p for p in mixed if p in wanted]
        released = tia2.load_alignment_scores(set_name, root)
        source = f"{root}/alignment_scores/alignment_scores_{set_name}.json"
        absent = [p for p in mixed if p not in released]
        if absent and not strict:
            log.warning("%s: %d evaluated prompt(s) have no released metrics (e.g. %r): no paper rows for set '%s'",
                        source, len(absent), absent[0], set_name)
            continue
        if absent:
            raise tia2.Tia2Error(f"{source}: {len(absent)} prompt(s) with mixed labels have no released metrics, "
                                 f"e.g. {absent[0]!r}")
        for prompt in mixed:
            for reward, values in released[prompt].items():
                if reward == "human":
                    continue
                if not isinstance(values, dict) or not set(METRIC_KEYS) <= set(values):
                    raise tia2.Tia2Error(f"{source}: prompt {prompt!r}, reward {reward!r} has keys "
                                         f"{sorted(values) if isinstance(values, dict) else values!r}; "
                                         f"expected at least {sorted(METRIC_KEYS)}")
                rows.append({"set": set_name, "prompt": prompt, "reward": paper_name(reward),
                             "n_images": int(n_images[prompt]),
                             **{name: float(values[key]) for key, name in METRIC_KEYS.items()}})
    return pd.DataFrame(rows, columns=["set", "prompt", "reward", "n_images", *metrics.METRICS])


def per_set(root: Path, sets: Iterable[str] = tia2.SETS,
            prompts: Mapping[str, Iterable[str]] | None = None) -> pd.DataFrame:
    """The reference rows: :func:`metrics.per_set` of :func:`prompt_table`."""
    return metrics.per_set(prompt_table(root, sets, prompts))


def markdown(table: pd.DataFrame, title: str) -> str:
    """Per-set Markdown tables (one section per set) of a :func:`metrics.per_set` table."""
    md = [f"# {title}", ""]
    for s, g in table.groupby("set", sort=False):
        md += [f"## {s} ({int(g['n_prompts'].max())} prompts)", "",
               g.drop(columns=["set"]).to_markdown(index=False, floatfmt=".3f"), ""]
    return "\n".join(md)


def differences(ours: pd.DataFrame, paper: pd.DataFrame, models: Iterable[str]) -> pd.DataFrame:
    """Per prompt and metric, a user's value next to the released one, for every evaluated model
    whose registry name the release also has (``clip``, ``clip:tiny``, ``clip:/path`` all compare
    with ``paper: clip``; the ``reward`` column says which was used). ``diff`` = ours - paper."""
    frames = []
    for model in models:
        released = paper_name(RewardSpec.parse(model).name)
        mine = ours[ours["reward"] == model]
        theirs = paper[paper["reward"] == released]
        if mine.empty or theirs.empty:
            continue
        long_mine = mine.melt(id_vars=["set", "prompt"], value_vars=list(metrics.METRICS), var_name="metric", value_name="ours")
        long_theirs = theirs.melt(id_vars=["set", "prompt"], value_vars=list(metrics.METRICS), var_name="metric", value_name="paper")
        both = long_mine.merge(long_theirs, on=["set", "prompt", "metric"], how="inner")
        frames.append(both.assign(reward=model, paper_reward=released, diff=both["ours"] - both["paper"]))
    cols = ["set", "prompt", "reward", "paper_reward", "metric", "ours", "paper", "diff"]
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)
