"""``worldjudge``: the synthetic world's exact judge as a reward (docs/world.md).

Reward = 1.0 when the image, read back into a scene (:mod:`tn_ray.data.world.reading`), matches
the prompt by the world's oracle, else 0.0: a wrong scene and an unparseable image both score 0
(:func:`tn_ray.data.world.judge.judge` tells them apart). No weights, nothing to download: the
same in every process. Images must be the world's (square, 32..128 px) and prompts in its grammar;
anything else is an :class:`~tn_ray.errors.InputError` naming the image size or the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from tn_ray.data.world.judge import decide, parse_prompts
from tn_ray.data.world.reading import read_scenes
from tn_ray.errors import InputError
from tn_ray.rewards.base import RewardModel, RewardSpec


class WorldJudgeReward(RewardModel):
    name = "worldjudge"

    def __init__(self, spec: RewardSpec, device: str | None = None, text_batch_size: int = 64):
        if spec.source is not None:
            raise InputError(f"'{spec}': worldjudge has no weights or settings; use 'worldjudge'")
        super().__init__(spec, device, text_batch_size)

    # features: an image's Reading, a text's WorldPrompt (lists, not tensors)
    def encode_images(self, images: Sequence[Image.Image]) -> list:
        return read_scenes(list(images))

    def encode_texts(self, texts: Sequence[str]) -> list:
        return parse_prompts(list(texts))

    def join_text_features(self, items: list[Any]) -> list:
        return list(items)

    def select_images(self, image_features: list, rows: Sequence[int]) -> list:
        return [image_features[r] for r in rows]

    def score(self, image_features: list, text_features: list) -> torch.Tensor:
        out = np.array(
            [[decide(reading, prompt).match for prompt in text_features] for reading in image_features],
            dtype=np.float32,
        ).reshape(len(image_features), len(text_features))
        return torch.from_numpy(out)

    def score_rows(self, images: Sequence[Any], texts_per_image: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """As the base class, but every prompt is checked against the grammar before any image is read."""
        self.text_features(list(dict.fromkeys(t for texts in texts_per_image for t in texts)))
        return super().score_rows(images, texts_per_image)
