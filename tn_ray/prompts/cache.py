"""Persistent, crash-safe cache of LLM answers: one JSON line per answer, appended as it arrives.

Key: sha256 of (model, x0, request parameters, instruction version). Each record is written
with one ``write`` under an exclusive ``flock`` and ``fsync``-ed, so several workers can
append to the same file and a crash loses at most the line being written (a torn last
line is skipped on reading). Records hold the model's answer, never a credential.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from tn_ray.storage import local_cache

log = logging.getLogger(__name__)

FILE_NAME = "llm_answers.jsonl"


def default_dir() -> Path:
    return local_cache("prompts")


def cache_key(model: str, x0: str, params: dict[str, Any], instruction_version: str) -> str:
    blob = json.dumps({"model": model, "x0": x0, "params": params, "instruction": instruction_version},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class AnswerCache:
    """``get(key) -> record | None``; ``put(record)`` appends and fsyncs at once."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root else default_dir()
        self.path = self.root / FILE_NAME
        self.records: dict[str, dict] = {}
        self.reload()

    def reload(self) -> None:
        self.records = {}
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    self.records[rec["key"]] = rec
                except (json.JSONDecodeError, KeyError, TypeError):
                    log.warning("%s: skipping unreadable line %d (torn write?)", self.path, n)

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def put(self, record: dict) -> None:
        if "key" not in record:
            raise ValueError("a cache record needs a 'key'")
        record = {**record, "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_size and not self._ends_with_newline(fd):
                os.write(fd, b"\n")  # never glue a record onto a torn line
            os.write(fd, data)
            os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self.records[record["key"]] = record

    def _ends_with_newline(self, fd: int) -> bool:
        size = os.fstat(fd).st_size
        return os.pread(fd, 1, size - 1) == b"\n"
