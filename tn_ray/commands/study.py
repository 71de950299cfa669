"""``tn-ray study CONFIG [--resume] [--dry-run] [--report-only]``: the experiment grid of one YAML (docs/study.md)."""

from __future__ import annotations

from tn_ray.commands.options import add_run_options, allow_change, overrides


def add_parser(sub) -> None:
    p = sub.add_parser(
        "study",
        help="rewards x methods (best-of-n n list; RWR / DDPO / GRPO KL grid) x seeds from one YAML, judged by one "
        "truth column; resumable; one report",
    )
    p.add_argument("config", help="YAML study (StudyConfig), e.g. sweeps/study_tiny.yaml")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a study whose folder already holds runs: finished runs are skipped, a started one resumes",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate every run's config, print the grid (each run, its state, counted work and estimated time) "
        "and the totals; start nothing",
    )
    p.add_argument("--report-only", action="store_true", help="write the report from the finished runs; run nothing")
    add_run_options(p, "cost.image_step_s=0.02")
    p.set_defaults(func=run)


def run(args) -> int:
    from tn_ray.experiments.study.config import load_study

    return run_study(load_study(args.config, overrides(args)), args, args.resume, allow_change(args))


def run_study(grid, args, resume: bool, allow_provenance_change: bool) -> int:
    """The shared body of `tn-ray study` and `tn-ray world finetune`: dry run, report only, or run then report."""
    from tn_ray.experiments.study.dry_run import describe
    from tn_ray.experiments.study.plan import plan
    from tn_ray.experiments.study.report import write_report
    from tn_ray.experiments.study.runner import run
    from tn_ray.storage import read_any

    if args.dry_run:
        for line in describe(grid, plan(grid, args.config)):
            print(line)
        return 0
    if args.report_only:
        paths = write_report(grid)
    else:
        paths = run(grid, args.config, allow_provenance_change=allow_provenance_change, resume=resume)
    print(read_any(paths["report_md"]).decode())
    for k, v in paths.items():
        print(f"{k:>24}: {v}")
    return 0
