"""Analyst personas drawn from the research topic, the editorial feedback and any documents in the prompt."""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property

from .conversation import Conversation
from .documents import document_names
from .extractive import title_case
from .tokens import FILLER, STOPWORDS, stem, terms, words

_NUMBER_WORDS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "a single": 1, "a couple of": 2, "a pair of": 2,
}  # fmt: skip
_NUM = r"(\d{1,3}|" + "|".join(sorted(_NUMBER_WORDS, key=len, reverse=True)) + ")"
_NOUNS = r"(?:analysts?|personas?|themes?|experts?|perspectives?|people|interviewers?|researchers?|items?)"
_COUNT_PATTERNS = [
    re.compile(r"max_?analysts\W{0,4}" + _NUM, re.I),
    re.compile(r"(?:number of|num_?)\s*" + _NOUNS + r"\W{0,4}" + _NUM, re.I),
    re.compile(
        r"\b(?:create|generate|pick|make|produce|select|choose|propose|list|give me|need|want|build|assemble)\s+"
        r"(?:me\s+|us\s+)?(?:the\s+)?"
        r"(?:top\s+|exactly\s+|at most\s+|up to\s+|no more than\s+|a set of\s+|a team of\s+)?"
        + _NUM
        + r"\s+(?:[\w-]+\s+){0,3}?"
        + _NOUNS
        + r"\b",
        re.I,
    ),
    re.compile(r"\b(?:at most|up to|no more than|exactly|a maximum of|maximum of)\s+" + _NUM + r"\b", re.I),
    re.compile(r"\btop\s+" + _NUM + r"\b", re.I),
    re.compile(r"\b" + _NUM + r"\s+(?:distinct\s+|different\s+|unique\s+|ai\s+)?" + _NOUNS + r"\b", re.I),
]

# words of the analyst-planning prompt itself, never a theme ("Determine the most interesting themes based
# upon documents and / or feedback above")
BOILERPLATE = frozenset(
    """determine determined based upon documents document feedback editorial optionally provided guide guidance
    creation create created creating generate generated generating analyst analysts persona personas theme themes
    interesting top pick assign assigned review examine follow instructions instruction carefully research
    topic topics set task tasked above below first step steps list lists provide optional ai""".split()
)
_AFFILIATIONS = (
    "University Research Lab", "Independent Think Tank", "Industry Consortium", "Public Museum",
    "Government Standards Agency", "Field Research Station", "Global Consulting Firm", "Non-Profit Institute",
    "National Laboratory", "Trade Publication", "Independent Practitioners Guild", "Regulatory Advisory Board",
)  # fmt: skip
_FIRST = (
    "Ada", "Rahul", "Mei", "Tomas", "Amara", "Lena", "Kofi", "Sofia", "Hiroshi", "Priya",
    "Mateo", "Ingrid", "Yusuf", "Clara", "Dmitri", "Nia", "Oscar", "Leila", "Felix", "Zara",
)  # fmt: skip
_LAST = (
    "Okafor", "Lindqvist", "Chen", "Alvarez", "Nakamura", "Patel", "Moreau", "Kowalski", "Haddad", "Brennan",
    "Sato", "Mensah", "Rossi", "Novak", "Fischer", "Iyer", "Duarte", "Kim", "Osei", "Larsen",
)  # fmt: skip


# instruction words that feedback uses around its themes ("add someone from a startup perspective")
_INSTRUCTION = frozenset(
    """add adds include includes including someone somebody person persons perspective perspectives view views
    viewpoint viewpoints want wants need needs ensure make sure also plus another different least more less
    analyst analysts persona personas theme themes expert experts team member members panel consider
    cover covering angle angles represent representing voice voices background focus focused focuses focusing
    regarding around please should would could lens lenses""".split()
)
_GENERIC_CONCERNS = ("what is specific about {t}", "concrete examples of {t} in practice", "the trade-offs {t} brings")


