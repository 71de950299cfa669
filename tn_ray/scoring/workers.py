"""Reward models on Ray: workers for Ray Data, long-lived reward actors.

A :class:`RewardWorker` holds one reward model. Ray Data uses it as the callable class of
``map_batches`` (one actor per GPU, or CPU actors without GPUs); :class:`RewardPool` starts
the same class as long-lived actors, the one way training loops, evaluation and reward learning
reach a reward model (submit / collect). Metrics are never computed here.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from tn_ray import cluster
from tn_ray.config import ScoringConfig
from tn_ray.scoring import warm_actors

log = logging.getLogger(__name__)


def reward_pool_size(cfg: ScoringConfig, max_actors: int | None = None) -> tuple[int, dict[str, float]]:
    """(actors, resources per actor) of a reward model's pool (one per GPU, else one CPU actor)."""
    return cluster.actor_pool(cfg.num_actors, cfg.gpus_per_actor, cfg.cpus_per_actor, max_actors=max_actors)


def cache_frame(image_keys: Sequence[str], texts: Sequence[Sequence[str]],
                scores: Sequence[np.ndarray]) -> pd.DataFrame:
    """The reward cache's rows (image_key, text, score) of one row of scores per image against its texts."""
    keys = np.repeat(np.asarray(list(image_keys), dtype=object), [len(t) for t in texts])
    return pd.DataFrame({"image_key": keys, "text": [x for t in texts for x in t],
                         "score": np.concatenate(scores).astype(np.float64) if len(scores) else []})


class RewardWorker:
    """One reward model in one process; text features cached for the worker's lifetime."""

    def __init__(self, spec: str, text_batch_size: int = 64, device: str | None = None):
        from tn_ray.rewards import build

        self.model = build(spec, device=device, text_batch_size=text_batch_size)

    # Ray Data: a pandas batch with image_key, image, texts -> one row per (image, text)
    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        texts = [list(t) for t in batch["texts"]]
        return cache_frame(batch["image_key"], texts, self.model.score_rows(list(batch["image"]), texts))

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
                     desc: str = "scoring", pool: Callable[[], RewardPool] | None = None) -> int:
    """Compute the rewards of ``requests`` (image_key, image, texts) missing from ``cache``.

    Runs a Ray Data pipeline with an actor pool of :class:`RewardWorker` and writes each
    finished batch to the cache as it arrives. With ``pool`` (a function that starts a
    :class:`RewardPool`, e.g. the reward service's, :func:`tn_ray.scoring.service_pool.reward_pool`),
    the same batches go to that pool instead, called only when something is missing, and the pool is
    shut down after. Returns the number of rewards computed.
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
    if pool is not None:
        return _score_through_pool(requests, spec, cache, cfg, desc, pool())
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


def _score_through_pool(requests: pd.DataFrame, spec: str, cache, cfg: ScoringConfig, desc: str,
                        pool: RewardPool) -> int:
    """:func:`score_into_cache` through a started pool: batches of ``cfg.batch_size`` images, as many
    in flight as the pool has workers, each window's rows written to the cache as it is collected."""
    from tqdm.auto import tqdm

    frame = requests[["image_key", "image", "texts"]].reset_index(drop=True)
    window = cfg.batch_size * max(1, len(pool.workers))
    computed = 0
    try:
        with tqdm(total=int(frame["texts"].map(len).sum()), desc=f"{desc} {spec}", unit="pair") as bar:
            for start in range(0, len(frame), window):
                part = frame.iloc[start : start + window]
                texts = [list(t) for t in part["texts"]]
                out = cache_frame(part["image_key"], texts, pool.score(list(part["image"]), texts, cfg.batch_size))
                cache.append(out)
                computed += len(out)
                bar.update(len(out))
    finally:
        pool.shutdown()
    return computed


