"""Turn the text of a conversation into citeable passages (sentences with the sources they came from).

Recognised shapes, all of which the research assistant produces:

* retrieved documents: ``<Document source="docs/x.md" page="7"/>\\n text \\n</Document>`` or
  ``<Document href="https://..."/>`` (also when a Python list of them was formatted with ``str()``, which
  escapes the newlines);
* cited prose such as an expert's answer or a section memo: sentences carrying ``[1]`` markers, followed
  by a ``Sources`` list ``[1] docs/x.md``; markers are resolved to source labels per block;
* numbered documents: ``[1] label`` on a line of its own followed by the document's text;
* anything else: plain sentences without a source.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# a document's body may not contain another opening tag: a quoted example tag inside instructions
# (``If the source is: <Document source="..."/>' then ...``) never swallows the real documents
_DOC = re.compile(r"<Document\b([^>]*?)/?>((?:(?!<Document\b).)*?)</Document>", re.DOTALL)
_ATTR = re.compile(r"(\w+)\s*=\s*\"([^\"]*)\"")
_MARKER = re.compile(r"\s*\[(\d+(?:\s*[,;]\s*\d+)*)\]")
_SOURCES_HEADING = re.compile(r"^\s*(?:#{1,6}\s*)?\**(?:sources|references|citations)\**\s*:?\s*$", re.I | re.M)
_SOURCE_LINE = re.compile(r"^\s*(?:[-*]\s*)?\[(\d+)\]\s*(.+?)\s*$")
_SENT_SPLIT = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(]?[A-Z0-9])")
_BULLET = re.compile(r"^\s*(?:[-*+>]|\d+[.)])\s+")
_ABBREV = re.compile(r"\b(?:e\.g|i\.e|etc|vs|Dr|Mr|Ms|Mrs|Prof|Inc|Ltd|No|Fig|al)\.$", re.I)


@dataclass(frozen=True)
class Passage:
    text: str
    sources: tuple[str, ...] = ()
    block: int = 0
    position: int = 0


@dataclass
class Corpus:
    passages: list[Passage] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # every source label seen, in order

    def add_source(self, label: str) -> None:
        if label and label not in self.sources:
            self.sources.append(label)

    def extend(self, other: Corpus) -> None:
        offset = len({p.block for p in self.passages})
        for p in other.passages:
            self.passages.append(Passage(p.text, p.sources, p.block + offset, p.position))
        for s in other.sources:
            self.add_source(s)


def unescape_repr(text: str) -> str:
    """Undo ``str(list_of_strings)`` escaping when a list of documents was pasted into a prompt."""
    if "\\n" in text and ("<Document" in text or "['" in text or '["' in text):
        text = text.replace("\\n", "\n").replace("\\'", "'").replace('\\"', '"').replace("\\t", " ")
    return text


def document_label(attrs: str, index: int) -> str:
    values = dict(_ATTR.findall(attrs))
    label = values.get("source") or values.get("href") or values.get("url") or values.get("title") or ""
    label = label.strip()
    page = values.get("page", "").strip()
    if not label:
        label = f"Document {index + 1}"
    if page:
        label = f"{label}, page {page}"
    return label


def clean_sentence(text: str) -> str:
    text = _MARKER.sub("", text)
    text = re.sub(r"\*\*|__|`", "", text)
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([.,;:!?])", r"\1", text)
    return text


_HEADING_END_WORDS = frozenset(
    "a an and as at by for from in into of on or over than that the to via with without".split()
)


def is_heading_line(line: str, following: str) -> bool:
    """A title written as a plain line ("Compute quotas" above its paragraph, as search results often carry
    one): short, no sentence punctuation, not ending on a function word, and followed by a line that
    starts a new sentence. A hard-wrapped line of prose continues in lower case, so it is not one."""
    s = line.strip()
    words = s.split()
    if not words or len(words) > 10 or len(s) > 80 or not following.strip():
        return False
    if s.endswith(":") and len(words) <= 4:  # a label such as "Context:" above its text
        return True
    if re.search(r"[.!?;:,]$|[.!?]\s", s) or words[-1].lower() in _HEADING_END_WORDS:
        return False
    if following.strip().startswith("#"):  # a title over a sub-heading ("The Little Ice Age" / "### A high stand")
        return s[:1].isupper() or s[:1].isdigit()
    return bool(re.match(r"[\"'(`]?[A-Z0-9]", following.strip()))


def _is_title(line: str) -> bool:
    """A short line with no sentence punctuation and no citation: what a title looks like."""
    s = line.strip()
    return len(s.split()) <= 10 and not re.search(r"[.!?:;]$|\[\d+\]", s) and s[:1].isupper()


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` with their citation markers kept; headings (Markdown or plain title lines),
    rules, tables and source lists dropped, list markers removed. Headings and blank lines end a
    paragraph, so a heading is never glued to the sentence after it."""
    out: list[str] = []
    for paragraph in re.split(r"\n\s*\n|\n(?=\s*(?:[-*+]|\d+[.)])\s)|\n(?=\s*#)", text):
        lines = [ln for ln in paragraph.splitlines() if ln.strip()]
        kept = []
        for i, ln in enumerate(lines):
            s = ln.strip()
            if s.startswith("#") or s.startswith("---") or s.startswith("|") or s.startswith("```"):
                continue
            if re.fullmatch(r"[-*+>=_~\s]+|\d+[.)]?", s):  # bare list markers and decorations
                continue
            if i + 1 < len(lines) and is_heading_line(s, lines[i + 1]):
                continue
            if i + 1 < len(lines) and re.fullmatch(r"=+|-+", lines[i + 1].strip()):  # a setext heading
                continue
            kept.append(_BULLET.sub("", s))
        if not kept:
            continue
        if len(kept) == 1 and not _BULLET.match(lines[0].strip()) and _is_title(kept[0]):
            continue  # a line alone, with no sentence in it: a title ("The Little Ice Age" above "### ...")
        joined = " ".join(kept)
        parts = _SENT_SPLIT.split(joined)
        merged: list[str] = []
        for part in parts:
            if merged and _ABBREV.search(merged[-1]):
                merged[-1] = merged[-1] + " " + part
            else:
                merged.append(part)
        out.extend(p.strip() for p in merged if p.strip())
    return out


