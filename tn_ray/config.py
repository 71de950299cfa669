"""Typed configuration loaded from YAML, validated with errors that name the bad key.

Every experiment config is a pydantic model whose fields carry a one-line description
(what it means and its unit). ``load_config(path, Model)`` reads YAML, rejects unknown
keys, and raises :class:`ConfigError` naming the file, the dotted key and the bad value.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from tn_ray.errors import TnRayError
from tn_ray.storage import absolute

T = TypeVar("T", bound=BaseModel)


class ConfigError(TnRayError, ValueError):
    """A configuration file or value is invalid; the message names file, key and value."""


# an output folder or cloud URI of a run whose files Ray workers write: resolved in the driver
# (storage.absolute), since workers run in Ray's own working folders
OutputLocation = Annotated[str, AfterValidator(absolute)]


class StrictModel(BaseModel):
    """Base of every config: unknown keys are errors, assignments are validated, and no float
    field takes ``inf`` or ``nan`` (every configured number is finite; the error names the key)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def format_validation_error(err: ValidationError, source: str, prefix: tuple[str, ...] = ()) -> str:
    """pydantic's errors as lines naming the dotted key (under ``prefix``) and the bad value.

    A cross-field check (a model validator) has no key of its own: its line names the block
    it belongs to (or the file) and its message names the fields; the block's content is
    never dumped.
    """
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = [*prefix, *(str(p) for p in e["loc"])]
        key = ".".join(loc)
        msg = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"  key '{key}': unknown key (typo?)")
        elif e["type"] in ("value_error", "assertion_error") and isinstance(e.get("input"), dict):
            lines.append(f"  key '{key}': {msg}" if key else f"  {msg}")  # cross-field: the block, never a dump
        else:
            got = e.get("input")
            shown = repr(got) if not isinstance(got, (dict, list)) or len(repr(got)) < 80 else f"{repr(got)[:77]}..."
            lines.append(f"  key '{key or '<top level>'}': {msg} (got {shown})")
    return "\n".join(lines)


def validate(model: type[T], data: dict[str, Any], source: str = "<config>", prefix: tuple[str, ...] = ()) -> T:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, prefix)) from None


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` arguments as dotted overrides (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: value {value!r} is not valid YAML ({err.problem})") from None
    return out


def apply_overrides(
    data: dict[str, Any], overrides: dict[str, Any] | None, source: str = "command line"
) -> dict[str, Any]:
    """``data`` with dotted keys (``scoring.batch_size``) set; a key that goes through a
    value that is not a mapping is a :class:`ConfigError` naming it."""
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parents[: i + 1])
                raise ConfigError(f"{source}: cannot set '{dotted}': '{where}' is {child!r}, not a mapping of keys")
            node = child
        node[leaf] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; :class:`ConfigError` naming the file for a missing file,
    bytes that are not UTF-8, invalid YAML (with line), an empty file or a non-mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file not found: {path}" if not path.exists() else f"config path {path} is not a file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    if data is None:
        raise ConfigError(
            f"{path}: the file is empty; write the keys you want (an empty file would silently mean 'all defaults')"
        )
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data


def load_config(path: str | Path, model: type[T], overrides: dict[str, Any] | None = None) -> T:
    """Load ``path`` (YAML) into ``model``; ``overrides`` (dotted keys) win over the file."""
    data = apply_overrides(read_yaml(path), overrides, f"{path} (with overrides)")
    return validate(model, data, str(path))


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Write a config as YAML (secrets are never config fields, so nothing to redact)."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


# ---------------------------------------------------------------------------------------
# Shared config blocks
# ---------------------------------------------------------------------------------------


class RayConfig(StrictModel):
    address: str | None = Field(
        None, description="Ray cluster address ('auto' to join a running cluster); None starts a local Ray in-process"
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs a local Ray may use (count); None = all of this machine")
    num_gpus: int | None = Field(
        None, ge=0, description="GPUs a local Ray may use (count); None = what torch/Ray detect"
    )


class ScoringConfig(StrictModel):
    batch_size: int = Field(32, ge=1, description="images per map_batches batch sent to a reward actor (images)")
    num_actors: int | None = Field(
        None, ge=1, description="reward actors per model (count); None = one per GPU, or 1 on a CPU-only cluster"
    )
    gpus_per_actor: float = Field(
        1.0, gt=0, le=1, description="GPU share per reward actor when GPUs exist (fraction of one GPU)"
    )
    cpus_per_actor: float = Field(1.0, gt=0, description="CPUs reserved per reward actor (count)")
    text_batch_size: int = Field(64, ge=1, description="prompts encoded per forward pass of the text tower (prompts)")
    keep_warm: bool | None = Field(
        None,
        description="keep this run's reward actors loaded after it, for later runs of the same Ray cluster (a sweep's "
        "trials, a study's cells) to borrow instead of starting their own: saves each actor's start-up and model load "
        "(about 12 s on 2 CPU cores). Kept actors reserve no CPUs on a CPU-only cluster and their GPU share otherwise; "
        "at most TN_RAY_MAX_WARM_REWARDS (default 6), least recently used evicted. None = the environment's choice "
        "(TN_RAY_KEEP_WARM_REWARDS=1 turns it on; the test suite does); learned: heads are never kept "
        "(tn_ray/scoring/warm_actors.py)",
    )
