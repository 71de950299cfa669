"""Options every run command shares, one implementation: ``--set KEY=VALUE`` overrides and
``--allow-provenance-change`` (rwr, ddpo, bestofn, sweep, world run, reward train, tia2 eval).

``add_run_options(parser, example)`` registers both; ``overrides(args, **flags)`` merges a
command's own flags (``--out``, ``--max-steps``, ...; None = not given) with the ``--set`` items,
``--set`` winning, as dotted keys for :func:`tn_ray.config.load_config`; ``load(args, Model, **flags)``
reads the config file (or defaults) with both applied. ``print_run(paths, unit)`` prints a fine-tuning
run's output paths and, when it selected a checkpoint, the selection (rwr, ddpo, grpo).
"""
from __future__ import annotations

from typing import Any


def add_run_options(parser, example: str, provenance: bool = True) -> None:
    """``--set`` (repeatable; dotted key, YAML value; e.g. ``example``) and, for commands that write a
    run folder, ``--allow-provenance-change``."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override any config key (dotted, value parsed as YAML), e.g. --set {example}; repeatable",
    )
    if provenance:
        parser.add_argument(
            "--allow-provenance-change",
            action="store_true",
            help="continue a run folder whose recorded provenance.json (package versions, git commit, "
            "config, model revisions) differs from this run's; the new record is kept with the "
            "old "
            "ones listed under `previous`",
        )


def overrides(args, **flags: Any) -> dict[str, Any]:
    """The command's own flags that were given (not None), then every ``--set KEY=VALUE``."""
    from tn_ray.config import parse_set

    out = {k: v for k, v in flags.items() if v is not None}
    out.update(parse_set(getattr(args, "set", None) or []))
    return out


def load(args, model, path: str | None = None, **flags: Any):
    """``model`` from the YAML file ``path`` (default ``args.config``; None = defaults only) with
    :func:`overrides` applied; errors name the file (or 'command line') and the dotted key."""
    from tn_ray.config import apply_overrides, load_config, validate

    path = getattr(args, "config", None) if path is None else path
    given = overrides(args, **flags)
    return load_config(path, model, given) if path else validate(model, apply_overrides({}, given), "command line")


def allow_change(args) -> bool:
    """Whether ``--allow-provenance-change`` was given."""
    return bool(getattr(args, "allow_provenance_change", False))


def print_run(paths: dict[str, Any], unit: str) -> None:
    """A fine-tuning run's output paths, then its checkpoint selection when it made one (``unit``: step / epoch)."""
    for k, v in paths.items():
        print(f"{k:>20}: {v}")
    if "selection" in paths:
        import json

        from tn_ray.storage import read_any
        from tn_ray.training.checkpoint_selection import describe_selection

        for line in describe_selection(json.loads(read_any(paths["selection"])), unit=unit):
            print(line)
