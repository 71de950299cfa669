"""DDPO: loss and advantages against trl 0.23.1, the regularizer, and the training loop on the tiny pipeline."""
from __future__ import annotations

import contextlib
import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tn_ray.diffusion.pipelines import load_pipeline
from tn_ray.diffusion.sampling import sample_chains, step_log_prob
from tn_ray.training.advantages import PerPromptStatTracker, shared_advantages
from tn_ray.training.ddpo_loss import clipped_surrogate, ddpo_loss, kl_weight

STEPS = 6
GUIDANCE = 5.0


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


@pytest.fixture(scope="module")
def chains(pipe):
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    return sample_chains(pipe, ["a red cube", "a blue ball", "a cat", "a dog"], [0, 1, 2, 3], num_steps=STEPS,
                         guidance=GUIDANCE, eta=1.0, generator=gens)


def trl_self(pipe, clip_range: float, adv_clip_max: float, eta: float = 1.0):
    """A minimal stand-in for DDPOTrainer's ``self``: what calculate_loss reads, trl's own pieces."""
    from trl.models.modeling_sd_base import scheduler_step
    from trl.trainer.ddpo_trainer import DDPOTrainer

    config = SimpleNamespace(train_cfg=True, sample_guidance_scale=GUIDANCE, sample_eta=eta,
                             train_adv_clip_max=adv_clip_max, train_clip_range=clip_range)
    stand_in = SimpleNamespace(
        config=config,
        autocast=contextlib.nullcontext,
        sd_pipeline=SimpleNamespace(unet=pipe.unet, scheduler_step=functools.partial(scheduler_step, pipe.scheduler)),
    )
    stand_in.loss = functools.partial(DDPOTrainer.loss, stand_in)
    return stand_in


@pytest.mark.parametrize("clip_range", [1e-4, 0.2])
def test_clipped_loss_approx_kl_clip_fraction_equal_trl(pipe, chains, clip_range):
    """Same chains, advantages and (perturbed) old log-probs: trl's calculate_loss and ours agree
    (1e-6 absolute) at every timestep; clipping is exercised (clip fraction strictly between 0 and 1)."""
    from trl.trainer.ddpo_trainer import DDPOTrainer

    g = torch.Generator().manual_seed(0)
    advantages = torch.randn(4, generator=g) * 4  # some beyond adv_clip_max
    scale = clip_range * torch.tensor([0.3, 0.3, 5.0, 5.0])[:, None]  # two rows inside the clip range, two beyond
    old = chains.log_probs + torch.randn(chains.log_probs.shape, generator=g).clamp(-1, 1) * scale
    stand_in = trl_self(pipe, clip_range, adv_clip_max=5.0)
    fracs = []
    with torch.no_grad():
        for j in range(STEPS):
            t = chains.timesteps[:, j]
            loss, approx_kl, clipfrac = DDPOTrainer.calculate_loss(
                stand_in,
                chains.states[:, j],
                t,
                chains.next_latents[:, j],
                old[:, j],
                advantages,
                torch.cat([chains.negative_embeds, chains.prompt_embeds]),
            )
            lp, _ = step_log_prob(
                pipe.unet,
                pipe.scheduler,
                chains.states[:, j],
                t,
                chains.next_latents[:, j],
                chains.prompt_embeds,
                chains.negative_embeds,
                GUIDANCE,
                1.0,
            )
            ours = clipped_surrogate(lp, old[:, j], advantages, clip_range, adv_clip_max=5.0)
            torch.testing.assert_close(ours.loss, loss, atol=1e-6, rtol=0)
            torch.testing.assert_close(ours.approx_kl, approx_kl, atol=1e-6, rtol=0)
            torch.testing.assert_close(ours.clip_frac, clipfrac, atol=0, rtol=0)
            fracs.append(float(clipfrac))
    assert 0 < np.mean(fracs) < 1


