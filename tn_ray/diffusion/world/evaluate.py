"""How often the world generator draws what a prompt says, judged by ``worldjudge`` (exact truth).

Generates ``images`` samples for each held-out prompt (seeded per prompt and sample with the one
seed scheme), reads every image back with the judge and reports, per prompt kind and overall,
the share that match, the share the judge cannot read ("unparseable": a loss of image quality,
not of alignment) and the oracle's error types.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

from tn_ray.diffusion.seeds import seed_of


def generate(pipe, texts: Sequence[str], images: int, steps: int, guidance: float, seed: int = 0,
             batch: int = 256) -> list:
    """``images`` PIL images per text (text-major), each from its own seeded generator."""
    import torch

    from tn_ray.diffusion.flow_sampling import pipeline_prompts

    rows = [(t, i) for t in texts for i in range(images)]
    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    side = denoiser.config.sample_size * pipe.vae_scale_factor
    out = []
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        gens = [torch.Generator().manual_seed(seed_of(seed, t, i)) for t, i in chunk]
        with torch.no_grad(), pipeline_prompts(pipe, [t for t, _ in chunk]) as inputs:  # world-flow: zeros folded
            out += pipe(**inputs, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                        height=side, width=side).images
    return out


def accuracy(prompts: Sequence, images: Sequence, per_prompt: int) -> dict:
    """Per kind and overall: n, match share, unparseable share, error counts."""
    from tn_ray.data.world.judge import judge

    texts = [p.text for p in prompts for _ in range(per_prompt)]
    kinds = [p.kind for p in prompts for _ in range(per_prompt)]
    verdicts = judge(list(images), texts)
    by: dict[str, list] = defaultdict(list)
    for kind, v in zip(kinds, verdicts):
        by[kind].append(v)
        by["overall"].append(v)

    def summary(vs):
        n = len(vs)
        return {"n": n, "match": sum(v.match for v in vs) / n,
                "unparseable": sum(v.status == "unparseable" for v in vs) / n,
                "errors": dict(Counter(v.error for v in vs if v.status == "wrong scene"))}

    return {k: summary(v) for k, v in by.items()}


def evaluate(pipe, prompts: Sequence, per_prompt: int, steps: int, guidance: float, seed: int = 0) -> dict:
    images = generate(pipe, [p.text for p in prompts], per_prompt, steps, guidance, seed)
    return accuracy(prompts, images, per_prompt)