def embed(text: str) -> str:
    """``text`` for use mid-sentence: "The benefits of X" -> "the benefits of X"; a question stays a
    question: "Can X be done?" -> 'the question "Can X be done?"'."""
    text = text.strip()
    if is_question(text):
        return f'the question "{text[0].upper() + text[1:].rstrip(".")}{"" if text.endswith("?") else "?"}"'
    if len(text) > 1 and text[0].isupper() and text[1].islower():
        return text[0].lower() + text[1:]
    return text


_AUX = r"(?:can|could|do|does|did|is|are|was|were|will|would|should|has|have|had|may|might|must)"
_QUESTION_START = re.compile(
    rf"(?i)^(?:{_AUX}|(?:what|why|which|who|whom|whose|when|where|how(?:\s+(?:much|many|far|long|often))?)\s+{_AUX})\b"
)


def is_question(text: str) -> bool:
    """A topic asked as a question ("Can eruptions be forecast?", "Why do leaves turn red"), which cannot be
    used as a noun phrase ("how X works" can)."""
    t = text.strip()
    return t.endswith("?") or bool(_QUESTION_START.match(t))


def requested_count(text: str) -> int | None:
    """How many items a prompt asks for ("max_analysts: 3", "Create 3 analysts", "at most three")."""
    for pattern in _COUNT_PATTERNS:
        for m in pattern.finditer(text):
            raw = m.group(1).lower()
            n = int(raw) if raw.isdigit() else _NUMBER_WORDS.get(raw)
            if n is not None and 1 <= n <= 100:
                return n
    return None


@dataclass(frozen=True)
class Theme:
    phrase: str  # "royal jelly and larvae", or the feedback's own words ("cost and quotas")
    role: str
    concerns: tuple[str, ...]
    words: frozenset[str]  # stemmed content words, so two themes on the same words are not both taken


@dataclass(frozen=True)
class PersonaSpec:
    name: str
    role: str
    affiliation: str
    description: str
    theme: str


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _is_content(word: str) -> bool:
    lw = word.lower()
    return not (lw in STOPWORDS or lw in FILLER or lw in _INSTRUCTION or lw in BOILERPLATE or len(lw) < 2)


def feedback_phrases(feedback: str) -> list[str]:
    """What editorial feedback asks to cover: "Add an analyst focused on cost and quotas." -> ["cost and quotas"]."""
    out: list[str] = []
    for clause in re.split(r"[.;!?\n,]+|\s(?:also|plus|but|as well as)\s", feedback):
        ws = re.findall(r"[A-Za-z0-9][A-Za-z0-9\-'/]*", clause)
        while ws and not _is_content(ws[0]):
            ws.pop(0)
        while ws and not _is_content(ws[-1]):
            ws.pop()
        phrase = " ".join(ws)
        if ws and len(ws) <= 8 and phrase.lower() not in (p.lower() for p in out):
            out.append(phrase)
    return out


def _theme_for(phrase: str) -> Theme:
    generic = tuple(c.format(t=phrase) for c in _GENERIC_CONCERNS)
    return Theme(phrase, f"{title_case(_singular(phrase))} Specialist", generic, frozenset(terms(phrase)))


def _singular(phrase: str) -> str:
    """ "cost and quotas" -> "cost and quota", "gases" -> "gas", "colonies" -> "colony" (for a role title)."""

    def one(w: str) -> str:
        if len(w) <= 4 or not w.endswith("s") or w.endswith(("ss", "us", "is")):
            return w
        if w.endswith("ies"):
            return w[:-3] + "y"
        if w.endswith(("ses", "xes", "ches", "shes", "zes")):
            return w[:-2]
        return w[:-1]

    return " ".join(one(w) for w in phrase.split())


