"""``tn-ray``: parse, load a config, call one function per command.

Each command module exposes ``add_parser(subparsers)`` that registers its sub-command and
sets ``func`` (a function of the parsed args). Adding a command = adding its module here.

Errors: a :class:`tn_ray.errors.TnRayError` (bad config, input, name, output location) or an
OS error about a named file is the user's to fix and prints as one line; an error raised in a
Ray task or actor is unwrapped to the original one first. Anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from tn_ray import __version__
from tn_ray.errors import InputError, TnRayError

COMMAND_MODULES = [
    "tn_ray.commands.quickstart",
    "tn_ray.commands.tia2",
    "tn_ray.commands.sweep",
    "tn_ray.commands.bestofn",
    "tn_ray.commands.score",
    "tn_ray.commands.prompts",
    "tn_ray.commands.label",
    "tn_ray.commands.world",
    "tn_ray.commands.reward",
    "tn_ray.commands.rwr",
    "tn_ray.commands.ddpo",
    "tn_ray.commands.grpo",
    "tn_ray.commands.study",
    "tn_ray.commands.serve",
]

# OS errors that name a file the user gave (missing, not writable, a file where a folder goes)
USER_OS_ERRORS = (FileNotFoundError, PermissionError, FileExistsError, NotADirectoryError, IsADirectoryError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tn-ray", description="TextNorm reward experiments on Ray")
    parser.add_argument("--version", action="version", version=f"tn-ray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def user_error(err: BaseException) -> BaseException | None:
    """The user error behind ``err`` (unwrapping Ray's task/actor errors), or None for a bug."""

    seen = 0
    while err is not None and seen < 8:
        cause = getattr(err, "cause", None)  # ray.exceptions.RayTaskError (and its dual-class instances)
        if isinstance(cause, BaseException) and type(err).__module__.startswith("ray."):
            err = cause  # the original error, not Ray's wrapper whose text is the remote traceback
        if isinstance(err, (TnRayError, *USER_OS_ERRORS)):
            return err
        remote = _remote_user_error(err)
        if remote is not None:
            return remote
        err = cause if isinstance(cause, BaseException) else err.__cause__
        seen += 1
    return None


def _remote_user_error(err: BaseException) -> BaseException | None:
    """A user error named in the text of a Ray error that lost the exception object: an actor
    whose constructor raised becomes ``ActorDiedError`` holding only the remote traceback as
    text. Its last ``module.Class: message`` line naming a :class:`TnRayError` is rebuilt."""
    import re

    if not type(err).__module__.startswith("ray."):
        return None
    found = None
    for m in re.finditer(r"^(tn_ray(?:\.\w+)*)\.(\w+): (.+)$", str(err), flags=re.M):
        module, name, message = m.groups()
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:  # not a tn_ray module
            cls = None
        if isinstance(cls, type) and issubclass(cls, TnRayError):
            found = TnRayError(message)
    return found


def one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename and err.strerror:  # builtin OS errors: what, and which file
        return f"{err.strerror}: {err.filename}"
    return str(err) or type(err).__name__


def check_finite(args: argparse.Namespace) -> None:
    """Every float option given on the command line is finite: argparse's ``float`` takes 'inf' and
    'nan', which no option of tn-ray means (the config models refuse them too)."""
    import math

    for name, value in vars(args).items():
        for x in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(x, float) and not math.isfinite(x):
                raise InputError(f"--{name.replace('_', '-')} {x}: must be a finite number")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        check_finite(args)
        return int(args.func(args) or 0)
    except Exception as err:
        found = user_error(err)
        if found is None:
            raise  # a bug: keep the traceback
        # user errors: one clear line (everything computed so far is on disk)
        print(f"tn-ray: error: {one_line(found)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
