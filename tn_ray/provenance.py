"""What a run folder was made with, written before work starts, and checked when it is resumed.

``provenance.json`` in every run folder (rwr, ddpo, bestofn, tia2 eval, sweep, reward train,
world run) records:

- ``config``: the resolved configuration (every default filled in);
- ``packages``: versions of torch, diffusers, transformers, ray, peft, open_clip, numpy (and tn_ray);
- ``tn_ray``: the git commit of the tn_ray checkout (and whether its tree had uncommitted
  changes), or ``"package <version>"`` when tn_ray is not a git checkout;
- ``revisions``: per model and pipeline, the commit it resolves to: the hash of the Hugging
  Face cache snapshot it loads from (offline, or already downloaded), else the requested
  revision (``"main"`` when none); ``"local"`` for a local folder or file, ``"random-init"``
  for the tiny variants (seeded random weights).

:func:`record` writes it; when the folder already holds one (a resumed or repeated run) whose
``config``, ``packages``, ``tn_ray`` commit or ``revisions`` differ, it raises
:class:`ProvenanceChanged` naming what differs, unless ``allow_change`` (the commands'
``--allow-provenance-change``), in which case the new record is written with the old ones kept
under ``previous``. Config keys in :data:`NOT_COMPARED` (``ray``, ``stop_after_steps``) may change.

It also records ``format_version``, the run-folder format (:data:`FORMAT_VERSION`; a record without
one is version 1). A folder of another format is refused whatever the flags
(:class:`RunFormatChanged`, one line naming the folder and both versions): resuming it would mix
two formats in one run.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import tn_ray
from tn_ray.errors import TnRayError

log = logging.getLogger(__name__)

FILENAME = "provenance.json"
# The run-folder format. 2: every per-row seed is a sha256 hash of the row's key (tn_ray.diffusion.seeds);
# in 1, DDPO drew its samples' prompts and noise from numpy SeedSequence seeds, so a resumed DDPO run
# would draw other images than its first epochs did.
FORMAT_VERSION = 2
CHECKPOINTS = "checkpoints"  # a run folder holding these without a provenance.json was written by format 1
FORMAT_CHANGES = {2: "per-row seeds became sha256 hashes: DDPO draws other prompts and noise"}
# import name -> distribution name
PACKAGES = {"torch": "torch", "diffusers": "diffusers", "transformers": "transformers", "ray": "ray", "peft": "peft",
            "open_clip": "open_clip_torch", "numpy": "numpy", "tn_ray": "tn_ray"}
COMPARED = ("config", "packages", "tn_ray", "revisions")  # what must match to continue a run folder
# config keys that may change between invocations of one run: where Ray runs (a run started on a laptop
# continues on a cluster) and stop_after_steps (end this invocation early; the next one continues)
NOT_COMPARED = ("ray", "stop_after_steps")
_allow_all: contextvars.ContextVar[bool] = contextvars.ContextVar("allow_all", default=False)
_SNAPSHOT = re.compile(r"[/\\]snapshots[/\\]([0-9a-f]{40})[/\\]")


class ProvenanceChanged(TnRayError, ValueError):
    """A run folder's recorded provenance differs from this run's; the message names what differs."""


class RunFormatChanged(TnRayError, ValueError):
    """A run folder was written in another run format (:data:`FORMAT_VERSION`): it cannot be resumed."""


def check_format(old: dict, where: str) -> None:
    """:class:`RunFormatChanged` naming ``where`` and both versions when the record ``old`` is of
    another run format than :data:`FORMAT_VERSION` (a record without ``format_version`` is version 1)."""
    version = old.get("format_version", 1)
    if version != FORMAT_VERSION:
        why = FORMAT_CHANGES.get(max(version, FORMAT_VERSION), "")
        raise RunFormatChanged(f"{where}: run folder of format version {version}, this tn_ray writes format version "
                               f"{FORMAT_VERSION}{f' ({why})' if why else ''}; it cannot be resumed: use a new output "
                               "folder")


def package_versions() -> dict[str, str]:
    """Installed version of each of :data:`PACKAGES` ('not installed' when absent)."""
    out = {}
    for name, dist in PACKAGES.items():
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def code_version(root: Path | None = None) -> dict[str, Any]:
    """The tn_ray git commit (``commit``, ``dirty``) when the package is a git checkout, else its
    package version (``commit`` = ``"package <version>"``)."""

    root = root or Path(tn_ray.__file__).resolve().parent.parent
    try:
        if (root / ".git").exists():
            def git(*args: str) -> str:
                return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                                      check=True).stdout.strip()
            return {
                "commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            }
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": f"package {tn_ray.__version__}", "dirty": None}


def hub_revision(repo: str, filename: str, requested: str | None = None) -> str:
    """The commit ``repo`` at ``requested`` resolves to in the local Hugging Face cache (the
    snapshot folder holding ``filename``), else ``requested`` (``"main"`` when None) as asked."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, filename, revision=requested)
    except Exception:  # an id the hub would reject is not in the cache
        found = None
    m = _SNAPSHOT.search(found) if isinstance(found, str) else None
    return m.group(1) if m else f"{requested or 'main'} (not in the local cache: as requested)"


