"""The counted work of a run (:func:`counts`: images, denoising steps, trained image-steps, reward scores; shared
RWR work once) and its price at the study's per-unit seconds (:func:`estimate`)."""

from __future__ import annotations

from typing import Any

from tn_ray.data.tia2 import SETS
from tn_ray.experiments.study.config import CostBlock
from tn_ray.experiments.study.plan import Cell
from tn_ray.prompts.contrast import load_contrast
from tn_ray.training.config import resolve_prompts


def count_prompts(cfg: Any) -> int:
    """Training / best-of-n prompts without resolving a prompt source where the config lists or counts them."""
    listed = getattr(cfg, "prompts", None)
    if listed:
        n = len(listed)
    elif getattr(cfg, "prompts_per_set", None):

        n = cfg.prompts_per_set * len(SETS)
    else:

        if hasattr(cfg, "pools"):

            n = len(load_contrast(cfg.contrast, tia2_dir=cfg.tia2_dir))
        else:
            n = len(resolve_prompts(cfg))
    return min(n, getattr(cfg, "max_prompts", None) or n)


def counts(cell: Cell, seen: set | None = None) -> dict[str, int]:
    """The work of one run: ``images`` (sampled or generated), ``image_steps`` (their denoising steps, evaluation
    included), ``train_steps`` (optimizer steps), ``trained_image_steps`` (image x trained timestep, forward +
    backward), ``eval_images`` and ``scores`` (image x reward model, evaluation included). With ``seen`` (one set
    passed through the runs in order) an RWR generation folder already counted adds no images, and a (generation
    folder, reward cache, model, texts) already scored adds no scores: shared work is counted once."""
    cfg, kind = cell.config, cell.key.kind
    prompts = count_prompts(cfg)
    if kind == "bestofn":
        images = prompts * cfg.generation.samples_per_prompt
        return {
            "images": images,
            "image_steps": images * cfg.generation.num_inference_steps,
            "train_steps": 0,
            "trained_image_steps": 0,
            "eval_images": 0,
            "scores": images * len(cfg.models),
        }
    workers = cfg.scaling.num_workers
    if kind == "rwr":
        pool = prompts * cfg.generation.samples_per_prompt
        folder = cfg.generation.out or cell.key.out
        cache = cfg.cache_dir or cell.key.out
        texts = cfg.reward.contrast if cfg.reward.needs_contrast else None
        images = 0 if seen is not None and ("generation", folder) in seen else pool
        pool_scores = sum(
            pool for m in cfg.reward.models if seen is None or ("scores", folder, cache, m, texts) not in seen
        )
        if seen is not None:
            seen.update([("generation", folder), *(("scores", folder, cache, m, texts) for m in cfg.reward.models)])
        image_steps = images * cfg.generation.num_inference_steps
        trained = cfg.max_steps * cfg.batch_size
    else:
        s, tr = cfg.sample, cfg.train
        pool_scores = None
        per_epoch = (
            s.batch_size * s.num_batches_per_epoch if kind == "ddpo" else s.batch_images * s.num_batches_per_epoch
        )
        images = cfg.max_steps * per_epoch * workers
        image_steps = images * s.num_steps
        trained = images * max(1, int(s.num_steps * tr.timestep_fraction)) * tr.num_inner_epochs
    ev = cfg.eval
    eval_prompts = min(len(ev.prompts) if ev.prompts else prompts, ev.max_prompts or prompts)
    evaluations = 1 + cfg.max_steps // ev.every  # the base model and every `every` steps
    eval_images = eval_prompts * len(ev.seeds) * evaluations
    eval_models = len(set(cfg.reward.models) | {m for j in ev.judges for m in j.models})
    return {
        "images": images,
        "image_steps": image_steps + eval_images * ev.num_inference_steps,
        "train_steps": cfg.max_steps,
        "trained_image_steps": trained,
        "eval_images": eval_images,
        "scores": (images * len(cfg.reward.models) if pool_scores is None else pool_scores) + eval_images * eval_models,
    }


def estimate(cost: CostBlock, work: dict[str, int]) -> float:
    """Seconds of one run's counted work at the study's per-unit costs."""
    return (
        work["image_steps"] * cost.image_step_s
        + work["trained_image_steps"] * cost.train_step_s
        + work["scores"] * cost.score_s
    )
