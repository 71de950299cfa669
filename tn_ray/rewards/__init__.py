"""Reward models: one registry by name, one three-step interface (see ``base``)."""
from .base import ModelLoadError, RewardModel, RewardSpec
from .registry import available, build, parse, register

__all__ = ["ModelLoadError", "RewardModel", "RewardSpec", "available", "build", "parse", "register"]
