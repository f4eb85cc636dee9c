"""Deterministic tokenization: counting usage, streaming pieces, and terms for relevance scoring.

The server does not emulate any real BPE vocabulary (tiktoken would need to download one). A token is
a run of word characters or a single punctuation character; counts are stable across runs and close
enough to BPE counts for English prose to make usage numbers and latency meaningful.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)
# a streaming piece: leading whitespace + one token, so that "".join(pieces) == text
_PIECE = re.compile(r"\s*(?:\w+|[^\w\s])|\s+$", re.UNICODE)
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9\-']*[A-Za-z0-9]|[A-Za-z]|\d+(?:\.\d+)?")

STOPWORDS = frozenset(
    """a about above after again against all also am an and any are aren't as at be because been before being
    below between both but by can could did do does doing down during each either else etc even ever every
    few for from further get gets got had has have having he her here hers herself him himself his how however
    i if in into is isn't it its itself just let like made make many may me might more most much must my
    myself no nor not now of off on once one only or other our ours ourselves out over own per please quite
    rather really same say said says she should since so some such than that the their theirs them themselves
    then there these they this those through thus to too under until up upon us use used using very via was
    we were what whatever when where whether which while who whom whose why will with within without would
    yes yet you your yours yourself yourselves s t ll re ve d m don doesn didn won can't won't""".split()
)
# words that carry no topic in prompts and questions
FILLER = frozenset(
    """question questions ask asked asking answer answers tell explain describe discuss give provide share
    know think thoughts specific specifically example examples interesting insight insights detail details
    thank thanks hello hi name i'm im article writing write wrote topic focus area role affiliation
    description expert analyst interviewer interview mentioned talk elaborate kind sort way ways thing things
    something anything lot lots well new good great important key main drill understand understanding
    walk concrete show shows matter matters trade-offs tradeoffs turning comes researching evidence
    surprised surprising helpful noted plays part help""".split()
)


def count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def pieces(text: str) -> list[str]:
    """Split ``text`` into streaming pieces that concatenate back to exactly ``text``."""
    out = _PIECE.findall(text)
    if "".join(out) != text:  # pragma: no cover - the regex covers every character
        return [text]
    return out


def count_message_tokens(messages: Sequence[dict[str, Any]], extra: Iterable[str] = ()) -> int:
    """Prompt tokens: every text part of every message plus a small per-message framing overhead."""
    total = 3
    for message in messages:
        total += 3 + count_tokens(str(message.get("role", "")))
        total += count_tokens(content_text(message.get("content")))
        if message.get("name"):
            total += 1 + count_tokens(str(message["name"]))
        for call in message.get("tool_calls") or []:
            fn = call.get("function") or {}
            total += 3 + count_tokens(str(fn.get("name", ""))) + count_tokens(str(fn.get("arguments", "")))
    for text in extra:
        total += count_tokens(text)
    return total


def content_text(content: Any) -> str:
    """The text of a message's content, which may be a string or a list of typed parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                parts.append(part)
        return "\n".join(parts)
    return str(content)


def stem(word: str) -> str:
    w = word.lower()
    for suffix in ("ations", "ation", "ings", "ing", "ies", "ied", "es", "ed", "ly", "s"):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            base = w[: -len(suffix)]
            if suffix in ("ies", "ied"):
                base += "y"
            return base
    return w


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def terms(text: str, *, drop_filler: bool = False) -> list[str]:
    """Stemmed content terms of ``text`` in order (stopwords dropped), for relevance scoring."""
    out = []
    for w in words(text):
        lw = w.lower()
        if lw in STOPWORDS or (drop_filler and lw in FILLER):
            continue
        if len(lw) < 2 and not lw.isdigit():
            continue
        out.append(stem(lw))
    return out


def key_words(text: str, *, limit: int | None = None) -> list[str]:
    """Distinct content words of ``text`` in order of first appearance, original spelling kept."""
    seen: set[str] = set()
    out: list[str] = []
    for w in words(text):
        lw = w.lower()
        if lw in STOPWORDS or lw in FILLER or len(lw) < 2:
            continue
        s = stem(lw)
        if s in seen:
            continue
        seen.add(s)
        out.append(w)
        if limit is not None and len(out) >= limit:
            break
    return out
