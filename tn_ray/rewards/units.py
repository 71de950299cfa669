"""Each reward model's unit, and how a temperature stated in another unit maps onto it.

TextNorm's temperature tau divides reward differences (eq. 1), so a tau means nothing without
the reward's unit. tn_ray's dual encoders return ``logit_scale x cosine`` (100 x cos for CLIP
and PickScore, as PickScore's authors compute PickScore), while the paper's figures show cosine
values (PickScore 0.232, CLIP 0.385): a tau of 0.01 on cosines is tau = 1 here. Light (no
torch): configs and the release's parameters are converted before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tn_ray.errors import InputError


@dataclass(frozen=True)
class Unit:
    text: str  # what one unit of the reward is, for docs and output labels
    per_cosine: float | None  # reward value per unit of cosine similarity; None: not a cosine reward


UNITS: dict[str, Unit] = {
    "clip": Unit("100 x cosine (OpenAI CLIP's logit_scale, 100, times the image-text cosine)", 100.0),
    "pickscore": Unit(
        "100 x cosine (PickScore's logit_scale, 100, times the cosine; as its authors compute it)", 100.0
    ),
    "blip2": Unit("cosine (BLIP-2 ITC: max over the 32 query embeddings of the cosine with the prompt)", 1.0),
    "blip2-itm": Unit("log-odds of BLIP-2's image-text-matching head", None),
    "imagereward": Unit("ImageReward score (its head's output standardized by the released mean and std)", None),
    "worldclip": Unit("logit_scale x cosine with the world CLIP's learned logit_scale (at most 100)", None),
    "worldjudge": Unit("1 if the image, read back into a scene, matches the prompt (the world's oracle), else 0", None),
    "brightness": Unit("mean pixel value in [0, 1]", None),
    "learned": Unit("a learned head's logit (docs/reward_learning.md)", None),
}

Reading = Literal["temperature", "multiplier"]
READINGS: tuple[str, ...] = ("temperature", "multiplier")


def unit(model: str) -> Unit:
    """The unit of a model spec's reward (``clip:tiny`` has CLIP's unit)."""
    name = model.split(":")[0]
    if name not in UNITS:
        raise InputError(f"reward model '{model}' has no documented unit (rewards/units.py)")
    return UNITS[name]


def release_tau(scale: float, model: str, reading: str) -> float:
    """tn_ray's tau (in ``model``'s own units) for a per-prompt ``scale`` of the TIA2 release.

    The release does not define ``scale``. Two readings, both on the authors' reward values
    (cosines for dual encoders, as the paper's figures show; ImageReward's own score):

    - ``temperature``: ``scale`` is eq. 1's tau: tau here = scale x (reward per cosine);
    - ``multiplier``: rewards are multiplied by ``scale`` before the softmax, i.e. tau = 1 / scale
      on the authors' values: tau here = (reward per cosine) / scale.

    A non-cosine reward (ImageReward) takes the same reading with a factor of 1.
    """
    if not scale > 0:
        raise InputError(f"release scale must be > 0, got {scale!r}")
    if reading not in READINGS:
        raise InputError(f"unknown reading '{reading}' of the release's scale; expected one of {list(READINGS)}")
    factor = unit(model).per_cosine or 1.0
    return factor * scale if reading == "temperature" else factor / scale
