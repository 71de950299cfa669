"""Seeded, sharded, resumable generation with the tiny diffusers pipeline (2 steps, 32 px)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tn_ray import testing
from tn_ray.diffusion.generation import (
    GenerationConfig,
    GenerationMismatch,
    GenerationWorker,
    generate,
    image_path,
    read_manifest,
    work_units,
)
from tn_ray.diffusion.pipelines import PipelineLoadError, check_scheduler, check_source
from tn_ray.diffusion.seeds import seed_of
from tn_ray.storage import Store


def ray_actors() -> dict:
    """The GCS's actor table (Ray's state API needs the dashboard, which the tests do not start)."""
    from ray._private.state import actors

    return actors()


PROMPTS = ["a red cat", "two dogs on a beach", "a watercolor lighthouse"]
SAMPLES = 6


def config(out, **kw) -> GenerationConfig:
    base = dict(out=str(out), pipeline="tiny", num_inference_steps=2, height=32, width=32, samples_per_prompt=SAMPLES,
                pipeline_batch_size=2, batch_size=4, num_actors=1)
    base.update(kw)
    return GenerationConfig(**base)


def file_digests(root: Path) -> dict[tuple[int, int], str]:
    """(prompt_id, sample) -> sha256 of every image file on disk (no temporaries allowed)."""
    out = {}
    for p in sorted((root / "images").rglob("*")):
        if p.is_file():
            assert not p.name.endswith(".tmp"), f"temporary left behind: {p}"
            out[(int(p.parent.name), int(p.stem))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _descends_from_us(pid: int) -> bool:
    """Whether ``pid`` is a descendant of this test process (its Ray session's workers are): another job's
    generation actors on the same machine are not ours."""
    me = os.getpid()
    while pid > 1:
        try:
            pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
        if pid == me:
            return True
    return False


def generation_actor_processes() -> list[int]:
    """Generation actor processes of this test session's Ray (not of another job running beside the suite)."""
    pids = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            if open(f"/proc/{d}/cmdline").read().startswith("ray::MapWorker(MapBatches(GenerationWorker"):
                if _descends_from_us(int(d)):
                    pids.append(int(d))
        except OSError:
            pass
    return pids


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[tuple[int, int], str]:
    """Digests of a bare, single-process run: one GenerationWorker called on every row, no Ray."""
    import torch

    out = tmp_path_factory.mktemp("reference")
    cfg = config(out)
    rows = pd.DataFrame([(i, p, s, seed_of(cfg.seed, p, s)) for i, p in enumerate(PROMPTS) for s in range(SAMPLES)],
                        columns=["prompt_id", "prompt", "sample", "seed"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a Ray actor with one CPU
    try:
        manifest = GenerationWorker(cfg.model_dump(mode="json"), str(out))(rows)
    finally:
        torch.set_num_threads(threads)
    digests = file_digests(out)
    assert len(digests) == len(PROMPTS) * SAMPLES
    assert dict(zip(zip(manifest["prompt_id"], manifest["sample"]), manifest["sha256"])) == digests
    assert len(set(digests.values())) == len(digests), "different seeds must give different images"
    return digests


# ---- pure parts -------------------------------------------------------------------------


def test_the_one_seed_scheme_is_sha256_of_the_key_by_hand():
    """seed_of = low 63 bits of the little-endian first 8 bytes of sha256("\\x1f".join(parts)); seeds_of(.., n)
    appends 0..n-1 (hashlib by hand, an independent computation)."""
    import hashlib

    from tn_ray.diffusion.seeds import seeds_of

    digest = hashlib.sha256(b"7\x1fa cat\x1f3").digest()
    assert seed_of(7, "a cat", 3) == int.from_bytes(digest[:8], "little") % 2**63
    by_hand = [
        int.from_bytes(hashlib.sha256(f"0\x1f2\x1f1\x1f{i}".encode()).digest()[:8], "little") % 2**63 for i in range(4)
    ]
    assert seeds_of(0, 2, 1, n=4) == by_hand and len(set(by_hand)) == 4


@given(st.integers(0, 2**31), st.text(max_size=30), st.integers(0, 10_000))
def test_sample_seed_is_a_stable_function_of_prompt_and_sample(base, prompt, sample):
    s = seed_of(base, prompt, sample)
    assert 0 <= s < 2**63 and s == seed_of(base, prompt, sample)
    assert s != seed_of(base, prompt, sample + 1)
    assert s != seed_of(base, prompt + "x", sample)
    assert s != seed_of(base + 1, prompt, sample)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 4), st.integers(0, 40)), min_size=1, max_size=80, unique=True),
    st.integers(1, 8),
    st.integers(1, 20),
)
def test_work_units_keep_pipeline_groups_whole(rows, group, batch):
    todo = pd.DataFrame(rows, columns=["prompt_id", "sample"]).assign(prompt="p")
    units = work_units(todo, group, batch)
    got = pd.concat(units, ignore_index=True)
    assert sorted(zip(got["prompt_id"], got["sample"])) == sorted(rows)  # every row exactly once
    seen = {}
    for i, u in enumerate(units):
        keys = set(zip(u["prompt_id"], u["sample"] // group))
        assert len(u) <= batch or len(keys) == 1  # oversize only when one group alone is bigger
        for k in keys:
            assert seen.setdefault(k, i) == i, f"group {k} split over units"


def test_store_writes_atomically_and_ignores_temporaries(tmp_path):
    store = Store(f"file://{tmp_path}")
    store.write_bytes("a/b.bin", b"one")
    store.write_bytes("a/b.bin", b"two")
    (tmp_path / "a" / ".c.bin.123.tmp").write_bytes(b"half")
    assert store.read_bytes("a/b.bin") == b"two"
    assert store.list_files("a") == ["a/b.bin"]
    assert store.remove_temporaries("a") == 1 and sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.bin"]


def test_unknown_scheduler_and_missing_weights_fail_with_a_clear_message(tmp_path, monkeypatch):
    with pytest.raises(PipelineLoadError, match="unknown diffusers scheduler 'NopeScheduler'.*DDIMScheduler"):
        check_scheduler("NopeScheduler")
    check_scheduler("EulerAncestralDiscreteScheduler")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PipelineLoadError, match="not-a-user/not-a-pipeline.*huggingface-cli download"):
        check_source("not-a-user/not-a-pipeline")
    (tmp_path / "pipe").mkdir()
    with pytest.raises(PipelineLoadError, match="no model_index.json"):
        check_source(str(tmp_path / "pipe"))
    with pytest.raises(PipelineLoadError, match="NopeScheduler"):
        generate(PROMPTS, config(tmp_path / "x", scheduler="NopeScheduler"))
    assert not (tmp_path / "x").exists()  # nothing written before the check


# ---- Ray runs ---------------------------------------------------------------------------


# batch size 6 on 2 actors through a file:// URI vs the reference's 4 in one process (batch size 2 on one
# actor runs in the resume and retry tests below)
def test_same_images_whatever_batch_size_and_actor_count(ray_session, reference, tmp_path, batch_size=6, num_actors=2):
    out = f"file://{tmp_path}"
    manifest = generate(PROMPTS, config(out, batch_size=batch_size, num_actors=num_actors))
    assert file_digests(tmp_path) == reference
    assert dict(zip(zip(manifest["prompt_id"], manifest["sample"]), manifest["sha256"])) == reference
    assert all(Path(p).is_file() for p in manifest["image"])
    assert manifest["seed"].tolist() == [
        seed_of(0, PROMPTS[i], s) for i, s in zip(manifest["prompt_id"], manifest["sample"])
    ]
    assert not generation_actor_processes(), "generate() returned before its actors exited"
    # extending the pool keeps the first samples (nested pools) and makes only the new ones
    more = generate(PROMPTS, config(out, batch_size=batch_size, num_actors=num_actors, samples_per_prompt=SAMPLES + 2))
    assert len(more) == len(PROMPTS) * (SAMPLES + 2)
    kept = more[more["sample"] < SAMPLES]
    assert dict(zip(zip(kept["prompt_id"], kept["sample"]), kept["sha256"])) == reference


def test_record_waits_for_an_actor_that_made_no_image(tmp_path):
    """An actor that answered the roll but produced no rows (a second actor left idle by one work unit, as
    under load) is waited for before record() returns, and the roll folder is removed: the 30 s wait on
    only the actors that made rows let such an actor outlive generate() in a loaded CI run."""
    from tn_ray.diffusion.generation import _node_id, answer_roll, record, roll_folder

    class NoRows:  # a dataset whose actors made nothing
        def iter_batches(self, **kwargs):
            return iter(())

    store = Store(str(tmp_path / "run"))
    roll = roll_folder(store)
    os.makedirs(roll, exist_ok=True)
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"])
    try:
        answer_roll(roll, f"{_node_id()}:{idle.pid}")
        answer_roll(str(tmp_path / "not-this-node"), "n:1")  # no folder there: nothing written, no error
        t0 = time.monotonic()
        record(NoRows(), store, 0, "test")
        assert idle.poll() is not None, "record() returned while the idle actor still ran"
        assert time.monotonic() - t0 > 1  # it did wait (the process sleeps 3 s)
        assert not os.path.exists(roll) and not (tmp_path / "not-this-node").exists()
    finally:
        idle.kill()
        idle.wait()


# a kill/resume across processes: minutes on a loaded 2-core machine (its module fixture counts too);
# the deadlines inside wait on observable state, this only raises the hang guard
@pytest.mark.timeout(2400)
def test_resume_after_sigkill_of_the_driver(ray_session, reference, tmp_path):
    out = tmp_path / "run"
    cfg = config(out, batch_size=2)  # one pipeline group per Ray task
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    # more images than the reference, each its own Ray task, so the kill lands mid-run
    prompts = PROMPTS + [f"prompt number {i}" for i in range(3)]
    address = ray_session.get_runtime_context().gcs_address
    code = (
        "import json, sys; from tn_ray.config import RayConfig; "
        "from tn_ray.diffusion.generation import GenerationConfig, generate; "
        f"generate({prompts!r}, GenerationConfig.model_validate_json(open(sys.argv[1]).read()), "
        f"RayConfig(address={address!r}))"
    )
    driver = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "cfg.json")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    deadline = time.time() + 1800  # generous: on a loaded 2-core machine the driver's first images take minutes
    while driver.poll() is None and len(list((out / "images").rglob("*.png"))) < 3:
        assert time.time() < deadline, "no 3 images written before the deadline"
        time.sleep(0.05)
    assert driver.poll() is None, "the driver ended before it could be killed"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    written = len(list((out / "images").rglob("*.png")))
    assert 3 <= written < len(prompts) * SAMPLES, f"kill should land mid-run ({written} images)"

    # Ray ends the dead driver's actors; wait for that (observable state, generous deadline on a
    # loaded machine) so the resumed run never races a late writer of the killed one
    mine = ray_session.get_runtime_context().get_job_id()
    deadline = time.time() + 900
    while any(a["JobID"] != mine and a["State"] != "DEAD" for a in ray_actors().values()):
        assert time.time() < deadline, "the killed driver's generation actors did not end"
        time.sleep(0.2)
    before = read_manifest(Store(out))
    manifest = generate(prompts, cfg)
    digests = file_digests(out)
    assert len(digests) == len(prompts) * SAMPLES
    assert not manifest.duplicated(["prompt_id", "sample"]).any() and len(manifest) == len(digests)
    assert {k: v for k, v in digests.items() if k[0] < len(PROMPTS)} == reference
    assert dict(zip(zip(manifest["prompt_id"], manifest["sample"]), manifest["sha256"])) == digests
    assert len(before) < len(manifest)
    # a third run finds everything and starts no actor
    again = generate(prompts, cfg)
    assert again["sha256"].tolist() == manifest["sha256"].tolist()
    assert len(list((out / "manifest").glob("*.parquet"))) == 1


