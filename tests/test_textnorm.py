"""TextNorm and ensembles: properties of eq. 1-3 and agreement with an independent computation."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tn_ray.textnorm.columns import EnsembleSpec, MultiRewardSpec, SetParams, combine, multi_reward, reward_columns
from tn_ray.textnorm.equations import ensemble, log_textnorm, textnorm

rewards = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
matrices = st.integers(1, 6).flatmap(
    lambda n: st.integers(1, 9).flatmap(lambda m: arrays(np.float64, (n, m), elements=rewards)))
taus = st.floats(1e-2, 1e2)


def reference(row: list[float], tau: float) -> float:
    """Eq. 1 written out with Python floats (shifted by the max to stay finite)."""
    z = [x / tau for x in row]
    top = max(z)
    return math.exp(z[0] - top) / sum(math.exp(x - top) for x in z)


@given(matrices, taus)
def test_in_unit_interval_and_matches_reference(s, tau):
    out = textnorm(s, tau)
    assert out.shape == (s.shape[0],)
    assert np.all(out <= 1) and np.all(out >= 0)
    representable = (s.max(axis=1) - s[:, 0]) / tau < 700  # exp(-745) underflows float64
    assert np.all(out[representable] > 0)
    np.testing.assert_allclose(np.exp(log_textnorm(s, tau)), out, rtol=1e-9, atol=1e-300)
    assert np.all(np.isfinite(log_textnorm(s, tau)))
    np.testing.assert_allclose(out, [reference(list(r), tau) for r in s], rtol=1e-9, atol=1e-300)


@given(matrices, taus, st.floats(-1e4, 1e4))
def test_adding_a_constant_to_a_row_changes_nothing(s, tau, c):
    np.testing.assert_allclose(textnorm(s + c, tau), textnorm(s, tau), rtol=1e-6, atol=1e-12)


@given(matrices)
def test_infinite_temperature_gives_uniform(s):
    np.testing.assert_allclose(textnorm(s, 1e12), 1.0 / s.shape[1], rtol=1e-6)


@given(arrays(np.float64, (5, 1), elements=rewards), taus)
def test_no_contrastive_prompt_gives_one(s, tau):
    np.testing.assert_array_equal(textnorm(s, tau), 1.0)


@given(matrices, taus)
def test_nan_padding_equals_the_shorter_row(s, tau):
    padded = np.concatenate([s, np.full((s.shape[0], 3), np.nan)], axis=1)
    np.testing.assert_allclose(textnorm(padded, tau), textnorm(s, tau), rtol=1e-12)


def test_stable_for_huge_rewards():
    s = np.array([[1e6, 1e6 - 1.0, 1e6 - 2.0], [-1e6, -1e6, -1e6]])
    out = textnorm(s, 1.0)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[1], 1 / 3)
    np.testing.assert_allclose(out[0], 1 / (1 + math.exp(-1) + math.exp(-2)))


@given(st.integers(2, 5).flatmap(lambda k: arrays(np.float64, (k, 7), elements=st.floats(0, 1))))
@settings(max_examples=50)
def test_ensembles(r):
    np.testing.assert_allclose(ensemble(r, "uncertainty", 0.0), ensemble(r, "mean"))
    np.testing.assert_allclose(ensemble(r, "mean"), r.mean(axis=0))
    var = ((r - r.mean(axis=0)) ** 2).mean(axis=0)
    np.testing.assert_allclose(ensemble(r, "uncertainty", 2.5), r.mean(axis=0) - 2.5 * var)
    assert np.all(ensemble(r, "uncertainty", 1.0) <= ensemble(r, "mean") + 1e-12)


def test_textnorm_ensemble_uses_each_models_tau():
    a, b = np.array([[2.0, 1.0]]), np.array([[0.0, 3.0]])
    got = combine({"a": a, "b": b}, ["a", "b"], [1.0, 2.0], kind="mean")
    np.testing.assert_allclose(got, [(reference([2, 1], 1.0) + reference([0, 3], 2.0)) / 2])


def test_reward_columns_equal_an_independent_computation():
    """Every column of the one reward-columns function, per group, against hand formulas."""
    a = np.array([[2.0, 1.0, np.nan], [0.5, 0.0, 3.0], [1.0, 1.0, 1.0]])
    b = np.array([[0.0, 3.0, 1.0], [1.0, 1.0, np.nan], [2.0, 0.0, 0.0]])
    params = {"g1": SetParams(tau=1.0, tau_per_model={"b": 2.0}, lam=0.5), "default": SetParams(tau=0.5, lam=2.0)}
    ens = [EnsembleSpec(name="m", members=["a", "b"]), EnsembleSpec(name="u", members=["a", "b"], kind="uncertainty"),
           EnsembleSpec(name="r", members=["a", "b"], textnorm=False)]
    groups = np.array(["g1", "g2", "g1"])
    got = reward_columns({"a": a, "b": b}, params, ens, groups=groups)
    assert list(got) == ["a", "b", "textnorm(a)", "textnorm(b)", "m", "u", "r"]
    for i, g in enumerate(groups):
        p = params.get(g, params["default"])
        ta = reference([x for x in a[i] if not np.isnan(x)], p.tau_for("a"))
        tb = reference([x for x in b[i] if not np.isnan(x)], p.tau_for("b"))
        assert got["a"][i] == a[i, 0] and got["b"][i] == b[i, 0]
        np.testing.assert_allclose([got["textnorm(a)"][i], got["textnorm(b)"][i]], [ta, tb], rtol=1e-12)
        np.testing.assert_allclose(got["m"][i], (ta + tb) / 2, rtol=1e-12)
        np.testing.assert_allclose(got["u"][i], (ta + tb) / 2 - p.lam * ((ta - tb) / 2) ** 2, rtol=1e-12)
        np.testing.assert_allclose(got["r"][i], (a[i, 0] + b[i, 0]) / 2, rtol=1e-12)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan")])
def test_bad_tau_is_named(tau):
    with pytest.raises(ValueError, match="tau"):
        textnorm(np.zeros((2, 3)), tau)


def test_bad_ensemble_kind_and_lambda():
    with pytest.raises(ValueError, match="unknown ensemble kind 'median'"):
        ensemble(np.zeros((2, 3)), "median")
    with pytest.raises(ValueError, match="lambda"):
        ensemble(np.zeros((2, 3)), "uncertainty", -1)


# --- no underflow ties (issue 21.5): rank and compute metrics from the log form ---------------


def _separated(n: int = 12) -> np.ndarray:
    """x0 rewards 0..n-1 (one apart), every contrastive reward 50: at tau = 1e-3 each r_X is
    exp(-(50 - i) / 1e-3), far below float64's smallest number."""
    return np.column_stack([np.arange(n, dtype=float), np.full((n, 3), 50.0)])


