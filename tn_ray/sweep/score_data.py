"""Stored score matrices laid out for fast repeated evaluation (loaded once per sweep).

Two layouts, both "one padded row per prompt":

- :class:`LabelledScores` (TIA2-style, from ``tn-ray tia2 eval``): score matrices
  ``<run>/scores/<model_slug>.parquet`` joined with the human labels in
  ``<run>/rewards.parquet`` (or the ``binary``/``fine`` key columns of the matrices).
- :class:`BestOfNScores` (from a best-of-n run): per model ``<run>/scores/<model_slug>.parquet``
  with keys ``set='bestofn'``, ``prompt``, ``image_id``, ``prompt_id`` (int) and ``sample``
  (int, the sample's index within its prompt); a prompt's row holds its samples in order.

Nothing here computes a reward: every value comes from the stored matrices.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from sklearn.model_selection import KFold, StratifiedKFold

from tn_ray.scoring.matrix import KEY_COLUMNS, ScoreMatrix
from tn_ray.sweep.fast_metrics import gather, group_index

log = logging.getLogger(__name__)


def find_matrices(scores_dir: str | Path) -> dict[str, Path]:
    """``{model_id: file}`` for every score-matrix Parquet file in ``scores_dir``."""
    scores_dir = Path(scores_dir)
    if not scores_dir.is_dir():
        raise FileNotFoundError(f"score-matrix folder not found: {scores_dir}")
    found: dict[str, Path] = {}
    for path in sorted(scores_dir.glob("*.parquet")):
        try:
            col = pq.read_table(path, columns=["model"]).column(0)
        except Exception as err:  # not a score matrix (or unreadable): say which file
            raise ValueError(f"{path}: not a score-matrix file ({type(err).__name__}: {err})") from None
        if len(col):
            found[str(col[0].as_py())] = path
    if not found:
        raise FileNotFoundError(f"no score-matrix Parquet files in {scores_dir}")
    return found


def pick_models(available: dict[str, Path], wanted: Sequence[str] | None, what: str) -> list[str]:
    if wanted is None:
        return list(available)
    unknown = [m for m in wanted if m not in available]
    if unknown:
        raise ValueError(f"{what}: no score matrix for {unknown} in {next(iter(available.values())).parent}; "
                         f"available: {sorted(available)}")
    return list(wanted)


def stack_values(matrices: Sequence[ScoreMatrix]) -> np.ndarray:
    """(models, images, 1 + max m) NaN-padded, from aligned matrices."""
    width = max(m.values.shape[1] for m in matrices)
    out = np.full((len(matrices), len(matrices[0]), width), np.nan)
    for i, m in enumerate(matrices):
        out[i, :, : m.values.shape[1]] = m.values
    return out


def _fingerprint(*arrays: np.ndarray, extra: str = "") -> str:
    h = hashlib.sha1(extra.encode())
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _align(matrix: ScoreMatrix, keys: pd.DataFrame, path: Path) -> ScoreMatrix:
    try:
        return matrix.align(keys)
    except KeyError as err:
        raise ValueError(
            f"{path}: score matrix of {matrix.model} does not cover the requested rows ({err.args[0]})"
        ) from None


def assign_folds(
    n_groups: int, k: int, seed: int, strata: np.ndarray | None = None, eligible: np.ndarray | None = None
) -> np.ndarray:
    """Fold number per prompt (sklearn (Stratified)KFold, shuffled); -1 for ineligible prompts."""
    eligible = np.ones(n_groups, bool) if eligible is None else eligible
    idx = np.flatnonzero(eligible)
    if len(idx) < k:
        raise ValueError(f"held-out protocol: {k} folds need at least {k} usable prompts, found {len(idx)}")
    folds = np.full(n_groups, -1, dtype=np.int64)
    if strata is not None and np.bincount(strata[idx]).min() >= k:
        splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(idx, strata[idx])
    else:
        splits = KFold(n_splits=k, shuffle=True, random_state=seed).split(idx)
    for fold, (_, test) in enumerate(splits):
        folds[idx[test]] = fold
    return folds


def split_mask(folds: np.ndarray | None, fold: int | None, split: str) -> np.ndarray | None:
    """Prompts of ``split`` ('all', 'train': not in ``fold``, 'test': in ``fold``); None = all."""
    if split == "all" or fold is None:
        return None
    if folds is None:
        raise ValueError(f"split '{split}' needs folds, but this sweep's data has none (set `heldout:`)")
    return (folds != fold) & (folds >= 0) if split == "train" else folds == fold


@dataclass
class LabelledScores:
    models: list[str]
    values: np.ndarray  # (models, images, 1 + max m)
    index: np.ndarray  # (prompts, max images) image rows, -1 = padding
    binary: np.ndarray  # (prompts, max images) 0/1
    fine: np.ndarray  # (prompts, max images)
    prompt_set: np.ndarray  # (prompts,) index into `sets`
    sets: list[str]
    prompts: list[str]
    included: np.ndarray  # (prompts,) False where all binary labels are equal (no ranking to judge)
    folds: np.ndarray | None = None  # (prompts,) fold of each prompt, -1 = not in any fold
    fingerprint: str = ""
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def mask(self) -> np.ndarray:
        return self.index >= 0


def load_labelled(
    run_dir: str | Path,
    models: Sequence[str] | None = None,
    sets: Sequence[str] | None = None,
    labels: str | Path | None = None,
    folds: int | None = None,
    fold_seed: int = 0,
) -> LabelledScores:
    """Score matrices of ``tn-ray tia2 eval`` (``run_dir``) joined with their labels."""
    run_dir = Path(run_dir)
    available = find_matrices(run_dir / "scores")
    models = pick_models(available, models, "options.models")
    label_path = Path(labels) if labels else run_dir / "rewards.parquet"
    first = ScoreMatrix.load(available[models[0]])
    if label_path.is_file():
        frame = pd.read_parquet(label_path)
        source = str(label_path)
    elif labels:
        raise FileNotFoundError(f"label file not found: {label_path}")
    else:
        frame, source = first.keys, str(available[models[0]])
    need = {*KEY_COLUMNS, "binary", "fine"} - set(frame.columns)
    if need:
        raise ValueError(f"{source}: labels need columns {sorted(need)} (set, prompt, image_id, binary, fine)")
    frame = frame[[*KEY_COLUMNS, "binary", "fine"]]
    if sets is not None:
        missing = sorted(set(sets) - set(frame["set"]))
        if missing:
            raise ValueError(
                f"options.sets: sets {missing} are not in {source} (it has {sorted(frame['set'].unique())})"
            )
        frame = frame[frame["set"].isin(list(sets))]
    frame = frame.reset_index(drop=True)
    matrices = [
        _align(first if m == models[0] else ScoreMatrix.load(available[m]), frame, available[m]) for m in models
    ]
    values = stack_values(matrices)
    codes, uniques = pd.MultiIndex.from_frame(frame[["set", "prompt"]]).factorize()
    index = group_index(codes)
    mask = index >= 0
    binary = gather(frame["binary"].to_numpy(dtype=np.float64), index, 0).astype(np.int64)
    fine = gather(frame["fine"].to_numpy(dtype=np.float64), index, np.nan)
    set_names = list(dict.fromkeys(frame["set"]))
    prompt_set = np.array([set_names.index(s) for s, _ in uniques], dtype=np.int64)
    pos = np.where(mask, binary, 0).sum(axis=1)
    included = (pos > 0) & (pos < mask.sum(axis=1))
    data = LabelledScores(
        models,
        values,
        index,
        binary,
        fine,
        prompt_set,
        set_names,
        [p for _, p in uniques],
        included,
        sources={m: str(available[m]) for m in models},
    )
    if folds:
        data.folds = assign_folds(len(uniques), folds, fold_seed, strata=prompt_set, eligible=included)
    data.fingerprint = _fingerprint(values, index, binary, fine, extra=repr((models, set_names, folds, fold_seed)))
    log.info(
        "loaded %d images x %d models, %d prompts (%d with mixed labels) in sets %s from %s",
        values.shape[1],
        len(models),
        len(uniques),
        int(included.sum()),
        set_names,
        run_dir,
    )
    return data


@dataclass
class BestOfNScores:
    models: list[str]  # candidate members of the selecting reward
    values: np.ndarray  # (models, images, 1 + max m)
    index: np.ndarray  # (prompts, max samples) image rows ordered by sample, -1 = padding
    pool: np.ndarray  # (prompts, max samples) True where the sample is in the pool
    judges: list[str]  # held-out reward models, not in the selector
    judge_raw: np.ndarray  # (judges, images) r(x0, y) of each judge
    judge_scaled: np.ndarray  # (judges, images) what the objective averages (raw or z-scored)
    prompts: list[str]
    folds: np.ndarray | None = None
    fingerprint: str = ""
    sources: dict[str, str] = field(default_factory=dict)


def load_bestofn(
    run_dir: str | Path,
    selector_models: Sequence[str] | None,
    judges: Sequence[str],
    pool_size: int | None = None,
    scale: str = "zscore",
    folds: int | None = None,
    fold_seed: int = 0,
) -> BestOfNScores:
    """Best-of-n score matrices of ``run_dir``: the selector candidates and the judges."""
    run_dir = Path(run_dir)
    available = find_matrices(run_dir / "scores")
    judges = pick_models(available, judges, "options.heldout_models")
    if selector_models is None:
        selector_models = [m for m in available if m not in judges]
    selector_models = pick_models(available, selector_models, "options.selector_models")
    overlap = sorted(set(selector_models) & set(judges))
    if overlap:
        raise ValueError(f"options: models {overlap} are both selector and held-out judge; a judge must not select")
    if not selector_models:
        raise ValueError(f"options.selector_models: no selector model left in {run_dir / 'scores'} besides the judges")
    first_path = available[selector_models[0]]
    first = ScoreMatrix.load(first_path)
    need = {"prompt_id", "sample"} - set(first.keys.columns)
    if need:
        raise ValueError(f"{first_path}: best-of-n score matrices need key columns {sorted(need)} (prompt_id, sample)")
    keys = first.keys.sort_values(["prompt_id", "sample"], kind="stable").reset_index(drop=True)
    dup = keys.duplicated(["prompt_id", "sample"])
    if dup.any():
        row = keys[dup].iloc[0]
        raise ValueError(f"{first_path}: (prompt_id={row['prompt_id']}, sample={row['sample']}) appears twice")
    selector = [
        _align(ScoreMatrix.load(available[m]) if m != selector_models[0] else first, keys, available[m])
        for m in selector_models
    ]
    judged = [_align(ScoreMatrix.load(available[m]), keys, available[m]) for m in judges]
    values = stack_values(selector)
    codes, uniques = pd.factorize(keys["prompt_id"])
    index = group_index(codes)
    sample = gather(keys["sample"].to_numpy(dtype=np.float64), index, np.inf)
    pool = (index >= 0) & (sample < (pool_size if pool_size is not None else np.inf))
    if not pool.any(axis=1).all():
        raise ValueError(f"options.pool_size={pool_size}: some prompts have no sample with index < {pool_size}")
    judge_raw = np.stack([m.raw for m in judged])
    in_pool = np.zeros(len(keys), bool)
    in_pool[index[pool]] = True
    if scale == "zscore":
        mu = judge_raw[:, in_pool].mean(axis=1, keepdims=True)
        sd = judge_raw[:, in_pool].std(axis=1, keepdims=True)
        judge_scaled = (judge_raw - mu) / np.where(sd > 0, sd, 1.0)
    else:
        judge_scaled = judge_raw
    prompts = keys.groupby("prompt_id", sort=False)["prompt"].first().loc[uniques].tolist()
    data = BestOfNScores(
        selector_models,
        values,
        index,
        pool,
        judges,
        judge_raw,
        judge_scaled,
        prompts,
        sources={m: str(available[m]) for m in [*selector_models, *judges]},
    )
    if folds:
        data.folds = assign_folds(len(uniques), folds, fold_seed)
    data.fingerprint = _fingerprint(
        values, index, pool, judge_scaled, extra=repr((selector_models, judges, pool_size, scale, folds, fold_seed))
    )
    log.info(
        "loaded best-of-n run %s: %d prompts, up to %d samples each (pool %s), selector candidates %s, judges %s",
        run_dir,
        len(uniques),
        int(pool.sum(axis=1).max()),
        pool_size,
        selector_models,
        judges,
    )
    return data
