"""The report's Markdown as one self-contained HTML page: styles inline, charts embedded as data
URIs, no script and nothing fetched, so the file opens from disk anywhere and reads at a
laptop's width (wide tables scroll inside their own box instead of widening the page).

The Markdown is the subset the reports write: headings, paragraphs, `- ` lists, tables whose
first row is a header, images alone on a line, **bold**, `code`, and `<br>` inside cells.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

STYLE = """
:root { --ink: #1f2328; --muted: #59636e; --line: #d1d9e0; --head: #f6f8fa; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff; font: 15px/1.5 system-ui, -apple-system, "Segoe UI",
       "DejaVu Sans", sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 26px; margin: 0 0 8px; }
h2 { font-size: 20px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 24px 0 8px; }
h4 { font-size: 15px; margin: 18px 0 6px; }
p, li { max-width: 80ch; }
p { margin: 8px 0; }
nav { display: flex; flex-wrap: wrap; gap: 2px 16px; font-size: 14px; margin: 8px 0 16px; }
nav a { color: var(--accent); text-decoration: none; white-space: nowrap; }
code { font: 13px/1.4 ui-monospace, "DejaVu Sans Mono", monospace; background: var(--head); padding: 1px 4px;
       border-radius: 4px; }
.table { overflow-x: auto; margin: 10px 0 14px; }
table { border-collapse: collapse; font-size: 14px; }
th, td { border: 1px solid var(--line); padding: 5px 9px; text-align: left; vertical-align: top; }
th { background: var(--head); font-weight: 600; }
tr:nth-child(even) td { background: #fbfcfd; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.answers { width: 100%; table-layout: fixed; }
table.answers td { font-size: 13px; overflow-wrap: anywhere; }
table.answers th:nth-child(1) { width: 13%; } table.answers th:nth-child(2) { width: 7%; }
table.answers th:nth-child(3) { width: 48%; } table.answers th:nth-child(4) { width: 32%; }
figure { margin: 12px 0 20px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
"""

_IMAGE = re.compile(r"^!\[(.*)\]\(([^()]+)\)$")
_NUMBER = re.compile(r"^[-+]?[\d.,]+%?( ± [\d.,]+%?)?( \[[^\]]*\])?( \(.*\))?$|^-$")


def inline(text: str) -> str:
    """Escaped text with **bold**, `code` and <br> line breaks."""
    out = html.escape(text, quote=False).replace("&lt;br&gt;", "<br>")
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _cells(line: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def _table(lines: list[str], css: str | None) -> str:
    head, rows = _cells(lines[0]), [_cells(line) for line in lines[2:]]
    cls = f' class="{css}"' if css else ""
    cell = lambda c: f'<td class="num">{inline(c)}</td>' if _NUMBER.match(c) else f"<td>{inline(c)}</td>"  # noqa: E731
    body = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in rows)
    return (f'<div class="table"><table{cls}><thead><tr>' + "".join(f"<th>{inline(c)}</th>" for c in head)
            + f"</tr></thead><tbody>{body}</tbody></table></div>")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def to_html(md: list[str], images: Path, title: str = "dalign report") -> str:
    """The page for Markdown lines; an image line's file is read from `images` and embedded."""
    body, table, para, items = [], [], [], []
    table_class = None  # a table right after a `<!-- answers -->` marker gets the fixed answers layout

    def flush() -> None:
        nonlocal table_class
        if table:
            body.append(_table(table, table_class))
            table.clear()
            table_class = None
        if para:
            body.append(f"<p>{inline(' '.join(para))}</p>")
            para.clear()
        if items:
            body.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    sections = []
    for line in md + [""]:
        if line.startswith("|"):
            if para or items:
                flush()
            table.append(line)
            continue
        if table:
            flush()
        if line.strip() == "<!-- answers -->":
            table_class = "answers"
        elif line.startswith("!["):
            flush()
            alt, name = _IMAGE.match(line).groups()
            data = base64.b64encode((images / name).read_bytes()).decode()
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
                        f"<figcaption>{inline(alt)}</figcaption></figure>")
        elif line.startswith("#"):
            flush()
            level, text = len(line) - len(line.lstrip("#")), line.lstrip("# ")
            if level == 2:
                sections.append(text)
            body.append(f'<h{level} id="{_slug(text)}">{inline(text)}</h{level}>')
        elif line.startswith("- "):
            if para:
                flush()
            items.append(line[2:])
        elif not line.strip():
            flush()
        else:
            para.append(line)
    nav = "<nav>" + "".join(f'<a href="#{_slug(s)}">{inline(s)}</a>' for s in sections) + "</nav>"
    first = next((i for i, b in enumerate(body) if b.startswith("<h1")), -1)
    body.insert(first + 1, nav)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title><style>{STYLE}</style>'
            "</head><body><main>\n" + "\n".join(body) + "\n</main></body></html>\n")
