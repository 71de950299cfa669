"""The one place score matrices become reward columns: each model raw, its TextNorm, each ensemble.

Every experiment (TIA2 evaluation, ``tn-ray score``, best-of-n, fine-tuning rewards, sweeps)
turns score-matrix values into rewards here, so a temperature or an ensemble means the same
thing everywhere. Inputs are plain arrays: ``values[model]`` is a model's (images, 1 + m)
score-matrix values (column 0 = x0, NaN-padded contrastive columns).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from tn_ray.config import StrictModel
from tn_ray.rewards import parse
from tn_ray.textnorm.equations import ensemble, log_mean_ensemble, log_textnorm, textnorm


class SetParams(StrictModel):
    tau: float = Field(
        1.0,
        gt=0,
        description="TextNorm temperature for every model, in each reward's own units "
        "(docs/rewards.md: "
        "CLIP and PickScore rewards are 100 x cosine, so tau = 1 here is tau = 0.01 on cosine values; "
        "ImageReward's are standardized scores): a reward difference of tau is a factor e in probability",
    )
    tau_per_model: dict[str, float] = Field(
        default_factory=dict,
        description="temperature overrides by model spec or name, e.g. {'clip': 0.5} (each reward's own units, as tau)",
    )
    lam: float = Field(
        0.0,
        ge=0,
        description="lambda of the uncertainty-regularized ensembles (1 / reward^2: it "
        "multiplies a variance of rewards)",
    )

    def tau_for(self, model: str) -> float:
        name = model.split(":")[0]
        return self.tau_per_model.get(model, self.tau_per_model.get(name, self.tau))


Kind = Literal["mean", "uncertainty"]


class EnsembleSpec(StrictModel):
    name: str = Field(..., description="column name of this ensemble in tables and as a reward name")
    members: list[str] = Field(
        ..., min_length=2, description="model specs averaged (each must be among the run's models)"
    )
    kind: Kind | dict[str, Kind] = Field(
        "mean",
        description="mean (eq. 2), uncertainty (eq. 3: mean - lambda * variance across models), or one kind "
        "per "
        "prompt group, {<group>: kind, default: kind}; groups are TIA2's set names (a prompt's set in `tia2 eval` and "
        "for training prompts from the release), e.g. the paper's {composition: mean, default: uncertainty}",
    )
    textnorm: bool = Field(True, description="ensemble TextNorm-normalized rewards (True) or raw rewards (False)")

    @field_validator("kind")
    @classmethod
    def _default_kind(cls, v: Kind | dict[str, Kind]) -> Kind | dict[str, Kind]:
        if isinstance(v, dict) and "default" not in v:
            raise ValueError(f"a kind per group needs a 'default' kind for the other groups; got {v}")
        return v

    @property
    def per_group(self) -> bool:
        """Whether the kind depends on the prompt's group (callers must pass each row's group)."""
        return isinstance(self.kind, dict)

    def kind_for(self, group: str | None) -> str:
        """The ensemble kind of rows of ``group`` (None: rows without a group get the default)."""
        if isinstance(self.kind, str):
            return self.kind
        return self.kind.get(group, self.kind["default"]) if group is not None else self.kind["default"]


MultiKind = Literal["weighted", "uncertainty"]


class MultiRewardSpec(StrictModel):
    """One reward from several reward columns (a multi-reward): flow_grpo's weighted sum (its
    ``reward_fn`` dict) or an uncertainty-penalized ensemble of TextNorm columns. Listed in ``ensembles``
    beside :class:`EnsembleSpec` and chosen by its ``name`` (``use: <name>``) like an ensemble."""

    name: str = Field(..., description="column name of this multi-reward in tables and as a reward name")
    kind: MultiKind = Field(
        "weighted",
        description="weighted: sum of weight x column (flow_grpo's reward_fn dict, weights unnormalized); "
        "uncertainty: mean - lambda x variance across the columns (population variance, as eq. 3; lambda = "
        "textnorm.lam), TextNorm columns only so their units agree",
    )
    columns: dict[str, float] | list[str] = Field(
        ...,
        min_length=1,
        description="the reward columns combined: a model (raw), 'textnorm(<model>)' or an ensemble's name; "
        "weighted: a map column -> weight (unitless, any sign), e.g. {'textnorm(clip:tiny)': 0.7, "
        "'pickscore:tiny': 0.3}; uncertainty: a list of two or more 'textnorm(<model>)' columns",
    )

    @model_validator(mode="after")
    def _shape(self) -> MultiRewardSpec:
        if self.kind == "weighted" and not isinstance(self.columns, dict):
            raise ValueError(f"multi-reward '{self.name}': kind weighted needs columns as a map column -> weight")
        if self.kind == "uncertainty" and not (isinstance(self.columns, list) and len(self.columns) >= 2):
            raise ValueError(f"multi-reward '{self.name}': kind uncertainty needs a list of two or more columns "
                             "(weighted equally)")
        return self

    @property
    def names(self) -> list[str]:
        """The combined columns, in order."""
        return list(self.columns)

    @property
    def weights(self) -> list[float]:
        """One weight per column (weighted); an uncertainty ensemble weights its columns equally."""
        return list(self.columns.values()) if isinstance(self.columns, dict) else [1.0] * len(self.columns)

    @property
    def per_group(self) -> bool:
        """Never by itself (a per-group ensemble among its columns is per group: :func:`column_per_group`)."""
        return False


def _spec_kind(v: Any) -> str:
    """Which spec an `ensembles` entry is: a multi-reward has `columns`, an ensemble `members`."""
    return "multi" if (isinstance(v, MultiRewardSpec) or (isinstance(v, Mapping) and "columns" in v)) else "ensemble"


# an entry of a config's `ensembles` list: an ensemble of models or a multi-reward of columns
ColumnSpec = Annotated[
    Annotated[EnsembleSpec, Tag("ensemble")] | Annotated[MultiRewardSpec, Tag("multi")], Discriminator(_spec_kind)
]


def canonical_column(name: str, models: Sequence[str]) -> str:
    """``name`` with a model spec in canonical form (``textnorm(clip)`` -> ``textnorm(clip:<default>)``);
    other names (ensembles) unchanged; ``ValueError`` for an unknown model inside ``textnorm(...)``."""

    if name not in models and not name.startswith("textnorm("):
        try:
            canon = str(parse(name))
        except (KeyError, ValueError):
            return name
        return canon if canon in models else name
    inner = name[len("textnorm(") : -1] if name.startswith("textnorm(") else name
    try:
        canon = str(parse(inner))
    except KeyError as err:
        raise ValueError(str(err)) from None
    return f"textnorm({canon})" if name.startswith("textnorm(") else canon


def _check_multi(spec: MultiRewardSpec, models: Sequence[str], ensembles: Sequence[EnsembleSpec]) -> MultiRewardSpec:
    """A multi-reward with canonical column names; ``ValueError`` naming a column that is not one of the
    models' columns or ensembles, or (uncertainty) not a TextNorm column."""
    allowed = reward_names(models, ensembles)
    names = []
    for col in spec.names:
        try:
            canon = canonical_column(col, models)
        except ValueError as err:
            raise ValueError(f"multi-reward '{spec.name}': {err}") from None
        if canon not in allowed:
            raise ValueError(f"multi-reward '{spec.name}': '{col}' is not a reward column; expected one of {allowed}")
        if spec.kind == "uncertainty" and not canon.startswith("textnorm("):
            raise ValueError(f"multi-reward '{spec.name}': '{col}' is not a TextNorm column (an uncertainty ensemble "
                             "takes textnorm(<model>) columns only, so their units agree)")
        names.append(canon)
    if len(set(names)) != len(names):
        raise ValueError(f"multi-reward '{spec.name}': a column is listed twice in {names}")
    columns = dict(zip(names, spec.weights)) if isinstance(spec.columns, dict) else names
    return spec.model_copy(update={"columns": columns})


