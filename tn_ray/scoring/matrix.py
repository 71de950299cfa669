"""Score matrices, the central data structure: one model, rows = images, columns = [x0, x1..xm].

A :class:`ScoreMatrix` belongs to one reward model: row i is an image ``y_i`` generated for
prompt ``x0_i``; its columns are ``[r(x0,y), r(x1,y), ..., r(xm,y)]`` for the contrastive
set ``X_i = [x1..xm]``. Sets differ in size, so the value array is NaN-padded to the largest
``m``. On disk (Parquet) a row keeps its keys (set, prompt, image_id, model), its texts and
its scores, so matrices join with labels and with each other.

Matrices are assembled from the reward cache (:mod:`tn_ray.scoring.cache`), where every
(image, text) reward is computed once.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from tn_ray.storage import Store

KEY_COLUMNS = ["set", "prompt", "image_id"]


def _split(path: str | os.PathLike) -> tuple[str, str]:
    """(parent folder or URI, file name) of a local path or a URI."""
    text, sep, query = str(path).partition("?")  # URI options (endpoint_override=...) stay on the folder
    head, _, name = text.rstrip("/").rpartition("/")
    return (head or ".") + sep + query, name


@dataclass
class ScoreMatrix:
    model: str
    keys: pd.DataFrame  # one row per image: set, prompt, image_id (+ any extra key columns)
    texts: list[list[str]]  # per row: [x0, x1, ..., xm]
    values: np.ndarray  # (n, 1 + max m), float64, NaN where a row has fewer prompts

    def __post_init__(self):
        self.keys = self.keys.reset_index(drop=True)
        if len(self.keys) != len(self.values) or len(self.texts) != len(self.values):
            raise ValueError("keys, texts and values of a score matrix must have one row per image")

    def __len__(self) -> int:
        return len(self.values)

    @property
    def raw(self) -> np.ndarray:
        """r(x0, y) per image: the plain (unnormalized) reward."""
        return self.values[:, 0]

    @classmethod
    def from_rows(
        cls, model: str, keys: pd.DataFrame, texts: Sequence[Sequence[str]], scores: Sequence[Sequence[float]]
    ):
        width = max((len(s) for s in scores), default=1)
        values = np.full((len(scores), width), np.nan)
        for i, s in enumerate(scores):
            values[i, : len(s)] = s
        return cls(model, keys, [list(t) for t in texts], values)

    def to_frame(self) -> pd.DataFrame:
        df = self.keys.copy()
        df["model"] = self.model
        df["texts"] = self.texts
        df["scores"] = [row[: len(t)].tolist() for row, t in zip(self.values, self.texts)]
        return df

    def save(self, path: str | os.PathLike) -> str | Path:
        """Write atomically to a local path or a URI (``s3://bucket/run/scores/clip.parquet``)."""
        parent, name = _split(path)
        Store(parent).write_table(name, pa.Table.from_pandas(self.to_frame(), preserve_index=False))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ScoreMatrix:
        parent, name = _split(path)
        df = Store(parent).read_table(name).to_pandas()
        models = df["model"].unique()
        if len(models) != 1:
            raise ValueError(f"{path}: a score matrix file holds one model, found {list(models)}")
        keys = df.drop(columns=["model", "texts", "scores"])
        return cls.from_rows(str(models[0]), keys, [list(t) for t in df["texts"]], [list(s) for s in df["scores"]])

    def align(self, keys: pd.DataFrame) -> ScoreMatrix:
        """This matrix with its rows in the order of ``keys`` (same key columns)."""
        cols = [c for c in KEY_COLUMNS if c in keys.columns]
        idx = self.keys[cols].reset_index().merge(keys[cols], on=cols, how="right")["index"]
        if idx.isna().any():
            raise KeyError(f"{int(idx.isna().sum())} rows of the requested keys are not in the matrix of {self.model}")
        idx = idx.astype(int).to_numpy()
        return ScoreMatrix(self.model, self.keys.iloc[idx], [self.texts[i] for i in idx], self.values[idx])


def pad_rows(rows: Sequence[np.ndarray]) -> np.ndarray:
    """Score rows of unequal length as one NaN-padded (images, 1 + m) array (score-matrix values)."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def model_slug(model_id: str) -> str:
    """A file-system-safe, collision-free name for a model id."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_id).strip("_")[:60]
    return f"{readable}-{hashlib.sha1(model_id.encode()).hexdigest()[:8]}"
