"""The reward service's YAML (``tn-ray serve rewards CONFIG``, e.g. ``sweeps/serve_rewards.yaml``):
where it binds, which reward models it serves and how each deployment scales and batches, which
reward columns it computes (TextNorm, ensembles), which contrastive-set sources and image roots a
client may name, and the limits of one request."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import Field, field_validator, model_validator

from tn_ray.client import TOKEN_ENV
from tn_ray.config import RayConfig, StrictModel
from tn_ray.labeling.security import needs_token
from tn_ray.rewards import parse
from tn_ray.textnorm.columns import ColumnSpec, SetParams, check_ensembles, reward_names

# a named source the service may resolve for a client; `llm` never (it would call an outside API
# with the service's credentials on a client's behalf), nor a JSON file (a client-chosen path)
NAMED_SOURCES = ("rules", "released")


@dataclass(frozen=True)
class StoreUri:
    """A store URI split for comparison: ``scheme://[credentials@]location/parts...?options``. ``parts``
    are the path's segments once percent-decoded (as pyarrow decodes them), ``options`` the query's
    (key, value) pairs sorted; ``credentials`` whether the URI carries user information."""

    scheme: str
    location: str  # bucket, or host[:port] (hdfs)
    parts: tuple[str, ...]
    options: tuple[tuple[str, str], ...]
    credentials: bool

    def inside(self, root: StoreUri) -> bool:
        """Whether this URI names an object strictly inside ``root``: the same scheme and location, and
        the root's segments as its first ones (``prefix-evil/x`` is not inside ``prefix``); options aside."""
        return (self.scheme == root.scheme and self.location == root.location
                and len(self.parts) > len(root.parts) and self.parts[: len(root.parts)] == root.parts)


def split_store_uri(text: str) -> StoreUri:
    """``text`` split as a :class:`StoreUri`; ValueError naming the problem for anything that is not a
    plain store URI: no scheme or location, a fragment, a ``.`` / ``..`` / empty segment (also when
    percent-encoded), percent-encoding twice, a backslash or a control character."""
    if not isinstance(text, str) or "://" not in text:
        raise ValueError("not a URI (expected scheme://bucket/path)")
    if any(ord(c) < 32 or c in "\\\x7f" for c in text):
        raise ValueError("a control character or a backslash")
    parts = urlsplit(text)
    if parts.fragment or text.endswith("#"):
        raise ValueError("a fragment (#...)")
    userinfo, _, location = parts.netloc.rpartition("@")
    if not parts.scheme or not location:
        raise ValueError("no scheme or no bucket (expected scheme://bucket/path)")
    path = unquote(parts.path)
    if unquote(path) != path:
        raise ValueError("percent-encoded twice")
    segments = tuple(path.strip("/").split("/")) if path.strip("/") else ()
    bad = [s for s in segments if s in ("", ".", "..") or "\\" in s or any(ord(c) < 32 for c in s)]
    if bad or "//" in path.rstrip("/"):
        raise ValueError(f"the segment {bad[0] if bad else ''!r} (no '.', '..' or empty segments)")
    options = tuple(sorted(parse_qsl(parts.query, keep_blank_values=True)))
    return StoreUri(parts.scheme.lower(), location, segments, options, bool(userinfo))


class ReplicaConfig(StrictModel):
    """One reward model's Serve deployment: resources per replica, autoscaling bounds, batching."""

    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per replica (count; fractions allowed)")
    num_gpus: float = Field(
        0.0, ge=0, le=1, description="GPUs per replica (fraction of one GPU); 0 = CPU replicas (the embedded default)"
    )
    min_replicas: int = Field(1, ge=1, description="autoscaling: fewest replicas of each model (count)")
    max_replicas: int = Field(1, ge=1, description="autoscaling: most replicas of each model (count)")
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="autoscaling: requests in flight per replica it aims at (count)"
    )
    max_ongoing_requests: int = Field(64, ge=1, description="requests one replica accepts at once (count)")
    max_batch_size: int = Field(
        256, ge=1, description="dynamic batching (@serve.batch): most images scored in one model call (images)"
    )
    batch_wait_timeout_s: float = Field(
        0.02, ge=0, description="dynamic batching: longest wait for more requests after the first (seconds)"
    )
    text_batch_size: int = Field(64, ge=1, description="prompts encoded per forward pass of the text tower (prompts)")

    @model_validator(mode="after")
    def _bounds(self) -> ReplicaConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas {self.max_replicas} is below min_replicas {self.min_replicas}")
        return self


