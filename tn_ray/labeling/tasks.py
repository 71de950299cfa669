"""Tasks the server can serve, read and validated before it starts.

``label``: (image, prompt) pairs from a manifest CSV (the ``tn-ray score`` manifest: image paths
relative to the CSV), a folder of images with ``.txt`` captions, or a ``tn-ray bestofn`` run; one
item per image, keyed by the image as written (manifest), its file name (folder) or its image_id (run). ``compare``:
the blinded
best-of-n human-evaluation export (``human_eval/`` + ``human_eval_key.csv``); one item per
question. The key (which reward is which set) stays in :attr:`Task.key`, which no browser-facing
method returns. Every problem is an :class:`~tn_ray.errors.InputError` naming the file and line.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from tn_ray.errors import InputError
from tn_ray.labeling.security import UnsafePath, check_name

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")
LABELS = {"good": 1, "bad": 0, "skip": -1}  # TIA2's values: 1 good, 0 bad, -1 inconclusive
CHOICES = ("set1", "tie", "set2")
CRITERIA = ("alignment", "quality")
KEY_COLUMNS = ("question", "prompt", "set1_reward", "set2_reward", "set1_files", "set2_files")


@dataclass(frozen=True)
class Item:
    """One thing to answer: a labelling pair (one image) or a comparison question (two sets)."""

    item_id: str
    prompt: str
    sets: tuple[tuple[str, ...], ...]  # public image names: ((image,),) or (set1, set2)


@dataclass
class Task:
    kind: str  # "label" or "compare"
    source: Path
    items: list[Item]
    files: dict[str, Path]  # public image name -> file on disk (the only files ever served)
    key: dict[str, tuple[str, str]] = field(default_factory=dict)  # question -> (set1 reward, set2 reward)

    def fingerprint(self) -> str:
        """Identifies the task an answer database belongs to (kind + item ids, in order)."""
        return hashlib.sha256(json.dumps([self.kind, [i.item_id for i in self.items]]).encode()).hexdigest()[:16]

    def public(self, index: int) -> dict:
        """What the browser may see of item ``index``: prompt and image URLs, never the key."""
        item = self.items[index]
        return {
            "index": index,
            "prompt": item.prompt,
            "sets": [[f"/api/image/{name}" for name in s] for s in item.sets],
        }


def _rows(path: Path, required: tuple[str, ...]):
    """(line number, row dict) of a CSV, refusing missing files, missing columns and ragged rows."""
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if not header:
            raise InputError(f"{path}:1: empty file; expected a header with columns {', '.join(required)}")
        missing = [c for c in required if c not in header]
        if missing:
            raise InputError(f"{path}:1: missing column(s) {missing}; the header is {header}")
        line = reader.line_num
        for row in reader:
            start, line = line + 1, reader.line_num
            if None in row or any(v is None for v in row.values()):
                raise InputError(
                    f"{path}:{start}: expected {len(header)} fields like the header, got a different number"
                )
            yield start, row


def _pairs_task(source: Path, rows) -> Task:
    """A labelling task from (where, item id, image file, prompt) rows; ``where`` names file and line."""
    items, files, seen = [], {}, {}
    for where, item_id, file, prompt in rows:
        if not item_id or not prompt:
            raise InputError(f"{where}: empty {'image' if not item_id else 'prompt'}")
        if item_id in seen:
            raise InputError(f"{where}: image {item_id!r} already listed at {seen[item_id]} (one prompt per image)")
        seen[item_id] = where
        if file.suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(f"{where}: {item_id!r} is not an image file ({', '.join(IMAGE_SUFFIXES)})")
        if not file.is_file():
            raise InputError(f"{where}: image {item_id!r} not found (looked at {file})")
        public = f"i{len(items):05d}{file.suffix.lower()}"
        files[public] = file
        items.append(Item(item_id, prompt, ((public,),)))
    if not items:
        raise InputError(f"{source}: no images to label")
    return Task("label", source, items, files)


def load_manifest(path: str | Path) -> Task:
    """A labelling task from a manifest CSV (columns image, prompt; image relative to the CSV)."""
    path = Path(path)
    return _pairs_task(
        path,
        (
            (
                f"{path}:{line}",
                row["image"].strip(),
                (path.parent / row["image"].strip()).resolve(),
                row["prompt"].strip(),
            )
            for line, row in _rows(path, ("image", "prompt"))
        ),
    )


def load_folder(folder: str | Path) -> Task:
    """A labelling task from a folder of images with same-name ``.txt`` captions (``a.png`` + ``a.txt``),
    the layout of most diffusion fine-tuning datasets; sorted by file name."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(
            f"{root}: {'a file, not' if root.exists() else 'not found:'} a folder of images with .txt captions"
        )
    images = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)

    def rows():
        for image in images:
            caption = image.with_suffix(".txt")
            if not caption.is_file():
                raise InputError(f"{image}: no caption file {caption.name} next to it")
            lines = caption.read_text(encoding="utf-8").strip()
            yield f"{caption}:1", image.name, image.resolve(), " ".join(lines.split())

    return _pairs_task(root, rows())


