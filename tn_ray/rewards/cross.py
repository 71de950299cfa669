"""Helpers for cross-encoder rewards (ImageReward, BLIP-2 ITM): the text side runs per
(text, image) pair, so ``encode_texts`` only tokenizes and ``score`` batches pairs.

Per-text features are 1-D token-id tensors (cached one per text by the base class through
``split_text_features``); ``join`` pads them into a :class:`TokenBatch`; :func:`score_pairs`
runs a pair function on batches of (image row, text row) pairs, each batch cut to its own
longest prompt (padding is masked, so the cut changes nothing but the cost).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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


PairFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def score_pairs(pair_fn: PairFn, image_features: torch.Tensor, tokens: TokenBatch, batch_size: int,
                device: torch.device) -> torch.Tensor:
    """(n_images, n_texts) float32 CPU rewards; ``pair_fn(image_rows, input_ids, mask) -> (b,)``
    is called on at most ``batch_size`` pairs at a time (pairs in row-major order)."""
    n_img, n_txt = image_features.shape[0], len(tokens)
    out = torch.empty(n_img * n_txt, dtype=torch.float32)
    pairs = torch.arange(n_img * n_txt)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        img, txt = chunk // n_txt, chunk % n_txt
        mask = tokens.attention_mask[txt]
        length = int(mask.sum(dim=1).max())
        rewards = pair_fn(image_features[img.to(image_features.device)], tokens.input_ids[txt, :length].to(device),
                          mask[:, :length].to(device))
        out[chunk] = rewards.float().cpu()
    return out.view(n_img, n_txt)
