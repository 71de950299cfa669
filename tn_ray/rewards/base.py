"""The three-step reward interface every model implements.

``encode_images`` runs the image tower once per image; ``encode_texts`` runs whatever can be
done per text alone (a full text tower for dual encoders, tokenization for cross-encoders);
``score(image_features, text_features)`` returns the (n_images, n_texts) reward matrix.
A dual encoder scores by scaled cosine similarity; a cross-encoder runs its text side per
(text, image) pair inside ``score``. Either way an image is encoded once however many
prompts it is scored against, and a text is encoded once per model instance (cache).
"""
from __future__ import annotations

import abc
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from tn_ray.errors import InputError, TnRayError
from tn_ray.storage import read_any


class ModelLoadError(TnRayError, RuntimeError):
    """A reward model could not be loaded; it must never score."""


@dataclass(frozen=True)
class RewardSpec:
    """A registry name plus the weights to use: ``clip``, ``clip:tiny``, ``pickscore:/path``."""

    name: str
    source: str | None = None  # None = the paper's default weights; "tiny" = random small config

    @classmethod
    def parse(cls, text: str) -> RewardSpec:
        name, _, source = text.strip().partition(":")
        if not name:
            raise ValueError(f"empty reward model name in {text!r}")
        return cls(name.lower(), source or None)

    @property
    def is_tiny(self) -> bool:
        return self.source == "tiny"

    def __str__(self) -> str:
        return f"{self.name}:{self.source}" if self.source else self.name


def seeded_init(seed: int = 0):
    """Context for building a tiny model: the same random weights in every process (every
    Ray actor must score identically), without touching the caller's global RNG."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield

    return ctx()


def pick_device(device: str | None = None) -> torch.device:
    """The GPU Ray assigned to this process if any, else CPU (``device`` overrides)."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        try:
            import ray

            if ray.is_initialized() and not ray.get_gpu_ids():
                return torch.device("cpu")  # inside a Ray worker that was given no GPU
        except Exception:  # pragma: no cover - ray absent or not a worker
            pass
        return torch.device("cuda")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16/bf16 on GPU (bf16 where supported), fp32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_image(item: Any) -> Image.Image:
    """A PIL RGB image from a path or URI, bytes, a PIL image or an HWC uint8 array."""
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, str) and "://" in item:  # a cloud URI (s3://, gs://, ...)

        item = read_any(item)
    elif isinstance(item, (str, os.PathLike)):
        with Image.open(item) as im:
            return im.convert("RGB")
    if isinstance(item, (bytes, bytearray)):
        import io

        with Image.open(io.BytesIO(item)) as im:
            return im.convert("RGB")
    arr = np.asarray(item)
    if arr.ndim == 3 and arr.dtype == np.uint8:
        return Image.fromarray(arr).convert("RGB")
    raise TypeError(f"cannot read an image from {type(item).__name__} {getattr(arr, 'shape', '')}")


