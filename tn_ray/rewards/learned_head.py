"""Lee et al.'s reward head: an MLP over the image embedding, the text embedding and their
elementwise product, on top of a frozen dual encoder.

``r(x, y) = MLP([u, v, u * v])`` (a scalar) with ``u``, ``v`` the image and text embeddings
standardised per dimension by the training set's mean and standard deviation (kept as buffers,
so the saved head applies the same transform). :meth:`RewardHead.pairwise`
scores every image against every text, the shape a reward model's ``score`` step returns.

A saved head is a folder: ``head.safetensors`` (weights) and ``head.json`` (backbone spec,
embedding size, hidden sizes, loss kind). Folders written by :func:`export` are named by a
hash of their content, so a ``learned:<folder>`` spec always means the same weights and the
reward cache (keyed by spec) is never stale.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from tn_ray.errors import InputError
from tn_ray.storage import Store, join_uri

WEIGHTS, META = "head.safetensors", "head.json"


class RewardHead(nn.Module):
    def __init__(self, dim: int, hidden: int = 128, layers: int = 2, dropout: float = 0.0):
        super().__init__()
        self.dim, self.hidden, self.layers, self.dropout = dim, hidden, layers, dropout
        blocks: list[nn.Module] = []
        width = 3 * dim
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
            width = hidden
        blocks.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*blocks)
        # per-dimension standardisation of the frozen embeddings (saved with the weights)
        for name, value in (("image_mean", 0.0), ("image_std", 1.0), ("text_mean", 0.0), ("text_std", 1.0)):
            self.register_buffer(name, torch.full((dim,), value))

    def standardize_with(self, image: torch.Tensor, text: torch.Tensor, eps: float = 1e-6) -> None:
        """Set the standardisation from training embeddings: a random or barely trained tower maps
        every input near one direction, and the head must see the differences, not the offset."""
        for prefix, x in (("image", image), ("text", text)):
            getattr(self, f"{prefix}_mean").copy_(x.mean(0))
            getattr(self, f"{prefix}_std").copy_(x.std(0).clamp_min(eps) if len(x) > 1 else torch.ones_like(x[0]))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Rewards of matching pairs: ``image`` and ``text`` (..., d) -> (...)."""
        image = (image - self.image_mean) / self.image_std
        text = (text - self.text_mean) / self.text_std
        return self.mlp(torch.cat([image, text, image * text], dim=-1)).squeeze(-1)

    def pairwise(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """(n_images, n_texts) rewards of every image with every text."""
        n, m = image.shape[0], text.shape[0]
        return self(image[:, None, :].expand(n, m, -1), text[None, :, :].expand(n, m, -1))

    def config(self) -> dict:
        return {"dim": self.dim, "hidden": self.hidden, "layers": self.layers, "dropout": self.dropout}


def save(head: RewardHead, folder: str | Path, meta: dict) -> None:
    """Write ``head`` and ``meta`` (backbone, loss kind, ...) into a local ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(folder / WEIGHTS))
    (folder / META).write_text(json.dumps({**meta, "head": head.config()}, indent=1, sort_keys=True))


def export(head: RewardHead, out: str, meta: dict) -> str:
    """Save into ``<out>/model-<hash of weights and meta>`` (a local folder or a URI); returns it."""

    with tempfile.TemporaryDirectory() as tmp:
        save(head, tmp, meta)
        files = {name: (Path(tmp) / name).read_bytes() for name in (WEIGHTS, META)}
    digest = hashlib.sha1(files[WEIGHTS] + files[META]).hexdigest()[:12]
    store = Store(out)
    for name, data in files.items():
        store.write_bytes(f"model-{digest}/{name}", data)
    return store.uri(f"model-{digest}") if store.local else join_uri(out, f"model-{digest}")


def load(folder: str) -> tuple[RewardHead, dict]:
    """(head in eval mode, its meta) from a local folder or a URI."""
    from safetensors.torch import load as load_bytes

    store = Store(folder)
    if not store.exists(META) or not store.exists(WEIGHTS):
        raise InputError(f"{folder}: not a learned reward folder (needs {META} and {WEIGHTS}; `tn-ray reward train` "
                         "writes one)")
    meta = json.loads(store.read_text(META))
    cfg = meta["head"]
    head = RewardHead(int(cfg["dim"]), int(cfg["hidden"]), int(cfg["layers"]), float(cfg.get("dropout", 0.0)))
    head.load_state_dict(load_bytes(store.read_bytes(WEIGHTS)))
    return head.eval(), meta