def test_ratio_one_and_zero_approx_kl_right_after_sampling(pipe, chains):
    """Unchanged weights: the recomputed log-probs equal the recorded ones bit for bit."""
    with torch.no_grad():
        for j in range(STEPS):
            lp, _ = step_log_prob(
                pipe.unet,
                pipe.scheduler,
                chains.states[:, j],
                chains.timesteps[:, j],
                chains.next_latents[:, j],
                chains.prompt_embeds,
                chains.negative_embeds,
                GUIDANCE,
                1.0,
            )
            out = clipped_surrogate(lp, chains.log_probs[:, j], torch.ones(4), 1e-4, 5.0)
            assert torch.equal(out.ratio, torch.ones(4)) and float(out.approx_kl) == 0.0 and float(out.clip_frac) == 0.0


def test_per_prompt_tracker_equals_trl():
    """Several epochs of rewards with repeated prompts: trl's tracker and ours give the same advantages."""
    from trl.trainer.utils import PerPromptStatTracker as TrlTracker

    rng = np.random.default_rng(0)
    ours, theirs = PerPromptStatTracker(buffer_size=5, min_count=3), TrlTracker(buffer_size=5, min_count=3)
    for _ in range(5):
        ids = rng.integers(0, 4, size=10)
        rewards = rng.normal(size=10)
        np.testing.assert_allclose(ours.update(ids, rewards), theirs.update(ids, rewards), rtol=0, atol=1e-12)


def test_advantages_without_distributed_are_clipped_tracker_output():
    tracker, reference = PerPromptStatTracker(4, 2), PerPromptStatTracker(4, 2)
    ids, rewards = np.array([0, 0, 1, 1, 1]), np.array([0.0, 10.0, 1.0, 2.0, 30.0])
    got = shared_advantages(ids, rewards, tracker, adv_clip_max=1.0)
    np.testing.assert_allclose(got, np.clip(reference.update(ids, rewards), -1, 1))


def test_kl_regularizer_and_warmup():
    g = torch.Generator().manual_seed(0)
    pol, base = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    lp = torch.zeros(3)
    out = ddpo_loss(lp, lp, torch.ones(3), 1e-4, 5.0, kl_coef=0.5, policy_eps=pol, base_eps=base)
    expected_kl = ((pol - base) ** 2).mean()
    torch.testing.assert_close(out["kl"], expected_kl)
    torch.testing.assert_close(out["loss"], -1.0 + 0.5 * expected_kl)
    assert [kl_weight(2.0, e, 4) for e in (0, 2, 4, 9)] == [0.0, 1.0, 2.0, 2.0] and kl_weight(2.0, 0, 0) == 2.0
    with pytest.raises(ValueError, match="kl_coef > 0"):
        ddpo_loss(lp, lp, torch.ones(3), 1e-4, 5.0, kl_coef=0.1)


# --------------------------------------------------------------------------------------
# the loop (tiny pipeline, brightness reward on long-lived reward actors)
# --------------------------------------------------------------------------------------

PROMPTS = ["a red cube", "a blue ball"]


def tiny_config(out, **overrides):
    from tn_ray.training.ddpo import DDPOConfig

    base = dict(
        out=str(out),
        prompts=PROMPTS,
        seed=0,
        max_steps=3,
        policy={"pipeline": "tiny", "lora": {"rank": 4}},
        optimizer={"lr": 2e-2},
        reward={"models": ["brightness"], "use": "brightness"},
        sample={"num_steps": 4, "batch_size": 8, "num_batches_per_epoch": 1},
        train={"batch_size": 8, "clip_range": 0.2, "stat_min_count": 4},
        eval={"enabled": False},
        checkpoint={"every": 1},
        logging={"progress_bar": False, "tensorboard": False},
        scoring={"cpus_per_actor": 0.25, "num_actors": 1},
    )
    for key, value in overrides.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return DDPOConfig.model_validate(base)


@pytest.fixture(scope="module")
def actors(ray_session):
    from tn_ray.config import ScoringConfig
    from tn_ray.scoring.workers import RewardPool

    pool = RewardPool("brightness", ScoringConfig(cpus_per_actor=0.25, num_actors=2))
    yield {"brightness": pool}
    pool.shutdown()


def make_method(cfg, actors):
    from tn_ray.training.ddpo import DDPO, DDPOData
    from tn_ray.training.loop import WorkerContext
    from tn_ray.training.optim import Optimization
    from tn_ray.training.policy import Policy

    torch.manual_seed(cfg.seed)
    policy = Policy.load(cfg.policy, "cpu", seed=cfg.seed)
    optim = Optimization(
        policy.trainable_parameters(), cfg.optimizer, cfg.max_steps, torch.device("cpu"), policy.amp_dtype
    )
    data = DDPOData(list(PROMPTS), [[p] for p in PROMPTS], actors)
    return DDPO(cfg, policy, optim, WorkerContext(0, 1, torch.device("cpu"), cfg.out), data)


