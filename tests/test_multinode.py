"""Several Ray nodes on one machine (ray.cluster_utils.Cluster), nodes declaring one GPU each
while the code runs on the CPU (including a generation actor pool that, with GPUs declared,
must pass an explicit batch size). Each scenario runs in its own process (a driver can join one
Ray cluster only, and the rest of the suite shares the session's local Ray); about 40-60 s each."""
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("multinode_scenarios.py")


def scenario(name: str, tmp_path: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_DEDUP_LOGS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), name, str(tmp_path)], capture_output=True, text=True,
                          timeout=600, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"scenario {name} printed no result (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_one_actor_per_gpu_on_distinct_nodes_same_matrix(tmp_path):
    r = scenario("placement", tmp_path)
    assert r["nodes"] == 4 and r["cluster_gpus"] == 3
    assert r["actors"] == 3
    assert r["actor_nodes"] == r["gpu_nodes"] and len(r["actor_nodes"]) == 3, r  # k actors on k distinct nodes
    assert r["rows_stored"] == r["rows_stored_unique"] == r["rows_expected"]
    assert r["max_abs_diff_vs_single_process"] < 1e-5


def test_losing_a_node_mid_run_still_stores_every_row_once(tmp_path):
    r = scenario("node_loss", tmp_path)
    assert r["removed_node_after_parts"] >= 1  # the node died after results had been stored
    assert r["removed_node"] in r["gpu_nodes"]
    assert r["rows_stored"] == r["rows_stored_unique"] == r["rows_expected"]
    assert r["max_abs_diff_vs_single_process"] < 1e-5


def test_best_of_n_survives_losing_a_gpu_node_mid_generation(tmp_path):
    r = scenario("bestofn_node_loss", tmp_path)
    assert r["removed_node"] in r["gpu_nodes"] and r["manifest_parts_before_loss"] >= 1
    assert r["manifest_rows"] == r["manifest_unique"] == r["images_expected"] == 48  # every (prompt, sample) once
    assert r["selection_rows"] == 3 * 2 * 2  # prompts x pools x (raw, textnorm) at k = 1
