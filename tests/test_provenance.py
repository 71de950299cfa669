"""provenance.json: written before work starts, compared on resume (refused with one line naming what
differs, continued with --allow-provenance-change), revisions resolved from the local HF cache."""
from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from cli_output import cli_stderr

from tn_ray import provenance
from tn_ray.cli import main
from tn_ray.config import StrictModel
from tn_ray.provenance import FILENAME, ProvenanceChanged, differences, record


class Cfg(StrictModel):
    lr: float = 1e-3
    steps: int = 2
    ray: dict = {}
    stop_after_steps: int | None = None


def test_record_writes_config_packages_commit_and_revisions(tmp_path):
    from tn_ray.diffusion.pipelines import pipeline_revisions
    from tn_ray.rewards.revisions import reward_revisions

    revisions = {
        **pipeline_revisions([("tiny", None), (str(tmp_path), None)]),
        **reward_revisions(["clip:tiny", "brightness"]),
    }
    rec = record(tmp_path, Cfg(), revisions=revisions)
    on_disk = json.loads((tmp_path / FILENAME).read_text())
    assert on_disk == rec
    assert on_disk["config"] == {"lr": 1e-3, "steps": 2, "ray": {}, "stop_after_steps": None}
    for name in ("torch", "diffusers", "transformers", "ray", "peft", "open_clip", "numpy"):
        assert on_disk["packages"][name] == metadata.version(provenance.PACKAGES[name])
    assert on_disk["revisions"] == {
        "pipeline:tiny": "random-init",
        f"pipeline:{tmp_path}": "local",
        "reward:clip:tiny": "random-init",
        "reward:brightness": "builtin",
    }
    commit = on_disk["tn_ray"]["commit"]
    root = Path(provenance.__file__).resolve().parent.parent
    if (root / ".git").exists():  # a checkout: the commit git itself reports
        import subprocess

        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        assert commit == head and len(commit) == 40
    else:
        assert commit.startswith("package ")


def test_hub_revision_is_the_cached_snapshot_commit(tmp_path, monkeypatch):
    import huggingface_hub.constants

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--org--pipe"
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "snapshots" / sha / "model_index.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    from tn_ray.diffusion.pipelines import pipeline_revision

    assert pipeline_revision("org/pipe") == sha
    assert pipeline_revision("org/pipe", sha) == sha
    assert pipeline_revision("org/other", "v1").startswith("v1 (not in the local cache")


def test_differences_name_each_changed_key_and_ignore_ray_and_stop_after_steps():
    old = {
        "config": {"lr": 1e-3, "steps": 2, "ray": {"address": None}, "stop_after_steps": 1, "x": {"y": 1}},
        "packages": {"torch": "2.0"},
        "tn_ray": {"commit": "a", "dirty": True},
        "revisions": {"reward:m": "abc"},
    }
    same = json.loads(json.dumps(old))
    same["config"].update(ray={"address": "auto"}, stop_after_steps=None)
    same["tn_ray"]["dirty"] = False
    assert differences(old, same) == []
    new = json.loads(json.dumps(old))
    new["config"]["x"]["y"] = 2
    new["packages"]["torch"] = "2.1"
    new["tn_ray"]["commit"] = "b"
    new["revisions"]["reward:m"] = "def"
    assert differences(old, new) == [
        "config.x.y: 1 -> 2",
        'packages.torch: "2.0" -> "2.1"',
        "tn_ray commit: a -> b",
        'revisions.reward:m: "abc" -> "def"',
    ]


def test_a_changed_record_refuses_and_the_flag_continues_keeping_the_old_one(tmp_path):
    first = record(tmp_path, Cfg())
    again = record(tmp_path, Cfg(stop_after_steps=3))  # same run, continued: accepted, record kept
    assert again["written"] == first["written"] and again["previous"] == []
    with pytest.raises(ProvenanceChanged) as err:
        record(tmp_path, Cfg(steps=4))
    msg = str(err.value)
    assert "\n" not in msg and "config.steps: 2 -> 4" in msg and "--allow-provenance-change" in msg
    assert json.loads((tmp_path / FILENAME).read_text())["config"]["steps"] == 2  # untouched when refused
    cont = record(tmp_path, Cfg(steps=4), allow_change=True)
    assert cont["config"]["steps"] == 4 and cont["previous"][0]["config"]["steps"] == 2
    with provenance.continue_changed():
        assert record(tmp_path, Cfg(steps=5))["previous"][-1]["config"]["steps"] == 4


def test_a_changed_package_version_refuses(tmp_path, monkeypatch):
    record(tmp_path, Cfg())
    monkeypatch.setattr(
        provenance,
        "package_versions",
        lambda: {**json.loads((tmp_path / FILENAME).read_text())["packages"], "torch": "0.0.1"},
    )
    with pytest.raises(ProvenanceChanged, match=r"packages\.torch: \"[^\"]+\" -> \"0\.0\.1\""):
        record(tmp_path, Cfg())


