"""Fine-tuning costs, measured side by side in one run: RWR, DDPO and GRPO keys.

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

DDPO (tiny pipeline; see :func:`ddpo_sampling` and :func:`ddpo_epochs`):

- ``ddpo_sampling_logprob_over_plain``: sampling with recorded chains and log-probs over the plain
  diffusers pipeline call, same steps, batch and generators (aim <= 1.15);
- ``ddpo_async_reward_idle_fraction``: share of an epoch the trainer waits for rewards with 2
  reward actors (aim <= 0.1), next to ``ddpo_sync_scoring_fraction`` (waiting for every batch);
- ``ddpo_epoch_seconds_tiny``: one tiny DDPO epoch of 32 samples.

GRPO (the ``tiny-sd3`` flow-matching pipeline, 32 px; see :func:`grpo_sampling`, :func:`grpo_step_timing`,
:func:`grpo_peak_memory` and :func:`grpo_epochs`):

- ``grpo_sampling_logprob_over_plain``: Flow-GRPO SDE sampling with recorded chains and log-probs
  (``sample_flow_chains`` + ``decode_flow_images``) over ``StableDiffusion3Pipeline.__call__``, same
  prompts, steps, size, batch, guidance and generators, both on the 256 zero T5 tokens (aim <= 1.15); next
  to ``grpo_sampling_fold_speedup``: that over GRPO's sampling with them folded into one token
  (tn_ray.diffusion.null_tokens);
- ``grpo_step_kl_over_nokl``: seconds of one GRPO optimizer step (``GRPO.train_epoch`` on fixed chains)
  with the KL term (beta > 0: one reference forward per trained step, adapters disabled, no graph) over
  beta = 0 (aim <= 1.6);
- ``grpo_peak_mem_kl_over_nokl``: peak memory of those steps with beta > 0 over beta = 0, each in a
  fresh process: CUDA's max_memory_allocated on a GPU, else the peak resident set (VmHWM, reset after
  setup and a warm-up step) above the process's RSS after imports: weights + optimizer + activations
  (:func:`grpo_peak_memory_child`; tracemalloc would not see torch's tensor allocations); next to
  ``grpo_transformer_mb``, what a second transformer for the reference would add (aim <= 1.05);
- ``grpo_async_reward_idle_fraction``: share of a GRPO epoch's wall time the trainer waits in
  ``collect_rewards`` for rewards scored on 2 reward actors while it sampled (aim <= 0.1), on the world's flow
  generator against the world's proxy reward (sampling costs more than scoring, as at real size);
  ``..._tiny_vitb32``: the same on the 0.1 MB tiny transformer against a ViT-B/32-sized CLIP (a stress case).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_train.py [--repeats 5] [--steps 4] [--part all|rwr|ddpo|grpo]
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
    cfg = RwrConfig(
        out=str(folder / f"run-{beta}"),
        prompts=["p"],
        policy={"pipeline": "tiny"},
        beta=beta,
        batch_size=batch,
        reward={"models": ["brightness"], "use": "brightness"},
        generation={"pipeline": "tiny", "samples_per_prompt": 16},
        top_k=4,
        max_steps=1000,
    )
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
        proc = subprocess.run(
            [sys.executable, __file__, "--child-beta", str(beta), "--steps", str(steps), "--folder", str(folder)],
            capture_output=True,
            text=True,
            check=True,
        )
        out[beta] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]
    return {
        "rwr_peak_mem_mb_nokl": out[0.0],
        "rwr_peak_mem_mb_kl": out[0.5],
        "rwr_peak_mem_kl_over_nokl": out[0.5] / out[0.0],
    }


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
    return {
        "lora_checkpoint_mb": path.stat().st_size / 2**20,
        "lora_checkpoint_mb_sd21": n * 4 / 2**20,
        "lora_params_sd21": n,
    }


# --------------------------------------------------------------------------------------
# DDPO
# --------------------------------------------------------------------------------------


def interleaved_medians(fns, repeats: int) -> list[float]:
    """Median seconds of each of ``fns`` (called in turn) over ``repeats`` interleaved rounds after one warm-up
    round."""
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats + 1):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            if r:
                out.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def ddpo_sampling(repeats: int, batch: int = 8, steps: int = 20) -> dict[str, float]:
    """``ddpo_sampling_logprob_over_plain``: our sampler (chain, log-probs, decode) over the plain
    ``pipe(..., eta=1, output_type='np')`` call, tiny pipeline, same prompts, steps, batch and
    generators; interleaved repeats after a warm-up round, medians."""
    import torch

    from tn_ray.diffusion.pipelines import load_pipeline
    from tn_ray.diffusion.sampling import decode_images, sample_chains

    pipe = load_pipeline("tiny")
    prompts = [f"a photo of object {i}" for i in range(batch)]
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(batch)]  # noqa: E731

    def ours():
        chains = sample_chains(
            pipe, prompts, list(range(batch)), num_steps=steps, guidance=5.0, eta=1.0, generator=gens()
        )
        decode_images(pipe, chains.latents[:, -1])

    def plain():
        pipe(prompts, num_inference_steps=steps, guidance_scale=5.0, eta=1.0, generator=gens(), output_type="np")

    o, p = interleaved_medians([ours, plain], repeats)
    return {"ddpo_sampling_s": o, "plain_pipeline_s": p, "ddpo_sampling_logprob_over_plain": o / p}


def method_epochs(method_cls, cfg, reward: str, epochs: int):
    """``epochs`` + 1 epochs of a DDPO-core method (DDPO, GRPO) in this process, one worker, ``reward``
    scored on ``cfg.scoring``'s reward actors; (the metrics of every epoch after the first, the pool, the
    policy). The first epoch (actors loading the reward model) is the warm-up."""
    from tn_ray.cluster import init_ray
    from tn_ray.config import RayConfig
    from tn_ray.scoring.workers import RewardPool
    from tn_ray.training.ddpo import DDPOData
    from tn_ray.training.loop import WorkerContext
    from tn_ray.training.optim import Optimization
    from tn_ray.training.policy import Policy

    init_ray(RayConfig())
    pool = RewardPool(reward, cfg.scoring)
    policy = Policy.load(cfg.policy, seed=0)
    optim = Optimization(policy.trainable_parameters(), cfg.optimizer, cfg.max_steps, policy.device, policy.amp_dtype)
    prompts = list(cfg.prompts)
    method = method_cls(
        cfg,
        policy,
        optim,
        WorkerContext(0, 1, policy.device, cfg.out),
        DDPOData(prompts, [[p] for p in prompts], {reward: pool}),
    )
    rows = [method.step(s) for s in range(1, epochs + 2)][1:]
    return rows, pool, policy


def ddpo_epochs(folder: Path, epochs: int = 3, reward: str = "clip:ViT-B-32/random") -> dict[str, float]:
    """Tiny DDPO epochs (32 samples in 8 batches of 4, 10 steps, half the timesteps trained) with 2
    reward actors of a ViT-B/32-shaped CLIP (random weights; a realistic scoring cost):

    - ``ddpo_async_reward_idle_fraction``: share of an epoch's wall time the trainer waits for
      rewards after sampling (medians over epochs after a warm-up epoch that loads the actors);
    - ``ddpo_sync_scoring_fraction``: for contrast, the share scoring the same number of images
      batch by batch, waiting for each, would take of (epoch + that scoring);
    - ``ddpo_epoch_seconds_tiny``: one epoch's wall time (sampling, rewards, advantages, training).
    """
    import numpy as np
    import torch

    from tn_ray.diffusion.sampling import decode_images, sample_chains
    from tn_ray.training.ddpo import DDPO, DDPOConfig

    prompts = ["a photo of a lighthouse", "a watercolor of a red circle"]
    cfg = DDPOConfig.model_validate(
        dict(
            out=str(folder / "ddpo"),
            prompts=prompts,
            max_steps=epochs + 1,
            policy={"pipeline": "tiny", "lora": {"rank": 4}},
            reward={"models": [reward], "use": reward},
            optimizer={"lr": 2e-2},
            sample={"num_steps": 10, "batch_size": 4, "num_batches_per_epoch": 8},
            train={"batch_size": 16, "clip_range": 0.2, "stat_min_count": 4, "timestep_fraction": 0.5},
            eval={"enabled": False},
            scoring={"cpus_per_actor": 0.25, "num_actors": 2},
        )
    )
    rows, pool, policy = method_epochs(DDPO, cfg, reward, epochs)
    b = cfg.sample.batch_size
    chains = sample_chains(
        policy.pipe,
        prompts * (b // 2),
        [0, 1] * (b // 2),
        num_steps=2,
        guidance=5.0,
        eta=1.0,
        generator=[torch.Generator().manual_seed(i) for i in range(b)],
    )
    images = list(decode_images(policy.pipe, chains.latents[:, -1]))
    start = time.perf_counter()
    for _ in range(cfg.sample.num_batches_per_epoch):
        pool.score(images, [[p] for p in prompts * (b // 2)], chunk=len(images))  # one actor, waited for
    sync = time.perf_counter() - start
    pool.shutdown()
    epoch = statistics.median(r["epoch_s"] for r in rows)
    return {
        "ddpo_async_reward_idle_fraction": float(np.median([r["reward_idle_fraction"] for r in rows])),
        "ddpo_reward_wait_s": float(np.median([r["reward_wait_s"] for r in rows])),
        "ddpo_sync_scoring_fraction": sync / (epoch + sync),
        "ddpo_epoch_seconds_tiny": epoch,
    }


# --------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------

GRPO_PROMPTS = ["a photo of a lighthouse", "a watercolor of a red circle"]
GRPO_BETA = 0.04  # Flow-GRPO's GenEval / OCR weight


def grpo_config(folder: Path, beta: float, reward: str = "brightness", sample: dict | None = None,
                train: dict | None = None, pipeline: str = "tiny-sd3", prompts: list[str] | None = None, **extra):
    """A GRPOConfig on ``pipeline`` (default ``tiny-sd3``; 32 px, LoRA rank 4, no evaluation) with
    ``train.beta = beta``."""
    from tn_ray.training.grpo import GRPOConfig

    return GRPOConfig.model_validate(
        dict(
            out=str(folder / f"grpo-{pipeline}-{beta}"),
            prompts=prompts or GRPO_PROMPTS,
            max_steps=1000,
            policy={"pipeline": pipeline, "lora": {"rank": 4}},
            reward={"models": [reward], "use": reward},
            optimizer={"lr": 1e-2},
            sample={"num_steps": 4, "group_size": 4, "prompts_per_batch": 2, "num_batches_per_epoch": 1,
                    "height": 32, "width": 32, **(sample or {})},
            train={"batch_size": 8, "beta": beta, **(train or {})},
            eval={"enabled": False},
            logging={"progress_bar": False, "tensorboard": False},
            **extra,
        )
    )


def grpo_sampling(repeats: int, batch: int = 8, steps: int = 10, size: int = 32) -> dict[str, float]:
    """``grpo_sampling_logprob_over_plain``: :func:`~tn_ray.diffusion.flow_sampling.sample_flow_chains` (every
    step by the SDE, noise level 0.7: chain, log-probs) + ``decode_flow_images`` over the plain
    ``StableDiffusion3Pipeline(..., output_type='np')`` call (its ODE), tiny-sd3, same prompts, steps, size,
    batch, guidance 4.5 and generators; interleaved repeats after a warm-up round, medians. Like for like,
    the sampler there feeds the pipeline's 256 zero T5 tokens (``fold_null_tokens=False``); GRPO folds them
    into one counted 256 times (:mod:`tn_ray.diffusion.null_tokens`: the same outputs to float rounding, not
    bit for bit): ``grpo_sampling_folded_s`` times that, ``grpo_sampling_fold_speedup`` is unfolded / folded."""
    import torch

    from tn_ray.diffusion.flow_sampling import decode_flow_images, sample_flow_chains
    from tn_ray.diffusion.pipelines import load_pipeline

    pipe = load_pipeline("tiny-sd3")
    prompts = [f"a photo of object {i}" for i in range(batch)]
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(batch)]  # noqa: E731

    def ours():
        chains = sample_flow_chains(pipe, prompts, num_steps=steps, guidance=4.5, noise_level=0.7, generator=gens(),
                                    height=size, width=size, fold_null_tokens=False)
        decode_flow_images(pipe, chains.latents[:, -1])

    def plain():
        pipe(prompts, num_inference_steps=steps, guidance_scale=4.5, generator=gens(), height=size, width=size,
             output_type="np")

    def folded():
        chains = sample_flow_chains(pipe, prompts, num_steps=steps, guidance=4.5, noise_level=0.7, generator=gens(),
                                    height=size, width=size)
        decode_flow_images(pipe, chains.latents[:, -1])

    o, p, f = interleaved_medians([ours, plain, folded], repeats)
    return {"grpo_sampling_s": o, "sd3_plain_pipeline_s": p, "grpo_sampling_logprob_over_plain": o / p,
            "grpo_sampling_folded_s": f, "grpo_sampling_fold_speedup": o / f}


def make_grpo(beta: float, folder: Path):
    """A GRPO method (tiny-sd3, beta) with no reward actors and its fixed training input: 8 chains of 4 SDE
    steps sampled by its own pipeline (so its scheduler holds their schedule; the same generators give every
    method the same chains) and fixed advantages. One ``train_epoch`` on them is one optimizer step over
    one minibatch of 8 and int(0.99 x 4) = 3 trained steps (3 backward passes)."""
    import torch

    from tn_ray.diffusion.flow_sampling import sample_flow_chains
    from tn_ray.training.ddpo import DDPOData
    from tn_ray.training.grpo import GRPO
    from tn_ray.training.loop import WorkerContext
    from tn_ray.training.optim import Optimization
    from tn_ray.training.policy import Policy

    cfg = grpo_config(folder, beta)
    policy = Policy.load(cfg.policy, device="cuda" if torch.cuda.is_available() else "cpu", seed=0)
    optim = Optimization(policy.trainable_parameters(), cfg.optimizer, cfg.max_steps, policy.device, policy.amp_dtype)
    method = GRPO(cfg, policy, optim, WorkerContext(0, 1, policy.device, cfg.out),
                  DDPOData(list(GRPO_PROMPTS), [[p] for p in GRPO_PROMPTS], {}))
    s, n = cfg.sample, cfg.sample.batch_images
    ids = [i % len(GRPO_PROMPTS) for i in range(n)]
    chains = sample_flow_chains(policy.pipe, [GRPO_PROMPTS[i] for i in ids], ids, num_steps=s.num_steps,
                                guidance=s.guidance_scale, noise_level=s.noise_level,
                                generator=[torch.Generator().manual_seed(i) for i in range(n)], height=s.height,
                                width=s.width, autocast=policy.autocast())
    adv = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(chains.latents.device)
    return method, chains, adv


def grpo_step_timing(repeats: int, steps: int, folder: Path) -> dict[str, float]:
    """``grpo_step_kl_over_nokl``: seconds per GRPO optimizer step (:func:`make_grpo`) with beta = 0.04 over
    beta = 0; interleaved repeats of ``steps`` steps after a warm-up step, medians (as RWR's)."""
    import torch

    made = {beta: make_grpo(beta, folder) for beta in (0.0, GRPO_BETA)}
    for method, chains, adv in made.values():
        method.train_epoch(1, chains, adv)  # warm-up
    times: dict[float, list[float]] = {b: [] for b in made}
    step = 2
    for _ in range(repeats):
        for beta, (method, chains, adv) in made.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                method.train_epoch(step, chains, adv)
                step += 1
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[beta].append((time.perf_counter() - start) / steps)
    nokl, kl = statistics.median(times[0.0]), statistics.median(times[GRPO_BETA])
    return {"grpo_step_seconds_nokl": nokl, "grpo_step_seconds_kl": kl, "grpo_step_kl_over_nokl": kl / nokl}


def _hwm_mb() -> float | None:
    """The process's peak resident set (VmHWM, MB) since the last :func:`_reset_hwm`; None where unreadable."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        return None


def _reset_hwm() -> bool:
    """Reset the peak resident set to the current one (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def grpo_peak_memory_child(beta: float, steps: int, folder: str) -> None:
    """Run in a fresh process: print the peak memory (MB) of ``steps`` GRPO optimizer steps.

    On a GPU: ``torch.cuda.max_memory_allocated`` over the steps (weights, optimizer, activations). On CPU:
    the peak resident set over the steps above the RSS after imports (every library the pipeline and LoRA
    load, diffusers' lazy modules included), so weights + optimizer state + the steps' activations; the peak
    is reset (``/proc/self/clear_refs``) after building the pipeline, sampling the chains and one warm-up step,
    so construction transients do not count (else ``ru_maxrss`` since start)."""
    import torch
    from diffusers import (  # noqa: F401
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from peft import LoraConfig  # noqa: F401
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer  # noqa: F401

    import tn_ray.diffusion.flow_sampling  # noqa: F401  (imports before the baseline)
    import tn_ray.training.grpo  # noqa: F401
    import tn_ray.training.optim  # noqa: F401
    import tn_ray.training.policy  # noqa: F401

    baseline = _rss_mb()
    method, chains, adv = make_grpo(beta, Path(folder))
    method.train_epoch(1, chains, adv)  # warm-up: the optimizer's state exists from here on
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    setup = torch.cuda.memory_allocated() / 2**20 if cuda else _rss_mb()
    reset = _reset_hwm()
    for s in range(2, steps + 2):
        method.train_epoch(s, chains, adv)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
        print(json.dumps({"peak_mb": peak, "above_setup_mb": peak - setup}))
    else:
        hwm = _hwm_mb() if reset else None
        peak = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB
        print(json.dumps({"peak_mb": peak - baseline, "above_setup_mb": peak - setup}))


def grpo_peak_memory(steps: int, folder: Path) -> dict[str, float]:
    """``grpo_peak_mem_kl_over_nokl`` (see the module's docstring and :func:`grpo_peak_memory_child`);
    ``grpo_step_mem_above_setup_mb_*``: the part of each peak above the memory after setup and the warm-up
    step (what the steps' activations and gradients add); ``grpo_transformer_mb``: the tiny transformer's
    weights, what a second transformer for the reference would have added."""
    from tn_ray.diffusion.pipelines import load_pipeline

    out = {}
    for beta in (0.0, GRPO_BETA):
        proc = subprocess.run(
            [sys.executable, __file__, "--child-method", "grpo", "--child-beta", str(beta), "--steps", str(steps),
             "--folder", str(folder)],
            capture_output=True,
            text=True,
            check=True,
        )
        out[beta] = json.loads(proc.stdout.strip().splitlines()[-1])
    transformer = load_pipeline("tiny-sd3", device="cpu").transformer
    return {
        "grpo_peak_mem_mb_nokl": out[0.0]["peak_mb"],
        "grpo_peak_mem_mb_kl": out[GRPO_BETA]["peak_mb"],
        "grpo_peak_mem_kl_over_nokl": out[GRPO_BETA]["peak_mb"] / out[0.0]["peak_mb"],
        "grpo_step_mem_above_setup_mb_nokl": out[0.0]["above_setup_mb"],
        "grpo_step_mem_above_setup_mb_kl": out[GRPO_BETA]["above_setup_mb"],
        "grpo_transformer_mb": sum(p.numel() * p.element_size() for p in transformer.parameters()) / 2**20,
    }


# the async-reward benchmark's pairs: (pipeline, reward, prompts, key suffix)
GRPO_PAIRS = {
    # the world's flow generator (a 32 px SD3Transformer2DModel, 11 MB) against the world's proxy reward: a generator
    # and a reward of the proportions of real runs, where sampling costs far more than scoring (SD 3.5 Medium:
    # 2 x 10 passes of a 2.2 B transformer per image; PickScore: one ViT-H/14 image pass)
    "world": ("world-flow", "worldclip", ["a photo of three green circles", "a photo of a blue square"], ""),
    # a stress case: the 0.1 MB tiny transformer against a ViT-B/32-sized CLIP (random weights), a reward far
    # heavier than the generator, which no asynchrony can hide on 2 shared cores
    "tiny_vitb32": ("tiny-sd3", "clip:ViT-B-32/random", None, "_tiny_vitb32"),
}


def grpo_epochs(folder: Path, pair: str = "world", epochs: int = 3) -> dict[str, float]:
    """GRPO epochs of one of :data:`GRPO_PAIRS` (32 px: 8 sampling calls of one prompt x a group of 4 = 32
    samples, 10 SDE steps, 5 trained (timestep fraction 0.5), minibatches of 16, beta 0.04, one update) with 2
    reward actors, as DDPO's (:func:`ddpo_epochs`):

    - ``grpo_async_reward_idle_fraction[suffix]``: share of an epoch's wall time the trainer waits in
      ``collect_rewards`` after sampling (``GRPO.step``'s ``reward_idle_fraction``; medians over the epochs
      after a warm-up epoch that loads the actors);
    - ``grpo_epoch_seconds[suffix]``: one epoch's wall time (sampling, rewards, advantages, training), with
      ``grpo_sample_s`` / ``grpo_reward_wait_s`` its sampling and waiting parts.
    """
    import numpy as np

    from tn_ray.training.grpo import GRPO

    pipeline, reward, prompts, suffix = GRPO_PAIRS[pair]
    cfg = grpo_config(
        folder, GRPO_BETA, reward, pipeline=pipeline, prompts=prompts,
        sample={"num_steps": 10, "group_size": 4, "prompts_per_batch": 1, "num_batches_per_epoch": 8,
                **({"guidance_scale": 3.0} if pipeline == "world-flow" else {})},
        train={"batch_size": 16, "timestep_fraction": 0.5},
        scoring={"cpus_per_actor": 0.25, "num_actors": 2, "keep_warm": False},
    )
    rows, pool, _ = method_epochs(GRPO, cfg, reward, epochs)
    pool.shutdown()
    med = {k: float(np.median([r[k] for r in rows])) for k in ("reward_idle_fraction", "reward_wait_s", "sample_s",
                                                                "epoch_s")}
    return {
        f"grpo_async_reward_idle_fraction{suffix}": med["reward_idle_fraction"],
        f"grpo_reward_wait_s{suffix}": med["reward_wait_s"],
        f"grpo_sample_s{suffix}": med["sample_s"],
        f"grpo_epoch_seconds{suffix}": med["epoch_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--part", choices=["all", "rwr", "ddpo", "grpo"], default="all",
                        help="which method's keys to measure")
    parser.add_argument("--only", choices=["rwr", "ddpo", "grpo"], help="the same as --part")
    parser.add_argument("--child-beta", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--child-method", choices=["rwr", "grpo"], default="rwr", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        args.part = args.only
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    if args.child_beta is not None:
        child = grpo_peak_memory_child if args.child_method == "grpo" else peak_memory_child
        child(args.child_beta, args.steps, args.folder)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        result = {"device": "cuda" if torch.cuda.is_available() else "cpu"}
        if args.part in ("all", "rwr"):
            result.update(timing(args.repeats, args.steps, folder))
            result.update(peak_memory(args.steps, folder))
            result.update(lora_sizes(folder))
        if args.part in ("all", "ddpo"):
            result.update(ddpo_sampling(args.repeats))
            result.update(ddpo_epochs(folder))
        if args.part in ("all", "grpo"):
            result.update(grpo_sampling(3 * args.repeats))  # a round takes < 1 s here: more rounds, a steadier median
            result.update(grpo_step_timing(args.repeats, args.steps, folder))
            result.update(grpo_peak_memory(args.steps, folder))
            result.update(grpo_epochs(folder, "world"))
            result.update(grpo_epochs(folder, "tiny_vitb32"))
    for k, v in result.items():
        print(f"{k:>28}: {v:.4g}" if isinstance(v, float) else f"{k:>28}: {v}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
