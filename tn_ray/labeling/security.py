"""Access rules of the labelling server: which binds need a token, how it is checked, and which
image names may be served.

Binding anywhere but the loopback address needs a token: generated once per start (or taken from
``TN_RAY_LABEL_TOKEN`` so a restart keeps links valid), printed once, checked on every request
with a constant-time comparison. Images are served by their public name only when that name is
one of the task's own files (an allow-list); ``..``, absolute paths, backslashes and NUL bytes are
refused before the allow-list is consulted.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path, PurePosixPath

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
TOKEN_ENV = "TN_RAY_LABEL_TOKEN"
TOKEN_COOKIE = "tn_ray_label_token"


class UnsafePath(ValueError):
    """An image name that tries to leave the task's files (``..``, absolute, odd characters)."""


def needs_token(host: str) -> bool:
    """True for every bind address but the loopback names (127.0.0.1, ::1, localhost)."""
    return host not in LOOPBACK_HOSTS


def new_token() -> str:
    """The environment's token if set, else a fresh random one (32 url-safe characters)."""
    return os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24)


def token_ok(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def secret_hash(secret: str) -> str:
    """Stored form of an annotator's session secret (the secret itself is never stored)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def check_name(name: str) -> str:
    """A public image name as requested; raises :class:`UnsafePath` for anything that could escape."""
    if not name or "\\" in name or "\x00" in name or name.startswith(("/", "~")):
        raise UnsafePath(f"refused image name {name!r}")
    parts = PurePosixPath(name).parts
    if any(p in ("..", ".") for p in parts) or ":" in parts[0]:
        raise UnsafePath(f"refused image name {name!r}")
    return name


def resolve_image(files: dict[str, Path], name: str) -> Path:
    """The task file behind public ``name``; KeyError when the task has no such file."""
    return files[check_name(name)]
