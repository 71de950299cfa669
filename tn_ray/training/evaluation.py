"""Periodic evaluation of a fine-tuning run: fixed prompts and seeds, training reward and judges.

The base model's images (the policy with adapters disabled) are generated once, with the
same per-image seeds as every checkpoint's, and cached in the run's storage. Images are
scored by long-lived reward actors (:class:`tn_ray.scoring.workers.RewardPool`, one pool
per reward model, shared by the training reward and the judges) against ``[x0, x1..xm]``
(contrastive prompts from the reward's source, :func:`tn_ray.prompts.contrast.texts_for`),
and each reward column comes from :meth:`tn_ray.textnorm.columns.RewardConfig.column`: the
one implementation of TextNorm and ensembles.

With ``eval.path_kl`` (default on) every evaluation also measures how far the policy has moved
from the base model: per (prompt, seed) one stochastic chain of the policy (the evaluation's steps
and guidance, the image's seed; a UNet policy: DDIM at eta = ``eval.kl_eta``; a flow-matching
policy: Flow-GRPO's SDE at noise level ``eval.kl_noise_level``), each step's Gaussian recomputed by
the base model (the same UNet or transformer, adapters disabled) on the same state, and the sum
over steps of the two steps' KL (:func:`tn_ray.training.losses.path_kl`, nats): the KL between
the two chains' path laws, estimated on one policy chain. The policy says how its chains are
sampled (:meth:`tn_ray.training.policy.Policy.path_kl_means`); everything else here is the same
for RWR, DDPO and GRPO. Evaluation images are the pipeline's own sampling (``pipe(...)``: DDIM or
the UNet pipeline's scheduler; the flow ODE for SD 3, as Flow-GRPO evaluates); an SD 3 pipeline without T5
(``tiny-sd3``, ``world-flow``) gets its prompt embeddings with the 256 zero tokens folded into one
(:mod:`tn_ray.diffusion.null_tokens`: the same images up to float rounding, 3-4x faster). Its mean is
``eval_path_kl``; the base model's is 0 by definition. The per-image values go to a sibling folder, so
:func:`read_scores` and checkpoint selection see the same tables as without it.

Storage under ``out``::

    eval/base/<prompt_id>-<seed>.png, eval/base.parquet     the base model's images and scores
    eval/step-000100/<prompt_id>-<seed>.png                 a checkpoint's images
    eval/scores/step-000100.parquet                          step, prompt_id, seed, prompt, reward, value
    eval/path_kl/step-000100.parquet                         prompt_id, seed, prompt, step, path_kl (nats)
    eval/prompts.json                                        the evaluation prompts (prompt_id order)
    monitor_flags.json                                       overoptimization flags, if any
"""
from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from tn_ray.data import tia2
from tn_ray.diffusion.flow_sampling import pipeline_prompts
from tn_ray.errors import InputError
from tn_ray.prompts.contrast import sets_for, texts_for
from tn_ray.scoring.matrix import pad_rows
from tn_ray.scoring.service_pool import reward_pool
from tn_ray.storage import Store, join_uri
from tn_ray.textnorm.columns import RewardConfig
from tn_ray.training.checkpoint import step_name
from tn_ray.training.checkpoint_selection import win_counts
from tn_ray.training.config import FineTuneConfig
from tn_ray.training.losses import path_kl

log = logging.getLogger(__name__)


def eval_prompts(cfg: FineTuneConfig, train_prompts: Sequence[str]) -> list[str]:
    prompts = list(cfg.eval.prompts) if cfg.eval.prompts else list(train_prompts)[: cfg.eval.max_prompts]
    if not prompts:
        raise InputError("eval.prompts: no evaluation prompts (set eval.prompts, or give training prompts)")
    return prompts


def reward_texts(reward: RewardConfig, prompts: Sequence[str]) -> list[list[str]]:
    """``[x0, x1..xm]`` per prompt when the used column needs contrastive prompts, else ``[x0]``."""
    if not reward.needs_contrast:
        return [[p] for p in prompts]

    return texts_for(prompts, sets_for(reward.contrast, prompts), f"reward.contrast '{reward.contrast}'")


