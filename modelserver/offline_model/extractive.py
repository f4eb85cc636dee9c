"""Extractive text: rank passages against a query with BM25 and write them up with citations."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from rank_bm25 import BM25Okapi

from .documents import Passage
from .tokens import key_words, terms


def rank(
    query: str, passages: Sequence[Passage], *, k: int, min_overlap: int = 1, must_match: str = ""
) -> list[Passage]:
    """The ``k`` passages most relevant to ``query``: BM25 score, ties broken by term overlap then order.

    Passages sharing fewer than ``min_overlap`` content terms with the query are never returned, so an
    unrelated context yields nothing rather than its least-bad sentence.
    """
    q = list(dict.fromkeys(terms(query, drop_filler=True)))
    if not q or not passages:
        return []
    docs = [terms(p.text) for p in passages]
    if not any(docs):
        return []
    bm25 = BM25Okapi([d or ["\x00"] for d in docs])
    scores = bm25.get_scores(q)
    qset = set(q)
    required = set(terms(must_match, drop_filler=True)) if must_match else qset
    ranked = []
    for i, (p, d) in enumerate(zip(passages, docs, strict=True)):
        overlap = len(qset & set(d))
        if overlap < min_overlap or not required & set(d):
            continue
        ranked.append((-float(scores[i]), -overlap, i, p))
    ranked.sort(key=lambda r: (r[0], r[1], r[2]))
    out: list[Passage] = []
    seen = Seen()
    for _, _, _, p in ranked:
        if not seen.add(p.text):
            continue  # near-duplicate of a passage already chosen
        out.append(p)
        if len(out) >= k:
            break
    return out


def _fingerprint(text: str) -> frozenset[str]:
    return frozenset(terms(text)) or frozenset(text.lower().split())


def near_duplicate(a: str, b: str, threshold: float = 0.8) -> bool:
    """Whether two sentences say the same thing: more than ``threshold`` of the shorter one's content terms
    are in the other (so a sentence and the same sentence with a heading glued on are duplicates)."""
    fa, fb = _fingerprint(a), _fingerprint(b)
    return len(fa & fb) / max(1, min(len(fa), len(fb))) > threshold


class Seen:
    """Sentences already written in one answer; ``add`` refuses an exact or near duplicate."""

    def __init__(self, threshold: float = 0.8) -> None:
        self.threshold = threshold
        self._prints: list[frozenset[str]] = []

    def __contains__(self, text: object) -> bool:
        if not isinstance(text, str):
            return False
        f = _fingerprint(text)
        return any(len(f & g) / max(1, min(len(f), len(g))) > self.threshold for g in self._prints)

    def add(self, text: str) -> bool:
        """Record ``text``; False (and nothing recorded) if it repeats a sentence already seen."""
        if text in self:
            return False
        self._prints.append(_fingerprint(text))
        return True


def distinct(passages: Iterable[Passage], seen: Seen | None = None) -> list[Passage]:
    """``passages`` without exact or near repeats (of each other, or of what ``seen`` holds already)."""
    seen = seen if seen is not None else Seen()
    return [p for p in passages if seen.add(p.text)]


def in_document_order(passages: Iterable[Passage], order: Sequence[Passage]) -> list[Passage]:
    index = {id(p): i for i, p in enumerate(order)}
    return sorted(passages, key=lambda p: index.get(id(p), 1 << 30))


@dataclass
class Citations:
    """Numbers sources in order of first use; the same source always gets the same number."""

    labels: list[str] = field(default_factory=list)

    def number(self, label: str) -> int:
        if label not in self.labels:
            self.labels.append(label)
        return self.labels.index(label) + 1

    def cite(self, passage: Passage) -> str:
        if not passage.sources:
            return passage.text
        marks = "".join(f"[{self.number(s)}]" for s in passage.sources)
        text = passage.text
        if text and text[-1] in ".!?":
            return f"{text[:-1]} {marks}{text[-1]}"
        return f"{text} {marks}"

    def listing(self, heading: str) -> str:
        if not self.labels:
            return ""
        lines = [f"[{i}] {label}" for i, label in enumerate(self.labels, 1)]
        return f"{heading}\n" + "  \n".join(lines)


def paragraphs(sentences: Sequence[str], per_paragraph: int = 4) -> str:
    chunks = [sentences[i : i + per_paragraph] for i in range(0, len(sentences), per_paragraph)]
    return "\n\n".join(" ".join(c) for c in chunks)


def limit_words(passages: Sequence[Passage], max_words: int) -> list[Passage]:
    out: list[Passage] = []
    total = 0
    for p in passages:
        n = len(p.text.split())
        if out and total + n > max_words:
            break
        out.append(p)
        total += n
    return out


def phrase(text: str, max_words: int = 8) -> str:
    """A short noun-ish phrase summarising ``text`` (its first content words), for titles and questions."""
    return " ".join(key_words(text, limit=max_words))


_LEAD_VERBS = re.compile(
    r"^(?:(?:he|she|they|who|the analyst)\s+)?(?:focus(?:es|ing)? on|examin(?:es|ing)|explor(?:es|ing)|"
    r"analy[sz](?:es|ing)|investigat(?:es|ing)|stud(?:ies|ying)|evaluat(?:es|ing)|assess(?:es|ing)|"
    r"look(?:s|ing) at|research(?:es|ing)?|specializ(?:es|ing) in|concentrat(?:es|ing) on|cover(?:s|ing))\s+",
    re.I,
)


def focus_phrase(description: str, max_words: int = 12) -> str:
    """The object of a persona description: "Focuses on the cost of X." -> "the cost of X"."""
    first = re.split(r"(?<=[.!?;:])\s", description.strip(), maxsplit=1)[0].rstrip(".!?;:")
    first = _LEAD_VERBS.sub("", first)
    ws = first.split()
    return " ".join(ws[:max_words]) if ws else description.strip()


def title_case(text: str) -> str:
    small = {"a", "an", "the", "and", "or", "of", "in", "on", "for", "to", "at", "by", "with", "vs"}
    out = []
    for i, w in enumerate(text.split()):
        if i and w.lower() in small:
            out.append(w.lower())
        elif w[:1].islower():
            out.append(w[:1].upper() + w[1:])
        else:
            out.append(w)
    return " ".join(out)
