"""Graph state and the structured-output models of the research assistant."""

from __future__ import annotations

import functools
import operator
from typing import Annotated, Any, ClassVar, TypedDict

from langchain_core.messages import AnyMessage
from langgraph.graph import MessagesState
from pydantic import BaseModel, Field, create_model

from research_api.records import Analyst, CitationCheck, Evidence, Report, ReportQuality, Section, TokenUsage

# The stored records are part of the graph state; importers of this module find them here too.
__all__ = ["Analyst", "CitationCheck", "Evidence", "Report", "ReportQuality", "Section", "TokenUsage"]

# ---------------------------------------------------------------- structured outputs


class Perspectives(BaseModel):
    analysts: list[Analyst] = Field(
        description="Comprehensive list of analysts with their roles and affiliations.",
    )


@functools.cache
def perspectives_of(count: int) -> type[Perspectives]:
    """Perspectives whose schema asks for exactly ``count`` analysts (minItems = maxItems), so an
    endpoint that constrains decoding to the schema (llama.cpp's grammar, OpenAI's strict mode)
    returns the panel size the ResearchJob asked for instead of whatever length the model picks."""
    model = create_model(
        "Perspectives",
        __base__=Perspectives,
        analysts=(
            list[Analyst],
            Field(
                min_length=count,
                max_length=count,
                description=f"Exactly {count} analysts, with their roles and affiliations.",
            ),
        ),
    )
    return model


class SearchQuery(BaseModel):
    # The longest query an endpoint with a grammar may write (research_worker.bounds): a search
    # query is a line, and web search APIs take a few hundred characters.
    max_string_chars: ClassVar[int] = 300

    search_query: str = Field(description="Search query for retrieval.")


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
