"""The training loop every method shares, run by Ray Train's ``TorchTrainer`` (one worker per GPU).

A method (RWR, DDPO) is a :class:`Method`: built per worker with the policy, the optimizer
wrapper and its data, it does one optimizer step per ``step(step)`` call and returns that
step's metrics. The :class:`Trainer` around it owns everything else: loading the policy,
resuming from the newest checkpoint in the run's storage, per-step logging, evaluation and
the overoptimization monitor every ``eval.every`` steps, checkpoints, and reports to Ray
Train (a sweep trial passes Ray Tune's ``TuneReportCallback`` to :func:`fit` to forward them;
this module knows nothing about Tune).

Resume is exact: a checkpoint holds the LoRA weights, optimizer, schedule, loss scaler,
global RNG states, the method's own state (data position, buffers, GRPO's EMA) and the monitor; a
method should draw its randomness from generators seeded by (seed, step, rank), so a run
that resumes at step s computes bit-identical steps s+1.. to a run that never stopped.
"""
from __future__ import annotations

import abc
import contextlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tn_ray.storage import join_uri
from tn_ray.training.checkpoint import Checkpoints, rng_state, set_rng_state
from tn_ray.training.config import FineTuneConfig
from tn_ray.training.monitor import Monitor
from tn_ray.training.optim import Optimization
from tn_ray.training.policy import Policy
from tn_ray.training.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device
    out: str


class Method(abc.ABC):
    """One fine-tuning algorithm; the core gives it the policy, ``optim`` and its data."""

    name = "method"

    def __init__(self, cfg: FineTuneConfig, policy, optim, ctx: WorkerContext, data: Any):
        self.cfg = cfg
        self.policy = policy
        self.optim = optim
        self.ctx = ctx
        self.data = data

    @abc.abstractmethod
    def step(self, step: int) -> dict[str, float]:
        """One optimizer step (``optim.backward`` then ``optim.step``); the step's metrics."""

    def train_prompts(self) -> list[str]:
        """The training prompts (evaluation takes its default prompts from them)."""
        return []

    def state_dict(self) -> dict:
        """What the method needs to continue exactly (data position, statistics buffers)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None

    def evaluation_weights(self) -> contextlib.AbstractContextManager:
        """Within this block the policy holds the weights to evaluate and export in checkpoints' LoRA
        files (GRPO with ``ema.enabled``: the EMA of the LoRA weights); by default the trained ones."""
        return contextlib.nullcontext()


def evaluation_steps(cfg: FineTuneConfig) -> list[int]:
    every = cfg.eval.every
    return sorted({*range(every, cfg.max_steps + 1, every), cfg.max_steps})


def _broadcast(flag: bool, ctx: WorkerContext) -> bool:
    """Rank 0's decision, for every worker."""
    if ctx.world_size == 1:
        return flag
    import torch.distributed as dist

    value = [flag]
    dist.broadcast_object_list(value, src=0)
    return bool(value[0])


