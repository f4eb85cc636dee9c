"""Recognise what a request is for (from the prompt's wording) and write the matching free-text reply.

Kinds: ``analysts`` (plan a panel of personas), ``question`` (an analyst interviewing in character),
``search_query``, ``answer`` (an expert answering from retrieved context), ``section``, ``report``,
``intro``, ``conclusion`` and ``other``. Every writer is extractive and deterministic: it only
rearranges sentences of the conversation and cites where they came from.
"""

from __future__ import annotations

import re
from typing import Any

from .conversation import Conversation
from .documents import Corpus, Passage, parse, split_sections
from .extractive import Citations, focus_phrase, limit_words, paragraphs, phrase, rank, title_case
from .tokens import key_words

KINDS = ("analysts", "question", "search_query", "answer", "section", "report", "intro", "conclusion", "other")
END_OF_INTERVIEW = "Thank you so much for your help!"
NOTHING_RELEVANT = "The provided context does not contain information about"


def _schema_props(schema: dict[str, Any] | None) -> set[str]:
    if not schema:
        return set()
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict):
                found.update(props)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return found


def is_persona_schema(schema: dict[str, Any] | None) -> bool:
    props = _schema_props(schema)
    return "name" in props and len(props & {"role", "affiliation", "description"}) >= 2


def classify(conv: Conversation, schema: dict[str, Any] | None = None) -> str:
    s = conv.system.lower()
    last = conv.last_user_text.lower()
    props = _schema_props(schema)
    if is_persona_schema(schema) or ("analyst personas" in s or ("persona" in s and "create" in s)):
        return "analysts"
    if "search_query" in props or ("search query" in s and ("retrieval" in s or "web" in s)):
        return "search_query"
    if "introduction or conclusion" in s or ("introduction" in s and "conclusion" in s and "sections" in s):
        return "conclusion" if "conclusion" in last else "intro"
    if "being interviewed" in s:
        return "answer"
    if re.search(r"\bmemos?\b", s) and re.search(r"\breport\b|## insights", s):
        return "report"
    if "section of a report" in s or ("technical writer" in s and re.search(r"\bsection\b", s)):
        return "section"
    if "you are an expert" in s:
        return "answer"
    if "interview" in s and ("you are an analyst" in s or END_OF_INTERVIEW.lower() in s):
        return "question"
    return "other"


# ---------------------------------------------------------------------------------------------------
# writers


def answer(conv: Conversation, *, focus: str = "", sources_heading: str | None = None, k: int = 5) -> str:
    question = conv.question
    corpus = conv.sourced
    query = f"{question} {question} {focus}"
    chosen = rank(query, corpus.passages, k=k, must_match=question)
    if not chosen:
        subject = phrase(question) or "this question"
        return f"{NOTHING_RELEVANT} {subject}."
    if not conv.wants_citations:
        return paragraphs([p.text for p in chosen])
    cites = Citations()
    body = paragraphs([cites.cite(p) for p in chosen])
    heading = sources_heading or ("### Sources" if "### sources" in conv.lower else "## Sources")
    listing = cites.listing(heading)
    return f"{body}\n\n{listing}" if listing else body


def _expert_turns(conv: Conversation) -> list[str]:
    named = [m.text for m in conv.turns if m.name == "expert"]
    if named:
        return named
    # unnamed transcripts: the analyst's own turns are assistant turns, the expert's are user turns
    return [m.text for m in conv.turns[1:] if m.role == "user"]


