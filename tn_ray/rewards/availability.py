"""Reward-model weights checked in the driver, before Ray starts or any model loads.

Offline (``HF_HUB_OFFLINE=1``), a model whose weights are neither a local path nor in the
Hugging Face cache can only fail, and it would fail inside a Ray actor's constructor, after
Ray started, as pages of repeated remote tracebacks. :func:`check_weights` finds that case
first and raises one :class:`~tn_ray.rewards.base.ModelLoadError` naming every such model and
what to do, as :func:`tn_ray.diffusion.pipelines.check_source` does for pipelines. Online,
nothing is checked here (the loaders download what they need).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from tn_ray.rewards.base import ModelLoadError, RewardSpec
from tn_ray.rewards.clip import resolve
from tn_ray.rewards.imagereward import CHECKPOINT_NAME, DEFAULT_REPO

_TRUE = ("1", "true", "yes", "on")


def offline() -> bool:
    """Whether the Hugging Face hub may not be reached (its own switches)."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def in_hub_cache(repo: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo, filename), str)
    except Exception:  # an id the hub would reject (a typo'd path, say) is not in the cache either
        return False


def _clip(spec: RewardSpec) -> str | None:
    from open_clip.pretrained import get_pretrained_cfg

    arch, pretrained = resolve(spec.source)
    if arch.startswith("hf-hub:"):
        repo = arch.removeprefix("hf-hub:")
        return None if in_hub_cache(repo, "open_clip_config.json") else f"hub repo '{repo}'"
    if pretrained is None or Path(pretrained).expanduser().exists():
        return None  # random weights, or a local checkpoint
    cfg = get_pretrained_cfg(arch, pretrained)
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)
        if in_hub_cache(repo, filename or "open_clip_pytorch_model.bin"):
            return None
        return f"open_clip weights {arch}/{pretrained} (hub repo '{repo}')"
    if cfg:
        return None  # a URL download: open_clip keeps its own cache, which it checks itself
    return f"'{pretrained}' (neither a local file nor a known open_clip tag of {arch})"


def _hub_model(default: str, files: tuple[str, ...] = ("config.json",)) -> Callable[[RewardSpec], str | None]:
    def check(spec: RewardSpec) -> str | None:
        source = spec.source or default
        if spec.source == "random" or Path(source).expanduser().exists():
            return None
        missing = [f for f in files if not in_hub_cache(source, f)]
        return f"hub repo '{source}'" if missing else None

    return check


def _pickscore(spec: RewardSpec) -> str | None:
    from tn_ray.rewards.pickscore import DEFAULT_MODEL, DEFAULT_PROCESSOR

    problem = _hub_model(DEFAULT_MODEL)(spec)
    if problem is None and not (spec.source and Path(spec.source).expanduser().exists()):
        if not in_hub_cache(DEFAULT_PROCESSOR, "tokenizer_config.json"):
            problem = f"processor hub repo '{DEFAULT_PROCESSOR}'"
    return problem


def _imagereward(spec: RewardSpec) -> str | None:
    return _hub_model(DEFAULT_REPO, (CHECKPOINT_NAME,))(spec)


def _blip2(spec: RewardSpec) -> str | None:
    from tn_ray.rewards.blip2 import DEFAULT_MODEL

    return _hub_model(DEFAULT_MODEL)(spec)


# registry name -> (spec -> what is missing, or None); models without an entry are not checked
CHECKS: dict[str, Callable[[RewardSpec], str | None]] = {
    "clip": _clip, "pickscore": _pickscore, "imagereward": _imagereward, "blip2": _blip2, "blip2-itm": _blip2,
}


def check_weights(specs: Sequence[str | RewardSpec]) -> None:
    """:class:`ModelLoadError` naming every model of ``specs`` whose weights cannot be found
    offline; a no-op online and for ``tiny`` models."""
    if not offline():
        return
    missing = []
    for text in specs:
        spec = text if isinstance(text, RewardSpec) else RewardSpec.parse(str(text))
        check = CHECKS.get(spec.name)
        problem = None if spec.is_tiny or check is None else check(spec)
        if problem:
            missing.append(f"'{spec}' needs {problem}")
    if missing:
        raise ModelLoadError(
            f"reward model weights not found offline (HF_HUB_OFFLINE=1, not in the Hugging Face cache): "
            f"{'; '.join(missing)}. Download them once with network access (huggingface-cli download <repo>), "
            "pass a local path (e.g. --models clip:ViT-B-32=/path/open_clip_pytorch_model.bin "
            "pickscore:/path/PickScore_v1), or use the ':tiny' variants")
