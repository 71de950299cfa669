"""Reward models: one registry by name, one three-step interface (see ``base``)."""
from tn_ray.rewards.base import ModelLoadError, RewardModel, RewardSpec
from tn_ray.rewards.registry import available, build, parse, register

__all__ = ["ModelLoadError", "RewardModel", "RewardSpec", "available", "build", "parse", "register"]
