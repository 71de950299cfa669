"""The sweep's ledger: every evaluated configuration and its result, written by the trial.

Tune snapshots its experiment state every few seconds; a driver killed between two snapshots
forgets trials that finished in between and would run them again after ``--resume``. The
ledger closes that gap: an evaluation trial writes its result here (one small JSON file per
configuration, keyed by a hash of the configuration and the data fingerprint) *before* it
reports to Tune, and looks here first, so a configuration is evaluated at most once whatever
happens to the driver. It lives next to the Tune experiment (a local folder or a cloud URI,
through pyarrow's filesystems) so trials on any node can reach it.

``evaluations/`` keeps one record per actual evaluation (append-only): the evidence that
nothing ran twice.
"""
from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

from tn_ray.storage import Store


def config_key(config: dict[str, Any], fingerprint: str = "") -> str:
    """Stable hash of a trial configuration (plus the data it was evaluated on)."""
    text = json.dumps(config, sort_keys=True, default=str) + "|" + fingerprint
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def resolve_uri(path_or_uri: str) -> str:
    """An absolute local path or a URI (pyarrow needs one or the other)."""
    return path_or_uri if "://" in path_or_uri else str(Path(path_or_uri).resolve())


class TrialLedger:
    def __init__(self, root: str):
        self.root = resolve_uri(root).rstrip("/")
        self._store: Store | None = None

    def __getstate__(self):
        return {"root": self.root}

    def __setstate__(self, state):
        self.__init__(state["root"])

    @property
    def store(self) -> Store:
        """The ledger's folder (local or cloud; atomic writes), opened on first use."""
        if self._store is None:
            self._store = Store(self.root)
        return self._store

    def _write(self, rel: str, record: dict[str, Any]) -> None:
        self.store.write_text(rel, json.dumps(record, sort_keys=True, default=str))

    def _read(self, rel: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.store.read_bytes(rel))
        except (FileNotFoundError, OSError, json.JSONDecodeError):
            return None

    def get(self, key: str) -> dict[str, Any] | None:
        """The stored record of configuration ``key``, or None."""
        return self._read(f"results/{key}.json")

    def put(self, key: str, config: dict[str, Any], metrics: dict[str, Any], trial_id: str, seconds: float) -> None:
        record = {"key": key, "config": config, "metrics": metrics, "trial_id": trial_id,
                  "seconds": seconds, "time": time.time()}
        self._write(f"evaluations/{key}.{uuid.uuid4().hex[:8]}.json", record)
        self._write(f"results/{key}.json", record)

    def _list(self, sub: str) -> list[dict[str, Any]]:
        records = [r for r in (self._read(p) for p in self.store.list_files(sub, ".json")) if r is not None]
        return sorted(records, key=lambda r: r["time"])

    def results(self) -> list[dict[str, Any]]:
        """One record per evaluated configuration, oldest first."""
        return self._list("results")

    def evaluations(self) -> list[dict[str, Any]]:
        """One record per evaluation actually run (a configuration twice = run twice)."""
        return self._list("evaluations")