def check_ensembles(ensembles: Sequence[ColumnSpec], models: Sequence[str]) -> list[ColumnSpec]:
    """Ensembles with their members in canonical spec form and multi-rewards with canonical columns
    (over the models' columns and the ensembles); ``ValueError`` naming the ensemble whose members are
    not among ``models`` (for pydantic validators: the config fails to load)."""

    plain = []
    for ens in ensembles:
        if isinstance(ens, MultiRewardSpec):
            continue
        members = [str(parse(m)) for m in ens.members]
        unknown = [m for m in members if m not in models]
        if unknown:
            raise ValueError(f"ensemble '{ens.name}': members {unknown} are not among models {list(models)}")
        plain.append(ens.model_copy(update={"members": members}))
    it = iter(plain)
    out = [_check_multi(e, models, plain) if isinstance(e, MultiRewardSpec) else next(it) for e in ensembles]
    names = [e.name for e in out]
    clash = [n for n in names if n in models or n.startswith("textnorm(")]
    if clash:
        raise ValueError(f"ensemble name '{clash[0]}' clashes with a model's reward column")
    twice = [n for n in names if names.count(n) > 1]
    if twice:
        raise ValueError(f"ensemble name '{twice[0]}' is used twice")
    return out


def spec_named(name: str, ensembles: Sequence[ColumnSpec]) -> ColumnSpec | None:
    """The ensemble or multi-reward called ``name`` (None: a model's column)."""
    return next((e for e in ensembles if e.name == name), None)


