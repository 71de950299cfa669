"""Shared fixtures: offline hub, the TIA2 copy in ../shared, one local Ray per session."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
# reward actors stay loaded between the session's runs (tn_ray/scoring/warm_actors.py): each start costs ~12 s
os.environ.setdefault("TN_RAY_KEEP_WARM_REWARDS", "1")
# S3 tests talk to a moto server on 127.0.0.1 only; dummy credentials, no instance metadata
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                  AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
os.environ.pop("AWS_SESSION_TOKEN", None)
os.environ.pop("AWS_PROFILE", None)
# testing-only fault hooks (tn_ray.testing): set before Ray starts so every worker sees it
os.environ["TN_RAY_TESTING_FAULTS"] = tempfile.mkdtemp(prefix="tn_ray_faults_")

REPO = Path(__file__).resolve().parents[1]
SHARED_TIA2 = Path(os.environ.get("TN_RAY_TIA2_DIR", REPO.parent / "shared" / "tia2"))


@pytest.fixture(scope="session")
def tia2_dir() -> Path:
    """The read-only TIA2 labels and prompt sets (../shared/tia2, or $TN_RAY_TIA2_DIR)."""
    assert (SHARED_TIA2 / "human_annotations").is_dir(), f"TIA2 reference data not found at {SHARED_TIA2}"
    os.environ["TN_RAY_TIA2_DIR"] = str(SHARED_TIA2)
    return SHARED_TIA2


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (ray.init costs ~5 s)."""
    import ray

    from tn_ray.cluster import init_ray
    from tn_ray.config import RayConfig

    init_ray(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()


@pytest.fixture
def study_runs(monkeypatch, tmp_path):
    """A study's runs counted by method across the processes of its Tune trials (a file), with a kill switch per
    method: after ``study_runs.kill("rwr")`` each RWR run fails as it starts, until ``study_runs.revive("rwr")``.
    ``study_runs.counts()`` = {method: runs entered}. The wrapper is pickled by value into each trial."""
    from tn_ray.experiments.study import runner

    log, flags = tmp_path / "study-runs.txt", tmp_path / "study-kill"
    flags.mkdir()

    def counted(cell, allow_provenance_change=False, _run=runner.run_cell, _log=str(log), _flags=str(flags)):
        with open(_log, "a") as f:
            f.write(cell.key.kind + "\n")
        if os.path.exists(os.path.join(_flags, cell.key.kind)):
            raise RuntimeError("killed while this cell starts")
        return _run(cell, allow_provenance_change)

    monkeypatch.setattr(runner, "run_cell", counted)

    class Runs:
        def counts(self) -> dict[str, int]:
            kinds = log.read_text().split() if log.exists() else []
            return {k: kinds.count(k) for k in sorted(set(kinds))}

        def kill(self, kind: str) -> None:
            (flags / kind).touch()

        def revive(self, kind: str) -> None:
            (flags / kind).unlink()

    return Runs()


@pytest.fixture(scope="session")
def s3():
    """An S3 API served by moto on 127.0.0.1 with one bucket: yields (pyarrow S3 filesystem,
    uri(path) -> 's3://bucket/<path>?endpoint_override=...'). Nothing leaves this machine."""
    from moto.server import ThreadedMotoServer
    from pyarrow import fs

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    query = f"endpoint_override={host}:{port}&scheme=http"
    s3fs, _ = fs.FileSystem.from_uri(f"s3://bucket?{query}&allow_bucket_creation=true")
    s3fs.create_dir("bucket")
    yield s3fs, (lambda path: f"s3://bucket/{path}?{query}")
    server.stop()
