"""Analyst personas drawn from the research topic, the editorial feedback and any documents in the prompt."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property

from .conversation import Conversation
from .extractive import title_case
from .tokens import FILLER, STOPWORDS

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
        + _NUM + r"\s+(?:[\w-]+\s+){0,3}?" + _NOUNS + r"\b",
        re.I,
    ),
    re.compile(r"\b(?:at most|up to|no more than|exactly|a maximum of|maximum of)\s+" + _NUM + r"\b", re.I),
    re.compile(r"\btop\s+" + _NUM + r"\b", re.I),
    re.compile(r"\b" + _NUM + r"\s+(?:distinct\s+|different\s+|unique\s+|ai\s+)?" + _NOUNS + r"\b", re.I),
]

@dataclass(frozen=True)
class Lens:
    """A research angle: the words that call for it, the theme it covers, who covers it and what they ask."""

    key: str
    words: str  # regex over lower-case words (whole words)
    theme: str
    role: str
    concerns: tuple[str, str, str]


# generic research angles; a topic, feedback or document word that matches ``words`` calls for the lens
LENSES = (
    Lens("scheduling", r"runs?|running|ran|execut\w*|schedul\w*|orchestrat\w*|dispatch\w*|placement|plac(?:e|es|ed|ing)"
         r"|queue\w*|queuing|priorit\w*|preempt\w*|admission|admit\w*",
         "scheduling and placement", "Scheduler Engineer",
         ("how work is queued, placed and started", "which work runs first when capacity is short and what gets "
          "preempted", "why work stays pending and what unblocks it")),
    Lens("quota", r"limits?|limiting|limited|quotas?|caps?|capp\w*|throttl\w*|fair\w*|shar(?:e|es|ed|ing)|constrain\w*"
         r"|restrict\w*|allocat\w*|reserv\w*|requests?",
         "resource quotas and fair sharing", "Quota and Fairness Analyst",
         ("how quotas and limits cap what each tenant may consume", "what happens to work that exceeds its limits "
          "or does not fit the quota", "how capacity is shared fairly between teams")),
    Lens("cost", r"costs?|costly|pric\w*|econom\w*|spend\w*|billing|budgets?|financ\w*|savings?|cheap\w*|expens\w*"
         r"|money|roi|tokens?",
         "cost and efficiency", "Cost Economist",
         ("what drives the cost", "where capacity or money is wasted on idle or failed work",
          "which settings trade cost against speed")),
    Lens("reliability", r"fail\w*|retr(?:y|ies|ied|ying)|reliab\w*|resilien\w*|recover\w*|outages?|crash\w*|faults?"
         r"|errors?|backoff|disrupt\w*|evict\w*|robust\w*",
         "failures and retries", "Reliability Engineer",
         ("how failures are detected and retried", "which failures should stop the work instead of being retried",
          "how disruptions are told apart from genuine errors")),
    Lens("performance", r"perform\w*|scal(?:e|es|ing|able|ability)|latency|throughput|speed\w*|fast\w*|slow\w*"
         r"|bottleneck\w*|benchmark\w*",
         "performance and scalability", "Performance Engineer",
         ("what limits throughput and latency", "how the system behaves as the load grows",
          "which tuning choices matter most")),
    Lens("security", r"secur\w*|attack\w*|threats?|privacy|vulnerab\w*|isolat\w*|trust\w*|permissions?|access"
         r"|authori[sz]\w*|authenticat\w*|tenan\w*",
         "security and isolation", "Security Researcher",
         ("how workloads are isolated from each other", "which permissions and boundaries matter",
          "what can go wrong when isolation fails")),
    Lens("data", r"data|datasets?|storage|stor(?:e|es|ed)|databases?|persist\w*|checkpoint\w*|state|stateful|cache\w*",
         "data and state", "Data Engineer",
         ("where state and data live while work runs", "how progress survives restarts",
          "what it costs to move and keep the data")),
    Lens("operations", r"operat\w*|adopt\w*|practi\w*|workflows?|teams?|users?|usab\w*|deploy\w*|monitor\w*"
         r"|observ\w*|debug\w*|maintain\w*|cleanup|clean",
         "day-to-day operations", "Platform Operations Lead",
         ("what operators have to configure and watch", "which mistakes are common in practice",
          "how problems are diagnosed and cleaned up")),
    Lens("architecture", r"architect\w*|design\w*|mechanisms?|internals?|components?|controllers?|models?|api|apis",
         "architecture and mechanisms", "Systems Architect",
         ("which components are involved and how they interact", "what the key design decisions are",
          "where the design reaches its limits")),
    Lens("policy", r"polic(?:y|ies)|regulat\w*|govern\w*|laws?|legal\w*|complian\w*|standards?|rules?",
         "governance and policy", "Policy Analyst",
         ("which rules and policies apply", "who sets them and how they are enforced", "where the rules fall short")),
    Lens("future", r"future|trends?|roadmaps?|strateg\w*|innovat\w*|evol\w*|emerging|next",
         "future directions", "Technology Strategist",
         ("where the field is heading", "which open problems remain", "what would change the picture")),
    Lens("ethics", r"ethic\w*|bias\w*|equit\w*|justice|harms?|social|societ\w*",
         "ethics and social impact", "Ethics Researcher",
         ("who benefits and who is harmed", "which biases or inequities appear", "what safeguards exist")),
    Lens("environment", r"energy|carbon|climate|environment\w*|emissions?|power|sustainab\w*|green",
         "environmental footprint", "Sustainability Analyst",
         ("how much energy and hardware the work consumes", "how the footprint can be reduced",
          "what the trade-offs with speed and cost are")),
    Lens("education", r"learn\w*|educat\w*|skills?|teach\w*|training|students?|curricul\w*",
         "skills and learning", "Learning Scientist",
         ("which skills people need", "how people learn it in practice", "where newcomers struggle")),
)  # fmt: skip
_LENS_RE = [(lens, re.compile(rf"^(?:{lens.words})$")) for lens in LENSES]
# when the prompt calls for fewer lenses than analysts: the broadly useful ones first
_FALLBACK_ORDER = ("reliability", "cost", "performance", "operations", "architecture", "security", "data",
                   "policy", "future", "ethics", "environment", "education", "scheduling", "quota")  # fmt: skip

# words of the analyst-planning prompt itself, never a theme ("Determine the most interesting themes based
# upon documents and / or feedback above")
BOILERPLATE = frozenset(
    """determine determined based upon documents document feedback editorial optionally provided guide guidance
    creation create created creating generate generated generating analyst analysts persona personas theme themes
    interesting top pick assign assigned review examine follow instructions instruction carefully research
    topic topics set task tasked above below first step steps list lists provide optional ai""".split()
)
_AFFILIATIONS = (
    "University Research Lab", "Independent Think Tank", "Industry Consortium", "Open-Source Foundation",
    "Government Standards Agency", "Venture-Backed Startup", "Global Consulting Firm", "Non-Profit Institute",
    "National Laboratory", "Trade Publication", "Enterprise Platform Team", "Regulatory Advisory Board",
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
    """``text`` for use mid-sentence: "The benefits of X" -> "the benefits of X"."""
    if len(text) > 1 and text[0].isupper() and text[1].islower():
        return text[0].lower() + text[1:]
    return text


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
    phrase: str  # "resource quotas and fair sharing", or the feedback's own words ("cost and quotas")
    role: str
    concerns: tuple[str, ...]
    lenses: frozenset[str]


@dataclass(frozen=True)
class PersonaSpec:
    name: str
    role: str
    affiliation: str
    description: str
    theme: str


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def lenses_in(text: str) -> list[Lens]:
    """The lenses ``text`` calls for, in order of first mention."""
    out: list[Lens] = []
    for w in re.findall(r"[a-z][a-z\-']*", text.lower()):
        for lens, pattern in _LENS_RE:
            if lens not in out and pattern.match(w):
                out.append(lens)
                break
    return out


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
    found = lenses_in(phrase)
    keys = frozenset(lens.key for lens in found)
    if len(found) == 1:
        return Theme(phrase, found[0].role, found[0].concerns, keys)
    if found:  # one concern of each lens the phrase names, then the rest
        concerns = [c for i in range(3) for lens in found for c in lens.concerns[i : i + 1]]
        return Theme(phrase, f"{title_case(_singular(phrase))} Analyst", tuple(concerns[:3]), keys)
    generic = tuple(c.format(t=phrase) for c in _GENERIC_CONCERNS)
    return Theme(phrase, f"{title_case(phrase)} Specialist", generic, keys)


def _singular(phrase: str) -> str:
    """"cost and quotas" -> "cost and quota" (for a role title)."""
    return " ".join(w[:-1] if len(w) > 4 and w.endswith("s") and not w.endswith("ss") else w for w in phrase.split())


def _lens_theme(lens: Lens) -> Theme:
    return Theme(lens.theme, lens.role, lens.concerns, frozenset({lens.key}))


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
        """Distinct themes, most specific first: what the feedback asks for, the angles the topic's own words
        call for ("runs" -> scheduling, "limits" -> quotas), angles the documents dwell on, then broad lenses."""
        out: list[Theme] = []
        covered: set[str] = set()

        def take(theme: Theme) -> None:
            if theme.lenses and theme.lenses <= covered:
                return
            if any(t.phrase.lower() == theme.phrase.lower() or t.role == theme.role for t in out):
                return
            out.append(theme)
            covered.update(theme.lenses)

        for phrase in feedback_phrases(self.feedback):
            take(_theme_for(phrase))
        topic_lenses = lenses_in(self.topic)
        for lens in topic_lenses:
            take(_lens_theme(lens))
        documents = " ".join(p.text for p in self.conv.sourced.passages if p.sources)
        counts: Counter[str] = Counter()
        for w in re.findall(r"[a-z][a-z\-']*", documents.lower()):
            for lens, pattern in _LENS_RE:
                if pattern.match(w):
                    counts[lens.key] += 1
                    break
        by_key = {lens.key: lens for lens in LENSES}
        for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], _FALLBACK_ORDER.index(kv[0]))):
            if n >= 2:
                take(_lens_theme(by_key[key]))
        technical = {"scheduling", "quota", "reliability", "performance", "security", "data", "architecture"}
        if covered & technical or counts.keys() & technical:
            order = list(_FALLBACK_ORDER)
        else:  # a non-technical topic: the broad social and economic lenses first
            order = ["cost", "policy", "future", "ethics", "operations", "environment", "education"]
            order += [k for k in _FALLBACK_ORDER if k not in order]
        for key in order:
            take(_lens_theme(by_key[key]))
        return out

    def plan(self, n: int) -> list[PersonaSpec]:
        seed = _digest(self.topic + "\n" + self.feedback)
        themes = self.themes
        out: list[PersonaSpec] = []
        for i in range(n):
            theme = themes[i % len(themes)]
            role, phrase = theme.role, theme.phrase
            if i >= len(themes):  # more analysts than lenses: a second pass with a different angle
                role, phrase = f"Senior {role}", f"{phrase} (second perspective)"
            concerns = theme.concerns[(i // len(themes)) % len(theme.concerns) :] + theme.concerns
            concerns = tuple(dict.fromkeys(concerns))[:3]
            description = (
                f"Focuses on {embed(phrase)} in {embed(self.topic)}. "
                f"Wants to know {_join(list(concerns), ';')}."
            )
            name = f"{_FIRST[(seed + 7 * i) % len(_FIRST)]} {_LAST[(seed // 7 + 11 * i) % len(_LAST)]}"
            affiliation = _AFFILIATIONS[(seed // 13 + 5 * i) % len(_AFFILIATIONS)]
            out.append(PersonaSpec(name, role, affiliation, description, phrase))
        return out


def _join(items: list[str], sep: str = ",") -> str:
    if len(items) <= 2:
        return " and ".join(items)
    return f"{sep} ".join(items[:-1]) + f"{sep} and " + items[-1]
