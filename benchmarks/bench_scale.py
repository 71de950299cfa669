"""Real-size costs without weights: tn_ray's hot paths on SD 2.1 / SD 3.5-sized models, one JSON line.

The published architectures (``tn_ray.diffusion.architectures``: SD 2.1, SD 3.5 Medium; the reward
registry's ``clip:ViT-B-32/random``, ``clip:ViT-H-14/random`` = PickScore's backbone,
``imagereward:random``) are built with random weights; compute and memory do not depend on their
values. On whatever device it finds it measures, side by side (docs/performance.md says what each
key means):

- ``generation``: images/s of tn_ray's generation call (``generation.generate_group``: 50 steps,
  classifier-free guidance), SD 2.1 at 512 and 768 px, SD 3.5 Medium at 512 px; VAE decoding's
  peak memory plain / sliced / tiled;
- ``scoring``: pairs/s of TextNorm scoring at m = 32 (``RewardModel.score_rows`` of [x0, x1..x32],
  then ``textnorm``) vs naive per-pair scoring (the image re-encoded for each of the m + 1 prompts),
  per reward model;
- ``bestofn``: images/s of a bare best-of-n loop (generate, score against [x0, X]); the streaming
  Ray pipeline needs a pipeline folder on disk and a Ray cluster and is reported as skipped;
- ``rwr``: ``RwrMethod.step`` steps/s and peak memory with and without the KL term (reference =
  the same UNet with adapters disabled), LoRA rank 4 / 32, bf16 / fp16 autocast, gradient
  checkpointing on / off (one factor changed at a time from rank 4, first precision, no checkpointing);
- ``maxbatch``: the largest RWR batch that fits (GPU: doubling until out of memory; CPU: doubling
  while a step stays within the time share and the memory available);
- ``ddpo``: samples/s of one DDPO epoch end to end: ``sample_chains`` with log-probs, VAE decode,
  TextNorm rewards (``score_rows`` in this process, not Ray actors), ``shared_advantages`` and
  ``DDPO.train_epoch`` (PPO step);
- ``sd35``: SD 3.5 Medium transformer forward + backward + AdamW step with LoRA (flow-matching
  loss), with and without gradient checkpointing. GRPO itself is not in tn_ray yet: its step time
  awaits that issue, and this is the cost its training step is built from.

Modes: ``--quick`` (CPU: batch 1, 2 steps, 64 px, minutes); the default full mode (GPU: 50 steps,
real resolutions, about 8 minutes on one H100; each measurement has a share of ``--budget`` and
stops early when it is used, printing what it skipped). ``--only NAME ...`` selects measurements
and/or architectures. Last line: one JSON object.

    HF_HUB_OFFLINE=1 python benchmarks/bench_scale.py --quick [--only sd21 clip-b32 rwr]
    HF_HUB_OFFLINE=1 python benchmarks/bench_scale.py            # on a GPU machine
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_scoring's contrastive sets

from tn_ray.diffusion.architectures import (  # noqa: E402
    ARCHITECTURES,
    REWARD_SPECS,
    ArchitectureError,
    check_architecture,
)
from tn_ray.errors import TnRayError  # noqa: E402

MEASUREMENTS = ("generation", "scoring", "bestofn", "rwr", "maxbatch", "ddpo", "sd35")
SHARES = {
    "generation": 0.22,
    "scoring": 0.14,
    "bestofn": 0.06,
    "rwr": 0.16,
    "maxbatch": 0.10,
    "ddpo": 0.16,
    "sd35": 0.16,
}
M = 32  # contrastive prompts per image (TIA2's sets)
PROMPTS = ["a realistic photo of three dogs", "a watercolor of a red circle on a blue square"]


# --------------------------------------------------------------------------------------
# plan: what to run, checked before any model is built
# --------------------------------------------------------------------------------------


class Plan:
    def __init__(self, args: argparse.Namespace):
        names = list(args.only or [])
        unknown = [n for n in names if n not in MEASUREMENTS and n not in ARCHITECTURES]
        if unknown:
            raise ArchitectureError(
                f"--only: unknown architecture or measurement '{unknown[0]}'; architectures: "
                f"{', '.join(ARCHITECTURES)}; measurements: {', '.join(MEASUREMENTS)}"
            )
        self.measurements = [n for n in names if n in MEASUREMENTS] or list(MEASUREMENTS)
        self.archs = [n for n in names if n in ARCHITECTURES] or list(ARCHITECTURES)
        self.quick = args.quick
        res = args.resolution
        self.sd21_res = [res] if res else ([64] if self.quick else [512, 768])
        self.sd35_res = res if res else (64 if self.quick else 512)
        if "sd21" in self.archs:
            for r in self.sd21_res:
                check_architecture("sd21", r)
        if "sd35m" in self.archs:
            check_architecture("sd35m", self.sd35_res)
        self.train_res = self.sd21_res[0]
        self.steps = args.steps or (2 if self.quick else 50)
        self.batch = args.batch or (1 if self.quick else 8)
        self.budget = args.budget or (900.0 if self.quick else 480.0)
        self.dtype_name = args.dtype

    def wants(self, measurement: str, *archs: str) -> bool:
        return measurement in self.measurements and all(a in self.archs for a in archs)

    def reward_arch(self) -> str | None:
        """The reward model of best-of-n and DDPO: CLIP ViT-B/32 (the paper's) if selected, else the first."""
        rewards = [a for a in self.archs if ARCHITECTURES[a].kind == "reward"]
        return "clip-b32" if "clip-b32" in rewards else (rewards[0] if rewards else None)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU mode: batch 1, 2 steps, 64 px (minutes)")
    ap.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help=f"measurements ({', '.join(MEASUREMENTS)}) and/or architectures ({', '.join(ARCHITECTURES)})",
    )
    ap.add_argument(
        "--resolution",
        type=int,
        help="pixels of the diffusion models (default: quick 64; full 512 and 768 for SD 2.1, 512 for SD 3.5)",
    )
    ap.add_argument("--steps", type=int, help="denoising steps (default: quick 2, full 50)")
    ap.add_argument("--batch", type=int, help="images per call / training batch (default: quick 1, full 8)")
    ap.add_argument(
        "--budget",
        type=float,
        help="seconds for the whole run, shared between measurements (default: quick 900, full 480)",
    )
    ap.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="weights dtype: auto = float16 (SD 2.1) / bfloat16 (SD 3.5) on GPU, bfloat16 on CPU",
    )
    return ap.parse_args(argv)


