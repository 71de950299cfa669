"""``tn-ray rwr CONFIG``: reward-weighted regression with LoRA (the paper's eq. 4; Lee et al. 2023).

Flow (driver): prompts -> images from the base model (seeded, sharded, resumable generation,
default 100 per prompt) -> score matrices on the reward actors, scored once (cached) -> the
configured reward column ``D_model`` (raw, TextNorm or an ensemble, via ``RewardConfig``) ->
the top-k images per prompt and their weights -> Ray Train fine-tuning (:class:`RwrMethod`
on the shared core: policy, checkpoints, evaluation, monitor) -> reports (eval.csv, selected
checkpoint, curves, grid, human-evaluation export).

Each step (one optimizer step, per worker): a batch of kept images' VAE latents ``x0``,
noise ``eps`` and timesteps ``t`` drawn from generators seeded by (seed, step, rank), noisy
latents ``x_t = add_noise(x0, eps, t)``, and

    loss = (1/B) sum_i w_i ||eps_i - eps_theta(x_t,i, t_i, c_i)||^2
         + beta * (1/B) sum_i ||eps_theta(x_t,i, t_i, c_i) - eps_theta0(x_t,i, t_i, c_i)||^2
         [+ gamma * (1/B') sum_j ||eps_j - eps_theta(x_t,j, t_j, c_j)||^2   on real images (pretrain)]

with ``eps_theta0`` the same UNet with adapters disabled (computed only when beta > 0), written for an
epsilon model (SD 1.5, the paper's). For a v-prediction model (SD 2.1 at 768 px, the world pipeline) the
denoising terms compare the v output with the velocity target by default (``denoise_space: native``, as
diffusers' training scripts; ``epsilon`` converts first, which weighs the noisiest steps ~0), while the
KL term is always in epsilon space (:func:`tn_ray.training.losses.to_epsilon`), so beta's term means the
same for an epsilon model and a v-prediction one (docs/rwr.md, "Which space").
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, model_validator

from tn_ray.config import OutputLocation, StrictModel
from tn_ray.diffusion.generation import GenerationConfig
from tn_ray.diffusion.pipelines import WORLD
from tn_ray.diffusion.seeds import seed_of
from tn_ray.diffusion.world import package
from tn_ray.diffusion.world.data import training_pairs
from tn_ray.errors import InputError
from tn_ray.rewards.base import load_image
from tn_ray.scoring.batch_scoring import generated_items
from tn_ray.storage import Store, join_uri, read_any, read_json
from tn_ray.training.config import FineTuneConfig, OptimizerBlock, require_prompts, resolve_prompts
from tn_ray.training.evaluation import reward_groups, reward_texts
from tn_ray.training.loop import Method, WorkerContext
from tn_ray.training.losses import rwr_terms
from tn_ray.training.outputs import write_outputs
from tn_ray.training.preflight import check_run, record_provenance
from tn_ray.training.sample_weights import Weighting, reward_weights, top_k_per_group

log = logging.getLogger(__name__)
SET_NAME = "rwr"


class PretrainBlock(StrictModel):
    folder: str | None = Field(None, description="folder of real images with captions.json {file name: caption} (Lee "
                                                 "et al.'s pre-training data); exactly one of folder / world")
    world: int | None = Field(None, ge=1, description="N (render, caption) pairs drawn from the world generator's own "
                                                      "training distribution (images; tn_ray.diffusion.world.data."
                                                      "training_pairs: held-out prompts excluded, size = "
                                                      "generation.height, seeded by the run's seed); needs "
                                                      "policy.pipeline 'world'; exactly one of folder / world")
    weight: float = Field(1.0, ge=0, description="gamma: weight of the plain denoising loss on these images, added to "
                                                 "eq. 4's loss")
    batch_size: int = Field(4, ge=1, description="real images per step and worker (images), on top of the kept "
                                                 "images' batch_size / num_workers")

    @model_validator(mode="after")
    def _one_source(self) -> PretrainBlock:
        if (self.folder is None) == (self.world is None):
            raise ValueError(f"pretrain: give exactly one of folder / world (got folder={self.folder!r}, "
                             f"world={self.world!r})")
        return self


class RwrConfig(FineTuneConfig):
    out: OutputLocation = Field("results/rwr", description="run folder or cloud URI: config, generation, cache, data, "
                                                           "checkpoints, eval, reports")
    prompts: list[str] | None = Field(None, description="training prompts; None = every prompt of reward.contrast's "
                                                        "sets")
    max_prompts: int | None = Field(None, ge=1, description="first N training prompts only (count); None = all")
    generation: GenerationConfig = Field(default_factory=lambda: GenerationConfig(samples_per_prompt=100),
                                         description="the base model's images to learn from (paper: 100 per prompt, 50 "
                                                     "steps, guidance 7.5); pipeline defaults to policy.pipeline")
    cache_dir: str | None = Field(None, description="reward cache folder or URI (scores keyed by model, content-"
                                                    "addressed image and text, so runs may share one); None = "
                                                    "<out>/cache")
    top_k: int = Field(10, ge=1, description="images kept per prompt, the best by the training reward (images; paper: "
                                             "10 of 100)")
    weighting: Weighting = Field("value", description="w_i of eq. 4: value (the reward), minmax (per prompt), softmax "
                                                      "(over kept images, mean 1)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of weighting: softmax (reward units)")
    latents: Literal["encode", "regenerate"] = Field("encode", description="training latents of the kept images: "
                                                                           "encode = VAE-encode the stored images (Lee "
                                                                           "et al.; the VAE round trip is near "
                                                                           "lossless for SD); regenerate = rerun the "
                                                                           "base model for each kept (prompt, seed) "
                                                                           "and take the sampler's own latents (exact; "
                                                                           "about top_k / samples_per_prompt of the "
                                                                           "generation cost; needed when the VAE is "
                                                                           "not a faithful autoencoder, as the random "
                                                                           "tiny pipeline's)")
    denoise_space: Literal["native", "epsilon"] = Field(
        "native", description="space of the denoising terms (eq. 4's likelihood and the pre-training term): native = "
                              "the UNet's own training target (noise for epsilon models, velocity for v-prediction: "
                              "diffusers' training scripts; the same as epsilon for SD 1.5, the paper's model); "
                              "epsilon = the output converted to a noise prediction, which for a v-model weighs "
                              "timestep t by a_t relative to native, ~0 at the noisy steps that decide a scene's "
                              "layout (measured on the world pipeline: RWR then learns nothing; docs/rwr.md)")
    beta: float = Field(0.5, ge=0, description="KL coefficient: weight of mean_d (eps_theta - eps_theta0)^2, noise "
                                               "predictions in epsilon space for every parameterization (unitless; the "
                                               "paper's grid: 0, .25, .5, .75, 1; 0.5 is tn_ray's choice, the paper "
                                               "does not say which it selected)")
    batch_size: int = Field(32, ge=1, description="images per optimizer step over all workers (Table 4: 32); split "
                                                  "evenly across workers")
    pretrain: PretrainBlock | None = Field(None, description="optional pre-training term on real images (Lee et al.); "
                                                             "None = off")
    optimizer: OptimizerBlock = Field(
        default_factory=OptimizerBlock,
        description="AdamW (Table 4, RWR: lr 1e-5, weight decay 1e-2, betas (0.9, 0.999), eps 1e-8, max grad norm 1.0)",
    )

    @model_validator(mode="after")
    def _rwr(self) -> RwrConfig:
        if "pipeline" not in self.generation.model_fields_set:
            self.generation.pipeline = self.policy.pipeline
        if self.generation.pipeline != self.policy.pipeline:
            raise ValueError(
                f"generation.pipeline '{self.generation.pipeline}' differs from policy.pipeline "
                f"'{self.policy.pipeline}': RWR learns from the base model's own images"
            )
        if self.top_k > self.generation.samples_per_prompt:
            raise ValueError(
                f"top_k ({self.top_k}) exceeds generation.samples_per_prompt ({self.generation.samples_per_prompt})"
            )
        require_prompts(bool(self.prompts), self.reward)
        if self.pretrain is not None and self.pretrain.world is not None:
            if self.policy.pipeline != WORLD:
                raise ValueError(f"pretrain.world needs policy.pipeline '{WORLD}' (got policy.pipeline "
                                 f"'{self.policy.pipeline}'): the renders are the world generator's training data")
            if self.generation.width != self.generation.height:
                raise ValueError(f"pretrain.world: generation.width ({self.generation.width}) differs from "
                                 f"generation.height ({self.generation.height}); the world renders are square")
        if self.batch_size % self.scaling.num_workers:
            raise ValueError(
                f"batch_size ({self.batch_size}) must split evenly over scaling.num_workers "
                f"({self.scaling.num_workers})"
            )
        return self


# --------------------------------------------------------------------------------------
# driver: data
# --------------------------------------------------------------------------------------


def score_items(manifest: pd.DataFrame, texts: dict[str, list[str]]) -> pd.DataFrame:
    """Rows for ``score_matrices``: content-addressed image keys, ``[x0, x1..xm]`` per image."""
    return generated_items(manifest, SET_NAME, [texts[p] for p in manifest["prompt"]])


def prepare_data(cfg: RwrConfig, prompts: list[str], texts: list[list[str]] | None = None) -> pd.DataFrame:
    """Generate, score once, keep the top-k per prompt, weight: the training table
    (prompt_id, prompt, sample, image, reward, weight), also written to ``<out>/data.parquet``."""
    from tn_ray.diffusion.generation import generate
    from tn_ray.scoring.batch_scoring import score_matrices

    store = Store(cfg.out)
    texts = dict(zip(prompts, texts if texts is not None else reward_texts(cfg.reward, prompts)))
    gen = cfg.generation.model_copy(update={"out": cfg.generation.out or join_uri(cfg.out, "generation")})
    manifest = generate(prompts, gen, cfg.ray)
    items = score_items(manifest, texts)
    matrices = score_matrices(items, cfg.reward.models, cfg.cache_dir or join_uri(cfg.out, "cache"), cfg.scoring,
                              service=cfg.reward.service)
    keys = items[["set", "prompt", "image_id"]]
    reward = cfg.reward.column(
        {m: matrices[m].align(keys).values for m in cfg.reward.models}, reward_groups(cfg.reward, list(items["prompt"]))
    )
    keep = top_k_per_group(reward, items["prompt_id"].to_numpy(), cfg.top_k)
    data = items.iloc[keep][["prompt_id", "prompt", "sample", "image_id", "image"]].reset_index(drop=True)
    data["seed"] = manifest["seed"].to_numpy()[keep]
    data["reward"] = reward[keep]
    data["weight"] = reward_weights(
        data["reward"].to_numpy(), data["prompt_id"].to_numpy(), cfg.weighting, cfg.temperature
    )
    all_rewards = pd.DataFrame({"prompt_id": items["prompt_id"], "sample": items["sample"], "reward": reward})
    import pyarrow as pa

    store.write_table("data.parquet", pa.Table.from_pandas(data, preserve_index=False))
    store.write_table("rewards.parquet", pa.Table.from_pandas(all_rewards, preserve_index=False))
    log.info(
        "RWR data: %d prompts, %d images kept of %d (top %d), mean reward kept %.4g vs all %.4g",
        len(prompts),
        len(data),
        len(items),
        cfg.top_k,
        data["reward"].mean(),
        np.mean(reward),
    )
    return data


def load_pretrain(block: PretrainBlock, seed: int = 0, size: int | None = None) -> pd.DataFrame:
    """The pre-training term's images: a frame (image, prompt), images as paths (``folder``) or PNG bytes
    (``world``: :func:`world_pretrain`, seeded by ``seed``, ``size`` pixels square; None = the generator's own
    training size)."""
    if block.world is not None:
        return world_pretrain(block.world, seed, size)
    folder = Path(block.folder)
    captions = folder / "captions.json"
    if not captions.is_file():
        raise InputError(f"pretrain.folder: {captions} not found (a JSON object {{image file name: caption}})")

    mapping = read_json(captions, "pretrain captions file")
    if not isinstance(mapping, dict) or not mapping:
        raise InputError(f"{captions}: expected a non-empty object {{image file name: caption}}")
    missing = [f for f in mapping if not (folder / f).is_file()]
    if missing:
        raise InputError(f"{captions}: images not found in {folder}: {missing[:3]}")
    return pd.DataFrame({"image": [str(folder / f) for f in mapping], "prompt": [str(c) for c in mapping.values()]})


def world_pretrain(n: int, seed: int, size: int | None = None) -> pd.DataFrame:
    """``n`` (render, caption) pairs of the world generator's training distribution
    (:func:`tn_ray.diffusion.world.data.training_pairs` with the shipped generator's ``held_out`` share, so no
    held-out prompt appears), ``size`` pixels square (None = the generator's training size), as PNG bytes;
    the draw is seeded by ``seed_of(seed, "pretrain-world")``."""
    import io

    from PIL import Image

    settings = package.record()["settings"]
    rng = np.random.default_rng(seed_of(seed, "pretrain-world"))
    images, texts = training_pairs(n, float(settings["held_out"]), int(size or settings["size"]), rng)
    png = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        png.append(buf.getvalue())
    log.info("pre-training term: %d world renders (%d px)", n, images.shape[1])
    return pd.DataFrame({"image": png, "prompt": texts})


# --------------------------------------------------------------------------------------
# worker: the method
# --------------------------------------------------------------------------------------


class _Examples:
    """Training latents (the UNet's space: VAE latents times its scaling factor) and their prompts' text embeddings."""

    def __init__(self, policy, latents: torch.Tensor, prompts: list[str]):
        self.latents = latents.float().cpu()
        unique = list(dict.fromkeys(prompts))
        index = {p: i for i, p in enumerate(unique)}
        self.prompt_index = torch.tensor([index[p] for p in prompts])
        self.embeds = policy.encode_prompts(unique)

    def __len__(self) -> int:
        return len(self.latents)

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(rows)
        return self.latents[idx], self.embeds[self.prompt_index[idx]]


def _pil(images: list) -> list:
    return [load_image(read_any(p) if isinstance(p, str) else p) for p in images]


def encode_latents(policy, images: list, seed: int, batch: int = 16) -> torch.Tensor:
    """VAE latents of images (a posterior sample, seeded), as diffusers' training scripts."""
    vae, processor = policy.pipe.vae, policy.pipe.image_processor
    gen = torch.Generator("cpu").manual_seed(seed)
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            pixels = processor.preprocess(_pil(images[i : i + batch])).to(policy.device, vae.dtype)
            dist = vae.encode(pixels).latent_dist
            noise = torch.randn(dist.mean.shape, generator=gen).to(dist.mean)
            out.append(((dist.mean + dist.std * noise) * vae.config.scaling_factor).float().cpu())
    return torch.cat(out)


def regenerate_latents(policy, frame: pd.DataFrame, gen: GenerationConfig, check_images: int = 4) -> torch.Tensor:
    """The latents the base model's sampler produced for each kept image: the generation rerun for
    its (prompt, seed) with ``output_type='latent'``. The first ``check_images`` are decoded and
    compared with the stored images, so changed generation parameters fail loudly."""
    import diffusers

    pipe = policy.pipe
    own_scheduler = pipe.scheduler
    if gen.scheduler is not None:
        pipe.scheduler = getattr(diffusers, gen.scheduler).from_config(own_scheduler.config)
    out = []
    try:
        with torch.no_grad(), policy.reference():
            rows = list(zip(frame["prompt"], frame["seed"]))
            for i in range(0, len(rows), gen.pipeline_batch_size):
                chunk = rows[i : i + gen.pipeline_batch_size]
                kwargs = (
                    {"negative_prompt": [gen.negative_prompt] * len(chunk)} if gen.negative_prompt is not None else {}
                )
                latents = pipe(
                    prompt=[p for p, _ in chunk],
                    generator=[torch.Generator("cpu").manual_seed(int(s)) for _, s in chunk],
                    num_inference_steps=gen.num_inference_steps,
                    guidance_scale=gen.guidance_scale,
                    height=gen.height,
                    width=gen.width,
                    output_type="latent",
                    **kwargs,
                ).images
                out.append(latents.float().cpu())
            latents = torch.cat(out)
            n = min(check_images, len(latents))
            if n:
                vae = pipe.vae
                decoded = vae.decode(latents[:n].to(policy.device, vae.dtype) / vae.config.scaling_factor).sample
                decoded = pipe.image_processor.postprocess(decoded, output_type="pt").float().cpu()
                stored = torch.stack(
                    [
                        torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)
                        for im in _pil(list(frame["image"][:n]))
                    ]
                )
                err = float((decoded - stored).abs().mean())
                if err > 0.02:
                    raise InputError(
                        f"latents: regenerate: the rerun base model does not reproduce the stored images "
                        f"(mean pixel error {err:.3f}); were the generation parameters changed? use "
                        "latents: encode"
                    )
    finally:
        pipe.scheduler = own_scheduler
    return latents


def global_rows(n: int, batch: int, step: int, seed: int) -> np.ndarray:
    """Rows of step ``step``'s global batch: consecutive slices of per-epoch permutations seeded by
    (seed, epoch), so the data position is a function of the step (exact resume)."""
    start = (step - 1) * batch
    out = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(perm[offset : offset + batch - len(out)].tolist())
    return np.asarray(out, dtype=np.int64)


class RwrMethod(Method):
    name = "rwr"

    def __init__(self, cfg: RwrConfig, policy, optim, ctx: WorkerContext, data: dict):
        from diffusers import DDPMScheduler

        super().__init__(cfg, policy, optim, ctx, data)
        frame: pd.DataFrame = data["examples"]
        self.prompts = list(dict.fromkeys(frame["prompt"]))
        if cfg.latents == "regenerate":
            latents = regenerate_latents(policy, frame, cfg.generation)
        else:
            latents = encode_latents(policy, list(frame["image"]), seed_of(cfg.seed, "vae"))
        self.examples = _Examples(policy, latents, list(frame["prompt"]))
        self.weights = torch.tensor(frame["weight"].to_numpy(), dtype=torch.float32)
        self.pretrain = None
        if data.get("pretrain") is not None:
            pre = data["pretrain"]
            self.pretrain = _Examples(
                policy,
                encode_latents(policy, list(pre["image"]), seed_of(cfg.seed, "vae-pretrain")),
                list(pre["prompt"]),
            )
        self.scheduler = DDPMScheduler.from_config(policy.pipe.scheduler.config)
        self.per_worker = cfg.batch_size // ctx.world_size

    def train_prompts(self) -> list[str]:
        return self.prompts

    def _noisy(self, x0: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """``rwr_terms``' tensors {noisy, timesteps, noise, x0} on the policy's device: noise and timesteps drawn
        from ``gen``, ``noisy = add_noise(x0, noise, t)``."""
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        dev = self.policy.device
        x0, noise, t = x0.to(dev), noise.to(dev), t.to(dev)
        return {"noisy": self.scheduler.add_noise(x0, noise, t), "timesteps": t, "noise": noise, "x0": x0}

    def terms(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Step ``step``'s loss (with its graph) and metrics: the denoising terms in ``denoise_space``, the KL in
        epsilon space."""

        cfg: RwrConfig = self.cfg
        rows = global_rows(len(self.examples), cfg.batch_size, step, cfg.seed)
        rows = rows[self.ctx.rank * self.per_worker : (self.ctx.rank + 1) * self.per_worker]
        gen = torch.Generator("cpu").manual_seed(seed_of(cfg.seed, step, self.ctx.rank))
        x0, embeds = self.examples.batch(rows)
        z = self._noisy(x0, gen)
        emb = embeds.to(self.policy.device)
        pred = self.policy.noise_pred(z["noisy"], z["timesteps"], emb)
        ref = self.policy.reference_pred(z["noisy"], z["timesteps"], emb) if cfg.beta > 0 else None
        terms = rwr_terms(self.scheduler, pred, weights=self.weights[rows].to(self.policy.device), beta=cfg.beta,
                          ref_pred=ref, space=cfg.denoise_space, **z)
        loss = terms["loss"]
        metrics = {
            "denoise": terms["denoise"].item(),
            "kl": terms["kl"].item(),
            "weight_mean": float(self.weights[rows].mean()),
        }
        if self.pretrain is not None and cfg.pretrain is not None:
            pre_rows = global_rows(
                len(self.pretrain), cfg.pretrain.batch_size * self.ctx.world_size, step, seed_of(cfg.seed, "pretrain")
            )
            pre_rows = pre_rows[self.ctx.rank * cfg.pretrain.batch_size : (self.ctx.rank + 1) * cfg.pretrain.batch_size]
            px0, pemb = self.pretrain.batch(pre_rows)
            pz = self._noisy(px0, gen)
            pre = rwr_terms(self.scheduler, self.policy.noise_pred(pz["noisy"], pz["timesteps"],
                                                                   pemb.to(self.policy.device)),
                            weights=torch.ones(len(pre_rows), device=self.policy.device),
                            space=cfg.denoise_space, **pz)["denoise"]
            loss = loss + cfg.pretrain.weight * pre
            metrics["pretrain"] = pre.item()
        return loss, metrics

    def step(self, step: int) -> dict[str, float]:
        loss, metrics = self.terms(step)
        self.optim.backward(loss)
        metrics.update(self.optim.step())
        metrics["loss"] = loss.item()
        return metrics

    def state_dict(self) -> dict:
        # the data position is a function of the step (global_rows); recorded to check a resume
        return {"examples": len(self.examples), "batch_size": self.cfg.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if state and (state.get("examples"), state.get("batch_size")) != (len(self.examples), self.cfg.batch_size):
            raise InputError(
                f"checkpoint was trained on {state.get('examples')} images with batch "
                f"{state.get('batch_size')}, "
                f"this run has {len(self.examples)} with batch {self.cfg.batch_size}: the data position "
                "would not continue; use a new `out`"
            )


# --------------------------------------------------------------------------------------
# driver: the run
# --------------------------------------------------------------------------------------


def run(cfg: RwrConfig, allow_provenance_change: bool = False) -> dict[str, Any]:
    """The whole RWR run; returns the output paths (see :func:`tn_ray.training.outputs.write_outputs`).
    A run folder whose provenance.json differs is refused unless ``allow_provenance_change``."""
    import yaml

    from tn_ray.cluster import init_ray
    from tn_ray.training.loop import fit

    prompts = resolve_prompts(cfg)
    texts = check_run(cfg, prompts)  # every user error before Ray starts or a model loads
    record_provenance(cfg, allow_provenance_change)
    pretrain = load_pretrain(cfg.pretrain, cfg.seed, cfg.generation.height) if cfg.pretrain is not None else None
    store = Store(cfg.out)
    store.write_text("config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    init_ray(cfg.ray)
    data = prepare_data(cfg, prompts, texts)
    result = fit(cfg, RwrMethod, {"examples": data, "pretrain": pretrain})
    paths = (
        write_outputs(cfg, prompts)
        if cfg.eval.enabled
        else {"out": store.uri(""), "checkpoints": store.uri("checkpoints")}
    )
    paths["ray_result"] = result["ray_path"]
    return paths