def test_small_tau_underflows_in_reward_units_but_not_in_the_ranking_form():
    s = _separated()
    assert np.all(textnorm(s, 1e-3) == 0.0)  # what ranking by the reward itself would tie
    cols = reward_columns({"clip": s}, SetParams(tau=1e-3), ranking=True)
    assert len(np.unique(cols["textnorm(clip)"])) == len(s)
    np.testing.assert_allclose(cols["textnorm(clip)"], (s[:, 0] - 50.0) / 1e-3 - np.log(3.0), rtol=1e-12)


def test_metrics_at_tau_1e3_equal_those_at_tau_1_when_the_order_is_the_same():
    import pandas as pd

    from tn_ray.analysis.metrics import per_prompt

    s = _separated()
    binary = np.array([0, 1, 0, 0, 1, 0, 1, 1, 0, 1, 1, 1])
    frame = pd.DataFrame({"set": "counting", "prompt": "p", "binary": binary, "fine": binary * 0.8 + 0.1})
    tables = {}
    for tau in (1.0, 1e-3):
        cols = reward_columns({"clip": s, "pickscore": s + 1.0}, SetParams(tau=tau),
                              [EnsembleSpec(name="mean", members=["clip", "pickscore"])], ranking=True)
        tables[tau] = per_prompt(frame.assign(**cols), ["textnorm(clip)", "mean"]).set_index("reward")
    assert tables[1e-3].loc["textnorm(clip)", "n_tied"] == 0
    for metric in ("auroc", "auprc", "ap@5", "ap@10", "spearman", "kendall"):
        assert tables[1e-3].loc["textnorm(clip)", metric] == pytest.approx(tables[1.0].loc["textnorm(clip)", metric])
        assert tables[1e-3].loc["mean", metric] == pytest.approx(tables[1.0].loc["mean", metric])
    # the same scores in reward units tie at 0: AUROC 0.5, which is what the log form avoids
    tied = per_prompt(frame.assign(r=textnorm(s, 1e-3)), ["r"]).iloc[0]
    assert tied["auroc"] == 0.5 and tied["n_tied"] == len(s)


@settings(deadline=None)
@given(matrices, matrices, taus)
def test_log_mean_ensemble_is_the_log_of_the_mean_ensemble(a, b, tau):
    n = min(len(a), len(b))
    values = {"clip": a[:n], "pickscore": b[:n]}
    prob = combine(values, ["clip", "pickscore"], [tau, tau], "mean")
    log = combine(values, ["clip", "pickscore"], [tau, tau], "mean", ranking=True)
    assert np.all(np.isfinite(log))
    ok = prob > 1e-300
    np.testing.assert_allclose(np.exp(log[ok]), prob[ok], rtol=1e-9)


