"""The reward service as a Ray Serve application: one deployment per reward model, one HTTP front.

Each model deployment's replicas wrap :class:`tn_ray.scoring.workers.RewardWorker` (the same model
code as the reward actors: images encoded once per request, text features cached for the
replica's lifetime) and batch concurrent requests with ``@serve.batch`` (up to ``max_batch_size``
images per model call, waiting at most ``batch_wait_timeout_s``). The front (FastAPI ingress)
checks each request (:mod:`tn_ray.serve.inputs`), sends each needed model its images and texts,
and turns the rows into the requested reward columns with the one reward-columns function.

Routes (docs/serve.md): ``POST /v1/score``, ``POST /v1/score_rows`` (one model's raw rows: the
:class:`tn_ray.scoring.service_pool.ServicePool` backend), ``GET /v1/rewards``, ``GET /v1/stats``,
``GET /v1/health``; inside the cluster, the front's ``rows`` method through a Serve handle
(:class:`tn_ray.scoring.service_pool.HandlePool`).
"""
# no `from __future__ import annotations`: FastAPI reads the route signatures (Request) at run time

import asyncio
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError

from tn_ray.client import TOKEN_ENV
from tn_ray.labeling.security import LOOPBACK_HOSTS, token_ok
from tn_ray.rewards import parse
from tn_ray.rewards.revisions import reward_revision
from tn_ray.scoring.workers import RewardWorker
from tn_ray.serve.config import ReplicaConfig, ServeConfig
from tn_ray.serve.inputs import RequestError, answer, check_prompt, decode_image, image_bytes, parse_json, parse_request

log = logging.getLogger(__name__)

api = FastAPI(title="tn_ray reward service", docs_url=None, redoc_url=None, openapi_url=None)


def _images_in(requests: Sequence[tuple[list, list]]) -> int:
    """Batch size of queued requests, in images (what a model call costs)."""
    return sum(len(images) for images, _ in requests)


class RewardReplica:
    """One replica of one reward model: a :class:`RewardWorker` behind Serve's dynamic batching.

    ``@serve.batch`` gathers the requests that arrive within ``batch_wait_timeout_s`` of each other;
    Serve forms its next batch at once, even while the model is busy, so under load it would queue
    many small batches. The one model loop here therefore merges every batch waiting when the model
    becomes free (up to ``max_batch_size`` images) into one model call: requests that arrive during
    a long forward pass are scored together in the next one.
    """

    def __init__(self, spec: str, replica: dict[str, Any]):
        rc = ReplicaConfig.model_validate(replica)
        self.spec = spec
        self.max_images = rc.max_batch_size
        self.worker = RewardWorker(spec, rc.text_batch_size)
        self._batched.set_max_batch_size(rc.max_batch_size)
        self._batched.set_batch_wait_timeout_s(rc.batch_wait_timeout_s)
        self.counts = {"requests": 0, "model_calls": 0, "images": 0}
        self._waiting: list[tuple[list[tuple[list, list]], asyncio.Future]] = []  # Serve batches, not yet scored
        self._loop_task: asyncio.Task | None = None

    async def score(self, images: Sequence[Any], texts_per_image: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """One request's rows (one per image, over its own texts); batched with concurrent ones."""
        self.counts["requests"] += 1
        return await self._batched((list(images), [list(t) for t in texts_per_image]))

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.02, batch_size_fn=_images_in, max_concurrent_batches=64)
    async def _batched(self, requests: list[tuple[list, list]]) -> list[list[np.ndarray]]:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((requests, future))
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._model_loop())
        return await future

    async def _model_loop(self) -> None:
        """While batches wait: take as many as fit ``max_images`` (at least one), score them in one
        model call (in a thread, so the replica keeps queueing), hand each request its rows."""
        while self._waiting:
            take, n = [], 0
            while self._waiting and (not take or n + _images_in(self._waiting[0][0]) <= self.max_images):
                batch, future = self._waiting.pop(0)
                take.append((batch, future))
                n += _images_in(batch)
            requests = [r for batch, _ in take for r in batch]
            images = [im for ims, _ in requests for im in ims]
            texts = [t for _, ts in requests for t in ts]
            try:
                rows = await asyncio.to_thread(self.worker.score, images, texts)
            except Exception as err:  # every waiting request gets the error; the loop goes on
                for _, future in take:
                    future.set_exception(err)
                continue
            self.counts["model_calls"] += 1
            self.counts["images"] += len(images)
            k = 0
            for batch, future in take:
                out = []
                for ims, _ in batch:
                    out.append(rows[k : k + len(ims)])
                    k += len(ims)
                future.set_result(out)

    def stats(self) -> dict[str, int]:
        return {**self.counts, **self.worker.stats()}


def deployment_name(i: int, spec: str) -> str:
    return f"reward{i}_" + re.sub(r"[^A-Za-z0-9_-]+", "_", spec).strip("_")


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