def eps_gap(method) -> float:
    """mean ||eps_policy - eps_base||^2 of the guided noise predictions on fixed latents, every timestep."""
    from tn_ray.diffusion.sampling import encode_prompts, guided_noise

    pipe = method.policy.pipe
    g = torch.Generator().manual_seed(123)
    x = torch.randn(4, 4, 16, 16, generator=g)
    embeds, negative = encode_prompts(pipe, PROMPTS * 2)
    gaps = []
    with torch.no_grad():
        for t in pipe.scheduler.timesteps:
            tt = t.repeat(4)
            pol = guided_noise(pipe.unet, x, tt, embeds, negative, GUIDANCE)
            base = method.base_eps(x, tt, embeds, negative)
            gaps.append(float(((pol - base) ** 2).mean()))
    return float(np.mean(gaps))


def test_kl_regularizer_is_the_same_for_an_epsilon_model_and_its_v_twin(tmp_path):
    """One DDPO training pass on the same chains and advantages with a tiny epsilon UNet and with its
    exact v-prediction twin: the same regularizer, policy loss and loss (the KL compares noise
    predictions, the DDIM step converts v itself). No reward actors: train_epoch only."""
    from diffusers import DDIMScheduler
    from v_twin import VTwin

    from tn_ray.training.ddpo import DDPO
    from tn_ray.training.optim import Optimization

    torch.set_num_threads(1)
    cfg = tiny_config(tmp_path / "twin", train={"kl_coef": 1.0})
    method = make_method(cfg, {})
    policy = method.policy
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the policy differs from the base model
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    lora = policy.lora_state()
    gens = [torch.Generator().manual_seed(i) for i in range(8)]
    with torch.no_grad():
        chains = sample_chains(
            policy.pipe,
            PROMPTS * 4,
            [0, 1] * 4,
            num_steps=cfg.sample.num_steps,
            guidance=cfg.sample.guidance_scale,
            eta=cfg.sample.eta,
            generator=gens,
        )
    advantages = torch.linspace(-1.0, 1.0, 8)
    eps_metrics = method.train_epoch(1, chains, advantages)

    policy.load_lora_state(lora)
    sched = policy.pipe.scheduler
    policy.unet = policy.train_unet = VTwin(policy.unet, sched.alphas_cumprod)
    policy.pipe.scheduler = DDIMScheduler.from_config(sched.config, prediction_type="v_prediction")
    policy.pipe.scheduler.set_timesteps(cfg.sample.num_steps)
    optim = Optimization(policy.trainable_parameters(), cfg.optimizer, cfg.max_steps, torch.device("cpu"))
    v_metrics = DDPO(cfg, policy, optim, method.ctx, method.data).train_epoch(1, chains, advantages)
    assert eps_metrics["kl"] > 1e-6
    for key in ("kl", "policy_loss", "loss"):
        assert v_metrics[key] == pytest.approx(eps_metrics[key], rel=1e-4, abs=1e-7), (key, eps_metrics, v_metrics)


def test_large_kl_coef_stays_closer_to_base_and_only_lora_changes(tmp_path, actors):
    """Same seeds and epochs: kl_coef = 100 ends with noise predictions closer to the base model's than 0;
    the first minibatch after sampling has ratio 1 (approx-KL exactly 0); only LoRA weights change."""
    gaps, firsts = {}, []
    for coef in (0.0, 100.0):
        method = make_method(
            tiny_config(tmp_path / f"kl{coef}", train={"kl_coef": coef, "num_inner_epochs": 2}), actors
        )
        frozen = {n: p.detach().clone() for n, p in method.policy.unet.named_parameters() if not p.requires_grad}
        lora = {n: p.detach().clone() for n, p in method.policy.unet.named_parameters() if p.requires_grad}
        assert lora and all("lora_" in n for n in lora)
        for step in (1, 2, 3):
            metrics = method.step(step)
            firsts.append(metrics["first_approx_kl"])
        params = dict(method.policy.unet.named_parameters())
        assert all(torch.equal(params[n], v) for n, v in frozen.items())
        assert any(not torch.equal(params[n], v) for n, v in lora.items())
        gaps[coef] = eps_gap(method)
        assert metrics["optimizer_steps"] == 2 and (coef == 0 or metrics["kl"] > 0)
    assert firsts == [0.0] * len(firsts)
    print("eps_gap_to_base by kl_coef", gaps)
    assert gaps[100.0] < 0.5 * gaps[0.0], gaps


