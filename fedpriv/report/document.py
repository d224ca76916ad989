"""A minimal report document: the content is written once, as blocks, and rendered to Markdown and HTML.

The HTML is self-contained: its stylesheet is inline and its figures are base64-embedded PNGs, so
the single file can be mailed or archived. The Markdown refers to the figures as PNG files, which
:func:`save_figures` writes next to it.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str
    strong: bool = False


@dataclass
class Banner:
    """A prominent warning box (e.g. NOT PRIVATE)."""

    text: str
    kind: str = "danger"  # "danger" (red) or "warning" (amber)


@dataclass
class Table:
    headers: Sequence[str]
    rows: Sequence[Sequence[str]]


@dataclass
class Figure:
    """A PNG figure; ``markdown_path`` (relative to the report) replaces the saved copy in Markdown."""

    name: str  # file stem under the figure folder
    png: bytes
    caption: str
    markdown_path: str | None = None


@dataclass
class Code:
    text: str
    summary: str = ""  # HTML: a collapsed <details> with this summary line


Block = Heading | Paragraph | Banner | Table | Figure | Code

NUMERIC = re.compile(r"^([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|n/a|inf|-inf)(\b|$)")

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1080px;
       margin: 2em auto; padding: 0 1em; color: #1b1f24; line-height: 1.45; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .8em 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: .3em .65em; text-align: left; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.banner { padding: .8em 1em; margin: 1em 0; border-radius: 6px; font-weight: bold; font-size: 1.1em; }
.danger { background: #ffebe9; border: 2px solid #cf222e; color: #82071e; }
.warning { background: #fff8c5; border: 2px solid #bf8700; color: #6b4a00; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eaeef2; }
figcaption { color: #57606a; font-size: 0.9em; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: 0.85em; }
"""


def to_markdown(title: str, blocks: Sequence[Block], figure_dir: str) -> str:
    """The document as Markdown; figures are linked as ``figure_dir/<name>.png``."""
    lines = [f"# {title}", ""]
    for block in blocks:
        lines += [*_markdown(block, figure_dir), ""]
    return "\n".join(lines)


def _markdown(block: Block, figure_dir: str) -> list[str]:
    match block:
        case Heading(text, level):
            return ["#" * level + " " + text]
        case Paragraph(text, strong):
            return [f"**{text}**" if strong else text]
        case Banner(text, _):
            return [f"> **{text}**"]
        case Table(headers, rows):
            escape = [[cell.replace("|", "\\|") for cell in row] for row in [list(headers), *rows]]
            aligns = ["---"] + ["---:"] * (len(headers) - 1)
            return ["| " + " | ".join(escape[0]) + " |", "| " + " | ".join(aligns) + " |",
                    *("| " + " | ".join(row) + " |" for row in escape[1:])]
        case Figure(name, _, caption, markdown_path):
            return [f"![{caption}]({markdown_path or f'{figure_dir}/{name}.png'})", "", f"*{caption}*"]
        case Code(text, _):
            return ["```", text.rstrip(), "```"]
    raise TypeError(f"unknown block {block!r}")


def to_html(title: str, blocks: Sequence[Block]) -> str:
    """The document as one self-contained HTML page."""
    body = "\n".join(_html(block) for block in blocks)
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n{body}\n</body>\n</html>\n")


def _html(block: Block) -> str:
    match block:
        case Heading(text, level):
            return f"<h{level}>{html.escape(text)}</h{level}>"
        case Paragraph(text, strong):
            inner = html.escape(text)
            return f"<p><strong>{inner}</strong></p>" if strong else f"<p>{inner}</p>"
        case Banner(text, kind):
            return f'<div class="banner {kind}">{html.escape(text)}</div>'
        case Table(headers, rows):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
            body = "".join("<tr>" + "".join(_td(cell) for cell in row) + "</tr>" for row in rows)
            return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        case Figure(name, png, caption, _):
            data = base64.b64encode(png).decode("ascii")
            return (f'<figure id="{html.escape(name)}"><img alt="{html.escape(caption)}" '
                    f'src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}</figcaption></figure>')
        case Code(text, summary):
            pre = f"<pre>{html.escape(text)}</pre>"
            return f"<details><summary>{html.escape(summary)}</summary>{pre}</details>" if summary else pre
    raise TypeError(f"unknown block {block!r}")


def _td(cell: str) -> str:
    """A table cell; numbers (and n/a, inf) are right-aligned so their digits line up."""
    numeric = NUMERIC.match(cell) is not None
    return f'<td class="num">{html.escape(cell)}</td>' if numeric else f"<td>{html.escape(cell)}</td>"


def save_figures(blocks: Sequence[Block], folder: Path) -> list[Path]:
    """Write every figure that Markdown links from ``folder`` (not those with a ``markdown_path``)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for block in blocks:
        if isinstance(block, Figure) and block.markdown_path is None:
            path = folder / f"{block.name}.png"
            path.write_bytes(block.png)
            written.append(path)
    return written