def question(conv: Conversation) -> str:
    persona = conv.persona
    focus = persona.description if persona and persona.description else conv.text_after(r"topic of focus[^:]*")
    focus_short = focus_phrase(focus or conv.last_user_text, 12)
    asked = [m.text for m in conv.turns if m.role == "assistant" and m.name != "expert"]
    answers = _expert_turns(conv)
    if len(asked) >= 3 or (answers and answers[-1].startswith(NOTHING_RELEVANT) and len(asked) >= 1):
        return END_OF_INTERVIEW
    topic = ""
    first = conv.turns[0].text if conv.turns else ""
    m = re.search(r"(?:article|report|piece|story) (?:on|about) (.+?)[?.!]*$", first.strip(), re.I)
    if m:
        topic = m.group(1).strip()
    if not asked:
        intro = ""
        if persona:
            intro = f"Hello, I'm {persona.name}, {persona.role} at {persona.affiliation}. "
        about = f" for an article on {topic}" if topic and topic.lower() not in focus_short.lower() else ""
        return (
            f"{intro}I'm researching {focus_short}{about}. What are the most specific, non-obvious "
            f"findings about {focus_short}, and which concrete examples show them?"
        )
    # follow up on the most distinctive terms of the last answer that have not been asked about yet
    last_answer = re.split(r"\n#+\s*Sources|\nSources:", answers[-1] if answers else "")[0]
    # follow up on the first point of the last answer that no earlier question picked up
    asked_text = " ".join(asked).lower()
    points = [p.text for p in parse(last_answer).passages]
    fresh = [p for p in points if p.rstrip(".").lower() not in asked_text]
    if not fresh:
        return END_OF_INTERVIEW
    point = fresh[0].rstrip(".")
    first_word = point.split()[0]
    if first_word[1:].islower():  # "Fair admission ..." -> "fair admission ...", but "LangGraph" stays
        point = point[0].lower() + point[1:]
    templates = (
        "That's helpful. You said that {point}. Can you give a specific example of how that plays out for {focus}?",
        "Interesting: {point}. What evidence supports that, and what are the trade-offs for {focus}?",
        "You also noted that {point}. What surprised you most about it?",
    )
    template = templates[(len(asked) - 1) % len(templates)]
    return template.format(point=point, focus=focus_short)


def search_query(conv: Conversation) -> str:
    """Key terms of the last question asked in the conversation."""
    for m in reversed(conv.turns):
        if m.name == "expert":
            continue
        sentences = re.split(r"(?<=[.!?])\s+", m.text.strip())
        asked = [s for s in sentences if s.endswith("?")] or sentences
        words = [w for w in key_words(" ".join(asked)) if not re.fullmatch(r"(?i)i'?m|hello|hi|thank\w*", w)]
        if words:
            return " ".join(words[:12])
    return phrase(conv.last_user_text or conv.system, 12)


def _focus_of_section(conv: Conversation) -> str:
    m = re.search(r"focus area of the analyst\s*:?\s*(.+?)(?:\n\s*\n|\n\s*\d+\.\s)", conv.system, re.I | re.S)
    if m:
        return m.group(1).strip()
    persona = conv.persona
    return persona.description if persona else conv.question


def section(conv: Conversation) -> str:
    focus = _focus_of_section(conv)
    corpus = Corpus()
    for m in conv.turns:
        corpus.extend(parse(m.text))
    if not corpus.passages:
        corpus = conv.sourced
    sourced = [p for p in corpus.passages if p.sources] or corpus.passages
    title = title_case(focus_phrase(focus, 10)) or "Findings"
    chosen = rank(focus, sourced, k=10)
    if len(chosen) < 3:  # the sources were retrieved for this focus: fall back to their opening sentences
        firsts: dict[int, Passage] = {}
        for p in sourced:
            firsts.setdefault(p.block, p)
        chosen += [p for p in firsts.values() if p not in chosen]
    chosen = limit_words(chosen, 380)
    if not chosen:
        return f"## {title}\n\n### Summary\n\nThe source documents for this section contain no usable text."
    cites = Citations()
    body = paragraphs([cites.cite(p) for p in chosen], 4)
    out = f"## {title}\n\n### Summary\n\n{body}"
    listing = cites.listing("### Sources")
    return f"{out}\n\n{listing}" if listing else out