def _markers(sentence: str) -> list[int]:
    nums: list[int] = []
    for group in _MARKER.findall(sentence):
        for n in re.split(r"[,;]", group):
            if n.strip().isdigit():
                nums.append(int(n))
    return nums


def _passages(text: str, block: int, default_sources: tuple[str, ...], numbered: dict[int, str]) -> list[Passage]:
    out = []
    for i, raw in enumerate(split_sentences(text)):
        cited = tuple(dict.fromkeys(numbered[n] for n in _markers(raw) if n in numbered))
        sentence = clean_sentence(raw)
        if len(sentence.split()) < 4 or not re.search(r"[A-Za-z]", sentence):
            continue
        out.append(Passage(sentence, cited or default_sources, block, i))
    return out


def _split_sources_list(text: str) -> tuple[str, dict[int, str]]:
    """Separate a trailing ``Sources`` list from cited prose."""
    headings = list(_SOURCES_HEADING.finditer(text))
    if not headings:
        return text, {}
    heading = headings[-1]
    body, tail = text[: heading.start()], text[heading.end() :]
    numbered: dict[int, str] = {}
    rest: list[str] = []
    for ln in tail.splitlines():
        m = _SOURCE_LINE.match(ln)
        if m:
            numbered.setdefault(int(m.group(1)), m.group(2).strip())
        elif ln.strip():
            rest.append(ln)
    return body + ("\n" + "\n".join(rest) if rest else ""), numbered


def _numbered_documents(text: str) -> list[tuple[str, str]] | None:
    """``[1] label`` lines each followed by that document's text, or None if the text is not like that."""
    starts = [m for m in re.finditer(r"^\s*\[(\d+)\]\s*(.+)$", text, re.M)]
    if len(starts) < 1:
        return None
    docs = []
    for i, m in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(text)
        body = text[m.end() : end].strip()
        if len(body.split()) < 8:
            return None
        docs.append((m.group(2).strip(), body))
    return docs


