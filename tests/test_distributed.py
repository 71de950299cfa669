"""Ray wiring: long-lived reward actors, actor sizing, and the Data pipeline's API use."""
import os
import warnings

import numpy as np
import pandas as pd
from PIL import Image

from tn_ray import cluster
from tn_ray.config import ScoringConfig
from tn_ray.rewards import build
from tn_ray.scoring import workers as distributed
from tn_ray.scoring.cache import RewardCache


def arrays(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(n)]


def test_actor_sizing_follows_the_gpus(monkeypatch, ray_session):
    """One sizing rule for every actor pool (tn_ray.cluster.actor_pool): reward models and generators."""
    monkeypatch.setattr(cluster, "cluster_gpus", lambda: 4.0)
    assert distributed.reward_pool_size(ScoringConfig()) == (4, {"num_gpus": 1.0})
    assert distributed.reward_pool_size(ScoringConfig(gpus_per_actor=0.5))[0] == 8
    assert distributed.reward_pool_size(ScoringConfig(), max_actors=3)[0] == 3  # never more actors than work units
    monkeypatch.setattr(cluster, "cluster_gpus", lambda: 0.0)
    assert distributed.reward_pool_size(ScoringConfig()) == (1, {"num_gpus": 0, "num_cpus": 1.0})
    # generators fill the CPUs of a CPU-only cluster (2 in the test session), one per cpus_per_actor
    assert cluster.actor_pool(None, 1.0, 1.0, fill_cpus=True) == (2, {"num_gpus": 0, "num_cpus": 1.0})


def test_long_lived_actors_score_like_the_local_model(ray_session):
    pool = distributed.RewardPool("clip:tiny", ScoringConfig(num_actors=1, keep_warm=False))  # counts a fresh actor
    ims = arrays(5)
    texts = [["a dog", "two dogs"]] * 3 + [["a cat"]] * 2
    try:
        first = pool.score(ims, texts, chunk=2)
        again = pool.score(ims, texts, chunk=2)
        stats = ray_session.get(pool.actors[0].stats.remote())
    finally:
        pool.shutdown()
    local = build("clip:tiny").score_rows([Image.fromarray(a) for a in ims], texts)
    for a, b, c in zip(first, again, local):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(a, b)
    assert stats == {"images_encoded": 10, "texts_encoded": 3}  # model loaded once, texts cached


def test_reward_pool_submit_returns_futures_and_collect_keeps_submit_order(ray_session):
    """submit returns at once with futures, parts spread over both actors; collect gives each submission's
    rows in submit order (equal to the model scored in this process), then nothing is pending."""
    pool = distributed.RewardPool("clip:tiny", ScoringConfig(num_actors=2, cpus_per_actor=0.5, keep_warm=False))
    ims = arrays(5, seed=1)
    texts = [["a dog", "two dogs"]] * 3 + [["a cat"]] * 2
    try:
        first = pool.submit(ims[:3], texts[:3])  # split evenly over the 2 actors: parts of 2 and 1
        second = pool.submit(ims[3:], texts[3:], chunk=1)
        assert len(first) == 2 and len(second) == 2
        assert all(isinstance(f, ray_session.ObjectRef) for f in first + second)
        rows = pool.collect()
        assert pool.collect() == []
        calls = [ray_session.get(a.stats.remote())["images_encoded"] for a in pool.actors]
    finally:
        pool.shutdown()
    assert len(rows) == 2 and [len(r) for r in rows] == [3, 2]
    assert sorted(calls) == [2, 3]  # round-robin across submissions: 2 + 1 then 1 + 1
    local = build("clip:tiny").score_rows([Image.fromarray(a) for a in ims], texts)
    for a, c in zip(rows[0] + rows[1], local):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)


def test_pipeline_scores_arrays_and_warns_nothing_of_ours(ray_session, tmp_path):
    ims = arrays(6, seed=3)
    req = pd.DataFrame({"image_key": [f"k{i}" for i in range(6)], "image": ims,
                        "texts": [["a photo of one cat", "two cats", "three cats"]] * 6})
    cache = RewardCache(tmp_path, "clip:tiny")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        n = distributed.score_into_cache(req, "clip:tiny", cache, ScoringConfig(batch_size=4))
    assert n == 18
    ours = [w for w in caught if issubclass(w.category, DeprecationWarning) and "ray/data/context.py" not in w.filename]
    assert not ours, [str(w.message) for w in ours]
    got = np.stack(cache.lookup(list(req["image_key"]), list(req["texts"])))
    ref = np.stack(build("clip:tiny").score_rows([Image.fromarray(a) for a in ims], list(req["texts"])))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert distributed.score_into_cache(req, "clip:tiny", cache) == 0


def test_a_training_run_survives_another_ray_instance_with_a_dashboard_on_the_machine(ray_session, tmp_path):
    """Ray Train's placement-group cleaner asks Ray's state API every second whether the run's controller lives.
    Our local Ray has no dashboard; the state API would then find another instance's dashboard on this machine
    (localhost:8265), see no controller of ours there and remove our run's placement group: the run dies with
    "Destroying worker since its placement group was removed" (measured without init_ray's fix: the same run
    beside the same instance died). init_ray tells the workers there is no state API server (one setting)."""
    import subprocess
    import sys

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tn_ray.cluster import NO_STATE_API

    @ray_session.remote(num_cpus=0)
    def api_server() -> str | None:
        return os.environ.get("RAY_API_SERVER_ADDRESS")

    assert ray_session.get(api_server.remote()) == NO_STATE_API
    assert "RAY_API_SERVER_ADDRESS" not in os.environ  # the driver's own environment is left as it was
    other = subprocess.Popen(
        [sys.executable, "-c", "import ray, time; ray.init(address='local', num_cpus=1, include_dashboard=True); "
         "print('up', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert other.stdout.readline().strip() == "up"

        def loop(config):
            import time

            import ray.train

            time.sleep(8)  # eight rounds of the cleaner's check
            ray.train.report({"done": 1})

        result = TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1),  # fit raises if a worker died
                              run_config=RunConfig(storage_path=str(tmp_path), name="beside")).fit()
        assert result.error is None
    finally:
        other.kill()
        other.wait()
