"""Citations and sources, done in code rather than trusted to the model.

A model's ``[n]`` means either the n-th entry of the Sources list it wrote under its text, or,
when it wrote none, the n-th document it was given. Either way each citation is resolved to a
source that was actually retrieved (citations of anything else are dropped, never listed), and
then numbered once per document in order of first use, so every source is listed exactly once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from research_api.records import CitationCheck
from research_worker.grounding import Evidence, check
from research_worker.state import Section

_CITE = re.compile(r"\[(\d+(?:\s*[,;]\s*\d+)*)\](?!\()")
_SOURCES_HEAD = re.compile(r"^\s*(?:#{1,6}\s*)?\**(?:sources|references)\**\s*:?\s*$", re.IGNORECASE | re.MULTILINE)
_LISTED = re.compile(r"^\s*(?:[-*]\s*)?\[(\d+)\]\s*(.+?)\s*$", re.MULTILINE)
_MARK = re.compile(r"\x00(\d+)\x00")


def _key(source: str) -> str:
    return source.strip().rstrip("/").lower()


def dedupe(items: Sequence[str]) -> list[str]:
    """Distinct items in order of first appearance (case, whitespace and a trailing slash ignored)."""
    out: list[str] = []
    seen: set[str] = set()
    for item in items:
        key = _key(item)
        if key and key not in seen:
            seen.add(key)
            out.append(item.strip())
    return out


def split_listing(text: str) -> tuple[str, dict[int, str]]:
    """(text before a Sources heading, the ``[n] label`` entries listed after it)."""
    m = _SOURCES_HEAD.search(text)
    if not m:
        return text.rstrip(), {}
    listing = {int(n): label.rstrip(" ,.") for n, label in _LISTED.findall(text[m.end() :])}
    return text[: m.start()].rstrip(), listing


def match_source(label: str, known: Sequence[str]) -> int | None:
    """The index in ``known`` of the retrieved source a listed label names, if any."""
    k = _key(label)
    for i, src in enumerate(known):
        if _key(src) == k:
            return i
    for i, src in enumerate(known):  # "[1] docs/x.md, section Foo" or a bare file name
        s = _key(src)
        if s and (k.startswith(s) or s in k.split() or (len(k) > 3 and s.endswith(k))):
            return i
    return None


def to_marks(text: str, known: Sequence[str], default_numbering: Sequence[str] | None = None) -> str:
    """Replace each citation with a mark naming an index into ``known``; drop what names nothing
    retrieved. The model's own Sources list (if any) is removed."""
    body, listing = split_listing(text)
    numbering = default_numbering if default_numbering is not None else known

    def resolve(n: int) -> int | None:
        if listing:
            label = listing.get(n)
        else:
            label = numbering[n - 1] if 1 <= n <= len(numbering) else None
        return None if label is None else match_source(label, known)

    def repl(m: re.Match[str]) -> str:
        out: list[int] = []
        for n in (int(x) for x in re.split(r"[,;]", m.group(1))):
            i = resolve(n)
            if i is not None and i not in out:
                out.append(i)
        return "".join(f"\x00{i}\x00" for i in out)

    return _CITE.sub(repl, body)


def number_marks(parts: Sequence[str], known: Sequence[str]) -> tuple[list[str], list[str]]:
    """Number marked citations across ``parts`` in order of first use: (texts, cited sources)."""
    order: list[int] = []
    for part in parts:
        for m in _MARK.finditer(part):
            i = int(m.group(1))
            if i not in order:
                order.append(i)
    number = {i: n for n, i in enumerate(order, start=1)}
    texts = [_MARK.sub(lambda m: f"[{number[int(m.group(1))]}]", p) for p in parts]
    return texts, [known[i] for i in order]


def cite(text: str, known: Sequence[str]) -> tuple[str, list[str]]:
    """``text`` with citations resolved against ``known`` and renumbered, and the sources it cites."""
    texts, sources = number_marks([to_marks(text, known)], known)
    return texts[0], sources


def sources_block(sources: Sequence[str], heading: str = "### Sources") -> str:
    """A Sources list, or nothing at all when there are no sources (never a heading over no sources)."""
    if not sources:
        return ""
    return heading + "\n" + "\n".join(f"[{i}] {s}  " for i, s in enumerate(sources, start=1))


def parse_section(markdown: str, context_sources: Sequence[str], fallback_title: str) -> tuple[str, str, list[str]]:
    """(title, summary, sources) of a section the model wrote, its citations resolved against the
    retrieved sources; its Sources are exactly what it cites."""
    title, summary, sources, _ = check_section(markdown, context_sources, fallback_title, [])
    return title, summary, sources


def check_section(
    markdown: str, context_sources: Sequence[str], fallback_title: str, retrieved: Sequence[tuple[str, str]]
) -> tuple[str, str, list[str], CitationCheck]:
    """``parse_section`` with every cited sentence checked against ``retrieved`` ((source, passage)
    pairs; research_worker.grounding): unsupported ones re-cited or dropped, and the figures."""
    text = markdown.strip()
    title = fallback_title
    m = re.search(r"^\s*#{1,2}\s+(?!Summary\b)(.+?)\s*$", text, re.MULTILINE)
    if m:
        title = m.group(1).strip()
        text = text[m.end() :]
    text = re.sub(r"^\s*#{2,3}\s*Summary\s*$", "", text, count=1, flags=re.IGNORECASE | re.MULTILINE).strip()
    known = dedupe(context_sources)
    marked = to_marks(text, known)
    result = CitationCheck()
    if retrieved:
        marked, result = check(marked, Evidence.of(known, retrieved), known)
    texts, cited = number_marks([marked], known)
    return title, texts[0].strip(), cited, result


def section_markdown(title: str, summary: str, sources: Sequence[str]) -> str:
    listing = sources_block(sources)
    return f"## {title}\n\n### Summary\n{summary.strip()}\n" + (f"\n{listing}\n" if listing else "")


def report_sources(sections: Sequence[Section]) -> list[str]:
    return dedupe([src for s in sorted(sections, key=lambda s: s.index) for src in s.sources])


def _renumber(text: str, local: dict[int, int]) -> str:
    def repl(m: re.Match[str]) -> str:
        return "".join(f"[{local[n]}]" for n in (int(x) for x in re.split(r"[,;]", m.group(1))) if n in local)

    return _CITE.sub(repl, text)


def memos(sections: Sequence[Section]) -> list[str]:
    """The sections as the report writer sees them, numbered with the report's one numbering."""
    known = report_sources(sections)
    keys = [_key(k) for k in known]
    out = []
    for s in sorted(sections, key=lambda s: s.index):
        local = {n: keys.index(_key(src)) + 1 for n, src in enumerate(s.sources, start=1)}
        summary = _renumber(s.summary, local)
        listed = "\n".join(f"[{local[n]}] {src}  " for n, src in enumerate(s.sources, start=1))
        body = f"## {s.title}\n\n### Summary\n{summary.strip()}\n"
        out.append(body + (f"\n### Sources\n{listed}\n" if listed else ""))
    return out
