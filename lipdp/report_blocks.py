"""Report blocks (headings, paragraphs, warnings, tables, figures) and their Markdown and HTML renderings."""

import base64
import dataclasses
import html
import io

NOT_COVERED = (
    "Not covered by the privacy guarantee: this section is computed from private training records. "
    "Do not publish it; `lipdp report --public` leaves it out."
)


def png_bytes(figure):
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


@dataclasses.dataclass
class Block:
    """One element of a report: ``kind`` in heading, text, warning, not_covered, table, figure."""

    kind: str
    text: str = ""
    rows: list = None
    header: list = None
    png: bytes = None
    name: str = None


def heading(text):
    return Block("heading", text)


def paragraph(text):
    return Block("text", text)


def warning(text):
    return Block("warning", text)


def not_covered():
    """The banner at the top of a section computed from private training records."""
    return Block("not_covered", NOT_COVERED)


def table(header, rows):
    return Block("table", header=[str(h) for h in header], rows=[[str(c) for c in row] for row in rows])


def figure_block(name, figure, caption):
    return Block("figure", caption, png=png_bytes(figure), name=name)


def render_markdown(blocks, title):
    lines = [f"# {title}", ""]
    for block in blocks:
        if block.kind == "heading":
            lines += [f"## {block.text}", ""]
        elif block.kind == "text":
            lines += [block.text, ""]
        elif block.kind == "warning":
            lines += [f"> **WARNING: {block.text}**", ""]
        elif block.kind == "not_covered":
            lines += [f"> **{block.text}**", ""]
        elif block.kind == "table":
            lines.append("| " + " | ".join(block.header) + " |")
            lines.append("|" + "---|" * len(block.header))
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in block.rows]
            lines.append("")
        elif block.kind == "figure":
            lines += [f"![{block.text}]({block.name})", "", f"*{block.text}*", ""]
    return "\n".join(lines)


_CSS = (
    "body{font-family:sans-serif;max-width:70em;margin:2em auto;line-height:1.4}"
    "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #bbb;padding:2px 6px}"
    ".warning{background:#fdd;border:2px solid #c00;padding:0.5em;font-weight:bold}"
    ".not-covered{background:#ffe;border:2px solid #b80;padding:0.5em;font-weight:bold}"
    "figure{margin:1em 0}figcaption{font-style:italic;font-size:0.9em}"
)


def render_html(blocks, title):
    escape = html.escape
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{escape(title)}</h1>"
    ]
    for block in blocks:
        if block.kind == "heading":
            parts.append(f"<h2>{escape(block.text)}</h2>")
        elif block.kind == "text":
            parts.append(f"<p>{escape(block.text)}</p>")
        elif block.kind == "warning":
            parts.append(f"<p class='warning'>WARNING: {escape(block.text)}</p>")
        elif block.kind == "not_covered":
            parts.append(f"<p class='not-covered'>{escape(block.text)}</p>")
        elif block.kind == "table":
            head = "".join(f"<th>{escape(h)}</th>" for h in block.header)
            body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        elif block.kind == "figure":
            data = base64.b64encode(block.png).decode("ascii")
            parts.append(
                f"<figure><img alt='{escape(block.text)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{escape(block.text)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)
