"""The reward service (docs/serve.md) against in-process scoring, on the embedded default.

1. In-process: one :class:`RewardWorker` in this process scores requests of ``--pairs`` (image,
   prompt) pairs one after the other, with as many torch threads as a service replica gets.
2. The service (``tn-ray serve rewards``: one model deployment, the front) on loopback: requests of
   the same pairs from 1 / 4 / 16 concurrent clients (``RewardClient``, JSON + base64 JPEG):
   requests/s and p50 / p99 latency at each concurrency.
3. Start-up: the first rows from a cold ``RewardPool`` (actor start and model load, what a command
   pays today) against the first rows from the warm service through ``ServicePool``.

Model: a ViT-B/32-shaped CLIP with seeded random weights (``clip:ViT-B-32/random``, as
bench_scoring.py), so the model's compute and not only HTTP is measured; images 512 px JPEGs.
``--quick``: clip:tiny, 64 px, fewer requests (a check that the script runs).

``--bestofn``: only best-of-n's time to its first scored image (``generate_and_score``, the tiny
pipeline, 2 prompts x 4 samples, batches of 2, ``--model`` the reward): first with in-process reward
actors on a fresh local Ray (generation and reward actors start, the model loads), then with
``service`` set to a warm service started in the same Ray (generation actors start; the stage only
sends requests). Last line: {"bestofn_first_scored_inprocess_s", "bestofn_first_scored_service_s",
"bestofn_startup_saved_s"} (the difference).

Last line: {"serve_over_inprocess_throughput": x (at concurrency 16), "rps_c1": x, "p50_ms_c1": x,
"p99_ms_c1": x, ... "_c4", "_c16", "inprocess_rps": x, "reward_pool_startup_s": x,
"service_first_rows_s": x, "bestofn_startup_saved_s": x}. Here ``bestofn_startup_saved_s`` is the
reward pool's start-up that a warm service saves; ``--bestofn`` measures it on best-of-n itself.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import socket
import threading
import time

import numpy as np


def jpeg(seed: int, size: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.random((8, 8, 3))  # smooth random images compress like photos
    arr = (np.kron(small, np.ones((size // 8, size // 8, 1))) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="clip:ViT-B-32/random", help="reward model spec")
    ap.add_argument("--pairs", type=int, default=32, help="(image, prompt) pairs per request")
    ap.add_argument("--size", type=int, default=512, help="image side (pixels)")
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level (at least the level)")
    ap.add_argument("--max-batch", type=int, default=64,
                    help="replica.max_batch_size (images per model call; at least --pairs): on CPUs a model call "
                         "of a few requests keeps the pipeline full, one of all of them makes every client wait")
    ap.add_argument("--quick", action="store_true", help="clip:tiny, 64 px, 8 requests per level")
    ap.add_argument("--bestofn", action="store_true", help="only best-of-n's time to its first scored image, "
                                                           "in-process reward actors vs a warm service")
    args = ap.parse_args()
    if args.bestofn:
        return bestofn_first_scored(args.model)
    if args.quick:
        args.model, args.size, args.requests = "clip:tiny", 64, 8
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from tn_ray.client import RewardClient
    from tn_ray.cluster import init_ray
    from tn_ray.config import RayConfig, ScoringConfig
    from tn_ray.scoring.service_pool import ServicePool
    from tn_ray.scoring.workers import RewardPool, RewardWorker
    from tn_ray.serve.app import start
    from tn_ray.serve.config import ServeConfig

    cpus = os.cpu_count() or 2
    threads = max(1, cpus - 1)  # the replica's CPUs (the front and this driver share the rest)
    prompts = ["two red cubes", "a cat on a sofa"]
    pool_images = [jpeg(i, args.size) for i in range(args.pairs * 4)]

    def req(k: int) -> tuple[list[bytes], list[str]]:
        start_i = (k * args.pairs) % len(pool_images)
        ims = [pool_images[(start_i + i) % len(pool_images)] for i in range(args.pairs)]
        return ims, [prompts[i % 2] for i in range(args.pairs)]

    # 1. in-process
    torch.set_num_threads(threads)
    worker = RewardWorker(args.model)
    worker.score(*[[x] for x in (req(0)[0][0],)], [[prompts[0]]])  # warm-up: text cache, allocator
    n_in = max(4, args.requests // 2)
    t0 = time.perf_counter()
    for k in range(n_in):
        ims, ps = req(k)
        worker.score(ims, [[p] for p in ps])
    inprocess_rps = n_in / (time.perf_counter() - t0)
    del worker

    # 3a. a cold RewardPool: what a command pays before its first rewards
    init_ray(RayConfig(num_cpus=cpus))
    t0 = time.perf_counter()
    pool = RewardPool(args.model, ScoringConfig(cpus_per_actor=threads))
    pool.score(*[[x] for x in (req(0)[0][0],)], [[prompts[0]]])
    pool_startup = time.perf_counter() - t0
    pool.shutdown()

    # 2. the service
    cfg = ServeConfig(port=free_port(), models=[args.model],
                      replica={"num_cpus": threads, "max_batch_size": max(args.max_batch, args.pairs),
                               "batch_wait_timeout_s": 0.01, "max_ongoing_requests": 64},
                      limits={"max_pairs": args.pairs})
    url = start(cfg)
    client = RewardClient(url, timeout_s=600)
    client.score(*req(0), reward=args.model)  # warm-up
    out: dict[str, float] = {}
    for conc in (1, 4, 16):
        n = max(args.requests, conc)
        lat: list[float] = []
        lock = threading.Lock()
        todo = iter(range(n))

        def run(todo=todo, lat=lat, lock=lock) -> None:
            while True:
                with lock:
                    k = next(todo, None)
                if k is None:
                    return
                t = time.perf_counter()
                client.score(*req(k), reward=args.model)
                with lock:
                    lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        ths = [threading.Thread(target=run) for _ in range(conc)]
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        wall = time.perf_counter() - t0
        out[f"rps_c{conc}"] = round(n / wall, 3)
        out[f"p50_ms_c{conc}"] = round(float(np.percentile(lat, 50)) * 1000, 1)
        out[f"p99_ms_c{conc}"] = round(float(np.percentile(lat, 99)) * 1000, 1)
        print(f"concurrency {conc}: {n} requests of {args.pairs} pairs, {out[f'rps_c{conc}']} requests/s, "
              f"p50 {out[f'p50_ms_c{conc}']} ms, p99 {out[f'p99_ms_c{conc}']} ms", flush=True)

    # 3b. the warm service's first rows through the RewardPool backend
    t0 = time.perf_counter()
    spool = ServicePool(args.model, url)
    spool.score(*[[x] for x in (req(0)[0][0],)], [[prompts[0]]])
    service_first = time.perf_counter() - t0
    spool.shutdown()
    stats = client.stats()[cfg.models[0]]
    print(f"model calls {stats['model_calls']} for {stats['requests']} requests; in-process {inprocess_rps:.3f} "
          f"requests/s with {threads} torch threads; cold reward pool {pool_startup:.1f} s, warm service "
          f"{service_first:.2f} s", flush=True)
    from ray import serve

    serve.shutdown()
    result = {
        "serve_over_inprocess_throughput": round(out["rps_c16"] / inprocess_rps, 4),
        **out,
        "inprocess_rps": round(inprocess_rps, 3),
        "reward_pool_startup_s": round(pool_startup, 2),
        "service_first_rows_s": round(service_first, 3),
        "bestofn_startup_saved_s": round(pool_startup - service_first, 2),
        "model": args.model,
        "pairs": args.pairs,
        "max_batch_size": max(args.max_batch, args.pairs),
        "model_calls": stats["model_calls"],
        "service_requests": stats["requests"],
    }
    print(json.dumps(result))


def bestofn_first_scored(model: str) -> None:
    """Best-of-n's seconds to its first scored batch: in-process reward actors, then a warm service."""
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tn_ray.cluster import init_ray
    from tn_ray.config import RayConfig, ScoringConfig
    from tn_ray.diffusion.generation import GenerationConfig
    from tn_ray.experiments.bestofn_stream import generate_and_score
    from tn_ray.serve.app import start
    from tn_ray.serve.config import ServeConfig

    prompts = ["two red cubes", "a cat on a sofa"]
    texts = {"two red cubes": ["two red cubes", "a red cube"], "a cat on a sofa": ["a cat on a sofa", "a dog"]}
    cpus = os.cpu_count() or 2
    init_ray(RayConfig(num_cpus=cpus))
    first: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        def run(name: str, service: str | None) -> None:
            gen = GenerationConfig(out=f"{tmp}/{name}/gen", pipeline="tiny", num_inference_steps=2, height=32,
                                   width=32, samples_per_prompt=4, pipeline_batch_size=2, batch_size=2,
                                   num_actors=1, cpus_per_actor=0.25)
            t0 = time.perf_counter()

            def on_batch(rows) -> None:
                first.setdefault(name, time.perf_counter() - t0)

            generate_and_score(prompts, texts, gen, [model], f"{tmp}/{name}/cache", ScoringConfig(batch_size=2),
                               set_name="bestofn", score_below=4, on_batch=on_batch, service=service)
            print(f"{name}: first scored batch after {first[name]:.2f} s", flush=True)

        run("inprocess", None)
        url = start(ServeConfig(port=free_port(), models=[model], replica={"num_cpus": 0.25}))
        run("service", url)
    from ray import serve

    serve.shutdown()
    print(json.dumps({"bestofn_first_scored_inprocess_s": round(first["inprocess"], 2),
                      "bestofn_first_scored_service_s": round(first["service"], 2),
                      "bestofn_startup_saved_s": round(first["inprocess"] - first["service"], 2), "model": model,
                      "cpus": cpus}))


if __name__ == "__main__":
    main()
