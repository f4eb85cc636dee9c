"""Graph state of the research assistant (its structured-output models are in research_api.answers)."""

from __future__ import annotations

import operator
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AnyMessage
from langgraph.graph import MessagesState
from pydantic import BaseModel

from research_api.answers import Perspectives, SearchQuery, perspectives_of
from research_api.records import Analyst, CitationCheck, Evidence, Report, ReportQuality, Section, TokenUsage

# The stored records are part of the graph state, and the structured answers (research_api.answers)
# its nodes ask for; importers of this module find them here too.
__all__ = [
    "Analyst",
    "CitationCheck",
    "Evidence",
    "Perspectives",
    "Report",
    "ReportQuality",
    "SearchQuery",
    "Section",
    "TokenUsage",
    "perspectives_of",
]

# ---------------------------------------------------------------- usage and documents


def add_usage(left: TokenUsage | None, right: TokenUsage | None) -> TokenUsage:
    return (left or TokenUsage()) + (right or TokenUsage())


class SearchDoc(BaseModel):
    """One retrieved passage. ``source`` is what a citation names (a file name or a URL)."""

    source: str
    title: str = ""
    content: str
    backend: str


def merge_docs(left: list[SearchDoc] | None, right: list[SearchDoc] | None) -> list[SearchDoc]:
    """Accumulate retrieved passages across turns, once each, in order of first retrieval."""
    out = list(left or [])
    seen = {(d.source, d.content) for d in out}
    for d in right or []:
        if (d.source, d.content) not in seen:
            seen.add((d.source, d.content))
            out.append(d)
    return out


# ---------------------------------------------------------------- graph states


class GenerateAnalystsState(TypedDict, total=False):
    topic: str
    max_analysts: int
    human_analyst_feedback: str | None
    analysts: list[Analyst]
    documents: list[list[str]]  # per analyst, the relevant local documents it is to reach
    usage: Annotated[TokenUsage, add_usage]


class InterviewState(MessagesState, total=False):
    max_num_turns: int
    context: Annotated[list[SearchDoc], merge_docs]
    search_queries: Annotated[list[str], operator.add]
    analyst: Analyst
    analyst_index: int
    assigned: list[str]  # local documents this analyst is to reach
    interview: str
    sections: list[Section]
    usage: Annotated[TokenUsage, add_usage]


class ResearchGraphState(TypedDict, total=False):
    topic: str
    max_analysts: int
    max_num_turns: int
    human_analyst_feedback: str | None
    analysts: list[Analyst]
    documents: list[list[str]]
    sections: Annotated[list[Section], operator.add]
    revision: str
    revised: int
    introduction: str
    content: str
    conclusion: str
    final_report: str
    report: Report
    usage: Annotated[TokenUsage, add_usage]


class ReportState(TypedDict, total=False):
    topic: str
    sections: list[Section]
    revision: str  # the failures of the first writing, as feedback for a second one
    revised: int
    introduction: str
    content: str
    conclusion: str
    final_report: str
    report: Report
    usage: Annotated[TokenUsage, add_usage]


def messages_of(state: dict[str, Any]) -> list[AnyMessage]:
    return list(state.get("messages", []))
