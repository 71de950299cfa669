"""Best-of-n generation -> scoring as one streaming Ray Data pipeline.

::

    work units ──> GenerationWorker pool ──> ScoreStage pool (model 1) ──> ... (model m) ──> driver
                   writes PNGs to the store,   opens each image by its URI,             appends rewards to
                   emits manifest rows         adds its rewards to the row              the cache, then the
                                                                                        row to the manifest

Generators and reward models run at the same time on their own actor pools (their own GPUs, or
GPU fractions), images flow by path/URI from generators to reward actors as they are decoded
and never through the driver, which receives small rows only. Everything the sequential design
guarantees still holds because the generation side is the same code
(:func:`tn_ray.diffusion.generation.prepare` / ``generation_dataset`` / ``record`` / ``finish``):
bit-identical images whatever batch size, actor count or resume point; each finished batch is
stored once (its rewards in the reward cache first, then its manifest rows, so an interruption
between the two leaves complete images that the next run adopts and finds scored); memory flat
in n (nothing but the batch in flight is held). Whatever the stream did not score (images of an
earlier run, a model added later) is scored by :func:`tn_ray.scoring.batch_scoring.score_matrices`
afterwards from the cache.

Resources (:func:`plan_pools`): each reward actor requests ``scoring.gpus_per_actor`` (CPU-only:
``scoring.cpus_per_actor``) when set, else ``reward_share`` of one device; generation gets
``generation.num_actors`` actors or as many as fit in what is left. When the two pools cannot
run side by side on the cluster, the run falls back to generating first and scoring after (the
sequential design), with a warning naming the keys to change.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from tn_ray.config import RayConfig, ScoringConfig
from tn_ray.diffusion import generation as gen_mod
from tn_ray.diffusion.generation import GenerationConfig
from tn_ray.scoring.batch_scoring import image_key
from tn_ray.scoring.cache import RewardCache
from tn_ray.scoring.service_pool import reward_pool
from tn_ray.scoring.workers import RewardWorker
from tn_ray.storage import Store

log = logging.getLogger(__name__)


def score_columns(spec: str, width: int) -> list[str]:
    """The float columns that carry one model's rewards of an image against texts 0..width-1."""
    return [f"_scores[{spec}][{j}]" for j in range(width)]


class Pools(NamedTuple):
    generation_actors: int
    generation_resources: dict[str, float]
    reward_actors: int  # per model
    reward_resources: dict[str, float]
    concurrent: bool  # both pools fit on the cluster at once
    used: float  # GPUs (or CPUs without GPUs) both pools request together
    total: float


def plan_pools(cluster: Mapping[str, float], gen: GenerationConfig, scoring: ScoringConfig, n_models: int,
               n_units: int, reward_share: float, service: bool = False) -> Pools:
    """Actor counts and per-actor resources of the generation pool and of each model's reward
    pool when both run at once on a cluster with ``cluster`` resources (``ray.cluster_resources()``).

    With GPUs: a reward actor asks ``scoring.gpus_per_actor`` if set, else ``reward_share`` of a
    GPU; ``scoring.num_actors`` (default 1) per model. Generation: ``generation.num_actors``, else
    as many ``generation.gpus_per_actor`` actors as fit in the GPUs left (at least one). Without
    GPUs the same with CPUs (``*.cpus_per_actor``). Generation never gets more actors than work units.
    With ``service`` (a warm reward service scores) a reward stage only sends requests and asks nothing.
    """
    gpus = float(cluster.get("GPU", 0))
    kind = "gpus" if gpus > 0 else "cpus"
    total = gpus if gpus > 0 else float(cluster.get("CPU", 1))
    set_fields = scoring.model_fields_set
    reward_each = getattr(scoring, f"{kind}_per_actor") if f"{kind}_per_actor" in set_fields else reward_share
    if service:
        reward_each = 0.0
    reward_n = scoring.num_actors or 1
    gen_each = getattr(gen, f"{kind}_per_actor")
    free = total - n_models * reward_n * reward_each
    gen_n = gen.num_actors or max(1, math.floor(free / gen_each + 1e-9))
    gen_n = min(gen_n, max(1, n_units))
    used = gen_n * gen_each + n_models * reward_n * reward_each
    if gpus > 0:
        gen_res, reward_res = {"num_gpus": gen_each}, {"num_gpus": reward_each}
    else:
        gen_res, reward_res = {"num_gpus": 0, "num_cpus": gen_each}, {"num_gpus": 0, "num_cpus": reward_each}
    return Pools(gen_n, gen_res, reward_n, reward_res, used <= total + 1e-9, used, total)


class ScoreStage:
    """Ray Data callable class: manifest rows -> the same rows plus one model's rewards of each
    image against its prompt's texts, as ``width`` float columns (:func:`score_columns`; NaN past
    the prompt's texts, and for rows at or beyond ``score_below`` samples, which are not scored).
    Fixed float columns keep every block's schema the same whatever the batch holds. Images are
    opened by their URI in the generation store. With ``pool`` (a started reward service's
    :class:`tn_ray.scoring.workers.RewardPool`, handed over from the driver) the stage sends its
    images there instead of loading the model."""

    def __init__(self, spec: str, text_batch_size: int, root: str, texts: dict[str, list[str]], score_below: int,
                 pool=None):
        self.worker = pool if pool is not None else RewardWorker(spec, text_batch_size)
        self.store, self.texts, self.score_below = Store(root), texts, score_below
        self.columns = score_columns(spec, max(len(t) for t in texts.values()))

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = np.flatnonzero((batch["sample"] < self.score_below).to_numpy())
        scores = self.worker.score([self.store.uri(batch["path"].iloc[i]) for i in rows],
                                   [self.texts[batch["prompt"].iloc[i]] for i in rows]) if len(rows) else []
        values = np.full((len(batch), len(self.columns)), np.nan)
        for i, s in zip(rows, scores):
            values[i, : len(s)] = s
        return batch.assign(**{c: values[:, j] for j, c in enumerate(self.columns)})


