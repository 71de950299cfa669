"""``learned:<folder>``: a reward head trained by ``tn-ray reward train`` on a frozen dual encoder.

The three steps are the backbone's towers and the head: ``encode_images`` and
``encode_texts`` are the backbone's (each image and text encoded once, cached like any
model's), and ``score`` runs the head over every (image, text) pair. So a learned reward works
wherever a reward model does (``tia2 eval``, ``score``, best-of-n, RWR, DDPO, sweeps), and
TextNorm applies to it as to any reward: ``use: textnorm(learned:<folder>)``. ``<folder>`` is
a local folder or a cloud URI holding ``head.json`` and ``head.safetensors``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from tn_ray.errors import InputError
from tn_ray.rewards.base import RewardModel, RewardSpec
from tn_ray.rewards.learned_head import load


class LearnedReward(RewardModel):
    name = "learned"

    composes = True  # the registry hands it its own `build` for the backbone (no import back into the registry)

    def __init__(self, spec: RewardSpec, device: str | None = None, text_batch_size: int = 64, *, build=None):
        super().__init__(spec, device, text_batch_size)

        if build is None:
            raise TypeError("LearnedReward is built through tn_ray.rewards.build, which passes `build`")

        if not spec.source:
            raise InputError("learned: give the trained head's folder, e.g. learned:results/reward/model-<hash>")
        self.head, self.meta = load(spec.source)
        self.backbone = build(self.meta["backbone"], device=device, text_batch_size=text_batch_size)
        self.head.to(self.backbone.device)

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.backbone.encode_images(images).float()

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.backbone.encode_texts(texts).float()

    def score(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return self.head.pairwise(image_features.float(), text_features.float()).float().cpu()