class Trainer:
    """The per-worker loop (Ray Train's ``train_loop_per_worker`` builds one and runs it)."""

    def __init__(self, cfg: FineTuneConfig, method_cls: type[Method], data: Any, ctx: WorkerContext,
                 report: Callable[[dict], None] | None = None):
        self.cfg = cfg
        self.method_cls = method_cls
        self.data = data
        self.ctx = ctx
        self.report = report or (lambda metrics: None)

    def _resume(self, policy, optim, method, monitor, checkpoints) -> int:
        step = checkpoints.latest()
        if step is None:
            return 0
        state = checkpoints.load(step)
        policy.load_lora_state(state["lora"])
        optim.load_state_dict(state["optim"])
        method.load_state_dict(state.get("method", {}))
        monitor.load_state_dict(state.get("monitor", {}))
        set_rng_state(state["rng"])
        log.info("resumed from %s (step %d)", checkpoints.uri(step), step)
        return step

    def run(self) -> dict[str, Any]:
        cfg, ctx = self.cfg, self.ctx
        torch.manual_seed(cfg.seed)
        policy = Policy.load(cfg.policy, str(ctx.device), seed=cfg.seed)
        if ctx.world_size > 1:
            policy.wrap_ddp()
        optim = Optimization(policy.trainable_parameters(), cfg.optimizer, cfg.max_steps, ctx.device, policy.amp_dtype)
        method = self.method_cls(cfg, policy, optim, ctx, self.data)
        checkpoints = Checkpoints(cfg.out)
        monitor = Monitor(cfg.monitor.window, cfg.monitor.tolerance)
        start = self._resume(policy, optim, method, monitor, checkpoints)
        end = min(cfg.max_steps, cfg.stop_after_steps or cfg.max_steps)
        evaluator = None
        if ctx.rank == 0 and cfg.eval.enabled:
            from tn_ray.training.evaluation import Evaluator

            evaluator = Evaluator(cfg, method.train_prompts())
            base = evaluator.base(policy)
            if not monitor.history:
                monitor.update(0, base[cfg.reward.use], {j: base[j] for j in cfg.judge_names()})
        tracker = Tracker(
            cfg.logging, cfg.out, cfg.max_steps, start, ctx.rank, cfg.model_dump(mode="json"), method.name
        )
        eval_at = set(evaluation_steps(cfg)) if cfg.eval.enabled else set()
        evaluated: set[int] = set(evaluator.evaluated_steps()) if evaluator else set()
        summary: dict[str, Any] = {"start_step": start, "end_step": start, "stopped_by_monitor": False}
        try:
            for step in range(start + 1, end + 1):
                metrics = method.step(step)
                tracker.log(step, metrics)
                tracker.advance(metrics)
                report = {**metrics, "step": step}
                stop = False
                if step in eval_at and evaluator is not None:
                    with method.evaluation_weights():
                        result = evaluator.evaluate(step, policy)
                    evaluated.add(step)
                    tracker.log(step, result, prefix="eval")
                    report.update(result)
                    flag = monitor.update(step, result[cfg.reward.use], {j: result[j] for j in cfg.judge_names()})
                    if flag is not None:
                        log.warning(flag.message(cfg.reward.use))
                        evaluator.record_flag(flag, cfg.reward.use)
                        stop = cfg.monitor.stop_on_overoptimization
                stop = _broadcast(stop, ctx)
                if step in eval_at or step % cfg.checkpoint.every == 0 or step == end or stop:
                    if ctx.rank == 0:
                        state = {
                            "lora": policy.lora_state(),  # the trained weights: resume
                            "optim": optim.state_dict(),
                            "method": method.state_dict(),
                            "monitor": monitor.state_dict(),
                            "rng": rng_state(),
                        }
                        with method.evaluation_weights():  # the LoRA file: the evaluated weights
                            report["checkpoint"] = checkpoints.save(step, policy, state)
                        checkpoints.prune(self.cfg.checkpoint.keep_last, evaluated)
                        tracker.sync()
                    self.report(report)
                summary["end_step"] = step
                if stop:
                    summary["stopped_by_monitor"] = True
                    log.warning("stop_on_overoptimization: ending the run at step %d", step)
                    break
        finally:
            tracker.close()
            if evaluator is not None:
                evaluator.close()
        return summary


def worker_loop(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    import ray.train
    import ray.train.torch

    cfg = config["config_class"].model_validate(config["cfg"])
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    context = ray.train.get_context()
    ctx = WorkerContext(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device(), cfg.out)
    data = config["data"]
    if hasattr(data, "hex") and type(data).__name__ == "ObjectRef":
        data = ray.get(data)
    trainer = Trainer(cfg, config["method"], data, ctx, report=lambda m: ray.train.report(m))
    trainer.run()


def ray_storage(out: str) -> str:
    from pathlib import Path

    return join_uri(out, "ray") if "://" in out else str(Path(out).resolve() / "ray")


def fit(cfg: FineTuneConfig, method: type[Method], data: Any, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Run ``method`` (a :class:`Method` subclass) under a ``TorchTrainer``.

    Resumes from the newest checkpoint in ``cfg.out`` (a previous, killed invocation).
    ``callbacks`` go to Ray Train's ``RunConfig``: a sweep trial passes ``TuneReportCallback``
    so that every report reaches Tune.
    """
    import time

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tn_ray.cluster import init_ray

    init_ray(cfg.ray)
    use_gpu = cfg.scaling.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    # classes travel by reference (cloudpickle), so the workers import them from tn_ray
    config = {"cfg": cfg.model_dump(mode="json"), "config_class": type(cfg), "method": method, "data": ray.put(data)}
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=RunConfig(
            name=f"train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
            storage_path=ray_storage(cfg.out),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            callbacks=list(callbacks),
        ),
    )
    result = trainer.fit()
    return {"metrics": dict(result.metrics or {}), "ray_path": result.path}


def write_json(store, rel: str, obj: Any) -> None:
    store.write_text(rel, json.dumps(obj, indent=1, default=float))