@serve.ingress(api)
class RewardFront:
    """The HTTP front: access rule, request checks, fan-out to the model deployments, reward columns."""

    def __init__(self, cfg: dict[str, Any], token: str | None, handles: Mapping[str, Any]):
        self.cfg = ServeConfig.model_validate(cfg)
        self.token = token
        self.handles = dict(handles)
        self.revisions = {m: reward_revision(m) for m in self.cfg.models}

    # --- access -----------------------------------------------------------------------------
    def _refused(self, request: Request) -> JSONResponse | None:
        """401 without the right token (when one is set, ``Authorization: Bearer <token>``); without
        a token, 403 unless the Host header is a loopback name (no DNS rebinding)."""
        if self.token is not None:
            auth = request.headers.get("authorization", "")
            given = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
            if not token_ok(given, self.token):
                return _error("token required: send the header 'Authorization: Bearer <token>'", 401)
            return None
        host = (request.headers.get("host") or "").rsplit(":", 1)[0].strip("[]")
        if host not in LOOPBACK_HOSTS:
            return _error(f"host {host!r} refused: this service answers loopback names only", 403)
        return None

    async def _body(self, request: Request) -> bytes:
        limit = self.cfg.limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(f"request body of {declared} bytes is over the limit of {limit} bytes", 413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestError(f"request body is over the limit of {limit} bytes", 413)
        return bytes(body)

    # --- routes -----------------------------------------------------------------------------
    @api.get("/v1/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/rewards")
    async def rewards(self, request: Request):
        refused = self._refused(request)
        if refused is not None:
            return refused
        return {
            "columns": self.cfg.columns,
            "models": self.cfg.models,
            "revisions": self.revisions,
            "contrast_sources": self.cfg.contrast_sources,
            "textnorm": self.cfg.textnorm.model_dump(),
            "ensembles": [e.model_dump() for e in self.cfg.ensembles],
            "limits": self.cfg.limits.model_dump(),
            "image_paths": bool(self.cfg.image_roots),
            "image_uris": bool(self.cfg.uri_roots),
        }

    @api.get("/v1/stats")
    async def stats(self, request: Request):
        """Counters of one replica of each model (all of them when each model has one replica)."""
        refused = self._refused(request)
        if refused is not None:
            return refused
        return {m: await h.stats.remote() for m, h in self.handles.items()}

    @api.post("/v1/score")
    async def score(self, request: Request):
        refused = self._refused(request)
        if refused is not None:
            return refused
        try:
            body = await self._body(request)
            job = await asyncio.to_thread(parse_request, body, self.cfg)
        except RequestError as err:
            return _error(str(err), err.status)
        calls = {}
        for m, contrast in job.models.items():
            texts = job.texts if contrast else [[p] for p in job.prompts]
            calls[m] = self.handles[m].score.remote(job.images, texts)
        try:
            rows = {m: await c for m, c in calls.items()}
        except RayActorError as err:  # a replica died with the request: Serve replaces it; the client retries
            return _error(f"a model replica died while scoring ({type(err).__name__}); retry the request", 503)
        return answer(job, rows, self.cfg, self.revisions)

    @api.post("/v1/score_rows")
    async def score_rows(self, request: Request):
        """One model's raw rows: ``{"model", "images", "texts"}`` (a list of texts per image) ->
        ``{"rows": [[...], ...], "revision"}``: the remote backend of ``RewardPool``."""
        refused = self._refused(request)
        if refused is not None:
            return refused
        try:
            body = await self._body(request)
            model, images, texts = await asyncio.to_thread(self._parse_rows, body)
        except RequestError as err:
            return _error(str(err), err.status)
        try:
            rows = await self.handles[model].score.remote(images, texts)
        except RayActorError as err:
            return _error(f"a model replica died while scoring ({type(err).__name__}); retry the request", 503)
        return {"model": model, "revision": self.revisions[model],
                "rows": [[float(x) for x in r] for r in rows]}

    async def rows(self, model: str, images: Sequence[Any], texts_per_image: Sequence[Sequence[str]]) -> list:
        """One model's raw rows for a caller inside the cluster (a Serve handle, no HTTP): the images as
        :func:`tn_ray.rewards.base.load_image` reads them; the backend of ``reward: {service: serve:<app>}``."""
        if model not in self.handles:
            raise RequestError(f"unknown reward model {model!r}; this service serves {self.cfg.models}")
        return await self.handles[model].score.remote(list(images), [list(t) for t in texts_per_image])

    def _parse_rows(self, body: bytes) -> tuple[str, list[np.ndarray], list[list[str]]]:
        cfg = self.cfg
        data = parse_json(body, cfg.limits)
        unknown = sorted(set(data) - {"model", "images", "texts"})
        if unknown or not {"model", "images", "texts"} <= set(data):
            raise RequestError("score_rows expects exactly the fields model, images, texts")
        try:
            model = str(parse(data["model"])) if isinstance(data["model"], str) else None
        except (KeyError, ValueError):
            model = None
        if model not in cfg.models:
            raise RequestError(f"unknown reward model {data['model']!r}; this service serves {cfg.models}")
        images, texts = data["images"], data["texts"]
        if not isinstance(images, list) or not isinstance(texts, list) or len(images) != len(texts):
            raise RequestError("images and texts must be lists of the same length (one list of texts per image)")
        if not images:
            raise RequestError("no pairs: the request holds no image")
        if len(images) > cfg.limits.max_pairs:
            raise RequestError(f"too many pairs: {len(images)}; the limit is {cfg.limits.max_pairs} per request", 413)
        for i, ts in enumerate(texts):
            if not isinstance(ts, list) or not ts or len(ts) > cfg.limits.max_contrast + 1:
                raise RequestError(f"texts[{i}]: expected a list of 1 to {cfg.limits.max_contrast + 1} prompts")
            for j, t in enumerate(ts):
                check_prompt(t, f"texts[{i}][{j}]", cfg.limits)
        arrays = [decode_image(image_bytes(it, f"images[{i}]", cfg), f"images[{i}]", cfg.limits)
                  for i, it in enumerate(images)]
        return model, arrays, texts


def build_app(cfg: ServeConfig, token: str | None = None):
    """The Serve application (``serve.run`` it): a deployment per model, the front bound to them. With
    ``token`` every request needs it; without, only loopback Host headers are answered."""
    if cfg.token_required and not token:
        raise ValueError(f"binding to {cfg.host} (or require_token) needs a token")
    handles = {}
    for i, spec in enumerate(cfg.models):
        rc = cfg.replica_for(spec)
        scaling: dict[str, Any] = (
            {"num_replicas": rc.min_replicas} if rc.min_replicas == rc.max_replicas else
            {"autoscaling_config": {"min_replicas": rc.min_replicas, "max_replicas": rc.max_replicas,
                                    "target_ongoing_requests": rc.target_ongoing_requests}}
        )
        dep = serve.deployment(RewardReplica).options(
            name=deployment_name(i, spec),
            ray_actor_options={"num_cpus": rc.num_cpus, "num_gpus": rc.num_gpus},
            max_ongoing_requests=rc.max_ongoing_requests,
            **scaling,
        )
        handles[spec] = dep.bind(spec, rc.model_dump())
    front = serve.deployment(RewardFront).options(
        name="front", ray_actor_options={"num_cpus": cfg.front_num_cpus}, max_ongoing_requests=256
    )
    return front.bind(cfg.model_dump(mode="json"), token, handles)


def app_builder(args: dict[str, Any]):
    """Serve's application builder (``import_path: tn_ray.serve.app:app_builder``, ``args``: a
    :class:`ServeConfig`'s fields, as :func:`deploy_config` writes them): the application ``tn-ray serve
    rewards`` runs. The token, when the config needs one, comes from ``TN_RAY_SERVE_TOKEN`` where Serve
    builds the application (it is never written in the config file)."""
    cfg = ServeConfig.model_validate(args)
    token = os.environ.get(TOKEN_ENV) or None
    if cfg.token_required and not token:
        raise ValueError(f"binding to {cfg.host} (or require_token) needs a token: set {TOKEN_ENV} where Serve "
                         "builds the application (the cluster's environment, or the application's runtime_env "
                         "env_vars)")
    return build_app(cfg, token)


BUILDER = f"{app_builder.__module__}:{app_builder.__qualname__}"  # the import_path of deploy_config's file


def deploy_config(cfg: ServeConfig) -> dict[str, Any]:
    """Serve's config file (``serve deploy FILE`` / ``serve run FILE``) of the application :func:`start`
    runs: ``http_options`` from the config, one application (``app_name``, ``route_prefix``) built by
    :func:`app_builder` from ``args`` (the config less ``ray``: Serve deploys to the cluster it is given).
    Checked against Serve's own schema."""
    from ray.serve.schema import ServeDeploySchema

    doc = {
        "http_options": http_options(cfg),
        "applications": [{"name": cfg.app_name, "route_prefix": cfg.route_prefix, "import_path": BUILDER,
                          "args": cfg.model_dump(mode="json", exclude={"ray"})}],
    }
    ServeDeploySchema.model_validate(doc)
    return doc


def url_of(cfg: ServeConfig) -> str:
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    host = f"[{host}]" if ":" in host else host
    scheme = "https" if cfg.ssl_certfile else "http"
    return f"{scheme}://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def http_options(cfg: ServeConfig) -> dict[str, Any]:
    """Serve's ``http_options``: the bind, and TLS when the config names a certificate and key."""
    out: dict[str, Any] = {"host": cfg.host, "port": cfg.port}
    if cfg.ssl_certfile:
        out.update(ssl_certfile=cfg.ssl_certfile, ssl_keyfile=cfg.ssl_keyfile)
    return out


def start(cfg: ServeConfig, token: str | None = None) -> str:
    """Start Serve's HTTP proxy on ``cfg.host:cfg.port`` (on the local Ray, or the cluster of
    ``cfg.ray``), deploy the application and return its base URL once every replica is up."""
    from tn_ray.cluster import init_ray

    init_ray(cfg.ray)
    serve.start(http_options=http_options(cfg))
    serve.run(build_app(cfg, token), name=cfg.app_name, route_prefix=cfg.route_prefix)
    return url_of(cfg)
