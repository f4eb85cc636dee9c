"""Recognise what a request is for (from the prompt's wording) and write the matching free-text reply.

Kinds: ``analysts`` (plan a panel of personas), ``question`` (an analyst interviewing in character),
``search_query``, ``answer`` (an expert answering from retrieved context), ``section``, ``report``,
``intro``, ``conclusion`` and ``other``. Every writer is extractive and deterministic: it only
rearranges sentences of the conversation and cites where they came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .conversation import Conversation
from .documents import Corpus, Passage, parse, parse_all, split_sections
from .extractive import (
    Citations,
    Seen,
    distinct,
    focus_phrase,
    limit_words,
    paragraphs,
    phrase,
    rank,
    title_case,
)
from .personas import embed, is_question
from .tokens import STOPWORDS, key_words, stem

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


def instructions(system: str) -> str:
    """The instruction part of a system prompt: retrieved documents, ``<context>`` blocks and a payload of
    Markdown sections (memos, report sections) removed, so words in the data never decide the kind."""
    text = re.sub(r"<context>.*?(?:</context>|\Z)", " ", system, flags=re.S | re.I)
    text = re.sub(r"<Document\b[^>]*?/?>.*?(?:</Document>|\Z)", " ", text, flags=re.S | re.I)
    heads = list(re.finditer(r"(?:^|:[ \t]*)(#{2,3})[ \t]+\S", text, re.M))
    if len(heads) >= 2 and len(text[: heads[0].start()].split()) >= 20:
        text = text[: heads[0].start()]  # pasted sections (memos, a report's sections) are data
    return text


def classify(conv: Conversation, schema: dict[str, Any] | None = None) -> str:
    s = instructions(conv.system).lower()
    last = conv.last_user_text.lower()
    if len(conv.turns) == 1 and last and last in conv.system.lower():  # instructions and request in one message
        last = re.split(r"\n\s*\n", last.strip())[-1]
    props = _schema_props(schema)

    def has(pattern: str) -> bool:
        return re.search(pattern, s) is not None

    if is_persona_schema(schema) or has(r"\banalyst personas\b") or (has(r"\bpersonas?\b") and has(r"\bcreat\w*")):
        return "analysts"
    if "search_query" in props or (has(r"\bsearch query\b") and has(r"\bretrieval\b|\bweb\b")):
        return "search_query"
    if has(r"\bintroduction or conclusion\b") or (
        has(r"\bintroduction\b") and has(r"\bconclusion\b") and has(r"\bsections\b")
    ):
        return "conclusion" if re.search(r"\bconclusion\b", last) else "intro"
    if has(r"\bbeing interviewed\b"):
        return "answer"
    if has(r"\bmemos?\b") and has(r"\breport\b|## insights"):
        return "report"
    if has(r"\bsection of a report\b") or (has(r"\btechnical writer\b") and has(r"\bsection\b")):
        return "section"
    if has(r"\byou are an expert\b"):
        return "answer"
    if has(r"\binterview\w*") and (has(r"\byou are an analyst\b") or END_OF_INTERVIEW.lower() in s):
        return "question"
    return "other"


# ---------------------------------------------------------------------------------------------------
# writers


def parse_focus(description: str) -> tuple[str, str, list[str]]:
    """(theme, setting, concerns) of an analyst's focus: "Focuses on cost and quotas in how X works. Wants to
    know A; B; and C." -> ("cost and quotas", "how X works", [A, B, C]). Other wordings give their first
    phrase as the theme and their further sentences as concerns."""
    text = re.sub(r"\s+", " ", description.strip())
    first = focus_phrase(text, 40)
    theme, setting = first, ""
    m = re.match(r"(.{3,200}?),\s+(?:in|for|within|across)\s+(.+)$", first) or re.match(
        r"(.{3,80}?)\s+(?:in|for|within|across)\s+(.+)$", first
    )
    if m and (len(m.group(1).split()) <= 8 or "," in first):
        theme, setting = m.group(1), m.group(2)
    theme = natural_cut(theme.split(", as well as ")[0], 8)  # a panel's grouped subjects: the lead one
    rest = re.split(r"(?<=[.!?])\s+", text, maxsplit=1)[1:] if text else []
    concerns: list[str] = []
    if rest:
        lead = r"(?i)^(?:wants to know|cares about|asks|is interested in|looks for|wants to learn)\s+"
        body = re.sub(lead, "", rest[0])
        body = body.rstrip(".!? ")
        parts = re.split(r";\s*(?:and\s+)?", body) if ";" in body else [body]
        concerns = [c.strip() for c in parts if len(c.split()) >= 3][:3]
    return theme, setting, concerns


_CUT_BEFORE = frozenset("in for of on with to by and or when while that which how where as at from".split())


def natural_cut(text: str, max_words: int) -> str:
    """At most ``max_words`` words of ``text``, cut where a phrase ends (at punctuation or before a
    preposition or conjunction), never in the middle of one, and never ending on a function word."""
    words = text.split()
    if len(words) <= max_words:
        return text.strip().rstrip(",;:")
    best = 0
    for i in range(2, max_words + 1):
        if words[i - 1].endswith((",", ";", ":")) or (i < len(words) and words[i].lower() in _CUT_BEFORE):
            best = i
    kept = words[: best or max_words]
    while len(kept) > 1 and kept[-1].lower().strip(",;:") in _CUT_BEFORE | {"a", "an", "the"}:
        kept.pop()
    return " ".join(kept).rstrip(",;:")


_ANAPHORS = frozenset("it its this these those they them their that such both he she here".split())


def leans_back(text: str) -> bool:
    """Whether a sentence needs the one before it ("It works in two phases", "Kubernetes lets a Job tell
    these apart"), so it should not stand alone or open a paragraph."""
    first = text.split()[0].lower().strip(",;:") if text.split() else ""
    if re.match(r"(?i)(?:\S+\s+){0,3}also\b|(?:however|but|and|moreover|instead|otherwise|then|still)\b", text):
        return True
    pointing = r"\b(?:these|those)\s+(?:apart|are|were|two|three|both|all|cases?|ones?)\b|\b(?:these|those)[.,;]"
    return first in _ANAPHORS or bool(re.search(pointing, text))


def units(passages: list[Passage]) -> list[list[Passage]]:
    """Sentences grouped so that one leaning back on its predecessor stays with it."""
    out: list[list[Passage]] = []
    for p in passages:
        if out and leans_back(p.text):
            out[-1].append(p)
        else:
            out.append([p])
    return out


def _context_corpus(conv: Conversation) -> Corpus:
    """Passages the expert may use: the retrieved context, not the expert's own earlier answers."""
    question = conv.question
    texts = []
    for m in conv.messages:
        if m.name == "expert":
            continue
        texts.append(m.text.replace(question, " ") if question and question in m.text else m.text)
    corpus = parse_all(texts)
    if any(p.sources for p in corpus.passages):
        return Corpus([p for p in corpus.passages if p.sources], list(corpus.sources))
    return corpus


def _asked(text: str) -> str:
    """The question sentences of a turn (its last sentence if none ends in '?')."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]
    asked = [s for s in sentences if s.endswith("?")]
    return " ".join(asked) if asked else (sentences[-1] if sentences else text)


def answer(conv: Conversation, *, focus: str = "", sources_heading: str | None = None, k: int = 4) -> str:
    """2-4 distinct context sentences most relevant to the question (BM25), each with its citation; the
    expert does not repeat what it said in earlier turns unless nothing new is relevant."""
    question = _asked(conv.question)
    corpus = _context_corpus(conv)
    said = Seen()
    for text in _expert_turns(conv):
        for p in parse(text).passages:
            said.add(p.text)
    fresh = [p for p in corpus.passages if p.text not in said]
    query = f"{question} {question} {focus}"
    chosen = rank(query, fresh, k=k, must_match=question) or rank(query, corpus.passages, k=k, must_match=question)
    if not chosen and focus:  # nothing on the question's own words: what the context says about the analyst's area
        chosen = rank(f"{question} {focus}", fresh, k=2, must_match=focus) or rank(
            f"{question} {focus}", corpus.passages, k=2, must_match=focus
        )
    chosen = limit_words(chosen, 120)
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


def _had_nothing(answer_text: str) -> bool:
    return answer_text.startswith(NOTHING_RELEVANT) or bool(
        re.match(r"(?i)i (?:could not|couldn't|cannot|can't) find\b", answer_text.strip())
    )


_OPENERS = (
    "When it comes to {theme}, can you walk me through {concern}, with a concrete example?",
    "Could you explain {concern}, and why it matters for {theme}?",
    "Turning to {concern}: what evidence is there, and what are the trade-offs?",
)
_FOLLOW_UPS = (
    "That's helpful. You said that {point}.",
    "Interesting: {point}.",
    "You also noted that {point}.",
)
_PLAIN = (
    "What are the most specific, non-obvious findings about {theme}, and which concrete examples show them?",
    "Can you give a specific example of how that plays out for {theme}?",
    "What evidence supports that, and what are the trade-offs for {theme}?",
    "What surprised you most about {theme}?",
)


def _ask(theme: str, concerns: list[str], turn: int) -> str:
    if concerns:
        concern = concerns[turn % len(concerns)]
        return _OPENERS[turn % len(_OPENERS)].format(theme=theme, concern=concern)
    return _PLAIN[min(turn, len(_PLAIN) - 1)].format(theme=theme)


def question(conv: Conversation) -> str:
    """The analyst's next question: an introduction and the first concern of its persona, then follow-ups
    that pick up a point of the expert's last answer and move on to the next concern."""
    persona = conv.persona
    focus = persona.description if persona and persona.description else conv.text_after(r"topic of focus[^:]*")
    theme, _, concerns = parse_focus(focus or conv.last_user_text)
    asked = [m.text for m in conv.turns if m.role == "assistant" and m.name != "expert"]
    answers = _expert_turns(conv)
    if len(asked) >= 3 or (answers and _had_nothing(answers[-1]) and len(asked) >= 1):
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
        about = f" for an article on {topic}" if topic and topic.lower() not in theme.lower() else ""
        return f"{intro}I'm researching {theme}{about}. {_ask(theme, concerns, 0)}"
    # pick up the point of the last answer that bears most on the next concern and was not quoted yet
    turn = len(asked)
    last_answer = re.split(r"\n#+\s*Sources|\nSources:", answers[-1] if answers else "")[0]
    asked_text = " ".join(asked).lower()
    points = [p for p in parse(last_answer).passages if p.text.rstrip(".").lower() not in asked_text]
    if not points:
        return END_OF_INTERVIEW
    next_concern = concerns[turn % len(concerns)] if concerns else theme
    point = (rank(next_concern, points, k=1) or points)[0].text.rstrip(".")
    first_word = point.split()[0]
    if first_word.lower() in STOPWORDS and (first_word[1:].islower() or len(first_word) == 1):  # "A Job" -> "a Job"
        point = point[0].lower() + point[1:]
    lead = _FOLLOW_UPS[(turn - 1) % len(_FOLLOW_UPS)].format(point=point)
    return f"{lead} {_ask(theme, concerns, turn)}"


_ABOUT = re.compile(
    r"(?:article|report|piece|story|essay|paper|book|writing)\s+(?:on|about)\s+([^?!\n]+?)(?:[?.!](?:\s|$)|$)", re.I
)


def interview_topic(conv: Conversation) -> str:
    """The subject of an interview: the opening "...writing an article on <topic>?", else the setting of the
    analyst's focus ("Focuses on <theme> in <topic>")."""
    for m in conv.turns[:3]:
        found = _ABOUT.search(m.text.strip())
        if found:
            return found.group(1).strip()
    persona = conv.persona
    if persona and persona.description:
        return parse_focus(persona.description)[1]
    return ""


def search_query(conv: Conversation) -> str:
    """Key terms of the last question asked in the conversation, with the interview topic's key terms that
    the question leaves out (a follow-up such as "where is the field heading?" still searches the topic).
    The closing thank-you asks nothing: the question before it is used."""
    asked_words: list[str] = []
    for m in reversed(conv.turns):
        if m.name == "expert" or END_OF_INTERVIEW.lower().rstrip("!") in m.text.lower():
            continue
        if m is conv.turns[0] and _ABOUT.search(m.text):  # the opening "you were writing an article on ...?"
            continue
        sentences = re.split(r"(?<=[.!?])\s+", m.text.strip())
        asked = [s for s in sentences if s.endswith("?")] or sentences
        asked_words = [w for w in key_words(" ".join(asked)) if not re.fullmatch(r"(?i)i'?m|hello|hi|thank\w*", w)]
        if asked_words:
            break
    have = {stem(w.lower()) for w in asked_words}
    topic_words = [w for w in key_words(interview_topic(conv)) if stem(w.lower()) not in have]
    words = asked_words[:10] + topic_words[:6]
    if words:
        return " ".join(words)
    return phrase(conv.last_user_text or conv.system, 12)


def _focus_of_section(conv: Conversation) -> str:
    m = re.search(r"focus area of the analyst\s*:?\s*(.+?)(?:\n\s*\n|\n\s*\d+\.\s)", conv.system, re.I | re.S)
    if m:
        return m.group(1).strip()
    persona = conv.persona
    return persona.description if persona else conv.question


def section(conv: Conversation) -> str:
    """``## <the analyst's theme>``, ``### Summary`` of the distinct source sentences that bear most on the
    analyst's focus (cited), ``### Sources``."""
    focus = _focus_of_section(conv)
    theme, _, concerns = parse_focus(focus)
    corpus = Corpus()
    for m in conv.turns:
        corpus.extend(parse(m.text))
    if not corpus.passages:
        corpus = conv.sourced
    sourced = [p for p in corpus.passages if p.sources] or corpus.passages
    title = title_case(theme) or "Findings"
    query = f"{theme} {theme} {' '.join(concerns)}" if concerns else focus
    seen = Seen()
    chosen = distinct(rank(query, sourced, k=8), seen)
    if len(chosen) < 6:  # the sources were retrieved for this focus: their opening sentences, then the rest
        firsts: dict[int, Passage] = {}
        for p in sourced:
            firsts.setdefault(p.block, p)
        rest = [p for p in firsts.values() if p not in chosen] + [p for p in sourced if p not in firsts.values()]
        for p in rest:
            if len(chosen) >= 6:
                break
            if p not in chosen and seen.add(p.text):
                chosen.append(p)
    chosen = limit_words(chosen, 300)
    # a careful writer uses every document it was given: the most relevant sentence of any not yet used
    ranked = rank(query, sourced, k=len(sourced))
    for source in dict.fromkeys(s for p in sourced for s in p.sources[:1]):
        if any(source in p.sources for p in chosen):
            continue
        mine = [p for p in ranked if source in p.sources] or [p for p in sourced if source in p.sources]
        extra = next((p for p in mine if not leans_back(p.text) and seen.add(p.text)), None)
        if extra is not None:
            chosen.append(extra)
    chosen = _readable_order(chosen, sourced, seen)
    if not chosen:
        return f"## {title}\n\n### Summary\n\nThe source documents for this section contain no usable text."
    cites = Citations()
    body = paragraphs([cites.cite(p) for p in chosen], 4)
    out = f"## {title}\n\n### Summary\n\n{body}"
    listing = cites.listing("### Sources")
    return f"{out}\n\n{listing}" if listing else out


def _readable_order(chosen: list[Passage], everything: list[Passage], seen: Seen) -> list[Passage]:
    """The chosen sentences grouped by document (documents in order of their most relevant sentence), in
    each document's own order; a sentence that leans back on the one before it brings that one along."""
    picked = {id(p) for p in chosen}
    for p in chosen:
        if leans_back(p.text):
            i = next((j for j, q in enumerate(everything) if q is p), -1)
            before = everything[i - 1] if i > 0 else None
            if before is not None and before.block == p.block and id(before) not in picked and seen.add(before.text):
                picked.add(id(before))
    rank_of_block: dict[int, int] = {}
    for i, p in enumerate(chosen):
        rank_of_block.setdefault(p.block, i)
    index = {id(p): i for i, p in enumerate(everything)}
    kept = [p for p in everything if id(p) in picked]
    kept.sort(key=lambda p: (rank_of_block.get(p.block, len(chosen)), index[id(p)]))
    return kept


def _topic(conv: Conversation) -> str:
    for pattern in (r"overall topic\s*:?\s*\n*\s*(.+)", r"finishing a report on\s+(.+)", r"report on\s+(.+)"):
        m = re.search(pattern, conv.system, re.I)
        if m and m.group(1).strip():
            return m.group(1).strip().rstrip(".:")
    return phrase(conv.system, 8)


@dataclass
class MemoPlan:
    """Which sentences of each memo go where. The report body, introduction and conclusion are separate
    requests over the same memos; splitting each memo's sentences the same way every time keeps any
    sentence from appearing twice in the assembled report."""

    titles: list[str]
    intro: list[Passage]
    body: list[list[Passage]]
    closing: list[Passage]
    numbering: dict[str, int] | None  # the memos' shared citation numbers, if they agree


def plan_memos(text: str) -> MemoPlan:
    memos = [(t, b) for t, b in split_sections(text) if t.lower() not in ("introduction", "conclusion", "insights")]
    seen = Seen()
    plan = MemoPlan([], [], [], [], _shared_numbering([b for _, b in memos]))
    for title, body in memos:
        groups = units(distinct(parse(body).passages, seen))  # in the memo's own order: its lead comes first
        mine = [p for g in groups for p in g]
        plan.titles.append(title)
        singles = [i for i, g in enumerate(groups) if len(g) == 1 and not leans_back(g[0].text)]
        lead = singles[0] if len(groups) >= 2 and singles else None
        if lead is not None:
            plan.intro.append(groups[lead][0])
        rest = [g for i, g in enumerate(groups) if i != lead]
        closing = None
        if len(rest) >= 2:  # the conclusion recaps with a sentence that the body does not use
            later = [i for i in range(1, len(rest)) if len(rest[i]) == 1 and not leans_back(rest[i][0].text)]
            closing = min(later, key=lambda i: (abs(i - 3), i)) if later else None
        if closing is not None:
            plan.closing.append(rest[closing][0])
        chosen: list[Passage] = []
        for i, g in enumerate(rest):
            if i != closing and (not chosen or len(chosen) + len(g) <= 4):
                chosen.extend(g)
        # every source the memo cites is cited in the report body (the introduction and conclusion are
        # cut to length): the body takes a sentence of any its other sentences leave out
        used = {id(p) for p in chosen} | {id(p) for p in plan.intro} | {id(p) for p in plan.closing}
        cited = {s for p in chosen for s in p.sources}
        for g in rest:
            for p in g:
                if id(p) not in used and p.sources and not set(p.sources) <= cited:
                    chosen.extend(g)
                    used |= {id(q) for q in g}
                    cited |= {s for q in g for s in q.sources}
                    break
        for lst in (plan.intro, plan.closing):  # a source only the lead or the recap cites moves to the body
            for p in [q for q in lst if q in mine and q.sources and not set(q.sources) <= cited]:
                lst.remove(p)
                chosen.append(p)
                cited |= set(p.sources)
        plan.body.append(chosen)
    return plan


def _shared_numbering(bodies: list[str]) -> dict[str, int] | None:
    """label -> number when every memo numbers its sources the same way (one numbering for the report)."""
    by_label: dict[str, int] = {}
    by_number: dict[int, str] = {}
    for body in bodies:
        for n, label in _listed_sources(body).items():
            if by_label.setdefault(label, n) != n or by_number.setdefault(n, label) != label:
                return None
    return by_label or None


def _listed_sources(body: str) -> dict[int, str]:
    m = re.search(r"^\s*#{0,6}\s*\**(?:sources|references)\**\s*:?\s*$", body, re.I | re.M)
    if not m:
        return {}
    out: dict[int, str] = {}
    for n, label in re.findall(r"^\s*(?:[-*]\s*)?\[(\d+)\]\s*(.+?)\s*$", body[m.end() :], re.M):
        out.setdefault(int(n), label.strip())
    return out


def _cite_as(p: Passage, numbering: dict[str, int] | None) -> str:
    if not numbering or not p.sources:
        return p.text
    marks = "".join(f"[{numbering[s]}]" for s in p.sources if s in numbering)
    if not marks:
        return p.text
    return f"{p.text[:-1]} {marks}{p.text[-1]}" if p.text[-1] in ".!?" else f"{p.text} {marks}"


def report(conv: Conversation) -> str:
    m = re.search(r"memos from your analysts[^:]*:\s*(.+)$", conv.system, re.I | re.S)
    plan = plan_memos(m.group(1) if m else conv.system)
    if not plan.titles:
        return answer(conv, sources_heading="## Sources")
    cites = Citations()
    paras = [" ".join(cites.cite(p) for p in chosen) for chosen in plan.body if chosen]
    out = "## Insights\n\n" + "\n\n".join(paras)
    listing = cites.listing("## Sources")
    return f"{out}\n\n{listing}" if listing else out


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _sections_text(conv: Conversation) -> str:
    m = re.search(r"sections to reflect on[^:]*:\s*(.+)$", conv.system, re.I | re.S)
    return m.group(1) if m else conv.all_text


_COUNT_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _lenses_sentence(topic: str, titles: list[str]) -> str:
    n = len(titles)
    count = _COUNT_WORDS[n] if n < len(_COUNT_WORDS) else str(n)
    noun = "perspective" if n == 1 else "perspectives"
    return f"This report examines {embed(topic)} from {count} {noun}: {_join([f'*{t}*' for t in titles])}."


def intro(conv: Conversation) -> str:
    topic = _topic(conv)
    plan = plan_memos(_sections_text(conv))
    title = title_case(natural_cut(topic, 14))
    parts = [_lenses_sentence(topic, plan.titles) if plan.titles else f"This report examines {embed(topic)}."]
    parts += [_cite_as(p, plan.numbering) for p in plan.intro]
    return f"# {title}\n\n## Introduction\n\n" + _cap_words(parts, 130)


def conclusion(conv: Conversation) -> str:
    topic = _topic(conv)
    plan = plan_memos(_sections_text(conv))
    parts = [_cite_as(p, plan.numbering) for p in plan.closing]
    if len(parts) < 2:
        parts.insert(0, f"This report set out to examine {embed(topic)}.")
    closing = ""
    if plan.titles:
        verb = "bear on" if is_question(topic) else "explain"
        closing = f"Taken together, {_join([f'*{t}*' for t in plan.titles])} {verb} {embed(topic)}."
    text = _cap_words(parts, 120 - len(closing.split()))
    return "## Conclusion\n\n" + (f"{text} {closing}" if closing else text)


def _cap_words(sentences: list[str], limit: int) -> str:
    out: list[str] = []
    total = 0
    for s in sentences:
        n = len(s.split())
        if len(out) >= 2 and total + n > limit:
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
