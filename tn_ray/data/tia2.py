"""TIA2 benchmark data: human labels, released contrastive sets, subcategories, statistics.

Files come from the benchmark's public repository (kykim0/TextNorm, Apache-2.0) and are
downloaded once into a cache; ``TN_RAY_TIA2_DIR`` or ``--tia2-dir`` points at a local copy.
Labels: 1 good, 0 bad, -1 inconclusive. A pair is good when at least two of its three
labels are 1; its fine-grained score is the mean of the labels with inconclusive = 0.5.
Images are identified by (set, file name): file names repeat across sets.
"""
from __future__ import annotations

import json
import logging
import os
import urllib.request
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from tn_ray.data.sets import validate_sets
from tn_ray.errors import TnRayError
from tn_ray.storage import local_cache, read_json

log = logging.getLogger(__name__)

SETS = ("comprehensive", "counting", "composition")
REPO_COMMIT = "5ed52025b1c4a62f31765165a14dff41d304b4a9"
RAW_URL = "https://raw.githubusercontent.com/kykim0/TextNorm/{commit}/{path}"
FILES = ([f"human_annotations/human_labels_{s}.json" for s in SETS] + [f"prompts/prompt_set_{s}.json" for s in SETS]
         + [f"alignment_scores/alignment_scores_{s}.json" for s in SETS])


class Tia2Error(TnRayError, ValueError):
    """TIA2 data is missing or malformed; the message names the file and the problem."""


def check_sets(sets) -> list[str]:
    bad = [s for s in sets if s not in SETS]
    if bad:
        raise Tia2Error(f"unknown TIA2 set(s) {bad}; the sets are {list(SETS)}")
    return list(sets)


def default_cache() -> Path:
    return local_cache("tia2", REPO_COMMIT[:12])


def download(dest: Path) -> Path:
    """Fetch the label and prompt files of the pinned commit into ``dest`` (atomic per file)."""
    for rel in FILES:
        target = dest / rel
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        url = RAW_URL.format(commit=REPO_COMMIT, path=rel)
        log.info("downloading %s", url)
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                data = r.read()
        except OSError as err:
            raise Tia2Error(
                f"could not download TIA2 file {rel} from {url}: {err}. Offline, point "
                "TN_RAY_TIA2_DIR (or --tia2-dir) at a copy of the repository's human_annotations/, prompts/ "
                "and alignment_scores/"
            ) from err
        json.loads(data)  # refuse to cache a truncated or HTML answer
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return dest


def resolve_dir(explicit: str | os.PathLike | None = None) -> Path:
    """``explicit`` or ``$TN_RAY_TIA2_DIR`` if given (must exist), else the download cache."""
    given = explicit or os.environ.get("TN_RAY_TIA2_DIR")
    if given:
        root = Path(given)
        if not (root / "human_annotations").is_dir():
            raise Tia2Error(f"TIA2 directory {root} has no human_annotations/ folder")
        return root
    return download(default_cache())


def _read_json(path: Path) -> dict:
    """A TIA2 file's content; missing file, bytes that are not UTF-8 and invalid JSON are errors
    naming the file (the one JSON reader, :func:`tn_ray.storage.read_json`)."""

    return read_json(path, "TIA2 file")


@lru_cache(maxsize=16)
def load_labels(set_name: str, root: Path) -> pd.DataFrame:
    """One row per image: set, image_id, prompt, labels (3 ints), binary, fine; file order."""
    check_sets([set_name])
    path = root / "human_annotations" / f"human_labels_{set_name}.json"
    return labels_frame(_read_json(path), set_name, path)


def labels_frame(raw: dict, set_name: str, path: Path | str) -> pd.DataFrame:
    """A label file's content ``{image: {image, caption, human_labels}}`` as :func:`load_labels`'s
    rows, for any set name (reward learning reads label files of its own sets)."""
    if not isinstance(raw, dict):
        raise Tia2Error(f"{path}: a label file must be a JSON object {{image: {{image, caption, human_labels}}}}")
    rows = []
    for name, rec in raw.items():
        try:
            labels = [int(x) for x in rec["human_labels"]]
            prompt = rec["caption"]
        except (KeyError, TypeError, ValueError) as err:
            raise Tia2Error(f"{path}: entry '{name}' is malformed ({type(err).__name__}: {err})") from None
        if len(labels) != 3 or any(x not in (-1, 0, 1) for x in labels):
            raise Tia2Error(f"{path}: entry '{name}' has labels {labels}; expected three of -1/0/1")
        rows.append((set_name, rec.get("image", name), prompt, labels))
    df = pd.DataFrame(rows, columns=["set", "image_id", "prompt", "labels"])
    lab = np.array(df["labels"].tolist())
    df["binary"] = ((lab == 1).sum(axis=1) >= 2).astype(int)
    df["fine"] = np.where(lab == -1, 0.5, lab).mean(axis=1)
    return df


