"""Plain text → Atlassian Document Format, the only form Jira Cloud's REST API v3 takes for a
description or a comment (a plain string is a 400).

Blank lines separate paragraphs; lines that start with `- ` (or `* `) make a bullet list; the
other lines of a paragraph are joined by hard breaks, so the text reads as it was written.
"""

from __future__ import annotations

from typing import Any

BULLETS = ("- ", "* ")


def _paragraph(lines: list[str]) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    for n, line in enumerate(lines):
        if n:
            content.append({"type": "hardBreak"})
        if line:
            content.append({"type": "text", "text": line})
    return {"type": "paragraph", "content": content}


def _bullets(items: list[str]) -> dict[str, Any]:
    return {"type": "bulletList", "content": [
        {"type": "listItem", "content": [_paragraph([item])]} for item in items]}


def to_adf(text: str) -> dict[str, Any]:
    """A document of the text's paragraphs and bullet lists."""
    blocks: list[dict[str, Any]] = []
    lines: list[str] = []
    items: list[str] = []

    def flush() -> None:
        if lines:
            blocks.append(_paragraph(lines[:]))
            lines.clear()
        if items:
            blocks.append(_bullets(items[:]))
            items.clear()

    for raw in text.replace("\r\n", "\n").split("\n"):
        line = raw.rstrip()
        if not line.strip():
            flush()
        elif line.lstrip().startswith(BULLETS):
            if lines:
                flush()
            items.append(line.lstrip()[2:].strip())
        else:
            if items:
                flush()
            lines.append(line)
    flush()
    return {"type": "doc", "version": 1, "content": blocks}


def adf_to_text(document: Any) -> str:
    """The text of a document (paragraphs on lines of their own, bullets as `- `): how a
    description read back from Jira is compared with a newly rendered one."""
    if not isinstance(document, dict):
        return str(document or "")
    out: list[str] = []
    for block in document.get("content") or []:
        if block.get("type") == "bulletList":
            out += ["- " + _inline(item) for item in block.get("content") or []]
        else:
            out.append(_inline(block))
    return "\n".join(out).strip()


def _inline(node: dict[str, Any]) -> str:
    if node.get("type") == "text":
        return str(node.get("text", ""))
    if node.get("type") == "hardBreak":
        return "\n"
    return "".join(_inline(child) for child in node.get("content") or [])