def column_models(name: str, models: Sequence[str], ensembles: Sequence[ColumnSpec]) -> dict[str, bool]:
    """Model -> whether it must score the contrastive prompts too (TextNorm), for column ``name``."""
    if name in models:
        return {name: False}
    if name.startswith("textnorm("):
        return {name[len("textnorm(") : -1]: True}
    spec = spec_named(name, ensembles)
    if spec is None:
        raise ValueError(f"'{name}' is not a reward column; expected one of {reward_names(models, ensembles)}")
    out: dict[str, bool] = {}
    parts = ([column_models(c, models, ensembles) for c in spec.names] if isinstance(spec, MultiRewardSpec)
             else [{m: spec.textnorm} for m in spec.members])
    for part in parts:
        for m, contrast in part.items():
            out[m] = out.get(m, False) or contrast
    return out


def column_per_group(name: str, ensembles: Sequence[ColumnSpec]) -> bool:
    """Whether column ``name`` depends on each row's prompt group (an ensemble with a kind per group,
    or a multi-reward over one)."""
    spec = spec_named(name, ensembles)
    if isinstance(spec, MultiRewardSpec):
        return any(column_per_group(c, ensembles) for c in spec.names)
    return bool(spec and spec.per_group)


def specs_for(columns: Sequence[str], ensembles: Sequence[ColumnSpec]) -> list[ColumnSpec]:
    """The ensembles and multi-rewards that computing ``columns`` needs (a multi-reward's own ensembles
    included), in config order."""
    needed = set(columns)
    for col in columns:
        spec = spec_named(col, ensembles)
        if isinstance(spec, MultiRewardSpec):
            needed.update(spec.names)
    return [e for e in ensembles if e.name in needed]


def reward_names(models: Sequence[str], ensembles: Sequence[ColumnSpec] = ()) -> list[str]:
    """Column names, in order: each raw model, each ``textnorm(model)``, each ensemble and multi-reward."""
    return [*models, *(f"textnorm({m})" for m in models), *(e.name for e in ensembles)]


def combine(
    values: Mapping[str, np.ndarray],
    members: Sequence[str],
    taus: Sequence[float | np.ndarray],
    kind: str = "mean",
    lam: float | np.ndarray = 0.0,
    normalize: bool = True,
    ranking: bool = False,
) -> np.ndarray:
    """One reward per image from ``members``: TextNorm (each its own tau) or raw, then the
    ensemble ``kind`` (a single member is its own mean, and has zero variance). A tau or
    ``lam`` may be one value per image (per-prompt parameters).

    ``ranking=True`` returns an order-preserving form for ranking and metrics: a TextNorm
    reward as ``log r_X`` and a mean ensemble of them by log-mean-exp, strictly increasing
    functions of the reward that never underflow to tied zeros (at tau = 1e-3, rewards 1
    apart are ``exp(-1000)`` apart). Eq. 3 has no such form: the uncertainty ensemble stays
    in reward units (its ties are counted by :func:`tn_ray.analysis.metrics.per_prompt`).
    """
    if len(taus) != len(members):
        raise ValueError(f"{len(members)} members but {len(taus)} temperatures")
    if not normalize:
        return ensemble(np.stack([np.asarray(values[m], dtype=np.float64)[:, 0] for m in members]), kind, lam)
    if ranking and kind == "mean":
        return log_mean_ensemble(np.stack([log_textnorm(values[m], t) for m, t in zip(members, taus)]))
    return ensemble(np.stack([textnorm(values[m], t) for m, t in zip(members, taus)]), kind, lam)


