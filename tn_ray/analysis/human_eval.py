"""Blinded side-by-side human evaluation of two rewards' best-of-n picks, as static HTML.

For each compared pair of rewards (A, B) and each prompt, an annotator sees the prompt and
two sets of k images (A's top-k and B's top-k from the pool of size n) and answers which set
matches the prompt better. Questions are shuffled; which reward is "Set 1" is drawn at random
per question; images inside a set are shuffled and copied under opaque names, so nothing on
the page tells the rewards apart. The answer key lives outside the exported folder.

Open ``index.html`` in any browser: answers are kept in the browser's local storage and the
index page downloads them as a CSV (question, answer) to join with the key file.
"""
from __future__ import annotations

import hashlib
import html
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from tn_ray.config import StrictModel

ANSWERS = ("set 1", "set 2", "tie")


class HumanEvalConfig(StrictModel):
    pairs: list[tuple[str, str]] = Field(default_factory=list, description="reward pairs to compare, by reward column "
                                                                           "name (e.g. ['clip', 'textnorm(clip)']); "
                                                                           "empty = each model vs its TextNorm")
    n: int | None = Field(
        None, ge=1, description="pool size the sets are picked from (images); None = the largest pool"
    )
    k: int = Field(4, ge=1, description="images per set (images); must be one of top_k")
    seed: int = Field(0, ge=0, description="seed of the question order, side assignment and file names")
    max_prompts: int | None = Field(None, ge=1, description="first N prompts only (count); None = all")


