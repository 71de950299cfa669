"""Scoring cost, measured side by side in one run on this machine's CPU.

1. plain scoring (each image against x0 only) vs TextNorm at m = 32 (x0 + 32 contrastive
   prompts), on the TIA2 shape (50 images per prompt), with a realistically shaped dual
   encoder (open_clip ViT-B/32, seeded random weights): goal <= 1.1x.
   Images are read from JPEG files, as every real run does.
2. the project's path (each image encoded once, each prompt's text once) vs naive per-pair
   scoring that re-encodes the image for each of the 33 prompts: goal >= 10x.

3. the same for a cross-encoder, ImageReward at its real shapes (BLIP ViT-L/16 at 224 +
   BERT-base cross-attending to the image, seeded random weights: ``imagereward:random``):
   the project's path (image tower and the image side of cross-attention once per image,
   the text side once per pair) vs naive per-pair scoring that re-encodes the image for
   each of the 33 prompts: goal >= 3x.

Prints a table, then one JSON line with ``textnorm_over_plain``, ``naive_over_cached_dual``
and ``naive_over_cached_cross``.
Run: ``HF_HUB_OFFLINE=1 python benchmarks/bench_scoring.py [--images-per-prompt 50]``.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NUMBERS = ["one", "two", "three", "four", "five", "six"]
OBJECTS = ["dog", "cat", "horse", "truck", "bird", "ship"]


def contrastive_set(x0_count: int, x0_obj: str, m: int = 32) -> tuple[str, list[str]]:
    """x0 and m syntactically close prompts (other counts and objects), TIA2-like."""
    plural = lambda n, o: o if n == 1 else o + "s"  # noqa: E731
    x0 = f"a realistic photo of {NUMBERS[x0_count - 1]} {plural(x0_count, x0_obj)}"
    others = [f"a realistic photo of {NUMBERS[n - 1]} {plural(n, o)}" for o in OBJECTS for n in range(1, 7)]
    return x0, [p for p in others if p != x0][:m]


def images(n: int, folder: str, size: int = 512, seed: int = 0) -> list[str]:
    """JPEG files like TIA2's (512 px, Stable Diffusion v2.1 size): scoring reads files."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        # smooth random images compress like photos (pure noise would make huge JPEGs)
        small = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        path = os.path.join(folder, f"image_{i}.jpg")
        Image.fromarray(small).resize((size, size), Image.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def timed(fn, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_dual(spec: str, n_prompts: int, per_prompt: int, naive_images: int, batch_size: int = 32,
               repeats: int = 3) -> dict:
    from tn_ray.rewards import build
    from tn_ray.rewards.base import load_image

    model = build(spec)
    sets = [contrastive_set(1 + p % 6, OBJECTS[p % len(OBJECTS)]) for p in range(n_prompts)]
    ims = images(n_prompts * per_prompt, tempfile.mkdtemp(prefix="bench_scoring_"))
    plain_texts = [[sets[i // per_prompt][0]] for i in range(len(ims))]
    tn_texts = [[sets[i // per_prompt][0], *sets[i // per_prompt][1]] for i in range(len(ims))]
    model.score_rows(ims[:2], [["warm up"]] * 2)

    def fresh(texts):  # a new run as a reward actor sees it: empty text cache, batches of 32
        model._text_cache.clear()
        for i in range(0, len(ims), batch_size):
            model.score_rows(ims[i : i + batch_size], texts[i : i + batch_size])

    # interleaved repeats, best of each: both sides see the same machine load
    t_plain, t_tn = float("inf"), float("inf")
    for _ in range(repeats):
        t_plain = min(t_plain, timed(lambda: fresh(plain_texts), repeats=1))
        t_tn = min(t_tn, timed(lambda: fresh(tn_texts), repeats=1))

    def naive():
        for i in range(naive_images):
            for text in tn_texts[i]:
                with torch.inference_mode():
                    model.score(model.encode_images([load_image(ims[i])]), model.encode_texts([text]))

    t_naive = timed(naive, repeats=1) / naive_images
    per_image_cached = t_tn / len(ims)
    return {"plain_s": t_plain, "textnorm_s": t_tn, "images": len(ims), "m": len(tn_texts[0]) - 1,
            "textnorm_over_plain": t_tn / t_plain, "naive_per_image_s": t_naive,
            "cached_per_image_s": per_image_cached, "naive_over_cached_dual": t_naive / per_image_cached}


def bench_cross(spec: str = "imagereward:random", n_images: int = 2, naive_images: int = 1) -> dict:
    """Cross-encoder: per image, the project's path (``score_rows``: one image-tower pass,
    the image side of cross-attention once, the 33 text passes in batches) vs naive scoring
    of each (image, prompt) pair alone, which re-encodes the image for every prompt."""
    from tn_ray.rewards import build
    from tn_ray.rewards.base import load_image

    model = build(spec)
    x0, others = contrastive_set(3, "dog")
    texts = [x0, *others]
    ims = images(max(n_images, naive_images), tempfile.mkdtemp(prefix="bench_cross_"))
    model.score_rows(ims[:1], [texts[:2]])  # warm up

    def cached():
        model._text_cache.clear()
        model.score_rows(ims[:n_images], [texts] * n_images)

    def naive():
        for path in ims[:naive_images]:
            for text in texts:
                with torch.inference_mode():
                    model.score(model.encode_images([load_image(path)]),
                                model.join_text_features(model.encode_texts([text])))

    cached_per_image = timed(cached, repeats=1) / n_images
    naive_per_image = timed(naive, repeats=1) / naive_images
    return {"spec": spec, "prompts": len(texts), "cached_per_image_s": cached_per_image,
            "naive_per_image_s": naive_per_image, "naive_over_cached_cross": naive_per_image / cached_per_image}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="clip:ViT-B-32/random", help="dual encoder spec")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--images-per-prompt", type=int, default=50)
    ap.add_argument("--naive-images", type=int, default=3)
    ap.add_argument("--cross-model", default="imagereward:random", help="cross-encoder spec")
    ap.add_argument("--cross-images", type=int, default=2, help="images scored on the cached cross-encoder path")
    args = ap.parse_args()
    print(f"torch threads: {torch.get_num_threads()}, model: {args.model}")
    dual = bench_dual(args.model, args.prompts, args.images_per_prompt, args.naive_images)
    print(f"dual encoder ({args.model}), {dual['images']} images, m = {dual['m']}:")
    print(f"  plain scoring (x0 only)       {dual['plain_s']:8.2f} s")
    print(f"  TextNorm scoring (x0 + {dual['m']})    {dual['textnorm_s']:8.2f} s   ratio "
          f"{dual['textnorm_over_plain']:.3f} (goal <= 1.1)")
    print(f"  naive per-pair, per image     {dual['naive_per_image_s']:8.3f} s")
    print(f"  cached path, per image        {dual['cached_per_image_s']:8.3f} s   speedup "
          f"{dual['naive_over_cached_dual']:.1f}x (goal >= 10)")
    cross = bench_cross(args.cross_model, args.cross_images)
    print(f"cross-encoder ({cross['spec']}), {cross['prompts']} prompts per image:")
    print(f"  naive per-pair, per image     {cross['naive_per_image_s']:8.3f} s")
    print(f"  cached path, per image        {cross['cached_per_image_s']:8.3f} s   speedup "
          f"{cross['naive_over_cached_cross']:.1f}x (goal >= 3)")
    result = {"textnorm_over_plain": round(dual["textnorm_over_plain"], 4),
              "naive_over_cached_dual": round(dual["naive_over_cached_dual"], 2),
              "naive_over_cached_cross": round(cross["naive_over_cached_cross"], 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
