"""Warm reward actors: reward models kept loaded between the runs of one Ray cluster.

A reward actor's start costs its process start-up (importing torch and the model's library, about 12 s
on 2 CPU cores) and the model's load. Runs that follow each other in one cluster (a sweep's trials, a
study's cells, the runs of one test session) can skip it: a pool that keeps its actors warm
(``scoring.keep_warm``) borrows the actors of its key (model spec, text batch, actor count, resources)
from a cache, and gives them back at shutdown instead of killing them. The cache is one detached,
named actor per Ray job (:data:`CACHE_NAME` in the namespace ``tn_ray-job-<job id>``, no resources), so a
Tune trial or a Ray Train worker of the job reaches the same one as the driver, and another driver on
the same cluster (perhaps another tn_ray version) has its own.

Rules, each visible in :class:`WarmActorCache`:

- Two pools of one key at once share its actors (a reward actor serves one call at a time; results
  are the same, only throughput is shared).
- At most ``max_actors`` actors are kept; beyond, the least recently borrowed key with no loan out is
  killed. A key on loan is never killed (a crashed borrower's loan is never returned: its actors stay
  until the cluster stops).
- On a CPU-only cluster warm actors reserve no CPUs: an idle actor holding CPUs between runs would
  starve the next run's Train workers (a 2-CPU cluster has nothing to spare). With GPUs they reserve
  their GPU share, as any reward actor, until evicted or the cluster stops.
- Models read from a file the spec names (``learned:<path>``) are never kept: the file may change
  under the same spec.

``keep_warm`` None (the default) means the environment's choice: ``TN_RAY_KEEP_WARM_REWARDS=1`` turns
it on for every pool (the test suite sets it, ``tests/conftest.py``). A test that counts a fresh
actor's work sets ``keep_warm=False``.
"""
from __future__ import annotations

import functools
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from tn_ray import cluster
from tn_ray.config import ScoringConfig

CACHE_NAME = "tn_ray.warm_reward_actors"
ENV = "TN_RAY_KEEP_WARM_REWARDS"
MAX_ENV = "TN_RAY_MAX_WARM_REWARDS"
DEFAULT_MAX_ACTORS = 6


def enabled(spec: str, cfg: ScoringConfig) -> bool:
    """Whether a pool of ``spec`` under ``cfg`` keeps its actors warm."""
    wanted = cfg.keep_warm if cfg.keep_warm is not None else os.environ.get(ENV) == "1"
    return bool(wanted) and not spec.startswith("learned:")


def key(spec: str, cfg: ScoringConfig, n: int, resources: dict[str, float]) -> str:
    """The cache key: everything that makes two pools' actors interchangeable."""
    res = ",".join(f"{k}={v:g}" for k, v in sorted(resources.items()))
    return f"{spec}|text_batch={cfg.text_batch_size}|actors={n}|{res}"


class WarmActorCache:
    """The cluster's warm reward actors, by key, least recently borrowed first."""

    def __init__(self, max_actors: int = DEFAULT_MAX_ACTORS):
        self.max_actors = max_actors
        self.entries: OrderedDict[str, dict[str, Any]] = OrderedDict()  # key -> {"actors": [...], "loans": int}
        self.started = 0  # actors this cache started (for tests and logs)

    def borrow(self, key: str, start: Callable[[], list]) -> list:
        """The actors of ``key``, started by ``start()`` when the cache has none."""
        entry = self.entries.get(key)
        if entry is None:
            actors = start()
            entry = {"actors": actors, "loans": 0}
            self.started += len(actors)
            self.entries[key] = entry
        entry["loans"] += 1
        self.entries.move_to_end(key)
        self._evict()
        return entry["actors"]

    def give_back(self, key: str) -> None:
        entry = self.entries.get(key)
        if entry is not None:
            entry["loans"] = max(0, entry["loans"] - 1)
        self._evict()

    def _evict(self, limit: int | None = None) -> None:
        """Kill idle keys, least recently borrowed first, until at most ``limit`` (default ``max_actors``)
        actors are kept or only keys on loan are left."""
        import ray

        limit = self.max_actors if limit is None else limit
        total = sum(len(e["actors"]) for e in self.entries.values())
        for k in list(self.entries):
            if total <= limit:
                break
            entry = self.entries[k]
            if entry["loans"] == 0:
                for a in entry["actors"]:
                    ray.kill(a, no_restart=True)
                total -= len(entry["actors"])
                del self.entries[k]

    def clear(self) -> int:
        """Kill every actor with no loan out; returns how many."""
        before = sum(len(e["actors"]) for e in self.entries.values())
        self._evict(limit=0)
        return before - sum(len(e["actors"]) for e in self.entries.values())

    def state(self) -> dict[str, Any]:
        """{"keys": [(key, loans), ...] least recently borrowed first, "started": actors started so far}."""
        return {"keys": [(k, e["loans"]) for k, e in self.entries.items()], "started": self.started}


def cache():
    """The cluster's :class:`WarmActorCache` actor (started on first use)."""
    import ray

    cluster.init_ray()
    max_actors = int(os.environ.get(MAX_ENV, DEFAULT_MAX_ACTORS))
    # one cache per Ray job (the driver, its Tune trials and Train workers share the job's id): another
    # driver on the same cluster may run another tn_ray
    namespace = f"tn_ray-job-{ray.get_runtime_context().get_job_id()}"
    return ray.remote(WarmActorCache).options(
        name=CACHE_NAME, namespace=namespace, lifetime="detached", get_if_exists=True, num_cpus=0,
        max_concurrency=1,
    ).remote(max_actors)


def warm_resources(resources: dict[str, float]) -> dict[str, float]:
    """What a warm actor reserves: its GPU share, or nothing on a CPU-only cluster (see the module)."""
    return resources if resources.get("num_gpus", 0) > 0 else {"num_gpus": 0, "num_cpus": 0}


def borrow(spec: str, cfg: ScoringConfig, n: int, resources: dict[str, float],
           start: Callable[[str, int, int, dict[str, float]], list]) -> tuple[str, list]:
    """(key, actors) of a warm pool, ``start(spec, text_batch_size, n, resources)`` making them when the
    cache has none; the caller gives the key back with :func:`give_back`."""
    import ray

    res = warm_resources(resources)
    k = key(spec, cfg, n, res)
    return k, ray.get(cache().borrow.remote(k, functools.partial(start, spec, cfg.text_batch_size, n, res)))


def give_back(k: str) -> None:
    import ray

    ray.get(cache().give_back.remote(k))


def release_all() -> int:
    """Kill the cluster's idle warm actors (none on loan); returns how many."""
    import ray

    return ray.get(cache().clear.remote())
