"""langchain-openai's ChatOpenAI against the offline model server, over real HTTP."""

from __future__ import annotations

import json
import re
from enum import StrEnum

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from offline_model.launcher import ModelServerProcess
from research_api import prompts as worker_prompts
from research_worker.state import Perspectives  # the schemas the real worker asks for

CONTEXT = """<Document source="docs/checkpointing.md" page=""/>
LangGraph persists the state of a graph with checkpointers. A checkpointer saves a snapshot of the state after
every super-step, keyed by a thread id. Saved checkpoints make human-in-the-loop review and time travel possible.
</Document>

---

<Document source="docs/kubernetes.md" page="3"/>
A Kubernetes Job runs pods until a given number of them complete successfully. ResourceQuota objects cap the
total CPU and memory that a namespace may request.
</Document>"""


def llm(server: ModelServerProcess, **kw: object) -> ChatOpenAI:
    return ChatOpenAI(base_url=server.base_url, api_key="x", model="offline-research-1", timeout=30, **kw)  # type: ignore[arg-type]


def grounded_prompt(question: str) -> list[object]:
    return [
        SystemMessage(
            "Answer the question using only this context. Cite sources as [1], [2] and list them at the end.\n\n"
            + CONTEXT
        ),
        HumanMessage(question),
    ]


def test_plain_answer_is_grounded_and_cited(modelserver: ModelServerProcess) -> None:
    reply = llm(modelserver).invoke(grounded_prompt("How does LangGraph save the state of a graph?"))
    text = str(reply.content)
    assert "checkpointer" in text.lower()
    assert "Kubernetes" not in text.split("## Sources")[0]  # the unrelated document is not used
    assert re.search(r"\[1\]", text)
    assert "## Sources\n[1] docs/checkpointing.md" in text
    usage = reply.usage_metadata
    assert usage is not None and usage["input_tokens"] > 50 and usage["output_tokens"] > 5


def test_same_request_same_answer(modelserver: ModelServerProcess) -> None:
    model = llm(modelserver)
    prompt = grounded_prompt("What do ResourceQuota objects cap?")
    first, second = model.invoke(prompt), model.invoke(prompt)
    assert first.content == second.content
    assert "docs/kubernetes.md, page 3" in str(first.content)


def test_nothing_relevant_says_so_and_cites_nothing(modelserver: ModelServerProcess) -> None:
    reply = llm(modelserver).invoke(grounded_prompt("What is the boiling point of mercury?"))
    text = str(reply.content)
    assert "does not contain information" in text
    assert "[1]" not in text and "Sources" not in text


def test_streaming_yields_pieces_and_usage(modelserver: ModelServerProcess) -> None:
    model = llm(modelserver, stream_usage=True)
    prompt = grounded_prompt("How does LangGraph save the state of a graph?")
    chunks = list(model.stream(prompt))
    assert len(chunks) > 3
    streamed = "".join(str(c.content) for c in chunks)
    assert streamed == str(model.invoke(prompt).content)
    usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    assert usage and usage[-1]["output_tokens"] > 5


@tool
def get_weather(city: str) -> str:
    """Current weather for a city."""
    return f"It is sunny in {city}."


@tool
def search_docs(query: str, max_results: int = 3) -> str:
    """Search the project documentation for a query."""
    return "checkpointers save state"


def test_bind_tools_calls_the_relevant_tool_then_answers_from_its_result(modelserver: ModelServerProcess) -> None:
    model = llm(modelserver).bind_tools([get_weather, search_docs])
    question = HumanMessage("Search the documentation: how do checkpointers work?")
    reply = model.invoke([question])
    assert isinstance(reply, AIMessage) and reply.tool_calls
    call = reply.tool_calls[0]
    assert call["name"] == "search_docs"
    assert "checkpointers" in call["args"]["query"].lower()
    result = ToolMessage(
        "Checkpointers save the graph state after every step so runs can resume.", tool_call_id=call["id"]
    )
    final = model.invoke([question, reply, result])
    assert not final.tool_calls
    assert "save the graph state" in str(final.content)


