"""Training the head on cached embeddings: one epoch loop, run by Ray Train or a Tune trial.

:func:`epochs` is the loop both callers share: AdamW on the head, batches drawn by a generator
seeded by (seed, epoch), per-epoch validation AUROC (mean over held-out prompts, through
:mod:`tn_ray.analysis.metrics`), early stopping after ``patience`` epochs without
improvement, and a checkpoint per epoch (head, optimizer, epoch, best head so far) through the
caller's ``report``. :func:`fit` runs it under Ray Train's ``TorchTrainer`` (data parallel:
each worker takes its share of every batch and DDP averages the gradients; resumes from
``ray.train.get_checkpoint()`` after a worker failure); the ``reward_head`` sweep trainable
runs it inside a Tune trial with ``tune.report``.
"""
from __future__ import annotations

import copy
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from tn_ray.analysis.metrics import per_prompt
from tn_ray.reward_learning.losses import total_loss
from tn_ray.rewards.learned_head import RewardHead
from tn_ray.training.config import LoggingBlock
from tn_ray.training.tracking import Tracker

log = logging.getLogger(__name__)

# what a training run varies (a sweep trial overrides some of them)
PARAMS = ("lr", "weight_decay", "hidden", "layers", "dropout", "kind", "aux_weight", "temperature",
          "batch_size", "epochs", "patience", "seed", "checkpoint_every")


def params_of(cfg) -> dict[str, Any]:
    """The training parameters of a :class:`RewardTrainConfig`."""
    return {"lr": cfg.train.lr, "weight_decay": cfg.train.weight_decay, "hidden": cfg.head.hidden,
            "layers": cfg.head.layers, "dropout": cfg.head.dropout, "kind": cfg.loss.kind,
            "aux_weight": cfg.loss.aux_weight, "temperature": cfg.loss.temperature,
            "batch_size": cfg.train.batch_size, "epochs": cfg.train.epochs, "patience": cfg.train.patience,
            "seed": cfg.train.seed, "checkpoint_every": cfg.train.checkpoint_every}


@dataclass
class Arrays:
    """Everything the loop needs, as arrays (shipped to workers through the object store)."""

    image: np.ndarray  # (rows, d) image embedding of each row
    text: np.ndarray  # (texts, d) text embeddings
    text_idx: np.ndarray  # (rows, 1 + max m) rows of `text` for [x0, x1..xm]; -1 = no text
    target: np.ndarray  # (rows,) label the label loss fits (binary or fine)
    keys: pd.DataFrame  # per row: set, prompt, image_id, binary, fine, part
    fingerprint: str = ""

    def rows(self, part: str) -> np.ndarray:
        return np.flatnonzero(self.keys["part"].to_numpy() == part)


@dataclass
class State:
    head: Any
    opt: Any
    epoch: int = 0
    best: float = float("-inf")
    best_epoch: int = 0
    best_state: dict = field(default_factory=dict)
    bad_epochs: int = 0
    stopped: bool = False


def batch_rewards(head, arrays: Arrays, rows: np.ndarray, first_only: bool = False):
    """(rewards (rows, 1 + m), mask) of the rows' images with their [x0, x1..xm]."""
    import torch

    dev = next(head.parameters()).device
    tidx = arrays.text_idx[rows][:, :1] if first_only else arrays.text_idx[rows]
    img = torch.from_numpy(arrays.image[rows]).to(dev)  # fancy indexing copies: writable, unlike the shipped arrays
    txt = torch.from_numpy(arrays.text[np.maximum(tidx, 0)]).to(dev)
    return head(img[:, None, :].expand_as(txt), txt), torch.from_numpy(tidx >= 0).to(dev)


def predict(head, arrays: Arrays, rows: np.ndarray) -> np.ndarray:
    """The learned reward r(x0, y) of each row (eval mode, no gradients)."""
    import torch

    was = head.training
    head.eval()
    with torch.no_grad():
        r, _ = batch_rewards(head, arrays, rows, first_only=True)
    head.train(was)
    return r[:, 0].cpu().numpy().astype(np.float64)