class LimitsConfig(StrictModel):
    """What one request may hold; anything over is answered 413/400 naming the limit."""

    max_request_bytes: int = Field(16 * 2**20, ge=1024, description="largest request body (bytes)")
    max_pairs: int = Field(256, ge=1, description="most (image, prompt) pairs in one request (count)")
    max_image_bytes: int = Field(4 * 2**20, ge=64, description="largest encoded image, PNG or JPEG (bytes)")
    max_image_pixels: int = Field(
        4096 * 4096, ge=1, description="largest image, width x height (pixels), checked before it is decoded"
    )
    max_contrast: int = Field(64, ge=1, description="most contrastive prompts in one inline set (count)")
    max_prompt_chars: int = Field(1000, ge=1, description="longest prompt or contrastive prompt (characters)")


class ServeConfig(StrictModel):
    """``tn-ray serve rewards``: a Ray Serve application of reward models behind one HTTP front."""

    host: str = Field(
        "127.0.0.1",
        description="bind address of Serve's HTTP proxy; anything but 127.0.0.1 / ::1 / localhost needs a token "
        "(TN_RAY_SERVE_TOKEN or a printed random one)",
    )
    port: int = Field(8000, ge=1, le=65535, description="TCP port of Serve's HTTP proxy")
    route_prefix: str = Field("/", description="URL path the application answers under (e.g. '/' -> /v1/score)")
    app_name: str = Field("tn_ray_rewards", description="the Serve application's name")
    require_token: bool = Field(
        False, description="require the token on loopback too (always required off loopback)"
    )
    ssl_certfile: str | None = Field(
        None, description="TLS certificate (PEM file) of Serve's HTTP proxy: the service answers https:// "
        "(with ssl_keyfile); None = plain HTTP (put TLS in front: docs/serve.md)"
    )
    ssl_keyfile: str | None = Field(None, description="TLS private key (PEM file) for ssl_certfile")
    models: list[str] = Field(
        ..., min_length=1, description="reward model specs served, one deployment each, e.g. clip:tiny, worldclip"
    )
    replica: ReplicaConfig = Field(default_factory=ReplicaConfig, description="every model deployment's settings")
    replicas: dict[str, ReplicaConfig] = Field(
        default_factory=dict, description="per-model overrides of `replica`, by model spec"
    )
    front_num_cpus: float = Field(0.1, gt=0, description="CPUs reserved for the HTTP front replica (count)")
    textnorm: SetParams = Field(
        default_factory=SetParams, description="TextNorm temperatures and the ensembles' lambda"
    )
    ensembles: list[ColumnSpec] = Field(
        default_factory=list,
        description="ensembles over the models and multi-rewards over their columns, by name (as reward.ensembles)",
    )
    contrast_sources: list[str] = Field(
        default_factory=lambda: list(NAMED_SOURCES),
        description="named contrastive-set sources a client may ask for: 'rules', 'released', 'released:<TIA2 set>' "
        "(never 'llm'); inline sets are always allowed",
    )
    image_roots: list[str] = Field(
        default_factory=list,
        description="folders whose files a client may name by path (resolved, symlinks followed), and store URIs "
        "(s3://bucket/prefix, gs://...; any pyarrow filesystem, options after '?') whose objects a client may name "
        "by URI; empty = only images sent as base64 bytes",
    )
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="limits of one request")
    ray: RayConfig = Field(default_factory=RayConfig, description="the Ray cluster to start or join")

    @field_validator("contrast_sources")
    @classmethod
    def _sources(cls, v: list[str]) -> list[str]:
        for s in v:
            if s == "llm":
                raise ValueError("'llm' cannot be served: the service never calls an outside API with its own "
                                 "credentials on a client's behalf (send the sets inline)")
            if s not in NAMED_SOURCES and not s.startswith("released:"):
                raise ValueError(f"unknown contrastive-set source {s!r}; expected one of {list(NAMED_SOURCES)} or "
                                 "'released:<TIA2 set>'")
        return v

    @field_validator("image_roots")
    @classmethod
    def _roots(cls, v: list[str]) -> list[str]:
        out = []
        for r in v:
            if "://" in r:
                out.append(_uri_root(r))
                continue
            p = Path(r).expanduser().resolve()
            if not p.is_dir():
                raise ValueError(f"image root {r!r} is not a folder")
            out.append(str(p))
        return out

    @property
    def uri_roots(self) -> list[str]:
        """The image roots that are store URIs."""
        return [r for r in self.image_roots if "://" in r]

    @property
    def local_roots(self) -> list[str]:
        """The image roots that are local folders (resolved)."""
        return [r for r in self.image_roots if "://" not in r]

    @model_validator(mode="after")
    def _consistent(self) -> ServeConfig:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together: give both or neither")
        for key in ("ssl_certfile", "ssl_keyfile"):
            path = getattr(self, key)
            if path is not None and not Path(path).expanduser().is_file():
                raise ValueError(f"{key}: no file at {path!r}")

        models = [str(parse(m)) for m in self.models]
        if len(set(models)) != len(models):
            raise ValueError(f"models: a model is listed twice in {models}")
        object.__setattr__(self, "models", models)
        object.__setattr__(self, "ensembles", check_ensembles(self.ensembles, models))
        per_group = [e.name for e in self.ensembles if e.per_group]
        if per_group:
            raise ValueError(f"ensemble '{per_group[0]}' has a kind per prompt group: not served yet (give one kind)")
        replicas = {}
        for spec, rc in self.replicas.items():
            canon = str(parse(spec))
            if canon not in models:
                raise ValueError(f"replicas: {spec!r} is not among models {models}")
            replicas[canon] = rc
        object.__setattr__(self, "replicas", replicas)
        small = [m for m in models if self.replica_for(m).max_batch_size < self.limits.max_pairs]
        if small:
            raise ValueError(f"max_batch_size of {small[0]} is below limits.max_pairs {self.limits.max_pairs}: one "
                             "request must fit one batch")
        return self

    def replica_for(self, model: str) -> ReplicaConfig:
        return self.replicas.get(model, self.replica)

    @property
    def columns(self) -> list[str]:
        """Every reward column the service answers: each model raw, each textnorm(model), each ensemble."""
        return reward_names(self.models, self.ensembles)

    @property
    def token_required(self) -> bool:
        return self.require_token or needs_token(self.host)


def _uri_root(text: str) -> str:
    """A store URI image root, checked (:func:`split_store_uri`) and without a trailing '/'."""
    if text.lower().startswith("file://"):
        raise ValueError(f"image root {text!r}: give a local folder as a path (resolved, symlinks followed)")
    try:
        split_store_uri(text)
    except ValueError as err:
        raise ValueError(f"image root {text!r} is not a plain store URI: {err}") from None
    head, sep, query = text.partition("?")
    return head.rstrip("/") + sep + query


def service_token(cfg: ServeConfig) -> tuple[str | None, bool]:
    """(token, whether it was generated here) for ``cfg``: None when none is required; else
    ``TN_RAY_SERVE_TOKEN`` when set, or a fresh random one (32 url-safe characters) to print once."""
    import os
    import secrets

    if not cfg.token_required:
        return None, False
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV], False
    return secrets.token_urlsafe(24), True
