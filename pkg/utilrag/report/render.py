"""The report's blocks (headings, paragraphs, warnings, tables, images, code) and their two renderings:
Markdown (images beside it as PNG files) and one self-contained HTML page (images as data URIs, inline
CSS, a Content-Security-Policy that allows nothing from the network)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str
    kind: str = "p"  # p | warn | muted


@dataclass
class Table:
    head: list[str]
    rows: list[list[str]]
    right: set[int] = field(default_factory=set)  # right-aligned (numeric) columns


@dataclass
class Image:
    alt: str
    name: str  # the PNG's file name beside report.md
    data: bytes


@dataclass
class Code:
    title: str
    text: str
    lang: str = ""


Block = Heading | Para | Table | Image | Code


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Para):
            out.append(f"> **Warning:** {b.text}" if b.kind == "warn" else b.text)
        elif isinstance(b, Table):
            lines = ["| " + " | ".join(_md_cell(h) for h in b.head) + " |"]
            lines.append("|" + "|".join("---:" if i in b.right else "---" for i in range(len(b.head))) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
        elif isinstance(b, Image):
            out.append(f"![{b.alt}]({b.name})")
        elif isinstance(b, Code):
            out.append(f"{b.title}\n\n```{b.lang}\n{b.text.rstrip()}\n```")
    return "\n\n".join(out) + "\n"


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1100px;
margin:24px auto;padding:0 18px;color:#1f2328;background:#fff}
h1{font-size:26px;margin:0 0 12px}
h2{font-size:20px;border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:34px}
h3{font-size:16px;margin:22px 0 6px}
.wide{overflow-x:auto;margin:6px 0 14px}
table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #d0d7de;padding:3px 9px;vertical-align:top}
th{background:#f3f4f6;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
th.n{text-align:right}
td:first-child{white-space:nowrap}
tbody tr:nth-child(even) td{background:#f9fafb}
.warn{background:#fff8c5;border:1px solid #d4a72c;border-left:6px solid #bf8700;padding:8px 12px;margin:8px 0;
max-width:900px}
.muted{color:#59636e}
img{max-width:100%;border:1px solid #eaecef;margin:4px 0 12px;display:block}
details{margin:6px 0 12px}
summary{cursor:pointer;color:#0969da}
pre{background:#f6f8fa;border:1px solid #eaecef;padding:8px 10px;overflow:auto;font-size:12px;line-height:1.35}
"""

# Nothing may load from anywhere: only inline styles and data: images.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def to_html(blocks: list[Block], title: str) -> str:
    e = html.escape
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            if b.kind == "warn":
                body.append(f'<div class="warn" role="note"><strong>Warning:</strong> {e(b.text)}</div>')
            else:
                body.append(f'<p class="{b.kind}">{e(b.text)}</p>' if b.kind != "p" else f"<p>{e(b.text)}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th{' class=n' if i in b.right else ''}>{e(h)}</th>" for i, h in enumerate(b.head))
            rows = "".join(
                "<tr>"
                + "".join(f"<td{' class=n' if i in b.right else ''}>{e(c)}</td>" for i, c in enumerate(r))
                + "</tr>"
                for r in b.rows
            )
            thead = f"<thead><tr>{head}</tr></thead>" if any(b.head) else ""  # a key/value table has none
            body.append(f'<div class="wide"><table>{thead}<tbody>{rows}</tbody></table></div>')
        elif isinstance(b, Image):
            data = base64.b64encode(b.data).decode("ascii")
            body.append(f'<img alt="{e(b.alt)}" src="data:image/png;base64,{data}">')
        elif isinstance(b, Code):
            body.append(f"<details><summary>{e(b.title)}</summary><pre>{e(b.text)}</pre></details>")
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{e(title)}</title><style>{CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
