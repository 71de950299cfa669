"""``worldclip``: a small CLIP-like dual encoder trained on the synthetic world (docs/world.md).

Trained contrastively (symmetric InfoNCE, in-batch negatives, learned temperature) on (image,
caption) pairs of the world: a prompt of the grammar and a scene that matches it, rendered at
64 px and resized to 32 px. Its mistakes are learned, not injected: a short run on a CPU
learns colours and shapes well and counts and relations less well.

Weights are trained on first use and cached under ``$TN_RAY_CACHE_DIR/world`` (or
``~/.cache/tn_ray/world``), never downloaded. Training is seeded and runs on a fixed number of
CPU threads, so every process and machine (same torch version and CPU instruction set) gets
bit-identical weights; the cache file's name hashes the settings and the torch version, and a
file lock makes concurrent first uses (several Ray actors) train once.

Spec sources: ``worldclip`` (the default run), ``worldclip:tiny`` (a short run, for tests)
and ``key=value`` overrides of :class:`WorldClipConfig`, e.g. ``worldclip:seed=1`` or
``worldclip:steps=300,seed=2``. Reward = logit scale x cosine similarity, as CLIP.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError
from torch import nn

from tn_ray.config import StrictModel
from tn_ray.data.world import grammar, sampler, scenes
from tn_ray.data.world.grammar import vocabulary
from tn_ray.errors import InputError
from tn_ray.rewards.base import RewardModel, RewardSpec
from tn_ray.storage import local_cache

log = logging.getLogger(__name__)

FORMAT = 1  # bump when training or the architecture changes: old cache files are then never read
TRAIN_THREADS = 1  # fixed, so the floating-point reductions (and the weights) never depend on the machine
MAX_TOKENS = 16


class WorldClipConfig(StrictModel):
    seed: int = Field(0, ge=0, description="seed of the initial weights and of the training data")
    steps: int = Field(400, ge=1, description="optimizer steps (each one batch of fresh pairs)")
    batch: int = Field(64, ge=8, description="pairs per step; the other pairs of a batch are the negatives")
    lr: float = Field(2e-3, gt=0, description="peak AdamW learning rate (cosine decay to 0 after a 5% warm-up)")
    width: int = Field(16, ge=8, description="channels of the first image convolutions; doubled once (count)")
    dim: int = Field(64, ge=8, description="width of the joint embedding and of the text transformer (count)")
    image_size: int = Field(32, ge=16, le=128, description="side the image tower sees; every image is resized to it "
                                                           "(px)")
    render_size: int = Field(64, ge=32, le=128, description="side the training scenes are rendered at before resizing "
                                                            "(px)")


TINY = {"steps": 60, "batch": 32}


def parse_source(source: str | None) -> WorldClipConfig:
    """The training settings named by a spec's source: None, ``tiny`` (a short run) and/or
    ``key=value`` overrides, comma-separated (``tiny,seed=1``, ``steps=300,seed=2``)."""
    values: dict[str, str] = {}
    for part in (source or "").split(","):
        key, sep, value = (x.strip() for x in part.partition("="))
        if part.strip() == "tiny":
            values = {**{k: str(v) for k, v in TINY.items()}, **values}
        elif key and sep:
            values[key] = value
        elif part.strip():
            raise InputError(f"worldclip source '{source}': expected 'tiny' and/or key=value pairs like "
                             "'seed=1,steps=300'")
    try:
        return WorldClipConfig(**values)
    except ValidationError as err:
        first = err.errors()[0]
        raise InputError(f"worldclip source '{source}': key '{first['loc'][0]}': {first['msg']}") from None


# --- tokenizer -------------------------------------------------------------------------
def _vocab() -> dict[str, int]:
    return {w: i + 2 for i, w in enumerate(vocabulary())}  # 0 = padding, 1 = unknown word


def tokenize(texts: Sequence[str], vocab: dict[str, int]) -> torch.Tensor:
    """Word ids (lower case, punctuation dropped), padded with 0 to the longest text."""
    ids = [[vocab.get(w, 1) for w in re.findall(r"[a-z]+", t.lower())][:MAX_TOKENS] or [1] for t in texts]
    out = torch.zeros(len(ids), max(len(x) for x in ids), dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, : len(x)] = torch.tensor(x)
    return out


# --- the dual encoder --------------------------------------------------------------------
class WorldClip(nn.Module):
    def __init__(self, cfg: WorldClipConfig, vocab_size: int):
        super().__init__()
        w = cfg.width

        def block(i: int, o: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]

        side = cfg.image_size // 8
        self.image = nn.Sequential(
            *block(3, w),
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            nn.Flatten(),
            nn.Linear(2 * w * side * side, 2 * cfg.dim),
            nn.ReLU(),
            nn.Linear(2 * cfg.dim, cfg.dim),
        )
        self.embed = nn.Embedding(vocab_size, cfg.dim, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(MAX_TOKENS, cfg.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.dim, nhead=4, dim_feedforward=2 * cfg.dim, dropout=0.0, batch_first=True)
        self.text = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.text_proj = nn.Linear(cfg.dim, cfg.dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(10.0))))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(x), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        pad = tokens == 0
        h = self.text(self.embed(tokens) + self.pos[: tokens.shape[1]], src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        return F.normalize(self.text_proj((h * keep).sum(1) / keep.sum(1)), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)


def to_tensor(images: Sequence, size: int) -> torch.Tensor:
    """RGB images -> (n, 3, size, size) floats in [-1, 1] (bilinear resize, as at training)."""
    from PIL import Image

    arr = np.stack(
        [np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) for im in images]
    )
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


# --- training ----------------------------------------------------------------------------
def training_batch(cfg: WorldClipConfig, rng: np.random.Generator) -> tuple[list, list[str]]:
    """``cfg.batch`` (image, caption) pairs with distinct captions: a prompt of a random kind
    and a scene that matches it."""

    images, texts, seen = [], [], set()
    while len(texts) < cfg.batch:
        p = grammar.random_prompt(grammar.KINDS[int(rng.integers(len(grammar.KINDS)))], rng)
        if p.text in seen:
            continue
        seen.add(p.text)
        scene = sampler.draw_scene(p, None, rng)
        images.append(scenes.render(scene, cfg.render_size, seed=int(rng.integers(2**31))))
        texts.append(p.text)
    return images, texts


def train(cfg: WorldClipConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """Seeded training on ``TRAIN_THREADS`` threads; (state dict, training log)."""
    vocab = _vocab()
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    start, cpu = time.time(), time.process_time()
    losses = []
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = WorldClip(cfg, len(vocab) + 2)
        rng = np.random.default_rng(cfg.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
        warm = max(1, cfg.steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + np.cos(np.pi * (s - warm) / max(1, cfg.steps - warm))),
        )
        target = torch.arange(cfg.batch)
        for _ in range(cfg.steps):
            images, texts = training_batch(cfg, rng)
            img = model.encode_image(to_tensor(images, cfg.image_size))
            txt = model.encode_text(tokenize(texts, vocab))
            logits = model.scale() * img @ txt.T
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    finally:
        torch.set_num_threads(threads)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    info = {
        "config": cfg.model_dump(),
        "seconds": round(time.time() - start, 1),
        "cpu_seconds": round(time.process_time() - cpu, 1),
        "threads": TRAIN_THREADS,
        "torch": str(torch.__version__),
        "loss_first": losses[0],
        "loss_last": float(np.mean(losses[-20:])),
        "sha256": weights_sha256(state),
    }
    return state, info


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_dir() -> Path:
    return local_cache("world")


def cache_path(cfg: WorldClipConfig) -> Path:
    key = json.dumps({"format": FORMAT, "torch": torch.__version__.split("+")[0], **cfg.model_dump()}, sort_keys=True)
    return cache_dir() / f"worldclip-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def ensure(cfg: WorldClipConfig) -> Path:
    """The cached weights of ``cfg``, trained now if absent (once, under a file lock)."""
    from filelock import FileLock

    path = cache_path(cfg)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists():  # another process trained it while this one waited
            return path
        log.info("training worldclip %s (first use; cached at %s)", cfg.model_dump(), path)
        state, info = train(cfg)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"state": state, "info": info}, tmp)
        path.with_suffix(".json").write_text(
            json.dumps(info, indent=1)
        )  # before the weights: their presence means done
        os.replace(tmp, path)
    return path


def load(cfg: WorldClipConfig) -> tuple[WorldClip, dict]:
    blob = torch.load(ensure(cfg), map_location="cpu", weights_only=True)
    model = WorldClip(cfg, len(_vocab()) + 2)
    model.load_state_dict(blob["state"])
    return model.eval(), blob["info"]


class WorldClipReward(RewardModel):
    name = "worldclip"

    def __init__(self, spec: RewardSpec, device: str | None = None, text_batch_size: int = 64):
        super().__init__(spec, device, text_batch_size)
        self.cfg = parse_source(spec.source)
        model, self.info = load(self.cfg)
        self.dtype = torch.float32  # a small model: full precision everywhere
        self.model = model.to(self.device)
        self.vocab = _vocab()

    def encode_images(self, images) -> torch.Tensor:
        return self.model.encode_image(to_tensor(images, self.cfg.image_size).to(self.device))

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(tokenize(texts, self.vocab).to(self.device))

    def score(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return (self.model.scale() * image_features @ text_features.T).float().cpu()
