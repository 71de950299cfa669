"""Reward models by name (as ddpo-pytorch's ``rewards.py``): ``name[:source]``.

``source`` is ``tiny`` (same class, small config, random weights), a model id, or a local
path; none means the paper's default weights. Other issues add models with ``@register``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from tn_ray.errors import UnknownName
from tn_ray.rewards.base import RewardModel, RewardSpec

# name -> "module:Class"; imported lazily so listing names costs no torch import
_REGISTRY: dict[str, str] = {
    "clip": "tn_ray.rewards.clip:ClipReward",
    "pickscore": "tn_ray.rewards.pickscore:PickScoreReward",
    "imagereward": "tn_ray.rewards.imagereward:ImageRewardReward",
    "blip2": "tn_ray.rewards.blip2:Blip2Reward",  # Q-Former image-text contrastive similarity
    "blip2-itm": "tn_ray.rewards.blip2:Blip2ItmReward",  # the same model's image-text matching head
    "brightness": "tn_ray.rewards.brightness:BrightnessReward",  # mean pixel value: a cheap learnable reward (tests)
    # small CLIP trained on the synthetic world (docs/world.md)
    "worldclip": "tn_ray.rewards.worldclip:WorldClipReward",
    "worldjudge": "tn_ray.rewards.worldjudge:WorldJudgeReward",  # the world's exact judge: 1 = a match, else 0
    "learned": "tn_ray.rewards.learned:LearnedReward",  # learned:<folder>: a head trained by `tn-ray reward train`
}
_FACTORIES: dict[str, Callable[..., RewardModel]] = {}


def register(name: str, target: str | Callable[..., RewardModel]) -> None:
    """Add a reward model: ``target`` is a class/factory or a ``"module:Class"`` string."""
    if isinstance(target, str):
        _REGISTRY[name] = target
    else:
        _FACTORIES[name] = target


def available() -> list[str]:
    return sorted(set(_REGISTRY) | set(_FACTORIES))


def parse(spec: str | RewardSpec) -> RewardSpec:
    """Parse and check that the name is registered (no model is loaded)."""
    s = spec if isinstance(spec, RewardSpec) else RewardSpec.parse(spec)
    if s.name not in available():
        raise UnknownName(f"unknown reward model '{s.name}' (from '{spec}'); available: {', '.join(available())}")
    return s


def build(spec: str | RewardSpec, device: str | None = None, **kwargs) -> RewardModel:
    """Load the reward model named by ``spec`` (e.g. ``clip:tiny``)."""
    s = parse(spec)
    if s.name in _FACTORIES:
        return _FACTORIES[s.name](s, device=device, **kwargs)
    module, _, name = _REGISTRY[s.name].partition(":")
    cls = getattr(importlib.import_module(module), name)
    if getattr(cls, "composes", False):  # a reward built on other rewards (learned:) builds them through this registry
        kwargs["build"] = build
    return cls(s, device=device, **kwargs)
