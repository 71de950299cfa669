"""From images and prompts to score matrices: cache lookup, Ray scoring of what is missing.

``score_matrices(items, models)`` is what every experiment calls: ``items`` has one row per
image with its keys (set, prompt, image_id), ``image_key`` (unique id of the image),
``image`` (a path, bytes or an HWC uint8 array) and ``texts`` = [x0, x1, ..., xm].
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from tn_ray.config import ScoringConfig
from tn_ray.rewards import parse
from tn_ray.scoring.cache import RewardCache
from tn_ray.scoring.matrix import KEY_COLUMNS, ScoreMatrix, model_slug
from tn_ray.scoring.service_pool import reward_pool
from tn_ray.scoring.workers import score_into_cache

log = logging.getLogger(__name__)


def image_key(set_name: str, image_id: str, sha256: str) -> str:
    """The reward cache key of a generated image: content-addressed, so valid across runs."""
    return f"{set_name}/{image_id}/{sha256}"


def generated_items(manifest: pd.DataFrame, set_name: str, texts: Sequence[Sequence[str]]) -> pd.DataFrame:
    """The rows :func:`score_matrices` takes for a generation manifest (``prompt``, ``image_id``, ``prompt_id``,
    ``sample``, ``sha256``, ``image``): content-addressed image keys and each image's ``texts`` [x0, x1..xm]."""
    return pd.DataFrame(
        {
            "set": set_name,
            "prompt": manifest["prompt"].astype(str).to_numpy(),
            "image_id": manifest["image_id"].to_numpy(),
            "prompt_id": manifest["prompt_id"].astype("int64").to_numpy(),
            "sample": manifest["sample"].astype("int64").to_numpy(),
            "image_key": [image_key(set_name, i, h) for i, h in zip(manifest["image_id"], manifest["sha256"])],
            "image": manifest["image"].to_numpy(),
            "texts": list(texts),
        }
    )


def score_matrices(items: pd.DataFrame, models: Sequence[str], cache_dir: str | Path,
                   cfg: ScoringConfig | None = None, out_dir: str | Path | None = None,
                   stats: dict | None = None, service: str | None = None) -> dict[str, ScoreMatrix]:
    """One :class:`ScoreMatrix` per model; only rewards missing from the cache are computed.

    Returns ``{model_id: matrix}``; with ``out_dir`` each matrix is also written there as
    ``<model>.parquet``. ``items`` columns: the key columns, image_key, image, texts.
    ``stats``, if given, receives ``{model_id: {"computed": n, "cached": n}}``. ``service``: a warm
    reward service (``reward.service``: an http(s) URL or ``serve:<app>``) computes what is missing
    instead of Ray Data's reward actors (:func:`tn_ray.scoring.service_pool.reward_pool`); the cache rows
    are the same.
    """
    missing_cols = {"image_key", "image", "texts", *KEY_COLUMNS} - set(items.columns)
    if missing_cols:
        raise ValueError(f"score_matrices: items lack columns {sorted(missing_cols)}")
    if items["image_key"].duplicated().any():
        dup = items.loc[items["image_key"].duplicated(), "image_key"].iloc[0]
        raise ValueError(f"image_key must be unique per image; '{dup}' repeats")
    specs = [str(parse(m)) for m in models]  # unknown names fail before any work

    out: dict[str, ScoreMatrix] = {}
    keys = items.drop(columns=["image", "texts", "image_key"])
    for spec in specs:
        cache = RewardCache(cache_dir, spec)
        pool = (lambda spec=spec: reward_pool(spec, cfg, service)) if service else None
        computed = score_into_cache(items[["image_key", "image", "texts"]], spec, cache, cfg, pool=pool)
        cached = int(items["texts"].map(len).sum()) - computed
        log.info("%s: %d rewards computed, %d from cache", spec, computed, cached)
        if stats is not None:
            stats[spec] = {"computed": computed, "cached": cached}
        cache.compact()
        values = cache.lookup(list(items["image_key"]), [list(t) for t in items["texts"]])
        matrix = ScoreMatrix.from_rows(spec, keys, [list(t) for t in items["texts"]], values)
        if out_dir is not None:
            matrix.save(Path(out_dir) / f"{model_slug(spec)}.parquet")
        out[spec] = matrix
    return out
