"""The fine-tuning core shared by RWR and DDPO: losses, weights, selection, monitor, policy, checkpoints."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tn_ray.training.checkpoint_selection import select_checkpoint, win_counts
from tn_ray.training.losses import kl_surrogate, rwr_loss, weighted_denoising
from tn_ray.training.monitor import Monitor
from tn_ray.training.sample_weights import reward_weights, top_k_per_group


# --- pure functions -----------------------------------------------------------------------
def test_rwr_loss_equals_hand_computation():
    g = torch.Generator().manual_seed(3)
    pred, noise, ref = (torch.randn(3, 4, 2, 2, generator=g, dtype=torch.float64) for _ in range(3))
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    beta = 0.75
    p, n, r = pred.numpy(), noise.numpy(), ref.numpy()
    hand_denoise = sum(w[i].item() * np.mean((n[i] - p[i]) ** 2) for i in range(3)) / 3
    hand_kl = sum(np.mean((p[i] - r[i]) ** 2) for i in range(3)) / 3
    out = rwr_loss(pred, noise, w, beta=beta, ref_pred=ref)
    assert out["denoise"].item() == pytest.approx(hand_denoise, rel=1e-6)
    assert out["kl"].item() == pytest.approx(hand_kl, rel=1e-6)
    assert out["loss"].item() == pytest.approx(hand_denoise + beta * hand_kl, rel=1e-6)
    assert weighted_denoising(pred, noise, w).item() == pytest.approx(hand_denoise, rel=1e-6)
    assert kl_surrogate(pred, ref).shape == (3,)


def test_rwr_loss_no_gradient_into_reference():
    pred = torch.randn(2, 4, 2, 2, requires_grad=True)
    ref = torch.randn(2, 4, 2, 2, requires_grad=True)
    rwr_loss(pred, torch.zeros_like(pred), torch.ones(2), beta=1.0, ref_pred=ref)["loss"].backward()
    assert pred.grad is not None and ref.grad is None
    with pytest.raises(ValueError, match="ref_pred"):
        rwr_loss(pred, pred, torch.ones(2), beta=0.5)


def test_weights_and_top_k():
    r = np.array([0.2, 0.9, 0.5, 0.1, 0.3, 0.3])
    g = ["a", "a", "a", "b", "b", "b"]
    assert top_k_per_group(r, g, 2).tolist() == [1, 2, 4, 5]  # tie 0.3/0.3: lower index first
    assert reward_weights(r, g, "value").tolist() == r.tolist()
    mm = reward_weights(r, g, "minmax")
    np.testing.assert_allclose(mm, [0.0, 1.0, 3 / 7, 0.0, 1.0, 1.0])
    sm = reward_weights(r, g, "softmax", temperature=0.5)
    e = np.exp(r / 0.5)
    np.testing.assert_allclose(sm, 6 * e / e.sum())
    assert sm.mean() == pytest.approx(1.0)
    np.testing.assert_allclose(reward_weights([1.0, 1.0], ["x", "x"], "minmax"), [1.0, 1.0])
    with pytest.raises(ValueError, match="rewards >= 0"):
        reward_weights([-1.0, 2.0], ["x", "x"], "value")


def test_selection_picks_earliest_maximum():
    base = pd.DataFrame(
        [(p, s, "judge", 0.5) for p in range(2) for s in range(3)]
        + [(p, s, "train", 0.0) for p in range(2) for s in range(3)],
        columns=["prompt_id", "seed", "reward", "value"],
    )
    # wins per step under the judge: step 10 -> 2, step 20 -> 5, step 30 -> 5, step 40 -> 3
    wins = {10: 2, 20: 5, 30: 5, 40: 3}
    rows = []
    for step, k in wins.items():
        for i, (p, s) in enumerate((p, s) for p in range(2) for s in range(3)):
            rows.append((step, p, s, "judge", 0.9 if i < k else 0.5))  # equal to base is not a win
            rows.append((step, p, s, "train", float(step)))
    scores = pd.DataFrame(rows, columns=["step", "prompt_id", "seed", "reward", "value"])
    counts = win_counts(scores, base)
    assert counts[counts["reward"] == "judge"].set_index("step")["wins"].to_dict() == wins
    assert select_checkpoint(counts, "judge") == 20
    assert select_checkpoint(counts, "train") == 10  # every step beats the base on every image: earliest
    with pytest.raises(ValueError, match="no evaluation counts"):
        select_checkpoint(counts, "other")


def test_monitor_flags_overoptimization_and_stays_quiet():
    m = Monitor(window=2)
    history = [(0, 1.0, 0.5), (10, 1.1, 0.6), (20, 1.3, 0.55), (30, 1.6, 0.4)]  # judge peaks at 10, then falls
    flags = [m.update(s, t, {"judge": j}) for s, t, j in history]
    assert flags[:3] == [None, None, None]  # at 20 the judge is above its value at 0
    assert (
        flags[3] is not None and flags[3].window_start == 10 and flags[3].judge_changes["judge"] == pytest.approx(-0.2)
    )
    quiet = Monitor(window=2)
    assert all(quiet.update(s, 1.0 + s, {"judge": 0.5 + s / 100, "other": s}) is None for s in range(0, 60, 10))
    no_judges = Monitor(window=1)
    assert all(no_judges.update(s, float(s), {}) is None for s in range(5))
    restored = Monitor(window=2)
    restored.load_state_dict(m.state_dict())
    assert restored.history == m.history and restored.flags == m.flags


def test_config_rejects_training_reward_as_judge():
    from tn_ray.config import ConfigError, validate
    from tn_ray.training.config import FineTuneConfig

    reward = {"models": ["brightness"], "use": "brightness"}
    with pytest.raises(ConfigError, match="held out"):
        validate(FineTuneConfig, {"reward": reward, "eval": {"judges": [reward]}})
    with pytest.raises(ConfigError, match="select_by"):
        validate(FineTuneConfig, {"reward": reward, "eval": {"select_by": "clip:tiny"}})
    judge = {"models": ["clip:tiny"], "use": "clip:tiny"}
    cfg = validate(FineTuneConfig, {"reward": reward, "eval": {"judges": [judge]}})
    assert cfg.selection_column == "brightness" and cfg.paper_rule  # the paper's rule: judges are monitors
    cfg = validate(FineTuneConfig, {"reward": reward, "eval": {"judges": [judge], "select_by": "clip:tiny"}})
    assert cfg.selection_column == "clip:tiny" and not cfg.paper_rule
    assert validate(
        FineTuneConfig, {"reward": reward, "eval": {"judges": [judge], "select_by": "brightness"}}
    ).paper_rule


# --- the paper's checkpoint rule on a run whose training reward and judge disagree --------
PROMPTS2, SEEDS2 = ["a red cube", "two cats"], [0, 1]
TRAIN_WINS = {10: 3, 20: 4, 30: 4}  # the training reward's earliest maximum: step 20
JUDGE_WINS = {10: 4, 20: 1, 30: 2}  # the judge's: step 10


def _constructed_run(out) -> None:
    """A finished run's evaluation folder: base and per-step scores (4 images, 2 columns), images, LoRA files."""
    import io

    from PIL import Image

    from tn_ray.storage import Store

    store = Store(str(out))
    images = [(p, s) for p in range(len(PROMPTS2)) for s in SEEDS2]
    base = pd.DataFrame(
        [(p, s, PROMPTS2[p], col, 0.5) for col in ("brightness", "clip:tiny") for p, s in images],
        columns=["prompt_id", "seed", "prompt", "reward", "value"],
    )
    store.write_table("eval/base.parquet", __import__("pyarrow").Table.from_pandas(base, preserve_index=False))
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 30)).save(png, format="PNG")
    for p, s in images:
        store.write_bytes(f"eval/base/{p:05d}-{s}.png", png.getvalue())
    for step in TRAIN_WINS:
        rows = [
            (step, p, s, PROMPTS2[p], col, 0.9 if i < wins[step] else 0.1)
            for col, wins in (("brightness", TRAIN_WINS), ("clip:tiny", JUDGE_WINS))
            for i, (p, s) in enumerate(images)
        ]
        frame = pd.DataFrame(rows, columns=["step", "prompt_id", "seed", "prompt", "reward", "value"])
        store.write_table(
            f"eval/scores/step-{step:06d}.parquet", __import__("pyarrow").Table.from_pandas(frame, preserve_index=False)
        )
        for p, s in images:
            store.write_bytes(f"eval/step-{step:06d}/{p:05d}-{s}.png", png.getvalue())
        store.write_bytes(f"checkpoints/step-{step:06d}/pytorch_lora_weights.safetensors", f"lora-{step}".encode())


