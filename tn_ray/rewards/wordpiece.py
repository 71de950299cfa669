"""A BERT-style WordPiece vocabulary built offline, for tiny models and tests.

BLIP-family models (ImageReward, BLIP-2) tokenize with bert-base-uncased, a hub download.
Tiny variants and the ImageReward equivalence test need a tokenizer without network: this
module builds one of bert-base-uncased's size (30,522 entries) with its special tokens at
the same ids ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103), then single characters,
``##`` continuations and whole English words taken from the CLIP BPE file that open_clip
ships. Real words get other ids than in bert-base-uncased: for random-weight models only.
"""
from __future__ import annotations

import functools
import string
from pathlib import Path

BERT_VOCAB_SIZE = 30522
SPECIALS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}


@functools.lru_cache(maxsize=4)
def bert_style_vocab(size: int = BERT_VOCAB_SIZE) -> tuple[str, ...]:
    """``size`` tokens in bert-base-uncased's layout (deterministic)."""
    if size < 1000:
        raise ValueError(f"a BERT-style vocabulary needs at least 1000 entries, got {size}")
    tokens = [f"[unused{i}]" for i in range(104)]
    for tok, idx in SPECIALS.items():
        tokens[idx] = tok
    k = 0
    for i in range(104):
        if tokens[i].startswith("[unused"):
            tokens[i] = f"[unused{k}]"
            k += 1
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens += chars + ["##" + c for c in string.ascii_lowercase + string.digits]
    seen = set(tokens)
    words, pieces = [], []
    for tok in _clip_bpe_tokens():  # merge order: frequent first
        if tok.endswith("</w>"):
            w = tok[:-4]
            if len(w) > 1 and w.isascii() and w.isalpha():
                words.append(w)
        elif len(tok) > 1 and tok.isascii() and tok.isalpha():
            pieces.append("##" + tok)
    for tok in (t for pair in zip(words, pieces) for t in pair):
        if len(tokens) >= size:
            break
        if tok not in seen:
            seen.add(tok)
            tokens.append(tok)
    while len(tokens) < size:
        tokens.append(f"[unused{k}]")
        k += 1
    return tuple(tokens[:size])


def _clip_bpe_tokens() -> list[str]:
    """The merged tokens of the CLIP BPE file open_clip ships, in merge order (read without
    importing open_clip, which costs seconds)."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    return ["".join(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]


def write_vocab(path: str | Path, size: int = BERT_VOCAB_SIZE) -> Path:
    """Write the vocabulary as a ``vocab.txt`` (one token a line, line number = id)."""
    path = Path(path)
    path.write_text("\n".join(bert_style_vocab(size)) + "\n")
    return path


def read_vocab(path: str | Path) -> dict[str, int]:
    """A ``vocab.txt`` as {token: id}, the way ``transformers`` reads it."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    return {tok.rstrip("\n"): i for i, tok in enumerate(lines)}


def bert_tokenizer(vocab: str | Path | dict[str, int] | None = None, **kwargs):
    """A lower-casing ``BertTokenizer`` from a vocab file/dict (default: the built-in one)."""
    from transformers import BertTokenizer

    if vocab is None:
        vocab = {t: i for i, t in enumerate(bert_style_vocab())}
    elif not isinstance(vocab, dict):
        vocab = read_vocab(vocab)
    return BertTokenizer(vocab=dict(vocab), do_lower_case=True, **kwargs)