# words that say nothing about what a document is about, however often it uses them
_WEAK = frozenset(
    """often usually sometimes later early earlier still even become became becomes found find finds take takes
    took taken give gives gave given called known made makes making several another whole part parts kind
    kinds much many more most less least first second third last next each every other others same different
    long short small large great little good best better high higher low lower half full around within without
    whose while where there here they them then than that this these those what which when would could should
    about after before under over into onto upon only also just very well back ever never always along soon
    away again enough together though although across because instead perhaps rather almost already""".split()
)


def _is_theme_word(word: str) -> bool:
    lw = word.lower()
    return len(lw) >= 4 and lw.isalpha() and _is_content(lw) and lw not in _WEAK


_VERB_BEFORE = frozenset("to can could may might must will would should cannot".split())
_DETERMINERS = frozenset("the a an this that these those its their his her each every no our your".split())


def _surface(forms: Counter[str]) -> str:
    """The spelling to show for a term: its most common form, lower-cased unless always capitalised."""
    word, _ = forms.most_common(1)[0]
    if any(c.isupper() for c in word[1:]):  # an identifier or acronym: backoffLimit, InSAR
        return word
    return word if all(f[:1].isupper() for f in forms) else word.lower()


def _scan(text: str) -> list[tuple[str, int, bool]]:
    """(word, 1 after a determiner / -1 after "to" or a modal / 0, starts a sentence) for each word."""
    out = []
    prev = ""
    for m in re.finditer(r"[A-Za-z][A-Za-z'-]*|[.!?;:\n]", text):
        w = m.group(0)
        if not w[0].isalpha():
            prev = "."
            continue
        p = prev.lower()
        out.append((w, 1 if p in _DETERMINERS else (-1 if p in _VERB_BEFORE else 0), prev in ("", ".")))
        prev = w
    return out


@dataclass(frozen=True)
class _DocSubject:
    source: str
    subject: str  # what the document is about, as a phrase ("scout bees and the new home")
    nouns: tuple[str, ...]  # its distinctive things as noun phrases ("the quorum", "scouts"), best first
    vector: dict[str, float]  # tf-idf over stemmed theme words, unit length


def _document_subjects(passages: list[tuple[str, str]], avoid: set[str], names: dict[str, str]) -> list[_DocSubject]:
    """Per document (in the order given): what it calls itself (its title or file name), else its two most
    distinctive things; and its distinctive things as noun phrases (words seen after a determiner and
    never after "to" or a modal), each with "the" when the text mostly says "the ..."."""
    texts: dict[str, list[str]] = {}
    for source, text in passages:
        texts.setdefault(source, []).append(text)
    counts: dict[str, Counter[str]] = {}
    forms: dict[str, Counter[str]] = {}
    after_the: Counter[str] = Counter()
    nounish: Counter[str] = Counter()
    verbish: Counter[str] = Counter()
    heads: Counter[str] = Counter()  # ends a noun phrase: not followed by another content word
    for source, parts in texts.items():
        c: Counter[str] = Counter()
        prev = ""
        scanned = _scan(" ".join(parts))
        ends = _phrase_ends(" ".join(parts))
        for k, (w, before, start) in enumerate(scanned):
            if _is_theme_word(w) and stem(w) not in avoid and not re.search(r"(?:ly|ing|ed)$", w.lower()):
                st = stem(w)
                c[st] += 1
                forms.setdefault(st, Counter())[w if not start else w.lower()] += 1
                nounish[st] += before > 0
                verbish[st] += before < 0
                after_the[st] += prev.lower() == "the"
                heads[st] += ends[k]
            prev = w
        counts[source] = c
    df = Counter(t for c in counts.values() for t in c)
    n = len(counts)

    def counts_of(t: str) -> list[int]:
        return [c[t] for c in counts.values()]

    out: list[_DocSubject] = []
    for source, c in counts.items():
        weight = {t: f * math.log((n + 1) / df[t]) + 0.01 * f for t, f in c.items()}
        norm = math.sqrt(sum(v * v for v in weight.values())) or 1.0
        ranked = sorted(c, key=lambda t: -weight[t])
        things = [
            t
            for t in ranked
            if not verbish[t]
            and c[t] >= 2
            and not _ADJECTIVE.search(_surface(forms[t]).lower())
            and nounish[t] >= 2
            and nounish[t] * 4 >= sum(counts_of(t))  # mostly a thing: "the quorum", "a cavity"
            and heads[t] * 3 >= 2 * sum(counts_of(t))  # that ends its phrase, not a modifier ("thin debris")
        ]
        plain = [t for t in ranked if not verbish[t] and not _ADJECTIVE.search(_surface(forms[t]).lower())]
        # a short document repeats little: a thing seen once after a determiner, ending its phrase
        things = (
            things
            or [t for t in plain if after_the[t] and heads[t] * 3 >= 2 * sum(counts_of(t)) and not t.endswith("st")][:2]
        )
        nouns = tuple(("the " if after_the[t] * 2 >= nounish[t] else "") + _surface(forms[t]) for t in things[:6])
        subject = names.get(source, "")
        if not subject:
            bare = [_surface(forms[t]) for t in (things or plain)[:2]]
            subject = " and ".join(bare) if bare else source
        out.append(_DocSubject(source, subject, nouns, {t: v / norm for t, v in weight.items()}))
    return out


