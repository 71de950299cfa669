"""Turn an LLM answer into a list of prompts.

Accepted: a numbered or bulleted list ("1. ...", "2) ...", "- ...", "* ...", "(3) ..."),
possibly around commentary lines, which are dropped once any line carries a list marker; a
JSON array of strings; or plain lines (lead-ins ending with ':' dropped). Quotes around a prompt are stripped; empty
lines,
duplicates and x0 itself are dropped.
"""

from __future__ import annotations

import json
import re

from tn_ray.prompts.base import clean

_MARKER = re.compile(r"^\s*(?:\(?\d{1,3}[.):\]]|\d{1,3}\s*-\s|[-*\u2022\u00b7\u2013\u2014+>]|#\d{1,3}[.):]?)\s*")
_QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"


def _strip_quotes(line: str) -> str:
    line = line.strip().rstrip(",;").strip()
    line = re.sub(r"^\*\*(.*)\*\*$", r"\1", line)  # **bold** markdown
    while len(line) >= 2 and line[0] in _QUOTES and line[-1] in _QUOTES:
        line = line[1:-1].strip()
    # a quote that only opens or only closes the line (unbalanced after trailing punctuation)
    if line and line[0] in _QUOTES and line.count(line[0]) == 1:
        line = line[1:].strip()
    if line and line[-1] in _QUOTES and line.count(line[-1]) == 1:
        line = line[:-1].strip()
    return line


def _json_list(text: str) -> list[str] | None:
    body = text.strip()
    if body.startswith("```"):
        body = re.sub(r"^```\w*\s*|\s*```$", "", body)
    if not body.startswith("["):
        return None
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    return [str(x) for x in data if isinstance(x, (str, int, float))] if isinstance(data, list) else None


def parse_answer(text: str | None, x0: str, limit: int | None = None) -> list[str]:
    """The prompts of an answer, cleaned, at most ``limit`` of them ([] when there are none)."""
    if not text or not text.strip():
        return []
    items = _json_list(text)
    if items is None:
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("```")]
        marked = [ln for ln in lines if _MARKER.match(ln)]
        # without markers every line is a prompt, except a lead-in such as "Here are 10 prompts:"
        items = (
            [_MARKER.sub("", ln, count=1) for ln in marked]
            if marked
            else [ln for ln in lines if not ln.rstrip().endswith(":")]
        )
    prompts = clean(x0, [_strip_quotes(i) for i in items])
    return prompts[:limit] if limit else prompts
