"""``brightness``: a cheap, learnable reward for tests and the quickstart's fine-tuning steps.

The mean pixel value of the image in [0, 1], the same for every text (so its TextNorm is
uniform: use it raw). A random tiny pipeline's images move in brightness within a few LoRA
steps, which makes "the reward of fresh samples rises after training" a fast, real test of
an optimizer (RWR, DDPO), in the role ddpo-pytorch's ``jpeg_compressibility`` plays.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from tn_ray.rewards.base import RewardModel, RewardSpec


class BrightnessReward(RewardModel):
    name = "brightness"

    def __init__(self, spec: RewardSpec, device: str | None = None, text_batch_size: int = 64):
        super().__init__(spec, device, text_batch_size)

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.tensor([np.asarray(im.convert("RGB"), dtype=np.float32).mean() / 255.0 for im in images])

    def encode_texts(self, texts: Sequence[str]) -> Any:
        return torch.zeros(len(texts))

    def score(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return image_features.float()[:, None].expand(-1, len(text_features)).contiguous()