# endings of adjectives, never things ("central", "recent", "poorer", "volcanic")
_ADJECTIVE = re.compile(r"(?:al|ous|ive|ful|less|able|ible|ent|ant|est|ic|ier|orer|act)$")


def _phrase_ends(text: str) -> list[bool]:
    """For each word ``_scan`` yields: whether it ends a phrase (what follows is punctuation, the end, or a
    function word), as a noun does and a modifier ("thin debris", "virgin queen") does not."""
    tokens = re.findall(r"[A-Za-z][A-Za-z'-]*|[^\sA-Za-z]", text)
    out: list[bool] = []
    for i, t in enumerate(tokens):
        if not t[0].isalpha():
            continue
        nxt = tokens[i + 1] if i + 1 < len(tokens) else "."
        out.append(not nxt[0].isalpha() or nxt.lower() in STOPWORDS or nxt.lower() in FILLER)
    return out


def _cosine(a: dict[str, float], b: dict[str, float]) -> float:
    return sum(v * b.get(t, 0.0) for t, v in a.items())


def _group(subjects: list[_DocSubject], slots: int) -> list[list[_DocSubject]]:
    """``subjects`` in at most ``slots`` groups of related documents (most similar pairs merged first, no
    group over ceil(documents / slots)), every document in one; groups in the documents' order."""
    groups = [[d] for d in subjects]
    cap = math.ceil(len(subjects) / max(1, slots))
    while len(groups) > slots:
        best: tuple[float, int, int] | None = None
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                if len(groups[i]) + len(groups[j]) > cap:
                    continue
                sim = sum(_cosine(a.vector, b.vector) for a in groups[i] for b in groups[j])
                sim /= len(groups[i]) * len(groups[j])
                if best is None or sim > best[0]:
                    best = (sim, i, j)
        if best is None:  # only possible with uneven leftovers: merge the two smallest
            i, j = sorted(sorted(range(len(groups)), key=lambda k: len(groups[k]))[:2])
        else:
            _, i, j = best
        groups[i] = groups[i] + groups[j]
        del groups[j]
    return groups


def _series(items: list[str]) -> str:
    """ "a", "a and b", "a, b, as well as c": subjects may hold an "and" of their own."""
    if len(items) <= 1:
        return "".join(items)
    if len(items) == 2 and not any(" and " in i for i in items):
        return f"{items[0]} and {items[1]}"
    return ", ".join(items[:-1]) + ", as well as " + items[-1]