def parse(text: str, *, numbered_documents: bool = True) -> Corpus:
    """Passages of one piece of text (a message's content)."""
    corpus = Corpus()
    text = unescape_repr(text)
    docs = list(_DOC.finditer(text))
    if docs:
        outside = _DOC.sub("\n\n", text)
        for i, m in enumerate(docs):
            label = document_label(m.group(1), i)
            corpus.add_source(label)
            corpus.passages.extend(_passages(m.group(2), i, (label,), {}))
        # around retrieved documents is instruction text: a "[1] example.md" in it names no document
        rest = parse(outside, numbered_documents=False) if re.search(r"[A-Za-z]{3}", outside) else Corpus()
        corpus.extend(rest)
        return corpus
    body, numbered = _split_sources_list(text)
    if numbered:
        for label in numbered.values():
            corpus.add_source(label)
        corpus.passages.extend(_passages(body, 0, (), numbered))
        return corpus
    numbered_docs = _numbered_documents(text) if numbered_documents else None
    if numbered_docs:
        for i, (label, body) in enumerate(numbered_docs):
            corpus.add_source(label)
            corpus.passages.extend(_passages(body, i, (label,), {}))
        return corpus
    corpus.passages.extend(_passages(text, 0, (), {}))
    return corpus


def document_names(text: str) -> dict[str, str]:
    """label -> what a document calls itself, as a phrase: its first heading (or plain title line), else
    the words of its file name when they say something ("regional-styles.txt" -> "regional styles";
    never "doc 1"); labels without either are left out."""
    out: dict[str, str] = {}
    for i, m in enumerate(_DOC.finditer(unescape_repr(text))):
        label = document_label(m.group(1), i)
        lines = [ln.strip() for ln in m.group(2).splitlines() if ln.strip()]
        first = lines[0] if lines else ""
        nxt = lines[1] if len(lines) > 1 else ""
        underlined = bool(re.fullmatch(r"=+|-+", nxt))  # a setext heading
        followed = bool(nxt) and (is_heading_line(first, nxt) or (nxt.startswith("#") and len(first.split()) <= 10))
        if first.startswith("#") or underlined or followed:
            out[label] = first.lstrip("#").strip().rstrip(".:")
            continue
        said = {w.lower().rstrip("s") for w in re.findall(r"[A-Za-z]+", m.group(2))}
        name = re.sub(r"\.[A-Za-z0-9]{1,5}$", "", re.split(r"[/\\]", label.split(",")[0].rstrip("/"))[-1])
        words = re.sub(r"[-_.]+", " ", name).split()
        # a file name says what the document is about only in words the document itself uses
        if (
            words
            and not any(any(c.isdigit() for c in w) for w in words)
            and any(len(w) >= 4 and w.lower().rstrip("s") in said for w in words)
        ):
            if not (len(words) == 1 and words[0].lower() in ("document", "notes", "untitled", "readme", "text")):
                out[label] = " ".join(words)
    return out


def parse_all(texts: list[str]) -> Corpus:
    corpus = Corpus()
    for t in texts:
        corpus.extend(parse(t))
    return corpus


def split_sections(text: str, level: int = 2) -> list[tuple[str, str]]:
    """Markdown sections at heading ``level``: (title, body) pairs; text before the first heading is skipped."""
    text = unescape_repr(text)
    pattern = re.compile(r"^" + "#" * level + r"(?!#)\s*(.+?)\s*$", re.M)
    heads = list(pattern.finditer(text))
    out: list[tuple[str, str]] = []
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        title = m.group(1).strip()
        if re.fullmatch(r"(?i)sources|references", title):
            if out:  # keep a level-``level`` Sources list with the section it belongs to
                out[-1] = (out[-1][0], out[-1][1] + "\n\n" + text[m.start() : end].strip())
            continue
        out.append((title, text[m.end() : end].strip()))
    return out
