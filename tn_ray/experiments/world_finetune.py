"""``tn-ray world finetune CONFIG``: fine-tune with RWR and DDPO against several rewards, KL coefficients and
seeds, and judge every evaluation image with exact truth (docs/world.md, "Fine-tuning against exact truth").

A grid (:class:`GridConfig`) names methods (each a base YAML, the dotted key of its KL coefficient and a
KL grid), training rewards (rows, each a :class:`~tn_ray.textnorm.columns.RewardConfig` block), seeds, a
truth column (a reward model spec, e.g. ``worldjudge``) and overrides. A cell is method x reward x kl x
seed; its config is the method's YAML + ``overrides`` + the method's ``overrides`` + ``{reward: <row>,
<kl_key>: kl, seed: s, out: <out>/cells/<cell id>}``, with the truth added to ``eval.judges`` as a held-out
judge unless the row trains on it (then the training reward's column is the truth's). Every cell's
config is validated before anything runs (:func:`plan`), and every cell passes the method's preflight
(weights, prompts, contrastive sets) before the first cell starts.

The cells run one after another in one Ray session (:func:`run`; the methods' ``run`` functions start
Ray only when it is not up and never stop it), seed-major, so a partial grid holds every combination's
first seed first. A cell whose run returned gets ``done.json`` (its result paths and config) and is
skipped on rerun; an unfinished one is entered again and resumes from its own checkpoints
(:func:`tn_ray.training.loop.fit`). The report (:func:`write_report`, pure:
:mod:`tn_ray.analysis.finetune_report`) reads the finished cells' evaluations and ``selection.json``.
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

from pydantic import BaseModel, Field, NonNegativeFloat, NonNegativeInt, ValidationError, model_validator

from tn_ray.config import ConfigError, OutputLocation, StrictModel, apply_overrides, format_validation_error
from tn_ray.errors import InputError, TnRayError
from tn_ray.textnorm.columns import RewardConfig

log = logging.getLogger(__name__)

# method -> (its config class, its run function, the dotted key of its KL coefficient)
METHODS: dict[str, tuple[str, str, str]] = {
    "rwr": ("tn_ray.training.rwr:RwrConfig", "tn_ray.training.rwr:run", "beta"),
    "ddpo": ("tn_ray.training.ddpo:DDPOConfig", "tn_ray.training.ddpo:run", "train.kl_coef"),
}
NAME = re.compile(r"^[A-Za-z0-9_]+$")
DONE = "done.json"


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
    """One method of the grid: a base config, the key its KL coefficient sets, the KL grid."""

    method: Literal["rwr", "ddpo"] | None = Field(
        None,
        description="the fine-tuning method that runs this entry's cells: rwr (`tn-ray rwr`) or ddpo (`tn-ray "
        "ddpo`); None = the entry's name, which must then be one of them (two entries of one method: name them "
        "apart and set this)",
    )
    config: str = Field(
        ...,
        description="the method's base YAML (RwrConfig / DDPOConfig; a path from the working folder): every cell of "
        "this entry starts from it; its own `reward`, `seed` and `out` are replaced per cell",
    )
    kl_key: str = Field(
        ...,
        description="dotted key of the method's KL coefficient in that config (rwr: beta; ddpo: train.kl_coef); each "
        "value of `kl` is set there",
    )
    kl: list[NonNegativeFloat] = Field(
        ...,
        min_length=1,
        description="KL coefficients (unitless, >= 0; in the method's own sense: docs/rwr.md, docs/ddpo.md), one "
        "cell per value x reward row x seed",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="dotted keys set in this entry's cells after the grid's `overrides` (keys only this method has, "
        "e.g. generation.samples_per_prompt); a nested mapping merges key by key",
    )


class ReportBlock(StrictModel):
    confidence: float = Field(0.95, gt=0, lt=1, description="confidence level of the report's intervals (probability)")
    resamples: int = Field(2000, ge=100, description="bootstrap resamples of each interval (count)")
    seed: int = Field(0, ge=0, description="seed of the bootstrap resampling")


class GridConfig(StrictModel):
    """``tn-ray world finetune CONFIG``: the fine-tuning grid (cells = methods x rewards x kl x seeds)."""

    out: OutputLocation = Field(
        "results/world/finetune",
        description="grid folder: cells/<cell id>/ (each cell's run folder), grid.yaml, the report",
    )
    truth: str = Field(
        ...,
        description="the column every report reads as exact truth: a reward model spec (e.g. worldjudge: 1 = the "
        "image matches its prompt, 0 = not), added to each cell's eval.judges unless the cell trains on it",
    )
    methods: dict[str, MethodEntry] = Field(
        ..., min_length=1, description="method entries by name (letters, digits, _): base YAML, KL key and KL grid"
    )
    rewards: dict[str, RewardConfig] = Field(
        ...,
        min_length=1,
        description="training rewards by row name (letters, digits, _), each a `reward` block of RwrConfig / "
        "DDPOConfig (models, use, textnorm, ensembles, contrast)",
    )
    seeds: list[NonNegativeInt] = Field(
        default_factory=lambda: [0],
        min_length=1,
        description="training seeds: each cell's `seed` (noise, timesteps, data order, LoRA init); the evaluation "
        "prompts and eval seeds are the base config's, the same in every cell",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="dotted keys set in every cell's config (after its base YAML, before the method's overrides), "
        "e.g. {max_steps: 50, eval.every: 10}; a nested mapping merges key by key ({eval: {every: 10}} sets only "
        "eval.every); `out`, `seed`, `reward` and the KL keys are the grid's own",
    )
    report: ReportBlock = Field(default_factory=ReportBlock, description="the report's bootstrap intervals")

    @model_validator(mode="after")
    def _grid(self) -> GridConfig:
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
            method = entry.method or name
            if method not in METHODS:
                raise ValueError(
                    f"methods.{name}.method: '{method}' is not a method; known: {sorted(METHODS)} (set "
                    f"`method:` for an entry named otherwise)"
                )
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
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: repeated seed in {self.seeds}")
        return self


@dataclass(frozen=True)
class CellKey:
    """A cell's place in the grid and what the report needs of it (no config file read)."""

    index: int  # 1-based, in run order
    total: int
    id: str
    method: str  # the entry's name
    kind: str  # rwr | ddpo
    reward: str  # the row's name
    kl: float
    seed: int
    out: str
    train: str  # the training reward's column
    truth: str  # the truth's column (== train when the row trains on the truth)

    @property
    def label(self) -> str:
        return f"cell {self.index}/{self.total} {self.id}"

    @property
    def key(self) -> tuple:
        return (self.method, self.reward, self.kl, self.seed)


