"""Which weights a reward model spec names, as a revision for a run's provenance record.

``random-init`` (tiny or random weights), ``local`` (a path), the Hugging Face commit of its
weights when they come from the hub cache (:func:`tn_ray.provenance.hub_revision`), else
``builtin`` (a model without hub weights). Light: nothing loads a model.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tn_ray.provenance import hub_revision
from tn_ray.rewards.base import RewardSpec
from tn_ray.rewards.clip import resolve
from tn_ray.rewards.imagereward import CHECKPOINT_NAME, DEFAULT_REPO


def reward_revisions(models: Iterable[str]) -> dict[str, str]:
    """``{"reward:<spec>": revision}`` for each distinct spec, for :func:`tn_ray.provenance.record`."""
    return {f"reward:{m}": reward_revision(m) for m in dict.fromkeys(str(m) for m in models)}


def reward_revision(text: str) -> str:
    """Revision of a reward model spec: 'random-init' (tiny, random), 'local' (a path), the hub commit
    of its weights when they come from the hub, else 'builtin' (a model without hub weights)."""
    spec = RewardSpec.parse(text)
    if spec.is_tiny or spec.source == "random":
        return "random-init"
    repo = _reward_repo(spec)
    if repo is None:
        return "local" if spec.source and Path(spec.source.split("=")[-1]).expanduser().exists() else "builtin"
    return hub_revision(*repo)


def _reward_repo(spec) -> tuple[str, str] | None:
    """(hub repo, a file in it) the weights of ``spec`` come from; None for local or non-hub weights."""
    source = spec.source
    if source and Path(source).expanduser().exists():
        return None
    if spec.name == "pickscore":
        from tn_ray.rewards.pickscore import DEFAULT_MODEL
        return source or DEFAULT_MODEL, "config.json"
    if spec.name == "imagereward":
        return source or DEFAULT_REPO, CHECKPOINT_NAME
    if spec.name in ("blip2", "blip2-itm"):
        from tn_ray.rewards.blip2 import DEFAULT_MODEL
        return source or DEFAULT_MODEL, "config.json"
    if spec.name == "clip":
        from open_clip.pretrained import get_pretrained_cfg

        arch, pretrained = resolve(source)
        if arch.startswith("hf-hub:"):
            return arch.removeprefix("hf-hub:"), "open_clip_config.json"
        if pretrained is None or Path(pretrained).expanduser().exists():
            return None
        hub = get_pretrained_cfg(arch, pretrained).get("hf_hub", "")
        if hub:
            repo, filename = os.path.split(hub.rstrip("/"))
            return (repo, filename) if "/" in repo else (hub.rstrip("/"), "open_clip_pytorch_model.bin")
    return None