def load_finetune_run(run_dir: str | Path) -> Task:
    """A labelling task from a ``tn-ray rwr`` / ``tn-ray ddpo`` run folder: every evaluation image, the
    base model's and each checkpoint's (``eval/<base|step-N>/<prompt id>-<seed>.png``), with its prompt
    (``eval/prompts.json``); item ids are the images' paths in the run."""
    from tn_ray.storage import read_json

    root = Path(run_dir)
    prompts_file = root / "eval" / "prompts.json"
    prompts = read_json(prompts_file, "evaluation prompt list")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise InputError(f"{prompts_file}: expected a JSON list of prompts")
    folders = [root / "eval" / "base", *sorted((root / "eval").glob("step-*"))]

    def rows():
        for folder in folders:
            for image in sorted(folder.glob("*.png")):
                where = str(image)
                try:
                    prompt_id = int(image.stem.split("-")[0])
                    prompt = prompts[prompt_id]
                except (ValueError, IndexError):
                    raise InputError(
                        f"{where}: not an evaluation image '<prompt id>-<seed>.png' of {prompts_file}"
                    ) from None
                yield where, str(image.relative_to(root)), image.resolve(), prompt

    return _pairs_task(root, rows())


def load_run(run_dir: str | Path) -> Task:
    """A labelling task from a run folder: a ``tn-ray bestofn`` run (every generated image with its
    prompt, from ``rewards.parquet``: prompt_id, sample, prompt, image_id, image; images must be
    local files) or a fine-tuning run (:func:`load_finetune_run`)."""
    import pandas as pd

    if (Path(run_dir) / "eval" / "prompts.json").is_file():
        return load_finetune_run(run_dir)
    table = Path(run_dir) / "rewards.parquet"
    if not table.is_file():
        raise InputError(
            f"{table}: not found; --run takes a tn-ray bestofn output folder or a tn-ray rwr / ddpo run folder"
        )
    df = pd.read_parquet(table, columns=["prompt", "image_id", "image"])

    def rows():
        for i, (prompt, image_id, image) in enumerate(zip(df["prompt"], df["image_id"], df["image"])):
            if "://" in str(image):
                raise InputError(
                    f"{table}: row {i}: image {image} is not a local file; copy the run's images locally first"
                )
            yield f"{table}: row {i}", str(image_id), Path(image).resolve(), str(prompt)

    return _pairs_task(table, rows())


def load_comparison(export_dir: str | Path, key_path: str | Path | None = None) -> Task:
    """A comparison task from a human-evaluation export (``export_dir``) and its key CSV
    (default: ``human_eval_key.csv`` next to the export folder, as ``tn-ray bestofn`` writes it)."""
    root = Path(export_dir)
    key_path = Path(key_path) if key_path else root.parent / "human_eval_key.csv"
    if not root.is_dir():
        raise InputError(
            f"{root}: {'a file, not' if root.exists() else 'not found:'} a best-of-n human_eval export folder"
        )
    items, files, key = [], {}, {}
    for line, row in _rows(key_path, KEY_COLUMNS):
        qid = row["question"].strip()
        if not qid or qid in key:
            raise InputError(f"{key_path}:{line}: question {qid!r} is empty or repeated")
        sets = []
        for side in ("set1", "set2"):
            try:
                names = json.loads(row[f"{side}_files"])
                if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
                    raise ValueError("not a non-empty list of file names")
                for name in names:
                    check_name(name)
            except (ValueError, UnsafePath) as err:
                raise InputError(f"{key_path}:{line}: {side}_files {row[f'{side}_files']!r}: {err}") from None
            for name in names:
                file = (root / name).resolve()
                if not file.is_file():
                    raise InputError(f"{key_path}:{line}: image {name!r} not found under {root}")
                files[name] = file
            sets.append(tuple(names))
        if not row["set1_reward"] or row["set1_reward"] == row["set2_reward"]:
            raise InputError(f"{key_path}:{line}: set1_reward / set2_reward must name two different rewards")
        key[qid] = (row["set1_reward"], row["set2_reward"])
        items.append(Item(qid, row["prompt"], tuple(sets)))
    if not items:
        raise InputError(f"{key_path}: no questions after the header")
    return Task("compare", key_path, items, files, key)
