"""Cloud storage: images, reward cache and score matrices on an S3 API (moto on 127.0.0.1)."""
import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tn_ray.data import tia2
from tn_ray.errors import InputError
from tn_ray.experiments.tia2_eval import Tia2EvalConfig, run
from tn_ray.scoring.cache import RewardCache
from tn_ray.scoring.matrix import ScoreMatrix


def test_score_matrix_and_cache_roundtrip_on_s3(s3):
    _, uri = s3
    keys = pd.DataFrame({"set": ["a"], "prompt": ["p"], "image_id": ["1.jpg"]})
    m = ScoreMatrix.from_rows("clip:tiny", keys, [["p", "q"]], [[1.0, 2.0]])
    m.save(uri("run/scores/clip.parquet"))
    np.testing.assert_array_equal(ScoreMatrix.load(uri("run/scores/clip.parquet")).values, m.values)
    cache = RewardCache(uri("run/cache"), "clip:tiny")
    cache.append(pd.DataFrame({"image_key": ["k"], "text": ["t"], "score": [3.0]}))
    assert RewardCache(uri("run/cache"), "clip:tiny").missing(["k", "k2"], [["t"], ["t"]]) == [[], ["t"]]


def test_tia2_eval_reads_images_and_keeps_its_cache_on_s3(s3, tia2_dir, ray_session, tmp_path):
    s3fs, uri = s3
    labels = tia2.load_labels("counting", tia2_dir)
    labels = labels[labels["prompt"] == labels["prompt"].iloc[0]]
    rng = np.random.default_rng(0)
    for name in labels["image_id"]:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
        with s3fs.open_output_stream(f"bucket/tia2/counting/{name}") as f:
            f.write(buf.getvalue())
    cfg = dict(images=uri("tia2"), cache_dir=uri("cache"), sets=["counting"], max_prompts=1, models=["clip:tiny"])
    paths = run(Tia2EvalConfig(out=str(tmp_path / "a"), **cfg))
    assert json.loads(paths["scoring_summary"].read_text())["clip:tiny"]["computed"] > 0
    table = pd.read_parquet(paths["per_prompt"])
    assert len(table) == 2 and table["auroc"].between(0, 1).all()
    # another driver (another out folder) finds every reward in the shared cache
    paths = run(Tia2EvalConfig(out=str(tmp_path / "b"), **cfg))
    assert json.loads(paths["scoring_summary"].read_text())["clip:tiny"]["computed"] == 0
    s3fs.delete_file(f"bucket/tia2/counting/{labels['image_id'].iloc[0]}")
    with pytest.raises(InputError, match="1 of 50 images are missing"):
        run(Tia2EvalConfig(out=str(tmp_path / "c"), **cfg))


def test_sweep_keeps_tune_state_on_s3_and_resumes_from_it(s3, ray_session, tmp_path):
    """Tune's experiment folder (trials, checkpoints, searcher state, summary) on S3; resume reads it."""
    from tn_ray.sweep.config import SweepConfig
    from tn_ray.sweep.runner import run_sweep

    s3fs, uri = s3
    data = {
        "name": "toy-s3",
        "trainable": "toy_regression",
        "options": {"epochs": 2, "samples": 128, "steps_per_epoch": 5},
        "space": {"lr": {"loguniform": [1e-4, 0.1]}},
        "metric": "val_loss",
        "mode": "min",
        "num_samples": 2,
        "max_concurrent_trials": 1,
        "seed": 0,
        "verbose": 0,
        "out": str(tmp_path / "out"),
        "storage_path": uri("sweeps"),
    }
    first = pd.read_csv(run_sweep(SweepConfig.model_validate(data))["trials"])
    assert len(first) == 2
    from pyarrow import fs

    stored = [i.path for i in s3fs.get_file_info(fs.FileSelector("bucket/sweeps", recursive=True))]
    assert any("/toy-s3/trial_" in p and p.endswith("state.pt") for p in stored), stored[:20]  # checkpoints
    assert any("/toy-s3/searcher-state" in p for p in stored)  # the Optuna searcher's state
    assert any(p.endswith("/toy-s3/summary/trials.csv") for p in stored)
    again = pd.read_csv(run_sweep(SweepConfig.model_validate(data), resume=True)["trials"])
    assert len(again) == 2 and set(again["lr"]) == set(first["lr"])  # nothing run twice