@lru_cache(maxsize=16)
def load_prompt_sets(set_name: str, root: Path) -> dict[str, list[str]]:
    check_sets([set_name])
    path = root / "prompts" / f"prompt_set_{set_name}.json"
    return validate_sets(_read_json(path), str(path))


def set_of_prompts(root: Path, sets=SETS) -> dict[str, str]:
    """``{x0: set name}`` over the released prompt sets (the first of ``sets`` holding a prompt)."""
    out: dict[str, str] = {}
    for s in check_sets(sets):
        for x0 in load_prompt_sets(s, root):
            out.setdefault(x0, s)
    return out


def sets_of(prompts, root: Path) -> list[str]:
    """The TIA2 set of each prompt (an ensemble whose kind depends on the set needs it); a prompt
    that is in no released prompt set is an error naming it."""
    lookup = set_of_prompts(root)
    missing = [p for p in dict.fromkeys(prompts) if p not in lookup]
    if missing:
        raise Tia2Error(f"{len(missing)} prompt(s) are in no TIA2 prompt set, so an ensemble kind per set cannot "
                        f"apply to them, e.g. {missing[0]!r}")
    return [lookup[p] for p in prompts]


def first_prompts(per_set: int, root: Path, sets=SETS) -> list[str]:
    """The first ``per_set`` prompts of each set in the release's prompt-set files, set after set.

    The paper fine-tunes on "10 prompts from the 30" of each set it used for best-of-n but does not
    list them; tn_ray takes them in release order, so the 10 are inside the 30 and reproducible."""
    out: list[str] = []
    for s in check_sets(sets):
        out += [x0 for x0 in list(load_prompt_sets(s, root))[:per_set] if x0 not in out]
    return out


@lru_cache(maxsize=16)
def load_alignment_scores(set_name: str, root: Path) -> dict[str, dict]:
    """The authors' released per-prompt metrics: ``{prompt: {"human": fraction good,
    "<reward>": {"auroc", "auprc", "ap5", "ap10", "ap25", "spearman", "kendall"}}}``."""
    check_sets([set_name])
    return _read_json(root / "alignment_scores" / f"alignment_scores_{set_name}.json")


def load_subcategories(root: Path) -> dict[str, str]:
    path = root / "comprehensive_subcategories.json"
    return _read_json(path) if path.exists() else {}


def _summary(df: pd.DataFrame) -> dict:
    n = len(df)
    return {"prompts": df["prompt"].nunique(), "images": n,
            "% good": round(100 * df["binary"].mean(), 2) if n else float("nan"),
            "% bad": round(100 * (1 - df["binary"].mean()), 2) if n else float("nan")}


def stats(root: Path, sets=SETS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per set and overall, per subcategory of the comprehensive set)."""
    frames = [load_labels(s, root) for s in check_sets(sets)]
    per_set = pd.DataFrame([{"set": s, **_summary(f)} for s, f in zip(sets, frames)]
                           + [{"set": "all", **_summary(pd.concat(frames))}])
    sub = pd.DataFrame()
    if "comprehensive" in sets:
        cats = load_subcategories(root)
        comp = load_labels("comprehensive", root).assign(subcategory=lambda d: d["prompt"].map(cats).fillna("unknown"))
        sub = pd.DataFrame([{"subcategory": c, **_summary(g)} for c, g in comp.groupby("subcategory")])
    return per_set, sub


def stats_markdown(root: Path, sets=SETS) -> str:
    per_set, sub = stats(root, sets)
    text = ["# TIA2 statistics", "", "Binary label: good if at least two of three annotators said aligned.", "",
            per_set.to_markdown(index=False, floatfmt=".2f")]
    if len(sub):
        text += ["", "## Comprehensive set by subcategory", "", sub.to_markdown(index=False, floatfmt=".2f")]
    return "\n".join(text) + "\n"