def reward_groups(reward: RewardConfig, prompts: Sequence[str]) -> list[str] | None:
    """Each prompt's TIA2 set when the used column's ensemble kind depends on it (the paper's
    TextNorm: mean on composition, eq. 3 elsewhere), else None; a prompt in no released set is an
    error naming it (:func:`tn_ray.data.tia2.sets_of`)."""
    if not reward.per_group:
        return None

    return tia2.sets_of(prompts, tia2.resolve_dir(None))


def generate_images(
    policy, prompts: Sequence[str], seeds: Sequence[int], block, reference: bool = False
) -> list[bytes]:
    """PNG bytes of every (prompt, seed), prompt-major; one CPU generator per image, fixed batches."""
    import contextlib

    import torch

    out: list[bytes] = []
    ctx = policy.reference() if reference else contextlib.nullcontext()
    pairs = [(p, s) for p in prompts for s in seeds]
    with ctx, torch.no_grad():
        for i in range(0, len(pairs), block.batch_size):
            chunk = pairs[i : i + block.batch_size]
            with pipeline_prompts(policy.pipe, [p for p, _ in chunk]) as inputs:
                images = policy.pipe(
                    **inputs,
                    generator=[torch.Generator("cpu").manual_seed(s) for _, s in chunk],
                    num_inference_steps=block.num_inference_steps,
                    guidance_scale=block.guidance_scale,
                    height=block.height,
                    width=block.width,
                    output_type="pil",
                ).images
            for im in images:
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                out.append(buf.getvalue())
    return out


def base_images_tag(cfg: FineTuneConfig, prompts: Sequence[str]) -> str:
    """What fixes a run's base-model evaluation images, as a short digest: the policy block without its LoRA
    settings (the base model is the policy with adapters disabled), the evaluation prompts and seeds and the
    evaluation's sampling settings (steps, guidance, size, batch size)."""
    import hashlib

    e = cfg.eval
    what = {
        "policy": cfg.policy.model_dump(mode="json", exclude={"lora"}),
        "prompts": list(prompts),
        "seeds": list(e.seeds),
        "sampling": [e.num_inference_steps, e.guidance_scale, e.height, e.width, e.batch_size],
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]


def path_kls(policy, prompts: Sequence[str], seeds: Sequence[int], block) -> list[float]:
    """Path KL (nats) from the policy to the base model of every (prompt, seed), prompt-major as
    :func:`generate_images`: in batches of ``block.batch_size``, one stochastic chain of the policy per image
    (one CPU generator per row seeded by its seed) and the base model's step means on its states, from
    :meth:`Policy.path_kl_means` (a UNet policy: DDIM chains at ``block.kl_eta``; a flow-matching policy: the
    flow SDE at ``block.kl_noise_level``), the step KLs summed (:func:`tn_ray.training.losses.path_kl`).
    Costs one sampling pass plus one base-model forward per step per image."""
    import torch

    pairs = [(i, p, s) for i, p in enumerate(prompts) for s in seeds]
    out: list[float] = []
    for k in range(0, len(pairs), block.batch_size):
        chunk = pairs[k : k + block.batch_size]
        generators = [torch.Generator("cpu").manual_seed(s) for _, _, s in chunk]
        means, ref, stds = policy.path_kl_means([p for _, p, _ in chunk], [i for i, _, _ in chunk], generators, block)
        out.extend(path_kl(means, ref, stds).tolist())
    return out


