"""A read-only view of a chat request's messages, with the lookups the writers share."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from .documents import Corpus, parse_all, unescape_repr
from .tokens import content_text

_DOCUMENT_BLOCK = re.compile(r"<Document\b[^>]*?/?>(?:(?!<Document\b).)*?</Document>", re.S)
_INSTRUCTING = re.compile(
    r"\byou are (?:an?|the)\b|\byour (?:task|job|goal|role)\b|\byou(?:r)? (?:job|goal|will be given)\b"
    r"|\bfollow (?:these|the) instructions\b",
    re.I,
)
_PERSONA_FIELD = re.compile(r"(?:^|(?<=: ))\s*(Name|Role|Affiliation|Description)\s*:\s*(.+?)\s*$", re.I | re.M)


@dataclass(frozen=True)
class Message:
    role: str
    text: str
    name: str = ""


@dataclass(frozen=True)
class Persona:
    name: str
    role: str
    affiliation: str
    description: str


# A reviewer's notes on an earlier draft (the research worker's rewrite after a missed quality floor):
# what to leave out, never material to quote, so the extractive writers do not read it.
_FEEDBACK = re.compile(r"\s*<feedback>.*?(?:</feedback>|\Z)", re.S | re.I)


class Conversation:
    def __init__(self, messages: Sequence[dict[str, Any]]) -> None:
        self.messages = [
            Message(
                role=str(m.get("role", "user")),
                text=_FEEDBACK.sub("", content_text(m.get("content"))),
                name=str(m.get("name") or ""),
            )
            for m in messages
        ]

    @cached_property
    def _instructions_in_user_turn(self) -> bool:
        """Whether the instructions came as the first user message (no system message): LangChain turns a
        bare string in ``llm.invoke([instructions, HumanMessage(...)])`` into a user message, as the
        LangChain Academy research assistant does for its introduction and conclusion."""
        system = [m for m in self.messages if m.role in ("system", "developer")]
        if sum(len(m.text.split()) for m in system) >= 25:  # the system message instructs
            return False
        first = next((m for m in self.messages if m.role not in ("system", "developer")), None)
        return (
            first is not None
            and first.role == "user"
            and len(first.text.split()) >= 25
            and bool(_INSTRUCTING.search(first.text))
        )

    @cached_property
    def _first_turn(self) -> Message | None:
        return next((m for m in self.messages if m.role not in ("system", "developer")), None)

    @cached_property
    def system(self) -> str:
        text = "\n\n".join(m.text for m in self.messages if m.role in ("system", "developer"))
        if self._instructions_in_user_turn and self._first_turn is not None:
            return f"{text}\n\n{self._first_turn.text}".strip()
        return text

    @cached_property
    def turns(self) -> list[Message]:
        turns = [m for m in self.messages if m.role not in ("system", "developer")]
        if self._instructions_in_user_turn and len(turns) > 1:
            return turns[1:]
        return turns

    @cached_property
    def all_text(self) -> str:
        return "\n\n".join(m.text for m in self.messages)

    @cached_property
    def lower(self) -> str:
        return self.all_text.lower()

    def last(self, *roles: str) -> Message | None:
        for m in reversed(self.turns):
            if m.role in roles:
                return m
        return None

    @cached_property
    def last_user_text(self) -> str:
        m = self.last("user")
        return m.text if m else ""

    @cached_property
    def question(self) -> str:
        """The question being asked: the last user turn's question (or, in an interview seen from the
        expert's side, the last turn that is not the expert's own)."""
        for m in reversed(self.turns):
            if m.name == "expert" or m.role in ("tool", "function") or not m.text.strip():
                continue
            return split_question(m.text)[0]
        return split_question(self.system)[0] if self.system else ""

    @cached_property
    def corpus(self) -> Corpus:
        """Every passage of context in the conversation except the question itself."""
        texts = []
        question = self.question
        for m in self.messages:
            text = m.text
            if question and question in text:
                text = text.replace(question, " ")
            texts.append(text)
        return parse_all(texts)

    @cached_property
    def sourced(self) -> Corpus:
        """The corpus restricted to passages that came from a named source, if there are any."""
        corpus = self.corpus
        if any(p.sources for p in corpus.passages):
            return Corpus([p for p in corpus.passages if p.sources], list(corpus.sources))
        return corpus

    @cached_property
    def instruction_messages(self) -> list[Message]:
        system = [m for m in self.messages if m.role in ("system", "developer")]
        if self._instructions_in_user_turn and self._first_turn is not None:
            return [*system, self._first_turn]
        return system

    @cached_property
    def content(self) -> Corpus:
        """The material a structured answer is built from: every document (also one pasted into the
        instructions) and the conversation's turns, but never the instructions' own sentences nor the
        question; passages from named sources only, if there are any."""
        question = self.question if len(self.question.split()) <= 40 else ""  # a long "question" is the material
        texts = []
        instructions = [id(m) for m in self.instruction_messages]
        for m in self.messages:
            if id(m) in instructions:
                texts += [d.group(0) for d in _DOCUMENT_BLOCK.finditer(unescape_repr(m.text))]
                continue
            texts.append(m.text.replace(question, " ") if question and question in m.text else m.text)
        corpus = parse_all(texts)
        if any(p.sources for p in corpus.passages):
            return Corpus([p for p in corpus.passages if p.sources], list(corpus.sources))
        return corpus

    @cached_property
    def persona(self) -> Persona | None:
        found: dict[str, str] = {}
        for key, value in _PERSONA_FIELD.findall(self.system):
            found.setdefault(key.lower(), value)
        if "name" not in found and "description" not in found:
            return None
        return Persona(
            found.get("name", "the analyst"),
            found.get("role", "analyst"),
            found.get("affiliation", "an independent research group"),
            found.get("description", ""),
        )

    @cached_property
    def wants_citations(self) -> bool:
        text = self.lower
        return bool(
            "<document" in text
            or re.search(r"\bcit(e|es|ing|ation|ations)\b", text)
            or re.search(r"for (?:source|example)[^.\n]{0,30}\[1\]", text)
            or ("sources" in text and "[1]" in text)
        )

    def text_after(self, pattern: str, text: str | None = None) -> str:
        """The text following a phrase (case-insensitive) up to the next blank line, or ''."""
        source = self.system if text is None else text
        m = re.search(pattern + r"\s*:?\s*(.+?)(?:\n\s*\n|\Z)", source, re.I | re.S)
        return m.group(1).strip() if m else ""


def split_question(text: str) -> tuple[str, str]:
    """(question, rest) of a user turn that may carry context and a question together. Documents in the
    turn are context, never the question."""
    if "</Document>" in text:
        outside = _DOCUMENT_BLOCK.sub("\n\n", unescape_repr(text)).strip()
        if not re.search(r"[A-Za-z]{3}", outside):
            return "", text
        question, _ = split_question(outside)
        return question, text.replace(question, " ") if question else text
    m = re.search(r"(?:^|\n)\s*(?:question|query|task)\s*:\s*(.+)$", text, re.I | re.S)
    if m:
        return m.group(1).strip(), text[: m.start()]
    sentences = re.split(r"(?<=[.!?])\s+", text.strip())
    questions = [s for s in sentences if s.rstrip().endswith("?")]
    if questions and len(sentences) > 3:
        return questions[-1], text.replace(questions[-1], " ")
    paragraphs = [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    if len(paragraphs) > 1 and len(paragraphs[-1].split()) < 60:
        return paragraphs[-1].strip(), "\n\n".join(paragraphs[:-1])
    return text.strip(), ""

