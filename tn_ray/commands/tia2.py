"""``tn-ray tia2 stats|paper|eval``."""
from __future__ import annotations

from pathlib import Path

from tn_ray.commands.options import add_run_options, allow_change, load


def add_parser(sub) -> None:
    p = sub.add_parser("tia2", help="TIA2 benchmark: statistics and evaluation")
    s = p.add_subparsers(dest="tia2_command", required=True)

    st = s.add_parser("stats", help="prompts, images, %% good / bad per set and subcategory")
    st.add_argument("--tia2-dir", help="local copy of the TIA2 labels (default: $TN_RAY_TIA2_DIR or download)")
    st.add_argument("--out", default="results/tia2/stats.md", help="Markdown file to write")
    st.set_defaults(func=stats)

    pa = s.add_parser("paper", help="the paper's Table 2 beside the authors' released metrics (means per set), "
                                    "where they differ, and the release's per-prompt TextNorm parameters")
    pa.add_argument("--tia2-dir", help="local copy of the TIA2 files (default: $TN_RAY_TIA2_DIR or download)")
    pa.add_argument("--sets", nargs="+", default=None, help="TIA2 sets (default: all)")
    pa.add_argument("--out", default="results/tia2/paper.md", help="Markdown file to write")
    pa.set_defaults(func=paper_table)

    ev = s.add_parser("eval", help="score the benchmark images, apply TextNorm, compute metrics")
    ev.add_argument("config", nargs="?", help="YAML config (Tia2EvalConfig); flags override it")
    ev.add_argument("--images", help="folder with one sub-folder per set")
    ev.add_argument("--models", nargs="+", help="reward model specs, e.g. clip pickscore:tiny")
    ev.add_argument("--sets", nargs="+", help="TIA2 sets")
    ev.add_argument("--tia2-dir", help="local copy of the TIA2 labels")
    ev.add_argument("--out", help="output folder")
    ev.add_argument("--max-prompts", type=int, help="first N prompts per set only")
    add_run_options(ev, "textnorm.default.tau=0.5")
    ev.add_argument("--contrast", help="'released' or a JSON file of contrastive sets ({set} expands)")
    ev.add_argument("--release-params", nargs="*", choices=["temperature", "multiplier"], default=None,
                    metavar="READING", help="also evaluate the paper's TextNorm with the release's per-prompt scale "
                                            "and "
                    "lambda (needs imagereward and pickscore models); READING: temperature and/or multiplier "
                    "(default both; docs/tia2.md)")
    ev.set_defaults(func=evaluate)


def stats(args) -> int:
    from tn_ray.data.tia2 import resolve_dir, stats_markdown

    text = stats_markdown(resolve_dir(args.tia2_dir))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written: {out}")
    return 0


def paper_table(args) -> int:
    from tn_ray.analysis import paper
    from tn_ray.data.tia2 import SETS, resolve_dir

    text = paper.report(resolve_dir(args.tia2_dir), args.sets or SETS)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"written: {out}")
    return 0


def evaluate(args) -> int:
    from tn_ray.experiments.tia2_eval import Tia2EvalConfig, run

    cfg = load(
        args,
        Tia2EvalConfig,
        images=args.images,
        models=args.models,
        sets=args.sets,
        tia2_dir=args.tia2_dir,
        out=args.out,
        max_prompts=args.max_prompts,
        contrast=args.contrast,
        release_params=None if args.release_params is None else (args.release_params or ["temperature", "multiplier"]),
    )
    paths = run(cfg, allow_provenance_change=allow_change(args))
    print(Path(paths["per_set_md"]).read_text())
    for k, v in paths.items():
        print(f"{k:>12}: {v}")
    return 0
