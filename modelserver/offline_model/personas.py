"""Analyst personas drawn from the research topic, the editorial feedback and any documents in the prompt."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property

from .conversation import Conversation
from .extractive import rank, title_case
from .tokens import FILLER, STOPWORDS, stem

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

_LENSES = (
    ("technical foundations", "Research Scientist"),
    ("real-world adoption", "Industry Analyst"),
    ("risks and limitations", "Risk Analyst"),
    ("economic impact", "Economist"),
    ("governance and policy", "Policy Analyst"),
    ("future directions", "Technology Strategist"),
    ("user experience", "UX Researcher"),
    ("performance and scalability", "Systems Engineer"),
    ("ethics and fairness", "Ethics Researcher"),
    ("security", "Security Researcher"),
    ("education and skills", "Learning Scientist"),
    ("environmental footprint", "Sustainability Analyst"),
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
    cover covering angle angles represent representing voice voices background""".split()
)


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
class PersonaSpec:
    name: str
    role: str
    affiliation: str
    description: str
    theme: str


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _chunks(text: str) -> list[tuple[str, ...]]:
    """Runs of up to three consecutive content words, not crossing punctuation."""
    out: list[tuple[str, ...]] = []
    run: list[str] = []
    for tok in re.findall(r"[A-Za-z][A-Za-z0-9\-']*|[^\sA-Za-z]", text):
        lw = tok.lower()
        if re.fullmatch(r"[A-Za-z][A-Za-z0-9\-']*", tok) and lw not in STOPWORDS and lw not in FILLER and len(lw) > 2 \
            and lw not in _INSTRUCTION:
            run.append(tok)
            continue
        if run:
            out.extend(_windows(run))
        run = []
    if run:
        out.extend(_windows(run))
    return out


def _windows(run: list[str]) -> list[tuple[str, ...]]:
    if len(run) <= 3:
        return [tuple(run)]
    return [tuple(run[i : i + 3]) for i in range(len(run) - 2)]


class PersonaPlanner:
    def __init__(self, conv: Conversation) -> None:
        self.conv = conv

    @cached_property
    def topic(self) -> str:
        for pattern in (r"research topic", r"topic"):
            found = self.conv.text_after(pattern)
            if found:
                return found.splitlines()[0].strip().rstrip(".")
        last = self.conv.last_user_text.strip()
        return (last.splitlines()[0] if last else "the research topic").strip().rstrip(".")

    @cached_property
    def feedback(self) -> str:
        found = self.conv.text_after(r"feedback[^:\n]*:", self.conv.all_text)
        return "" if found.lower().startswith(("none", "n/a", "no feedback")) else found

    @cached_property
    def themes(self) -> list[str]:
        """Distinct themes: phrases from feedback and documents that the topic does not already say."""
        topic_stems = {stem(w) for w in re.findall(r"[A-Za-z]+", self.topic.lower())}
        scores: Counter[tuple[str, ...]] = Counter()
        spelling: dict[tuple[str, ...], str] = {}
        sources = [(self.feedback, 3.0)] + [(p.text, 1.0) for p in self.conv.sourced.passages if p.sources]
        for text, weight in sources:
            for chunk in _chunks(text):
                key = tuple(stem(w.lower()) for w in chunk)
                if set(key) <= topic_stems:
                    continue
                scores[key] += weight * (1 + 0.5 * (len(key) - 1))  # type: ignore[assignment]
                spelling.setdefault(key, " ".join(chunk))
        chosen: list[tuple[str, ...]] = []
        for key, _ in sorted(scores.items(), key=lambda kv: (-kv[1], list(spelling).index(kv[0]))):
            if any(set(key) & set(c) for c in chosen):
                continue
            chosen.append(key)
        return [spelling[k] for k in chosen]

    def plan(self, n: int) -> list[PersonaSpec]:
        seed = _digest(self.topic + "\n" + self.feedback)
        out: list[PersonaSpec] = []
        themes = self.themes
        lens_start = seed % len(_LENSES)
        for i in range(n):
            if i < len(themes):
                theme = themes[i]
                role = f"{title_case(theme)} Specialist"
                focus = f"{theme} in {embed(self.topic)}"
            else:
                lens, role = _LENSES[(lens_start + i - len(themes)) % len(_LENSES)]
                if i - len(themes) >= len(_LENSES):
                    lens = f"{lens} (part {(i - len(themes)) // len(_LENSES) + 1})"
                theme = lens
                focus = f"the {lens} of {embed(self.topic)}"
            documents = [p for p in self.conv.sourced.passages if p.sources]
            evidence = rank(f"{theme} {theme} {self.topic}", documents, k=1)
            description = f"Focuses on {focus}."
            if evidence:
                description += f" Starting point: {evidence[0].text}"
            else:
                description += f" Looks for specific, non-obvious evidence about {theme} and what it changes."
            name = f"{_FIRST[(seed + 7 * i) % len(_FIRST)]} {_LAST[(seed // 7 + 11 * i) % len(_LAST)]}"
            affiliation = _AFFILIATIONS[(seed // 13 + 5 * i) % len(_AFFILIATIONS)]
            out.append(PersonaSpec(name, role, affiliation, description, theme))
        return out
