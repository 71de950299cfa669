"""A report's markdown as one HTML page (``report.html`` beside ``report.md``), pure text in, text out.

The markdown is rendered by markdown-it-py (CommonMark with GitHub tables); raw HTML in the markdown is escaped,
not passed through. Images keep their paths as written (relative in the study report, so the folder can be moved
with its figures) and are shown inline, scaled to the page's width; tables get thin borders and a shaded header.
"""

from __future__ import annotations

import html

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 1.5em auto; padding: 0 1em; line-height: 1.4; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
th, td { border: 1px solid #bbb; padding: 0.2em 0.5em; }
th { background: #f0f0f0; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def markdown_to_html(text: str, title: str = "report") -> str:
    """A standalone HTML page (UTF-8, inline style) of the markdown ``text``."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
    return "\n".join(
        [
            "<!doctype html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            f"<style>{STYLE}</style>",
            "</head>",
            "<body>",
            body,
            "</body>",
            "</html>",
            "",
        ]
    )
