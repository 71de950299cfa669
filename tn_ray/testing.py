"""Testing-only fault hooks: make one unit of distributed work fail, to exercise retries.

Never set in production. The test suite sets ``TN_RAY_TESTING_FAULTS`` to a folder before Ray
starts (it is forwarded to every Ray worker, see ``tn_ray.cluster.FORWARDED_ENV``); a test arms
a fault by writing ``<folder>/<site>.json`` = ``{"kind": "crash" | "error", "marker": PATH}``.
The first call of :func:`maybe_fail` at that site that finds ``marker`` absent creates it and
fails: ``crash`` ends the process (Ray restarts the actor and retries the work), ``error``
raises (retried as an application error). Without the variable this is a no-op costing one
``os.environ`` lookup.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

ENV = "TN_RAY_TESTING_FAULTS"
log = logging.getLogger(__name__)


def maybe_fail(site: str) -> None:
    folder = os.environ.get(ENV)
    if not folder:
        return
    spec_file = Path(folder) / f"{site}.json"
    try:
        spec = json.loads(spec_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return
    try:
        with open(spec["marker"], "x") as f:  # exclusive create: exactly one unit of the run fails
            f.write(f"pid {os.getpid()}\n")
    except FileExistsError:
        return
    if spec.get("kind", "crash") == "crash":
        log.warning("injected fault at %s: process %d exits", site, os.getpid())
        os._exit(1)
    raise RuntimeError(f"injected fault at {site}: this unit of work fails once")


def arm(site: str, kind: str, marker: str | os.PathLike) -> Path:
    """Arm a fault at ``site`` (tests only); returns the spec file (delete it to disarm)."""
    folder = os.environ.get(ENV)
    if not folder:
        raise RuntimeError(f"{ENV} is not set: the test session must set it before Ray starts")
    spec_file = Path(folder) / f"{site}.json"
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps({"kind": kind, "marker": str(marker)}))
    return spec_file