class Evaluator:
    """Generates and scores evaluation images; rank 0 of a run owns one."""

    def __init__(self, cfg: FineTuneConfig, train_prompts: Sequence[str]):
        self.cfg = cfg
        self.prompts = eval_prompts(cfg, train_prompts)
        self.seeds = list(cfg.eval.seeds)
        self.store = Store(cfg.out)
        self.rewards: dict[str, RewardConfig] = {cfg.reward.use: cfg.reward, **{j.use: j for j in cfg.eval.judges}}
        self.texts = {name: reward_texts(rc, self.prompts) for name, rc in self.rewards.items()}
        self._pools: dict[tuple[str, str | None], object] = {}  # (model, service URL or None) -> its pool
        if self.store.exists("eval/prompts.json"):
            old = json.loads(self.store.read_text("eval/prompts.json"))
            if old != self.prompts:
                raise InputError(
                    f"{self.store.uri('eval/prompts.json')}: this run was evaluated on other prompts; "
                    "keep eval.prompts or use a new `out`"
                )
        else:
            self.store.write_text("eval/prompts.json", json.dumps(self.prompts, indent=1))

    # --- scoring ------------------------------------------------------------------------
    def _pool(self, model: str, service: str | None = None):
        """The pool of ``model``: the reward service at ``service`` (a reward's ``service``), else Ray actors."""

        if (model, service) not in self._pools:
            self._pools[(model, service)] = reward_pool(model, self.cfg.scoring, service)
        return self._pools[(model, service)]

    def score(self, images: Sequence[bytes]) -> pd.DataFrame:
        """Rows prompt_id, seed, prompt, reward, value for images in (prompt, seed) order."""
        n_seeds = len(self.seeds)
        frame = []
        scored: dict[tuple[str, str], np.ndarray] = {}
        for name, rc in self.rewards.items():
            texts = [self.texts[name][i // n_seeds] for i in range(len(images))]
            values = {}
            for model in rc.models:
                key = (model, json.dumps(self.texts[name]))
                if key not in scored:
                    scored[key] = pad_rows(
                        self._pool(model, rc.service).score(list(images), texts, chunk=self.cfg.scoring.batch_size)
                    )
                values[model] = scored[key]
            column = rc.column(values, reward_groups(rc, [self.prompts[i // n_seeds] for i in range(len(images))]))
            for i, v in enumerate(column):
                frame.append((i // n_seeds, self.seeds[i % n_seeds], self.prompts[i // n_seeds], name, float(v)))
        return pd.DataFrame(frame, columns=["prompt_id", "seed", "prompt", "reward", "value"])

    # --- base model, cached -------------------------------------------------------------
    def _save_images(self, folder: str, images: Sequence[bytes]) -> None:
        for i, data in enumerate(images):
            pid, seed = i // len(self.seeds), self.seeds[i % len(self.seeds)]
            self.store.write_bytes(f"{folder}/{pid:05d}-{seed}.png", data)

    def image_rel(self, step: int | None, prompt_id: int, seed: int) -> str:
        folder = "eval/base" if step is None else f"eval/{step_name(step)}"
        return f"{folder}/{prompt_id:05d}-{seed}.png"

    def _base_images(self, policy) -> list[bytes]:
        """The base model's images: generated, or read from / written to ``eval.base_images`` (shared by runs)."""
        shared = self.cfg.eval.base_images
        if shared is None:
            return generate_images(policy, self.prompts, self.seeds, self.cfg.eval, reference=True)
        store = Store(join_uri(shared, base_images_tag(self.cfg, self.prompts)))
        names = [f"{pid:05d}-{seed}.png" for pid in range(len(self.prompts)) for seed in self.seeds]
        if all(store.exists(name) for name in names):
            log.info("base-model evaluation images read from %s", store.uri(""))
            return [store.read_bytes(name) for name in names]
        images = generate_images(policy, self.prompts, self.seeds, self.cfg.eval, reference=True)
        for name, data in zip(names, images):
            store.write_bytes(name, data)
        return images

    def base_scores(self) -> pd.DataFrame:
        return self.store.read_table("eval/base.parquet").to_pandas()

    def base(self, policy) -> dict[str, float]:
        """Mean of each reward column over the base model's images (generated and scored once)."""
        if not self.store.exists("eval/base.parquet"):
            images = self._base_images(policy)
            self._save_images("eval/base", images)
            self.store.write_table("eval/base.parquet", pa.Table.from_pandas(self.score(images), preserve_index=False))
        base = self.base_scores()
        return {k: float(v) for k, v in base.groupby("reward")["value"].mean().items()}

    # --- checkpoints --------------------------------------------------------------------
    def evaluate(self, step: int, policy) -> dict[str, float]:
        """Generate, score and count wins over the base model at ``step``. Metrics: each reward
        column's mean (key = its name) and ``<name>/wins``; ``eval_reward`` and ``eval_reward_wins``
        (the training reward's mean and win count); ``eval_wins`` (the win count of the selection
        column: the training reward, the paper's rule, unless ``eval.select_by`` names a judge);
        with judges, ``eval_judge`` and ``eval_judge_wins`` (the first judge's mean and win count);
        with ``eval.path_kl``, ``eval_path_kl`` (the mean path KL to the base model over the evaluation
        images, nats; per image in ``eval/path_kl/<step>.parquet``)."""

        images = generate_images(policy, self.prompts, self.seeds, self.cfg.eval)
        self._save_images(f"eval/{step_name(step)}", images)
        scores = self.score(images).assign(step=int(step))
        self.store.write_table(
            f"eval/scores/{step_name(step)}.parquet", pa.Table.from_pandas(scores, preserve_index=False)
        )
        counts = win_counts(scores, self.base_scores())
        out: dict[str, float] = {}
        for row in counts.itertuples():
            out[row.reward] = float(row.mean)
            out[f"{row.reward}/wins"] = float(row.wins)
        train = self.cfg.reward.use
        out.update(
            eval_reward=out[train],
            eval_reward_wins=out[f"{train}/wins"],
            eval_wins=out[f"{self.cfg.selection_column}/wins"],
        )
        if self.cfg.eval.judges:
            judge = self.cfg.judge_names()[0]
            out.update(eval_judge=out[judge], eval_judge_wins=out[f"{judge}/wins"])
        if self.cfg.eval.path_kl:
            kls = path_kls(policy, self.prompts, self.seeds, self.cfg.eval)
            n = len(self.seeds)
            frame = pd.DataFrame(
                {
                    "prompt_id": [i // n for i in range(len(kls))],
                    "seed": [self.seeds[i % n] for i in range(len(kls))],
                    "prompt": [self.prompts[i // n] for i in range(len(kls))],
                    "step": int(step),
                    "path_kl": kls,
                }
            )
            self.store.write_table(
                f"eval/path_kl/{step_name(step)}.parquet", pa.Table.from_pandas(frame, preserve_index=False)
            )
            out["eval_path_kl"] = float(np.mean(kls))
        return out

    def evaluated_steps(self) -> list[int]:
        return [int(rel.rsplit("-", 1)[1].split(".")[0]) for rel in self.store.list_files("eval/scores", ".parquet")]

    def record_flag(self, flag, train_name: str) -> None:
        flags = (
            json.loads(self.store.read_text("monitor_flags.json")) if self.store.exists("monitor_flags.json") else []
        )
        flags = [f for f in flags if f["step"] != flag.step]
        flags.append(
            {
                "step": flag.step,
                "window_start": flag.window_start,
                "train_reward": train_name,
                "train_change": flag.train_change,
                "judge_changes": flag.judge_changes,
                "message": flag.message(train_name),
            }
        )
        self.store.write_text("monitor_flags.json", json.dumps(flags, indent=1))

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown()
        self._pools.clear()


def read_scores(out: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(every checkpoint's per-image scores, the base model's) of a run."""
    store = Store(out)
    parts = [store.read_table(rel).to_pandas() for rel in store.list_files("eval/scores", ".parquet")]
    scores = (
        pd.concat(parts, ignore_index=True)
        if parts
        else pd.DataFrame(columns=["step", "prompt_id", "seed", "prompt", "reward", "value"])
    )
    base = store.read_table("eval/base.parquet").to_pandas() if store.exists("eval/base.parquet") else None
    return scores, base


PATH_KL_COLUMNS = ["prompt_id", "seed", "prompt", "step", "path_kl"]


def read_path_kl(out: str) -> pd.DataFrame:
    """Every evaluated checkpoint's per-image path KL to the base model (nats; columns prompt_id, seed,
    prompt, step, path_kl); empty when the run measured none (``eval.path_kl: false``, or older runs)."""
    store = Store(out)
    parts = [store.read_table(rel).to_pandas() for rel in store.list_files("eval/path_kl", ".parquet")]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=PATH_KL_COLUMNS)