def cache_rows(rows: pd.DataFrame, spec: str, texts: Mapping[str, list[str]], set_name: str) -> pd.DataFrame:
    """The (image_key, text, score) rows of one model's rewards in a finished batch (rows whose
    first reward is NaN were not scored)."""
    columns = score_columns(spec, max(len(t) for t in texts.values()))
    values = rows[columns].to_numpy(dtype=np.float64)
    keys, text, score = [], [], []
    for r, (image_id, sha, prompt) in enumerate(zip(rows["image_id"], rows["sha256"], rows["prompt"])):
        if np.isnan(values[r, 0]):
            continue
        n = len(texts[prompt])
        keys += [image_key(set_name, image_id, sha)] * n
        text += list(texts[prompt])
        score += values[r, :n].tolist()
    return pd.DataFrame({"image_key": keys, "text": text, "score": np.asarray(score, dtype=np.float64)})


def _stream(todo: pd.DataFrame, texts: Mapping[str, list[str]], gen: GenerationConfig, models: Sequence[str],
            scoring: ScoringConfig, pools: Pools, store: Store, score_below: int, remote: Mapping | None = None):
    """The dataset: generation actor pool, then one reward actor pool per model (``remote``: model ->
    the reward service's pool, which its stage calls instead of loading the model)."""
    from ray.data import ActorPoolStrategy

    ds = gen_mod.generation_dataset(todo, gen, store, pools.generation_actors, pools.generation_resources)
    plain = {p: list(t) for p, t in texts.items()}
    for spec in models:
        ds = ds.map_batches(ScoreStage, fn_constructor_kwargs={"spec": spec, "text_batch_size": scoring.text_batch_size,
                                                               "root": store.uri(""), "texts": plain,
                                                               "score_below": score_below,
                                                               "pool": (remote or {}).get(spec)},
                            batch_size=scoring.batch_size, batch_format="pandas",
                            compute=ActorPoolStrategy(size=pools.reward_actors), **pools.reward_resources)
    return ds


def generate_and_score(prompts: Sequence[str], texts: Mapping[str, list[str]], gen: GenerationConfig,
                       models: Sequence[str], cache_dir: str, scoring: ScoringConfig, *, set_name: str,
                       score_below: int, reward_share: float = 0.25, ray_cfg: RayConfig | None = None,
                       on_batch: Callable[[pd.DataFrame], None] | None = None,
                       service: str | None = None) -> pd.DataFrame:
    """Make every missing image of ``prompts`` and score it with every model while generating
    (rewards of samples < ``score_below`` go to the reward cache under ``cache_dir``); returns the
    manifest of all images (as :func:`tn_ray.diffusion.generation.generate`). ``texts``: prompt ->
    [x0, x1, ..., xm]. ``on_batch(rows)`` is called with each batch's rows once its rewards are stored
    (benchmarks, tests). ``service``: a warm reward service (``http(s)://...`` or ``serve:<app>``) scores
    instead of reward actors (:func:`tn_ray.scoring.service_pool.reward_pool`; same cache rows)."""
    import ray

    from tn_ray.cluster import init_ray

    store, wanted, todo = gen_mod.prepare(prompts, gen)
    if todo.empty:
        return gen_mod.finish(store, wanted)
    init_ray(ray_cfg)
    n_units = len(gen_mod.work_units(todo, gen.pipeline_batch_size, gen.batch_size))
    pools = plan_pools(ray.cluster_resources(), gen, scoring, len(models), n_units, reward_share, bool(service))
    if not pools.concurrent:
        log.warning(
            "generation (%d actors, %s each) and %d reward pool(s) (%d actors, %s each) need %.2f of the "
            "cluster's %.2f %s: generating first, scoring after. To stream, lower generation.num_actors or "
            "scoring.gpus_per_actor / cpus_per_actor (docs/bestofn.md, 'Splitting GPUs')",
            pools.generation_actors,
            pools.generation_resources,
            len(models),
            pools.reward_actors,
            pools.reward_resources,
            pools.used,
            pools.total,
            "GPUs" if ray.cluster_resources().get("GPU") else "CPUs",
        )
        return gen_mod.generate(prompts, gen, ray_cfg)
    caches = {spec: RewardCache(cache_dir, spec) for spec in models}
    if service:

        remote = {spec: reward_pool(spec, scoring, service) for spec in models}  # checks the service serves them
    else:
        remote = None

    def store_rewards(rows: pd.DataFrame) -> None:
        for spec, cache in caches.items():
            cache.append(cache_rows(rows, spec, texts, set_name))
        if on_batch is not None:
            on_batch(rows)

    log.info(
        "streaming: %d generation actors (%s each) -> %d reward actor(s) per model (%s each) for %s",
        pools.generation_actors,
        pools.generation_resources,
        pools.reward_actors,
        pools.reward_resources,
        list(models),
    )
    try:
        gen_mod.record(
            _stream(todo, texts, gen, models, scoring, pools, store, score_below, remote),
            store,
            len(todo),
            f"generating + scoring ({pools.generation_actors} + {pools.reward_actors * len(models)} actors"
            + (f", reward service {service})" if service else ")"),
            before_manifest=store_rewards,
        )
    finally:
        for pool in (remote or {}).values():
            pool.shutdown()
    return gen_mod.finish(store, wanted)
