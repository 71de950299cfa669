"""What a command wrote to stderr, without the log lines Ray forwards to the driver.

The suite's one Ray session (``ray_session``) stays up between tests, and Ray's log monitor prints its processes'
lines (``(raylet) ...``, ``(RewardWorker pid=123) ...``) to the driver's ``sys.stderr`` from a background thread,
whenever they come: a raylet's "disk over 95% full" warning once landed inside a test's captured error and broke
its one-line check. Tests that assert the shape of an error (one line, the last line) read it through here."""

from __future__ import annotations

import re

RAY_LOG_LINE = re.compile(r"^(?:\x1b\[[0-9;]*m)*\((?:raylet|gcs_server|autoscaler|monitor|[\w.]+ pid=\d+|pid=\d+)\b")


def without_ray_logs(text: str) -> str:
    """``text`` without Ray's forwarded log lines (every other line and the final newline kept)."""
    kept = [line for line in text.splitlines(keepends=True) if not RAY_LOG_LINE.match(line)]
    return "".join(kept)


def cli_stderr(capsys) -> str:
    """The captured stderr so far, without Ray's forwarded log lines."""
    return without_ray_logs(capsys.readouterr().err)
