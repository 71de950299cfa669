"""Typed configuration loaded from YAML, validated with errors that name the bad key.

Every experiment config is a pydantic model whose fields carry a one-line description
(what it means and its unit). ``load_config(path, Model)`` reads YAML, rejects unknown
keys, and raises :class:`ConfigError` naming the file, the dotted key and the bad value.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names file, key and value."""


class StrictModel(BaseModel):
    """Base of every config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _format(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  key '{key}': unknown key (typo?)")
        else:
            lines.append(f"  key '{key}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def validate(model: type[T], data: dict[str, Any], source: str = "<config>") -> T:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format(err, source)) from None


def load_config(path: str | Path, model: type[T], overrides: dict[str, Any] | None = None) -> T:
    """Load ``path`` (YAML) into ``model``; ``overrides`` (dotted keys) win over the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return validate(model, data, str(path))


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Write a config as YAML (secrets are never config fields, so nothing to redact)."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


# ---------------------------------------------------------------------------------------
# Shared config blocks
# ---------------------------------------------------------------------------------------


class RayConfig(StrictModel):
    address: str | None = Field(None, description="Ray cluster address ('auto' to join a running cluster); None starts a local Ray in-process")
    num_cpus: int | None = Field(None, ge=1, description="CPUs a local Ray may use (count); None = all of this machine")
    num_gpus: int | None = Field(None, ge=0, description="GPUs a local Ray may use (count); None = what torch/Ray detect")


class ScoringConfig(StrictModel):
    batch_size: int = Field(32, ge=1, description="images per map_batches batch sent to a reward actor (images)")
    num_actors: int | None = Field(None, ge=1, description="reward actors per model (count); None = one per GPU, or 1 on a CPU-only cluster")
    gpus_per_actor: float = Field(1.0, gt=0, le=1, description="GPU share per reward actor when GPUs exist (fraction of one GPU)")
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per reward actor (count)")
    text_batch_size: int = Field(64, ge=1, description="prompts encoded per forward pass of the text tower (prompts)")