def test_an_ensemble_kind_per_group_equals_each_kind_on_its_rows():
    rng = np.random.default_rng(0)
    values = {"clip": rng.normal(size=(6, 4)), "pickscore": rng.normal(size=(6, 4))}
    groups = ["composition", "counting", "composition", "comprehensive", "counting", "composition"]
    spec = EnsembleSpec(
        name="paper", members=["clip", "pickscore"], kind={"composition": "mean", "default": "uncertainty"}
    )
    got = reward_columns(values, SetParams(tau=0.5, lam=2.0), [spec], groups)["paper"]
    mean = combine(values, ["clip", "pickscore"], [0.5, 0.5], "mean")
    unc = combine(values, ["clip", "pickscore"], [0.5, 0.5], "uncertainty", 2.0)
    expected = np.where(np.array(groups) == "composition", mean, unc)
    np.testing.assert_allclose(got, expected)
    assert not np.allclose(mean, unc)
    with pytest.raises(ValueError, match="default"):
        EnsembleSpec(name="x", members=["clip", "pickscore"], kind={"composition": "mean"})


def test_per_image_temperatures_and_lambdas_equal_rowwise_computation():
    rng = np.random.default_rng(1)
    values = {"a": rng.normal(size=(5, 3)) * 3, "b": rng.normal(size=(5, 3)) * 3}
    taus = np.array([0.1, 1.0, 3.0, 5.0, 10.0])
    lams = np.array([0.0, 0.05, 0.5, 1.0, 0.1])
    got = combine(values, ["a", "b"], [taus, taus], "uncertainty", lams)
    for i in range(5):
        one = combine({k: v[i : i + 1] for k, v in values.items()}, ["a", "b"], [taus[i]] * 2, "uncertainty", lams[i])
        assert got[i] == pytest.approx(one[0], rel=1e-12)


# --- multi-rewards (issue 24 part 4): weighted sums and uncertainty ensembles of reward columns -----------


def _two_models() -> dict[str, np.ndarray]:
    return {"clip:tiny": np.array([[2.0, 1.0, np.nan], [0.5, 0.0, 3.0], [1.0, 1.0, 1.0]]),
            "pickscore:tiny": np.array([[0.0, 3.0, 1.0], [1.0, 1.0, np.nan], [2.0, 0.0, 0.0]])}


def test_multi_rewards_equal_a_hand_computation():
    """Weighted sum (flow_grpo's reward_fn dict: sum of weight x score) and mean - lambda x population
    variance across TextNorm columns, written out row by row; the ranking form keeps reward units."""
    values = _two_models()
    specs = [MultiRewardSpec(name="mix", columns={"textnorm(clip:tiny)": 0.7, "pickscore:tiny": 0.3}),
             MultiRewardSpec(name="cautious", kind="uncertainty",
                             columns=["textnorm(clip:tiny)", "textnorm(pickscore:tiny)"]),
             EnsembleSpec(name="raw", members=["clip:tiny", "pickscore:tiny"], textnorm=False),
             MultiRewardSpec(name="of-ensemble", columns={"raw": 2.0, "clip:tiny": -1.0})]
    params = SetParams(tau=1.0, tau_per_model={"pickscore": 2.0}, lam=0.5)
    got = reward_columns(values, params, specs)
    assert list(got)[-4:] == ["mix", "cautious", "raw", "of-ensemble"]
    a, b = values["clip:tiny"], values["pickscore:tiny"]
    for i in range(3):
        ta = reference([x for x in a[i] if not np.isnan(x)], 1.0)
        tb = reference([x for x in b[i] if not np.isnan(x)], 2.0)
        np.testing.assert_allclose(got["mix"][i], 0.7 * ta + 0.3 * b[i, 0], rtol=1e-12)
        mean = (ta + tb) / 2
        var = ((ta - mean) ** 2 + (tb - mean) ** 2) / 2  # ddof = 0, as eq. 3's ensemble
        np.testing.assert_allclose(got["cautious"][i], mean - 0.5 * var, rtol=1e-12)
        np.testing.assert_allclose(got["of-ensemble"][i], 2.0 * (a[i, 0] + b[i, 0]) / 2 - a[i, 0], rtol=1e-12)
    ranked = reward_columns(values, params, specs, ranking=True)
    np.testing.assert_allclose(ranked["mix"], got["mix"], rtol=1e-12)
    np.testing.assert_allclose(ranked["cautious"], got["cautious"], rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, (3, 5), elements=st.floats(-10, 10)), st.floats(0, 10), st.floats(-5, 5))