def multi_reward(columns: Sequence[np.ndarray], weights: Sequence[float], kind: str = "weighted",
                 lam: float | np.ndarray = 0.0) -> np.ndarray:
    """One reward per image from k reward columns: ``weighted`` = sum_i weight_i x column_i (flow_grpo's
    ``multi_score``), ``uncertainty`` = eq. 3 across the columns (:func:`~tn_ray.textnorm.equations.ensemble`:
    mean - ``lam`` x population variance; the weights are ignored)."""
    stack = np.stack([np.asarray(c, dtype=np.float64) for c in columns])
    if kind == "weighted":
        if len(weights) != len(stack):
            raise ValueError(f"{len(stack)} columns but {len(weights)} weights")
        return np.tensordot(np.asarray(weights, dtype=np.float64), stack, axes=1)
    if kind != "uncertainty":
        raise ValueError(f"unknown multi-reward kind {kind!r}; expected weighted or uncertainty")
    return ensemble(stack, "uncertainty", lam)


def _columns(
    values: Mapping[str, np.ndarray],
    params: SetParams,
    ensembles: Sequence[ColumnSpec],
    group: str | None = None,
    ranking: bool = False,
) -> dict[str, np.ndarray]:
    plain = [e for e in ensembles if isinstance(e, EnsembleSpec)]
    multis = [e for e in ensembles if isinstance(e, MultiRewardSpec)]
    out = _model_columns(values, params, plain, group, ranking)
    units = _model_columns(values, params, plain, group) if ranking and multis else out  # multi-rewards: reward units
    for spec in multis:
        out[spec.name] = multi_reward([units[c] for c in spec.names], spec.weights, spec.kind, params.lam)
    return {name: out[name] for name in [*values, *(f"textnorm({m})" for m in values), *(e.name for e in ensembles)]}


def _model_columns(
    values: Mapping[str, np.ndarray],
    params: SetParams,
    ensembles: Sequence[EnsembleSpec],
    group: str | None = None,
    ranking: bool = False,
) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for m, v in values.items():
        out[m] = np.asarray(v, dtype=np.float64)[:, 0]
    for m, v in values.items():
        tau = params.tau_for(m)
        out[f"textnorm({m})"] = log_textnorm(v, tau) if ranking else textnorm(v, tau)
    for ens in ensembles:
        out[ens.name] = combine(
            values,
            ens.members,
            [params.tau_for(m) for m in ens.members],
            ens.kind_for(group),
            params.lam,
            ens.textnorm,
            ranking,
        )
    return out


def reward_columns(
    values: Mapping[str, np.ndarray],
    params: SetParams | Mapping[str, SetParams],
    ensembles: Sequence[ColumnSpec] = (),
    groups: Sequence[str] | None = None,
    ranking: bool = False,
) -> dict[str, np.ndarray]:
    """Every reward column (:func:`reward_names` order) for the images of ``values``.

    ``params`` is one :class:`SetParams`, or a mapping group -> params (key ``default`` for
    the rest) with ``groups`` naming each row's group (TIA2's sets have their own tau); an
    ensemble with a kind per group (:attr:`EnsembleSpec.kind`) also reads ``groups``.
    ``ranking``: TextNorm columns and their mean ensembles in the order-preserving log form
    of :func:`combine` (for ranking and metrics; rewards stay in their own units otherwise,
    and multi-rewards always: :func:`multi_reward` of the reward-unit columns).
    """
    if groups is None:
        if not isinstance(params, SetParams):
            raise ValueError("per-group parameters need `groups` (one group name per row)")
        return _columns(values, params, ensembles, None, ranking)
    groups = np.asarray(groups, dtype=object)
    n = len(groups)
    out: dict[str, np.ndarray] = {}
    for g in dict.fromkeys(groups.tolist()):
        rows = groups == g
        group_params = params if isinstance(params, SetParams) else params.get(g, params.get("default", SetParams()))
        part = _columns({m: np.asarray(v)[rows] for m, v in values.items()}, group_params, ensembles, g, ranking)
        for name, col in part.items():
            out.setdefault(name, np.full(n, np.nan))[rows] = col
    return out


