"""Helpers for cross-encoder rewards (ImageReward, BLIP-2 ITM): the text side runs per
(text, image) pair, so ``encode_texts`` only tokenizes and ``score`` batches pairs.

Per-text features are 1-D token-id tensors (cached one per text by the base class through
``split_text_features``); ``join`` pads them into a :class:`TokenBatch`; :func:`score_pairs`
runs per-image work once per image and a pair function on batches of (image, text) pairs,
each batch cut to its own longest prompt (padding is masked: the cut changes only the cost).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class TokenBatch:
    """Tokenized prompts padded to the longest: (n, L) ids and 0/1 mask."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def pad_tokens(items: list[torch.Tensor], pad_id: int) -> TokenBatch:
    length = max(len(x) for x in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for i, x in enumerate(items):
        ids[i, : len(x)] = x
        mask[i, : len(x)] = 1
    return TokenBatch(ids, mask)


def score_pairs(pair_fn: Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                image_features: torch.Tensor, tokens: TokenBatch, batch_size: int, device: torch.device,
                prepare: Callable[[torch.Tensor], Any] | None = None) -> torch.Tensor:
    """(n_images, n_texts) float32 CPU rewards of every (image, text) pair.

    Images are taken in blocks of about ``batch_size / n_texts``; ``prepare(image_rows)``
    runs once per block (per-image work such as cross-attention keys/values; default: the
    rows themselves) and ``pair_fn(state, image_index, input_ids, mask) -> (b,)`` runs on at
    most ``batch_size`` pairs of the block at a time (``image_index`` indexes the block).
    """
    n_img, n_txt = image_features.shape[0], len(tokens)
    out = torch.empty(n_img, n_txt, dtype=torch.float32)
    per_block = max(1, batch_size // max(n_txt, 1))
    for b0 in range(0, n_img, per_block):
        rows = image_features[b0 : b0 + per_block]
        state = prepare(rows) if prepare is not None else rows
        pairs = torch.arange(rows.shape[0] * n_txt)
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            img, txt = chunk // n_txt, chunk % n_txt
            mask = tokens.attention_mask[txt]
            length = int(mask.sum(dim=1).max())
            rewards = pair_fn(state, img.to(rows.device), tokens.input_ids[txt, :length].to(device),
                              mask[:, :length].to(device))
            out[b0 + img, txt] = rewards.float().cpu()
    return out
