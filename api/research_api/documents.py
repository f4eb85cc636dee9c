"""How a documents source's files become passages, and how much of them the planner is shown.

The worker searches these passages (``research_worker.search.DocumentsBackend``) and the estimate
counts them (``research_api.estimate``), so both take them from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DOC_SUFFIXES = (".md", ".markdown", ".txt")
MAX_PASSAGE_CHARS = 4000
# The planner's look at the documents: the start of each, together at most OVERVIEW_TOTAL_CHARS
# (about 2,300 tokens, so the plan's prompt fits a 4k-token context with room for its answer,
# however many analysts are planned), each at most OVERVIEW_CHARS and at least OVERVIEW_MIN_CHARS.
OVERVIEW_CHARS = 1500
OVERVIEW_MIN_CHARS = 300
OVERVIEW_TOTAL_CHARS = 9000


@dataclass(frozen=True)
class Passage:
    source: str
    title: str
    content: str


def split_markdown(source: str, text: str) -> list[Passage]:
    """One passage per ``#``/``##`` heading block (the document's title heads the first)."""
    passages: list[Passage] = []
    title = ""
    lines: list[str] = []

    def flush() -> None:
        body = "\n".join(lines).strip()
        if body:
            passages.append(Passage(source, title, body[:MAX_PASSAGE_CHARS]))

    for line in text.splitlines():
        m = re.match(r"^(#{1,2})\s+(.*)$", line)
        if m:
            flush()
            title, lines = m.group(2).strip(), []
        else:
            lines.append(line)
    flush()
    return passages


def document_title(text: str) -> str:
    """The document's own title: its first line when that is a ``#`` heading or underlined (``===``)."""
    lines = text.lstrip().split("\n", 2)
    first = lines[0].strip()
    if re.match(r"^#\s", first):
        return first.lstrip("#").strip()
    return first if len(lines) > 1 and re.fullmatch(r"=+", lines[1].strip()) else ""


def overview_shown(limit: int, total_chars: int = OVERVIEW_TOTAL_CHARS) -> int:
    """How many documents (at most ``limit``) the planner's overview shows within ``total_chars``."""
    return min(limit, max(1, total_chars // OVERVIEW_MIN_CHARS))


def overview_chars(shown: int, total_chars: int = OVERVIEW_TOTAL_CHARS) -> int:
    """How many characters of each of ``shown`` documents the overview shows."""
    return min(OVERVIEW_CHARS, total_chars // max(1, shown))


def overview_limit(max_analysts: int, documents: int) -> int:
    """The documents the planner asks to see: every one when they fit, else the most relevant."""
    return max(2 * max_analysts, 6, documents)


def overview_text(source: str, passages: list[Passage], document: str) -> str:
    """What the overview shows of one document before it is cut to ``overview_chars``: its passages,
    each under its heading, with the document's title first when no passage starts with it."""
    text = "\n\n".join(f"{p.title}\n{p.content}" if p.title else p.content for p in passages if p.source == source)
    title = document_title(document)
    if title and not text.startswith(title):  # a title over no text of its own heads no passage
        text = f"{title}\n\n{text}"
    return text
