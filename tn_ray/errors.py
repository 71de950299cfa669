"""One base for user errors: the CLI prints any :class:`TnRayError` as one line; anything else
is a bug and keeps its traceback.

Subclasses also derive from the builtin a caller would expect (``ValueError`` for a bad
value, ``KeyError`` for an unknown name), so library code can catch them as usual.
"""
from __future__ import annotations


class TnRayError(Exception):
    """A problem with the user's input or environment; the message names the file, key or value."""

    def __str__(self) -> str:  # KeyError would quote its message
        return str(self.args[0]) if self.args else ""


class InputError(TnRayError, ValueError):
    """Bad input data (prompts, contrastive sets, images, manifests), found before work starts."""


class UnknownName(TnRayError, KeyError, ValueError):
    """A name that is not registered (reward model, trainable, prompt source, ...); a ValueError too,
    so a pydantic validator that looks a name up reports it against its key."""


class OutputError(TnRayError, OSError):
    """An output location that cannot be used (an existing file where a folder must go, not writable)."""