def mean_auroc(keys: pd.DataFrame, reward: np.ndarray) -> float:
    """Mean per-prompt AUROC (prompts with both labels), NaN when there is none."""

    if not len(keys):
        return float("nan")
    table = per_prompt(keys.assign(r=reward), ["r"])
    return float(table["auroc"].mean()) if len(table) else float("nan")


def new_state(params: dict[str, Any], dim: int, device: str = "cpu") -> State:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(params["seed"]))
        head = RewardHead(dim, int(params["hidden"]), int(params["layers"]), float(params["dropout"])).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=float(params["lr"]), weight_decay=float(params["weight_decay"]))
    return State(head, opt)


def standardize(head, arrays: Arrays) -> None:
    """The head's embedding standardisation from the training rows' images and their texts."""
    import torch

    train = arrays.rows("train")
    texts = np.unique(arrays.text_idx[train])
    dev = next(head.parameters()).device
    head.standardize_with(
        torch.from_numpy(arrays.image[train]).to(dev), torch.from_numpy(arrays.text[texts[texts >= 0]]).to(dev)
    )


def fit_epoch(
    state: State, params: dict[str, Any], arrays: Arrays, rank: int = 0, world: int = 1, model=None
) -> dict[str, float]:
    """One pass over the training rows; returns the epoch's metrics (validation included)."""
    import torch

    model = model if model is not None else state.head
    epoch = state.epoch + 1
    train = arrays.rows("train")
    gen = np.random.default_rng([int(params["seed"]), epoch])
    order = train[gen.permutation(len(train))]
    torch.manual_seed(int(params["seed"]) * 100_003 + epoch * 101 + rank)  # dropout masks
    model.train()
    sums = {"loss": 0.0, "label": 0.0, "aux": 0.0}
    steps = 0
    binary = arrays.keys["binary"].to_numpy()
    b = int(params["batch_size"])
    for start in range(0, len(order), b):
        batch = order[start : start + b]
        if len(batch) < world:  # a last batch too small for every rank: skip it on all ranks alike (DDP
            break  # all-reduces every backward, so a rank that skipped alone would hang the others)
        rows = batch[rank::world]
        rewards, mask = batch_rewards(model, arrays, rows, first_only=float(params["aux_weight"]) == 0)
        parts = total_loss(
            rewards,
            mask,
            torch.from_numpy(arrays.target[rows]).to(rewards.device),
            torch.from_numpy(binary[rows] == 1).to(rewards.device),
            str(params["kind"]),
            float(params["aux_weight"]),
            float(params["temperature"]),
        )
        state.opt.zero_grad()
        parts["loss"].backward()
        state.opt.step()
        for k in sums:
            sums[k] += float(parts[k].detach())
        steps += 1
    state.epoch = epoch
    val = arrays.rows("val")
    auroc = mean_auroc(arrays.keys.iloc[val], predict(state.head, arrays, val))
    if np.isnan(auroc):  # no validation prompt with both labels: keep the last epoch
        state.best, state.best_epoch = float("nan"), epoch
        state.best_state = copy.deepcopy(state.head.state_dict())
    elif auroc > state.best + 1e-9 or not state.best_state:
        state.best, state.best_epoch, state.bad_epochs = auroc, epoch, 0
        state.best_state = copy.deepcopy(state.head.state_dict())
    else:
        state.bad_epochs += 1
    state.stopped = state.bad_epochs >= int(params["patience"])
    return {
        "epoch": epoch,
        **{f"train_{k}": v / max(steps, 1) for k, v in sums.items()},
        "val_auroc": auroc,
        "best_val_auroc": state.best,
        "best_epoch": state.best_epoch,
        "stopped": int(state.stopped),
    }


def save_state(state: State, folder: str) -> None:
    import torch

    torch.save(
        {
            "head": state.head.state_dict(),
            "opt": state.opt.state_dict(),
            "epoch": state.epoch,
            "best": state.best,
            "best_epoch": state.best_epoch,
            "best_state": state.best_state,
            "bad_epochs": state.bad_epochs,
            "stopped": state.stopped,
        },
        os.path.join(folder, "state.pt"),
    )


