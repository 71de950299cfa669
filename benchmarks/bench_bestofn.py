"""Best-of-n throughput and memory: the streaming Ray pipeline vs a bare single-process loop.

1. Throughput: the same workload (tiny diffusers pipeline at 64 px, 4 steps, groups of 8;
   every image written as PNG and scored by clip:tiny against x0 and 4 contrastive prompts)
   run (a) as a bare loop in this process (pipeline and reward model loaded here; with
   torch's default threads or one thread, whichever calibrates faster) and (b) through the
   streaming Ray pipeline (`tn_ray.experiments.bestofn_stream.generate_and_score`: generation
   actors and a reward actor at once, images passed by path; the CPUs split between them by the
   rule of thumb of docs/bestofn.md, from the per-image times the bare loop measures), then
   `score_matrices` reading the cache, as `tn-ray bestofn` does. The workload is sized so the bare
   loop takes at least a minute. Ray's cluster start is excluded (a long-lived cluster); actor
   start and model loading count on both sides. Reported separately: the start-up cost (time to
   the first stored images: model loading, Ray Data and actor start) and the steady-state
   throughput after it.
2. Memory: `tn-ray bestofn` on the tiny models at n = 16 and n = 256 (pools 16/64/256), each in
   a fresh process with its own local Ray and the same actor counts (2 generation actors, with
   Ray tasks of one 8-image group so that n = 16 also keeps both busy; 1 reward actor, streaming);
   the peak of the summed resident memory of the whole process tree (driver, Ray daemons, actors)
   is sampled every 0.2 s.

Last line: {"ray_over_bare_throughput": x, "steady_state_ray_over_bare": x, "ray_startup_s": x,
"bare_startup_s": x, "score_over_generation_time": x, "peak_mem_n256_over_n16": x}.
Usage: HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_bestofn.py [--min-bare-seconds 60]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]
SHAPES = ["circle", "square", "triangle", "star", "cube", "ball", "cone", "ring"]
SAMPLES = 32  # per prompt in the throughput workload
CPUS = len(os.sched_getaffinity(0))  # the cores this process may use (taskset emulates a small machine)
GEN = dict(pipeline="tiny", num_inference_steps=4, height=64, width=64, pipeline_batch_size=8)


def prompts_and_contrast(n: int) -> tuple[list[str], dict[str, list[str]]]:
    prompts, contrast = [], {}
    for i in range(n):
        c, s = COLORS[i % len(COLORS)], SHAPES[(i // len(COLORS)) % len(SHAPES)]
        k = 2 + i // (len(COLORS) * len(SHAPES))
        p = f"a photo of {k} {c} {s}s"
        prompts.append(p)
        contrast[p] = [f"a photo of {k + 1} {c} {s}s", f"a photo of {k} {COLORS[(i + 1) % 8]} {s}s",
                       f"a photo of {k} {c} {SHAPES[(i + 1) % 8]}s", f"a drawing of {k} {c} {s}s"]
    return prompts, contrast


def bare_loop(prompts, contrast, out: Path) -> dict:
    """Generate, write and score every image in this process. Returns seconds in total, to the
    first scored group (model loading included), per prompt, and spent generating / scoring."""
    from tn_ray.diffusion.generation import GenerationConfig, encode_png, generate_group, image_path
    from tn_ray.diffusion.pipelines import load_pipeline
    from tn_ray.rewards import build
    from tn_ray.storage import Store

    start = time.perf_counter()
    cfg = GenerationConfig(out=str(out), samples_per_prompt=SAMPLES, **GEN)
    pipe = load_pipeline(cfg.pipeline, cfg.scheduler, cfg.dtype)
    reward = build("clip:tiny")
    store = Store(out)
    per_prompt, mark, first, t_gen, t_score = [], time.perf_counter(), None, 0.0, 0.0
    for pid, prompt in enumerate(prompts):
        texts = [prompt, *contrast[prompt]]
        for g in range(0, SAMPLES, cfg.pipeline_batch_size):
            samples = range(g, g + cfg.pipeline_batch_size)
            paths = []
            t0 = time.perf_counter()
            for s, im in zip(samples, generate_group(pipe, cfg, prompt, samples)):
                store.write_bytes(image_path(pid, s), encode_png(im))
                paths.append(store.uri(image_path(pid, s)))
            t1 = time.perf_counter()
            reward.score_rows(paths, [texts] * len(paths))
            t_gen, t_score = t_gen + t1 - t0, t_score + time.perf_counter() - t1
            first = first or time.perf_counter() - start
        per_prompt.append(time.perf_counter() - mark)
        mark = time.perf_counter()
    return {"total": time.perf_counter() - start, "first": first, "per_prompt": per_prompt,
            "generating": t_gen, "scoring": t_score}


def split_cpus(cpus: int, score_over_generation: float) -> tuple[float, float]:
    """(CPUs per generation actor, CPUs of the reward actor) for one actor per core: the reward
    actor gets the cores' share of scoring time (docs/bestofn.md's rule of thumb), at least 0.05."""
    reward = max(0.05, round(cpus * score_over_generation / (1 + score_over_generation), 2))
    return (cpus - reward) / cpus, reward


def ray_pipeline(prompts, contrast, out: Path, score_over_generation: float) -> dict:
    """The streaming pipeline, then the score matrices from the cache; seconds in total and to
    the first stored batch."""
    from tn_ray.config import ScoringConfig
    from tn_ray.diffusion.generation import GenerationConfig
    from tn_ray.experiments.bestofn import score_items
    from tn_ray.experiments.bestofn_stream import generate_and_score
    from tn_ray.scoring.batch_scoring import score_matrices

    cpus = CPUS
    gen_cpus, reward_cpus = split_cpus(cpus, score_over_generation)
    gen = GenerationConfig(out=str(out / "generation"), samples_per_prompt=SAMPLES, batch_size=8,
                           num_actors=cpus, cpus_per_actor=gen_cpus, **GEN)
    scoring = ScoringConfig(batch_size=32, cpus_per_actor=reward_cpus)
    texts = {p: [p, *contrast[p]] for p in prompts}
    start = time.perf_counter()
    first: list[float] = []
    manifest = generate_and_score(
        prompts,
        texts,
        gen,
        ["clip:tiny"],
        str(out / "cache"),
        scoring,
        set_name="bestofn",
        score_below=SAMPLES,
        on_batch=lambda rows: first or first.append(time.perf_counter() - start),
    )
    stats: dict = {}
    score_matrices(score_items(manifest, contrast, "benchmark"), ["clip:tiny"], out / "cache", scoring, stats=stats)
    assert stats["clip:tiny"]["computed"] == 0, stats  # the stream scored every image
    return {"total": time.perf_counter() - start, "first": first[0], "gen_cpus": gen_cpus, "reward_cpus": reward_cpus}


def tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
        stack.extend(children.get(pid, []))
    return total


def peak_memory_run(n: int, tmp: Path) -> tuple[int, float]:
    """Peak tree RSS (bytes) and seconds of `tn-ray bestofn` at pool size n in a fresh process."""
    prompts, contrast = prompts_and_contrast(2)
    (tmp / "contrast.json").write_text(json.dumps(contrast))
    pools = [p for p in (16, 64, 256) if p <= n]
    cfg = {
        "out": str(tmp / f"run{n}"),
        "contrast": str(tmp / "contrast.json"),
        "pools": pools,
        "top_k": [1, 4],
        "models": ["clip:tiny"],
        "generation": {
            "pipeline": "tiny",
            "num_inference_steps": 2,
            "height": 32,
            "width": 32,
            "pipeline_batch_size": 8,
            "batch_size": 8,
            "num_actors": 2,
            "cpus_per_actor": 0.875,
        },
        "scoring": {"batch_size": 32, "num_actors": 1},
        "grid_cell": 32,
        "ray": {"num_cpus": 2},
    }
    path = tmp / f"bestofn{n}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tn_ray.cli", "bestofn", str(path)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak, start = 0, time.perf_counter()
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.2)
    reader.join()
    if proc.returncode != 0:
        raise SystemExit(f"bestofn n={n} failed:\n{err[0][-3000:]}")
    return peak, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--min-bare-seconds", type=float, default=60.0, help="size the workload so the bare loop runs this long"
    )
    args = ap.parse_args()
    import torch

    from tn_ray.cluster import init_ray
    from tn_ray.config import RayConfig

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        # The bare loop can use torch's default intra-op threads (every core) or one thread (as
        # a Ray actor has); on a shared machine either may be faster. Calibrate both (seconds
        # per prompt, once warm) and run the workload with the faster: the stronger baseline.
        cal_prompts, cal_contrast = prompts_and_contrast(2)  # the first prompt warms up
        default_threads = torch.get_num_threads()
        variants = {}
        for threads in sorted({default_threads, 1}, reverse=True):
            torch.set_num_threads(threads)
            variants[threads] = min(bare_loop(cal_prompts, cal_contrast, tmp / f"calibrate{threads}")["per_prompt"][1:])
            print(f"calibration, bare loop with {threads} torch thread(s): {SAMPLES / variants[threads]:.2f} images/s")
        threads = min(variants, key=variants.get)
        n_prompts = max(
            4, math.ceil(args.min_bare_seconds * 1.3 / variants[threads])
        )  # margin: calibration is optimistic
        prompts, contrast = prompts_and_contrast(n_prompts)
        n_images = n_prompts * SAMPLES
        first_images = 8  # one pipeline group: the first stored batch on both sides
        print(
            f"workload: {n_prompts} prompts x {SAMPLES} samples = {n_images} images (64 px, 4 steps), "
            f"scored by clip:tiny against 5 prompts each; {CPUS} CPUs"
        )

        torch.set_num_threads(threads)
        bare = bare_loop(prompts, contrast, tmp / "bare")
        torch.set_num_threads(default_threads)
        t_bare = bare["total"]
        score_over_gen = bare["scoring"] / bare["generating"]
        print(
            f"bare single-process loop ({threads} torch thread(s)): {t_bare:.1f} s, {n_images / t_bare:.2f} "
            "images/s; "
            f"{bare['first']:.1f} s to the first scored group; per image {1000 * bare['generating'] / n_images:.1f} "
            "ms "
            f"generating, {1000 * bare['scoring'] / n_images:.1f} ms scoring (ratio {score_over_gen:.4f})"
        )
        init_ray(RayConfig(num_cpus=CPUS))
        ray_run = ray_pipeline(prompts, contrast, tmp / "ray", score_over_gen)
        import ray

        ray.shutdown()
        t_ray = ray_run["total"]
        print(
            f"streaming Ray pipeline ({CPUS} generation actors of {ray_run['gen_cpus']:.3f} CPU + 1 reward "
            f"actor of {ray_run['reward_cpus']:.2f} CPU, at once; actor start and model loading included): "
            f"{t_ray:.1f} s, {n_images / t_ray:.2f} images/s; {ray_run['first']:.1f} s to the first stored batch"
        )
        ratio = t_bare / t_ray
        steady = ((n_images - first_images) / (t_ray - ray_run["first"])) / (
            (n_images - first_images) / (t_bare - bare["first"])
        )
        print(f"start-up (to the first stored images): Ray {ray_run['first']:.1f} s, bare {bare['first']:.1f} s")
        print(f"steady-state throughput after the first images, ray / bare: {steady:.3f}")
        print(f"end to end, ray / best bare throughput: {ratio:.3f} (goal >= 0.9)")

        mem16, s16 = peak_memory_run(16, tmp)
        mem256, s256 = peak_memory_run(256, tmp)
        print(f"tn-ray bestofn n=16 : peak RSS of the process tree {mem16 / 2**20:.0f} MiB ({s16:.0f} s)")
        print(f"tn-ray bestofn n=256: peak RSS of the process tree {mem256 / 2**20:.0f} MiB ({s256:.0f} s)")
        mem_ratio = mem256 / mem16
        print(f"peak memory n=256 / n=16: {mem_ratio:.3f} (goal <= 1.2)")
    print(
        json.dumps(
            {
                "ray_over_bare_throughput": round(ratio, 3),
                "steady_state_ray_over_bare": round(steady, 3),
                "ray_startup_s": round(ray_run["first"], 1),
                "bare_startup_s": round(bare["first"], 1),
                "score_over_generation_time": round(score_over_gen, 4),
                "peak_mem_n256_over_n16": round(mem_ratio, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
