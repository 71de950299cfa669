"""Frozen embeddings of a dual-encoder reward, computed once by the reward actors and cached.

The head trains on a backbone's image and text embeddings (``encode_images`` /
``encode_texts`` of a registered dual encoder: CLIP, PickScore, ...). They are computed by
the same long-lived reward actors that score images (one per GPU), through
:class:`tn_ray.scoring.workers.RewardPool` and the model's own
:meth:`~tn_ray.rewards.base.RewardModel.embed`, and kept as Parquet parts (:class:`tn_ray.storage.PartTable`) under
``<cache>/<model-slug>/images`` (keyed by ``image_key``) and ``.../texts`` (keyed by text),
next to the backbone's own rewards in a :class:`tn_ray.scoring.cache.RewardCache` (its raw
score, reported beside the learned one). A second run, with any other head or loss, asks
the caches what is missing and starts no actor when nothing is.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from tn_ray.config import ScoringConfig
from tn_ray.scoring.cache import RewardCache
from tn_ray.scoring.matrix import model_slug
from tn_ray.scoring.workers import RewardPool
from tn_ray.storage import PartTable, Store, join_uri

log = logging.getLogger(__name__)

IMAGE_SCHEMA = pa.schema([("image_key", pa.string()), ("vector", pa.list_(pa.float32()))])
TEXT_SCHEMA = pa.schema([("text", pa.string()), ("vector", pa.list_(pa.float32()))])


class FeatureCache:
    """Image embeddings by ``image_key`` and text embeddings by text, of one backbone."""

    def __init__(self, root: str, model_id: str):
        self.model_id = model_id
        store = Store(root)
        slug = model_slug(model_id)
        store.makedirs(slug)
        if not store.exists(f"{slug}/MODEL"):
            store.write_text(f"{slug}/MODEL", model_id + "\n")
        self.images = PartTable(store, f"{slug}/images", IMAGE_SCHEMA, ["image_key"])
        self.texts = PartTable(store, f"{slug}/texts", TEXT_SCHEMA, ["text"])
        self.rewards = RewardCache(join_uri(root, "rewards"), model_id)

    @staticmethod
    def _lookup(table: PartTable, key: str, wanted: Sequence[str]) -> dict[str, np.ndarray]:
        df = table.read()
        df = df[df[key].isin(set(wanted))]
        return {k: np.asarray(v, dtype=np.float32) for k, v in zip(df[key], df["vector"])}

    def image_vectors(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        return self._lookup(self.images, "image_key", keys)

    def text_vectors(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        return self._lookup(self.texts, "text", texts)


@dataclass
class Features:
    """Embeddings of a data set's rows: ``image[i]`` is row i's image, ``text_index[t]`` the row
    of ``text`` holding text t; ``backbone[i]`` the backbone's rewards of row i's texts."""

    image: np.ndarray
    text: np.ndarray
    text_index: dict[str, int]
    backbone: list[np.ndarray]
    stats: dict[str, int] = field(default_factory=dict)

    def texts_of(self, texts: Sequence[Sequence[str]]) -> np.ndarray:
        """(rows, 1 + max m) indices into ``text`` (-1 where a row has fewer texts)."""
        width = max(len(t) for t in texts)
        out = np.full((len(texts), width), -1, dtype=np.int64)
        for i, t in enumerate(texts):
            out[i, : len(t)] = [self.text_index[x] for x in t]
        return out


def compute(frame: pd.DataFrame, backbone: str, root: str, cfg: ScoringConfig | None = None) -> Features:
    """Embeddings (and the backbone's rewards) of ``frame``'s images and texts; only what the
    caches lack is computed, on reward actors that are started only then and released after."""
    cfg = cfg or ScoringConfig()
    cache = FeatureCache(root, backbone)
    keys = list(frame["image_key"])
    texts = list(dict.fromkeys(t for ts in frame["texts"] for t in ts))
    have_img, have_txt = cache.image_vectors(keys), cache.text_vectors(texts)
    todo_img = frame[~frame["image_key"].isin(set(have_img))]
    todo_txt = [t for t in texts if t not in have_txt]
    todo_scores = cache.rewards.missing(keys, [list(t) for t in frame["texts"]])
    stats = {"images_encoded": len(todo_img), "texts_encoded": len(todo_txt),
             "backbone_rewards_computed": sum(len(t) for t in todo_scores)}
    if len(todo_img) or todo_txt or stats["backbone_rewards_computed"]:

        pool = RewardPool(backbone, cfg)
        try:
            b, tb = cfg.batch_size, cfg.text_batch_size
            for i in range(0, len(todo_img), b):
                pool.submit_embed(list(todo_img["image"].iloc[i : i + b]), [])
            for i in range(0, len(todo_txt), tb):
                pool.submit_embed([], todo_txt[i : i + tb])
            results = pool.collect()
            n_img = -(-len(todo_img) // b)
            if len(todo_img):
                vec = np.concatenate([r[0] for r in results[:n_img]])
                cache.images.append(pd.DataFrame({"image_key": list(todo_img["image_key"]), "vector": list(vec)}))
            if todo_txt:
                vec = np.concatenate([r[1] for r in results[n_img:]])
                cache.texts.append(pd.DataFrame({"text": todo_txt, "vector": list(vec)}))
            have_img, have_txt = cache.image_vectors(keys), cache.text_vectors(texts)
            by_texts: dict[tuple[str, ...], list[int]] = {}
            for i, t in enumerate(todo_scores):
                if t:
                    by_texts.setdefault(tuple(t), []).append(i)
            for ts, members in by_texts.items():
                pool.submit_score_embeddings(
                    np.stack([have_img[keys[i]] for i in members]), np.stack([have_txt[t] for t in ts])
                )
            for (ts, members), s in zip(by_texts.items(), pool.collect()):
                cache.rewards.append(
                    pd.DataFrame(
                        {
                            "image_key": np.repeat([keys[i] for i in members], len(ts)),
                            "text": list(ts) * len(members),
                            "score": s.reshape(-1).astype(np.float64),
                        }
                    )
                )
        finally:
            pool.shutdown()
        cache.images.compact()
        cache.texts.compact()
        cache.rewards.compact()
    log.info("features of %s: %s", backbone, stats)
    text_index = {t: i for i, t in enumerate(texts)}
    return Features(
        image=np.stack([have_img[k] for k in keys]),
        text=np.stack([have_txt[t] for t in texts]),
        text_index=text_index,
        backbone=cache.rewards.lookup(keys, [list(t) for t in frame["texts"]]),
        stats=stats,
    )