class RewardModel(abc.ABC):
    """Base class: subclasses load weights in ``__init__`` and implement the three steps."""

    name: str = "?"

    def __init__(self, spec: RewardSpec, device: str | None = None, text_batch_size: int = 64):
        self.spec = spec
        self.device = pick_device(device)
        self.dtype = default_dtype(self.device)
        self.text_batch_size = text_batch_size
        self._text_cache: dict[str, Any] = {}
        self.texts_encoded = 0  # counters that tests and benchmarks read
        self.images_encoded = 0

    @property
    def model_id(self) -> str:
        """The id stored with every score (registry name plus weights)."""
        return str(self.spec)

    # --- the three steps ------------------------------------------------------------
    @abc.abstractmethod
    def encode_images(self, images: Sequence[Image.Image]) -> Any: ...

    @abc.abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> Any: ...

    @abc.abstractmethod
    def score(self, image_features: Any, text_features: Any) -> torch.Tensor:
        """Rewards of shape (n_images, n_texts), float32 on CPU."""

    # --- how per-text features are cached and put back together -----------------------
    def split_text_features(self, features: Any) -> list[Any]:
        return list(features)

    def join_text_features(self, items: list[Any]) -> Any:
        return torch.stack(items)

    def select_images(self, image_features: Any, rows: Sequence[int]) -> Any:
        return image_features[list(rows)]

    # --- conveniences built on the three steps ---------------------------------------
    def text_features(self, texts: Sequence[str]) -> Any:
        """Features of ``texts``, encoding only those never seen by this instance."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        for i in range(0, len(missing), self.text_batch_size):
            chunk = missing[i : i + self.text_batch_size]
            with torch.inference_mode():
                feats = self.encode_texts(chunk)
            self._text_cache.update(zip(chunk, self.split_text_features(feats)))
            self.texts_encoded += len(chunk)
        return self.join_text_features([self._text_cache[t] for t in texts])

    def image_features(self, images: Sequence[Any]) -> Any:
        pil = [load_image(im) for im in images]
        with torch.inference_mode():
            feats = self.encode_images(pil)
        self.images_encoded += len(pil)
        return feats

    def score_rows(self, images: Sequence[Any], texts_per_image: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Score each image against its own list of texts; each image is encoded once.

        Images that share a text list (the usual case: many images of one prompt) are
        scored together in one ``score`` call.
        """
        if len(images) != len(texts_per_image):
            raise ValueError(f"{len(images)} images but {len(texts_per_image)} text lists")
        if not images:
            return []
        img = self.image_features(images)
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, texts in enumerate(texts_per_image):
            groups.setdefault(tuple(texts), []).append(i)
        out: list[np.ndarray] = [np.empty(0)] * len(images)
        for texts, rows in groups.items():
            if not texts:
                for r in rows:
                    out[r] = np.empty(0, dtype=np.float32)
                continue
            txt = self.text_features(list(texts))
            with torch.inference_mode():
                s = self.score(self.select_images(img, rows), txt)
            s = s.detach().float().cpu().numpy()
            for k, r in enumerate(rows):
                out[r] = s[k]
        return out

    # --- embeddings (reward learning trains a head on a dual encoder's frozen ones) ----------
    def embed(self, images: Sequence[Any], texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(image embeddings, text embeddings), each (n, d) float32; :class:`InputError` for a model
        whose features are not one vector per item (a cross-encoder's texts are tokens)."""
        img = (as_embeddings(self.image_features(list(images)), self.model_id, "image") if len(images)
               else np.zeros((0, 0), np.float32))
        txt = (as_embeddings(self.text_features(list(texts)), self.model_id, "text") if len(texts)
               else np.zeros((0, 0), np.float32))
        return img, txt

    def score_embeddings(self, image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
        """The model's own reward matrix (images, texts) from :meth:`embed`'s arrays (its ``score`` step)."""
        with torch.inference_mode():  # copies: Ray hands read-only arrays
            s = self.score(
                torch.tensor(image_features, device=self.device), torch.tensor(text_features, device=self.device)
            )
        return s.detach().float().cpu().numpy()


def as_embeddings(features: Any, model_id: str, what: str) -> np.ndarray:
    """(n, d) float32 array of a dual encoder's features; :class:`InputError` for anything else
    (a cross-encoder's per-text features are tokens, not an embedding a head can read)."""
    if not isinstance(features, torch.Tensor) or features.ndim != 2:
        shape = getattr(features, "shape", type(features).__name__)
        raise InputError(
            f"backbone '{model_id}' is not a dual encoder: its {what} features are {shape}, not one "
            "vector per item; use a model such as clip or pickscore"
        )
    return features.detach().float().cpu().numpy()


def check_tokenizer(tokenizer: Any, model_id: str) -> None:
    """Offline, transformers may return a tokenizer of a handful of entries instead of
    raising. Such a model must not score: raise, naming the id and the way out."""
    try:
        size = len(tokenizer)
    except TypeError:
        size = getattr(tokenizer, "vocab_size", 0)
    if size < 100:
        raise ModelLoadError(
            f"tokenizer of '{model_id}' has only {size} entries: the model files were not "
            "found (offline, or HF_HUB_OFFLINE=1 without a cached copy). Download the model "
            "once with network access (huggingface-cli download <id>) or pass a local "
            "directory, e.g. --models pickscore:/path/to/PickScore_v1"
        )