def start_reward_actors(spec: str, text_batch_size: int, n: int, resources: dict[str, float]) -> list:
    """``n`` long-lived :class:`RewardWorker` actors of ``spec``, one per GPU (CPU actors without GPUs);
    the model loads once per actor and stays loaded. Only :class:`RewardPool` starts them (directly or
    through the warm-actor cache, :mod:`tn_ray.scoring.warm_actors`)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # restart without limit and retry calls on the restarted actor: a preempted spot node
    # must not exhaust a restart budget (a call that fails on its own still raises). The actors
    # are a shared service, never part of the caller's placement group: created from a Ray Train
    # worker inside a Tune trial they would otherwise wait forever for room in the trial's bundles
    remote = ray.remote(RewardWorker).options(
        max_restarts=-1,
        max_task_retries=-1,
        **resources,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
    )
    return [remote.remote(spec, text_batch_size) for _ in range(n)]


class RewardPool:
    """The one way anything reaches a reward model: requests go in with :meth:`submit` (and
    :meth:`submit_embed` / :meth:`submit_score_embeddings` for reward learning), which return at
    once with futures; :meth:`collect` blocks for them and returns every submission's result since
    the last collect, in submit order. Requests are spread round-robin over the pool's workers.

    This class is the Ray-actor backend: long-lived :class:`RewardWorker` actors of one model (one
    per GPU, CPU actors without GPUs), started by the constructor and killed by :meth:`shutdown`.
    A pool pickles with its actor handles, so a driver can start it once and hand it to Ray Train
    workers (each copy keeps its own pending requests). Another backend (a Ray Serve deployment,
    a remote reward service) is a subclass that overrides the three backend methods
    :meth:`_start`, :meth:`_call` (one request to worker ``i``, returning a future) and
    :meth:`_wait` (futures -> results), and :meth:`shutdown`; submit / collect and the order of
    results stay the same.
    """

    def __init__(self, spec: str, cfg: ScoringConfig | None = None):
        self.spec = spec
        self.cfg = cfg or ScoringConfig()
        self._warm_key: str | None = None  # set by _start when the actors are borrowed warm
        self.workers = self._start()
        self._next = 0  # round-robin position, across submissions
        self._pending: list[tuple[list, bool]] = []  # (futures of one submission, whether its parts are concatenated)

    @property
    def actors(self) -> list:
        """The pool's Ray actors (this backend's workers)."""
        return self.workers

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pending": []}

    # --- backend ----------------------------------------------------------------------------
    def _start(self) -> list:
        cluster.init_ray()
        n, res = reward_pool_size(self.cfg)
        if warm_actors.enabled(self.spec, self.cfg):
            self._warm_key, actors = warm_actors.borrow(self.spec, self.cfg, n, res, start_reward_actors)
            return actors
        return start_reward_actors(self.spec, self.cfg.text_batch_size, n, res)

    def _call(self, worker: int, method: str, *args):
        return getattr(self.workers[worker], method).remote(*args)

    def _wait(self, futures: list) -> list:
        import ray

        return ray.get(futures)

    def shutdown(self) -> None:
        """Kill the pool's actors, or give warm ones back to the cache (:mod:`~tn_ray.scoring.warm_actors`)."""
        import ray

        if self.workers and self._warm_key is not None:
            warm_actors.give_back(self._warm_key)
        else:
            for a in self.workers:
                ray.kill(a)
        self.workers = []

    # --- requests ---------------------------------------------------------------------------
    def _send(self, method: str, *args):
        future = self._call(self._next % len(self.workers), method, *args)
        self._next += 1
        return future

    def submit(self, images: Sequence[Any], texts_per_image: Sequence[Sequence[str]], chunk: int | None = None) -> list:
        """Score each image against its own texts; returns at once with the futures. The images go
        in parts of ``chunk`` (default: split evenly over the workers, so the latency of one
        submission shrinks with more workers), each to the next worker in turn. Its result in
        :meth:`collect` is one row of scores per image, in order."""
        if len(images) != len(texts_per_image):
            raise ValueError(f"{len(images)} images but {len(texts_per_image)} text lists")
        size = chunk or max(1, -(-len(images) // len(self.workers)))
        futures = [
            self._send("score", list(images[i : i + size]), list(texts_per_image[i : i + size]))
            for i in range(0, len(images), size)
        ]
        self._pending.append((futures, True))
        return futures

    def submit_embed(self, images: Sequence[Any], texts: Sequence[str]):
        """A dual encoder's (image embeddings, text embeddings) (:meth:`RewardModel.embed`); one future."""
        future = self._send("features", list(images), list(texts))
        self._pending.append(([future], False))
        return future

    def submit_score_embeddings(self, image_features: np.ndarray, text_features: np.ndarray):
        """The model's reward matrix of embeddings (:meth:`RewardModel.score_embeddings`); one future."""
        future = self._send("score_features", image_features, text_features)
        self._pending.append(([future], False))
        return future

    def collect(self) -> list:
        """Every submission's result since the last collect, in submit order (blocks only for the ones
        not done): a :meth:`submit` gives its rows, the others their single result."""
        pending, self._pending = self._pending, []
        flat = self._wait([f for futures, _ in pending for f in futures])
        out, k = [], 0
        for futures, concat in pending:
            parts = flat[k : k + len(futures)]
            k += len(futures)
            out.append([row for part in parts for row in part] if concat else parts[0])
        return out

    def score(
        self, images: Sequence[Any], texts_per_image: Sequence[Sequence[str]], chunk: int | None = 32
    ) -> list[np.ndarray]:
        """:meth:`submit` then :meth:`collect`: one row of scores per image (nothing else may be pending)."""
        if self._pending:
            raise RuntimeError("RewardPool.score with submissions pending: collect them first")
        self.submit(images, texts_per_image, chunk)
        return self.collect()[0]