def check_service(v: str | None) -> str | None:
    """A reward service's address as a config gives it (``reward.service``, best-of-n's ``service``):
    an http(s) URL or ``serve:<Serve application name>``."""
    if v is not None and not (v.startswith(("http://", "https://")) or (v.startswith("serve:") and v[6:])):
        raise ValueError(f"service: expected an http:// or https:// URL or serve:<Serve application name>, "
                         f"got {v!r}")
    return v


class RewardConfig(StrictModel):
    """A reward to optimize or select with: reward models, their TextNorm, ensembles, and which column."""

    models: list[str] = Field(
        ..., min_length=1, description="reward model specs scored on every image, e.g. clip:tiny, pickscore"
    )
    use: str = Field(
        ..., description="the reward column used: a model (raw), 'textnorm(<model>)', or the name of an ensemble "
        "or multi-reward of `ensembles`"
    )
    textnorm: SetParams = Field(
        default_factory=SetParams, description="TextNorm temperatures and the ensembles' lambda"
    )
    ensembles: list[ColumnSpec] = Field(
        default_factory=list,
        description="ensembles over the models ({name, members, kind, textnorm}) and multi-rewards over their "
        "columns ({name, kind: weighted | uncertainty, columns}: MultiRewardSpec); `use` picks one by name",
    )
    contrast: str = Field(
        "rules",
        description="contrastive sets for TextNorm: a prompt source ('rules', 'llm', "
        "'released', 'released:<TIA2 set>') or a JSON file {x0: [x1..xm]}",
    )
    service: str | None = Field(
        None,
        description="base URL of a warm reward service (`tn-ray serve rewards`, docs/serve.md) that scores the "
        "models instead of in-process reward actors, e.g. http://127.0.0.1:8000 (its token, if any, from "
        "TN_RAY_SERVE_TOKEN), or serve:<app name> for the application in the same Ray cluster (its Serve "
        "handle); None = reward actors. Used by DDPO's rewards, RWR's scoring of the generated images and the "
        "evaluation of RWR / DDPO (best-of-n: its top-level `service`)",
    )

    @field_validator("service")
    @classmethod
    def _service_url(cls, v: str | None) -> str | None:
        return check_service(v)

    @model_validator(mode="after")
    def _consistent(self) -> RewardConfig:
        models = [str(parse(m)) for m in self.models]
        object.__setattr__(self, "models", models)
        object.__setattr__(self, "ensembles", check_ensembles(self.ensembles, models))
        try:
            use = canonical_column(self.use, models)
        except ValueError as err:
            raise ValueError(f"use: {err}") from None
        names = reward_names(models, self.ensembles)
        if use not in names:
            raise ValueError(f"use: '{self.use}' is not a reward column of this config; expected one of {names}")
        object.__setattr__(self, "use", use)
        return self

    @property
    def needs_contrast(self) -> bool:
        """Whether the used column needs contrastive prompts (a raw model or raw ensemble does not)."""
        return any(column_models(self.use, self.models, self.ensembles).values())

    @property
    def per_group(self) -> bool:
        """Whether the used column depends on each prompt's group (an ensemble with a kind per set)."""
        return column_per_group(self.use, self.ensembles)

    def column(self, values: Mapping[str, np.ndarray], groups: Sequence[str] | None = None) -> np.ndarray:
        """The used reward of each image from the models' score-matrix values; ``groups``: each
        row's prompt group (TIA2 set), needed when :attr:`per_group`."""
        if self.per_group and groups is None:
            raise ValueError(f"reward '{self.use}' has an ensemble kind per prompt group: pass each row's group")
        return reward_columns(values, self.textnorm, self.ensembles, groups)[self.use]