def tiny_config(path, out, **method_keys):
    """A tiny RWR or DDPO run config (brightness reward, no evaluation) with the method's own keys, as YAML."""
    cfg = {"out": str(out), "prompts": ["a cat"], "max_steps": 2, "policy": {"pipeline": "tiny"},
           "reward": {"models": ["brightness"], "use": "brightness"}, "eval": {"enabled": False}, **method_keys}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_resume_with_changed_record_is_one_line_before_ray_and_the_flag_continues(tmp_path, monkeypatch, capsys):
    """`tn-ray rwr` into a run folder whose provenance.json differs: one line naming the difference,
    before Ray starts; with --allow-provenance-change it goes on to Ray (patched to stop there)."""

    class RayStarted(BaseException):
        pass

    def refuse(*a, **k):
        raise RayStarted()

    monkeypatch.setattr("tn_ray.cluster.init_ray", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    path = tiny_config(tmp_path / "r.yaml", out, generation={"samples_per_prompt": 2, "num_inference_steps": 2,
                                                             "height": 32, "width": 32}, top_k=1, batch_size=1)
    with pytest.raises(RayStarted):  # first run: the record is written, then work starts
        main(["rwr", str(path)])
    written = json.loads((out / FILENAME).read_text())
    assert written["config"]["max_steps"] == 2 and written["revisions"]["pipeline:tiny"] == "random-init"
    capsys.readouterr()
    assert main(["rwr", str(path), "--set", "max_steps=3"]) == 2
    err = cli_stderr(capsys)
    assert err.count("\n") == 1 and "config.max_steps: 2 -> 3" in err and "--allow-provenance-change" in err, err
    with pytest.raises(RayStarted):
        main(["rwr", str(path), "--set", "max_steps=3", "--allow-provenance-change"])
    assert json.loads((out / FILENAME).read_text())["config"]["max_steps"] == 3


def test_a_run_folder_of_the_old_format_refuses_in_one_line_naming_both_versions(tmp_path):
    """Run format 2 changed the seed scheme: a folder recorded before (no format_version, i.e. 1) is refused
    whatever the flags, in one line naming the folder and both versions, and its record is left as it was."""
    record(tmp_path, Cfg())
    old = json.loads((tmp_path / FILENAME).read_text())
    assert old["format_version"] == provenance.FORMAT_VERSION == 2
    del old["format_version"]
    (tmp_path / FILENAME).write_text(json.dumps(old))
    for allow in (False, True):
        with pytest.raises(provenance.RunFormatChanged) as err:
            record(tmp_path, Cfg(), allow_change=allow)
        msg = str(err.value)
        assert "\n" not in msg and str(tmp_path) in msg and "format version 1" in msg and "format version 2" in msg, msg
    with provenance.continue_changed(), pytest.raises(provenance.RunFormatChanged):
        record(tmp_path, Cfg())
    assert json.loads((tmp_path / FILENAME).read_text()) == old
    old["format_version"] = 2  # the same folder in this format continues
    (tmp_path / FILENAME).write_text(json.dumps(old))
    assert record(tmp_path, Cfg())["format_version"] == 2


def test_a_training_run_from_before_provenance_records_is_format_1_and_refused(tmp_path):
    """A folder with checkpoints but no provenance.json was written before run format 2 (before records
    existed): resuming it would mix the two seed schemes, so it is refused; a folder without
    checkpoints (e.g. a best-of-n folder, whose images did not change) just gets its record."""
    (tmp_path / "run" / "checkpoints" / "step-000002").mkdir(parents=True)
    with pytest.raises(provenance.RunFormatChanged, match="format version 1"):
        record(tmp_path / "run", Cfg(), allow_change=True)
    assert not (tmp_path / "run" / FILENAME).exists()
    (tmp_path / "other" / "images").mkdir(parents=True)
    assert record(tmp_path / "other", Cfg())["format_version"] == 2


def test_cli_ddpo_into_an_old_format_folder_is_one_line_before_ray(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("tn_ray.cluster.init_ray", lambda *a, **k: pytest.fail("Ray started"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    path = tiny_config(tmp_path / "d.yaml", out, sample={"num_steps": 2, "batch_size": 2, "num_batches_per_epoch": 1},
                       train={"batch_size": 2})
    out.mkdir()
    (out / FILENAME).write_text(json.dumps({"config": {}, "packages": {}, "tn_ray": {}, "revisions": {}}))  # format 1
    assert main(["ddpo", str(path), "--allow-provenance-change"]) == 2
    err = cli_stderr(capsys)
    assert err.count("\n") == 1 and str(out) in err and "format version 1" in err and "format version 2" in err, err
