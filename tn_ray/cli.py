"""``tn-ray``: parse, load a config, call one function per command.

Each command module exposes ``add_parser(subparsers)`` that registers its sub-command and
sets ``func`` (a function of the parsed args). Adding a command = adding its module here.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

COMMAND_MODULES = [
    "tn_ray.commands.quickstart",
    "tn_ray.commands.tia2",
    "tn_ray.commands.sweep",
    "tn_ray.commands.bestofn",
    "tn_ray.commands.score",
    "tn_ray.commands.prompts",
]


def build_parser() -> argparse.ArgumentParser:
    from tn_ray import __version__

    parser = argparse.ArgumentParser(prog="tn-ray", description="TextNorm reward experiments on Ray")
    parser.add_argument("--version", action="version", version=f"tn-ray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tn_ray.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, ValueError, KeyError, FileNotFoundError) as err:
        # user errors: one clear line, no traceback (everything computed so far is on disk)
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"tn-ray: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
