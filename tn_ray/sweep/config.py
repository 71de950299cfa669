"""The sweep YAML: what to tune, how to search, where the results go.

```yaml
name: tia2-counting              # folder name of the sweep
trainable: tia2_textnorm         # a registered trainable (tn_ray.sweep.registry) or "module:attr"
options: {run_dir: results/tia2/eval, sets: [counting]}   # the trainable's fixed settings
space:                           # searched parameters
  tau: {loguniform: [0.01, 10]}
  kind: {choice: [mean, uncertainty]}
metric: objective
mode: max
num_samples: 40
```

Everything is validated before Ray starts; an error names the key (``space.tau.loguniform``).
"""
from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from tn_ray.config import RayConfig, StrictModel

SAMPLERS = ("loguniform", "uniform", "choice", "grid")


class ParamSpec(StrictModel):
    """One searched parameter: exactly one of the four kinds."""

    loguniform: tuple[float, float] | None = Field(None, description="[low, high], sampled log-uniformly (parameter "
                                                                     "units; low > 0)")
    uniform: tuple[float, float] | None = Field(None, description="[low, high], sampled uniformly (parameter units)")
    choice: list[Any] | None = Field(None, min_length=1, description="values sampled by the searcher (any YAML values, "
                                                                     "lists included)")
    grid: list[Any] | None = Field(None, min_length=1, description="values all run once each (every parameter of the "
                                                                   "space must then be a grid)")

    @model_validator(mode="after")
    def _one_kind(self) -> ParamSpec:
        given = [k for k in SAMPLERS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {list(SAMPLERS)}, got {given or 'none'}")
        for kind in ("loguniform", "uniform"):
            bounds = getattr(self, kind)
            if bounds is not None:
                low, high = bounds
                if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
                    raise ValueError(f"{kind}: need finite low < high, got [{low}, {high}]")
                if kind == "loguniform" and low <= 0:
                    raise ValueError(f"loguniform: low must be > 0, got {low}")
        values = self.choice if self.choice is not None else self.grid
        if values is not None and len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise ValueError(f"{self.kind}: values repeat: {values}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in SAMPLERS if getattr(self, k) is not None)

    @property
    def values(self) -> list[Any] | None:
        """The discrete values (choice / grid), None for a range."""
        return self.choice if self.choice is not None else self.grid

    def contains(self, value: Any) -> bool:
        if self.values is not None:
            return json.dumps(value, sort_keys=True) in {json.dumps(v, sort_keys=True) for v in self.values}
        low, high = getattr(self, self.kind)
        return isinstance(value, (int, float)) and low <= value <= high

    def candidates(self) -> list[Any]:
        """Values to check against the trainable: every discrete value, or both bounds."""
        return list(self.values) if self.values is not None else list(getattr(self, self.kind))


class Resources(StrictModel):
    cpu: float = Field(1.0, ge=0, description="CPUs reserved per trial (count)")
    gpu: float = Field(0.0, ge=0, description="GPUs reserved per trial (count; 1 for a training trial on a GPU)")


class AshaConfig(StrictModel):
    max_t: int = Field(..., ge=1, description="most reports (epochs) a trial may run (time_attr units)")
    grace_period: int = Field(
        1, ge=1, description="reports every trial gets before it can be stopped (time_attr units)"
    )
    reduction_factor: float = Field(2.0, gt=1, description="1/fraction of trials promoted at each rung (ratio)")
    time_attr: str = Field(
        "training_iteration", description="result key that counts progress (default: number of reports)"
    )

    @model_validator(mode="after")
    def _grace(self) -> AshaConfig:
        if self.grace_period > self.max_t:
            raise ValueError(f"grace_period ({self.grace_period}) must be <= max_t ({self.max_t})")
        return self


class HeldOutConfig(StrictModel):
    folds: int = Field(5, ge=2, description="k of the k-fold split over prompts (count)")
    seed: int = Field(0, description="seed of the fold assignment")


class SweepConfig(StrictModel):
    name: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="sweep name: folder under results/sweeps/ and the Tune experiment name",
    )
    trainable: str = Field(
        ..., description="registered trainable name (tn-ray sweep --list) or 'package.module:attribute'"
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="the trainable's fixed settings (validated by the trainable's own config model)",
    )
    space: dict[str, ParamSpec] = Field(
        ..., min_length=1, description="searched parameters: name -> {loguniform|uniform|choice|grid}"
    )
    fixed: dict[str, Any] = Field(
        default_factory=dict, description="parameters held constant in every trial (name -> value)"
    )
    metric: str = Field("objective", description="result key the searcher optimises")
    mode: Literal["max", "min"] = Field("max", description="maximise or minimise `metric`")
    num_samples: int | None = Field(
        None, ge=1, description="trials to run (count); None = the grid size for a grid space, else 20"
    )
    max_concurrent_trials: int = Field(2, ge=1, description="trials running at once (count)")
    seed: int = Field(0, description="seed of the Optuna sampler (TPE, or the grid order)")
    points_to_evaluate: list[dict[str, Any]] = Field(
        default_factory=list, description="configurations tried first (each a full assignment of `space`)"
    )
    resources: Resources = Field(default_factory=Resources, description="resources reserved per trial")
    scheduler: AshaConfig | None = Field(
        None, description="ASHA early stopping for trainables that report per epoch; None = run every trial to the end"
    )
    storage_path: str | None = Field(
        None, description="where Tune keeps the sweep: a local folder or a cloud URI (s3://, gs://); None = <out>/tune"
    )
    out: str | None = Field(
        None, description="local folder for the summary (CSV, best config, plots); None = results/sweeps/<name>"
    )
    heldout: HeldOutConfig | None = Field(
        None, description="also run the k-fold held-out protocol over prompts (evaluation trainables only)"
    )
    keep_checkpoints: int | None = Field(
        2, ge=1, description="checkpoints kept per training trial, newest first (count); None = all"
    )
    experiment_checkpoint_s: float = Field(
        2.0, gt=0, description="how often Tune snapshots the sweep state for --resume (seconds)"
    )
    verbose: int = Field(1, ge=0, le=2, description="Tune's console output: 0 silent, 1 status table, 2 every result")
    ray: RayConfig = Field(default_factory=RayConfig, description="where Ray runs")

    @field_validator("space")
    @classmethod
    def _space_kinds(cls, space: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        slashed = [k for k in space if "/" in k]
        if slashed:
            raise ValueError(f"parameter names cannot contain '/' (Tune nests on it): {slashed}")
        grid = [n for n, p in space.items() if p.kind == "grid"]
        if grid and len(grid) != len(space):
            other = sorted(set(space) - set(grid))
            raise ValueError(
                f"grid parameters {grid} cannot be mixed with sampled ones {other}: "
                "use `choice` for a searched discrete parameter, or make them all grids"
            )
        return space

    @field_validator("fixed")
    @classmethod
    def _fixed(cls, fixed: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        slashed = [k for k in fixed if "/" in k]
        if slashed:
            raise ValueError(f"parameter names cannot contain '/' (Tune nests on it): {slashed}")
        clash = sorted(set(info.data.get("space") or {}) & set(fixed))
        if clash:
            raise ValueError(f"parameters {clash} are also in `space`")
        return fixed

    @field_validator("num_samples")
    @classmethod
    def _num_samples(cls, n: int | None, info: ValidationInfo) -> int | None:
        space = info.data.get("space") or {}
        if n is not None and space and all(p.kind == "grid" for p in space.values()):
            size = math.prod(len(p.grid) for p in space.values())
            if n > size:
                raise ValueError(f"{n} exceeds the grid's {size} points (a grid point would run twice)")
        return n

    @field_validator("points_to_evaluate")
    @classmethod
    def _points(cls, points: list[dict[str, Any]], info: ValidationInfo) -> list[dict[str, Any]]:
        space = info.data.get("space") or {}
        for i, point in enumerate(points):
            if space and set(point) != set(space):
                raise ValueError(f"[{i}] must assign exactly {sorted(space)}, got {sorted(point)}")
            outside = [k for k, v in point.items() if k in space and not space[k].contains(v)]
            if outside:
                raise ValueError(f"[{i}]: {outside[0]}={point[outside[0]]!r} is outside space.{outside[0]}")
        return points

    @property
    def is_grid(self) -> bool:
        return all(p.kind == "grid" for p in self.space.values())

    @property
    def grid_size(self) -> int:
        return math.prod(len(p.grid) for p in self.space.values() if p.grid is not None)

    @property
    def trials(self) -> int:
        """Number of trials this sweep runs."""
        if self.num_samples is not None:
            return self.num_samples
        return self.grid_size if self.is_grid else 20

    def out_dir(self) -> str:
        return self.out or f"results/sweeps/{self.name}"

    def search_fingerprint(self) -> dict[str, Any]:
        """The settings a resumed sweep must share with the interrupted one (Tune restores the
        search, the trial count and the concurrency as they were; a change would be ignored)."""
        return self.model_dump(
            mode="json",
            include={
                "trainable",
                "options",
                "space",
                "fixed",
                "metric",
                "mode",
                "seed",
                "points_to_evaluate",
                "scheduler",
                "heldout",
                "num_samples",
                "max_concurrent_trials",
                "resources",
            },
        )
