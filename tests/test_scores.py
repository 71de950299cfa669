"""Score matrices on Parquet and the reward cache."""
import numpy as np
import pandas as pd
import pytest

from tn_ray.scoring.cache import RewardCache
from tn_ray.scoring.matrix import ScoreMatrix, model_slug


def small_matrix():
    keys = pd.DataFrame({"set": ["a", "a", "b"], "prompt": ["p", "p", "q"], "image_id": ["1.jpg", "2.jpg", "1.jpg"]})
    texts = [["p", "p1", "p2"], ["p", "p1", "p2"], ["q"]]
    return ScoreMatrix.from_rows("clip:tiny", keys, texts, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0]])


def test_padding_and_roundtrip(tmp_path):
    m = small_matrix()
    assert m.values.shape == (3, 3) and np.isnan(m.values[2, 1:]).all()
    np.testing.assert_array_equal(m.raw, [1, 4, 7])
    back = ScoreMatrix.load(m.save(tmp_path / "m.parquet"))
    assert back.model == "clip:tiny" and back.texts == m.texts
    np.testing.assert_array_equal(back.values, m.values)
    pd.testing.assert_frame_equal(back.keys, m.keys)


def test_align_orders_rows_by_keys():
    m = small_matrix()
    keys = m.keys.iloc[[2, 0]]
    a = m.align(keys)
    np.testing.assert_array_equal(a.raw, [7, 1])
    with pytest.raises(KeyError, match="1 rows"):
        m.align(pd.DataFrame({"set": ["c"], "prompt": ["p"], "image_id": ["x"]}))


def test_cache_missing_lookup_and_persistence(tmp_path):
    cache = RewardCache(tmp_path, "clip:tiny")
    keys, texts = ["i1", "i2"], [["a", "b"], ["a", "c"]]
    assert cache.missing(keys, texts) == texts
    cache.append(pd.DataFrame({"image_key": ["i1", "i1", "i2"], "text": ["a", "b", "a"], "score": [1.0, 2.0, 3.0]}))
    assert cache.missing(keys, texts) == [[], ["c"]]
    cache.append(pd.DataFrame({"image_key": ["i2"], "text": ["c"], "score": [4.0]}))
    again = RewardCache(tmp_path, "clip:tiny")  # a new process sees the same rewards
    assert again.missing(keys, texts) == [[], []]
    assert [list(v) for v in again.lookup(keys, texts)] == [[1.0, 2.0], [3.0, 4.0]]
    again.compact()
    assert len(again.parts()) == 1
    assert [list(v) for v in RewardCache(tmp_path, "clip:tiny").lookup(keys, texts)] == [[1.0, 2.0], [3.0, 4.0]]
    with pytest.raises(KeyError, match="1 rewards of clip:tiny are not in the cache"):
        again.lookup(["i3"], [["a"]])


def test_cache_is_per_model_and_ignores_half_written_files(tmp_path):
    a, b = RewardCache(tmp_path, "clip:tiny"), RewardCache(tmp_path, "pickscore:tiny")
    a.append(pd.DataFrame({"image_key": ["i"], "text": ["t"], "score": [1.0]}))
    (tmp_path / a.slug / ".part-x.parquet.123.tmp").write_bytes(b"garbage from a crash")
    assert b.missing(["i"], [["t"]]) == [["t"]]
    assert a.missing(["i"], [["t"]]) == [[]]
    assert model_slug("clip:tiny") != model_slug("clip_tiny")