def test_resume_equals_uninterrupted(tmp_path, actors, monkeypatch):
    """The core's loop in-process: a run stopped after epoch 1 and rerun ends with the same LoRA weights,
    optimizer state and per-prompt buffers as a run that never stopped (exactly: tolerance 0)."""
    from tn_ray.training import ddpo as ddpo_module
    from tn_ray.training.checkpoint import Checkpoints
    from tn_ray.training.ddpo import DDPO, DDPOData
    from tn_ray.training.loop import Trainer, WorkerContext

    data = DDPOData(list(PROMPTS), [[p] for p in PROMPTS], actors)
    finals = {}
    for name, stops in (("straight", [None]), ("resumed", [1, None])):
        for stop in stops:
            cfg = tiny_config(tmp_path / name, max_steps=2, stop_after_steps=stop)
            Trainer(cfg, DDPO, data, WorkerContext(0, 1, torch.device("cpu"), cfg.out)).run()
        ckpt = Checkpoints(cfg.out)
        assert ckpt.steps() == [1, 2]
        finals[name] = ckpt.load(2)
    a, b = finals["straight"], finals["resumed"]
    assert a["lora"].keys() == b["lora"].keys()
    assert all(torch.equal(a["lora"][k], b["lora"][k]) for k in a["lora"])
    assert any(float(v.abs().max()) > 0 for k, v in a["lora"].items() if "lora_B" in k)  # trained, not the base
    assert a["method"] == b["method"] and a["method"]["tracker"]["stats"]
    assert (
        ddpo_module.epoch_rewards(str(tmp_path / "straight"))["reward_mean"].tolist()
        == ddpo_module.epoch_rewards(str(tmp_path / "resumed"))["reward_mean"].tolist()
    )


