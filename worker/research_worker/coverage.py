"""Coverage of the local documents: which are relevant to the topic, which analyst reaches each.

A document is relevant when it shares a content term with the topic (``honeybee`` also matches
``bee`` and ``honeybees``: compounds and plurals), or when it is about what such a document is
about (cosine of their term frequencies of at least ``RELATED`` with one of them, and so on: a document on
the waggle dance in a corpus on how a swarm picks its home may never say "swarm" yet belongs to it; on the
test corpora a document on the subject scores 0.18 to 0.6 with its closest neighbour, a stray sourdough
recipe among monarch butterflies 0.06). A corpus none of
whose documents shares a term with the topic is taken as relevant whole: someone chose these
documents for this topic. A document with nothing in common with the others (a stray file) is not.

The plan then accounts for every relevant document: each is assigned to the analyst whose role
and description are closest to it (tf-idf cosine), at most ``ceil(documents / analysts)`` each so
no analyst is left with none while another holds many, and the interview makes sure its analyst's
documents are among what it retrieves (research_worker.graph). Whatever model planned the panel,
no relevant document goes unread; the report's status says which were cited (ReportQuality).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

from research_api.records import Analyst
from research_worker.grounding import term_list, terms

RELATED = 0.12


def _vectors(texts: Mapping[str, str]) -> dict[str, dict[str, float]]:
    """tf-idf vectors (unit length) of ``texts`` over their content terms."""
    counts = {k: Counter(_words(v)) for k, v in texts.items()}
    df = Counter(t for c in counts.values() for t in c)
    n = len(counts)
    out: dict[str, dict[str, float]] = {}
    for k, c in counts.items():
        vec = {t: (1 + math.log(f)) * math.log((n + 1) / df[t]) for t, f in c.items()}
        norm = math.sqrt(sum(v * v for v in vec.values())) or 1.0
        out[k] = {t: v / norm for t, v in vec.items()}
    return out


def _words(text: str) -> list[str]:
    return [t for t in term_list(text) if not t[0].isdigit()]


def _cosine(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    if len(a) > len(b):
        a, b = b, a
    return sum(v * b.get(t, 0.0) for t, v in a.items())


def _matches(topic_term: str, doc_terms: set[str]) -> bool:
    if topic_term in doc_terms:
        return True
    if len(topic_term) < 3:
        return False
    return any(
        len(w) >= 3 and (topic_term.endswith(w) or w.endswith(topic_term) or w.startswith(topic_term))
        for w in doc_terms
    )


def relevant_documents(documents: Mapping[str, str], topic: str) -> list[str]:
    """The documents relevant to ``topic``, in the order given."""
    docs = {k: v for k, v in documents.items() if terms(v)}
    if not docs:
        return []
    wanted = terms(topic)
    seeds = [k for k, v in docs.items() if any(_matches(t, terms(v)) for t in wanted)]
    if not seeds:
        return list(docs)
    vectors = {k: _tf(v) for k, v in docs.items()}
    chosen = set(seeds)
    frontier = list(seeds)
    while frontier:  # what is about what a relevant document is about is relevant too
        s = frontier.pop()
        for k in docs:
            if k not in chosen and _cosine(vectors[k], vectors[s]) >= RELATED:
                chosen.add(k)
                frontier.append(k)
    return [k for k in docs if k in chosen]


def _tf(text: str) -> dict[str, float]:
    """Term-frequency vector (unit length): documents on one subject share its common words, which is
    what tf-idf over that same small corpus would weigh down."""
    c = Counter(_words(text))
    norm = math.sqrt(sum(v * v for v in c.values())) or 1.0
    return {t: v / norm for t, v in c.items()}


def assign(analysts: Sequence[Analyst], documents: Mapping[str, str], relevant: Sequence[str]) -> list[list[str]]:
    """Each relevant document's analyst: the closest by tf-idf cosine of role and description, at most
    ``ceil(len(relevant) / len(analysts))`` each (a greedy matching, best pairs first)."""
    if not analysts:
        return []
    out: list[list[str]] = [[] for _ in analysts]
    if not relevant:
        return out
    texts = {f"doc:{d}": documents.get(d, "") for d in relevant}
    texts |= {f"analyst:{i}": f"{a.role}. {a.description}" for i, a in enumerate(analysts)}
    vectors = _vectors(texts)
    cap = math.ceil(len(relevant) / len(analysts))
    pairs = sorted(
        (
            (-_cosine(vectors[f"analyst:{i}"], vectors[f"doc:{d}"]), j, i, d)
            for j, d in enumerate(relevant)
            for i in range(len(analysts))
        ),
    )
    placed: set[str] = set()
    for _, _, i, d in pairs:
        if d not in placed and len(out[i]) < cap:
            out[i].append(d)
            placed.add(d)
    order = {d: j for j, d in enumerate(relevant)}
    return [sorted(ds, key=order.__getitem__) for ds in out]