@dataclass(frozen=True)
class Cell:
    key: CellKey
    config: Any  # its validated RwrConfig / DDPOConfig
    kl_key: str
    base_config: str


def grid_cells(grid: GridConfig) -> list[CellKey]:
    """Every cell, seed-major (seed, then method, reward row, kl), with its id ``<method>-<reward>-kl<kl>-s<seed>``."""
    from tn_ray.storage import join_uri

    combos = [
        (seed, name, entry, row, kl)
        for seed in grid.seeds
        for name, entry in grid.methods.items()
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


def _one_line(err: ValidationError, source: str, label: str) -> str:
    lines = format_validation_error(err, source).splitlines()[1:]
    return f"{source}: {label}: " + "; ".join(line.strip() for line in lines)


def plan(grid: GridConfig, source: str = "grid") -> list[Cell]:
    """Every cell with its validated config; the first bad one is a :class:`ConfigError` of one line naming the
    grid file, the cell and the key (e.g. a reward row the method's prompts cannot serve, a bad override)."""
    import copy

    from tn_ray.config import read_yaml

    bases = {}
    for name, entry in grid.methods.items():
        try:
            bases[name] = read_yaml(entry.config)
        except ConfigError as err:
            raise ConfigError(f"{source}: methods.{name}.config: {err}") from None
    cells = []
    for key in grid_cells(grid):
        entry = grid.methods[key.method]
        cls = config_class(key.kind)
        raw = copy.deepcopy(bases[key.method])
        apply_overrides(raw, grid.overrides, f"{source}: {key.label}: overrides")
        apply_overrides(raw, entry.overrides, f"{source}: {key.label}: methods.{key.method}.overrides")
        raw["reward"] = grid.rewards[key.reward].model_dump(mode="json")
        apply_overrides(raw, {entry.kl_key: key.kl, "seed": key.seed, "out": key.out})
        if key.truth != key.train:
            if not isinstance(raw.get("eval"), dict):
                raw["eval"] = cls.model_fields["eval"].get_default(call_default_factory=True).model_dump(mode="json")
            judges = list(raw["eval"].get("judges") or [])
            if key.truth not in [j.get("use") for j in judges if isinstance(j, dict)]:
                judges.append({"models": [key.truth], "use": key.truth})
            raw["eval"]["judges"] = judges
        try:
            cfg = cls.model_validate(raw)
        except ValidationError as err:
            raise ConfigError(_one_line(err, source, f"{key.label} ({entry.config})")) from None
        if not cfg.eval.enabled:
            raise ConfigError(
                f"{source}: {key.label}: eval.enabled is false; the report reads every cell's evaluations"
            )
        if cells and cfg.ray != cells[0].config.ray:
            raise ConfigError(
                f"{source}: {key.label}: key 'ray' differs from {cells[0].key.id}'s; the cells share one Ray session"
            )
        cells.append(Cell(key, cfg, entry.kl_key, entry.config))
    return cells


# --- state of a cell ---------------------------------------------------------------------------


def read_done(out: str) -> dict | None:
    from tn_ray.storage import Store

    store = Store(out)
    return json.loads(store.read_text(DONE)) if store.exists(DONE) else None


def status(cell: Cell) -> str:
    """``done`` (its run returned: done.json), ``partial`` (a run started: checkpoints or provenance.json) or
    ``new``."""
    from tn_ray.storage import Store

    store = Store(cell.key.out)
    if store.exists(DONE):
        return "done"
    return "partial" if store.exists("provenance.json") or store.list_files("checkpoints") else "new"


def changed(cell: Cell, done: dict) -> list[str]:
    """How the config a finished cell ran under differs from the grid's now (provenance's comparison)."""
    from tn_ray.provenance import differences

    return differences({"config": done.get("config", {})}, {"config": cell.config.model_dump(mode="json")})


def describe(grid: GridConfig, cells: list[Cell]) -> list[str]:
    """The grid, one line per cell (``--dry-run``), and the cell count."""
    kls = {len(e.kl) for e in grid.methods.values()}
    shape = (
        f"{len(grid.methods)} methods x {len(grid.rewards)} rewards x "
        f"{kls.pop() if len(kls) == 1 else 'per-method'} kl x {len(grid.seeds)} seeds"
    )
    lines = [f"grid {grid.out}: {len(cells)} cells ({shape}); truth: {grid.truth}"]
    for cell in cells:
        k, cfg = cell.key, cell.config
        truth = "truth = the training reward" if k.truth == k.train else f"truth judge {k.truth}"
        contrast = f" [contrast {cfg.reward.contrast}]" if cfg.reward.needs_contrast else ""
        lines.append(
            f"{k.label}: {k.kind} ({cell.base_config}), reward {k.reward} = {k.train}{contrast}, "
            f"{cell.kl_key}={k.kl:g}, seed {k.seed}, {truth}, max_steps {cfg.max_steps}: {status(cell)}"
        )
    lines.append(f"{len(cells)} cells")
    return lines


# --- running ----------------------------------------------------------------------------------


def preflight(cells: list[Cell]) -> None:
    """Each unfinished cell's preflight (pipeline and reward weights found, prompts and contrastive sets), and
    the world proxies trained here once (before Ray actors load them); an error names the cell."""
    from tn_ray.experiments.world import ensure_models
    from tn_ray.training.config import resolve_prompts
    from tn_ray.training.preflight import check_run

    models = []
    for cell in cells:
        cfg = cell.config
        try:
            check_run(cfg, resolve_prompts(cfg))
        except TnRayError as err:
            raise InputError(f"{cell.key.label}: {err}") from err
        models += [*cfg.reward.models, *(m for j in cfg.eval.judges for m in j.models)]
    ensure_models(list(dict.fromkeys(models)))


def run_cell(cell: Cell, allow_provenance_change: bool = False) -> dict[str, Any]:
    """The cell's method run (resuming from its folder), then its ``done.json``; returns the result paths."""
    from tn_ray.storage import Store

    start = time.time()
    paths = _target(METHODS[cell.key.kind][1])(cell.config, allow_provenance_change=allow_provenance_change)
    done = {
        "cell": cell.key.id,
        "method": cell.key.method,
        "reward": cell.key.reward,
        "kl": cell.key.kl,
        "seed": cell.key.seed,
        "wall_s": round(time.time() - start, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "paths": {k: str(v) for k, v in paths.items()},
        "config": cell.config.model_dump(mode="json"),
    }
    Store(cell.key.out).write_text(DONE, json.dumps(done, indent=1))
    return done


def run(grid: GridConfig, source: str = "grid", allow_provenance_change: bool = False, echo=None) -> dict[str, Any]:
    """Every cell in turn in one Ray session, then the report; a finished cell is skipped (a finished cell whose
    config changed is an error, or with ``allow_provenance_change`` is continued under the new one). Progress
    lines (``cell 3/48 rwr-textnorm-kl1-s0: ...``) go to ``echo`` (default: printed). Returns the report's paths."""
    import yaml

    from tn_ray.storage import Store

    echo = echo or (lambda line: print(line, flush=True))
    cells = plan(grid, source)
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


def write_report(grid: GridConfig) -> dict[str, str]:
    """The report of the finished cells (those with done.json) under ``grid.out``: report.md, report.csv (one row
    per method, reward row and kl), curve.csv (per step), cells.csv (per cell), report.json (all three and the
    unfinished cells), accuracy_vs_step.png and, when cells recorded path KL, accuracy_vs_path_kl.png."""
    import pandas as pd

    from tn_ray.analysis import finetune_report as fr
    from tn_ray.storage import Store

    store = Store(grid.out)
    keys = grid_cells(grid)
    finished = [k for k in keys if read_done(k.out) is not None]
    missing = [k.id for k in keys if k not in finished]
    if not finished:
        raise InputError(f"{grid.out}: no finished cell (none has {DONE}) to report on; run the grid first")
    frames, selected = [], {}
    for key in finished:
        images, step = cell_tables(key)
        frames.append(images)
        selected[key.key] = step
    images = pd.concat(frames, ignore_index=True)
    r = grid.report
    curve = fr.curve(images, r.confidence, r.resamples, r.seed)
    cells = fr.cell_table(images, selected)
    summary = fr.selection_table(images, cells, r.confidence, r.resamples, r.seed)
    header = [
        f"Grid `{grid.out}`: {len(finished)} of {len(keys)} cells finished"
        + (f" (not yet: {', '.join(missing)})" if missing else "")
        + f"; truth column `{grid.truth}`; training rewards: "
        + ", ".join(f"{row} = `{rc.use}`" for row, rc in grid.rewards.items())
        + "."
    ]
    store.write_text("report.md", fr.markdown(summary, curve, grid.truth, r.confidence, header))
    store.write_text("report.csv", summary.to_csv(index=False))
    store.write_text("curve.csv", curve.to_csv(index=False))
    store.write_text("cells.csv", cells.to_csv(index=False))
    report = {
        "truth": grid.truth,
        "cells_total": len(keys),
        "cells_finished": [k.id for k in finished],
        "cells_missing": missing,
        "confidence": r.confidence,
        "summary": _records(summary),
        "curve": _records(curve),
        "cells": _records(cells),
    }
    store.write_text("report.json", json.dumps(report, indent=1))
    store.write_bytes("accuracy_vs_step.png", fr.plot_accuracy_vs_step(curve, grid.truth))
    paths = {
        name: store.uri(name)
        for name in ("report.md", "report.csv", "curve.csv", "cells.csv", "report.json", "accuracy_vs_step.png")
    }
    kl_png = fr.plot_accuracy_vs_path_kl(curve, grid.truth)
    if kl_png is not None:
        store.write_bytes("accuracy_vs_path_kl.png", kl_png)
        paths["accuracy_vs_path_kl.png"] = store.uri("accuracy_vs_path_kl.png")
    return {name.replace(".", "_"): uri for name, uri in paths.items()}


def _records(frame) -> list[dict]:
    """Rows as JSON-ready dicts, every float exact (NaN as null)."""
    import math

    def plain(v):
        v = v.item() if hasattr(v, "item") else v
        return None if isinstance(v, float) and math.isnan(v) else v

    return [{k: plain(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]
