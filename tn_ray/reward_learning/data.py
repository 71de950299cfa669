"""Labelled (prompt, image) pairs for reward learning: TIA2-format label files, their images,
contrastive prompts, and the split by prompt.

One row per image: ``set, prompt, image_id, labels, binary, fine`` (as
:func:`tn_ray.data.tia2.labels_frame` reads them), ``image`` (path or URI), ``image_key``
(``<set>/<image_id>``, the key of the feature and reward caches) and ``texts`` =
``[x0, x1..xm]``. :func:`split_by_prompt` gives every *prompt* one part (train / val / test),
seeded and stratified by set, so no prompt's images are seen in training and judged later.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from tn_ray.data.tia2 import labels_frame
from tn_ray.errors import InputError
from tn_ray.prompts.contrast import sets_for, texts_for
from tn_ray.reward_learning.config import DataBlock, SplitBlock
from tn_ray.scoring.images import check_images
from tn_ray.storage import Store, read_json

PARTS = ("train", "val", "test")


def read_labels(data: DataBlock) -> pd.DataFrame:
    """Every label file of ``data.sets`` as rows (no image is opened here)."""

    frames = []
    for set_name, src in data.sets.items():
        labels = labels_frame(read_json(src.labels, "label file"), set_name, src.labels)
        if labels.empty:
            raise InputError(f"{src.labels}: no labelled images")
        images = Store(src.images)
        frames.append(labels.assign(image=[images.uri(n) for n in labels["image_id"]],
                                    image_key=[f"{set_name}/{n}" for n in labels["image_id"]]))
    return pd.concat(frames, ignore_index=True)


def attach_texts(frame: pd.DataFrame, data: DataBlock) -> pd.DataFrame:
    """``frame`` with ``texts`` = [x0, x1..xm] per row (contrastive sets checked, errors name the prompt)."""

    texts: list[list[str]] = [[] for _ in range(len(frame))]
    for set_name, rows in frame.groupby("set", sort=False).groups.items():
        prompts = list(frame.loc[rows, "prompt"])
        sets = sets_for(data.contrast, prompts, set_name=set_name, tia2_dir=data.tia2_dir)
        origin = data.contrast.replace("{set}", set_name)
        for i, t in zip(rows, texts_for(prompts, sets, origin)):
            texts[frame.index.get_loc(i)] = t if data.max_contrast is None else t[: 1 + data.max_contrast]
    return frame.assign(texts=texts)


def split_by_prompt(frame: pd.DataFrame, split: SplitBlock) -> pd.Series:
    """The part (``train`` / ``val`` / ``test``) of each row, decided per prompt text.

    Within each set (a prompt counts in the first set it appears in) the prompts are shuffled
    with ``split.seed`` and the first ``round(n * test)`` go to test, the next
    ``round(n * val)`` to validation, the rest to training; a set with at least three prompts
    keeps at least one in each requested part. Rows of one prompt always share a part.
    """
    owner = frame.drop_duplicates("prompt").set_index("prompt")["set"]
    rng = np.random.default_rng(split.seed)
    part_of: dict[str, str] = {}
    for set_name in dict.fromkeys(owner.tolist()):
        prompts = sorted(owner.index[owner == set_name])
        order = [prompts[i] for i in rng.permutation(len(prompts))]
        n = len(order)
        n_test, n_val = round(n * split.test), round(n * split.val)
        if n >= 3:
            n_test = max(n_test, 1 if split.test > 0 else 0)
            n_val = max(n_val, 1 if split.val > 0 else 0)
            while n_test + n_val > n - 1:  # keep a training prompt
                if n_val >= n_test and n_val > 0:
                    n_val -= 1
                else:
                    n_test -= 1
        for i, p in enumerate(order):
            part_of[p] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return frame["prompt"].map(part_of).rename("part")


def load(data: DataBlock) -> pd.DataFrame:
    """Rows with texts and part, every image checked to exist and decode (before any model loads)."""

    frame = read_labels(data)
    dup = frame["image_key"].duplicated()
    if dup.any():
        raise InputError(f"image {frame.loc[dup, 'image_key'].iloc[0]} is labelled twice")
    frame = attach_texts(frame, data)
    frame["part"] = split_by_prompt(frame, data.split).to_numpy()
    if not (frame["part"] == "train").any():
        raise InputError(f"no prompt falls in the train part (too few prompts for the split {data.split.model_dump()})")
    check_images(list(frame["image"]), ", ".join(s.images for s in data.sets.values()))
    return frame