def _run_cfg(out, **eval_keys):
    from tn_ray.training.config import FineTuneConfig

    return FineTuneConfig.model_validate(
        {
            "out": str(out),
            "reward": {"models": ["brightness"], "use": "brightness"},
            "eval": {
                "prompts": PROMPTS2,
                "seeds": SEEDS2,
                "judges": [{"models": ["clip:tiny"], "use": "clip:tiny"}],
                **eval_keys,
            },
        }
    )


def test_default_selection_is_the_training_reward_and_judges_are_reported(tmp_path):
    """The training reward and the judge disagree (earliest maxima at steps 20 and 10): without select_by the
    checkpoint is the training reward's (the paper's rule), written as such, with the judge's own view beside it."""
    import json

    from tn_ray.training.checkpoint_selection import describe_selection
    from tn_ray.training.outputs import write_outputs

    _constructed_run(tmp_path / "run")
    paths = write_outputs(_run_cfg(tmp_path / "run"), PROMPTS2)
    sel = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert (sel["step"], sel["selected_by"], sel["paper_rule"], sel["paper_rule_step"]) == (20, "brightness", True, 20)
    assert (sel["wins"], sel["images"]) == (4, 4) and sel["counts"] == {"10": 3, "20": 4, "30": 4}
    assert sel["rule"].startswith("the paper's rule") and "training reward" in sel["rule"]
    judge = sel["judges"]["clip:tiny"]
    assert judge["earliest_max_step"] == 10 and judge["wins_at_earliest_max"] == 4
    assert judge["at_selected"]["wins"] == 1 and judge["counts"] == {"10": 4, "20": 1, "30": 2}
    assert (tmp_path / "run" / "selected" / "pytorch_lora_weights.safetensors").read_bytes() == b"lora-20"
    lines = describe_selection(sel)
    assert "step 20, by the training reward brightness (the paper's rule)" in lines[0]
    assert "judge clip:tiny (monitor): its own earliest maximum is step 10" in lines[1]
    assert paths["selection"].endswith("selection.json")

    # the override: the judge's column selects, and the report says it is not the paper's rule
    _constructed_run(tmp_path / "override")
    write_outputs(_run_cfg(tmp_path / "override", select_by="clip:tiny"), PROMPTS2)
    sel = json.loads((tmp_path / "override" / "selection.json").read_text())
    assert (sel["step"], sel["selected_by"], sel["paper_rule"], sel["paper_rule_step"]) == (10, "clip:tiny", False, 20)
    assert "NOT the paper's rule" in sel["rule"] and "not the paper's rule" in describe_selection(sel)[0]
    assert (tmp_path / "override" / "selected" / "pytorch_lora_weights.safetensors").read_bytes() == b"lora-10"


