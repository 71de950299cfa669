"""``toy_regression``: a tiny training trainable that proves the contract RWR/DDPO follow.

A small MLP, initialised from a frozen reference model (the "pretrained" one), is fitted to
noisy samples of a 1-d function. Its loss is ``mse(f(x), y) + kl * mean((f(x) - f_ref(x))^2)``:
for Gaussian policies of equal variance that penalty is the KL divergence to the reference
up to a constant, the same role the KL coefficient plays in RWR and DDPO, so the sweep over
``kl`` in {0, 0.25, 0.5, 0.75, 1} has the same shape as theirs.

Per epoch it reports ``val_loss`` (held-out MSE), ``kl_to_ref`` and ``epoch``, with a
checkpoint (model, optimizer, epoch) through ``tune.Checkpoint``; ASHA can stop it between
epochs, and a restored trial continues from its last checkpoint (``resumed_from``). Batches
are drawn from a generator seeded by (seed, epoch), so a resumed trial ends bit-identical to
one that never stopped.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from tn_ray.config import StrictModel
from tn_ray.sweep.trainable import SweepTrainable

PARAMS = {"lr": 1e-2, "kl": 0.0, "hidden": 16}


class ToyOptions(StrictModel):
    epochs: int = Field(8, ge=1, description="epochs per trial (count); one report + checkpoint each")
    samples: int = Field(512, ge=16, description="training samples (count); as many again for validation")
    steps_per_epoch: int = Field(20, ge=1, description="optimizer steps per epoch (count)")
    batch_size: int = Field(64, ge=1, description="samples per optimizer step (count)")
    seed: int = Field(0, description="seed of the data, the reference model and the batches")


@dataclass
class ToyData:
    options: ToyOptions
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    fingerprint: str = ""


def prepare(options: ToyOptions, sweep=None) -> ToyData:
    rng = np.random.default_rng(options.seed)
    x = rng.uniform(-3, 3, size=(2 * options.samples, 1)).astype(np.float32)
    y = (np.sin(1.5 * x) + 0.3 * x + rng.normal(0, 0.1, size=x.shape)).astype(np.float32)
    n = options.samples
    return ToyData(options, x[:n], y[:n], x[n:], y[n:], fingerprint=f"toy-{options.model_dump_json()}")


def _model(hidden: int, seed: int):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(1, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))


def new_state(params: dict[str, Any], data: ToyData) -> dict[str, Any]:
    """Epoch 0: the model starts as a copy of the frozen reference."""
    import torch

    p = {**PARAMS, **params}
    ref = _model(int(p["hidden"]), data.options.seed)
    model = _model(int(p["hidden"]), data.options.seed)
    opt = torch.optim.Adam(model.parameters(), lr=float(p["lr"]))
    return {"model": model, "ref": ref, "opt": opt, "epoch": 0}


def fit_epoch(state: dict[str, Any], params: dict[str, Any], data: ToyData) -> dict[str, float]:
    """One epoch of training; returns the epoch's metrics."""
    import torch

    p = {**PARAMS, **params}
    model, ref, opt = state["model"], state["ref"], state["opt"]
    epoch = state["epoch"] + 1
    gen = np.random.default_rng([data.options.seed, epoch])
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    for _ in range(data.options.steps_per_epoch):
        idx = torch.from_numpy(gen.integers(0, len(x), size=data.options.batch_size))
        pred = model(x[idx])
        with torch.no_grad():
            anchor = ref(x[idx])
        loss = torch.nn.functional.mse_loss(pred, y[idx]) + float(p["kl"]) * ((pred - anchor) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    state["epoch"] = epoch
    with torch.no_grad():
        xv = torch.from_numpy(data.x_val)
        pred = model(xv)
        val = torch.nn.functional.mse_loss(pred, torch.from_numpy(data.y_val)).item()
        drift = ((pred - ref(xv)) ** 2).mean().item()
    return {"val_loss": val, "kl_to_ref": drift, "train_loss": float(loss.item()), "epoch": epoch}


def train(config: dict[str, Any], data: ToyData) -> None:
    """The Tune function trainable: report + checkpoint every epoch, resume from a checkpoint."""
    import torch
    from ray import tune

    torch.set_num_threads(1)
    state = new_state(config, data)
    resumed_from = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            saved = torch.load(os.path.join(folder, "state.pt"), weights_only=True)
        state["model"].load_state_dict(saved["model"])
        state["opt"].load_state_dict(saved["opt"])
        state["epoch"] = resumed_from = int(saved["epoch"])
    while state["epoch"] < data.options.epochs:
        metrics = fit_epoch(state, config, data)
        with tempfile.TemporaryDirectory() as folder:
            torch.save({"model": state["model"].state_dict(), "opt": state["opt"].state_dict(),
                        "epoch": state["epoch"]}, os.path.join(folder, "state.pt"))
            tune.report({**metrics, "resumed_from": resumed_from}, checkpoint=tune.Checkpoint.from_directory(folder))


def check_param(options: ToyOptions, name: str, value: Any) -> str | None:
    if name not in PARAMS:
        return f"unknown parameter '{name}'; expected one of {list(PARAMS)}"
    if name == "hidden":
        return None if isinstance(value, int) and value >= 1 else f"hidden must be an integer >= 1, got {value!r}"
    if not isinstance(value, (int, float)):
        return f"{name} must be a number, got {value!r}"
    if name == "lr" and value <= 0:
        return f"learning rate must be > 0, got {value!r}"
    if name == "kl" and value < 0:
        return f"KL coefficient must be >= 0, got {value!r}"
    return None


TOY_REGRESSION = SweepTrainable(
    name="toy_regression", kind="train", fn=train, options=ToyOptions, prepare=prepare, check_param=check_param,
    description="tiny MLP fitted to a 1-d function with a KL-style penalty to its reference (lr, kl, hidden); reports "
                "per epoch, checkpoints",
)
