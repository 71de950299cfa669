"""The Flow-GRPO SDE step: its log-prob, its ratio, its marginals (against the ODE's) and its validation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from tn_ray.diffusion.flow_sde import (
    check_window,
    flow_ode_step,
    flow_sde_step,
    sde_sigma,
    step_index_of,
    step_sigmas,
)


def scheduler(steps: int = 10, shift: float = 3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    s.set_timesteps(steps)
    return s


def inputs(seed: int, shape=(5, 4, 6, 6)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
    batch=st.integers(1, 4),
    noise_level=st.floats(0.05, 1.0),
    step=st.integers(0, 9),
    seed=st.integers(0, 2**16),
)
def test_log_prob_is_the_normal_density(shape, batch, noise_level, step, seed):
    """log_prob = mean over dims of Normal(mean, std).log_prob(prev), log_prob_sum its sum, std =
    sigma_t sqrt(|dt|), both for a drawn and for a given sample."""
    sched = scheduler()
    x, v = inputs(seed, (batch, *shape))
    out = flow_sde_step(sched, v, step, x, noise_level, generator=torch.Generator().manual_seed(seed))
    dims = tuple(range(1, x.ndim))
    ref = torch.distributions.Normal(out.mean, out.std).log_prob(out.prev_sample)
    torch.testing.assert_close(out.log_prob, ref.mean(dim=dims), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.log_prob_sum, ref.sum(dim=dims), rtol=1e-5, atol=1e-4)
    t, t_next = (float(z) for z in step_sigmas(sched, step))
    assert t_next < t
    torch.testing.assert_close(out.std.reshape(-1), out.sigma_t.reshape(-1) * math.sqrt(t - t_next))
    other = torch.randn_like(x)
    given_ = flow_sde_step(sched, v, step, x, noise_level, prev_sample=other)
    torch.testing.assert_close(given_.log_prob,
                               torch.distributions.Normal(out.mean, out.std).log_prob(other).mean(dim=dims),
                               rtol=1e-5, atol=1e-5)


def test_mean_and_sigma_are_flow_grpos_formulas_by_hand():
    """Hand check at one step: t, dt from the scheduler's sigmas; flow_grpo's (rearranged) mean
    x (1 + s^2 dt / (2t)) + v (1 + s^2 (1 - t) / (2t)) dt equals ours; the t = 1 clamp uses sigmas[1]."""
    sched = scheduler(10)
    x, v = inputs(1)
    for i in range(10):
        t = float(sched.sigmas[i])
        dt = float(sched.sigmas[i + 1]) - t
        denom = 1 - (float(sched.sigmas[1]) if t == 1 else t)
        s = 0.7 * math.sqrt(t / denom)
        out = flow_sde_step(sched, v, i, x, 0.7, generator=torch.Generator().manual_seed(0))
        assert float(out.sigma_t.reshape(-1)[0]) == pytest.approx(s, rel=1e-6)
        expected = x * (1 + s**2 / (2 * t) * dt) + v * (1 + s**2 * (1 - t) / (2 * t)) * dt
        torch.testing.assert_close(out.mean, expected, rtol=1e-5, atol=1e-6)
    assert float(sched.sigmas[0]) == 1.0  # the clamp was exercised
    assert float(sde_sigma(torch.tensor([1.0]), 0.75, 1.0)) == pytest.approx(2.0)


def test_ratio_is_exactly_one_right_after_sampling():
    """Scoring the drawn sample with the same inputs gives the same log-prob bit for bit (ratio exactly 1),
    per-row step indices included, and in float16 samples too (scored after rounding)."""
    sched = scheduler()
    for dtype in (torch.float32, torch.float16):
        x, v = (z.to(dtype) for z in inputs(3))
        for i in (0, 4, 9):
            gens = [torch.Generator().manual_seed(100 + r) for r in range(x.shape[0])]
            out = flow_sde_step(sched, v, i, x, 0.7, generator=gens)
            again = flow_sde_step(sched, v, torch.full((x.shape[0],), i), x, 0.7, prev_sample=out.prev_sample)
            assert out.prev_sample.dtype == dtype
            assert torch.equal(torch.exp(again.log_prob - out.log_prob), torch.ones(x.shape[0]))


def test_per_row_step_indices_equal_row_by_row_steps():
    """A batch whose rows sit at different steps (training minibatches) gives each row its own step's output."""
    sched = scheduler()
    x, v = inputs(6)
    idx = torch.tensor([0, 3, 9, 3, 5])
    prev = torch.randn_like(x)
    batch = flow_sde_step(sched, v, idx, x, 0.7, prev_sample=prev)
    for r, i in enumerate(idx.tolist()):
        row = flow_sde_step(sched, v[r:r + 1], i, x[r:r + 1], 0.7, prev_sample=prev[r:r + 1])
        torch.testing.assert_close(batch.log_prob[r:r + 1], row.log_prob, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(batch.mean[r:r + 1], row.mean, rtol=1e-6, atol=1e-6)
    ode = flow_ode_step(sched, v, idx, x)
    for r, i in enumerate(idx.tolist()):
        row = flow_ode_step(sched, v[r:r + 1], i, x[r:r + 1])
        torch.testing.assert_close(ode.prev_sample[r:r + 1], row.prev_sample)


def test_gradients_flow_through_the_mean_only():
    sched = scheduler()
    x, v = inputs(4)
    v = v.clone().requires_grad_(True)
    prev = flow_sde_step(sched, v.detach(), 3, x, 0.7, generator=torch.Generator().manual_seed(0)).prev_sample
    out = flow_sde_step(sched, v, 3, x, 0.7, prev_sample=prev.clone().requires_grad_(True))
    out.log_prob.sum().backward()
    assert v.grad is not None and float(v.grad.abs().sum()) > 0
    assert not out.prev_sample.requires_grad


def test_ode_step_is_the_schedulers_euler_step():
    """flow_ode_step equals FlowMatchEulerDiscreteScheduler.step exactly, float32 and float16 outputs."""
    sched = scheduler(8)
    for dtype in (torch.float32, torch.float16):
        x, v = inputs(5)
        v = v.to(dtype)
        ref_sched = scheduler(8)
        for i, t in enumerate(ref_sched.timesteps):
            ref = ref_sched.step(v, t, x, return_dict=False)[0]
            ours = flow_ode_step(sched, v, i, x)
            assert ours.log_prob is None
            assert ours.prev_sample.dtype == ref.dtype and torch.equal(ours.prev_sample, ref)


def test_step_index_of_timesteps():
    sched = scheduler(10)
    assert step_index_of(sched, sched.timesteps[[0, 3, 9]]).tolist() == [0, 3, 9]
    with pytest.raises(ValueError, match="not all in the scheduler's schedule"):
        step_index_of(sched, torch.tensor([0.5]))


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_noise_level_outside_its_range_is_refused(bad):
    sched = scheduler()
    x, v = inputs(0)
    with pytest.raises(ValueError, match="noise_level must be in"):
        flow_sde_step(sched, v, 0, x, bad)


def test_bad_calls_are_refused():
    from diffusers import FlowMatchEulerDiscreteScheduler

    x, v = inputs(0)
    with pytest.raises(ValueError, match="set_timesteps"):
        flow_sde_step(FlowMatchEulerDiscreteScheduler(), v, 0, x, 0.7)
    with pytest.raises(ValueError, match="out of range"):
        flow_sde_step(scheduler(10), v, 10, x, 0.7)
    with pytest.raises(ValueError, match="not both"):
        flow_sde_step(scheduler(), v, 0, x, 0.7, generator=torch.Generator(), prev_sample=x)
    with pytest.raises(ValueError, match="0 <= start <= stop"):
        check_window((3, 2), 10)
    with pytest.raises(ValueError, match="0 <= start <= stop"):
        check_window((0, 11), 10)
    assert check_window((2, 5), 10) == (2, 5)


# --- marginals on a 1-D Gaussian with its exact velocity field ------------------------------------
M, S = 0.8, 0.5  # data x0 ~ N(M, S^2); x_t = (1 - t) x0 + t eps


def exact_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[eps - x0 | x_t = x] for x0 ~ N(M, S^2), eps ~ N(0, 1): linear in x (jointly Gaussian)."""
    var = (1 - t) ** 2 * S**2 + t**2
    cov = t - (1 - t) * S**2
    return -M + cov / var * (x - (1 - t) * M)


def run_chain(steps: int, noise_level: float | None, n: int, seed: int, drift=None) -> torch.Tensor:
    sched = scheduler(steps, shift=1.0)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=g, dtype=torch.float64).float()
    for i in range(steps):
        t = sched.sigmas[i]
        v = exact_velocity(x, t) if drift is None else drift(x, t)
        if noise_level is None:
            x = flow_ode_step(sched, v, i, x).prev_sample
        else:
            x = flow_sde_step(sched, v, i, x, noise_level, generator=g).prev_sample
    return x.reshape(-1).double()


N_SAMPLES, N_STEPS = 20_000, 200
SE_MEAN = S / math.sqrt(N_SAMPLES)
SE_VAR = S**2 * math.sqrt(2 / (N_SAMPLES - 1))


def discrete_moments(steps: int, noise_level: float | None) -> tuple[float, float]:
    """The exact mean and variance at t = 0 of the discretized chain (float64): with the exact velocity
    affine in x, every step maps x to c x + d plus Gaussian noise of the step's std."""
    sched = scheduler(steps, shift=1.0)
    sigma_max = float(sched.sigmas[1])
    mean, var = 0.0, 1.0
    for i in range(steps):
        t, dt = float(sched.sigmas[i]), float(sched.sigmas[i + 1] - sched.sigmas[i])
        b = (t - (1 - t) * S**2) / ((1 - t) ** 2 * S**2 + t**2)  # v = a0 + b x
        a0 = -M - b * (1 - t) * M
        if noise_level is None:
            c, d, std2 = 1 + b * dt, a0 * dt, 0.0
        else:
            s2 = float(sde_sigma(torch.tensor([t], dtype=torch.float64), sigma_max, noise_level)) ** 2
            k = s2 / (2 * t)
            c = 1 + (b + k * (1 + (1 - t) * b)) * dt
            d = (a0 + k * (1 - t) * a0) * dt
            std2 = s2 * -dt
        mean, var = c * mean + d, c**2 * var + std2
    return mean, var


@pytest.fixture(scope="module")
def ode_samples():
    return run_chain(N_STEPS, None, N_SAMPLES, seed=7)


@pytest.mark.parametrize("noise_level", [0.3, 0.7, 1.0])
def test_sde_marginal_equals_the_odes(noise_level, ode_samples):
    """At t = 0 the SDE's samples have the ODE's marginal, the data's N(M, S^2) up to the Euler steps' bias.

    Theory, exactly (the chain is affine in x): both discretized chains end at mean M and at variances
    within 2 standard errors of S^2 and of each other (n = 20000, 200 steps; the ODE's Euler bias, -1.5
    s.e., is the largest). Samples (fixed seeds): mean and variance within 4 s.e. of their chain's exact
    moments, one-sample KS p > 0.001 against that normal, two-sample KS p > 0.001 SDE vs ODE."""
    ode_mean, ode_var = discrete_moments(N_STEPS, None)
    sde_mean, sde_var = discrete_moments(N_STEPS, noise_level)
    for mean, var in ((ode_mean, ode_var), (sde_mean, sde_var)):
        assert abs(mean - M) < 1e-6 and abs(var - S**2) < 2 * SE_VAR
    assert abs(sde_var - ode_var) < 2 * SE_VAR
    sde = run_chain(N_STEPS, noise_level, N_SAMPLES, seed=11)
    assert stats.ks_2samp(sde.numpy(), ode_samples.numpy()).pvalue > 0.001
    for samples, mean, var in ((sde, sde_mean, sde_var), (ode_samples, ode_mean, ode_var)):
        assert stats.kstest(samples.numpy(), "norm", args=(mean, math.sqrt(var))).pvalue > 0.001
        assert abs(float(samples.mean()) - mean) < 4 * SE_MEAN
        assert abs(float(samples.var()) - var) < 4 * SE_VAR


def test_the_marginal_test_rejects_a_wrong_sde(ode_samples):
    """Power: the same noise without the score correction (x + v dt + sigma_t sqrt|dt| eps) widens the
    marginal, and the same test rejects it."""
    sched = scheduler(N_STEPS, shift=1.0)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(N_SAMPLES, 1, generator=g, dtype=torch.float64).float()
    for i in range(N_STEPS):
        t = sched.sigmas[i]
        v = exact_velocity(x, t)
        out = flow_sde_step(sched, v, i, x, 0.7, prev_sample=x)  # std and dt of the step
        x = x + v * out.dt + out.std * torch.randn(x.shape, generator=g)
    wrong = x.reshape(-1).double()
    assert np.isfinite(wrong.numpy()).all()
    assert stats.ks_2samp(wrong.numpy(), ode_samples.numpy()).pvalue < 1e-6
    assert float(wrong.var()) > S**2 + 10 * SE_VAR
