"""Checkpoints of a fine-tuning run on its storage (local folder or cloud URI) and exact resume.

Layout under the run's ``out``::

    checkpoints/step-000100/pytorch_lora_weights.safetensors   the adapter, diffusers' LoRA format
    checkpoints/step-000100/state.pt     LoRA (peft names), optimizer, scheduler, loss scaler, RNG
                                         states, step, the method's state (data position, buffers),
                                         the monitor's history
    checkpoints/step-000100/complete.json   written last: a checkpoint without it is ignored

Every file is written atomically through :class:`tn_ray.storage.Store`, so a run killed with
SIGKILL at any moment leaves only complete checkpoints, and the same command resumes from
the newest one. ``state.pt`` loads with ``torch.load(weights_only=True)`` (tensors and plain
Python values only: numpy RNG state is stored as lists).
"""
from __future__ import annotations

import io
import json
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from tn_ray.storage import Store
from tn_ray.training.policy import LORA_FILE, Policy

STATE_FILE = "state.pt"
DONE_FILE = "complete.json"
_NAME = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    """Global RNG states of torch (CPU and CUDA), numpy and Python."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def step_name(step: int) -> str:
    return f"step-{step:06d}"


class Checkpoints:
    """The checkpoints of one run: ``save``, list complete ``steps``, ``load`` state, fetch LoRA."""

    def __init__(self, out: str | Path):
        self.store = Store(out)

    def rel(self, step: int, name: str = "") -> str:
        return f"checkpoints/{step_name(step)}" + (f"/{name}" if name else "")

    def uri(self, step: int) -> str:
        """Where a checkpoint's folder is (a local path or a URI): ``load_lora_weights`` takes it."""
        return self.store.uri(self.rel(step))

    def steps(self) -> list[int]:
        out = []
        for rel in self.store.list_files("checkpoints", DONE_FILE):
            m = _NAME.match(rel.split("/")[-2])
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, policy: Policy, state: dict) -> str:
        """Write the policy's LoRA weights (the LoRA file) and ``state`` (plus the step, and the LoRA weights
        as ``lora`` unless ``state`` has them: the trained weights when the file holds an EMA) as checkpoint
        ``step``; returns its URI."""
        with tempfile.TemporaryDirectory() as tmp:
            lora = policy.save_lora(tmp)
            self.store.write_bytes(self.rel(step, LORA_FILE), lora.read_bytes())
        buf = io.BytesIO()
        lora = state["lora"] if "lora" in state else policy.lora_state()
        torch.save({**state, "step": int(step), "lora": lora}, buf)
        self.store.write_bytes(self.rel(step, STATE_FILE), buf.getvalue())
        self.store.write_text(self.rel(step, DONE_FILE), json.dumps({"step": int(step)}))
        return self.uri(step)

    def load(self, step: int) -> dict:
        return torch.load(io.BytesIO(self.store.read_bytes(self.rel(step, STATE_FILE))), weights_only=True)

    def lora_bytes(self, step: int) -> bytes:
        return self.store.read_bytes(self.rel(step, LORA_FILE))

    def lora_folder(self, step: int, local: str | Path) -> Path:
        """A local folder holding checkpoint ``step``'s LoRA file (the folder itself for a local run)."""
        if self.store.local:
            return Path(self.uri(step))
        folder = Path(local)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / LORA_FILE).write_bytes(self.lora_bytes(step))
        return folder

    def delete(self, step: int) -> None:
        for rel in (self.rel(step, DONE_FILE), self.rel(step, STATE_FILE), self.rel(step, LORA_FILE)):
            if self.store.exists(rel):
                self.store.delete(rel)

    def prune(self, keep_last: int | None, protect: set[int]) -> list[int]:
        """Delete all but the ``keep_last`` newest checkpoints that are not in ``protect``."""
        if keep_last is None:
            return []
        candidates = [s for s in self.steps() if s not in protect]
        gone = candidates[:-keep_last] if len(candidates) > keep_last else []
        for s in gone:
            self.delete(s)
        return gone