def fresh_brightness(method, n: int = 16) -> float:
    """Mean brightness (the reward) of fresh samples on fixed seeds, computed here, not by the actors."""
    from tn_ray.diffusion.sampling import decode_images, sample_chains

    gens = [torch.Generator().manual_seed(1000 + i) for i in range(n)]
    chains = sample_chains(
        method.policy.pipe,
        PROMPTS * (n // 2),
        [0, 1] * (n // 2),
        num_steps=method.cfg.sample.num_steps,
        guidance=GUIDANCE,
        eta=1.0,
        generator=gens,
    )
    return float(decode_images(method.policy.pipe, chains.latents[:, -1]).astype(np.float64).mean() / 255)


def test_learning_brightness_rises(tmp_path, actors):
    """DDPO optimizes: 8 epochs of 16 samples (5 steps, lr 2e-2, one update per epoch) raise the mean
    brightness of 16 fresh samples on fixed seeds by more than 0.01 (the images' spread is ~0.005;
    measured: 0.5075 -> 0.527)."""
    cfg = tiny_config(tmp_path / "learn", max_steps=8, sample={"num_steps": 5, "num_batches_per_epoch": 2})
    method = make_method(cfg, actors)
    before = fresh_brightness(method)
    curve, gaps = [], []
    for step in range(1, 9):
        curve.append(method.step(step))
        gaps.append(eps_gap(method))
    after = fresh_brightness(method)
    print(
        "reward_mean",
        [round(m["reward_mean"], 4) for m in curve],
        "approx_kl",
        [m["approx_kl"] for m in curve],
        "eps_gap_to_base",
        [f"{g:.3g}" for g in gaps],
        "fresh",
        before,
        after,
    )
    assert after > before + 0.01, (before, after)
    assert np.mean([m["reward_mean"] for m in curve[-2:]]) > np.mean([m["reward_mean"] for m in curve[:2]])


def test_two_workers_share_advantage_statistics(tmp_path, ray_session):
    """Ray Train with 2 CPU workers: each samples its share; every worker's advantages equal those of one
    tracker fed all samples in rank order (as a single worker would be), over 2 epochs; training proceeds."""
    import pandas as pd

    from tn_ray.storage import Store
    from tn_ray.training.checkpoint import Checkpoints
    from tn_ray.training.ddpo import run

    cfg = tiny_config(
        tmp_path / "two",
        max_steps=2,
        sample={"batch_size": 4},
        train={"batch_size": 4, "stat_min_count": 3},
        scaling={"num_workers": 2, "cpus_per_worker": 0.5},
        scoring={"num_actors": 2},
        ray={"num_cpus": 2},
    )
    paths = run(cfg)
    store = Store(cfg.out)
    frame = pd.concat([store.read_table(r).to_pandas() for r in store.list_files("samples", ".parquet")])
    assert sorted(frame["rank"].unique()) == [0, 1] and sorted(frame["epoch"].unique()) == [1, 2]
    single = PerPromptStatTracker(cfg.train.stat_buffer_size, cfg.train.stat_min_count)
    for epoch in (1, 2):
        rows = frame[frame["epoch"] == epoch].sort_values("rank", kind="stable")
        expected = np.clip(single.update(rows["prompt_id"].to_numpy(), rows["reward"].to_numpy()), -5, 5)
        np.testing.assert_allclose(rows["advantage"].to_numpy(), expected, rtol=0, atol=1e-12)
    lora = Checkpoints(cfg.out).load(2)["lora"]
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if "lora_B" in k)
    assert paths["checkpoints"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"train": {"batch_size": 3}}, "train.batch_size: 3 does not divide the 8 samples"),
        ({"train": {"updates_per_inner_epoch": 3}}, "updates_per_inner_epoch"),
        ({"train": {"num_inner_epochs": 2}, "optimizer": {"schedule": "cosine"}}, "schedule 'constant'"),
        ({"sample": {"eta": 0.0}}, "sample.eta"),
    ],
)
def test_bad_configs_fail_naming_file_and_key_before_ray(tmp_path, capsys, bad, message):
    import yaml

    from tn_ray.cli import main

    cfg = {
        "prompts": PROMPTS,
        "policy": {"pipeline": "tiny"},
        "reward": {"models": ["brightness"], "use": "brightness"},
        "sample": {"batch_size": 8, "num_batches_per_epoch": 1},
        "train": {"batch_size": 8},
    }
    for key, value in bad.items():
        cfg[key] = {**cfg.get(key, {}), **value} if key in ("sample", "train") else value
    path = tmp_path / "ddpo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["ddpo", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err


def test_sweep_trainable_maps_parameters_into_trial_configs():
    """``trainable: ddpo``: the KL sweep YAMLs load and check; each trial's parameters land in its config
    and its own run folder; unknown or bad parameters are refused."""
    from tn_ray.sweep.runner import check, load
    from tn_ray.sweep.trainables.ddpo import check_param, prepare
    from tn_ray.sweep.trainables.finetune import FineTuneSweepOptions, trial_config

    for path in ("sweeps/ddpo_kl.yaml", "sweeps/ddpo_kl_tiny.yaml"):
        entry, _ = check(load(path), path)
        assert entry.name == "ddpo"
    data = prepare(
        FineTuneSweepOptions(
            config="sweeps/ddpo_tiny.yaml", overrides={"reward": {"models": ["brightness"], "use": "brightness"}}
        )
    )
    cfg = trial_config({"kl_coef": 10.0, "lr": 1e-3, "tau": 0.5, "lam": 0.1, "lora_rank": 8, "clip_range": 0.1}, data)
    assert (cfg.train.kl_coef, cfg.optimizer.lr, cfg.reward.textnorm.tau, cfg.reward.textnorm.lam) == (
        10.0,
        1e-3,
        0.5,
        0.1,
    )
    assert cfg.policy.lora.rank == 8 and cfg.train.clip_range == 0.1 and "kl_coef=10.0" in cfg.out
    assert cfg.checkpoint.every == cfg.eval.every
    assert (
        check_param(None, "kl_coef", -1.0)
        and check_param(None, "beta", 0.5)
        and check_param(None, "kl_coef", 0.0) is None
    )