def collect(cfg: BaseModel | dict, revisions: Mapping[str, str] | None = None) -> dict:
    """This run's record: resolved config, package versions, tn_ray commit, and the ``revisions`` of
    its models and pipelines (``{"reward:<spec>": ..., "pipeline:<source>": ...}``, resolved by the layer
    that knows them: :func:`tn_ray.rewards.revisions.reward_revisions`,
    :func:`tn_ray.diffusion.pipelines.pipeline_revisions`)."""
    config = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    revisions = dict(revisions or {})
    return {
        "format_version": FORMAT_VERSION,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tn_ray": code_version(),
        "packages": package_versions(),
        "revisions": revisions,
        "config": config,
    }


def differences(old: dict, new: dict) -> list[str]:
    """What differs between two records, as short phrases naming each key (``config.max_steps: 2 -> 4``),
    in the order config, packages, tn_ray commit, revisions."""
    out: list[str] = []
    for part in COMPARED:
        if part == "tn_ray":
            a, b = (old.get(part) or {}).get("commit"), (new.get(part) or {}).get("commit")
            if a != b:
                out.append(f"tn_ray commit: {a} -> {b}")
            continue
        a, b = _flat(old.get(part) or {}), _flat(new.get(part) or {})
        if part == "config":
            a, b = ({k: v for k, v in d.items() if k.split(".")[0] not in NOT_COMPARED} for d in (a, b))
        out += [
            f"{part}.{k}: {_short(a.get(k, '<absent>'))} -> {_short(b.get(k, '<absent>'))}"
            for k in sorted(a.keys() | b.keys())
            if a.get(k, "<absent>") != b.get(k, "<absent>")
        ]
    return out


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flat(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def _short(v: Any) -> str:
    text = json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."


@contextlib.contextmanager
def continue_changed():
    """Inside this block every :func:`record` continues a changed run folder (saying so in the log), as
    ``--allow-provenance-change`` does: for the quickstart, a demo that reuses its folders across versions."""
    token = _allow_all.set(True)
    try:
        yield
    finally:
        _allow_all.reset(token)


def record(
    location: str | os.PathLike,
    cfg: BaseModel | dict,
    *,
    allow_change: bool = False,
    revisions: Mapping[str, str] | None = None,
) -> dict:
    """Write ``<location>/provenance.json`` (a local folder or cloud URI) for this run, before work
    starts; refuse (:class:`ProvenanceChanged`) a folder whose record differs unless ``allow_change``."""
    from tn_ray.storage import Store

    store = Store(str(location))
    new = collect(cfg, revisions)
    if not store.exists(FILENAME) and store.exists(CHECKPOINTS):
        check_format({}, store.uri(""))  # a training run from before provenance records: format 1, not resumable
    if store.exists(FILENAME):
        try:
            old = json.loads(store.read_text(FILENAME))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ProvenanceChanged(
                f"{store.uri(FILENAME)}: not a provenance record ({err}); move it away to continue"
            ) from None
        check_format(old, store.uri(""))
        changed = differences(old, new)
        if changed and not (allow_change or _allow_all.get()):
            shown = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
            raise ProvenanceChanged(
                f"{store.uri(FILENAME)}: this run folder was made with other settings ({shown}); "
                "use a new output folder, or add --allow-provenance-change to continue it"
            )
        if changed:
            log.warning("continuing %s although its provenance changed: %s", store.uri(""), "; ".join(changed))
        new["previous"] = [*old.pop("previous", []), old] if changed else old.get("previous", [])
        if not changed:
            new["written"] = old.get("written", new["written"])
    store.write_text(FILENAME, json.dumps(new, indent=1, sort_keys=False) + "\n")
    return new
