"""Every run of a study with its validated config (:func:`plan`): each method's base YAML, the grid's and the
entry's overrides and the keys the grid sets per run; RWR cells of a seed share one generation
(:func:`generation_tag`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from tn_ray.config import ConfigError, apply_overrides, read_yaml
from tn_ray.experiments.study.cell_keys import CellKey, bestofn_cells, bestofn_runs, grid_cells
from tn_ray.experiments.study.config import StudyConfig, config_class, one_line_error
from tn_ray.storage import join_uri


@dataclass(frozen=True)
class Cell:
    """A unit that runs: a fine-tuning cell (``cells`` = itself) or a best-of-n run (``cells``: its reward x n
    cells)."""

    key: CellKey
    config: Any  # its validated BestOfNConfig / RwrConfig / DDPOConfig / GRPOConfig
    kl_key: str | None
    base_config: str
    cells: tuple[CellKey, ...] = ()


def _read_bases(grid: StudyConfig, source: str) -> dict[str, dict]:
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
        raise ConfigError(one_line_error(err, source, f"{run.label} ({entry.config})")) from None
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
        if isinstance(raw.get("eval"), dict) and raw["eval"].get("base_images") is None:
            raw["eval"]["base_images"] = join_uri(grid.out, "shared", "eval-base")
        elif raw.get("eval") is None:
            raw["eval"] = {"base_images": join_uri(grid.out, "shared", "eval-base")}
        try:
            cfg = cls.model_validate(raw)
            if key.kind == "rwr":
                cfg = _share_rwr_generation(grid, key, raw, cfg, cls)
        except ValidationError as err:
            raise ConfigError(one_line_error(err, source, f"{key.label} ({entry.config})")) from None
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