def _topic(conv: Conversation) -> str:
    for pattern in (r"overall topic\s*:?\s*\n*\s*(.+)", r"finishing a report on\s+(.+)", r"report on\s+(.+)"):
        m = re.search(pattern, conv.system, re.I)
        if m and m.group(1).strip():
            return m.group(1).strip().rstrip(".:")
    return phrase(conv.system, 8)


def report(conv: Conversation) -> str:
    topic = _topic(conv)
    m = re.search(r"memos from your analysts[^:]*:\s*(.+)$", conv.system, re.I | re.S)
    memos = split_sections(m.group(1) if m else conv.system)
    if not memos:
        return answer(conv, sources_heading="## Sources")
    cites = Citations()
    paras = []
    used: set[str] = set()
    for title, body in memos:
        corpus = parse(body)
        fresh = [p for p in corpus.passages if p.text not in used]
        chosen = rank(f"{title} {topic}", fresh, k=3) or fresh[:3]
        used.update(p.text for p in chosen)
        order = {id(p): i for i, p in enumerate(corpus.passages)}
        chosen = sorted(chosen, key=lambda p: order[id(p)])
        if chosen:
            paras.append(" ".join(cites.cite(p) for p in chosen))
    titles = [t for t, _ in memos]
    lead = f"This report brings together findings on {topic}, covering {_join(titles)}."
    out = "## Insights\n\n" + "\n\n".join([lead, *paras])
    listing = cites.listing("## Sources")
    return f"{out}\n\n{listing}" if listing else out


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _sections_for_summary(conv: Conversation) -> list[tuple[str, str]]:
    m = re.search(r"sections to reflect on\s*:?\s*(.+)$", conv.system, re.I | re.S)
    text = m.group(1) if m else conv.all_text
    return [(t, b) for t, b in split_sections(text) if t.lower() not in ("introduction", "conclusion")]


def _key_sentence(title: str, body: str, topic: str) -> str:
    corpus = parse(body)
    chosen = rank(f"{title} {topic}", corpus.passages, k=1) or corpus.passages[:1]
    return chosen[0].text if chosen else ""


def intro(conv: Conversation) -> str:
    topic = _topic(conv)
    sections = _sections_for_summary(conv)
    title = title_case(focus_phrase(topic, 12))
    parts = [f"This report examines {topic}."]
    if sections:
        parts.append(f"It is organised around {len(sections)} themes: {_join([t for t, _ in sections])}.")
        for t, b in sections[:4]:
            s = _key_sentence(t, b, topic)
            if s:
                parts.append(s)
    return f"# {title}\n\n## Introduction\n\n" + _cap_words(parts, 120)


def conclusion(conv: Conversation) -> str:
    topic = _topic(conv)
    sections = _sections_for_summary(conv)
    parts = [f"This report set out to examine {topic}."]
    for t, b in sections[:5]:
        s = _key_sentence(t, b, topic)
        if s:
            parts.append(s)
    if sections:
        parts.append(f"Taken together, {_join([t for t, _ in sections])} show how the pieces of {topic} fit.")
    return "## Conclusion\n\n" + _cap_words(parts, 120)


def _cap_words(sentences: list[str], limit: int) -> str:
    out: list[str] = []
    total = 0
    for s in sentences:
        n = len(s.split())
        if out and total + n > limit:
            break
        out.append(s)
        total += n
    return " ".join(out)


def write(kind: str, conv: Conversation) -> str:
    """Free text for a request of ``kind``."""
    if kind == "question":
        return question(conv)
    if kind == "search_query":
        return search_query(conv)
    if kind == "answer":
        persona = conv.persona
        return answer(conv, focus=persona.description if persona else "")
    if kind == "section":
        return section(conv)
    if kind == "report":
        return report(conv)
    if kind == "intro":
        return intro(conv)
    if kind == "conclusion":
        return conclusion(conv)
    return answer(conv)
