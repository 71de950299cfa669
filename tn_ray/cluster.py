"""Ray itself: start or join a cluster, and size actor pools (one per GPU, else CPU actors).

Every pool of model actors (reward models, text-to-image pipelines, training workers) is
sized by :func:`actor_pool`, so the rule "one actor per GPU (or GPU fraction), CPU actors on a
CPU-only cluster" lives in one place.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from tn_ray.config import RayConfig

log = logging.getLogger(__name__)

# environment a worker needs to behave like the driver (offline hub, caches, data dirs,
# and the testing-only fault hook of tn_ray.testing)
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_OFFLINE", "TN_RAY_TIA2_DIR",
                 "TN_RAY_CACHE_DIR", "OMP_NUM_THREADS", "TN_RAY_TESTING_FAULTS", "WANDB_MODE", "WANDB_DIR",
                 "TN_RAY_KEEP_WARM_REWARDS", "TN_RAY_MAX_WARM_REWARDS")


def _quiet_local_workers() -> None:
    """Worker setup of a local Ray (no dashboard, so no state API): Ray Train's placement-group
    cleaner would warn every second that it cannot query the state API."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


# where a local Ray's workers are told its state API server is: nowhere (port 1 refuses at once), as a local
# Ray starts no dashboard
NO_STATE_API = "http://127.0.0.1:1"


def init_ray(cfg: RayConfig | None = None) -> None:
    """Start a local Ray in-process, or join ``cfg.address``; a no-op when already up."""
    import ray

    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    # address None -> "local": a new local Ray even when another one runs on this machine
    # (plain None makes ray.init join the latest cluster listed in /tmp/ray)
    runtime_env: dict[str, Any] = {"env_vars": env} if env else {}
    if cfg.address is None:
        runtime_env["worker_process_setup_hook"] = _quiet_local_workers
        # a local Ray has no dashboard, so no state API: say so to its workers. Otherwise a worker asking
        # the state API (Ray Train's placement-group cleaner, every second: is the run's controller alive?)
        # finds the dashboard of another Ray instance on this machine (localhost:8265: another run, a test
        # cluster), sees no controller of ours there, takes ours for dead and removes our run's placement group
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), "RAY_API_SERVER_ADDRESS": NO_STATE_API}
    kwargs: dict[str, Any] = dict(address=cfg.address or "local", runtime_env=runtime_env or None,
                                  log_to_driver=True, include_dashboard=False if cfg.address is None else None)
    if cfg.address is None:
        kwargs.update(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)
    ray.init(**{k: v for k, v in kwargs.items() if v is not None})
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_operator_progress_bars = False  # our own progress bars count images / pairs
    ctx.enable_progress_bars = False
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def actor_pool(num_actors: int | None, gpus_per_actor: float, cpus_per_actor: float, *,
               fill_cpus: bool = False, max_actors: int | None = None) -> tuple[int, dict[str, float]]:
    """(number of actors, Ray resources per actor) for a pool of model actors.

    With GPUs: ``num_actors`` or one per ``gpus_per_actor`` share of the cluster's GPUs; the
    actors ask for the GPU only (Ray Data calls mixing CPUs and GPUs on map actors
    experimental, and the GPU is what limits them). Without GPUs: ``num_actors``, else one
    per ``cpus_per_actor`` CPUs when ``fill_cpus`` (generation) or a single actor (reward
    models: one copy of the weights is enough on a CPU machine). ``max_actors`` caps the
    count at the number of work units, so no actor starts with nothing to do.
    """
    import ray

    gpus = cluster_gpus()
    if gpus > 0:
        n = num_actors or max(1, int(gpus / gpus_per_actor))
        res = {"num_gpus": gpus_per_actor}
    else:
        cpus = float(ray.cluster_resources().get("CPU", 1))
        n = num_actors or (max(1, int(cpus // cpus_per_actor)) if fill_cpus else 1)
        res = {"num_gpus": 0, "num_cpus": cpus_per_actor}
    if max_actors is not None:
        n = min(n, max(1, max_actors))
    return n, res
