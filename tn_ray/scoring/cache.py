"""The reward cache: every computed reward of a model, (image_key, text) -> score.

Rewards are computed once: the cache keeps them as Parquet parts under ``<root>/<model-slug>/``
(:class:`tn_ray.storage.PartTable`), one per finished batch; a rerun asks it what is missing
and computes only that. ``root`` is a local folder or a cloud URI, so every node of a cluster
reads and writes the same cache.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from tn_ray.scoring.matrix import model_slug
from tn_ray.storage import PartTable, Store


class RewardCache:
    """Every computed reward of one model: (image_key, text) -> score, as Parquet parts."""

    SCHEMA = pa.schema([("image_key", pa.string()), ("text", pa.string()), ("score", pa.float64())])

    def __init__(self, root: str | os.PathLike, model_id: str):
        self.model_id = model_id
        self.store = Store(root)
        self.slug = model_slug(model_id)
        self.store.makedirs(self.slug)
        if not self.store.exists(f"{self.slug}/MODEL"):
            self.store.write_text(f"{self.slug}/MODEL", model_id + "\n")
        self.table = PartTable(self.store, self.slug, self.SCHEMA, ["image_key", "text"])
        self._frame: pd.DataFrame | None = None

    @property
    def location(self) -> str:
        return self.store.uri(self.slug)

    def parts(self) -> list[str]:
        return self.table.parts()

    def frame(self) -> pd.DataFrame:
        """All cached rewards, deduplicated by (image_key, text)."""
        if self._frame is None:
            self._frame = self.table.read()
        return self._frame

    def append(self, df: pd.DataFrame) -> None:
        """Persist one batch of rewards atomically."""
        if len(df):
            self.table.append(df)
            self._frame = None

    def compact(self) -> None:
        """Merge the part files into one (safe to interrupt at any point)."""
        self.table.compact()
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
            raise KeyError(
                f"{int(np.isnan(got).sum())} rewards of {self.model_id} are not in the cache {self.location}"
            )
        return np.split(got, np.cumsum(lens)[:-1])
