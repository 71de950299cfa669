"""The world pipeline's costs, measured side by side in one run (docs/world.md, "The world generator").

- ``world_images_per_s`` / ``tiny_images_per_s``: 32 px images per second of the plain diffusers call
  (20 DDIM steps, guidance 3, batch 32, one CPU generator per image) of the shipped ``world``
  pipeline and of the random ``tiny`` pipeline at the same size, interleaved repeats, medians;
  ``world_over_tiny_seconds``: the ratio of their seconds per image.
- ``judge_share_of_ddpo_sampling``: ``worldjudge``'s time to judge a DDPO sampling batch (decoded
  images -> verdicts) as a share of sampling that batch with recorded chains and log-probs
  (``tn_ray.diffusion.sampling.sample_chains``, 10 steps, guidance 3, batch 32) (aim <= 0.05).
- ``judge_ms_per_image``: the judge's time per 32 px image within such a batch.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_world.py [--repeats 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()

    import torch

    from tn_ray.data.world.grammar import prompt_list
    from tn_ray.data.world.judge import judge
    from tn_ray.diffusion.pipelines import load_pipeline
    from tn_ray.diffusion.sampling import decode_images, sample_chains, use_ddim

    torch.set_num_threads(args.threads)
    prompts = [p.text for p in prompt_list(8, seed=0)] * (args.batch // 32 + 1)  # 32 distinct (8 per kind)
    prompts = prompts[: args.batch]
    pipes = {"world": load_pipeline("world"), "tiny": load_pipeline("tiny")}

    def plain(pipe) -> float:
        gens = [torch.Generator().manual_seed(i) for i in range(args.batch)]
        t0 = time.perf_counter()
        with torch.no_grad():
            pipe(prompts, num_inference_steps=20, guidance_scale=3.0, generator=gens, height=32, width=32)
        return (time.perf_counter() - t0) / args.batch

    seconds = {name: [] for name in pipes}
    for _ in range(args.repeats):
        for name, pipe in pipes.items():
            seconds[name].append(plain(pipe))
    per_image = {name: statistics.median(v) for name, v in seconds.items()}

    world = pipes["world"]
    use_ddim(world)
    sample_s, judge_s = [], []
    for r in range(args.repeats):
        gens = [torch.Generator().manual_seed(1000 * r + i) for i in range(args.batch)]
        t0 = time.perf_counter()
        chains = sample_chains(world, prompts, list(range(args.batch)), num_steps=10, guidance=3.0, eta=1.0,
                               generator=gens)
        images = decode_images(world, chains.latents[:, -1])
        sample_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        judge(list(images), prompts)
        judge_s.append(time.perf_counter() - t0)
    result = {
        "world_images_per_s": round(1 / per_image["world"], 2),
        "tiny_images_per_s": round(1 / per_image["tiny"], 2),
        "world_over_tiny_seconds": round(per_image["world"] / per_image["tiny"], 2),
        "judge_share_of_ddpo_sampling": round(statistics.median(judge_s) / statistics.median(sample_s), 4),
        "judge_ms_per_image": round(1000 * statistics.median(judge_s) / args.batch, 3),
        "ddpo_sampling_s_per_image": round(statistics.median(sample_s) / args.batch, 4),
        "threads": args.threads,
        "repeats": args.repeats,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
