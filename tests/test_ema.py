"""The EMA of the LoRA weights (issue 24, Flow-GRPO's train.ema): the update against a hand computation,
the decay schedule, the averaged weights swapped in and out, and the state resuming exactly."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from tn_ray.training.ema import EMA, EMABlock, ema_decay


def test_decay_schedule_is_flow_grpo_s():
    """min(decay, (1 + n) / (10 + n)) on the optimizer step count n; without warmup the decay itself."""
    assert ema_decay(1, 0.9) == pytest.approx(2 / 11)
    assert ema_decay(8, 0.9) == pytest.approx(9 / 18)
    assert ema_decay(80, 0.9) == 0.9  # (81 / 90 = 0.9)
    assert ema_decay(1000, 0.9) == 0.9
    assert ema_decay(1, 0.9, warmup=False) == 0.9


def test_update_equals_a_hand_computation():
    """every = 2, decay 0.5, warmup: updates after optimizer steps 2 and 4 only, each
    ema <- d ema + (1 - d) w with d = min(0.5, (1 + n) / (10 + n)): 3/12, then 5/14."""
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ema = EMA([w], EMABlock(enabled=True, decay=0.5, every=2))
    hand = torch.tensor([1.0, -2.0])
    used = []
    for n, value in enumerate([[3.0, 0.0], [5.0, 4.0], [7.0, 8.0], [9.0, 10.0]], start=1):
        with torch.no_grad():
            w.copy_(torch.tensor(value))
        used.append(ema.step())
        if n % 2 == 0:
            d = min(0.5, (1 + n) / (10 + n))
            hand = d * hand + (1 - d) * torch.tensor(value)
        torch.testing.assert_close(ema.average[0], hand, rtol=0, atol=1e-6)
    assert used == [None, pytest.approx(3 / 12), None, pytest.approx(5 / 14)]
    # by hand: after step 2: 0.25 * [1, -2] + 0.75 * [5, 4] = [4, 2.5]; after 4: 5/14 [4, 2.5] + 9/14 [9, 10]
    torch.testing.assert_close(ema.average[0], torch.tensor([(20 + 81) / 14, (12.5 + 90) / 14]))


def test_applied_swaps_the_average_in_and_restores_the_weights():
    lin = torch.nn.Linear(3, 2)
    params = list(lin.parameters())
    ema = EMA(params, EMABlock(enabled=True, decay=0.5, every=1, warmup=False))
    trained = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    ema.step()
    after = [p.detach().clone() for p in params]
    with ema.applied():
        for p, t in zip(params, trained):
            torch.testing.assert_close(p.detach(), t + 0.5)  # 0.5 t + 0.5 (t + 1)
    for p, a in zip(params, after):
        assert torch.equal(p.detach(), a)


def test_resume_from_the_state_equals_uninterrupted():
    """An EMA rebuilt from a state dict after 3 steps (a resumed run) ends bit-identical to one that never
    stopped, its step count included."""
    def weights(n: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(n)
        return [torch.randn(4, 2, generator=g), torch.randn(3, generator=g)]

    block = EMABlock(enabled=True, decay=0.9, every=2)
    params = [torch.nn.Parameter(t) for t in weights(0)]
    straight = EMA(params, block)
    first = EMA(params, block)
    for n in range(1, 8):
        with torch.no_grad():
            for p, t in zip(params, weights(n)):
                p.copy_(t)
        straight.step()
        if n <= 3:
            first.step()
            if n == 3:
                resumed = EMA(params, block)
                resumed.load_state_dict(first.state_dict())
        else:
            resumed.step()
    assert resumed.steps == straight.steps == 7
    assert all(torch.equal(a, b) for a, b in zip(resumed.average, straight.average))
    with pytest.raises(ValueError, match="EMA state does not fit"):
        EMA(params[:1], block).load_state_dict(straight.state_dict())


@pytest.mark.parametrize(("block", "key"), [({"decay": 1.0}, "decay"), ({"decay": -0.1}, "decay"),
                                            ({"every": 0}, "every"), ({"rate": 0.9}, "rate")])
def test_bad_ema_config_names_the_key(block, key):
    with pytest.raises(ValidationError, match=key):
        EMABlock(**block)
