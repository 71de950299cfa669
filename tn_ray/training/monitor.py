"""Overoptimization monitor: the training reward keeps rising while held-out judges fall.

After each evaluation the monitor gets the mean of the training reward and of each judge.
It flags when, over the last ``window`` evaluation intervals (``window + 1`` evaluations),
the training reward rose by more than ``tolerance`` *and* every judge fell by more than
``tolerance`` (last minus first of the window, each in its own units). Without judges it
never flags: nothing held out to disagree with.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Flag:
    step: int
    window_start: int
    train_change: float
    judge_changes: dict[str, float]

    def message(self, train_name: str) -> str:
        judges = ", ".join(f"{k} {v:+.4g}" for k, v in self.judge_changes.items())
        return (f"overoptimization at step {self.step}: training reward {train_name} {self.train_change:+.4g} "
                f"since step {self.window_start} while judges fell ({judges})")


@dataclass
class Monitor:
    window: int = 3
    tolerance: float = 0.0
    history: list[tuple[int, float, dict[str, float]]] = field(default_factory=list)
    flags: list[Flag] = field(default_factory=list)

    def update(self, step: int, train_mean: float, judge_means: Mapping[str, float]) -> Flag | None:
        """Record one evaluation; return a :class:`Flag` when this evaluation completes an
        overoptimizing window."""
        self.history.append((int(step), float(train_mean), {k: float(v) for k, v in judge_means.items()}))
        if len(self.history) <= self.window or not judge_means:
            return None
        first, last = self.history[-1 - self.window], self.history[-1]
        train_change = last[1] - first[1]
        changes = {k: last[2][k] - first[2][k] for k in last[2] if k in first[2]}
        if not changes or train_change <= self.tolerance or any(c >= -self.tolerance for c in changes.values()):
            return None
        flag = Flag(last[0], first[0], train_change, changes)
        self.flags.append(flag)
        return flag

    def state_dict(self) -> dict:
        return {"history": [list(h) for h in self.history],
                "flags": [[f.step, f.window_start, f.train_change, f.judge_changes] for f in self.flags]}

    def load_state_dict(self, state: dict) -> None:
        self.history = [(int(s), float(t), dict(j)) for s, t, j in state.get("history", [])]
        self.flags = [Flag(int(s), int(w), float(t), dict(j)) for s, w, t, j in state.get("flags", [])]