@pytest.fixture
def fault():
    """Arm the testing-only fault hook of generation batches (tn_ray.testing); disarmed after."""
    armed = []

    def arm(kind, marker):
        armed.append(testing.arm("generation", kind, marker))

    yield arm
    for f in armed:
        f.unlink(missing_ok=True)


@pytest.mark.parametrize("kind", ["crash", "error"])
def test_a_failing_batch_is_retried_and_the_run_completes(ray_session, reference, tmp_path, kind, fault):
    marker = tmp_path / "fault-fired"
    fault(kind, marker)
    cfg = config(tmp_path / "run")
    manifest = generate(PROMPTS, cfg)
    assert marker.is_file(), "the injected fault never fired"
    assert file_digests(tmp_path / "run") == reference
    assert len(manifest) == len(PROMPTS) * SAMPLES


def test_without_retries_the_injected_error_fails_the_run(ray_session, tmp_path, fault):
    fault("error", tmp_path / "m")
    cfg = config(tmp_path / "run", error_retries=0)
    with pytest.raises(Exception, match="injected fault"):
        generate(PROMPTS, cfg)


def test_a_rerun_with_other_image_parameters_is_refused(ray_session, reference, tmp_path):
    generate(PROMPTS[:1], config(tmp_path, samples_per_prompt=2))
    with pytest.raises(GenerationMismatch, match=r"generation.num_inference_steps: 2 in .*generation.json, 3 now"):
        generate(PROMPTS[:1], config(tmp_path, samples_per_prompt=2, num_inference_steps=3))
    with pytest.raises(GenerationMismatch, match="prompt_id 0 is 'a red cat'.*'two dogs on a beach' now"):
        generate(PROMPTS[1:], config(tmp_path, samples_per_prompt=2))
    assert json.loads((tmp_path / "generation.json").read_text())["num_inference_steps"] == 2
    assert file_digests(tmp_path) == {k: v for k, v in reference.items() if k[0] == 0 and k[1] < 2}
    assert image_path(0, 1) == "images/00000/00001.png"


