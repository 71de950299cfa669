"""The paper's published Table 2 and the benchmark authors' released per-prompt metrics as
reference rows (``table 2: clip``, ``release: clip``, ...), and the release's per-prompt TextNorm
parameters.

The released files (``alignment_scores/alignment_scores_<set>.json``, downloaded with the labels)
hold, per prompt with mixed labels, the metrics of every baseline reward and of TextNorm. They
are laid out here exactly as :func:`tn_ray.analysis.metrics.per_prompt` lays out a user's run
(one row per set, prompt and reward), so the project's own :func:`metrics.per_set` aggregates
them and a user's per-prompt table can be compared with them row by row.

Reward names: ``release: <released name>``, except TextNorm (``textnorm_ur``, the
uncertainty-regularised ensemble, for comprehensive and counting; ``textnorm_mean`` for
composition), which is ``release: textnorm`` in every set. The release's means are not all the
paper's: counting and composition agree with Table 2 to its 3 decimals (but composition's
TextNorm AUROC, 0.843 vs 0.844), comprehensive's TextNorm does not (AUROC 0.773 vs 0.788), so
:data:`TABLE2` holds the published figures and :func:`compare_table2` says where they differ.

A released TextNorm entry also carries the ensemble's per-prompt ``scale`` (all sets) and
``lambda`` (comprehensive, counting): :func:`release_params` reads them and
:func:`release_columns` evaluates TextNorm with them under either reading of ``scale``
(:func:`tn_ray.rewards.units.release_tau`).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from tn_ray.analysis import metrics
from tn_ray.data import tia2
from tn_ray.rewards.base import RewardSpec
from tn_ray.rewards.units import release_tau
from tn_ray.textnorm.columns import combine

log = logging.getLogger(__name__)

PREFIX = "release: "
TABLE2_PREFIX = "table 2: "
# Kim et al. (ICLR 2024), Table 2, as printed: per set, reward -> (AUROC, AUPRC, AP@5, AP@10, AP@25, Spearman, Kendall);
# prompts whose human labels are all identical are excluded. TextNorm = ImageReward + PickScore (Appendix A.3).
TABLE2: dict[str, dict[str, tuple[float, ...]]] = {
    "comprehensive": {"clip": (0.671, 0.611, 0.674, 0.667, 0.635, 0.235, 0.187),
                      "blip2": (0.683, 0.603, 0.648, 0.642, 0.616, 0.233, 0.185),
                      "imagereward": (0.761, 0.674, 0.755, 0.740, 0.708, 0.361, 0.289),
                      "pickscore": (0.747, 0.675, 0.779, 0.763, 0.706, 0.325, 0.258),
                      "textnorm": (0.788, 0.727, 0.841, 0.820, 0.765, 0.372, 0.298)},
    "counting": {"clip": (0.595, 0.522, 0.622, 0.600, 0.550, 0.136, 0.107),
                 "blip2": (0.565, 0.499, 0.570, 0.556, 0.519, 0.072, 0.056),
                 "imagereward": (0.657, 0.543, 0.611, 0.605, 0.570, 0.208, 0.166),
                 "pickscore": (0.731, 0.614, 0.711, 0.702, 0.650, 0.340, 0.273),
                 "textnorm": (0.807, 0.719, 0.877, 0.841, 0.763, 0.443, 0.356)},
    "composition": {"clip": (0.717, 0.607, 0.737, 0.699, 0.641, 0.431, 0.333),
                    "blip2": (0.613, 0.506, 0.579, 0.554, 0.516, 0.246, 0.186),
                    "imagereward": (0.774, 0.675, 0.785, 0.747, 0.699, 0.538, 0.423),
                    "pickscore": (0.785, 0.696, 0.848, 0.811, 0.741, 0.521, 0.407),
                    "textnorm": (0.844, 0.787, 0.944, 0.906, 0.828, 0.622, 0.495)},
}
TABLE2_PROMPTS = {"comprehensive": 100, "counting": 150, "composition": 300}  # C100, C150, C300 before exclusion
# the paper's TextNorm (Appendix A.3): ImageReward + PickScore, mean ensemble on composition, eq. 3 elsewhere
RELEASE_MEMBERS = ("imagereward", "pickscore")
RELEASE_KIND = {"composition": "mean", "default": "uncertainty"}
RENAMED = {"textnorm_ur": "textnorm", "textnorm_mean": "textnorm"}
METRIC_KEYS = {"auroc": "auroc", "auprc": "auprc", "ap5": "ap@5", "ap10": "ap@10", "ap25": "ap@25",
               "spearman": "spearman", "kendall": "kendall"}
assert set(METRIC_KEYS.values()) == set(metrics.METRICS)


def paper_name(released: str) -> str:
    return PREFIX + RENAMED.get(released, released)


def table2(sets: Iterable[str] = tia2.SETS) -> pd.DataFrame:
    """The paper's Table 2 in :func:`metrics.per_set`'s layout (``table 2: <reward>`` rows;
    ``n_prompts`` is unknown after the paper's exclusion of unanimous prompts: NaN)."""
    rows = [{"set": s, "reward": TABLE2_PREFIX + r, **dict(zip(metrics.METRICS, v)), "n_prompts": np.nan,
             "n_corr": np.nan} for s in tia2.check_sets(sets) for r, v in TABLE2[s].items()]
    return pd.DataFrame(rows, columns=["set", "reward", *metrics.METRICS, "n_prompts", "n_corr"])


def compare_table2(release: pd.DataFrame, tolerance: float = 0.00051) -> pd.DataFrame:
    """Where the release's means (``release: x`` rows of a :func:`per_set` table) differ from the
    published Table 2 by more than its rounding (``tolerance``): set, reward, metric, both values."""
    out = []
    for _, row in release.iterrows():
        name = row["reward"][len(PREFIX):]
        published = TABLE2.get(row["set"], {}).get(name)
        if published is None:
            continue
        for metric, value in zip(metrics.METRICS, published):
            if abs(row[metric] - value) > tolerance:
                out.append({"set": row["set"], "reward": name, "metric": metric, "release": row[metric],
                            "table 2": value, "diff": row[metric] - value})
    return pd.DataFrame(out, columns=["set", "reward", "metric", "release", "table 2", "diff"])


def release_params(root: Path, sets: Iterable[str] = tia2.SETS) -> pd.DataFrame:
    """The release's per-prompt TextNorm parameters: set, prompt, ``scale``, ``lam`` (0 for the
    mean ensemble of composition, which has no lambda) and ``kind``."""
    rows = []
    for set_name in tia2.check_sets(sets):
        source = f"{root}/alignment_scores/alignment_scores_{set_name}.json"
        kind = RELEASE_KIND.get(set_name, RELEASE_KIND["default"])
        for prompt, entry in tia2.load_alignment_scores(set_name, root).items():
            tn = next((v for k, v in entry.items() if k in RENAMED), None)
            if not isinstance(tn, dict) or "scale" not in tn or (kind == "uncertainty" and "lambda" not in tn):
                raise tia2.Tia2Error(f"{source}: prompt {prompt!r} has no TextNorm scale"
                                     f"{'' if kind == 'mean' else ' / lambda'}")
            rows.append({"set": set_name, "prompt": prompt, "scale": float(tn["scale"]),
                         "lam": float(tn.get("lambda", 0.0)) if kind == "uncertainty" else 0.0, "kind": kind})
    return pd.DataFrame(rows, columns=["set", "prompt", "scale", "lam", "kind"])


def release_column_name(reading: str) -> str:
    return f"textnorm[release params, scale as {reading}]"


def release_columns(rows: pd.DataFrame, values: Mapping[str, np.ndarray], params: pd.DataFrame,
                    readings: Iterable[str], ranking: bool = False) -> dict[str, np.ndarray]:
    """The paper's TextNorm (ImageReward + PickScore, :data:`RELEASE_KIND`) of each image with
    its prompt's released ``scale`` and ``lambda``, one column per reading of ``scale``.

    ``rows``: set and prompt per image; ``values``: score matrices by model spec, which must
    include one ImageReward and one PickScore (any weights). Images of prompts the release has
    no parameters for (unanimous labels) are NaN; ``ranking`` as in :func:`combine`."""
    members = [next(m for m in values if m.split(":")[0] == name) for name in RELEASE_MEMBERS]
    keyed = rows[["set", "prompt"]].merge(params, on=["set", "prompt"], how="left")
    known = keyed["scale"].notna().to_numpy()
    out = {}
    for reading in readings:
        col = np.full(len(rows), np.nan)
        for kind in ("mean", "uncertainty"):
            sel = known & (keyed["kind"] == kind).to_numpy()
            if not sel.any():
                continue
            scale = keyed["scale"].to_numpy()[sel]
            taus = [np.array([release_tau(x, m, reading) for x in scale]) for m in members]
            col[sel] = combine({m: np.asarray(values[m])[sel] for m in members}, members, taus, kind,
                               keyed["lam"].to_numpy()[sel], ranking=ranking)
        out[release_column_name(reading)] = col
    return out


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


def report(root: Path, sets: Iterable[str] = tia2.SETS) -> str:
    """``tn-ray tia2 paper``: per set, Table 2 as published beside the release's means, where they
    differ, and the release's per-prompt TextNorm parameters (how often each value is used)."""
    sets = tia2.check_sets(sets)
    release = per_set(root, sets)
    both = pd.concat([table2(sets), release], ignore_index=True)
    both = both.iloc[both["set"].map({s: i for i, s in enumerate(sets)}).argsort(kind="stable")]
    diff = compare_table2(release)
    params = release_params(root, sets)
    md = ["# TIA2: the paper's Table 2 and the released per-prompt metrics", "",
          "`table 2: x` rows are the paper's Table 2 as printed; `release: x` rows are the means of the authors'",
          "released per-prompt metrics (alignment_scores/) over the prompts with mixed labels. TextNorm is the",
          "paper's ensemble of ImageReward and PickScore (mean on composition, uncertainty-regularized elsewhere).", ""]
    for s, g in both.groupby("set", sort=False):
        n = int(release.loc[release["set"] == s, "n_prompts"].max())
        md += [
            f"## {s} ({n} prompts with mixed labels in the release; Table 2's C{TABLE2_PROMPTS[s]} before exclusion)",
            "",
            g.drop(columns=["set"]).to_markdown(index=False, floatfmt=".3f"),
            "",
        ]
        d = diff[diff["set"] == s]
        md += (
            [
                f"Release vs Table 2 beyond rounding: {len(d)} value(s).",
                "",
                d.drop(columns=["set"]).to_markdown(index=False, floatfmt=".4f"),
                "",
            ]
            if len(d)
            else ["The release's means equal Table 2 to its three decimals.", ""]
        )
        p = params[params["set"] == s]
        md += [
            f"Per-prompt TextNorm parameters of the release ({p['kind'].iloc[0]} ensemble): "
            f"scale {', '.join(f'{k:g} x{v}' for k, v in p['scale'].value_counts().sort_index().items())}"
            + (
                ""
                if p["kind"].iloc[0] == "mean"
                else f"; lambda {', '.join(f'{k:g} x{v}' for k, v in p['lam'].value_counts().sort_index().items())}"
            )
            + ". `tn-ray tia2 eval --release-params` evaluates TextNorm with them (docs/tia2.md).",
            "",
        ]
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
        long_mine = mine.melt(
            id_vars=["set", "prompt"], value_vars=list(metrics.METRICS), var_name="metric", value_name="ours"
        )
        long_theirs = theirs.melt(
            id_vars=["set", "prompt"], value_vars=list(metrics.METRICS), var_name="metric", value_name="paper"
        )
        both = long_mine.merge(long_theirs, on=["set", "prompt", "metric"], how="inner")
        frames.append(both.assign(reward=model, paper_reward=released, diff=both["ours"] - both["paper"]))
    cols = ["set", "prompt", "reward", "paper_reward", "metric", "ours", "paper", "diff"]
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)
