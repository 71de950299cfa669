"""The one seed scheme: a 63-bit seed per row of random draws, a sha256 hash of its key.

``seed_of(*parts)`` hashes the parts' text joined by ``\\x1f`` (a base seed, a prompt, a sample index;
or a base seed, an epoch, a rank, a batch, ...), so a seed depends only on what the row is, never
on order, sharding, batching or how many rows are drawn beside it; parts may be strings (prompts)
as well as integers. Generation (:mod:`tn_ray.diffusion.generation`), RWR and DDPO all draw from it.
DDPO drew from numpy's ``SeedSequence`` before run format 2 (:data:`tn_ray.provenance.FORMAT_VERSION`).
"""
from __future__ import annotations

import hashlib

SEED_BITS = 63  # fits a signed int64 (torch.Generator.manual_seed, numpy)


def seed_of(*parts: object) -> int:
    """The seed of the row keyed by ``parts``: the first 8 bytes (little-endian) of
    sha256("\\x1f".join(str(p) for p in parts)), its low 63 bits."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**SEED_BITS - 1)


def seeds_of(*parts: object, n: int) -> list[int]:
    """``n`` seeds of the rows ``(*parts, 0)`` .. ``(*parts, n - 1)``."""
    return [seed_of(*parts, i) for i in range(n)]
