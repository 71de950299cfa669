"""AP@k as the benchmark computes it: sklearn's average precision on the top k images."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score

from tn_ray.analysis import metrics
from tn_ray.sweep import fast_metrics


def sklearn_on_top_k(labels, scores, k):
    """Independent reference: the k highest scores (ties at the cut by image order), then sklearn."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
    top_labels = [labels[i] for i in order]
    if not any(top_labels):
        return 0.0
    return average_precision_score(top_labels, [scores[i] for i in order])


prompt = st.integers(1, 40).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 1), min_size=n, max_size=n),
    st.one_of(st.lists(st.sampled_from([-1.0, 0.0, 0.5, 2.0]), min_size=n, max_size=n),  # many ties
              st.lists(st.floats(-5, 5, allow_nan=False), min_size=n, max_size=n, unique=True))))


@settings(max_examples=200, deadline=None)
@given(prompt, st.sampled_from([1, 2, 5, 10, 25]))
def test_ap_at_k_is_sklearn_average_precision_on_the_top_k(case, k):
    labels, scores = case
    assert metrics.ap_at_k(np.array(labels), np.array(scores), k) == pytest.approx(
        sklearn_on_top_k(labels, scores, k), abs=1e-12
    )


@settings(max_examples=60, deadline=None)
@given(st.lists(prompt, min_size=1, max_size=6), st.sampled_from([1, 5, 10, 25]))
def test_vectorised_ap_at_k_equals_sklearn_on_the_top_k(cases, k):
    codes = np.concatenate([[i] * len(c[0]) for i, c in enumerate(cases)])
    labels = np.concatenate([c[0] for c in cases]).astype(float)
    scores = np.concatenate([c[1] for c in cases]).astype(float)
    index = fast_metrics.group_index(codes)
    got = fast_metrics.ap_at_k(fast_metrics.gather(scores, index), fast_metrics.gather(labels, index, 0), index >= 0, k)
    for i, (lab, sc) in enumerate(cases):
        assert got[i] == pytest.approx(sklearn_on_top_k(lab, sc, k), abs=1e-12)


def test_ap_at_k_by_hand():
    # ranking good, bad, good, bad, bad: top 5 holds 2 good: (1/1 + 2/3) / 2
    labels, scores = np.array([1, 0, 1, 0, 0, 1]), np.array([6, 5, 4, 3, 2, 1.0])
    assert metrics.ap_at_k(labels, scores, 5) == pytest.approx((1 + 2 / 3) / 2)
    assert metrics.ap_at_k(labels, scores, 1) == 1.0
    assert metrics.ap_at_k(np.array([0, 0, 1]), np.array([3, 2, 1.0]), 2) == 0.0  # no good image in the top 2
    # a tie between the first two (one good, one bad) is one threshold: precision 1/2 there
    assert metrics.ap_at_k(np.array([0, 1, 0]), np.array([1.0, 1.0, 0.0]), 3) == pytest.approx(0.5)


def test_per_set_counts_the_prompts_its_rank_correlations_average():
    import pandas as pd

    from tn_ray.analysis.metrics import per_prompt, per_set

    frame = pd.DataFrame(
        {
            "set": "s",
            "prompt": ["a"] * 4 + ["b"] * 4 + ["c"] * 4,
            "binary": [0, 1, 0, 1] * 3,
            "fine": [0.0, 1.0, 0.2, 0.9] * 3,
            "r": [1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 4.0, 3.0, 2.0, 1.0],
        }
    )
    table = per_prompt(frame, ["r"])
    row = per_set(table).iloc[0]
    assert row["n_prompts"] == 3 and row["n_corr"] == 2  # prompt b's constant rewards: no Spearman / Kendall
    assert row["spearman"] == pytest.approx(table["spearman"].dropna().mean())
    assert row["n_tied"] == 4