# --------------------------------------------------------------------------------------
# clocks and memory
# --------------------------------------------------------------------------------------


class Budget:
    def __init__(self, seconds: float):
        self.total = seconds
        self.end = time.perf_counter() + seconds
        self.deadline = self.end

    def start(self, name: str) -> None:
        self.deadline = min(self.end, time.perf_counter() + SHARES[name] * self.total)

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def exact_cpu_rss() -> None:
    """glibc: serve allocations of 64 kB and more by mmap (returned to the system when freed), so
    the resident set follows the memory tensors hold instead of a heap that keeps freed pages."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD


def _trim() -> None:
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory of a block in MB: on a GPU torch.cuda.max_memory_allocated (all tensors,
    weights included); on a CPU the peak resident set sampled every 5 ms (psutil) minus the
    resident set at the block's start (what the block added: activations, gradients, optimizer
    state), with glibc's heap trimmed first and large allocations mmapped (:func:`exact_cpu_rss`)."""

    def __enter__(self):
        gc.collect()
        if _cuda():
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            _trim()
            self.base = _rss()
            self.peak = self.base
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        if _cuda():
            import torch

            torch.cuda.synchronize()
            self.mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, _rss())
            self.mb = (self.peak - self.base) / 2**20
        return False


def memory_method() -> str:
    return (
        "torch.cuda.max_memory_allocated, absolute (weights included)"
        if _cuda()
        else "peak RSS (psutil, sampled every 5 ms; glibc mmap threshold 64 kB, heap trimmed) above the RSS at the "
        "measurement's start: what it added"
    )


