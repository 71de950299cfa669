"""``tn-ray world train-generator``: train, evaluate on held-out prompts, write the shipped folder."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from tn_ray.diffusion.world import data, package
from tn_ray.diffusion.world.evaluate import evaluate
from tn_ray.diffusion.world.settings import WorldGeneratorConfig
from tn_ray.diffusion.world.train import Trainer


def build(cfg: WorldGeneratorConfig, work: Path, out: Path, progress=print) -> dict:
    """Train (resuming from ``work``), evaluate, write ``out`` (a diffusers folder + training.json)."""
    import torch

    trainer = Trainer(cfg, work, progress)
    trainer.run()
    log = [json.loads(line) for line in (Path(work) / "log.jsonl").read_text().splitlines()]
    pipe = trainer.pipeline(ema=True)
    phases = "both phases" if cfg.denoiser == "unet" else "the transformer"
    progress(f"trained in {trainer.elapsed:.0f} s of wall time ({phases}); evaluating on held-out prompts")
    prompts = data.held_out_prompts(cfg.eval_per_kind, cfg.held_out, seed=cfg.seed)
    t0 = time.perf_counter()
    # evaluate the fp16 weights as shipped (written once, loaded back in float32), not the float32 ones in memory
    package.save(pipe, Path(out), {})
    shipped = package.load(Path(out))
    result = evaluate(shipped, prompts, cfg.eval_images, cfg.sampling.steps, cfg.sampling.guidance, seed=cfg.seed)
    info = {
        "settings": cfg.model_dump(mode="json"),
        **({"parts_revision": trainer.parts} if trainer.parts else {}),
        "training_wall_s": round(trainer.elapsed, 1),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", torch {torch.__version__}, "
                   f"{cfg.threads} threads",
        "held_out_eval": {"prompts_per_kind": {k: sum(p.kind == k for p in prompts) for k in data.KINDS},
                          "images_per_prompt": cfg.eval_images, "steps": cfg.sampling.steps,
                          "guidance": cfg.sampling.guidance, "wall_s": round(time.perf_counter() - t0, 1),
                          "accuracy": result},
        "log": log,
    }
    rec = package.write_record(Path(out), info)
    for kind, r in result.items():
        progress(f"  {kind:>12}: {r['match']:6.1%} match, {r['unparseable']:6.1%} unparseable (n={r['n']})")
    return rec
