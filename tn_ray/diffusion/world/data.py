"""The world generator's training data: fresh (render, caption) pairs, and the held-out prompts.

A prompt is held out when a hash of its text falls below ``held_out`` (so the split needs no
list and every prompt kind loses the same share); training never shows a held-out caption, and
the evaluation draws only held-out prompts.
"""
from __future__ import annotations

import hashlib

import numpy as np

from tn_ray.data.world import grammar, sampler, scenes
from tn_ray.data.world.grammar import KINDS


def is_held_out(text: str, share: float) -> bool:
    h = int.from_bytes(hashlib.sha256(f"world-generator:{text}".encode()).digest()[:8], "big")
    return h / 2**64 < share


def training_pairs(n: int, share: float, size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """``n`` renders (uint8, n x size x size x 3) of scenes matching captions of random kinds
    (uniform over kinds, then over the kind's non-held-out prompts)."""
    images, texts = [], []
    while len(texts) < n:
        p = grammar.random_prompt(grammar.KINDS[int(rng.integers(len(grammar.KINDS)))], rng)
        if is_held_out(p.text, share):
            continue
        scene = sampler.draw_scene(p, None, rng)
        images.append(np.asarray(scenes.render(scene, size, seed=int(rng.integers(2**31)))))
        texts.append(p.text)
    return np.stack(images), texts


def held_out_prompts(per_kind: int, share: float, seed: int = 0) -> list[grammar.WorldPrompt]:
    """``per_kind`` distinct held-out prompts of each kind (fewer where the kind has fewer)."""
    rng = np.random.default_rng(seed)
    out = []
    for kind in KINDS:
        seen: dict[str, grammar.WorldPrompt] = {}
        for _ in range(20000):
            p = grammar.random_prompt(kind, rng)
            if is_held_out(p.text, share):
                seen.setdefault(p.text, p)
            if len(seen) == per_kind:
                break
        out += sorted(seen.values(), key=lambda p: p.text)
    return out


def to_tensor(images: np.ndarray):
    """uint8 NHWC -> float NCHW in [-1, 1] (the pipeline's image range)."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