def free() -> None:
    """Return what unreferenced tensors hold (the caller drops its references first)."""
    gc.collect()
    if _cuda():
        import torch

        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------


def weights_dtype(plan: Plan, arch: str):
    import torch

    if plan.dtype_name != "auto":
        return getattr(torch, plan.dtype_name)
    if _cuda():
        return torch.bfloat16 if arch == "sd35m" else torch.float16
    return torch.bfloat16


def device() -> str:
    return "cuda" if _cuda() else "cpu"


class Pipes:
    """At most one diffusion pipeline in memory at a time (SD 2.1 at the training resolution is reused)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.key = None
        self.pipe = None

    def get(self, arch: str, res: int):
        from tn_ray.diffusion import architectures as A

        if self.key == (arch, res):
            return self.pipe
        self.drop()
        build = A.sd21_pipeline if arch == "sd21" else A.sd35m_pipeline
        self.pipe = build(res, weights_dtype(self.plan, arch), device())
        self.key = (arch, res)
        return self.pipe

    def drop(self) -> None:
        self.pipe, self.key = None, None
        free()


def contrast_texts(prompt: str) -> list[str]:
    from bench_scoring import contrastive_set

    _, others = contrastive_set(3, "dog", M)
    return [prompt, *others[:M]]


def random_images(n: int, size: int = 512, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
        for _ in range(n)
    ]


# --------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------


def timed(fn, *args, **kwargs) -> float:
    """Seconds of ``fn(*args, **kwargs)``, the GPU synchronized around it."""
    sync()
    t = time.perf_counter()
    fn(*args, **kwargs)
    sync()
    return time.perf_counter() - t


def measure_generation(plan: Plan, pipes: Pipes, budget: Budget, out: dict, skipped: list) -> None:
    from tn_ray.diffusion.generation import GenerationConfig, generate_group

    jobs = [("sd21", r) for r in plan.sd21_res if "sd21" in plan.archs]
    if "sd35m" in plan.archs:
        jobs.append(("sd35m", plan.sd35_res))
    for arch, res in jobs:
        if budget.left() <= 0:
            skipped.append(f"generation {arch} {res}px: time share used")
            continue
        pipe = pipes.get(arch, res)
        batch = plan.batch if res <= 512 else max(1, plan.batch // 2)
        cfg = GenerationConfig(
            pipeline="tiny", num_inference_steps=plan.steps, guidance_scale=7.5, height=res, width=res
        )
        generate_group(pipe, cfg.model_copy(update={"num_inference_steps": 1}), PROMPTS[0], [0])  # warm-up
        seconds = timed(generate_group, pipe, cfg, PROMPTS[0], list(range(batch)))
        out[f"gen_images_per_s_{arch}_{res}"] = batch / seconds
        out[f"gen_batch_{arch}_{res}"] = batch
        if arch == "sd21" and res == plan.sd21_res[0]:
            vae_decoding(pipe, res, max(2, batch), out)
    out["gen_steps"] = plan.steps


def vae_decoding(pipe, res: int, batch: int, out: dict) -> None:
    """Peak memory of decoding ``batch`` latents: plain, sliced (one image at a time), tiled
    (tiles of res/2 px with diffusers' overlap, forced here: by default tiles only apply above
    the VAE's sample_size)."""
    import torch

    vae = pipe.vae
    latents = torch.randn(batch, vae.config.latent_channels, res // 8, res // 8, device=vae.device, dtype=vae.dtype)
    sizes = (vae.tile_sample_min_size, vae.tile_latent_min_size)
    for name in ("plain", "slicing", "tiling"):
        vae.disable_slicing()
        vae.disable_tiling()
        if name == "slicing":
            vae.enable_slicing()
        if name == "tiling":
            vae.enable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = res // 2, res // 16
        with torch.no_grad(), PeakMemory() as mem:
            t = timed(lambda: vae.decode(latents / vae.config.scaling_factor))
        out[f"vae_decode_peak_mb_{name}"] = mem.mb
        out[f"vae_decode_s_{name}"] = t
    vae.disable_slicing()
    vae.disable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = sizes
    out["vae_decode_batch"] = batch


def measure_scoring(plan: Plan, budget: Budget, out: dict, skipped: list) -> None:
    """Pairs/s of TextNorm scoring (each image encoded once, each prompt once) vs naive per-pair
    scoring (image and prompt encoded for every pair); the naive rate is timed over as many pairs
    as fit, at least 2."""
    from tn_ray.rewards import build

    n_images = plan.batch if plan.quick else 32
    for arch in [a for a in plan.archs if ARCHITECTURES[a].kind == "reward"]:
        if budget.left() <= 0:
            skipped.append(f"scoring {arch}: time share used")
            continue
        model = build(REWARD_SPECS[arch], device=device())
        texts = contrast_texts(PROMPTS[0])
        images = random_images(n_images)
        model.score_rows(images[:1], [texts[:2]])  # warm-up

        t_cached = timed(textnorm_scoring, model, images, texts)
        cross = arch == "imagereward"
        pairs, t_naive = 0, 0.0
        for text in texts[: 3 if plan.quick else len(texts)]:
            if pairs >= 2 and budget.left() <= 0:
                break
            t_naive += timed(naive_pair, model, images[0], text, cross)
            pairs += 1
        textnorm_rate = len(images) * len(texts) / t_cached
        naive_rate = pairs / t_naive
        out[f"score_pairs_per_s_textnorm_{arch}"] = textnorm_rate
        out[f"score_pairs_per_s_naive_{arch}"] = naive_rate
        out[f"score_textnorm_over_naive_{arch}"] = textnorm_rate / naive_rate
        if pairs < len(texts):
            skipped.append(f"scoring {arch}: naive rate timed over {pairs} of {len(texts)} pairs")
        model = None
        free()
    out["score_m"] = M


def textnorm_scoring(model, images, texts) -> None:
    """Score every image against [x0, X] (as a fresh reward actor: prompts encoded here) and normalize."""
    import numpy as np

    from tn_ray.textnorm.equations import textnorm

    model._text_cache.clear()
    textnorm(np.stack(model.score_rows(images, [texts] * len(images))), 1.0)


def naive_pair(model, image, text: str, cross: bool) -> None:
    """One (image, prompt) pair scored alone: the image and the prompt encoded for this pair."""
    import torch

    from tn_ray.rewards.base import load_image

    with torch.inference_mode():
        feats = model.encode_texts([text])
        model.score(model.encode_images([load_image(image)]), model.join_text_features(feats) if cross else feats)


def measure_bestofn(plan: Plan, pipes: Pipes, budget: Budget, out: dict, skipped: list) -> None:
    """A bare best-of-n loop in this process: generate_group, then score_rows against [x0, X]."""
    from tn_ray.diffusion.generation import GenerationConfig
    from tn_ray.rewards import build

    reward = plan.reward_arch()
    if reward is None:
        skipped.append("bestofn: no reward architecture selected")
        return
    model = build(REWARD_SPECS[reward], device=device())
    pipe = pipes.get("sd21", plan.train_res)
    res = plan.train_res
    cfg = GenerationConfig(pipeline="tiny", num_inference_steps=plan.steps, height=res, width=res)
    texts = contrast_texts(PROMPTS[0])
    model.score_rows(random_images(1), [texts[:2]])
    n, seconds = 0, 0.0
    for group in range(1 if plan.quick else 4):  # groups of `batch` samples of one prompt, as tn-ray bestofn
        if group and budget.left() < seconds / group:
            skipped.append(f"bestofn: {4 - group} of 4 groups (time share used)")
            break
        samples = list(range(n, n + plan.batch))
        seconds += timed(best_of_group, model, pipe, cfg, samples, texts)
        n += len(samples)
    out["bestofn_images_per_s_bare"] = n / seconds
    skipped.append(
        "bestofn streaming (Ray Data): needs the pipeline saved as a diffusers folder and a Ray cluster; "
        "bench_bestofn.py measures it on tiny models (steady state 0.91 of the bare loop)"
    )
    model = None
    free()


def best_of_group(model, pipe, cfg, samples: list[int], texts: list[str]) -> None:
    from tn_ray.diffusion.generation import generate_group

    model.score_rows(generate_group(pipe, cfg, PROMPTS[0], samples), [texts] * len(samples))


def rwr_steps(method, first: int, n: int) -> None:
    for s in range(first, first + n):
        method.step(s)


def _policy(pipe, rank: int, precision: str | None, checkpointing: bool):
    from tn_ray.training.config import LoraBlock
    from tn_ray.training.policy import ADAPTER, Policy

    unet = pipe.unet
    if getattr(unet, "peft_config", None) and ADAPTER in unet.peft_config:
        unet.delete_adapters(ADAPTER)
    unet.disable_gradient_checkpointing()
    return Policy(
        pipe, LoraBlock(rank=rank), mixed_precision=precision or "no", seed=0, gradient_checkpointing=checkpointing
    )


def _precisions() -> list[str]:
    return ["fp16", "bf16"] if _cuda() else ["bf16", "fp16"]


def _rwr_method(pipe, policy, batch: int, folder: Path, beta: float = 0.0):
    import pandas as pd

    from tn_ray.training.loop import WorkerContext
    from tn_ray.training.optim import Optimization
    from tn_ray.training.rwr import RwrConfig, RwrMethod

    res = pipe.unet.config.sample_size * pipe.vae_scale_factor
    paths = []
    for i, im in enumerate(random_images(4, res)):
        path = folder / f"rwr-{res}-{i}.png"
        im.save(path)
        paths.append(str(path))
    frame = pd.DataFrame({"image": paths, "prompt": [PROMPTS[i % 2] for i in range(4)], "weight": 1.0})
    cfg = RwrConfig(
        out=str(folder / "rwr"),
        prompts=PROMPTS,
        policy={"pipeline": "tiny"},
        beta=beta,
        batch_size=batch,
        reward={"models": ["brightness"], "use": "brightness"},
        generation={"pipeline": "tiny", "samples_per_prompt": 4},
        top_k=4,
        max_steps=1000,
    )
    optim = Optimization(policy.trainable_parameters(), cfg.optimizer, cfg.max_steps, policy.device, policy.amp_dtype)
    return RwrMethod(cfg, policy, optim, WorkerContext(0, 1, policy.device, cfg.out), {"examples": frame})


def measure_rwr(plan: Plan, pipes: Pipes, budget: Budget, out: dict, skipped: list, folder: Path) -> None:
    pipe = pipes.get("sd21", plan.train_res)
    first, second = _precisions()
    variants = [
        ("r4_" + first, 4, first, False),
        ("r32_" + first, 32, first, False),
        (f"r4_{first}_gc", 4, first, True),
        ("r4_" + second, 4, second, False),
    ]
    timed_steps = 2 if plan.quick else 3
    for name, rank, precision, gc_on in variants:
        if budget.left() <= 0:
            skipped.append(f"rwr {name}: time share used")
            continue
        try:
            policy = _policy(pipe, rank, precision, gc_on)
            method = _rwr_method(pipe, policy, plan.batch, folder)
            for beta in (0.0, 0.5):  # warm-up of both paths
                method.cfg = method.cfg.model_copy(update={"beta": beta})
                method.step(1)
            for beta, tag in ((0.0, "nokl"), (0.5, "kl")):
                method.cfg = method.cfg.model_copy(update={"beta": beta})
                with PeakMemory() as mem:
                    t = timed(rwr_steps, method, 2, timed_steps)
                out[f"rwr_steps_per_s_{name}_{tag}"] = timed_steps / t
                out[f"rwr_peak_mb_{name}_{tag}"] = mem.mb
        except Exception as err:  # e.g. fp16 autocast on a CPU without fp16 kernels: reported, not fatal
            skipped.append(f"rwr {name}: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
        finally:
            free()
    base = "r4_" + first
    if f"rwr_peak_mb_{base}_kl" in out:
        out["rwr_step_kl_over_nokl"] = out[f"rwr_steps_per_s_{base}_nokl"] / out[f"rwr_steps_per_s_{base}_kl"]
        out["rwr_peak_kl_over_nokl"] = out[f"rwr_peak_mb_{base}_kl"] / out[f"rwr_peak_mb_{base}_nokl"]
    out["rwr_second_unet_copy_mb"] = (
        sum(p.numel() * p.element_size() for p in pipe.unet.parameters() if not p.requires_grad) / 2**20
    )  # what the reference by disabled adapters saves
    out["rwr_batch"] = plan.batch
    out["rwr_resolution"] = plan.train_res


def measure_maxbatch(plan: Plan, pipes: Pipes, budget: Budget, out: dict, skipped: list, folder: Path) -> None:
    """Largest RWR batch (rank 4, first precision, KL on): doubling until out of memory (GPU), or
    while a step fits a quarter of what is left of the share and the RSS it adds stays under half
    of the memory available (CPU)."""
    import psutil
    import torch

    pipe = pipes.get("sd21", plan.train_res)
    policy = _policy(pipe, 4, _precisions()[0], False)
    batch, best, why = plan.batch, 0, "time share"
    while True:
        if budget.left() <= 0:
            break
        method = _rwr_method(pipe, policy, batch, folder, beta=0.5)
        try:
            with PeakMemory() as mem:
                t = timed(method.step, 1)
        except torch.OutOfMemoryError:
            why = "out of memory"
            break
        finally:
            del method
            free()
        best = batch
        out["maxbatch_peak_mb"] = mem.mb
        if not _cuda():
            if 2 * mem.mb * 2**20 > 0.5 * psutil.virtual_memory().available:
                why = "memory available"
                break
            if 2 * t > budget.left() / 4:
                why = "time share"
                break
        batch *= 2
        if batch > 4096:
            why = "cap 4096"
            break
    if best:
        out["rwr_max_batch"] = best
    skipped.append(f"maxbatch: stopped doubling at batch {batch} ({why})")
    policy = None
    free()


def measure_ddpo(plan: Plan, pipes: Pipes, budget: Budget, out: dict, skipped: list, folder: Path) -> None:
    import numpy as np
    import torch

    from tn_ray.diffusion.sampling import decode_images, sample_chains
    from tn_ray.diffusion.seeds import seeds_of
    from tn_ray.rewards import build
    from tn_ray.scoring.matrix import pad_rows
    from tn_ray.training.advantages import shared_advantages
    from tn_ray.training.ddpo import DDPO, DDPOConfig, DDPOData
    from tn_ray.training.loop import WorkerContext
    from tn_ray.training.optim import Optimization

    reward = plan.reward_arch()
    if reward is None:
        skipped.append("ddpo: no reward architecture selected")
        return
    spec = REWARD_SPECS[reward]
    model = build(spec, device=device())
    pipe = pipes.get("sd21", plan.train_res)
    policy = _policy(pipe, 4, _precisions()[0], False)
    batches = 1 if plan.quick else 2
    cfg = DDPOConfig.model_validate(
        dict(
            out=str(folder / "ddpo"),
            prompts=PROMPTS,
            max_steps=10,
            policy={"pipeline": "tiny"},
            reward={"models": [spec], "use": f"textnorm({spec})"},
            sample={
                "num_steps": plan.steps,
                "batch_size": plan.batch,
                "num_batches_per_epoch": batches,
                "guidance_scale": 5.0,
            },
            train={"batch_size": plan.batch, "timestep_fraction": 1.0 if plan.quick else 0.5, "stat_min_count": 2},
            eval={"enabled": False},
            logging={"progress_bar": False, "tensorboard": False},
        )
    )
    optim = Optimization(policy.trainable_parameters(), cfg.optimizer, cfg.max_steps, policy.device, policy.amp_dtype)
    texts = [contrast_texts(p) for p in PROMPTS]
    method = DDPO(cfg, policy, optim, WorkerContext(0, 1, policy.device, cfg.out), DDPOData(PROMPTS, texts, {}))
    model.score_rows(random_images(1), [texts[0][:2]])
    s = cfg.sample
    times = {"sample": 0.0, "reward": 0.0, "train": 0.0}
    parts, rows, ids_all = [], [], []
    pipe.unet.eval()
    for b in range(batches):
        ids = [(b * s.batch_size + i) % len(PROMPTS) for i in range(s.batch_size)]
        gens = [torch.Generator("cpu").manual_seed(x) for x in seeds_of(0, 1, 0, b, 1, n=s.batch_size)]
        t = time.perf_counter()
        chains = sample_chains(
            pipe,
            [PROMPTS[i] for i in ids],
            ids,
            num_steps=s.num_steps,
            guidance=s.guidance_scale,
            eta=s.eta,
            generator=gens,
            autocast=policy.autocast(),
        )
        images = decode_images(pipe, chains.latents[:, -1])
        sync()
        times["sample"] += time.perf_counter() - t
        t = time.perf_counter()
        rows += model.score_rows(list(images), [texts[i] for i in ids])
        times["reward"] += time.perf_counter() - t
        parts.append(chains)
        ids_all += ids
    from tn_ray.diffusion.sampling import Chains

    chains = Chains.cat(parts)
    t = time.perf_counter()
    column = cfg.reward.column({spec: pad_rows(rows)})
    adv = shared_advantages(
        np.asarray(ids_all), np.asarray(column, dtype=np.float64), method.stat_tracker, cfg.train.adv_clip_max
    )
    metrics = method.train_epoch(1, chains, torch.as_tensor(adv, dtype=torch.float32, device=chains.latents.device))
    sync()
    times["train"] = time.perf_counter() - t
    n = len(chains)
    total = sum(times.values())
    out["ddpo_samples_per_s"] = n / total
    out["ddpo_samples"] = n
    out["ddpo_sample_s_per_sample"] = times["sample"] / n
    out["ddpo_reward_s_per_sample"] = times["reward"] / n
    out["ddpo_train_s_per_sample"] = times["train"] / n
    out["ddpo_trained_timesteps"] = cfg.train_timesteps
    if not math.isfinite(metrics["loss"]):
        raise RuntimeError(f"DDPO loss is not finite: {metrics}")
    model = policy = method = None
    free()


def measure_sd35(plan: Plan, pipes: Pipes, budget: Budget, out: dict, skipped: list) -> None:
    """SD 3.5 Medium transformer + LoRA (rank 4 on to_q/k/v/out.0, as the UNet's): flow-matching
    loss, forward + backward + AdamW step (tn_ray's Optimization), batch B at the plan's
    resolution; 333 text tokens (77 CLIP + 256 T5 positions) of width 4096."""
    import torch
    from peft import LoraConfig

    from tn_ray.diffusion import architectures as A
    from tn_ray.training.config import LORA_TARGETS, OptimizerBlock
    from tn_ray.training.optim import Optimization
    from tn_ray.training.policy import autocast_dtype

    pipes.drop()
    dev = torch.device(device())
    res = plan.sd35_res
    tr = A.sd35m_transformer(res, weights_dtype(plan, "sd35m"), device())
    tr.requires_grad_(False)
    tr.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    params = [p for p in tr.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    amp = autocast_dtype("bf16", dev)
    optim = Optimization(params, OptimizerBlock(lr=3e-4), 1000, dev, amp)
    b, h = plan.batch, res // 8
    gen = torch.Generator("cpu").manual_seed(0)
    x0 = torch.randn(b, 16, h, h, generator=gen).to(dev)
    noise = torch.randn(b, 16, h, h, generator=gen).to(dev)
    text = torch.randn(b, 333, 4096, generator=gen).to(dev)
    pooled = torch.randn(b, 2048, generator=gen).to(dev)
    sigma = torch.rand(b, generator=gen).to(dev)

    def step():
        x_t = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        with torch.autocast(dev.type, dtype=amp):
            pred = tr(
                hidden_states=x_t, encoder_hidden_states=text, pooled_projections=pooled, timestep=sigma * 1000
            ).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise - x0)
        optim.backward(loss)
        optim.step()

    tr.train()
    steps = 1 if plan.quick else 3
    for tag, gc_on in (("", False), ("_gc", True)):
        if budget.left() <= 0:
            skipped.append(f"sd35{tag or ' no-gc'}: time share used")
            continue
        if gc_on:
            tr.enable_gradient_checkpointing()
        step()  # warm-up
        with PeakMemory() as mem:
            t = timed(lambda: [step() for _ in range(steps)])
        out[f"sd35_lora_step_s{tag}"] = t / steps
        out[f"sd35_lora_samples_per_s{tag}"] = b * steps / t
        out[f"sd35_lora_peak_mb{tag}"] = mem.mb
    out["sd35_batch"] = b
    out["sd35_resolution"] = res
    out["sd35_transformer_params"] = A.parameter_count(tr)
    skipped.append(
        "grpo (SD 3.5): not implemented in tn_ray yet (its own issue); sd35_lora_step_s is the "
        "transformer step its training is built from"
    )
    tr = optim = params = None
    free()


# --------------------------------------------------------------------------------------


def run(plan: Plan) -> dict:
    import torch

    result: dict = {
        "device": torch.cuda.get_device_name(0) if _cuda() else f"cpu ({os.cpu_count()} cores)",
        "mode": "quick" if plan.quick else "full",
        "memory_method": memory_method(),
    }
    out: dict = {}
    skipped: list[str] = []
    budget = Budget(plan.budget)
    pipes = Pipes(plan)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        steps = [
            ("scoring", lambda: measure_scoring(plan, budget, out, skipped), ()),
            ("generation", lambda: measure_generation(plan, pipes, budget, out, skipped), ()),
            ("bestofn", lambda: measure_bestofn(plan, pipes, budget, out, skipped), ("sd21",)),
            ("rwr", lambda: measure_rwr(plan, pipes, budget, out, skipped, folder), ("sd21",)),
            ("maxbatch", lambda: measure_maxbatch(plan, pipes, budget, out, skipped, folder), ("sd21",)),
            ("ddpo", lambda: measure_ddpo(plan, pipes, budget, out, skipped, folder), ("sd21",)),
            ("sd35", lambda: measure_sd35(plan, pipes, budget, out, skipped), ("sd35m",)),
        ]
        for name, fn, needs in steps:
            if not plan.wants(name, *needs):
                continue
            budget.start(name)
            t = time.perf_counter()
            print(f"[bench_scale] {name} ...", flush=True)
            fn()
            out[f"seconds_{name}"] = time.perf_counter() - t
            print(f"[bench_scale] {name}: {out[f'seconds_{name}']:.1f} s", flush=True)
        pipes.drop()
    for line in skipped:
        print(f"[bench_scale] skipped: {line}", flush=True)
    result.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()})
    result["skipped"] = skipped
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        plan = Plan(args)
    except TnRayError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    import diffusers
    import torch
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    if not _cuda():
        exact_cpu_rss()
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    result = run(plan)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