def load_state(state: State, folder: str) -> None:
    import torch

    saved = torch.load(
        os.path.join(folder, "state.pt"), weights_only=True, map_location=next(state.head.parameters()).device
    )
    state.head.load_state_dict(saved["head"])
    state.opt.load_state_dict(saved["opt"])
    state.epoch, state.best, state.best_epoch = int(saved["epoch"]), float(saved["best"]), int(saved["best_epoch"])
    state.best_state, state.bad_epochs, state.stopped = (
        saved["best_state"],
        int(saved["bad_epochs"]),
        bool(saved["stopped"]),
    )


def epochs(
    params: dict[str, Any],
    arrays: Arrays,
    report: Callable[[dict, str | None], None],
    checkpoint=None,
    rank: int = 0,
    world: int = 1,
    model_wrapper: Callable | None = None,
    log_fn: Callable[[int, dict], None] | None = None,
    device: str = "cpu",
) -> State:
    """Train until ``params['epochs']`` or early stopping; ``report(metrics, folder)`` once per
    epoch, ``folder`` holding a checkpoint (rank 0) after an epoch that improved the validation
    AUROC, every ``checkpoint_every`` epochs and at the end, else None."""
    import torch

    torch.set_num_threads(1)
    state = new_state(params, arrays.image.shape[1], device)
    standardize(state.head, arrays)
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            load_state(state, folder)
    model = model_wrapper(state.head) if model_wrapper else state.head
    while state.epoch < int(params["epochs"]) and not state.stopped:
        metrics = fit_epoch(state, params, arrays, rank, world, model)
        if log_fn is not None:
            log_fn(state.epoch, metrics)
        last = state.stopped or state.epoch >= int(params["epochs"])
        keep = last or state.best_epoch == state.epoch or state.epoch % int(params.get("checkpoint_every", 1)) == 0
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0 and keep:
                save_state(state, folder)
            report(metrics, folder if rank == 0 and keep else None)
    return state


# ---------------------------------------------------------------------------------------
# Ray Train
# ---------------------------------------------------------------------------------------


def worker_loop(config: dict) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    import ray
    import ray.train
    import ray.train.torch

    arrays = config["data"]
    if type(arrays).__name__ == "ObjectRef":
        arrays = ray.get(arrays)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    params = config["params"]
    tracker = Tracker(
        LoggingBlock.model_validate(config["logging"]),
        config["log_dir"],
        int(params["epochs"]),
        0,
        rank,
        params,
        config["name"],
    )

    def report(metrics: dict, folder: str | None) -> None:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)

    try:
        epochs(
            params,
            arrays,
            report,
            ray.train.get_checkpoint(),
            rank,
            world,
            model_wrapper=ray.train.torch.prepare_model if world > 1 else None,
            log_fn=lambda epoch, m: (tracker.log(epoch, m), tracker.advance({"loss": m["train_loss"]})),
            device=str(ray.train.torch.get_device()),
        )
    finally:
        tracker.close()


def fit(params: dict[str, Any], arrays: Arrays, cfg, name: str) -> tuple[Any, dict[str, Any]]:
    """Train a head under a ``TorchTrainer``; returns (best head in eval mode, last epoch's metrics)."""
    from pathlib import Path

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tn_ray.cluster import init_ray

    init_ray(cfg.ray)
    use_gpu = bool(cfg.scaling.use_gpu)  # the head is small: CPU unless asked
    out = Path(cfg.out).resolve()
    config = {
        "params": params,
        "data": ray.put(arrays),
        "logging": cfg.logging.model_dump(mode="json"),
        "log_dir": str(out / "runs" / name),
        "name": name,
    }
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(out / "ray"),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    state = new_state(params, arrays.image.shape[1])
    with result.checkpoint.as_directory() as folder:
        load_state(state, folder)
    state.head.load_state_dict(state.best_state)
    return state.head.eval(), {**dict(result.metrics or {}), "ray_path": result.path}