def test_multi_reward_invariants(cols, lam, c):
    """Weighted: linear in the weights; uncertainty: <= the mean, equal to it at lambda 0 and for equal
    columns, and shifting every column by c shifts it by c."""
    w = [0.5, -1.0, 2.0]
    np.testing.assert_allclose(multi_reward(cols, [2 * x for x in w]), 2 * multi_reward(cols, w), atol=1e-9)
    unc = multi_reward(cols, w, "uncertainty", lam)
    assert np.all(unc <= cols.mean(axis=0) + 1e-9)
    np.testing.assert_allclose(multi_reward(cols, w, "uncertainty", 0.0), cols.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(multi_reward(cols + c, w, "uncertainty", lam), unc + c, atol=1e-6)
    same = np.repeat(cols[:1], 3, axis=0)
    np.testing.assert_allclose(multi_reward(same, w, "uncertainty", lam), cols[0], atol=1e-9)


@pytest.mark.parametrize(("spec", "match"), [
    ({"name": "u", "kind": "uncertainty", "columns": ["textnorm(clip:tiny)", "pickscore:tiny"]},
     "'pickscore:tiny' is not a TextNorm column"),
    ({"name": "u", "kind": "uncertainty", "columns": ["textnorm(clip:tiny)", "mean"]}, "'mean' is not a TextNorm"),
    ({"name": "u", "kind": "uncertainty", "columns": {"textnorm(clip:tiny)": 1.0, "textnorm(pickscore:tiny)": 1.0}},
     "kind uncertainty needs a list of two or more columns"),
    ({"name": "u", "kind": "uncertainty", "columns": ["textnorm(clip:tiny)"]}, "two or more"),
    ({"name": "u", "columns": ["clip:tiny", "pickscore:tiny"]}, "kind weighted needs columns as a map"),
    ({"name": "u", "columns": {"imagereward": 1.0}}, "'imagereward' is not a reward column"),
    ({"name": "u", "kind": "uncertainty", "columns": ["textnorm(clip:tiny)", "textnorm(clip:tiny)"]}, "listed twice"),
    ({"name": "u", "columns": {"textnorm(nosuchmodel)": 1.0}}, "multi-reward 'u'"),
    ({"name": "u", "columns": {"other": 1.0}}, "'other' is not a reward column"),
    ({"name": "clip:tiny", "columns": {"textnorm(clip:tiny)": 1.0}}, "clashes"),
    ({"name": "u", "columns": {}}, "columns"),
])
def test_multi_reward_config_errors_name_the_column(spec, match):
    from pydantic import ValidationError

    from tn_ray.textnorm.columns import RewardConfig

    ens = [{"name": "mean", "members": ["clip:tiny", "pickscore:tiny"]}, spec,
           {"name": "other", "columns": {"clip:tiny": 1.0}}]
    with pytest.raises(ValidationError, match=match):
        RewardConfig(models=["clip:tiny", "pickscore:tiny"], use=spec["name"], ensembles=ens)


def test_a_multi_reward_is_a_reward_config_column():
    """`use: <multi-reward>` in a reward block: the contrast and group flags
    through its columns, and `column` equal to the hand combination."""
    from tn_ray.textnorm.columns import RewardConfig, column_models, specs_for

    rc = RewardConfig(models=["clip:tiny", "pickscore:tiny"], use="mix",
                      ensembles=[{"name": "mix", "columns": {"textnorm(clip:tiny)": 0.7, "pickscore:tiny": 0.3}}])
    assert rc.ensembles[0].columns == {"textnorm(clip:tiny)": 0.7, "pickscore:tiny": 0.3}
    assert rc.needs_contrast and not rc.per_group
    assert column_models("mix", rc.models, rc.ensembles) == {"clip:tiny": True, "pickscore:tiny": False}
    values = _two_models()
    tn = reward_columns(values, rc.textnorm)
    hand = 0.7 * tn["textnorm(clip:tiny)"] + 0.3 * values["pickscore:tiny"][:, 0]
    np.testing.assert_allclose(rc.column(values), hand)
    raw = RewardConfig(models=["clip:tiny", "pickscore:tiny"], use="raw-mix",
                       ensembles=[{"name": "raw-mix", "columns": {"clip:tiny": 1.0, "pickscore:tiny": 1.0}}])
    assert not raw.needs_contrast
    paper = RewardConfig(models=["clip:tiny", "pickscore:tiny"], use="mix", ensembles=[
        {"name": "paper", "members": ["clip:tiny", "pickscore:tiny"], "kind": {"composition": "mean",
                                                                             "default": "uncertainty"}},
        {"name": "mix", "columns": {"paper": 1.0, "clip:tiny": 0.1}}])
    assert paper.per_group
    assert [e.name for e in specs_for(["mix"], paper.ensembles)] == ["paper", "mix"]
