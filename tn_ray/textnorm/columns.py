"""The one place score matrices become reward columns: each model raw, its TextNorm, each ensemble.

Every experiment (TIA2 evaluation, ``tn-ray score``, best-of-n, fine-tuning rewards, sweeps)
turns score-matrix values into rewards here, so a temperature or an ensemble means the same
thing everywhere. Inputs are plain arrays: ``values[model]`` is a model's (images, 1 + m)
score-matrix values (column 0 = x0, NaN-padded contrastive columns).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from tn_ray.config import StrictModel
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


def check_ensembles(ensembles: Sequence[EnsembleSpec], models: Sequence[str]) -> list[EnsembleSpec]:
    """Ensembles with their members in canonical spec form; ``ValueError`` naming the ensemble
    whose members are not among ``models`` (for pydantic validators: the config fails to load)."""
    from tn_ray.rewards import parse

    out = []
    for ens in ensembles:
        members = [str(parse(m)) for m in ens.members]
        unknown = [m for m in members if m not in models]
        if unknown:
            raise ValueError(f"ensemble '{ens.name}': members {unknown} are not among models {list(models)}")
        out.append(ens.model_copy(update={"members": members}))
    clash = [e.name for e in out if e.name in models or e.name.startswith("textnorm(")]
    if clash:
        raise ValueError(f"ensemble name '{clash[0]}' clashes with a model's reward column")
    return out


def reward_names(models: Sequence[str], ensembles: Sequence[EnsembleSpec] = ()) -> list[str]:
    """Column names, in order: each raw model, each ``textnorm(model)``, each ensemble."""
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


def _columns(
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
    ensembles: Sequence[EnsembleSpec] = (),
    groups: Sequence[str] | None = None,
    ranking: bool = False,
) -> dict[str, np.ndarray]:
    """Every reward column (:func:`reward_names` order) for the images of ``values``.

    ``params`` is one :class:`SetParams`, or a mapping group -> params (key ``default`` for
    the rest) with ``groups`` naming each row's group (TIA2's sets have their own tau); an
    ensemble with a kind per group (:attr:`EnsembleSpec.kind`) also reads ``groups``.
    ``ranking``: TextNorm columns and their mean ensembles in the order-preserving log form
    of :func:`combine` (for ranking and metrics; rewards stay in their own units otherwise).
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
        ..., description="the reward column used: a model (raw), 'textnorm(<model>)' or an ensemble's name"
    )
    textnorm: SetParams = Field(
        default_factory=SetParams, description="TextNorm temperatures and the ensembles' lambda"
    )
    ensembles: list[EnsembleSpec] = Field(default_factory=list, description="ensembles over the models (see `use`)")
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
        from tn_ray.rewards import parse

        models = [str(parse(m)) for m in self.models]
        object.__setattr__(self, "models", models)
        object.__setattr__(self, "ensembles", check_ensembles(self.ensembles, models))
        use = self.use
        if use in self.models or use.startswith("textnorm("):  # canonical spelling of the model inside
            inner = use[len("textnorm(") : -1] if use.startswith("textnorm(") else use
            try:
                canon = str(parse(inner))
            except KeyError as err:
                raise ValueError(f"use: {err}") from None
            use = f"textnorm({canon})" if self.use.startswith("textnorm(") else canon
        names = reward_names(models, self.ensembles)
        if use not in names:
            raise ValueError(f"use: '{self.use}' is not a reward column of this config; expected one of {names}")
        object.__setattr__(self, "use", use)
        return self

    @property
    def needs_contrast(self) -> bool:
        """Whether the used column needs contrastive prompts (a raw model or raw ensemble does not)."""
        if self.use.startswith("textnorm("):
            return True
        ens = next((e for e in self.ensembles if e.name == self.use), None)
        return bool(ens and ens.textnorm)

    @property
    def per_group(self) -> bool:
        """Whether the used column depends on each prompt's group (an ensemble with a kind per set)."""
        ens = next((e for e in self.ensembles if e.name == self.use), None)
        return bool(ens and ens.per_group)

    def column(self, values: Mapping[str, np.ndarray], groups: Sequence[str] | None = None) -> np.ndarray:
        """The used reward of each image from the models' score-matrix values; ``groups``: each
        row's prompt group (TIA2 set), needed when :attr:`per_group`."""
        if self.per_group and groups is None:
            raise ValueError(f"reward '{self.use}' has an ensemble kind per prompt group: pass each row's group")
        return reward_columns(values, self.textnorm, self.ensembles, groups)[self.use]