# --- epsilon space: the KL term and the denoising term for every parameterization ------
def _sd_ddpm(**kw):
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, **kw)


def test_to_epsilon_inverts_v_and_x0_predictions_and_v_space_reweights_by_one_over_alpha_bar():
    from types import SimpleNamespace

    from tn_ray.training.losses import alpha_bar, per_sample_sq_error, to_epsilon

    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 250, 700, 999])
    sched = _sd_ddpm()
    x_t = sched.add_noise(x0, eps, t)
    v = sched.get_velocity(x0, eps, t)
    torch.testing.assert_close(to_epsilon(_sd_ddpm(prediction_type="v_prediction"), v, t, x_t), eps, atol=1e-4, rtol=0)
    torch.testing.assert_close(to_epsilon(_sd_ddpm(prediction_type="sample"), x0, t, x_t), eps, atol=2e-3, rtol=0)
    assert torch.equal(to_epsilon(sched, eps, t, x_t), eps)
    # the point: at the same x_t, squared v differences are squared eps differences / alpha_bar_t
    eps2 = eps + 0.1 * torch.randn(eps.shape, generator=g)
    a = alpha_bar(sched, t, eps)
    v2 = sched.get_velocity((x_t - (1 - a).sqrt() * eps2) / a.sqrt(), eps2, t)  # the v whose x0 is the one eps2 implies
    ratio = per_sample_sq_error(v, v2) / per_sample_sq_error(eps, eps2)
    torch.testing.assert_close(ratio, 1 / a.flatten(), rtol=1e-3, atol=0)
    assert float(1 / a.flatten()[-1]) > 200  # SD's schedule: the noisiest step weighs 214x more in v space
    odd = SimpleNamespace(config=SimpleNamespace(prediction_type="flow"), alphas_cumprod=sched.alphas_cumprod)
    with pytest.raises(ValueError, match="prediction_type"):
        to_epsilon(odd, v, t, x_t)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_native_denoising_term_is_the_training_target_loss_and_epsilon_space_reweights_it(kind):
    """``rwr_terms(space='native')``: the raw output against what the model trains on, by hand
    (v = sqrt(a) eps - sqrt(1 - a) x0, Salimans & Ho 2022); ``epsilon``: the same outputs converted to noise,
    which for v-prediction is the native per-sample error times a_t (so the noisiest steps count ~0)."""
    from tn_ray.training.losses import rwr_terms, training_target

    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([3, 300, 700, 990])
    sched = _sd_ddpm(prediction_type=kind)
    a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    by_hand = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[kind]
    torch.testing.assert_close(training_target(sched, x0, eps, t), by_hand, atol=1e-5, rtol=0)
    out = by_hand + 0.1 * torch.randn(x0.shape, generator=g)
    w = torch.tensor([1.0, 0.5, 2.0, 0.0])
    native = rwr_terms(sched, out, x_t, t, eps, w, space="native", x0=x0)["denoise"]
    assert float(native) == pytest.approx(float((w * (out - by_hand).pow(2).flatten(1).mean(1)).mean()), rel=1e-5)
    in_eps = rwr_terms(sched, out, x_t, t, eps, w, space="epsilon")["denoise"]
    if kind == "v_prediction":
        per = (out - by_hand).pow(2).flatten(1).mean(1) * a.flatten()
        assert float(in_eps) == pytest.approx(float((w * per).mean()), rel=1e-3)
    if kind == "epsilon":
        assert float(in_eps) == float(native)
    with pytest.raises(ValueError, match="x0"):
        rwr_terms(_sd_ddpm(prediction_type="v_prediction"), out, x_t, t, eps, w, space="native")
    with pytest.raises(ValueError, match="denoising space"):
        rwr_terms(sched, out, x_t, t, eps, w, space="pixel", x0=x0)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_kl_weight_is_the_exact_kl_of_two_gaussian_steps(variance_type):
    """diffusers' own DDPM step (same noise draw for both predictions, so the outputs differ by exactly the
    means' difference) and its own variance: KL = sum (mu1 - mu2)^2 / (2 sigma^2) = w_t sum (eps1 - eps2)^2."""
    from tn_ray.training.losses import ddpm_kl_weight

    sched = _sd_ddpm(variance_type=variance_type)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    for t in (1, 10, 300, 999):
        e1, e2 = (torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(2))
        p1 = sched.step(e1, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
        p2 = sched.step(e2, t, x, generator=torch.Generator().manual_seed(5)).prev_sample
        var = float(sched._get_variance(t, variance_type=variance_type))
        exact = float(((p1 - p2) ** 2).sum() / (2 * var))
        assert float(ddpm_kl_weight(sched, torch.tensor([t]))[0] * ((e1 - e2) ** 2).sum()) == pytest.approx(
            exact, rel=1e-4
        )  # diffusers computes in float32
    w = ddpm_kl_weight(_sd_ddpm(), torch.tensor([1, 999]))
    assert w[0] > 50 * w[1]  # far from constant: 0.503 at t = 1, 0.0061 at t = 999 (82x; fixed_small)


def test_ddim_kl_weight_is_the_exact_kl_of_two_ddim_steps():
    from diffusers import DDIMScheduler

    from tn_ray.diffusion.ddim import ddim_step
    from tn_ray.training.losses import ddim_kl_weight

    sched = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    sched.set_timesteps(50)
    g = torch.Generator().manual_seed(2)
    x, prev = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    for t in sched.timesteps[[0, 10, 25, 48]]:
        e1, e2 = (torch.randn(x.shape, generator=g) for _ in range(2))
        s1, s2 = (ddim_step(sched, e, t, x, eta=1.0, prev_sample=prev) for e in (e1, e2))
        exact = torch.distributions.kl_divergence(
            torch.distributions.Normal(s1.mean.double(), s1.std.double()),
            torch.distributions.Normal(s2.mean.double(), s2.std.double()),
        ).sum()
        got = ddim_kl_weight(sched, t.reshape(1), eta=1.0)[0] * ((e1.double() - e2.double()) ** 2).sum()
        assert float(got) == pytest.approx(float(exact), rel=1e-4)


# --- policy and checkpoints on the tiny pipeline -----------------------------------------
@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([50, 700]), torch.randn(2, 4, 16, 16, generator=g)


def _policy(seed: int = 0, targets: list[str] | None = None):
    from tn_ray.training.config import PolicyBlock
    from tn_ray.training.policy import Policy

    lora = {"rank": 4} | ({"target_modules": targets} if targets else {})
    return Policy.load(PolicyBlock(pipeline="tiny", lora=lora), device="cpu", seed=seed)


def _train(policy, inputs, steps: int, lr: float = 1e-2):
    from tn_ray.training.config import OptimizerBlock
    from tn_ray.training.optim import Optimization

    x, t, noise = inputs
    emb = policy.encode_prompts(["a red square", "a blue circle"])
    optim = Optimization(policy.trainable_parameters(), OptimizerBlock(lr=lr), steps, policy.device)
    for _ in range(steps):
        optim.backward(rwr_loss(policy.noise_pred(x, t, emb), noise, torch.ones(2))["loss"])
        optim.step()
    return emb, optim


def test_only_lora_changes_and_reference_is_the_untouched_base(inputs):
    from tn_ray.diffusion.pipelines import tiny_pipeline

    policy = _policy()
    assert all(".lora_" in n for n in policy.trainable_names()) and policy.trainable_names()
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    before = {k: v.clone() for k, v in policy.unet.state_dict().items()}
    emb, _ = _train(policy, inputs, steps=2)
    after = policy.unet.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(".lora_B" in k or ".lora_A" in k for k in changed)
    x, t, _ = inputs
    untouched = tiny_pipeline().unet.eval()
    with torch.no_grad():
        base = untouched(x, t, encoder_hidden_states=emb).sample
        trained = policy.noise_pred(x, t, emb)
    names = policy.trainable_names()
    with policy.reference():
        assert policy.trainable_names() == []  # no gradient reaches a disabled adapter
    assert policy.trainable_names() == names  # and every one is trainable again after it
    torch.testing.assert_close(policy.reference_pred(x, t, emb), base, rtol=0, atol=1e-6)
    assert (trained - base).abs().max() > 1e-3  # the adapter is active outside reference()
    torch.testing.assert_close(policy.noise_pred(x, t, emb).detach(), trained, rtol=0, atol=0)


@pytest.mark.parametrize("targets", ["attention", "world"])
def test_checkpoint_loads_into_plain_pipeline_and_resumes_the_trained_adapter(tmp_path, inputs, targets):
    """Attention-only LoRA and the world's LoRA (attention, feed-forward, conv and time projections): a plain
    pipeline's ``load_lora_weights`` gives exactly the trained UNet. (Saved in diffusers' older key format,
    the mixed adapter lost every attention weight on loading: 112 of 234 on the world UNet.)"""
    from tn_ray.diffusion.pipelines import WORLD_LORA_TARGETS, tiny_pipeline
    from tn_ray.training.checkpoint import Checkpoints, rng_state, set_rng_state

    policy = _policy(targets=WORLD_LORA_TARGETS if targets == "world" else None)
    if targets == "world":
        assert any("conv1.lora_A" in n for n in policy.trainable_names())
    emb, optim = _train(policy, inputs, steps=2)
    x, t, _ = inputs
    with torch.no_grad():
        trained = policy.noise_pred(x, t, emb)
        base = policy.reference_pred(x, t, emb)
    ckpts = Checkpoints(tmp_path / "run")
    uri = ckpts.save(2, policy, {"optim": optim.state_dict(), "rng": rng_state(), "method": {"position": 7}})
    assert ckpts.steps() == [2] and ckpts.latest() == 2

    plain = tiny_pipeline()
    plain.load_lora_weights(uri)
    with torch.no_grad():
        torch.testing.assert_close(plain.unet(x, t, encoder_hidden_states=emb).sample, trained, rtol=0, atol=1e-5)

    # resume into a fresh policy (trl issue 2505: the loaded LoRA must be the active one, not the base)
    fresh = _policy(targets=WORLD_LORA_TARGETS if targets == "world" else None)
    state = ckpts.load(2)
    fresh.load_lora_state(state["lora"])
    with torch.no_grad():
        resumed = fresh.noise_pred(x, t, emb)
    torch.testing.assert_close(resumed, trained, rtol=0, atol=0)
    assert (resumed - base).abs().max() > 1e-3
    assert state["method"] == {"position": 7} and state["step"] == 2
    torch.manual_seed(123)
    saved = rng_state()
    a = torch.rand(3)
    set_rng_state(saved)
    assert torch.equal(torch.rand(3), a)

    # an incomplete checkpoint (no complete.json: killed while writing) is ignored; pruning keeps protected steps
    ckpts.store.write_bytes("checkpoints/step-000003/state.pt", b"partial")
    assert ckpts.steps() == [2]
    ckpts.save(4, policy, {"rng": rng_state()})
    ckpts.save(6, policy, {"rng": rng_state()})
    assert ckpts.prune(keep_last=1, protect={2}) == [4] and ckpts.steps() == [2, 6]


def test_tracker_writes_tensorboard_and_offline_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from tn_ray.training.config import LoggingBlock
    from tn_ray.training.tracking import Tracker

    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = Tracker(
        LoggingBlock(wandb_project="tn-ray-test", wandb_mode="offline", progress_bar=False),
        str(tmp_path),
        4,
        run_config={"beta": 0.5},
    )
    tracker.log(1, {"loss": 0.5, "kl": 0.01})
    tracker.log(1, {"textnorm(clip:tiny)": 0.3}, prefix="eval")
    tracker.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    runs = list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_the_papers_sd21_configs_train_on_ten_prompts_per_set_with_the_paper_textnorm(tia2_dir, monkeypatch):
    """Section 5 / A.3: 10 prompts of each TIA2 set, TextNorm = ImageReward + PickScore with the mean
    ensemble on composition and eq. 3 elsewhere; the kind follows each prompt's set."""
    from pathlib import Path

    from tn_ray.config import ConfigError, load_config
    from tn_ray.data import tia2
    from tn_ray.errors import TnRayError
    from tn_ray.textnorm.columns import combine
    from tn_ray.training.config import resolve_prompts
    from tn_ray.training.ddpo import DDPOConfig
    from tn_ray.training.evaluation import reward_groups
    from tn_ray.training.rwr import RwrConfig

    monkeypatch.setenv("TN_RAY_TIA2_DIR", str(tia2_dir))
    root = Path(__file__).resolve().parents[1] / "sweeps"
    rwr = load_config(str(root / "rwr_sd21.yaml"), RwrConfig, {})
    ddpo = load_config(str(root / "ddpo_sd21.yaml"), DDPOConfig, {})
    prompts = resolve_prompts(rwr)
    assert (
        prompts
        == resolve_prompts(ddpo)
        == [p for s in tia2.SETS for p in list(tia2.load_prompt_sets(s, tia2_dir))[:10]]
    )
    assert rwr.reward.models == ddpo.reward.models == ["imagereward", "pickscore"] and rwr.reward.use == "textnorm"
    groups = reward_groups(rwr.reward, prompts)
    assert groups == [s for s in tia2.SETS for _ in range(10)]
    rng = np.random.default_rng(0)
    values = {m: rng.normal(size=(30, 5)) for m in rwr.reward.models}
    got = rwr.reward.column(values, groups)
    mean = combine(values, rwr.reward.models, [1.0, 1.0], "mean")
    unc = combine(values, rwr.reward.models, [1.0, 1.0], "uncertainty", 1.0)
    np.testing.assert_allclose(got, np.r_[unc[:20], mean[20:]])
    with pytest.raises(ValueError, match="group"):
        rwr.reward.column(values)  # a kind per set without the rows' sets
    with pytest.raises(TnRayError, match="in no TIA2 prompt set.*'a red cube'"):
        reward_groups(rwr.reward, ["a red cube"])
    with pytest.raises(ConfigError, match="prompts_per_set"):
        load_config(str(root / "rwr_sd21.yaml"), RwrConfig, {"reward.contrast": "released:counting"})


def test_preflight_names_a_prompt_outside_tia2_under_a_kind_per_set(tia2_dir, monkeypatch, tmp_path):
    import json

    from tn_ray.config import validate
    from tn_ray.errors import TnRayError
    from tn_ray.training.config import resolve_prompts
    from tn_ray.training.ddpo import DDPOConfig
    from tn_ray.training.preflight import check_run

    monkeypatch.setenv("TN_RAY_TIA2_DIR", str(tia2_dir))
    sets = tmp_path / "sets.json"
    sets.write_text(json.dumps({"a cat": ["two cats"], "a realistic photo of an airplane": ["two airplanes"]}))
    cfg = validate(
        DDPOConfig,
        {
            "out": str(tmp_path / "out"),
            "prompts": ["a realistic photo of an airplane", "a cat"],
            "policy": {"pipeline": "tiny"},
            "reward": {
                "models": ["clip:tiny", "pickscore:tiny"],
                "use": "tn",
                "contrast": str(sets),
                "ensembles": [
                    {
                        "name": "tn",
                        "members": ["clip:tiny", "pickscore:tiny"],
                        "kind": {"composition": "mean", "default": "uncertainty"},
                    }
                ],
            },
            "eval": {"enabled": False},
        },
    )
    with pytest.raises(TnRayError, match=r"1 prompt\(s\) are in no TIA2 prompt set.*'a cat'"):
        check_run(cfg, resolve_prompts(cfg))


def test_one_prompt_resolver_keeps_every_option(tmp_path):
    """RWR and DDPO resolve prompts through training.config.resolve_prompts: prompts, then prompts_file's
    non-blank lines (DDPO), the first max_prompts (RWR); a missing file is one line naming it."""
    from tn_ray.errors import InputError
    from tn_ray.training.config import resolve_prompts
    from tn_ray.training.ddpo import DDPOConfig
    from tn_ray.training.rwr import RwrConfig

    reward = {"models": ["brightness"], "use": "brightness"}
    lines = tmp_path / "p.txt"
    lines.write_text("a dog\n\n  two cats  \n")
    ddpo = DDPOConfig(prompts=["a cube"], prompts_file=str(lines), reward=reward)
    assert resolve_prompts(ddpo) == ["a cube", "a dog", "two cats"]
    assert resolve_prompts(DDPOConfig(prompts_file=str(lines), reward=reward)) == ["a dog", "two cats"]
    with pytest.raises(InputError, match=r"prompts_file: .*missing\.txt not found"):
        resolve_prompts(DDPOConfig(prompts_file=str(tmp_path / "missing.txt"), reward=reward))
    rwr = RwrConfig(prompts=["a", "b", "c"], max_prompts=2, reward=reward)
    assert resolve_prompts(rwr) == ["a", "b"]
