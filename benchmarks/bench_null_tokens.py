"""GRPO's flow sampling with the T5 zero tokens folded into one (tn_ray.diffusion.null_tokens) and without.

``sample_flow_chains`` (every step by the SDE, noise level 0.7, guidance 4.5: chains and log-probs, what GRPO
samples and the path KL re-runs) with ``fold_null_tokens=True`` (the default without T5: one zero token counted
256 times in attention) over ``fold_null_tokens=False`` (the pipeline's 256 zero tokens), same prompts,
generators, steps and size, on pipelines without T5:

- ``tiny-sd3``: 32 px (16 x 16 x 4 latent, patch 2: 64 image tokens), 77 CLIP tokens + 256 or 1;
- ``world-flow-test``: the world-flow pipeline with the test settings' transformer (2 blocks, 2 heads of 8),
  built by ``Trainer.pipeline()`` on the shipped world autoencoder and text encoder, untrained;
- ``world-flow``: the same with sweeps/world_generator_flow.yaml's transformer (6 blocks, 4 heads of 32: 64 image
  tokens), untrained (the speed does not depend on the weights).

Each with a rank-4 LoRA adapter (GRPO's policy). Also ``rescore_*``: GRPO's training forward and backward
(``flow_step_log_prob`` of every recorded step, ``log_prob.sum().backward()``) on the folded chains and on the
256-token chains. Interleaved repeats after a warm-up round, medians; prints one JSON line per pipeline.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_null_tokens.py [--repeats 5] [--batch 8] [--steps 10]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def world_flow(yaml: bool):
    from tn_ray.config import load_config
    from tn_ray.diffusion.world.settings import WorldGeneratorConfig
    from tn_ray.diffusion.world.train import Trainer

    if yaml:
        cfg = load_config(Path("sweeps/world_generator_flow.yaml"), WorldGeneratorConfig)
    else:
        cfg = WorldGeneratorConfig(threads=1, denoiser="transformer", parts_from="world",
                                   train={"objective": "flow"}, transformer={"layers": 2, "heads": 2, "head_dim": 8})
    with tempfile.TemporaryDirectory() as work:
        trainer = Trainer(cfg, work, progress=lambda s: None)
    pipe = trainer.pipeline(ema=False)
    return pipe


def timing(pipe, repeats: int, batch: int, steps: int) -> dict[str, float]:
    import torch

    from tn_ray.diffusion.flow_sampling import flow_step_log_prob, sample_flow_chains
    from tn_ray.training.flow_policy import add_flow_lora

    add_flow_lora(pipe, rank=4)
    prompts = [f"a photo of {i} red circles" for i in range(batch)]
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(batch)]  # noqa: E731
    times: dict[bool, list[float]] = {True: [], False: []}
    rescore: dict[bool, list[float]] = {True: [], False: []}
    for r in range(repeats + 1):
        for fold in (True, False):
            t0 = time.perf_counter()
            chains = sample_flow_chains(pipe, prompts, num_steps=steps, guidance=4.5, noise_level=0.7,
                                        generator=gens(), fold_null_tokens=fold)
            t1 = time.perf_counter()
            for j in range(steps):
                flow_step_log_prob(pipe.transformer, pipe.scheduler, chains, j, 4.5, 0.7).log_prob.sum().backward()
            t2 = time.perf_counter()
            if r:
                times[fold].append(t1 - t0)
                rescore[fold].append(t2 - t1)
    one, full = statistics.median(times[True]), statistics.median(times[False])
    r1, rf = statistics.median(rescore[True]), statistics.median(rescore[False])
    return {"one_token_s": round(one, 4), "zero_tokens_256_s": round(full, 4), "speedup": round(full / one, 2),
            "rescore_one_token_s": round(r1, 4), "rescore_zero_tokens_256_s": round(rf, 4),
            "rescore_speedup": round(rf / r1, 2)}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from tn_ray.diffusion.pipelines import TINY_SD3, load_pipeline

    for name, make in (("tiny-sd3", lambda: load_pipeline(TINY_SD3)), ("world-flow-test", lambda: world_flow(False)),
                       ("world-flow", lambda: world_flow(True))):
        pipe = make()
        torch.set_num_threads(args.threads)
        row = {"pipeline": name, "batch": args.batch, "steps": args.steps, "threads": args.threads,
               **timing(pipe, args.repeats, args.batch, args.steps)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