_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:1em auto;padding:0 1em}
.set{display:flex;gap:8px;margin:.3em 0 1em}.set img{width:240px;height:240px;object-fit:contain;
image-rendering:pixelated;border:1px solid #ccc}h2{margin-bottom:.2em}.prompt{font-size:1.3em;
background:#f4f4f4;padding:.5em}label{margin-right:1.5em;font-size:1.1em}"""

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{qid}</title><style>{style}</style></head>
<body>
<p><a href="index.html">all questions</a> &middot; question {pos} of {total}</p>
<p>Which set of images matches the prompt better?</p>
<div class="prompt">{prompt}</div>
<h2>Set 1</h2><div class="set">{set1}</div>
<h2>Set 2</h2><div class="set">{set2}</div>
<form id="f">{radios}</form>
<p>{next}</p>
<script>
const q = "{qid}", key = "tn_ray_human_eval:" + {study};
const a = JSON.parse(localStorage.getItem(key) || "{{}}");
if (a[q]) document.querySelector('input[value="' + a[q] + '"]').checked = true;
document.getElementById("f").addEventListener("change", e => {{
  a[q] = e.target.value; localStorage.setItem(key, JSON.stringify(a)); }});
</script></body></html>"""

_INDEX = """<!doctype html><html><head><meta charset="utf-8"><title>human evaluation</title>
<style>{style}</style></head>
<body>
<h1>Human evaluation: which set matches the prompt better?</h1>
<p>{total} questions. Answers are saved in this browser as you go; when done, download them and send the file back.</p>
<p><button id="dl">download answers (CSV)</button> <span id="count"></span></p>
<ol>{items}</ol>
<script>
const key = "tn_ray_human_eval:" + {study}, ids = {ids};
const a = JSON.parse(localStorage.getItem(key) || "{{}}");
document.getElementById("count").textContent = ids.filter(i => a[i]).length + " of " + ids.length + " answered";
document.getElementById("dl").onclick = () => {{
  const rows = ["question,answer"].concat(ids.map(i => i + "," + (a[i] || "")));
  const url = URL.createObjectURL(new Blob([rows.join("\\n") + "\\n"], {{type: "text/csv"}}));
  const link = document.createElement("a"); link.href = url; link.download = "answers.csv"; link.click(); }};
</script></body></html>"""


def _token(seed: int, image_id: str) -> str:
    return hashlib.sha256(f"{seed}\x1f{image_id}".encode()).hexdigest()[:20]


def export(
    selections: pd.DataFrame,
    images: pd.DataFrame,
    pairs: list[tuple[str, str]],
    n: int,
    k: int,
    seed: int,
    out_dir: Path,
    key_path: Path,
    read: Callable[[str], bytes],
    max_prompts: int | None = None,
) -> pd.DataFrame:
    """Write the pages and images under ``out_dir`` and the answer key to ``key_path``.

    ``selections``: rows of :func:`tn_ray.analysis.bestofn_selection.select`; ``images``: prompt_id, prompt,
    sample, image_id, image (path or URI, opened with ``read``). Returns the key table.
    """
    sel = selections[(selections["n"] == n) & (selections["k"] == k)]
    sel = sel.drop(columns=[c for c in ("prompt", "image_id", "image") if c in sel.columns])
    sel = sel.merge(
        images[["prompt_id", "sample", "prompt", "image_id", "image"]], on=["prompt_id", "sample"], how="left"
    )
    prompt_ids = sorted(sel["prompt_id"].unique())[: max_prompts or None]
    rng = np.random.default_rng(seed)
    study = json.dumps(hashlib.sha256(f"{seed}{pairs}{n}{k}{out_dir.resolve()}".encode()).hexdigest()[:12])
    questions = []
    for a, b in pairs:
        for pid in prompt_ids:
            sets = {r: sel[(sel["reward"] == r) & (sel["prompt_id"] == pid)].sort_values("rank") for r in (a, b)}
            for r, s in sets.items():
                if len(s) != k:
                    raise ValueError(
                        f"human evaluation: reward {r!r} has {len(s)} selected images for prompt_id {pid}, expected {k}"
                    )
            questions.append((a, b, pid, sets))
    order = rng.permutation(len(questions))
    (out_dir / "img").mkdir(parents=True, exist_ok=True)
    key_rows, links = [], []
    for pos, qi in enumerate(order, 1):
        a, b, pid, sets = questions[qi]
        qid = f"q{pos:04d}"
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        shown = {}
        for side, reward in (("set1", first), ("set2", second)):
            rows = sets[reward].iloc[rng.permutation(k)]
            names = []
            for image_id, src in zip(rows["image_id"], rows["image"]):
                name = f"img/{_token(seed, image_id)}.png"
                target = out_dir / name
                if not target.exists():
                    tmp = target.with_name(f".{target.name}.tmp")
                    tmp.write_bytes(read(src))
                    tmp.replace(target)
                names.append(name)
            shown[side] = (reward, list(rows["image_id"]), names)
        prompt = str(sets[a]["prompt"].iloc[0])
        radios = "".join(f'<label><input type="radio" name="a" value="{v}"> {v}</label>' for v in ANSWERS)
        nxt = (
            f'<a href="q{pos + 1:04d}.html">next question &rarr;</a>'
            if pos < len(order)
            else '<a href="index.html">done: back to the index</a>'
        )
        page = _PAGE.format(
            qid=qid,
            style=_STYLE,
            pos=pos,
            total=len(order),
            prompt=html.escape(prompt),
            study=study,
            set1="".join(f'<img src="{s}" alt="">' for s in shown["set1"][2]),
            set2="".join(f'<img src="{s}" alt="">' for s in shown["set2"][2]),
            radios=radios,
            next=nxt,
        )
        (out_dir / f"{qid}.html").write_text(page)
        links.append(f'<li><a href="{qid}.html">{qid}</a></li>')
        key_rows.append(
            {
                "question": qid,
                "prompt_id": int(pid),
                "prompt": prompt,
                "n": n,
                "k": k,
                "set1_reward": shown["set1"][0],
                "set2_reward": shown["set2"][0],
                "set1_images": json.dumps(shown["set1"][1]),
                "set2_images": json.dumps(shown["set2"][1]),
                "set1_files": json.dumps(shown["set1"][2]),
                "set2_files": json.dumps(shown["set2"][2]),
            }
        )
    ids = json.dumps([r["question"] for r in key_rows])
    (out_dir / "index.html").write_text(
        _INDEX.format(style=_STYLE, total=len(order), items="".join(links), study=study, ids=ids)
    )
    key = pd.DataFrame(key_rows)
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key.to_csv(key_path, index=False)
    return key


def score_answers(key: pd.DataFrame, answers: pd.DataFrame) -> pd.DataFrame:
    """Win rates per pair from a downloaded answers CSV (question, answer) and the key."""
    df = key.merge(answers, on="question", how="inner")
    df = df[df["answer"].isin(ANSWERS)]
    winner = np.where(
        df["answer"] == "set 1", df["set1_reward"], np.where(df["answer"] == "set 2", df["set2_reward"], "tie")
    )
    df = df.assign(
        pair=[" vs ".join(sorted((a, b))) for a, b in zip(df["set1_reward"], df["set2_reward"])], winner=winner
    )
    return df.groupby(["pair", "winner"]).size().rename("count").reset_index()
