"""The reward service as a :class:`RewardPool` backend: ``reward: {service: URL}`` sends a run's
scoring to a warm ``tn-ray serve rewards`` instead of starting reward actors (:class:`ServicePool`,
over HTTP), and ``reward: {service: serve:<app>}`` to the application in the same Ray cluster
through its Serve handle (:class:`HandlePool`).

Requests go over HTTP (:class:`tn_ray.client.RewardClient`, JSON, images as lossless PNG / the
given PNG/JPEG bytes, a store URI as ``{"path": uri}`` for the service to read under its image roots)
from a few threads, so submit / collect keep their meaning: submit returns at
once with futures, collect waits for them in submit order. The token, when the service needs one,
comes from ``TN_RAY_SERVE_TOKEN`` (never from a config file). Only ``score`` is served: reward
learning's embeddings need in-process actors.
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from tn_ray import cluster
from tn_ray.client import TOKEN_ENV, RewardClient
from tn_ray.config import ScoringConfig
from tn_ray.errors import InputError
from tn_ray.rewards import parse
from tn_ray.scoring.workers import RewardPool


class ServicePool(RewardPool):
    """A :class:`RewardPool` whose workers are ``connections`` HTTP connections to the reward
    service at ``url`` (its base URL); the service must serve ``spec``."""

    def __init__(self, spec: str, url: str, cfg: ScoringConfig | None = None, token: str | None = None,
                 connections: int = 4):
        self.url = url
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)  # never from a config file
        self.connections = connections
        self._executor: ThreadPoolExecutor | None = None
        super().__init__(str(parse(spec)), cfg)

    # --- backend ----------------------------------------------------------------------------
    def _start(self) -> list:
        client = RewardClient(self.url, self.token)
        info = client.rewards()
        if self.spec not in info["models"]:
            raise InputError(f"reward service {self.url} does not serve {self.spec}; it serves {info['models']}")
        self.revision = info["revisions"][self.spec]  # the weights the service scores with
        return [client] * self.connections

    def _pool_threads(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.connections, thread_name_prefix="reward-service")
        return self._executor

    def _call(self, worker: int, method: str, *args) -> Future:
        if method != "score":
            raise InputError(f"reward service {self.url}: '{method}' is not served (reward learning's embeddings "
                             "need in-process reward actors: leave out reward.service)")
        return self._pool_threads().submit(self.workers[worker].score_rows, self.spec, *args)

    def _wait(self, futures: list) -> list:
        return [[np.asarray(row, dtype=np.float32) for row in f.result()] for f in futures]

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.workers = []

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_executor": None}


class HandlePool(RewardPool):
    """A :class:`RewardPool` whose worker is the reward service's Serve application ``app`` in this
    Ray cluster, reached through its handle (no HTTP, no token: inside the cluster): requests go to
    the front's ``rows`` method, which hands them to the model's batched deployment."""

    def __init__(self, spec: str, app: str, cfg: ScoringConfig | None = None):
        self.app = app
        super().__init__(str(parse(spec)), cfg)

    def _start(self) -> list:
        from ray import serve

        cluster.init_ray()
        try:
            handle = serve.get_app_handle(self.app)
        except Exception as err:  # Serve raises RayServeException for an app that is not running
            raise InputError(f"reward service: no Serve application {self.app!r} runs in this cluster "
                             f"({err})") from None
        return [handle]

    def _call(self, worker: int, method: str, *args):
        if method != "score":
            raise InputError(f"reward service serve:{self.app}: '{method}' is not served (reward learning's "
                             "embeddings need in-process reward actors: leave out reward.service)")
        return self.workers[worker].rows.remote(self.spec, *args)

    def _wait(self, futures: list) -> list:
        return [f.result() for f in futures]

    def shutdown(self) -> None:
        self.workers = []  # the application keeps serving: it is not this pool's to stop


def reward_pool(spec: str, cfg: ScoringConfig | None = None, service: str | None = None) -> RewardPool:
    """The pool of one reward model: the reward service at ``service`` when given (an http(s) URL, or
    ``serve:<app name>`` for the application in this Ray cluster), else Ray actors."""
    if not service:
        return RewardPool(spec, cfg)
    if service.startswith("serve:"):
        return HandlePool(spec, service[len("serve:"):], cfg)
    return ServicePool(spec, service, cfg)
