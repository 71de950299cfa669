"""``tn-ray prompts synthesize|compare``: build contrastive sets; compare rules with TIA2's."""
from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("prompts", help="contrastive prompt sets: synthesize (rules, llm, released), compare")
    s = p.add_subparsers(dest="prompts_command", required=True)

    sy = s.add_parser("synthesize", help="contrastive sets for a file of prompts, sharded on Ray Data")
    sy.add_argument("config", nargs="?", help="YAML config (SynthesisConfig); flags override it")
    sy.add_argument("--input", help="prompts: text file (one per line), JSON list, JSON {x0: ...} or TIA2 label file")
    sy.add_argument("--source", help="released | rules | llm")
    sy.add_argument("--out", help="JSON file {x0: [x1..xm]} to write")
    sy.add_argument("--report", help="report JSON (default: <out>.report.json)")
    sy.add_argument("--workers", type=int, help="concurrent Ray actors = most API requests in flight")
    sy.add_argument("--batch-size", type=int, help="prompts per batch")
    sy.add_argument("--model", help="llm: chat model name")
    sy.add_argument("--base-url", help="llm: OpenAI-compatible API root (default: $OPENAI_BASE_URL, else OpenAI)")
    sy.add_argument("--api-key-env", help="llm: environment variable holding the API key (default OPENAI_API_KEY)")
    sy.add_argument("--n-prompts", type=int, help="llm: prompts asked for per x0")
    sy.add_argument("--cache-dir", help="llm: answer cache folder")
    sy.add_argument("--no-fallback", action="store_true", help="llm: no rules fallback; failed x0s get no set")
    sy.add_argument("--tia2-dir", help="released: local copy of the TIA2 prompt sets")
    sy.set_defaults(func=synthesize)

    co = s.add_parser("compare", help="Jaccard overlap of rule-built and released TIA2 counting/composition sets")
    co.add_argument("--tia2-dir", help="local copy of the TIA2 prompt sets (default: $TN_RAY_TIA2_DIR or download)")
    co.add_argument("--out", default="results/prompts", help="folder for overlap.md and the per-prompt CSV")
    co.set_defaults(func=compare)


def synthesize(args) -> int:
    from tn_ray.config import apply_overrides, load_config, validate
    from tn_ray.prompts.synthesize import SynthesisConfig
    from tn_ray.prompts.synthesize import synthesize as run

    flags = {"input": args.input, "source": args.source, "out": args.out, "report": args.report,
             "workers": args.workers, "batch_size": args.batch_size, "sources.llm.model": args.model,
             "sources.llm.base_url": args.base_url, "sources.llm.api_key_env": args.api_key_env,
             "sources.llm.n_prompts": args.n_prompts, "sources.llm.cache_dir": args.cache_dir,
             "sources.llm.fallback": False if args.no_fallback else None,
             "sources.released.tia2_dir": args.tia2_dir}
    overrides = {k: v for k, v in flags.items() if v is not None}
    if args.config:
        cfg = load_config(args.config, SynthesisConfig, overrides)
    else:
        cfg = validate(SynthesisConfig, apply_overrides({}, overrides), "command line")
    paths = run(cfg)
    report = json.loads(Path(paths["report"]).read_text())
    by_source = ", ".join(f"{k}: {v}" for k, v in report["counts_by_source"].items()) or "none"
    print(f"{report['prompts']} prompts -> {report['sets_written']} sets ({by_source}); "
          f"{len(report['fallbacks'])} fallbacks, {len(report['failures'])} failures; "
          f"{report['api_calls']} API calls, {report['cached']} cached answers")
    for f in report["failures"][:5]:
        print(f"  no set for {f['x0']!r}: {f['error']}")
    for k, v in paths.items():
        print(f"{k:>7}: {v}")
    return 0


def compare(args) -> int:
    from tn_ray.data.tia2 import resolve_dir
    from tn_ray.prompts.overlap import compare as run

    paths = run(resolve_dir(args.tia2_dir), Path(args.out))
    print(Path(paths["overlap_md"]).read_text())
    for k, v in paths.items():
        print(f"{k:>14}: {v}")
    return 0
