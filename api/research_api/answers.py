"""The structured answers the worker asks the model for.

Their JSON schemas are sent with the request (response_format or a tool), so they are part of the
prompt: the worker asks with them (research_worker.graph) and the estimate counts them
(research_api.estimate).
"""

from __future__ import annotations

import functools
from typing import ClassVar

from pydantic import BaseModel, Field, create_model

from research_api.records import Analyst


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
