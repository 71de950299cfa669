"""Score matrices, the central data structure, and the reward cache they are built from.

A :class:`ScoreMatrix` belongs to one reward model: row i is an image ``y_i`` generated for
prompt ``x0_i``; its columns are ``[r(x0,y), r(x1,y), ..., r(xm,y)]`` for the contrastive
set ``X_i = [x1..xm]``. Sets differ in size, so the value array is NaN-padded to the largest
``m``. On disk (Parquet) a row keeps its keys (set, prompt, image_id, model), its texts and
its scores, so matrices join with labels and with each other.

Rewards are computed once: :class:`RewardCache` stores every (image, text) reward of a model
as Parquet part files, one per finished batch (atomic writes, so a crash loses at most the
batch in flight); a rerun asks it what is missing and computes only that.
"""
from __future__ import annotations

import hashlib
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

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
    def from_rows(cls, model: str, keys: pd.DataFrame, texts: Sequence[Sequence[str]], scores: Sequence[Sequence[float]]):
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
    def load(cls, path: str | os.PathLike) -> "ScoreMatrix":
        parent, name = _split(path)
        df = Store(parent).read_table(name).to_pandas()
        models = df["model"].unique()
        if len(models) != 1:
            raise ValueError(f"{path}: a score matrix file holds one model, found {list(models)}")
        keys = df.drop(columns=["model", "texts", "scores"])
        return cls.from_rows(str(models[0]), keys, [list(t) for t in df["texts"]], [list(s) for s in df["scores"]])

    def align(self, keys: pd.DataFrame) -> "ScoreMatrix":
        """This matrix with its rows in the order of ``keys`` (same key columns)."""
        cols = [c for c in KEY_COLUMNS if c in keys.columns]
        idx = self.keys[cols].reset_index().merge(keys[cols], on=cols, how="right")["index"]
        if idx.isna().any():
            raise KeyError(f"{int(idx.isna().sum())} rows of the requested keys are not in the matrix of {self.model}")
        idx = idx.astype(int).to_numpy()
        return ScoreMatrix(self.model, self.keys.iloc[idx], [self.texts[i] for i in idx], self.values[idx])


def model_slug(model_id: str) -> str:
    """A file-system-safe, collision-free name for a model id."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_id).strip("_")[:60]
    return f"{readable}-{hashlib.sha1(model_id.encode()).hexdigest()[:8]}"




class RewardCache:
    """Every computed reward of one model: (image_key, text) -> score, as Parquet parts.

    ``root`` is a local folder or a cloud URI (``s3://bucket/cache``, ``gs://...``: any
    pyarrow filesystem), so every node of a cluster reads and writes the same cache.
    """

    SCHEMA = pa.schema([("image_key", pa.string()), ("text", pa.string()), ("score", pa.float64())])

    def __init__(self, root: str | os.PathLike, model_id: str):
        self.model_id = model_id
        self.store = Store(root)
        self.slug = model_slug(model_id)
        self.store.makedirs(self.slug)
        if not self.store.exists(f"{self.slug}/MODEL"):
            self.store.write_text(f"{self.slug}/MODEL", model_id + "\n")
        self._frame: pd.DataFrame | None = None

    @property
    def location(self) -> str:
        return self.store.uri(self.slug)

    def parts(self) -> list[str]:
        """Relative paths of the finished part files (temporaries of a crash left out)."""
        return [p for p in self.store.list_files(self.slug, ".parquet") if p.rsplit("/", 1)[-1].startswith("part-")]

    def frame(self) -> pd.DataFrame:
        """All cached rewards, deduplicated by (image_key, text)."""
        if self._frame is None:
            parts = self.parts()
            if parts:
                df = pa.concat_tables([self.store.read_table(p, schema=self.SCHEMA) for p in parts]).to_pandas()
                df = df.drop_duplicates(["image_key", "text"], keep="last")
            else:
                df = self.SCHEMA.empty_table().to_pandas()
            self._frame = df
        return self._frame

    def append(self, df: pd.DataFrame) -> None:
        """Persist one batch of rewards atomically."""
        if len(df):
            table = pa.Table.from_pandas(df[["image_key", "text", "score"]], schema=self.SCHEMA, preserve_index=False)
            self.store.write_table(f"{self.slug}/part-{uuid.uuid4().hex}.parquet", table)
            self._frame = None

    def compact(self) -> None:
        """Merge the part files into one (the merged file is written before any part is
        deleted, so an interruption at any point loses nothing)."""
        parts = self.parts()
        if len(parts) > 1:
            df = self.frame()
            self.store.write_table(f"{self.slug}/part-{uuid.uuid4().hex}.parquet",
                                   pa.Table.from_pandas(df, schema=self.SCHEMA, preserve_index=False))
            for p in parts:
                self.store.delete(p)
            self._frame = None

    def missing(self, image_keys: Sequence[str], texts: Sequence[Sequence[str]]) -> list[list[str]]:
        """For each image, the texts whose reward is not cached yet (order kept)."""
        req = pd.DataFrame({"row": np.repeat(np.arange(len(image_keys)), [len(t) for t in texts]),
                            "image_key": np.repeat(np.asarray(image_keys, dtype=object), [len(t) for t in texts]),
                            "text": [x for t in texts for x in t]})
        have = self.frame()[["image_key", "text"]].assign(_have=True)
        req = req.merge(have, on=["image_key", "text"], how="left")
        req = req[req["_have"].isna()]
        out: list[list[str]] = [[] for _ in image_keys]
        for row, text in zip(req["row"].to_numpy(), req["text"].to_numpy()):
            out[row].append(text)
        return out

    def lookup(self, image_keys: Sequence[str], texts: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Cached rewards for each image's texts; raises if any is missing."""
        lens = [len(t) for t in texts]
        req = pd.DataFrame({"image_key": np.repeat(np.asarray(image_keys, dtype=object), lens),
                            "text": [x for t in texts for x in t]})
        got = req.merge(self.frame(), on=["image_key", "text"], how="left")["score"].to_numpy()
        if np.isnan(got).any():
            raise KeyError(f"{int(np.isnan(got).sum())} rewards of {self.model_id} are not in the cache {self.location}")
        return np.split(got, np.cumsum(lens)[:-1])
