"""Fine-tuning costs, measured side by side in one run (RWR keys; DDPO adds its own).

RWR, on the tiny pipeline's UNet (CPU here; the same code on GPU), batch 8 of 64 px images:

- ``rwr_step_kl_over_nokl``: seconds per optimizer step with the KL term (beta > 0: one extra
  UNet forward with adapters disabled, no graph) over beta = 0; interleaved repeats, medians.
- ``rwr_peak_mem_kl_over_nokl``: peak memory of training steps with beta > 0 over beta = 0, each
  variant in a fresh process: CUDA's max_memory_allocated on a GPU, else the peak resident set
  above the process's baseline after imports (weights + optimizer + activations). A second UNet
  for the reference model would add its weights; disabling adapters adds nothing.
- ``lora_checkpoint_mb``: the saved adapter (diffusers' pytorch_lora_weights.safetensors) of the
  tiny pipeline at rank 4, measured; ``lora_checkpoint_mb_sd21``: the same adapter on Stable
  Diffusion 2.1's UNet (built on the meta device from its published config: parameter count
  x 4 bytes, no weights needed).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_train.py [--repeats 5] [--steps 4]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SD21_UNET = dict(
    sample_size=96, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_method(beta: float, folder: Path, batch: int = 8, size: int = 64):
    """An RwrMethod on the tiny pipeline with 16 random images (64 px), its policy and optimizer."""
    import numpy as np
    import pandas as pd
    import torch
    from PIL import Image

    from tn_ray.training.loop import WorkerContext
    from tn_ray.training.optim import Optimization
    from tn_ray.training.policy import Policy
    from tn_ray.training.rwr import RwrConfig, RwrMethod

    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        path = folder / f"{i}.png"
        if not path.exists():
            Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(path)
        rows.append({"image": str(path), "prompt": f"prompt {i % 4}", "weight": 1.0})
    cfg = RwrConfig(out=str(folder / f"run-{beta}"), prompts=["p"], policy={"pipeline": "tiny"}, beta=beta, batch_size=batch,
                    reward={"models": ["brightness"], "use": "brightness"},
                    generation={"pipeline": "tiny", "samples_per_prompt": 16}, top_k=4, max_steps=1000)
    policy = Policy.load(cfg.policy, device="cuda" if torch.cuda.is_available() else "cpu")
    optim = Optimization(policy.trainable_parameters(), cfg.optimizer, cfg.max_steps, policy.device, policy.amp_dtype)
    return RwrMethod(cfg, policy, optim, WorkerContext(0, 1, policy.device, cfg.out), {"examples": pd.DataFrame(rows)})


def timing(repeats: int, steps: int, folder: Path) -> dict[str, float]:
    import torch

    methods = {beta: make_method(beta, folder) for beta in (0.0, 0.5)}
    for m in methods.values():
        m.step(1)  # warm-up
    times: dict[float, list[float]] = {0.0: [], 0.5: []}
    step = 2
    for _ in range(repeats):
        for beta, m in methods.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                m.step(step)
                step += 1
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[beta].append((time.perf_counter() - start) / steps)
    nokl, kl = statistics.median(times[0.0]), statistics.median(times[0.5])
    return {"rwr_step_seconds_nokl": nokl, "rwr_step_seconds_kl": kl, "rwr_step_kl_over_nokl": kl / nokl}


def peak_memory_child(beta: float, steps: int, folder: str) -> None:
    """Run in a fresh process: print the peak memory (MB) of ``steps`` RWR steps."""
    import torch

    import tn_ray.training.rwr  # noqa: F401  (imports before the baseline)

    baseline = _rss_mb()
    method = make_method(beta, Path(folder))
    for s in range(1, steps + 1):
        method.step(s)
    if torch.cuda.is_available():
        print(json.dumps({"peak_mb": torch.cuda.max_memory_allocated() / 2**20}))
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        print(json.dumps({"peak_mb": peak - baseline}))


def peak_memory(steps: int, folder: Path) -> dict[str, float]:
    out = {}
    for beta in (0.0, 0.5):
        proc = subprocess.run([sys.executable, __file__, "--child-beta", str(beta), "--steps", str(steps), "--folder", str(folder)],
                              capture_output=True, text=True, check=True)
        out[beta] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]
    return {"rwr_peak_mem_mb_nokl": out[0.0], "rwr_peak_mem_mb_kl": out[0.5], "rwr_peak_mem_kl_over_nokl": out[0.5] / out[0.0]}


def lora_sizes(folder: Path) -> dict[str, float]:
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from tn_ray.training.config import LORA_TARGETS, PolicyBlock
    from tn_ray.training.policy import Policy

    policy = Policy.load(PolicyBlock(pipeline="tiny", lora={"rank": 4}), device="cpu")
    path = policy.save_lora(folder / "lora")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_UNET)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    n = sum(p.numel() for name, p in unet.named_parameters() if ".lora_" in name)
    return {"lora_checkpoint_mb": path.stat().st_size / 2**20, "lora_checkpoint_mb_sd21": n * 4 / 2**20,
            "lora_params_sd21": n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--child-beta", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    if args.child_beta is not None:
        peak_memory_child(args.child_beta, args.steps, args.folder)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        result = {"device": "cuda" if torch.cuda.is_available() else "cpu"}
        result.update(timing(args.repeats, args.steps, folder))
        result.update(peak_memory(args.steps, folder))
        result.update(lora_sizes(folder))
    for k, v in result.items():
        print(f"{k:>28}: {v:.4g}" if isinstance(v, float) else f"{k:>28}: {v}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
