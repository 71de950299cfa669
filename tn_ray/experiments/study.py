"""``tn-ray study CONFIG``: the paper's experiment grid from one YAML: rewards x methods (best-of-n over an n list;
RWR, DDPO, GRPO over a KL grid) x seeds, every result judged by one truth column, and one report (docs/study.md).

A study (:class:`StudyConfig`) names methods (each a base YAML; a fine-tuning method with the dotted key of its KL
coefficient and a KL grid, best-of-n with its n list), training / selection rewards (rows, each a
:class:`~tn_ray.textnorm.columns.RewardConfig` block), seeds, a truth column (a reward model spec, e.g.
``worldjudge`` on the world, a held-out judge elsewhere) and overrides. ``tn-ray world finetune`` is this module on a
grid of fine-tuning methods only (sweeps/world_finetune*.yaml): one implementation of the grid.

Runs (the units that execute; :func:`plan`):

- a fine-tuning cell is method x reward x kl x seed; its config is the method's YAML + ``overrides`` + the
  method's ``overrides`` + ``{reward: <row>, <kl_key>: kl, seed: s, out: <out>/cells/<cell id>}``, with the truth
  added to ``eval.judges`` as a held-out judge unless the row trains on it (then the training reward's column is
  the truth's); an RWR cell also gets ``generation.out: <out>/shared/<method>-generation-seed<g>-<tag>`` and
  ``cache_dir: <out>/shared/rwr-cache`` (unless set), so RWR cells whose base-model images are the same (same
  generation block, prompts and pipeline: :func:`generation_tag`; the reward, KL and cell seed do not enter)
  share one generation and one reward cache;
- a best-of-n run is one per (best-of-n entry, seed): its cells (reward x n) share one generation. Its config is
  the entry's YAML + the entry's ``overrides`` + ``{models: every row's models and the truth, ensembles: every
  row's, pools: n, top_k: [1], generation.seed: s, out: <out>/cells/<entry>-s<seed>, cache_dir: <out>/cache,
  human_eval: null}`` (the grid's ``overrides`` are the fine-tuning cells' only).

Every run's config is validated, and every unfinished run passes its preflight, before Ray starts. The runs go
one after another in one Ray session (:func:`run`; the methods' ``run`` functions start Ray only when it is not
up), seed-major. A run that returned gets ``done.json`` and is skipped by ``--resume``; an unfinished one is
entered again and resumes from its own checkpoints / generation cache. :func:`estimate` counts each run's
sampled image-steps, trained image-steps and reward scores, a shared RWR generation (and its cached scores)
once, and prices them with the study's ``cost`` block (``--dry-run``). The report (:func:`write_report`) joins
:mod:`tn_ray.analysis.finetune_report` (fine-tuning cells) and :mod:`tn_ray.analysis.study_report` (best-of-n
cells).
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import time
import typing
from dataclasses import dataclass
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

from tn_ray.config import ConfigError, OutputLocation, StrictModel, apply_overrides, format_validation_error
from tn_ray.errors import InputError, TnRayError
from tn_ray.textnorm.columns import RewardConfig

log = logging.getLogger(__name__)

# method -> (its config class, its run function, the dotted key of its KL coefficient; None: it has none)
METHODS: dict[str, tuple[str, str, str | None]] = {
    "bestofn": ("tn_ray.experiments.bestofn:BestOfNConfig", "tn_ray.experiments.bestofn:run", None),
    "rwr": ("tn_ray.training.rwr:RwrConfig", "tn_ray.training.rwr:run", "beta"),
    "ddpo": ("tn_ray.training.ddpo:DDPOConfig", "tn_ray.training.ddpo:run", "train.kl_coef"),
    "grpo": ("tn_ray.training.grpo:GRPOConfig", "tn_ray.training.grpo:run", "train.beta"),
}
FINETUNE = tuple(m for m, spec in METHODS.items() if spec[2])
NAME = re.compile(r"^[A-Za-z0-9_]+$")
DONE = "done.json"
# keys of a best-of-n run the study sets (the rest come from the entry's YAML and overrides)
BESTOFN_OWN = ("out", "models", "ensembles", "pools", "top_k", "generation.seed", "cache_dir", "human_eval")


def _target(target: str) -> Any:
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def config_class(method: str) -> type:
    return _target(METHODS[method][0])


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
    from tn_ray.config import read_yaml

    data = apply_overrides(read_yaml(path), overrides, f"{path} (with overrides)")
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err, str(path), "study")) from None


@dataclass(frozen=True)
class CellKey:
    """A cell's place in the grid and what the report needs of it (no config file read). A best-of-n cell has
    ``n`` set and ``kl`` NaN; its ``out`` is its run's folder (shared by the run's cells)."""

    index: int  # 1-based, in run order
    total: int
    id: str
    method: str  # the entry's name
    kind: str  # bestofn | rwr | ddpo | grpo
    reward: str  # the row's name
    kl: float
    seed: int
    out: str
    train: str  # the training reward's column
    truth: str  # the truth's column (== train when the row trains on the truth)
    n: int | None = None

    @property
    def label(self) -> str:
        what = "best-of-n run" if self.kind == "bestofn" and self.n is None else "cell"
        return f"{what} {self.index}/{self.total} {self.id}"

    @property
    def key(self) -> tuple:
        return (self.method, self.reward, self.kl, self.seed)


@dataclass(frozen=True)
class Cell:
    """A unit that runs: a fine-tuning cell (``cells`` = itself) or a best-of-n run (``cells``: its reward x n
    cells)."""

    key: CellKey
    config: Any  # its validated BestOfNConfig / RwrConfig / DDPOConfig / GRPOConfig
    kl_key: str | None
    base_config: str
    cells: tuple[CellKey, ...] = ()


def bestofn_run_id(method: str, seed: int) -> str:
    return f"{method}-s{seed}"


def grid_cells(grid: StudyConfig) -> list[CellKey]:
    """Every fine-tuning cell, seed-major (seed, then method, reward row, kl), with its id
    ``<method>-<reward>-kl<kl>-s<seed>``; best-of-n cells are :func:`bestofn_cells`."""
    from tn_ray.storage import join_uri

    combos = [
        (seed, name, entry, row, kl)
        for seed in grid.seeds
        for name, entry in grid.methods.items()
        if (entry.method or name) != "bestofn"
        for row in grid.rewards
        for kl in entry.kl
    ]
    out = []
    for i, (seed, name, entry, row, kl) in enumerate(combos, 1):
        cid = f"{name}-{row}-kl{kl:g}-s{seed}"
        out.append(
            CellKey(
                i,
                len(combos),
                cid,
                name,
                entry.method or name,
                row,
                float(kl),
                int(seed),
                join_uri(grid.out, "cells", cid),
                grid.rewards[row].use,
                grid.truth,
            )
        )
    return out


def bestofn_runs(grid: StudyConfig) -> list[CellKey]:
    """One key per (best-of-n entry, seed), seed-major: the run whose generation its reward x n cells share."""
    from tn_ray.storage import join_uri

    combos = [(s, m) for s in grid.seeds for m, e in grid.methods.items() if (e.method or m) == "bestofn"]
    return [
        CellKey(
            i,
            len(combos),
            rid := bestofn_run_id(m, s),
            m,
            "bestofn",
            "*",
            float("nan"),
            int(s),
            join_uri(grid.out, "cells", rid),
            "*",
            grid.truth,
        )
        for i, (s, m) in enumerate(combos, 1)
    ]


def bestofn_cells(grid: StudyConfig, run: CellKey) -> tuple[CellKey, ...]:
    """The reward x n cells of one best-of-n run, ids ``<method>-<reward>-n<n>-s<seed>``."""
    entry = grid.methods[run.method]
    pairs = [(row, n) for row in grid.rewards for n in entry.n]
    return tuple(
        CellKey(
            i,
            len(pairs),
            f"{run.method}-{row}-n{n}-s{run.seed}",
            run.method,
            "bestofn",
            row,
            float("nan"),
            run.seed,
            run.out,
            grid.rewards[row].use,
            grid.truth,
            n,
        )
        for i, (row, n) in enumerate(pairs, 1)
    )


def _one_line(err: ValidationError, source: str, label: str) -> str:
    lines = format_validation_error(err, source).splitlines()[1:]
    return f"{source}: {label}: " + "; ".join(line.strip() for line in lines)


def _read_bases(grid: StudyConfig, source: str) -> dict[str, dict]:
    from tn_ray.config import read_yaml

    bases = {}
    for name, entry in grid.methods.items():
        try:
            bases[name] = read_yaml(entry.config)
        except ConfigError as err:
            raise ConfigError(f"{source}: methods.{name}.config: {err}") from None
    return bases


def _selection_rewards(grid: StudyConfig, source: str) -> dict[str, Any]:
    """What one best-of-n run scores so that every reward row's column and the truth are among its columns: the
    rows' models and the truth, their ensembles, and the one TextNorm setting and contrastive source of the rows
    that use TextNorm (rows that differ there are an error naming them)."""
    models = list(dict.fromkeys([m for rc in grid.rewards.values() for m in rc.models] + [grid.truth]))
    ensembles: dict[str, dict] = {}
    for row, rc in grid.rewards.items():
        for e in rc.ensembles:
            dumped = e.model_dump(mode="json")
            if ensembles.setdefault(e.name, dumped) != dumped:
                raise ConfigError(
                    f"{source}: rewards.{row}: ensemble '{e.name}' differs from another row's of that name"
                )
    shared: dict[str, Any] = {}
    first: dict[str, str] = {}
    for row, rc in grid.rewards.items():
        if not rc.needs_contrast:
            continue
        for key, value in (("contrast", rc.contrast), ("textnorm", rc.textnorm.model_dump(mode="json"))):
            if key in shared and shared[key] != value:
                raise ConfigError(
                    f"{source}: rewards.{row}.{key}: {value!r} differs from rewards.{first[key]}.{key} "
                    f"{shared[key]!r}; one best-of-n generation is scored with one {key}"
                )
            shared.setdefault(key, value)
            first.setdefault(key, row)
    return {"models": models, "ensembles": list(ensembles.values()), **shared}


def _plan_bestofn(grid: StudyConfig, run: CellKey, base: dict, source: str) -> Cell:
    import copy

    entry = grid.methods[run.method]
    cls = config_class("bestofn")
    raw = copy.deepcopy(base)
    apply_overrides(raw, entry.overrides, f"{source}: {run.label}: methods.{run.method}.overrides")
    samples = (raw.get("generation") or {}).get("samples_per_prompt")
    if samples is not None and max(entry.n) > samples:
        raise ConfigError(
            f"{source}: methods.{run.method}.n: n = {max(entry.n)} is larger than the samples per prompt "
            f"(generation.samples_per_prompt = {samples} in {entry.config} with the entry's overrides)"
        )
    from tn_ray.storage import join_uri

    raw.update(_selection_rewards(grid, source))
    raw.update(
        {
            "pools": list(entry.n),
            "top_k": [1],
            "human_eval": None,
            "out": run.out,
            "cache_dir": join_uri(grid.out, "cache"),
        }
    )
    apply_overrides(raw, {"generation.seed": run.seed})
    try:
        cfg = cls.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_one_line(err, source, f"{run.label} ({entry.config})")) from None
    return Cell(run, cfg, None, entry.config, bestofn_cells(grid, run))


def generation_tag(cfg: Any) -> str:
    """What fixes an RWR cell's base-model images, as a short digest: the generation fingerprint (pipeline,
    scheduler, steps, guidance, size, negative prompt, dtype, generation.seed, pipeline batch), the pipeline's
    revision and the training prompts (listed, their file, or the contrastive source and counts they are drawn
    from; a prompt list that still differs is refused by the generation's prompts.json check, never mixed).
    ``samples_per_prompt`` is left out: samples are nested (a larger n adds samples to the same folder)."""
    import hashlib

    gen = cfg.generation
    prompts = {
        "prompts": cfg.prompts,
        "max_prompts": cfg.max_prompts,
        "prompts_file": getattr(cfg, "prompts_file", None),
        "prompts_per_set": getattr(cfg, "prompts_per_set", None),
        "contrast": None if cfg.prompts or getattr(cfg, "prompts_file", None) else cfg.reward.contrast,
    }
    what = {**gen.fingerprint(), "revision": gen.revision, **prompts}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _share_rwr_generation(grid: StudyConfig, key: CellKey, raw: dict, cfg: Any, cls: type) -> Any:
    """The RWR cell's config with ``generation.out`` = ``<out>/shared/<method>-generation-seed<g>-<tag>`` and
    ``cache_dir`` = ``<out>/shared/rwr-cache`` (unless its YAML or overrides set them): the base model's images
    depend on :func:`generation_tag`'s inputs only (``generation.seed`` is the cell's seed), never on the reward or
    the KL, so every RWR cell of a seed with the same tag reuses one generation (the generation resumes from the
    images on disk and refuses a folder made with other parameters), and the content-addressed reward cache scores
    each image once per model and text. The folder name is a function of the config, so provenance and
    ``--resume`` see the same path."""
    from tn_ray.storage import join_uri

    updates = {}
    if cfg.generation.out is None:
        name = f"{key.method}-generation-seed{cfg.generation.seed}-{generation_tag(cfg)}"
        updates["generation.out"] = join_uri(grid.out, "shared", name)
    if cfg.cache_dir is None:
        updates["cache_dir"] = join_uri(grid.out, "shared", "rwr-cache")
    if not updates:
        return cfg
    apply_overrides(raw, updates)
    return cls.model_validate(raw)


def plan(grid: StudyConfig, source: str = "grid") -> list[Cell]:
    """Every run with its validated config (best-of-n runs first, then the fine-tuning cells, each seed-major);
    the first bad one is a :class:`ConfigError` of one line naming the grid file, the run and the key (e.g. a
    reward row the method's prompts cannot serve, an n larger than the samples, a bad override)."""
    import copy

    bases = _read_bases(grid, source)
    cells = [_plan_bestofn(grid, run, bases[run.method], source) for run in bestofn_runs(grid)]
    tuned: list[Cell] = []
    for key in grid_cells(grid):
        entry = grid.methods[key.method]
        cls = config_class(key.kind)
        raw = copy.deepcopy(bases[key.method])
        apply_overrides(raw, grid.overrides, f"{source}: {key.label}: overrides")
        apply_overrides(raw, entry.overrides, f"{source}: {key.label}: methods.{key.method}.overrides")
        raw["reward"] = grid.rewards[key.reward].model_dump(mode="json")
        apply_overrides(raw, {entry.kl_key: key.kl, "seed": key.seed, "out": key.out})
        if key.kind == "rwr":  # a seed replicates the image pool too: on the world, which images are drawn moved the
            apply_overrides(raw, {"generation.seed": key.seed})  # judge's gain by 0.2 (docs/world.md, "The pilots")
        if key.truth != key.train:
            if not isinstance(raw.get("eval"), dict):
                raw["eval"] = cls.model_fields["eval"].get_default(call_default_factory=True).model_dump(mode="json")
            judges = list(raw["eval"].get("judges") or [])
            if key.truth not in [j.get("use") for j in judges if isinstance(j, dict)]:
                judges.append({"models": [key.truth], "use": key.truth})
            raw["eval"]["judges"] = judges
        try:
            cfg = cls.model_validate(raw)
            if key.kind == "rwr":
                cfg = _share_rwr_generation(grid, key, raw, cfg, cls)
        except ValidationError as err:
            raise ConfigError(_one_line(err, source, f"{key.label} ({entry.config})")) from None
        if not cfg.eval.enabled:
            raise ConfigError(
                f"{source}: {key.label}: eval.enabled is false; the report reads every cell's evaluations"
            )
        tuned.append(Cell(key, cfg, entry.kl_key, entry.config, (key,)))
    cells += tuned
    rays = [c for c in cells if c.config.ray != cells[0].config.ray]
    if rays:
        raise ConfigError(
            f"{source}: {rays[0].key.label}: key 'ray' differs from {cells[0].key.id}'s; the cells share one Ray "
            "session"
        )
    return cells


# --- the cost of a run ---------------------------------------------------------------------------


def _count_prompts(cfg: Any) -> int:
    """Training / best-of-n prompts without resolving a prompt source where the config lists or counts them."""
    listed = getattr(cfg, "prompts", None)
    if listed:
        n = len(listed)
    elif getattr(cfg, "prompts_per_set", None):
        from tn_ray.data.tia2 import SETS

        n = cfg.prompts_per_set * len(SETS)
    else:
        from tn_ray.training.config import resolve_prompts

        if hasattr(cfg, "pools"):
            from tn_ray.prompts.contrast import load_contrast

            n = len(load_contrast(cfg.contrast, tia2_dir=cfg.tia2_dir))
        else:
            n = len(resolve_prompts(cfg))
    return min(n, getattr(cfg, "max_prompts", None) or n)


def counts(cell: Cell, seen: set | None = None) -> dict[str, int]:
    """The work of one run: ``images`` (sampled or generated), ``image_steps`` (their denoising steps, evaluation
    included), ``train_steps`` (optimizer steps), ``trained_image_steps`` (image x trained timestep, forward +
    backward), ``eval_images`` and ``scores`` (image x reward model, evaluation included). With ``seen`` (one set
    passed through the runs in order) an RWR generation folder already counted adds no images, and a (generation
    folder, reward cache, model, texts) already scored adds no scores: shared work is counted once."""
    cfg, kind = cell.config, cell.key.kind
    prompts = _count_prompts(cfg)
    if kind == "bestofn":
        images = prompts * cfg.generation.samples_per_prompt
        return {
            "images": images,
            "image_steps": images * cfg.generation.num_inference_steps,
            "train_steps": 0,
            "trained_image_steps": 0,
            "eval_images": 0,
            "scores": images * len(cfg.models),
        }
    workers = cfg.scaling.num_workers
    if kind == "rwr":
        pool = prompts * cfg.generation.samples_per_prompt
        folder = cfg.generation.out or cell.key.out
        cache = cfg.cache_dir or cell.key.out
        texts = cfg.reward.contrast if cfg.reward.needs_contrast else None
        images = 0 if seen is not None and ("generation", folder) in seen else pool
        pool_scores = sum(
            pool for m in cfg.reward.models if seen is None or ("scores", folder, cache, m, texts) not in seen
        )
        if seen is not None:
            seen.update([("generation", folder), *(("scores", folder, cache, m, texts) for m in cfg.reward.models)])
        image_steps = images * cfg.generation.num_inference_steps
        trained = cfg.max_steps * cfg.batch_size
    else:
        s, tr = cfg.sample, cfg.train
        pool_scores = None
        per_epoch = (
            s.batch_size * s.num_batches_per_epoch if kind == "ddpo" else s.batch_images * s.num_batches_per_epoch
        )
        images = cfg.max_steps * per_epoch * workers
        image_steps = images * s.num_steps
        trained = images * max(1, int(s.num_steps * tr.timestep_fraction)) * tr.num_inner_epochs
    ev = cfg.eval
    eval_prompts = min(len(ev.prompts) if ev.prompts else prompts, ev.max_prompts or prompts)
    evaluations = 1 + cfg.max_steps // ev.every  # the base model and every `every` steps
    eval_images = eval_prompts * len(ev.seeds) * evaluations
    eval_models = len(set(cfg.reward.models) | {m for j in ev.judges for m in j.models})
    return {
        "images": images,
        "image_steps": image_steps + eval_images * ev.num_inference_steps,
        "train_steps": cfg.max_steps,
        "trained_image_steps": trained,
        "eval_images": eval_images,
        "scores": (images * len(cfg.reward.models) if pool_scores is None else pool_scores) + eval_images * eval_models,
    }


def estimate(cost: CostBlock, work: dict[str, int]) -> float:
    """Seconds of one run's counted work at the study's per-unit costs."""
    return (
        work["image_steps"] * cost.image_step_s
        + work["trained_image_steps"] * cost.train_step_s
        + work["scores"] * cost.score_s
    )


# --- state of a cell ---------------------------------------------------------------------------


def read_done(out: str) -> dict | None:
    from tn_ray.storage import Store

    store = Store(out)
    return json.loads(store.read_text(DONE)) if store.exists(DONE) else None


def status(cell: Cell) -> str:
    """``done`` (its run returned: done.json), ``partial`` (a run started: checkpoints, provenance.json or a
    best-of-n generation) or ``new``."""
    from tn_ray.storage import Store

    store = Store(cell.key.out)
    if store.exists(DONE):
        return "done"
    started = store.exists("provenance.json") or store.list_files("checkpoints") or store.list_files("generation")
    return "partial" if started else "new"


def changed(cell: Cell, done: dict) -> list[str]:
    """How the config a finished cell ran under differs from the grid's now (provenance's comparison)."""
    from tn_ray.provenance import differences

    return differences({"config": done.get("config", {})}, {"config": cell.config.model_dump(mode="json")})


def _shape(grid: StudyConfig) -> str:
    parts = []
    for name, e in grid.methods.items():
        grid_of = f"n {e.n}" if (e.method or name) == "bestofn" else f"{e.kl_key} {[float(k) for k in e.kl]}"
        parts.append(f"{name} ({grid_of})")
    return f"{len(grid.rewards)} rewards x [{'; '.join(parts)}] x {len(grid.seeds)} seeds"


def _hours(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def describe(grid: StudyConfig, cells: list[Cell]) -> list[str]:
    """The grid (``--dry-run``): one line per run with its state, counted work and estimated time, then the
    totals and the per-unit costs they used."""
    n_cells = sum(len(c.cells) for c in cells)
    lines = [f"study {grid.out}: {len(cells)} runs, {n_cells} cells ({_shape(grid)}); truth: {grid.truth}"]
    total = dict.fromkeys(("images", "image_steps", "train_steps", "trained_image_steps", "eval_images", "scores"), 0)
    seconds = 0.0
    seen: set = set()
    first: dict[str, str] = {}  # RWR generation folder -> the first cell that makes it
    for cell in cells:
        k, cfg = cell.key, cell.config
        work = counts(cell, seen)
        secs = estimate(grid.cost, work)
        total = {key: total[key] + work[key] for key in total}
        seconds += secs
        images = f"{work['images']} images"
        if k.kind == "rwr":
            folder = cfg.generation.out or k.out
            if first.setdefault(folder, k.id) != k.id:
                images += f" (reuses {first[folder]}'s generation)"
        cost = f"{images}, {work['eval_images']} eval images, ~{_hours(secs)}"
        if k.kind == "bestofn":
            rows = list(dict.fromkeys(c.reward for c in cell.cells))
            lines.append(
                f"{k.label}: bestofn ({cell.base_config}), {len(cell.cells)} cells = rewards {rows} x n "
                f"{cfg.pools}, {cfg.generation.samples_per_prompt} samples per prompt, seed {k.seed}; {cost}: "
                f"{status(cell)}"
            )
            continue
        truth = "truth = the training reward" if k.truth == k.train else f"truth judge {k.truth}"
        contrast = f" [contrast {cfg.reward.contrast}]" if cfg.reward.needs_contrast else ""
        lines.append(
            f"{k.label}: {k.kind} ({cell.base_config}), reward {k.reward} = {k.train}{contrast}, "
            f"{cell.kl_key}={k.kl:g}, seed {k.seed}, {truth}, max_steps {cfg.max_steps}; {cost}: {status(cell)}"
        )
    c = grid.cost
    lines.append(
        f"{len(cells)} runs, {n_cells} cells: {total['images']} images sampled ({total['image_steps']} image-steps "
        f"with evaluation), {total['train_steps']} optimizer steps ({total['trained_image_steps']} trained "
        f"image-steps), {total['eval_images']} evaluation images, {total['scores']} reward scores; estimated "
        f"{_hours(seconds)} on {c.device} (image_step_s {c.image_step_s:g}, train_step_s {c.train_step_s:g}, "
        f"score_s {c.score_s:g})"
    )
    return lines


# --- running ----------------------------------------------------------------------------------


def _preflight_bestofn(cfg: Any) -> None:
    """What ``tn-ray bestofn`` checks before Ray starts: prompts and contrastive sets, pipeline, weights."""
    from tn_ray.diffusion.pipelines import check_scheduler, check_source
    from tn_ray.experiments.bestofn import resolve_prompts
    from tn_ray.prompts.contrast import generates, load_contrast, sets_for
    from tn_ray.rewards.availability import check_weights

    contrast = (
        sets_for(cfg.contrast, cfg.prompts)
        if generates(cfg.contrast)
        else load_contrast(cfg.contrast, tia2_dir=cfg.tia2_dir)
    )
    resolve_prompts(cfg, contrast)
    check_source(cfg.generation.pipeline, cfg.generation.revision)
    check_scheduler(cfg.generation.scheduler)
    if not cfg.service:
        check_weights(cfg.models)


def preflight(cells: list[Cell]) -> None:
    """Each unfinished run's preflight (pipeline and reward weights found, prompts and contrastive sets), and
    the world proxies trained here once (before Ray actors load them); an error names the run."""
    from tn_ray.experiments.world import ensure_models
    from tn_ray.training.config import resolve_prompts
    from tn_ray.training.preflight import check_run

    models = []
    for cell in cells:
        cfg = cell.config
        try:
            if cell.key.kind == "bestofn":
                _preflight_bestofn(cfg)
                models += cfg.models
                continue
            check_run(cfg, resolve_prompts(cfg))
        except TnRayError as err:
            raise InputError(f"{cell.key.label}: {err}") from err
        models += [*cfg.reward.models, *(m for j in cfg.eval.judges for m in j.models)]
    ensure_models(list(dict.fromkeys(models)))


def run_cell(cell: Cell, allow_provenance_change: bool = False) -> dict[str, Any]:
    """The run of the cell's method (resuming from its folder), then its ``done.json``; returns the record."""
    from tn_ray.storage import Store

    start = time.time()
    paths = _target(METHODS[cell.key.kind][1])(cell.config, allow_provenance_change=allow_provenance_change)
    done = {
        "cell": cell.key.id,
        "method": cell.key.method,
        "reward": cell.key.reward,
        "kl": None if cell.key.kind == "bestofn" else cell.key.kl,
        "seed": cell.key.seed,
        "cells": [c.id for c in cell.cells],
        "wall_s": round(time.time() - start, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "paths": {k: str(v) for k, v in paths.items()},
        "config": cell.config.model_dump(mode="json"),
    }
    Store(cell.key.out).write_text(DONE, json.dumps(done, indent=1))
    return done


def run(
    grid: StudyConfig,
    source: str = "grid",
    allow_provenance_change: bool = False,
    echo=None,
    resume: bool = True,
) -> dict[str, Any]:
    """Every run in turn in one Ray session, then the report. With ``resume`` a finished run is skipped and a
    started one continued (a finished run whose config changed is an error, or with ``allow_provenance_change``
    is continued under the new one); without it a study folder holding any started run is an error (``tn-ray
    study`` without --resume). Progress lines (``cell 3/48 rwr-textnorm-kl1-s0: ...``) go to ``echo`` (default:
    printed). Returns the report's paths."""
    import yaml

    from tn_ray.storage import Store

    echo = echo or (lambda line: print(line, flush=True))
    cells = plan(grid, source)
    if not resume:
        started = [c.key.id for c in cells if status(c) != "new"]
        if started:
            raise ConfigError(
                f"{source}: out {grid.out} already holds {len(started)} started or finished runs (e.g. {started[0]}); "
                "add --resume to continue the study, or set a new `out`"
            )
    todo: list[Cell] = []
    for cell in cells:
        done = read_done(cell.key.out)
        diff = changed(cell, done) if done else []
        if diff and not allow_provenance_change:
            shown = "; ".join(diff[:3]) + (f"; and {len(diff) - 3} more" if len(diff) > 3 else "")
            raise ConfigError(
                f"{source}: {cell.key.label}: finished under another config ({shown}); use a new `out`, "
                "or add --allow-provenance-change to continue it under this one"
            )
        if done is None or diff:
            todo.append(cell)
    Store(grid.out).write_text("grid.yaml", yaml.safe_dump(grid.model_dump(mode="json"), sort_keys=False))
    echo(describe(grid, cells)[0])
    if todo:
        preflight(todo)
    started = _start_ray(todo)
    pending = {cell.key.id for cell in todo}
    try:
        for cell in cells:
            if cell.key.id not in pending:
                echo(f"{cell.key.label}: finished before, skipped")
                continue
            state = status(cell)
            echo(f"{cell.key.label}: {'resuming' if state != 'new' else 'starting'}")
            try:
                done = run_cell(cell, allow_provenance_change)
            except BaseException:
                echo(f"{cell.key.label}: failed (rerun the same command to resume it)")
                raise
            echo(f"{cell.key.label}: done in {done['wall_s']:.0f} s; {_selected(done)}")
    finally:
        if started:
            import ray

            ray.shutdown()
    paths = write_report(grid)
    echo(f"report: {paths['report_md']}")
    return paths


def _start_ray(todo: list[Cell]) -> bool:
    """Ray up for the cells (their shared `ray` block); True when started here (and so stopped here)."""
    if not todo:
        return False
    import ray

    from tn_ray.cluster import init_ray

    if ray.is_initialized():
        return False
    init_ray(todo[0].config.ray)
    return True


def _selected(done: dict) -> str:
    if done.get("kl") is None and "selections" in done["paths"]:
        return f"{len(done.get('cells', []))} best-of-n cells selected from one generation"
    path = done["paths"].get("selection")
    if not path:
        return "no checkpoint evaluated"
    from tn_ray.storage import read_any

    sel = json.loads(read_any(path))
    return f"the paper's rule selects step {sel['paper_rule_step']} ({sel['training_reward']['column']})"


# --- the report ---------------------------------------------------------------------------------


def cell_tables(key: CellKey) -> tuple[Any, int]:
    """(:func:`tn_ray.analysis.finetune_report.cell_images` of a finished cell, the step its selection.json's
    paper rule selected); reads ``eval/``, ``eval/path_kl/`` (if any) and ``selection.json``."""
    import pandas as pd

    from tn_ray.analysis.finetune_report import cell_images
    from tn_ray.storage import Store
    from tn_ray.training.evaluation import read_scores

    store = Store(key.out)
    scores, base = read_scores(key.out)
    if base is None or not store.exists("selection.json"):
        raise InputError(
            f"{key.label}: {store.uri('')} has done.json but no evaluation (eval/base.parquet) or no "
            "selection.json; delete its done.json and rerun to resume it"
        )
    parts = [store.read_table(rel).to_pandas() for rel in store.list_files("eval/path_kl", ".parquet")]
    try:
        images = cell_images(scores, base, key.train, key.truth, pd.concat(parts, ignore_index=True) if parts else None)
    except ValueError as err:
        raise InputError(f"{key.label}: {store.uri('eval')}: {err}") from None
    selected = int(json.loads(store.read_text("selection.json"))["paper_rule_step"])
    return images.assign(method=key.method, reward=key.reward, kl=key.kl, seed=key.seed), selected


def bestofn_tables(grid: StudyConfig, run: CellKey) -> Any:
    """:func:`tn_ray.analysis.study_report.picked` of a finished best-of-n run, with ``method`` and ``seed``;
    reads its ``rewards.parquet`` and ``selections.parquet``."""
    from tn_ray.analysis.study_report import picked
    from tn_ray.storage import Store

    store = Store(run.out)
    if not (store.exists("rewards.parquet") and store.exists("selections.parquet")):
        raise InputError(
            f"{run.label}: {store.uri('')} has done.json but no rewards.parquet / selections.parquet; delete its "
            "done.json and rerun to resume it"
        )
    rewards = store.read_table("rewards.parquet").to_pandas()
    selections = store.read_table("selections.parquet").to_pandas()
    rows = {row: rc.use for row, rc in grid.rewards.items()}
    try:
        images = picked(rewards, selections, rows, grid.truth, grid.methods[run.method].n)
    except ValueError as err:
        raise InputError(f"{run.label}: {store.uri('')}: {err}") from None
    return images.assign(method=run.method, seed=run.seed)


def _run_config(grid: StudyConfig, key: CellKey, planned: dict) -> Any:
    """The validated config a finished run ran under (its done.json), else the grid's plan of it now; None when
    neither validates (its work is then not counted)."""
    done = read_done(key.out) or {}
    if "config" in done:
        try:
            return config_class(key.kind).model_validate(done["config"])
        except (ValidationError, TnRayError):
            pass
    if "cells" not in planned:
        try:
            planned["cells"] = {c.key.id: c.config for c in plan(grid)}
        except (TnRayError, ValidationError, OSError):
            planned["cells"] = {}
    return planned["cells"].get(key.id)


def _cost_row(
    grid: StudyConfig, key: CellKey, configs: dict, planned: dict, kind: str, reward: str, kl: float, n: int | None
) -> dict:
    """One cell's counted work for :func:`tn_ray.analysis.efficiency.table` (a fine-tuning cell, or a best-of-n
    run's (reward, n) cell alone: n samples per prompt, scored by the row's models and the truth); only its keys
    when its config is not at hand or its prompts cannot be counted (``configs[run id]`` is then None)."""
    from tn_ray.analysis.efficiency import bestofn_work

    row = {"kind": kind, "method": key.method, "reward": reward, "kl": kl, "n": n, "seed": key.seed}
    if key.id not in configs:
        configs[key.id] = _run_config(grid, key, planned)
    cfg = configs[key.id]
    if cfg is None:
        return row
    try:
        prompts = _count_prompts(cfg)
    except (TnRayError, OSError):
        configs[key.id] = None
        return row
    if kind == "bestofn":
        models = len(set(grid.rewards[reward].models) | {grid.truth})
        work = bestofn_work(prompts, n, cfg.generation.num_inference_steps, models)
        per_prompt = n
    else:
        work = counts(Cell(key, cfg, None, "", (key,)))
        per_prompt = work["images"] / prompts
    return {
        **row,
        "prompts": prompts,
        "samples_per_prompt": per_prompt,
        "samples": work["images"] + work["eval_images"],
        "eval_images": work["eval_images"],
        "device_s": estimate(grid.cost, work),
    }


def _human_outcomes(keys: list[CellKey]) -> tuple[Any, list[str]]:
    """The labelling app's answers to each cell's comparison task (``human_eval/`` + ``human_eval_key.csv``,
    answers in ``human_eval_answers.sqlite`` beside them, where ``tn-ray label serve --export`` keeps them) as
    :func:`tn_ray.labeling.tally.outcomes` rows with the cell's keys; and a line per cell whose answers could not
    be read."""
    from pathlib import Path

    import pandas as pd

    from tn_ray.labeling.store import open_answers
    from tn_ray.labeling.tally import outcomes
    from tn_ray.labeling.tasks import load_comparison

    frames, problems = [], []
    for key in keys:
        if "://" in key.out:
            continue
        db = Path(key.out) / "human_eval_answers.sqlite"
        if not db.is_file():
            continue
        try:
            task = load_comparison(Path(key.out) / "human_eval")
            answers = open_answers(db, task)
        except TnRayError as err:
            problems.append(f"{key.id}: answers not read ({err})")
            continue
        if answers:
            frames.append(
                outcomes(task, answers).assign(method=key.method, reward=key.reward, kl=key.kl, seed=key.seed)
            )
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), problems


def paper_sections(grid: StudyConfig, finished: list[CellKey], ran: list[CellKey]) -> tuple[str, dict, dict]:
    """The report's paper-shaped sections (docs/study.md): win / tie / loss of the selected images vs the base
    model and vs each other under every scored column (:mod:`tn_ray.analysis.winloss`), the human raters' tallies
    (or how to collect them), and the gains per sample and per estimated device-hour
    (:mod:`tn_ray.analysis.efficiency`). Returns (markdown, {file name: CSV text}, report.json records)."""
    import pandas as pd

    from tn_ray.analysis import efficiency as ef
    from tn_ray.analysis import winloss as wl
    from tn_ray.storage import Store
    from tn_ray.training.evaluation import read_scores

    r = grid.report
    boot = (r.confidence, r.resamples, r.seed)
    trains = {row: rc.use for row, rc in grid.rewards.items()}
    tables, gains, costs, planned, configs = [], [], [], {}, {}
    if finished:
        frames, selected = [], {}
        for key in finished:
            scores, base = read_scores(key.out)
            frames.append(
                wl.judged_images(scores, base).assign(method=key.method, reward=key.reward, kl=key.kl, seed=key.seed)
            )
            selected[key.key] = int(json.loads(Store(key.out).read_text("selection.json"))["paper_rule_step"])
        judged = pd.concat(frames, ignore_index=True)
        tables.append(wl.finetune(judged, selected, trains, grid.truth, *boot))
        gains.append(ef.finetune_gain(judged, selected, grid.truth).assign(kind="finetune", n=pd.NA))
        for key in finished:
            costs.append(_cost_row(grid, key, configs, planned, "finetune", key.reward, key.kl, None))
    if ran:
        picks, bases = [], []
        for run in ran:
            picks.append(bestofn_tables(grid, run))
            rewards = Store(run.out).read_table("rewards.parquet").to_pandas()
            bases.append(wl.bestofn_base(rewards, grid.truth).assign(method=run.method, seed=run.seed))
            for row in grid.rewards:
                for n in grid.methods[run.method].n:
                    costs.append(_cost_row(grid, run, configs, planned, "bestofn", row, float("nan"), n))
        picks_all, base_all = pd.concat(picks, ignore_index=True), pd.concat(bases, ignore_index=True)
        tables.append(wl.bestofn(picks_all, base_all, list(grid.rewards), grid.truth, *boot))
        gains.append(ef.bestofn_gain(picks_all, base_all).assign(kind="bestofn", kl=float("nan")))
    winloss = pd.concat(tables, ignore_index=True)
    lines = wl.markdown(winloss, grid.truth, r.confidence)
    files = {"winloss.csv": winloss.to_csv(index=False)}
    records: dict[str, Any] = {"winloss": _records(winloss)}
    outcomes, problems = _human_outcomes(finished)
    human = wl.human(outcomes) if len(outcomes) else None
    unread = f" Not read: {'; '.join(problems)}." if problems else ""
    if human is not None:
        answered = outcomes[["method", "reward", "kl", "seed", "question", "annotator"]].drop_duplicates()
        note = f"{len(answered)} answers from {outcomes['annotator'].nunique()} annotators.{unread}"
        files["human_winloss.csv"] = human.to_csv(index=False)
        records["human_winloss"] = _records(human)
    elif finished:
        note = (
            "No human answers yet: serve a fine-tuning cell's comparison with `tn-ray label serve --export "
            f"{grid.out}/cells/<cell id>/human_eval` (answers go to `human_eval_answers.sqlite` beside it), then "
            f"rerun `tn-ray study CONFIG --report-only`.{unread}"
        )
    else:
        note = "No human answers: only fine-tuning cells export a comparison (`human_eval/`); none has finished."
    lines += wl.human_markdown(human, note)
    records["human_answers"] = 0 if human is None else int(len(answered))
    cost_cols = ["kind", "method", "reward", "kl", "n", "seed", "prompts", "samples_per_prompt", "samples"]
    per = ef.table(pd.DataFrame(costs).reindex(columns=[*cost_cols, "eval_images", "device_s"]), pd.concat(gains))
    uncounted = sorted(k for k, cfg in configs.items() if cfg is None)
    notes = [f"Work not counted (no valid config in done.json or the grid): {', '.join(uncounted)}."] * bool(uncounted)
    lines += ef.markdown(per, grid.truth, grid.cost.device, notes)
    files["efficiency.csv"] = per.to_csv(index=False)
    records["efficiency"] = _records(per)
    return "\n".join(lines), files, records


def write_report(grid: StudyConfig) -> dict[str, str]:
    """The report of the finished runs (those with done.json) under ``grid.out``: report.md and report.json, and
    for fine-tuning cells report.csv (one row per method, reward row and kl), curve.csv (per step), cells.csv (per
    cell), accuracy_vs_step.png and, when cells recorded path KL, accuracy_vs_path_kl.png; for best-of-n cells
    bestofn.csv (per method, reward row and n), bestofn_cells.csv (per seed too), bestofn_versus.csv (each row vs
    the first row at equal n) and truth_vs_n.png; :func:`paper_sections`' winloss.csv, efficiency.csv and, when
    some cell has human answers, human_winloss.csv; figures/ (image grids: the paper's Fig. 4 and 5 on the study's
    images, :mod:`tn_ray.experiments.study_figures`) and report.html (report.md rendered, figures inline)."""
    import pandas as pd

    from tn_ray.analysis import finetune_report as fr
    from tn_ray.analysis import study_report as sr
    from tn_ray.storage import Store

    store = Store(grid.out)
    keys, runs = grid_cells(grid), bestofn_runs(grid)
    finished = [k for k in keys if read_done(k.out) is not None]
    ran = [k for k in runs if read_done(k.out) is not None]
    missing = [k.id for k in keys if k not in finished]
    if not finished and not ran:
        raise InputError(f"{grid.out}: no finished cell (none has {DONE}) to report on; run the grid first")
    r = grid.report
    done_part = f"{len(finished)} of {len(keys)} cells finished" + (
        f" (not yet: {', '.join(missing)})" if missing else ""
    )
    header = [
        f"Grid `{grid.out}`: "
        + (done_part + "; " if keys else "")
        + f"truth column `{grid.truth}`; training rewards: "
        + ", ".join(f"{row} = `{rc.use}`" for row, rc in grid.rewards.items())
        + "."
    ]
    if runs:
        header[0] = header[0].replace("cells finished", "fine-tuning cells finished", 1) if keys else header[0]
        header.append(
            f"Best-of-n: {len(ran)} of {len(runs)} runs finished (one generation per seed, shared by its reward x n "
            "cells)"
            + (f"; not yet: {', '.join(k.id for k in runs if k not in ran)}" if len(ran) < len(runs) else "")
            + "."
        )
    report: dict[str, Any] = {
        "truth": grid.truth,
        "cells_total": len(keys),
        "cells_finished": [k.id for k in finished],
        "cells_missing": missing,
        "bestofn_runs_finished": [k.id for k in ran],
        "confidence": r.confidence,
    }
    names = ["report.md", "report.json"]
    sections = []
    if finished:
        frames, selected = [], {}
        for key in finished:
            images, step = cell_tables(key)
            frames.append(images)
            selected[key.key] = step
        images = pd.concat(frames, ignore_index=True)
        curve = fr.curve(images, r.confidence, r.resamples, r.seed)
        cells = fr.cell_table(images, selected)
        summary = fr.selection_table(images, cells, r.confidence, r.resamples, r.seed)
        text = fr.markdown(summary, curve, grid.truth, r.confidence, header)
        if runs:  # one report of both: the title says so
            text = f"# Study: best-of-n and fine-tuning against {grid.truth}" + text[text.index("\n") :]
        sections.append(text)
        store.write_text("report.csv", summary.to_csv(index=False))
        store.write_text("curve.csv", curve.to_csv(index=False))
        store.write_text("cells.csv", cells.to_csv(index=False))
        report.update({"summary": _records(summary), "curve": _records(curve), "cells": _records(cells)})
        store.write_bytes("accuracy_vs_step.png", fr.plot_accuracy_vs_step(curve, grid.truth))
        names += ["report.csv", "curve.csv", "cells.csv", "accuracy_vs_step.png"]
        kl_png = fr.plot_accuracy_vs_path_kl(curve, grid.truth)
        if kl_png is not None:
            store.write_bytes("accuracy_vs_path_kl.png", kl_png)
            names.append("accuracy_vs_path_kl.png")
    else:
        sections.append("\n".join([f"# Study: best-of-n against {grid.truth}", "", *header, ""]))
    if ran:
        picks = pd.concat([bestofn_tables(grid, k) for k in ran], ignore_index=True)
        rows = sr.table(picks, r.confidence, r.resamples, r.seed)
        per_seed = picks.groupby([*sr.KEYS, "seed"], sort=True)["truth"].mean().reset_index()
        pairs = sr.versus(picks, next(iter(grid.rewards)), r.confidence, r.resamples, r.seed)
        sections.append(sr.markdown(rows, grid.truth, r.confidence, pairs))
        store.write_text("bestofn.csv", rows.to_csv(index=False))
        store.write_text("bestofn_versus.csv", pairs.to_csv(index=False))
        store.write_text("bestofn_cells.csv", per_seed.to_csv(index=False))
        store.write_bytes("truth_vs_n.png", sr.plot(rows, grid.truth))
        report.update(
            {"bestofn": _records(rows), "bestofn_cells": _records(per_seed), "bestofn_versus": _records(pairs)}
        )
        names += ["bestofn.csv", "bestofn_cells.csv", "bestofn_versus.csv", "truth_vs_n.png"]
    text, files, records = paper_sections(grid, finished, ran)  # win/tie/loss, human tallies, gain per GPU-hour
    sections.append(text)
    for name, body in files.items():
        store.write_text(name, body)
    report.update(records)
    names += list(files)
    from tn_ray.experiments.study_figures import write_figures, write_html

    plots = [n for n in names if n.endswith(".png")]
    figures, figure_files = write_figures(grid, finished, ran, plots, cell_tables, bestofn_tables)  # Fig. 4, 5
    sections.append(figures)
    names += [*figure_files, "report.html"]
    store.write_text("report.md", "\n".join(sections))
    write_html(grid, "\n".join(sections))
    store.write_text("report.json", json.dumps(report, indent=1))
    return {name.replace(".", "_"): store.uri(name) for name in names}


def _records(frame) -> list[dict]:
    """Rows as JSON-ready dicts, every float exact (NaN as null)."""
    import math

    def plain(v):
        v = v.item() if hasattr(v, "item") else v
        return None if isinstance(v, float) and math.isnan(v) else v

    return [{k: plain(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]
