"""The study's YAML as a validated config: :class:`StudyConfig` (methods, rewards, seeds, truth, overrides, the
``cost`` and ``report`` blocks), its per-method rules (:data:`METHODS`) and :func:`load_study`."""

from __future__ import annotations

import importlib
import re
import typing
from typing import Any, Literal

from pydantic import (
    BaseModel,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from tn_ray.config import ConfigError, OutputLocation, StrictModel, apply_overrides, format_validation_error, read_yaml
from tn_ray.errors import TnRayError
from tn_ray.textnorm.columns import RewardConfig

# method -> (its config class, its run function, the dotted key of its KL coefficient; None: it has none)
METHODS: dict[str, tuple[str, str, str | None]] = {
    "bestofn": ("tn_ray.experiments.bestofn:BestOfNConfig", "tn_ray.experiments.bestofn:run", None),
    "rwr": ("tn_ray.training.rwr:RwrConfig", "tn_ray.training.rwr:run", "beta"),
    "ddpo": ("tn_ray.training.ddpo:DDPOConfig", "tn_ray.training.ddpo:run", "train.kl_coef"),
    "grpo": ("tn_ray.training.grpo:GRPOConfig", "tn_ray.training.grpo:run", "train.beta"),
}
FINETUNE = tuple(m for m, spec in METHODS.items() if spec[2])
NAME = re.compile(r"^[A-Za-z0-9_]+$")
# keys of a best-of-n run the study sets (the rest come from the entry's YAML and overrides)
BESTOFN_OWN = ("out", "models", "ensembles", "pools", "top_k", "generation.seed", "cache_dir", "human_eval")


def load_target(target: str) -> Any:
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def config_class(method: str) -> type:
    return load_target(METHODS[method][0])


def flatten(overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Overrides as dotted keys: a nested mapping merges key by key (``{eval: {every: 5}}`` -> ``eval.every``);
    lists, scalars and empty mappings are values."""
    out: dict[str, Any] = {}
    for k, v in overrides.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, f"{key}.") if isinstance(v, dict) and v else {key: v})
    return out


def has_key(model: type[BaseModel], dotted: str) -> bool:
    """Whether ``dotted`` (``train.kl_coef``) names a field of ``model``, through its nested config blocks."""
    node: Any = model
    for part in dotted.split("."):
        if not (isinstance(node, type) and issubclass(node, BaseModel)) or part not in node.model_fields:
            return False
        annotation = node.model_fields[part].annotation
        inner = [
            a for a in (annotation, *typing.get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        node = inner[0] if inner else None
    return True


class MethodEntry(StrictModel):
    """One method of the grid: a base config and either a KL grid (fine-tuning) or an n list (best-of-n)."""

    method: Literal["bestofn", "rwr", "ddpo", "grpo"] | None = Field(
        None,
        description="the method that runs this entry's cells: bestofn (`tn-ray bestofn`), rwr, ddpo or grpo; None = "
        "the entry's name, which must then be one of them (two entries of one method: name them apart and set this)",
    )
    config: str = Field(
        ...,
        description="the method's base YAML (BestOfNConfig / RwrConfig / DDPOConfig / GRPOConfig; a path from the "
        "working folder): every run of this entry starts from it; the keys the study sets per run are replaced",
    )
    kl_key: str | None = Field(
        None,
        description="fine-tuning only: dotted key of the method's KL coefficient in that config; None = the method's "
        "own (rwr: beta; ddpo: train.kl_coef; grpo: train.beta); each value of `kl` is set there",
    )
    kl: list[NonNegativeFloat] | None = Field(
        None,
        min_length=1,
        description="fine-tuning only (required there): KL coefficients (unitless, >= 0; in the method's own sense: "
        "docs/rwr.md, docs/ddpo.md, docs/grpo.md), one cell per value x reward row x seed",
    )
    n: list[PositiveInt] | None = Field(
        None,
        min_length=1,
        description="best-of-n only (required there): pool sizes n (images per prompt; nested: the first n samples); "
        "one cell per n x reward row x seed, all of a seed's cells from one generation of max(n) images per prompt",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="dotted keys set in this entry's runs after the grid's `overrides` (fine-tuning) or alone "
        "(best-of-n), e.g. generation.samples_per_prompt; a nested mapping merges key by key",
    )


class ReportBlock(StrictModel):
    confidence: float = Field(0.95, gt=0, lt=1, description="confidence level of the report's intervals (probability)")
    resamples: int = Field(2000, ge=100, description="bootstrap resamples of each interval (count)")
    seed: int = Field(0, ge=0, description="seed of the bootstrap resampling")


class CostBlock(StrictModel):
    """Per-unit seconds that price the counted work (``--dry-run``); measured on the device the study runs on."""

    device: str = Field("2 CPU cores", description="what the seconds below were measured on (shown in the estimate)")
    image_step_s: PositiveFloat = Field(
        0.01,
        description="seconds of one image through one denoising step of sampling (a UNet / transformer forward, "
        "guidance included): generation, RWR's images, DDPO / GRPO's chains, evaluation images (s)",
    )
    train_step_s: PositiveFloat = Field(
        0.03,
        description="seconds of one image through one trained timestep (forward + backward; RWR: one timestep per "
        "image and step; DDPO / GRPO: the kept timesteps of each chain per inner epoch) (s)",
    )
    score_s: PositiveFloat = Field(0.005, description="seconds of one image scored by one reward model (s)")


class TrialsBlock(StrictModel):
    """How the unfinished runs execute: the trials of one Ray Tune experiment, a trial per run."""

    max_concurrent: PositiveInt = Field(
        1,
        description="runs executing at once (Tune trials); each run holds its own Ray Train workers, generation "
        "actors and reward actors (its config's scaling / scoring / generation blocks), so 1 on 2 CPU cores; on a "
        "cluster about the cluster's GPUs / one run's (count)",
    )
    cpu: NonNegativeFloat = Field(
        0.25,
        description="CPUs a trial's function holds (count); it only waits on its run's workers and actors, which "
        "reserve their own: trials x cpu + one run's reservations must fit the Ray cluster",
    )


class StudyConfig(StrictModel):
    """``tn-ray study CONFIG``: rewards x methods (best-of-n n list; RWR / DDPO / GRPO KL grid) x seeds, judged by
    one truth column. ``tn-ray world finetune CONFIG`` takes the same file (fine-tuning methods only)."""

    out: OutputLocation = Field(
        "results/study",
        description="study folder: cells/<run id>/ (each run's folder), cache/ (best-of-n score cache), shared/ "
        "(RWR cells' shared generations and reward cache), grid.yaml, the report",
    )
    truth: str = Field(
        ...,
        description="the column every report reads as the judge of record: a reward model spec (on the world "
        "worldjudge, exact truth: 1 = the image matches its prompt, 0 = not; elsewhere a held-out judge), added "
        "to each fine-tuning cell's eval.judges unless the cell trains on it, and scored on every best-of-n image",
    )
    methods: dict[str, MethodEntry] = Field(
        ..., min_length=1, description="method entries by name (letters, digits, _): base YAML and KL grid or n list"
    )
    rewards: dict[str, RewardConfig] = Field(
        ...,
        min_length=1,
        description="training / selection rewards by row name (letters, digits, _), each a `reward` block of the "
        "fine-tuning configs (models, use, textnorm, ensembles, contrast); best-of-n selects with each row's `use`",
    )
    seeds: list[NonNegativeInt] = Field(
        default_factory=lambda: [0],
        min_length=1,
        description="seeds: each fine-tuning cell's `seed` (noise, timesteps, data order, LoRA init) and each "
        "best-of-n run's generation.seed; evaluation prompts and eval seeds are the base configs', the same in "
        "every cell",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="dotted keys set in every fine-tuning cell's config (after its base YAML, before the method's "
        "overrides), e.g. {max_steps: 50, eval.every: 10}; a nested mapping merges key by key; `out`, `seed`, "
        "`reward` and the KL keys are the grid's own. Best-of-n runs take only their entry's overrides",
    )
    cost: CostBlock = Field(default_factory=CostBlock, description="per-unit seconds of the --dry-run estimate")
    report: ReportBlock = Field(default_factory=ReportBlock, description="the report's bootstrap intervals")
    trials: TrialsBlock = Field(
        default_factory=TrialsBlock, description="the runs as Tune trials: how many at once, each one's CPUs"
    )

    @model_validator(mode="after")
    def _grid(self) -> StudyConfig:
        object.__setattr__(self, "overrides", flatten(self.overrides))
        for entry in self.methods.values():
            object.__setattr__(entry, "overrides", flatten(entry.overrides))
        for where, names in (("methods", self.methods), ("rewards", self.rewards)):
            bad = [n for n in names if not NAME.match(n)]
            if bad:
                raise ValueError(f"{where}: name '{bad[0]}' must be letters, digits and _ only (it goes into cell ids)")
        try:
            canon = RewardConfig(models=[self.truth], use=self.truth).use
        except ValidationError as err:
            raise ValueError(f"truth: {err.errors()[0]['msg'].removeprefix('Value error, ')}") from None
        except TnRayError as err:
            raise ValueError(f"truth: {err}") from None
        object.__setattr__(self, "truth", canon)
        for name, entry in self.methods.items():
            self._entry(name, entry)
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: repeated seed in {self.seeds}")
        return self

    def _entry(self, name: str, entry: MethodEntry) -> None:
        method = entry.method or name
        if method not in METHODS:
            raise ValueError(
                f"methods.{name}.method: '{method}' is not a method; known: {sorted(METHODS)} (set "
                f"`method:` for an entry named otherwise)"
            )
        if method == "bestofn":
            for key in ("kl", "kl_key"):
                if getattr(entry, key) is not None:
                    raise ValueError(
                        f"methods.{name}.{key}: best-of-n has no KL coefficient (a KL grid is for {', '.join(FINETUNE)}"
                        "); its grid is `n`"
                    )
            if entry.n is None:
                raise ValueError(f"methods.{name}.n: best-of-n needs its n list (pool sizes), e.g. [1, 4, 16]")
            if len(set(entry.n)) != len(entry.n):
                raise ValueError(f"methods.{name}.n: repeated value in {entry.n}")
            object.__setattr__(entry, "n", sorted(entry.n))
            clash = [k for k in entry.overrides if any(k == o or k.startswith(f"{o}.") for o in BESTOFN_OWN)]
            if clash:
                raise ValueError(
                    f"methods.{name}.overrides: '{clash[0]}' is set per run by the study ({', '.join(BESTOFN_OWN)})"
                )
            return
        if entry.n is not None:
            raise ValueError(f"methods.{name}.n: an n list is for best-of-n; {method} takes a KL grid (`kl`)")
        if entry.kl is None:
            raise ValueError(f"methods.{name}.kl: {method} needs its KL grid, e.g. [0, 1]")
        if entry.kl_key is None:
            object.__setattr__(entry, "kl_key", METHODS[method][2])
        cls = config_class(method)
        if not has_key(cls, entry.kl_key):
            raise ValueError(
                f"methods.{name}.kl_key: '{entry.kl_key}' is not a key of {cls.__name__}; "
                f"{method}'s KL coefficient is '{METHODS[method][2]}'"
            )
        ids = [f"{k:g}" for k in entry.kl]
        if len(set(ids)) != len(ids):
            raise ValueError(f"methods.{name}.kl: repeated value in {entry.kl}")
        own = ("out", "seed", "reward", entry.kl_key)
        for source, keys in (("overrides", self.overrides), (f"methods.{name}.overrides", entry.overrides)):
            clash = [k for k in keys if any(k == o or k.startswith(f"{o}.") for o in own)]
            if clash:
                raise ValueError(
                    f"{source}: '{clash[0]}' is set per cell by the grid (out, seed, reward and "
                    f"{entry.kl_key} of {name}); set it through the grid's keys"
                )


GridConfig = StudyConfig  # `tn-ray world finetune`'s name for the same config (one grid)


def load_study(path: str, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """The study in ``path`` with dotted ``overrides``; a bad key or value is one :class:`ConfigError` line naming
    the file and the key."""

    data = apply_overrides(read_yaml(path), overrides, f"{path} (with overrides)")
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(one_line_error(err, str(path), "study")) from None


def one_line_error(err: ValidationError, source: str, label: str) -> str:
    lines = format_validation_error(err, source).splitlines()[1:]
    return f"{source}: {label}: " + "; ".join(line.strip() for line in lines)
