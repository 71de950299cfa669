"""Per-step logging of a fine-tuning run: TensorBoard events, optional W&B, a progress bar.

TensorBoard files go to ``<out>/tensorboard`` (tensorboardX's ``SummaryWriter``); for a cloud
``out`` they are written locally and copied to the run's storage at every checkpoint.
W&B goes through Ray's integration (``ray.air.integrations.wandb.setup_wandb``, rank 0 only);
``wandb_mode: offline`` writes the run locally for ``wandb sync``. Only rank 0 logs.
"""
from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

from tn_ray.storage import Store
from tn_ray.training.config import LoggingBlock

_TAG = re.compile(r"[^A-Za-z0-9_./-]")


class Tracker:
    def __init__(self, block: LoggingBlock, out: str, total_steps: int, start_step: int = 0, rank: int = 0,
                 run_config: dict | None = None, run_name: str = "finetune"):
        self.block = block
        self.rank = rank
        self.store = Store(out)
        self.writer = None
        self.wandb = None
        self.bar = None
        if rank != 0:
            return
        if block.tensorboard:
            from tensorboardX import SummaryWriter

            self.tb_dir = (
                Path(self.store.path("tensorboard"))
                if self.store.local
                else Path(tempfile.mkdtemp(prefix="tn_ray_tb_"))
            )
            self.tb_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(logdir=str(self.tb_dir), purge_step=start_step + 1 if start_step else None)
        if block.wandb_project is not None and block.wandb_mode != "disabled":
            from ray.air.integrations.wandb import setup_wandb

            os.environ["WANDB_MODE"] = block.wandb_mode
            self.wandb = setup_wandb(
                config=run_config or {},
                project=block.wandb_project,
                name=run_name,
                mode=block.wandb_mode,
                dir=self._wandb_dir(),
                resume="allow",
            )
        if block.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=run_name, unit="step")

    def _wandb_dir(self) -> str:
        """``<out>/wandb`` for a local run (``wandb sync <out>/wandb/offline-run-*`` later), else a temporary folder."""
        if self.store.local:
            self.store.makedirs("wandb")
            return self.store.path("wandb")
        return tempfile.mkdtemp(prefix="tn_ray_wandb_")

    def log(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
        if self.rank != 0:
            return
        # TensorBoard tags allow [A-Za-z0-9_./-]: 'textnorm(clip:tiny)' -> 'textnorm_clip_tiny_'
        scalars = {f"{prefix}/{_TAG.sub('_', k)}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def advance(self, metrics: Mapping[str, float] | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if metrics:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "kl", "reward_mean")})

    def sync(self) -> None:
        """Flush events; copy them to a cloud ``out``."""
        if self.writer is None:
            return
        self.writer.flush()
        if not self.store.local:
            for f in self.tb_dir.rglob("*"):
                if f.is_file():
                    self.store.write_bytes(f"tensorboard/{f.relative_to(self.tb_dir).as_posix()}", f.read_bytes())

    def close(self) -> None:
        self.sync()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.bar is not None:
            self.bar.close()
