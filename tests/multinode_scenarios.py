"""Multi-node scenarios on one machine (run as a subprocess by tests/test_multinode.py).

Ray's own test-cluster utility starts a head and worker nodes that each declare one GPU;
the reward code then runs on the CPU of this machine. Prints one JSON line with findings.
Usage: python tests/multinode_scenarios.py placement|node_loss|bestofn_node_loss OUT_DIR
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time

import numpy as np
import pandas as pd

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def items(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    prompts = ["a photo of one dog", "a photo of two cats", "a photo of three birds"]
    return pd.DataFrame(
        {
            "set": "s",
            "prompt": [prompts[i % 3] for i in range(n)],
            "image_id": [f"{i}.png" for i in range(n)],
            "image_key": [f"s/{i}.png" for i in range(n)],
            "image": [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(n)],
            "texts": [
                [prompts[i % 3], *[p for p in prompts if p != prompts[i % 3]], "a photo of a truck"] for i in range(n)
            ],
        }
    )


def reference(df: pd.DataFrame) -> np.ndarray:
    from PIL import Image

    from tn_ray.rewards import build

    model = build("clip:tiny")
    return np.stack(model.score_rows([Image.fromarray(a) for a in df["image"]], list(df["texts"])))


def bestofn_node_loss(cluster, workers, out: str) -> dict:
    """Best-of-n (tiny pipeline, 3 prompts x 16 samples) while a GPU node is lost mid-generation."""
    import pandas as pd

    from tn_ray.config import RayConfig
    from tn_ray.experiments.bestofn import BestOfNConfig, run

    report: dict = {}
    victim = workers[2]

    def kill_when_started():
        manifest = os.path.join(out, "run", "generation", "manifest")
        while not (os.path.isdir(manifest) and any(f.startswith("part-") for f in os.listdir(manifest))):
            time.sleep(0.2)
        report["removed_node"] = victim.node_id
        report["manifest_parts_before_loss"] = sum(f.startswith("part-") for f in os.listdir(manifest))
        cluster.remove_node(victim, allow_graceful=False)

    threading.Thread(target=kill_when_started, daemon=True).start()
    prompts = ["a photo of one red circle", "a photo of two blue squares", "a photo of three green circles"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "contrast.json"), "w") as f:
        json.dump({p: [q for q in prompts if q != p] for p in prompts}, f)
    cfg = BestOfNConfig.model_validate(
        {
            "out": os.path.join(out, "run"),
            "prompts": prompts,
            "contrast": os.path.join(out, "contrast.json"),
            "pools": [4, 16],
            "top_k": [1],
            "models": ["clip:tiny"],
            "grids": False,
            "human_eval": None,
            "generation": {
                "pipeline": "tiny",
                "num_inference_steps": 2,
                "height": 32,
                "width": 32,
                "pipeline_batch_size": 4,
                "batch_size": 4,
            },
            "scoring": {"batch_size": 8},
            "ray": RayConfig(address="auto").model_dump(),
        }
    )
    paths = run(cfg)
    manifest = pd.concat(
        [
            pd.read_parquet(os.path.join(out, "run", "generation", "manifest", f))
            for f in os.listdir(os.path.join(out, "run", "generation", "manifest"))
            if f.startswith("part-")
        ]
    )
    pairs = list(zip(manifest["prompt_id"], manifest["sample"]))
    report["images_expected"] = 3 * 16
    report["manifest_rows"] = len(pairs)
    report["manifest_unique"] = len(set(pairs))
    sel = pd.read_parquet(paths["selections"])
    report["selection_rows"] = len(sel)
    report["gpu_nodes"] = sorted(w.node_id for w in workers)
    return report


def main(scenario: str, out: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from tn_ray.config import ScoringConfig
    from tn_ray.scoring.batch_scoring import score_matrices
    from tn_ray.scoring.cache import RewardCache

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    report: dict = {"nodes": len(ray.nodes()), "cluster_gpus": ray.cluster_resources().get("GPU", 0)}
    if scenario == "bestofn_node_loss":
        os.environ["RAY_ADDRESS"] = cluster.address
        report.update(bestofn_node_loss(cluster, workers, out))
        print("RESULT " + json.dumps(report), flush=True)
        ray.shutdown()
        cluster.shutdown()
        return
    df = items(60 if scenario == "placement" else 240)
    cfg = ScoringConfig(batch_size=4)
    if scenario == "node_loss":
        victim = workers[1]  # lost without replacement: the run must finish on the other two

        def kill_when_started():
            cache_dir = os.path.join(out, "cache")
            while not any(f.startswith("part-") for _, _, fs in os.walk(cache_dir) for f in fs):
                time.sleep(0.2)
            report["removed_node"] = victim.node_id
            cluster.remove_node(victim, allow_graceful=False)
            report["removed_node_after_parts"] = sum(
                f.startswith("part-") for _, _, fs in os.walk(cache_dir) for f in fs
            )

        threading.Thread(target=kill_when_started, daemon=True).start()
    matrices = score_matrices(df, ["clip:tiny"], os.path.join(out, "cache"), cfg)
    m = matrices["clip:tiny"]
    # the GCS actor table (the state API would need the dashboard, which ray[data,tune] lacks)
    actors = [a for a in ray._private.state.actors().values() if "RewardWorker" in a["ActorClassName"]]
    report["actor_nodes"] = sorted({a["Address"]["NodeID"] for a in actors})
    report["actors"] = len(actors)
    report["gpu_nodes"] = sorted(w.node_id for w in workers)
    cache = RewardCache(os.path.join(out, "cache"), "clip:tiny")
    frame = pd.concat([cache.store.read_table(p).to_pandas() for p in cache.parts()])
    report["rows_expected"] = int(df["texts"].map(len).sum())
    report["rows_stored_unique"] = int(len(frame.drop_duplicates(["image_key", "text"])))
    report["rows_stored"] = int(len(frame))
    ref = reference(df)
    report["max_abs_diff_vs_single_process"] = float(np.nanmax(np.abs(m.values - ref)))
    print("RESULT " + json.dumps(report), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