def document_group_themes(
    passages: list[tuple[str, str]], avoid: set[str], names: dict[str, str], slots: int
) -> list[Theme]:
    """Themes that together cover every document of the prompt: the documents in at most ``slots`` groups of
    related ones, each theme naming its documents' subjects in their own words, its concerns asking about
    the distinctive things of each of them in turn (so the interview's questions reach every document)."""
    subjects = _document_subjects(passages, avoid, names)
    if not subjects or slots < 1:
        return []
    themes: list[Theme] = []
    for group in _group(subjects, slots):
        phrase = _series([embed(d.subject) for d in group])
        lead = embed(group[0].subject)
        role = f"Specialist in {lead}"
        nouns = [n for k in range(6) for d in group for n in d.nouns[k : k + 1]]  # each document in turn
        nouns = list(dict.fromkeys(nouns))
        concerns: list[str] = []
        if len(nouns) >= 2:
            concerns.append(f"what the sources say about {nouns[0]} and {nouns[1]}")
        if len(nouns) >= 4:
            concerns.append(f"the link between {nouns[2]} and {nouns[3]}")
        if len(nouns) >= 5:
            concerns.append(f"the importance of {nouns[4]}")
        if len(concerns) < 2 and len(nouns) >= 3:
            concerns.append(f"the importance of {nouns[2]}")
        concerns += [c.format(t=lead) for c in _GENERIC_CONCERNS][: 3 - len(concerns)]
        words = frozenset(t for d in group for t in sorted(d.vector, key=lambda t: -d.vector[t])[:2])
        themes.append(Theme(phrase, role, tuple(concerns[:3]), words))
    return themes


# domain-neutral angles on a subject, for when the prompt carries no documents: each names the subject's
# own words, so the questions (and the searches they lead to) stay on the topic
_ANGLES = (
    ("how {k} works", "{K} Specialist",
     ("which steps {k} involves", "what {k} depends on", "where {k} most often goes wrong")),
    ("the history of {k}", "{K} Historian",
     ("how {k} began", "how {k} changed over time", "which earlier practices still shape {k}")),
    ("the people and practice of {k}", "{K} Practitioner",
     ("who takes part in {k}", "which skills {k} demands", "what practitioners of {k} disagree about")),
    ("variation in {k}", "Comparative {K} Analyst",
     ("which kinds of {k} exist", "how the kinds of {k} differ", "what explains those differences")),
    ("problems and open questions in {k}", "{K} Critic",
     ("which problems {k} faces", "what is still unknown about {k}", "what would change our view of {k}")),
)  # fmt: skip


def topic_themes(topic: str) -> list[Theme]:
    """Themes from the topic's own words: each content word of the topic (in order) seen from a different
    angle, so analysts stay distinct even for a topic of two words."""
    keys: list[str] = []
    for run in re.split(r"[^A-Za-z0-9'\- ]+", topic):
        ws: list[str] = []
        for w in run.split() + [""]:
            if w and _is_content(w) and len(w) > 2 and w.lower() not in _WEAK:
                ws.append(w)
                continue
            if ws:
                keys.append(" ".join(ws[-3:]))
            ws = []
    keys = list(dict.fromkeys(keys))
    if not keys:
        keys = [topic]
    out: list[Theme] = []
    for i, (phrase, role, concerns) in enumerate(_ANGLES):
        k = keys[i % len(keys)]
        k = " ".join(
            w if w.isupper() or (w[:1].isupper() and not topic.startswith(w)) else w.lower() for w in k.split()
        )
        fill = {"k": k, "K": title_case(k)}
        out.append(
            Theme(
                phrase.format(**fill),
                role.format(**fill),
                tuple(c.format(**fill) for c in concerns),
                frozenset({f"angle{i}"}),
            )
        )
    return out


def clean_topic(text: str) -> str:
    """The subject of a request line: "Create 4 analysts to study edge computing." -> "edge computing"."""
    t = re.split(r"(?<=[a-z0-9])[.!?](?:\s|$)", text.strip(), maxsplit=1)[0].strip()
    m = re.match(
        r"(?i)^(?:please\s+)?(?:create|generate|suggest|propose|make|build|list|give me|pick|plan)\b.*?"
        r"\b(?:to study|to research|to investigate|to cover|for|on|about)\s+(.+)$",
        t,
    )
    if m:
        t = m.group(1)
    t = re.sub(r"(?i),?\s*(?:at most|up to|no more than|exactly|with)\b.*$", "", t)
    return t.strip().rstrip(".:") or text.strip()