def test_tool_choice_required_none_and_named(modelserver: ModelServerProcess) -> None:
    base = llm(modelserver)
    msg = [HumanMessage("Tell me a fun fact.")]
    assert not base.bind_tools([get_weather, search_docs]).invoke(msg).tool_calls  # auto: nothing relevant
    forced = base.bind_tools([get_weather, search_docs], tool_choice="required").invoke(msg)
    assert len(forced.tool_calls) == 1
    named = base.bind_tools([get_weather, search_docs], tool_choice="get_weather").invoke(msg)
    assert named.tool_calls[0]["name"] == "get_weather" and isinstance(named.tool_calls[0]["args"]["city"], str)
    none = base.bind_tools([get_weather, search_docs], tool_choice="none").invoke(
        [HumanMessage("What is the weather in Paris?")]
    )
    assert not none.tool_calls and isinstance(none.content, str)


def test_streaming_tool_call(modelserver: ModelServerProcess) -> None:
    model = llm(modelserver).bind_tools([search_docs], tool_choice="search_docs")
    chunks = list(model.stream([HumanMessage("How do checkpointers work?")]))
    merged = chunks[0]
    for c in chunks[1:]:
        merged = merged + c  # type: ignore[assignment]
    assert merged.tool_calls[0]["name"] == "search_docs"  # type: ignore[attr-defined]
    assert "checkpointers" in merged.tool_calls[0]["args"]["query"].lower()  # type: ignore[attr-defined]


class Severity(StrEnum):
    low = "low"
    medium = "medium"
    high = "high"


class Finding(BaseModel):
    claim: str = Field(description="A finding stated in the context")
    source: str = Field(description="The document the finding comes from")
    severity: Severity
    tags: list[str] = Field(min_length=1, max_length=4)
    caveat: str | None = Field(None, description="An optional limitation")


class Review(BaseModel):
    title: str
    findings: list[Finding] = Field(min_length=2, max_length=5)
    follow_up_questions: list[str]
    confidence: float = Field(ge=0, le=1)


@pytest.mark.parametrize("method", ["function_calling", "json_schema", "json_mode"])
def test_with_structured_output_each_method(modelserver: ModelServerProcess, method: str) -> None:
    model = llm(modelserver).with_structured_output(Review, method=method)  # type: ignore[arg-type]
    messages = grounded_prompt("Review what the context says about checkpointers and saved state.")
    if method == "json_mode":  # json mode only sees the schema if the prompt carries it
        messages.append(HumanMessage("Reply in JSON matching this schema: " + json.dumps(Review.model_json_schema())))
    review = model.invoke(messages)
    assert isinstance(review, Review)
    assert 2 <= len(review.findings) <= 5
    claims = [f.claim for f in review.findings]
    assert len(set(claims)) == len(claims)
    assert any("checkpoint" in c.lower() for c in claims)
    assert all(f.source in ("docs/checkpointing.md", "docs/kubernetes.md, page 3") for f in review.findings)
    assert all(1 <= len(f.tags) <= 4 for f in review.findings)
    assert 0 <= review.confidence <= 1


@pytest.mark.parametrize("n", [1, 3, 5])
@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_analyst_personas_are_distinct_and_as_many_as_asked(
    modelserver: ModelServerProcess, n: int, method: str
) -> None:
    prompt = worker_prompts.analyst_instructions.format(  # the prompt the real worker sends
        topic="Running LangGraph research agents on Kubernetes",
        human_analyst_feedback="Include a cost and quota perspective.",
        max_analysts=n,
    )
    model = llm(modelserver).with_structured_output(Perspectives, method=method)  # type: ignore[arg-type]
    result = model.invoke([SystemMessage(prompt), HumanMessage(worker_prompts.analyst_request)])
    assert isinstance(result, Perspectives)
    assert len(result.analysts) == n
    for field in ("name", "role", "description"):
        values = [getattr(a, field) for a in result.analysts]
        assert len(set(values)) == n, f"{field} repeats: {values}"
    assert all(a.name.count(" ") == 1 and a.affiliation for a in result.analysts)
    assert all("Kubernetes" in a.description for a in result.analysts)
    if n >= 2:  # the feedback's themes come first
        assert "cost" in result.analysts[0].description.lower() or "quota" in result.analysts[0].description.lower()


def test_requested_count_phrasings(modelserver: ModelServerProcess) -> None:
    model = llm(modelserver).with_structured_output(Perspectives, method="json_schema")
    for text, expected in (
        ("Create 4 analysts to study edge computing.", 4),
        ("Topic: edge computing. max_analysts: 2", 2),
        ("Suggest analyst personas for edge computing, at most three of them.", 3),
    ):
        result = model.invoke([HumanMessage(text)])
        assert isinstance(result, Perspectives)
        assert len(result.analysts) == expected, text
