"""Fine-tuning learns what the paper claims, judged by exact truth: RWR and DDPO trained on ``worldjudge``
raise the judge's accuracy of fresh samples of the world pipeline over the base model.

Fresh samples: seeds the training never drew, the same for the base model (adapters disabled) and the
fine-tuned one, so each (prompt, seed) is a pair; the tests ask for a mean paired gain of more than 3
standard errors. The judge is exact (docs/world.md), so this is the world's ground truth, not the
optimized reward judging itself on its own samples.

RWR passes (about 4 minutes on 2 cores; measured: base 0.359 -> 0.568, paired gain +0.208 +- 0.044, 4.7
standard errors, 192 pairs; with 64 base samples per prompt instead of 128: +0.125 +- 0.045). Two things made
it learn (measured 2026-12-06, 200 steps, lr 1e-3, 48 fresh seeds per prompt): the denoising loss in the
model's own (velocity) space rather than epsilon space (+0.23 vs +0.10), and LoRA on every attention, feed-
forward, conv and time projection of the small UNet rather than attention only (+0.23 vs +0.06; the full UNet:
+0.25). Before both, RWR had no effect at any setting.

GRPO on the flow-matching ``world-flow`` passes, opt-in (``TN_RAY_LEARNING=1``; 20 epochs and 384 evaluation
images, about 11 minutes on 2 cores, past the suite's budget): measured 2026-12-08 on 96 fresh seeds per prompt
(7000-7095): base 0.464 -> 0.708, paired gain +0.245 +- 0.043 (5.7 standard errors, 192 pairs). Why 20 epochs
and not the YAML's 40: the same in-process training evaluated on seeds 6000-6095 (192 pairs) gained +0.188 +-
0.045 at epoch 20 and only +0.089 +- 0.046 at epoch 40 ("two red circles" rose, then fell below the base model),
and the first run of this test at 40 epochs gained +0.062 +- 0.061 on 96 pairs; without a KL term, lr 1e-3 drifts
past its best checkpoint. The seeds that chose 20 are not the seeds the test judges on (docs/grpo.md).

DDPO does NOT yet pass, so it is opt-in (``TN_RAY_LEARNING=1``): with the broad LoRA, lr 1e-3 collapses the
policy within 4 epochs (training reward 0.41 -> 0.06, fresh accuracy -0.27), lr 5e-4 and 2e-4 leave fresh
samples where they were after 16 epochs (+0.000 +- 0.030, +0.031 +- 0.018). 2026-12-07: 256 samples per epoch
(Table 4) at lr 3e-4 left them unchanged after 1,024 samples (-0.010 +- 0.018); two independent 64-chain
policy gradients have cosine similarity -0.045, i.e. the gradient is mostly noise at test sizes.
docs/world.md ("Learning on the world").
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

PROMPTS = ["a photo of three green circles", "a photo of a yellow circle to the left of a red triangle"]  # base ~0.3
FRESH = list(range(5000, 5096))  # 96 fresh seeds per prompt: 192 pairs
STEPS, GUIDANCE = 20, 3.0


def accuracy(policy, seeds, reference: bool = False, prompts=PROMPTS) -> np.ndarray:
    """1/0 per (prompt, seed), prompt-major: does the image match its prompt (worldjudge)."""
    from tn_ray.data.world.judge import judge
    from tn_ray.training.config import EvalBlock
    from tn_ray.training.evaluation import generate_images

    block = EvalBlock(num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=32, width=32, batch_size=64)
    images = generate_images(policy, prompts, seeds, block, reference=reference)
    verdicts = judge([Image.open(io.BytesIO(b)) for b in images], [p for p in prompts for _ in seeds])
    return np.array([v.match for v in verdicts], dtype=float)


def paired(before: np.ndarray, after: np.ndarray) -> tuple[float, float]:
    diff = after - before
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))


def test_rwr_on_worldjudge_raises_judge_accuracy_of_fresh_samples(tmp_path):
    """RWR with the exact judge as its reward (Lee et al.'s setting with a perfect labeller): 128 base
    samples per prompt, the matching ones kept with weight 1, LoRA fine-tuning on them (the world's default
    targets, rank 16, velocity-space loss); fresh samples of the fine-tuned model match more often than the
    base model's, paired by (prompt, seed)."""
    from tn_ray.data.world.judge import judge
    from tn_ray.training.config import EvalBlock, PolicyBlock
    from tn_ray.training.evaluation import generate_images
    from tn_ray.training.loop import Trainer, WorkerContext
    from tn_ray.training.policy import Policy
    from tn_ray.training.rwr import RwrConfig, RwrMethod

    torch.set_num_threads(2)
    block = PolicyBlock(pipeline="world", lora={"rank": 16})
    policy = Policy.load(block, device="cpu")
    sampling = EvalBlock(num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=32, width=32, batch_size=64)
    seeds = list(range(128))
    images = generate_images(policy, PROMPTS, seeds, sampling)
    texts = [p for p in PROMPTS for _ in seeds]
    match = np.array([v.match for v in judge([Image.open(io.BytesIO(b)) for b in images], texts)])
    kept = pd.DataFrame({"image": images, "prompt": texts, "prompt_id": [i // len(seeds) for i in range(len(texts))],
                         "seed": seeds * len(PROMPTS)})[match].assign(reward=1.0, weight=1.0).reset_index(drop=True)
    assert kept["prompt_id"].nunique() == len(PROMPTS), f"a prompt has no matching base sample: {match.reshape(2, -1)}"
    cfg = RwrConfig.model_validate(dict(
        out=str(tmp_path / "rwr"), prompts=PROMPTS, seed=0, max_steps=RWR_STEPS, policy=block.model_dump(),
        optimizer={"lr": 1e-3}, reward={"models": ["worldjudge"], "use": "worldjudge"},
        generation={"pipeline": "world", "samples_per_prompt": len(seeds), "num_inference_steps": STEPS,
                    "guidance_scale": GUIDANCE, "height": 32, "width": 32},
        top_k=len(seeds), weighting="value", beta=0.0, batch_size=16, latents="encode",
        eval={"enabled": False}, checkpoint={"every": RWR_STEPS}, logging={"progress_bar": False}))
    Trainer(cfg, RwrMethod, {"examples": kept}, WorkerContext(0, 1, torch.device("cpu"), cfg.out), lambda r: None).run()
    from tn_ray.training.checkpoint import Checkpoints

    trained = Policy.load(block, device="cpu")
    ckpts = Checkpoints(cfg.out)
    trained.load_lora_state(ckpts.load(ckpts.latest())["lora"])
    before, after = accuracy(trained, FRESH, reference=True), accuracy(trained, FRESH)
    gain, se = paired(before, after)
    print(f"RWR on worldjudge: base {before.mean():.3f} -> {after.mean():.3f}, paired gain {gain:+.3f} +- {se:.3f}")
    assert gain > 3 * se, (before.mean(), after.mean(), gain, se)


def train_in_process_and_judge(method_cls, cfg, pools, seeds) -> tuple[np.ndarray, np.ndarray]:
    """Train ``method_cls`` (DDPO or GRPO) on ``cfg`` for ``cfg.max_steps`` epochs in this process, its reward on
    ``pools``; then the judge's 1/0 on fresh images of ``cfg.prompts`` x ``seeds``: (base model's, trained's)."""
    from tn_ray.training.ddpo import DDPOData
    from tn_ray.training.loop import WorkerContext
    from tn_ray.training.optim import Optimization
    from tn_ray.training.policy import Policy

    torch.set_num_threads(2)
    torch.manual_seed(cfg.seed)
    policy = Policy.load(cfg.policy, "cpu", seed=cfg.seed)
    optim = Optimization(policy.trainable_parameters(), cfg.optimizer, cfg.max_steps, torch.device("cpu"),
                         policy.amp_dtype)
    data = DDPOData(list(cfg.prompts), [[p] for p in cfg.prompts], pools)
    method = method_cls(cfg, policy, optim, WorkerContext(0, 1, torch.device("cpu"), cfg.out), data)
    curve = [method.step(epoch)["reward_mean"] for epoch in range(1, cfg.max_steps + 1)]
    before = accuracy(policy, seeds, reference=True, prompts=cfg.prompts)
    after = accuracy(policy, seeds, prompts=cfg.prompts)
    gain, se = paired(before, after)
    print(f"{method_cls.__name__} on worldjudge: training reward per epoch {np.round(curve, 3).tolist()}; fresh "
          f"samples base {before.mean():.3f} -> {after.mean():.3f}, paired gain {gain:+.3f} +- {se:.3f}")
    return before, after


RWR_STEPS = 200


@pytest.fixture(scope="module")
def judge_actors(ray_session):
    from tn_ray.config import ScoringConfig
    from tn_ray.scoring.workers import RewardPool

    pool = RewardPool("worldjudge", ScoringConfig(cpus_per_actor=0.25, num_actors=1))
    yield {"worldjudge": pool}
    pool.shutdown()


@pytest.mark.timeout(3600)  # 16 epochs and 384 evaluation images: past the suite's 900 s per test
@pytest.mark.skipif(os.environ.get("TN_RAY_LEARNING") != "1", reason="opt-in (TN_RAY_LEARNING=1): DDPO does not yet "
                    "raise the world judge's accuracy on a CPU budget (see the module docstring)")
def test_ddpo_on_worldjudge_raises_judge_accuracy_of_fresh_samples(tmp_path, judge_actors):
    """DDPO with the exact judge as its reward (0/1, per-prompt advantages, KL 0): fresh samples of
    the fine-tuned model match more often than the base model's, paired by (prompt, seed)."""
    from tn_ray.training.ddpo import DDPO, DDPOConfig

    cfg = DDPOConfig.model_validate(dict(
        out=str(tmp_path / "ddpo"), prompts=PROMPTS, seed=0, max_steps=DDPO_EPOCHS,
        policy={"pipeline": "world", "lora": {"rank": 16}}, optimizer={"lr": 1e-3},
        reward={"models": ["worldjudge"], "use": "worldjudge"},
        sample={"num_steps": 10, "guidance_scale": GUIDANCE, "batch_size": 16, "num_batches_per_epoch": 2},
        train={"batch_size": 16, "clip_range": 0.2, "kl_coef": 0.0, "stat_buffer_size": 32, "stat_min_count": 8},
        eval={"enabled": False}, checkpoint={"every": DDPO_EPOCHS},
        logging={"progress_bar": False, "tensorboard": False}))
    before, after = train_in_process_and_judge(DDPO, cfg, judge_actors, FRESH)
    gain, se = paired(before, after)
    assert gain > 3 * se, (before.mean(), after.mean(), gain, se)


DDPO_EPOCHS = 16


GRPO_EPOCHS = 20


@pytest.mark.timeout(3600)  # 20 epochs and 384 evaluation images: past the suite's 900 s per test
@pytest.mark.skipif(os.environ.get("TN_RAY_LEARNING") != "1", reason="opt-in (TN_RAY_LEARNING=1): 20 GRPO epochs "
                    "and 384 evaluation images take ~11 minutes on 2 cores (see the module docstring)")
def test_grpo_on_worldjudge_raises_judge_accuracy_of_fresh_samples(tmp_path, judge_actors):
    """GRPO (Flow-GRPO's SDE chains, group advantages, PPO clip) on ``world-flow`` with the exact judge as its
    reward, as ``sweeps/world_grpo.yaml`` ships it (its prompts, group, learning rate, clip range) but for 20
    epochs, where its gain peaked (module docstring): fresh ODE samples on 96 seeds per prompt never trained on
    (192 pairs) match more often than the base model's, paired by (prompt, seed)."""
    from tn_ray.config import load_config
    from tn_ray.training.grpo import GRPO, GRPOConfig

    cfg = load_config(Path(__file__).resolve().parents[1] / "sweeps" / "world_grpo.yaml", GRPOConfig,
                      {"out": str(tmp_path / "grpo"), "eval.enabled": False, "logging.tensorboard": False,
                       "max_steps": GRPO_EPOCHS, "checkpoint.every": GRPO_EPOCHS})
    fresh = list(range(7000, 7096))  # neither trained on, nor the YAML's evaluation seeds, nor those that chose 20
    before, after = train_in_process_and_judge(GRPO, cfg, judge_actors, fresh)
    gain, se = paired(before, after)
    assert gain > 3 * se, (before.mean(), after.mean(), gain, se)
