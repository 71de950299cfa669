"""Reward models on Ray: workers for Ray Data, long-lived reward actors.

A :class:`RewardWorker` holds one reward model. Ray Data uses it as the callable class of
``map_batches`` (one actor per GPU, or CPU actors without GPUs); :func:`reward_actors`
starts the same class as long-lived actors that training loops call with batches of
(images, prompts). Metrics are never computed here.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from tn_ray import cluster
from tn_ray.config import ScoringConfig

log = logging.getLogger(__name__)


def reward_pool_size(cfg: ScoringConfig, max_actors: int | None = None) -> tuple[int, dict[str, float]]:
    """(actors, resources per actor) of a reward model's pool (one per GPU, else one CPU actor)."""
    return cluster.actor_pool(cfg.num_actors, cfg.gpus_per_actor, cfg.cpus_per_actor, max_actors=max_actors)


class RewardWorker:
    """One reward model in one process; text features cached for the worker's lifetime."""

    def __init__(self, spec: str, text_batch_size: int = 64, device: str | None = None):
        from tn_ray.rewards import build

        self.model = build(spec, device=device, text_batch_size=text_batch_size)

    # Ray Data: a pandas batch with image_key, image, texts -> one row per (image, text)
    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        texts = [list(t) for t in batch["texts"]]
        scores = self.model.score_rows(list(batch["image"]), texts)
        keys = np.repeat(batch["image_key"].to_numpy(dtype=object), [len(t) for t in texts])
        return pd.DataFrame({"image_key": keys, "text": [x for t in texts for x in t],
                             "score": np.concatenate(scores).astype(np.float64) if scores else []})

    # long-lived actor API
    def score(self, images: Sequence[Any], texts_per_image: Sequence[Sequence[str]]) -> list[np.ndarray]:
        return self.model.score_rows(images, texts_per_image)

    def stats(self) -> dict[str, int]:
        return {"images_encoded": self.model.images_encoded, "texts_encoded": self.model.texts_encoded}

    # reward learning (tn_ray.reward_learning.features): a dual encoder's embeddings, its score of them
    def features(self, images: Sequence[Any], texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.model.embed(images, texts)

    def score_features(self, image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
        return self.model.score_embeddings(image_features, text_features)


def score_into_cache(requests: pd.DataFrame, spec: str, cache, cfg: ScoringConfig | None = None,
                     desc: str = "scoring") -> int:
    """Compute the rewards of ``requests`` (image_key, image, texts) missing from ``cache``.

    Runs a Ray Data pipeline with an actor pool of :class:`RewardWorker` and writes each
    finished batch to the cache as it arrives. Returns the number of rewards computed.
    """
    import ray
    from ray.data import ActorPoolStrategy
    from tqdm.auto import tqdm

    cfg = cfg or ScoringConfig()
    todo = cache.missing(list(requests["image_key"]), [list(t) for t in requests["texts"]])
    requests = requests.assign(texts=todo)
    requests = requests[requests["texts"].map(len) > 0]
    if requests.empty:
        log.info("%s: every reward of %s is cached", desc, spec)
        return 0
    cluster.init_ray()
    n_actors, res = reward_pool_size(cfg, max_actors=-(-len(requests) // cfg.batch_size))
    frame = requests[["image_key", "image", "texts"]].reset_index(drop=True)
    # one block per batch: blocks are the unit Ray Data hands to actors, so a single block
    # would keep every actor but one idle
    ds = ray.data.from_pandas([frame.iloc[i : i + cfg.batch_size] for i in range(0, len(frame), cfg.batch_size)])
    ds = ds.map_batches(RewardWorker, fn_constructor_kwargs={"spec": spec, "text_batch_size": cfg.text_batch_size},
                        batch_size=cfg.batch_size, batch_format="pandas",
                        compute=ActorPoolStrategy(size=n_actors), **res)
    computed = 0
    with tqdm(total=int(requests["texts"].map(len).sum()), desc=f"{desc} {spec}", unit="pair") as bar:
        for out in ds.iter_batches(batch_format="pandas", batch_size=None):
            cache.append(out)
            computed += len(out)
            bar.update(len(out))
    return computed


def reward_actors(spec: str, cfg: ScoringConfig | None = None) -> list:
    """Long-lived :class:`RewardWorker` actors, one per GPU (CPU actors without GPUs).

    Call ``actor.score.remote(images, texts_per_image)``; :class:`RewardPool` spreads
    batches over them. The model loads once per actor and stays loaded.
    """
    import ray

    cfg = cfg or ScoringConfig()
    cluster.init_ray()
    n, res = reward_pool_size(cfg)
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # restart without limit and retry calls on the restarted actor: a preempted spot node
    # must not exhaust a restart budget (a call that fails on its own still raises). The actors
    # are a shared service, never part of the caller's placement group: created from a Ray Train
    # worker inside a Tune trial they would otherwise wait forever for room in the trial's bundles
    remote = ray.remote(RewardWorker).options(max_restarts=-1, max_task_retries=-1, **res,
                                              scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    return [remote.remote(spec, cfg.text_batch_size) for _ in range(n)]


class RewardPool:
    """Round-robin batches of (images, prompts) over long-lived reward actors."""

    def __init__(self, spec: str, cfg: ScoringConfig | None = None):
        self.actors = reward_actors(spec, cfg)

    def score(self, images: Sequence[Any], texts_per_image: Sequence[Sequence[str]], chunk: int = 32) -> list[np.ndarray]:
        import ray

        refs = [self.actors[(i // chunk) % len(self.actors)].score.remote(images[i : i + chunk], texts_per_image[i : i + chunk])
                for i in range(0, len(images), chunk)]
        return [row for part in ray.get(refs) for row in part]

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
