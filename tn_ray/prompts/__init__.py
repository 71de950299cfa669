"""Sources of contrastive prompts for TextNorm, by name: ``released``, ``rules``, ``llm``, ``world``.

``build(name, cfg)`` returns a source whose ``generate(x0s)`` gives one
:class:`ContrastSet` per x0 (prompts, the source that made them, an error or a fallback
note). ``register(name, "module:Class")`` adds a source; the class takes its settings
block (``SourcesConfig.<config_key>``, if any) plus keyword arguments. The Ray-sharded job is
:func:`tn_ray.prompts.synthesize.synthesize`.
"""
from __future__ import annotations

import importlib

from tn_ray.errors import UnknownName
from tn_ray.prompts.base import ContrastSet, ContrastSource, clean, normalize
from tn_ray.prompts.settings import LlmConfig, ReleasedConfig, RulesConfig, SourcesConfig

# name -> ("module:Class", settings block of SourcesConfig or None)
SOURCES: dict[str, tuple[str, str | None]] = {
    "released": ("tn_ray.prompts.released:ReleasedSource", "released"),
    "rules": ("tn_ray.prompts.rules:RulesSource", "rules"),
    "llm": ("tn_ray.prompts.llm:LlmSource", "llm"),
    "world": ("tn_ray.prompts.world:WorldSource", None),
}


def register(name: str, target: str, config_key: str | None = None) -> None:
    """Add a source: ``target`` is "module:Class", built as ``Class(cfg.<config_key>, **kwargs)``
    (``Class(**kwargs)`` without a settings block)."""
    if ":" not in target:
        raise ValueError(f"source target must be 'module:Class', got {target!r}")
    SOURCES[name] = (target, config_key)


def source_class(name: str):
    if name not in SOURCES:
        raise UnknownName(f"unknown prompt source '{name}'; known: {sorted(SOURCES)}")
    module, cls = SOURCES[name][0].split(":")
    return getattr(importlib.import_module(module), cls)


def build(name: str, cfg: SourcesConfig | None = None, **kwargs) -> ContrastSource:
    """The source ``name`` with its settings from ``cfg`` (defaults when None)."""
    cfg = cfg or SourcesConfig()
    cls = source_class(name)
    block = SOURCES[name][1]
    if name == "llm":
        kwargs.setdefault("rules", cfg.rules)
    return cls(getattr(cfg, block), **kwargs) if block else cls(**kwargs)


__all__ = ["SOURCES", "ContrastSet", "ContrastSource", "LlmConfig", "ReleasedConfig", "RulesConfig",
           "SourcesConfig", "build", "clean", "normalize", "register", "source_class"]