@pytest.fixture(scope="module")
def s3_uri(s3):
    """uri(path) on the session's moto S3 server, under a prefix of this module's own."""
    return lambda path: s3[1](f"gen/{path}")


def test_images_and_manifest_on_an_object_store(ray_session, reference, s3_uri):
    from tn_ray.storage import read_any

    out = s3_uri("run")
    manifest = generate(PROMPTS, config(out, num_actors=2))
    digests = {
        (p, s): hashlib.sha256(read_any(u)).hexdigest()
        for p, s, u in zip(manifest["prompt_id"], manifest["sample"], manifest["image"])
    }
    assert digests == reference
    assert all(u.startswith("s3://bucket/gen/run/images/") for u in manifest["image"])
    store = Store(out)
    assert len(store.list_files("images", ".png")) == len(reference)
    # a rerun reads the manifest back from the store and makes nothing
    again = generate(PROMPTS, config(out, num_actors=2))
    assert again["sha256"].tolist() == manifest["sha256"].tolist()
    assert len(store.list_files("manifest", ".parquet")) == 1


def test_a_configured_scheduler_is_used_and_its_noise_is_seeded(tmp_path, reference):
    """Euler-ancestral draws fresh noise at every step: from each row's own generator."""
    cfg = config(tmp_path, scheduler="EulerAncestralDiscreteScheduler", negative_prompt="blurry")
    rows = pd.DataFrame(
        [(0, PROMPTS[0], s, seed_of(0, PROMPTS[0], s)) for s in range(2)],
        columns=["prompt_id", "prompt", "sample", "seed"],
    )
    first = GenerationWorker(cfg.model_dump(mode="json"), str(tmp_path / "a"))
    assert type(first.pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    a = first(rows)["sha256"].tolist()
    b = GenerationWorker(cfg.model_dump(mode="json"), str(tmp_path / "b"))(rows)["sha256"].tolist()
    assert a == b and len(set(a)) == 2
    assert a != [reference[(0, 0)], reference[(0, 1)]]
