"""The grid's cells and runs as keys (:class:`CellKey`: ids, folders and columns; no config file read):
fine-tuning cells, best-of-n runs and each run's reward x n cells, in run order."""

from __future__ import annotations

from dataclasses import dataclass

from tn_ray.experiments.study.config import StudyConfig
from tn_ray.storage import join_uri


@dataclass(frozen=True)
class CellKey:
    """A cell's place in the grid and what the report needs of it (no config file read). A best-of-n cell has
    ``n`` set and ``kl`` NaN; its ``out`` is its run's folder (shared by the run's cells)."""

    index: int  # 1-based, in run order
    total: int
    id: str
    method: str  # the entry's name
    kind: str  # bestofn | rwr | ddpo | grpo
    reward: str  # the row's name
    kl: float
    seed: int
    out: str
    train: str  # the training reward's column
    truth: str  # the truth's column (== train when the row trains on the truth)
    n: int | None = None

    @property
    def label(self) -> str:
        what = "best-of-n run" if self.kind == "bestofn" and self.n is None else "cell"
        return f"{what} {self.index}/{self.total} {self.id}"

    @property
    def key(self) -> tuple:
        return (self.method, self.reward, self.kl, self.seed)


def bestofn_run_id(method: str, seed: int) -> str:
    return f"{method}-s{seed}"


def grid_cells(grid: StudyConfig) -> list[CellKey]:
    """Every fine-tuning cell, seed-major (seed, then method, reward row, kl), with its id
    ``<method>-<reward>-kl<kl>-s<seed>``; best-of-n cells are :func:`bestofn_cells`."""

    combos = [
        (seed, name, entry, row, kl)
        for seed in grid.seeds
        for name, entry in grid.methods.items()
        if (entry.method or name) != "bestofn"
        for row in grid.rewards
        for kl in entry.kl
    ]
    out = []
    for i, (seed, name, entry, row, kl) in enumerate(combos, 1):
        cid = f"{name}-{row}-kl{kl:g}-s{seed}"
        out.append(
            CellKey(
                i,
                len(combos),
                cid,
                name,
                entry.method or name,
                row,
                float(kl),
                int(seed),
                join_uri(grid.out, "cells", cid),
                grid.rewards[row].use,
                grid.truth,
            )
        )
    return out


def bestofn_runs(grid: StudyConfig) -> list[CellKey]:
    """One key per (best-of-n entry, seed), seed-major: the run whose generation its reward x n cells share."""

    combos = [(s, m) for s in grid.seeds for m, e in grid.methods.items() if (e.method or m) == "bestofn"]
    return [
        CellKey(
            i,
            len(combos),
            rid := bestofn_run_id(m, s),
            m,
            "bestofn",
            "*",
            float("nan"),
            int(s),
            join_uri(grid.out, "cells", rid),
            "*",
            grid.truth,
        )
        for i, (s, m) in enumerate(combos, 1)
    ]


def bestofn_cells(grid: StudyConfig, run: CellKey) -> tuple[CellKey, ...]:
    """The reward x n cells of one best-of-n run, ids ``<method>-<reward>-n<n>-s<seed>``."""
    entry = grid.methods[run.method]
    pairs = [(row, n) for row in grid.rewards for n in entry.n]
    return tuple(
        CellKey(
            i,
            len(pairs),
            f"{run.method}-{row}-n{n}-s{run.seed}",
            run.method,
            "bestofn",
            row,
            float("nan"),
            run.seed,
            run.out,
            grid.rewards[row].use,
            grid.truth,
            n,
        )
        for i, (row, n) in enumerate(pairs, 1)
    )
