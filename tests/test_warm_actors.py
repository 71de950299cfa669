"""Warm reward actors (tn_ray/scoring/warm_actors.py): a pool that keeps its actors warm gives them back at
shutdown and the next pool of the same key borrows them, loaded, instead of starting its own."""
from __future__ import annotations

import time

import numpy as np
import pytest

from tn_ray.config import ScoringConfig
from tn_ray.scoring import warm_actors
from tn_ray.scoring.warm_actors import WarmActorCache


def test_a_second_pool_borrows_the_first_pools_loaded_actors_and_reserves_no_cpu(ray_session):
    from tn_ray.scoring.workers import RewardPool

    cfg = ScoringConfig(keep_warm=True, cpus_per_actor=0.5, text_batch_size=7)  # a key no other test uses
    images = [np.full((16, 16, 3), v, np.uint8) for v in (0, 128, 255)]
    texts = [["a dog", "a cat"]] * 3
    before = ray_session.get(warm_actors.cache().state.remote())["started"]
    first = RewardPool("clip:tiny", cfg)
    try:
        rows = first.score(images, texts)
        ids = [a._actor_id.hex() for a in first.actors]
        cpus = ray_session.available_resources().get("CPU", 0)
    finally:
        first.shutdown()
    second = RewardPool("clip:tiny", cfg)
    try:
        again = second.score(images, texts)
        stats = ray_session.get(second.actors[0].stats.remote())
        assert [a._actor_id.hex() for a in second.actors] == ids
    finally:
        second.shutdown()
    state = ray_session.get(warm_actors.cache().state.remote())
    assert state["started"] == before + 1  # one actor started for both pools
    assert stats["images_encoded"] == 6  # the same loaded model scored both pools' images
    np.testing.assert_array_equal(np.array(rows), np.array(again))
    assert cpus == pytest.approx(ray_session.cluster_resources()["CPU"])  # a warm actor reserves no CPU
    assert ("clip:tiny|text_batch=7|actors=1|num_cpus=0,num_gpus=0", 0) in state["keys"]


def test_a_cold_pool_kills_its_actors_and_learned_heads_are_never_kept(ray_session, monkeypatch):
    from tn_ray.scoring.workers import RewardPool

    monkeypatch.setenv(warm_actors.ENV, "1")
    assert warm_actors.enabled("clip:tiny", ScoringConfig()) and not warm_actors.enabled("clip:tiny", ScoringConfig(
        keep_warm=False))
    assert not warm_actors.enabled("learned:/tmp/head.pt", ScoringConfig(keep_warm=True))
    monkeypatch.setenv(warm_actors.ENV, "0")
    assert not warm_actors.enabled("clip:tiny", ScoringConfig()) and warm_actors.enabled("clip:tiny", ScoringConfig(
        keep_warm=True))
    pool = RewardPool("clip:tiny", ScoringConfig(keep_warm=False, cpus_per_actor=0.25))
    actor = pool.actors[0]
    ray_session.get(actor.stats.remote())
    pool.shutdown()
    deadline = time.monotonic() + 60
    with pytest.raises(ray_session.exceptions.RayActorError):  # ray.kill is asynchronous: a call may still get in
        while time.monotonic() < deadline:
            ray_session.get(actor.stats.remote())
            time.sleep(0.5)


def test_the_cache_evicts_the_least_recently_borrowed_key_with_no_loan_out(monkeypatch):
    killed = []
    monkeypatch.setattr("ray.kill", lambda actor, no_restart=True: killed.append(actor))
    cache = WarmActorCache(max_actors=3)
    a = cache.borrow("a", lambda: ["a0", "a1"])
    cache.give_back("a")
    cache.borrow("b", lambda: ["b0"])  # 3 actors: at the limit, nothing evicted
    assert killed == [] and a == ["a0", "a1"]
    cache.borrow("a", lambda: pytest.fail("a is warm"))  # a borrowed again: b is now the least recent
    cache.give_back("b")
    cache.borrow("c", lambda: ["c0"])  # 4 > 3: b (idle, least recent) goes; a is on loan
    assert killed == ["b0"] and [k for k, _ in cache.state()["keys"]] == ["a", "c"]
    cache.borrow("d", lambda: ["d0"])  # 4 > 3, but a and c are on loan: kept beyond the limit
    assert killed == ["b0"] and cache.state()["started"] == 5
    cache.give_back("a")  # given back: a is the least recent idle key, so it goes
    assert killed == ["b0", "a0", "a1"] and [k for k, _ in cache.state()["keys"]] == ["c", "d"]
    cache.give_back("c")
    cache.give_back("c")  # a second give-back of one loan does nothing more
    assert cache.state()["keys"] == [("c", 0), ("d", 1)]
    assert cache.clear() == 1 and killed[-1] == "c0" and cache.state()["keys"] == [("d", 1)]
