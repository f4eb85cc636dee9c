"""Citation checking: every sentence that carries a citation is checked against the text that was
retrieved from the source it cites, and a sentence that text does not support is re-cited to the
retrieved passage that does, or dropped. Never kept silently: each check is counted.

The method is lexical entailment, chosen because it is deterministic, costs no model call and no
download, and judges the writer's text the same way whichever model wrote it (the offline model,
which copies sentences, or a real LLM, which paraphrases). A sentence is supported by a passage when

* at least ``SUPPORT`` (60%) of the sentence's content terms (lower-cased, stop words removed,
  plurals and -ing/-ed endings folded) occur in that one passage, each term weighted by how rare it is
  among the retrieved passages (``ln((N + 1) / df)``), so the words every passage shares (the subject's
  own: "swarm", "scout") cannot carry a sentence whose distinctive words ("dance", "cluster") the
  passage lacks, and
* every number the sentence states (``1987``, ``40``, ``3.5``) occurs in it.

One passage must carry the claim: the retrieved text of a source is a few heading-delimited
passages (or a web page's summary), and the best of them is what the sentence is compared with. A
sentence citing several sources is supported when the best passages of its cited sources together
carry it. What this cannot see: a relation turned around with the same words ("A causes B" vs "B
causes A") or a negation the passage lacks; paraphrase with few shared words fails the check
(it is then re-cited or dropped, which errs on the safe side).

Sentences are checked in the "marked" form of research_worker.citations (``\\x00i\\x00`` names
``known[i]``), so this works on a section's own numbering and on the report's alike.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from research_api.records import CitationCheck

SUPPORT = 0.6
MAX_FAILURES = 20  # failures kept with the figures (feedback for a second writing, the status message)

_MARK = re.compile(r"\x00(\d+)\x00")
_WORD = re.compile(r"[a-z0-9]+(?:[.,][0-9]+)?")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)?")
_STOP = frozenset(
    """a an and are as at be been being but by can could did do does for from had has have he her his how i if in
    into is it its may might more most much must not of on once one only or our out she should so some such than
    that the their them then there these they this those through to too up upon us very was we were what when
    where which while who whom whose why will with would you your also about after before between both each
    every other over under again further any all own same just than""".split()
)
# a sentence ends at . ! or ? (closing quotes and brackets kept), with the citations that follow it
_SENTENCE = re.compile(r"\S.*?(?:[.!?]+[\"')\]]*(?:\s*\x00\d+\x00)*(?=\s|$)|$)", re.S)


def stem(word: str) -> str:
    """A light folding of English endings, enough for lexical overlap: colonies/colony, swarming/swarm."""
    w = word
    for suffix, repl in (("ies", "y"), ("ing", ""), ("ed", ""), ("s", "")):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3 and not w.endswith("ss"):
            w = w[: len(w) - len(suffix)] + repl
            break
    return w[:-1] if len(w) > 3 and w.endswith("e") else w  # move/moved/moving, scale/scales


def term_list(text: str) -> list[str]:
    """The content terms of ``text`` in order: words of two or more characters, stop words removed, folded."""
    return [stem(w) for w in _WORD.findall(_MARK.sub(" ", text.lower())) if w not in _STOP and len(w) > 1]


def terms(text: str) -> set[str]:
    return set(term_list(text))


def numbers(text: str) -> set[str]:
    return {n.replace(",", "") for n in _NUMBER.findall(_MARK.sub(" ", text))}


@dataclass
class Evidence:
    """The retrieved text, by index into the known sources (what a mark names)."""

    passages: dict[int, list[str]] = field(default_factory=dict)
    _df: Counter[str] | None = None
    _n: int = 0

    def weight(self, term: str) -> float:
        """How much a term says: ln((N + 1) / df) over the N retrieved passages (a term none holds counts
        as one that one holds). Words every passage shares (the subject's own) say little about which
        passage supports a sentence; its distinctive words say most."""
        if self._df is None:
            self._df = Counter(t for texts in self.passages.values() for p in texts for t in terms(p))
            self._n = sum(len(texts) for texts in self.passages.values())
        return math.log((self._n + 1) / max(1, self._df[term]))

    @classmethod
    def of(cls, known: Sequence[str], retrieved: Sequence[tuple[str, str]]) -> Evidence:
        """From (source, passage text) pairs; sources not in ``known`` are left out."""
        keys = [k.strip().rstrip("/").lower() for k in known]
        ev = cls()
        for source, text in retrieved:
            key = source.strip().rstrip("/").lower()
            if key in keys:
                ev.passages.setdefault(keys.index(key), [])
                if text not in ev.passages[keys.index(key)]:
                    ev.passages[keys.index(key)].append(text)
        return ev


def _coverage(
    sentence_terms: set[str],
    sentence_numbers: set[str],
    texts: Sequence[str],
    weight: Callable[[str], float] = lambda t: 1.0,
) -> float:
    """The (weighted) share of the sentence's terms found in ``texts`` taken together; 0 when a number
    is missing."""
    if not sentence_terms:
        return 1.0
    found: set[str] = set()
    nums: set[str] = set()
    for t in texts:
        found |= terms(t)
        nums |= numbers(t)
    if not sentence_numbers <= nums:
        return 0.0
    total = sum(weight(t) for t in sentence_terms)
    return sum(weight(t) for t in sentence_terms & found) / total if total else 1.0


def support(sentence: str, passage: str) -> float:
    """How well one passage supports a sentence (0-1; a missing number gives 0)."""
    return _coverage(terms(sentence), numbers(sentence), [passage])


@dataclass(frozen=True)
class Verdict:
    cited: tuple[int, ...]  # what the sentence cited (indices into the known sources)
    supported: bool
    recite: int | None = None  # the source whose passage supports it instead, if any


def judge(sentence: str, cited: Sequence[int], evidence: Evidence) -> Verdict:
    st, sn = terms(sentence), numbers(sentence)
    w = evidence.weight
    best: list[str] = []
    for i in cited:
        texts = evidence.passages.get(i, [])
        if any(_coverage(st, sn, [t], w) >= SUPPORT for t in texts):
            return Verdict(tuple(cited), True)
        if texts:
            best.append(max(texts, key=lambda t: _coverage(st, sn, [t], w)))
    if len(best) > 1 and _coverage(st, sn, best, w) >= SUPPORT:
        return Verdict(tuple(cited), True)
    scored = [
        (_coverage(st, sn, [t], w), i)
        for i, texts in sorted(evidence.passages.items())
        if i not in cited
        for t in texts
    ]
    score, other = max(scored, default=(0.0, -1), key=lambda s: (s[0], -s[1]))
    return Verdict(tuple(cited), False, other if score >= SUPPORT else None)


def sentences(line: str) -> list[str]:
    """The sentences of one line of marked text, each with the citation marks that follow it."""
    return [m.group(0).strip() for m in _SENTENCE.finditer(line) if m.group(0).strip()]


def check(marked: str, evidence: Evidence, known: Sequence[str]) -> tuple[str, CitationCheck]:
    """``marked`` with every cited sentence checked: supported ones kept, others re-cited to the source
    whose retrieved passage supports them, or dropped. Headings and uncited sentences are left alone."""
    result = CitationCheck()
    lines_out: list[str] = []
    for line in marked.split("\n"):
        stripped = line.strip()
        if not _MARK.search(line) or stripped.startswith("#"):
            lines_out.append(line)
            continue
        lead = re.match(r"^\s*(?:[-*+]\s+|\d+[.)]\s+)?", line)
        prefix = lead.group(0) if lead else ""
        kept: list[str] = []
        for sentence in sentences(line[len(prefix) :]):
            cited = [int(n) for n in _MARK.findall(sentence)]
            if not cited:
                kept.append(sentence)
                continue
            verdict = judge(sentence, list(dict.fromkeys(cited)), evidence)
            result.checked += 1
            if verdict.supported:
                result.supported += 1
                kept.append(sentence)
                continue
            names = ", ".join(known[i] for i in verdict.cited if i < len(known))
            plain = re.sub(r"\s+([.!?,;:])", r"\1", _MARK.sub("", sentence)).strip()
            if verdict.recite is not None:
                result.recited += 1
                kept.append(_recite(sentence, verdict.recite))
                what = f"re-cited to {known[verdict.recite]}"
            else:
                result.dropped += 1
                what = "dropped"
            if len(result.failures) < MAX_FAILURES:
                result.failures.append(f"{plain!r} is not supported by what was retrieved from {names} ({what})")
        if kept:
            lines_out.append(prefix + " ".join(kept))
        elif not prefix and lines_out and lines_out[-1].strip() == "":
            continue  # a paragraph that lost every sentence leaves no blank run behind
    text = "\n".join(lines_out)
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n"), result


def _recite(sentence: str, source: int) -> str:
    """The sentence with its citations replaced by one of ``source``, where the first one stood."""
    first = _MARK.search(sentence)
    assert first is not None
    head = sentence[: first.start()] + f"\x00{source}\x00"
    return head + _MARK.sub("", sentence[first.end() :])


def evidence_for(known: Sequence[str], passages: Mapping[str, Sequence[str]]) -> Evidence:
    """Evidence from passages grouped by source."""
    return Evidence.of(known, [(s, t) for s, texts in passages.items() for t in texts])
