"""What every source of contrastive prompts returns, and the interface it implements."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol


@dataclass
class ContrastSet:
    """The contrastive prompts of one x0 and who made them.

    ``source`` is the source that produced ``prompts`` (``rules`` when the LLM fell back);
    ``error`` says why there is no set (then ``prompts`` is empty); ``note`` says why a
    fallback happened; ``api_calls`` counts chat-completion calls made for this x0.
    """

    x0: str
    prompts: list[str] = field(default_factory=list)
    source: str = ""
    error: str | None = None
    note: str | None = None
    api_calls: int = 0
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.prompts)

    def to_dict(self) -> dict:
        return asdict(self)


class ContrastSource(Protocol):
    name: str

    def generate(self, x0s: Sequence[str]) -> list[ContrastSet]:
        """One :class:`ContrastSet` per x0, in order."""


def normalize(prompt: str) -> str:
    """Comparison form of a prompt: lower case, single spaces, no trailing period or quotes."""
    return " ".join(prompt.lower().split()).strip(" .\"'`")


def clean(x0: str, prompts: Sequence[str]) -> list[str]:
    """Drop empties, duplicates and x0 itself (compared in :func:`normalize`d form), keep order."""
    seen = {normalize(x0)}
    out = []
    for p in prompts:
        p = " ".join(p.split())
        key = normalize(p)
        if key and key not in seen:
            seen.add(key)
            out.append(p)
    return out
