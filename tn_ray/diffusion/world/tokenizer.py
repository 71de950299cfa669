"""CLIP's BPE tokenizer cut down to the world grammar's words.

OpenAI CLIP's merge list (built offline, :func:`tn_ray.rewards.bpe.clip_vocab_and_merges`) is run
on every word of the grammar; the tokenizer keeps only the merges those runs apply (in CLIP's
order) and the tokens they touch, renumbered, plus CLIP's two special tokens. So a world prompt
tokenizes exactly as CLIP tokenizes it, over a vocabulary of ~100 entries instead of 49,408 (the
text encoder's embedding table stays small); a letter outside it maps to ``<|endoftext|>``.
"""
from __future__ import annotations

import functools

MAX_LENGTH = 20  # tokens, with the two specials: the longest world prompt takes 16


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[tuple[str, str]]:
    """The merges CLIP's BPE applies to ``word``, in the order it applies them."""
    parts = [*word[:-1], word[-1] + "</w>"]
    applied = []
    while len(parts) > 1:
        pairs = [(parts[i], parts[i + 1]) for i in range(len(parts) - 1)]
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        applied.append(best)
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return applied


@functools.cache
def vocab_and_merges(words: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE tables restricted to what ``words`` need."""
    from tn_ray.rewards.bpe import clip_vocab_and_merges

    _, clip_merges = clip_vocab_and_merges()
    ranks = {tuple(m): i for i, m in enumerate(clip_merges)}
    used = {m for w in words for m in _bpe(w, ranks)}
    merges = sorted(used, key=ranks.__getitem__)
    letters = sorted({ch for w in words for ch in w})
    tokens = letters + [ch + "</w>" for ch in letters]
    tokens += [a + b for a, b in merges if a + b not in tokens]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def world_tokenizer():
    """A ``transformers.CLIPTokenizer`` over :func:`tn_ray.data.world.grammar.vocabulary`."""
    from transformers import CLIPTokenizer

    from tn_ray.data.world.grammar import vocabulary

    vocab, merges = vocab_and_merges(tuple(vocabulary()))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)
