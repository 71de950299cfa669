"""The world generator's weights as shipped in the package: where they are, their record, loading.

``weights/`` is a plain diffusers folder (``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``; fp16 safetensors), so
``diffusers.StableDiffusionPipeline.from_pretrained(path)`` loads it without tn_ray;
``training.json`` beside it holds the settings, the training log and time, the held-out
evaluation and each weight file's sha256 (checked before a run uses them).

``weights_flow/`` is the same for the flow-matching variant (pipeline ``world-flow``, a
``StableDiffusion3Pipeline``: ``transformer/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``,
``tokenizer/``, ``tokenizer_2/``, ``scheduler/``), once trained and committed; until then every use
fails with one line naming the command that trains it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tn_ray.errors import TnRayError

WEIGHTS = Path(__file__).parent / "weights"
WEIGHTS_FLOW = Path(__file__).parent / "weights_flow"  # the flow-matching variant (pipeline world-flow)
RECORD = "training.json"
TRAIN_FLOW = ("tn-ray world train-generator sweeps/world_generator_flow.yaml --out "
              "tn_ray/diffusion/world/weights_flow")


class WorldWeightsError(TnRayError, RuntimeError):
    """The packaged world generator is missing or does not match its record."""


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every ``*.safetensors`` under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


def record(folder: Path = WEIGHTS) -> dict:
    path = folder / RECORD
    if not path.is_file() and Path(folder) == WEIGHTS_FLOW:
        raise WorldWeightsError(f"the world-flow generator's weights are missing ({path} not found): rebuild "
                                f"them with `{TRAIN_FLOW}` (docs/world.md, 'The flow-matching variant')")
    if not path.is_file():
        raise WorldWeightsError(f"the world generator's weights are missing ({path} not found): reinstall tn_ray, or "
                                "train them with `tn-ray world train-generator sweeps/world_generator.yaml`")
    from tn_ray.storage import read_json

    return read_json(path)


def check_weights(folder: Path = WEIGHTS) -> None:
    """Every weight file is there with the sha256 its record gives."""
    want = record(folder)["sha256"]
    have = file_hashes(folder)
    for name, digest in want.items():
        if have.get(name) != digest:
            raise WorldWeightsError(f"{folder / name}: sha256 {have.get(name, 'missing')} differs from the "
                                    f"{digest} in {folder / RECORD}; reinstall tn_ray or retrain the generator")


def revision(folder: Path = WEIGHTS) -> str:
    """``world@<12 hex>`` (``world-flow@`` for :data:`WEIGHTS_FLOW`): a digest of the weight files' sha256 (what
    provenance records)."""
    digest = hashlib.sha256(json.dumps(record(folder)["sha256"], sort_keys=True).encode()).hexdigest()
    name = "world-flow" if Path(folder) == WEIGHTS_FLOW else "world"
    return f"{name}@{digest[:12]}"


def load(folder: Path = WEIGHTS, dtype=None):
    """The pipeline (float32 unless ``dtype``; the class ``model_index.json`` names: StableDiffusionPipeline, or
    StableDiffusion3Pipeline with the T5 encoder left out, as diffusers documents it), progress bars off."""
    import torch
    from diffusers import DiffusionPipeline

    if Path(folder) == WEIGHTS_FLOW:
        record(folder)  # one line when missing
    index = json.loads((Path(folder) / "model_index.json").read_text())
    absent = {"text_encoder_3": None, "tokenizer_3": None} if "text_encoder_3" in index else {}
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=dtype or torch.float32, **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save(pipe, folder: Path, info: dict) -> dict:
    """Write ``pipe`` as fp16 safetensors with its record (:func:`write_record`); returns the record."""
    import copy

    import torch

    folder.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(pipe)
    for component in half.components.values():
        if isinstance(component, torch.nn.Module):
            component.to(torch.float16)
    half.save_pretrained(folder, safe_serialization=True)
    return write_record(folder, info)


def write_record(folder: Path, info: dict) -> dict:
    """``training.json`` in ``folder``: ``info`` and the weight files' sha256; returns it."""
    rec = {**info, "sha256": file_hashes(folder)}
    (folder / RECORD).write_text(json.dumps(rec, indent=1) + "\n")
    return rec