class PersonaPlanner:
    def __init__(self, conv: Conversation) -> None:
        self.conv = conv

    @cached_property
    def topic(self) -> str:
        for pattern in (r"research topic", r"topic"):
            found = self.conv.text_after(pattern)
            if found:
                return clean_topic(found.splitlines()[0])
        last = self.conv.last_user_text.strip()
        return clean_topic(last.splitlines()[0]) if last else "the research topic"

    @cached_property
    def feedback(self) -> str:
        """The editorial feedback: the text under "...feedback...:" up to the next numbered instruction."""
        m = re.search(r"feedback[^:\n]*:[ \t]*\n?(.*?)(?=^\s*\d+\.\s|\Z)", self.conv.all_text, re.I | re.S | re.M)
        found = m.group(1).strip() if m else ""
        lines = [ln for ln in found.splitlines() if any(_is_content(w) for w in re.findall(r"[A-Za-z]+", ln))]
        found = "\n".join(lines).strip()
        return "" if found.lower().startswith(("none", "n/a", "no feedback", "approve")) else found

    @cached_property
    def themes(self) -> list[Theme]:
        return self.themes_for(None)

    def themes_for(self, n: int | None) -> list[Theme]:
        """Distinct themes, most specific first: what the feedback asks for; the documents in the prompt,
        in as many groups of related ones as analysts remain (``n``; None: one theme per document), so the
        panel together covers every document; then the topic's own words seen from different angles."""
        out: list[Theme] = []

        def take(theme: Theme) -> None:
            if any(t.phrase.lower() == theme.phrase.lower() or t.role == theme.role for t in out):
                return
            if theme.words and any(theme.words <= t.words for t in out):
                return
            out.append(theme)

        for phrase in feedback_phrases(self.feedback):
            take(_theme_for(phrase))
        passages = [(p.sources[0], p.text) for p in self.conv.sourced.passages if p.sources]
        avoid = {stem(w) for w in words(self.topic)}
        slots = len({src for src, _ in passages}) if n is None else n - len(out)
        for theme in document_group_themes(passages, avoid, document_names(self.conv.all_text), slots):
            take(theme)
        for theme in topic_themes(self.topic):
            take(theme)
        return out

    def plan(self, n: int) -> list[PersonaSpec]:
        seed = _digest(self.topic + "\n" + self.feedback)
        themes = self.themes_for(n)
        out: list[PersonaSpec] = []
        for i in range(n):
            theme = themes[i % len(themes)]
            role, phrase = theme.role, theme.phrase
            if i >= len(themes):  # more analysts than themes: a second pass with a different angle
                role, phrase = f"Senior {role}", f"{phrase} (second perspective)"
            concerns = theme.concerns[(i // len(themes)) % len(theme.concerns) :] + theme.concerns
            concerns = tuple(dict.fromkeys(concerns))[:3]
            # ", in" sets the topic apart from a subject that has an "in" of its own
            description = (
                f"Focuses on {embed(phrase)}, in {embed(self.topic)}. Wants to know {_join(list(concerns), ';')}."
            )
            name = f"{_FIRST[(seed + 7 * i) % len(_FIRST)]} {_LAST[(seed // 7 + 11 * i) % len(_LAST)]}"
            affiliation = _AFFILIATIONS[(seed // 13 + 5 * i) % len(_AFFILIATIONS)]
            out.append(PersonaSpec(name, role, affiliation, description, phrase))
        return out


def _join(items: list[str], sep: str = ",") -> str:
    if len(items) <= 2:
        return " and ".join(items)
    return f"{sep} ".join(items[:-1]) + f"{sep} and " + items[-1]
