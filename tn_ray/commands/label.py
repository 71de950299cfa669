"""``tn-ray label``: serve a labelling or comparison task, export labels, tally comparisons."""
from __future__ import annotations

from pathlib import Path

from tn_ray.errors import InputError
from tn_ray.labeling.security import needs_token, new_token
from tn_ray.labeling.store import AnswerStore, open_answers
from tn_ray.labeling.tasks import load_comparison, load_folder, load_manifest, load_run


def _task_args(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="labelling task: CSV with columns image (path relative to the CSV) and prompt")
    src.add_argument("--folder", help="labelling task: a folder of images, each with a same-name .txt caption")
    src.add_argument("--run", help="labelling task: every image of a tn-ray bestofn output folder (rewards.parquet), "
                                   "or every evaluation image of a tn-ray rwr / ddpo run")
    src.add_argument("--export", help="comparison task: a best-of-n human_eval/ export folder")
    p.add_argument("--key", help="comparison key CSV (default: human_eval_key.csv next to the export folder); never "
                                 "served")
    p.add_argument("--db", help="answer database (SQLite); default: <manifest>.answers.sqlite or "
                                "human_eval_answers.sqlite next to the export")


def add_parser(sub) -> None:
    p = sub.add_parser("label", help="labelling / human-evaluation web app: serve, export TIA2 labels, tally "
                                     "comparisons")
    cmds = p.add_subparsers(dest="label_command", required=True)
    s = cmds.add_parser("serve", help="serve a task to annotators (127.0.0.1 by default; other addresses need the "
                                      "printed token)")
    _task_args(s)
    s.add_argument("--host", default="127.0.0.1", help="bind address; anything but 127.0.0.1/::1/localhost requires "
                                                       "the token")
    s.add_argument("--port", type=int, default=8765, help="TCP port; 0 = any free port (printed)")
    s.add_argument("--per-item", type=int, default=3, help="annotators per item (count); nobody sees an item twice")
    s.add_argument("--lease-s", type=float, default=1800.0, help="seconds an unanswered assignment holds its slot")
    s.set_defaults(func=serve)
    e = cmds.add_parser("export", help="write the labels in the TIA2 label format (three labels per image)")
    _task_args(e)
    e.add_argument("--out", required=True, help="output JSON (e.g. "
                                                "DIR/human_annotations/human_labels_comprehensive.json)")
    e.add_argument("--answers-csv", help="also write every answer (item, annotator, value, times) as CSV")
    e.set_defaults(func=export)
    t = cmds.add_parser("tally", help="win / tie / lose per pair of rewards with binomial CIs (Markdown, CSV, PNG)")
    _task_args(t)
    t.add_argument("--out", required=True, help="output folder: tally.md, tally.csv, tally.png")
    t.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals")
    t.set_defaults(func=tally)


def _load(args):
    if args.manifest:
        task = load_manifest(args.manifest)
        db = args.db or Path(args.manifest).with_suffix(".answers.sqlite")
    elif args.folder:
        task = load_folder(args.folder)
        db = args.db or Path(args.folder) / "labels.answers.sqlite"
    elif args.run:
        task = load_run(args.run)
        db = args.db or Path(args.run) / "labels.answers.sqlite"
    else:
        task = load_comparison(args.export, args.key)
        db = args.db or Path(args.export).resolve().parent / "human_eval_answers.sqlite"
    return task, Path(db)


def serve(args) -> int:
    from tn_ray.labeling.app import serve as run_server

    if args.per_item < 1:
        raise InputError(f"--per-item {args.per_item}: must be at least 1")
    task, db = _load(args)
    store = AnswerStore(db, task, per_item=args.per_item, lease_s=args.lease_s)
    run_server(task, store, args.host, args.port, new_token() if needs_token(args.host) else None)
    return 0


def export(args) -> int:
    import pandas as pd

    from tn_ray.labeling.export import tia2_labels, write_json

    task, db = _load(args)
    if task.kind != "label":
        raise InputError("label export writes TIA2 labels of a labelling task (--manifest, --folder or --run); for a "
                         "comparison use label tally")
    answers = open_answers(db, task)
    labels, short = tia2_labels(task, answers)
    write_json(labels, args.out)
    if args.answers_csv:
        pd.DataFrame(answers).to_csv(args.answers_csv, index=False)
    print(f"{len(labels)} images with three labels -> {args.out}; {len(short)} with fewer left out")
    return 0


def tally(args) -> int:
    from tn_ray.labeling import tally as t

    task, db = _load(args)
    if task.kind != "compare":
        raise InputError("label tally needs a comparison task (--export)")
    table = t.tally(task, open_answers(db, task), args.confidence)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "tally.csv", index=False)
    text = t.markdown(table, args.confidence)
    (out / "tally.md").write_text(text)
    if len(table):
        t.bar_chart(table, out / "tally.png")
    print(text)
    return 0
