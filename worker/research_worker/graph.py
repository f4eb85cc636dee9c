"""The research assistant's graphs: node functions first, wiring at the bottom (the report
writers' nodes are in research_worker.writing).

Top level: create_analysts -> human_feedback -> (Send) conduct_interview per analyst ->
write_report | write_introduction | write_conclusion -> finalize_report.
Interview: ask_question -> search_query -> search_<backend> (in parallel) -> answer_question ->
(route_messages) ask_question | save_interview -> write_section.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Literal

from langchain_core.messages import AIMessage, AnyMessage, BaseMessage, HumanMessage, SystemMessage, get_buffer_string
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from langgraph.types import Send, interrupt
from typing_extensions import TypedDict

from research_api import prompts
from research_api.documents import overview_limit
from research_worker.citations import (
    check_section,
    cite,
    section_markdown,
    sources_block,
)
from research_worker.configuration import Configuration
from research_worker.coverage import assign, relevant_documents
from research_worker.errors import ModelAnswerError
from research_worker.search import format_context, number_sources, searchable
from research_worker.state import (
    Analyst,
    CitationCheck,
    Evidence,
    GenerateAnalystsState,
    InterviewState,
    ReportState,
    ResearchGraphState,
    SearchDoc,
    SearchQuery,
    Section,
    TokenUsage,
    perspectives_of,
)
from research_worker.writing import add_report_nodes

log = logging.getLogger(__name__)

EXPERT = "expert"
ANALYST = "analyst"
THANK_YOU = "Thank you so much for your help"

# ---------------------------------------------------------------- analysts


async def create_analysts(state: GenerateAnalystsState, runtime: Runtime[Configuration]) -> dict[str, Any]:
    """Analyst personas for the topic, honouring max_analysts and the editorial feedback."""
    max_analysts = state.get("max_analysts", runtime.context.max_analysts)
    system = prompts.analyst_instructions.format(
        topic=state["topic"],
        human_analyst_feedback=state.get("human_analyst_feedback") or "",
        max_analysts=max_analysts,
    )
    overview = _documents_overview(runtime.context, state["topic"], max_analysts)
    if overview:  # the prompt's "themes based upon documents": what the documents at hand are about
        system += prompts.analyst_documents.format(context=format_context(overview))
    perspectives, usage = await runtime.context.llm.structured(
        perspectives_of(max_analysts), [SystemMessage(content=system), HumanMessage(content=prompts.analyst_request)]
    )
    analysts = perspectives.analysts[:max_analysts]
    if not analysts:
        raise ModelAnswerError("the model's answer listed no analysts (an empty list) for the topic")
    return {
        "analysts": analysts,
        "documents": plan_documents(runtime.context, state["topic"], analysts),
        "usage": usage,
    }


def plan_documents(config: Configuration, topic: str, analysts: list[Analyst]) -> list[list[str]]:
    """Per analyst, the relevant local documents its interview is to reach (research_worker.coverage)."""
    documents = config.documents
    return assign(analysts, documents, relevant_documents(documents, topic))


def _documents_overview(config: Configuration, topic: str, max_analysts: int) -> list[SearchDoc]:
    """A look at the local documents for planning (those most relevant to the topic first). Only local
    sources take part: a web search here would cost a call before any analyst exists."""
    docs: list[SearchDoc] = []
    relevant = set(relevant_documents(config.documents, topic))
    for b in config.backends:
        overview = getattr(b, "overview", None)
        if overview is not None:
            # every document when they fit (the planner should see what the sources hold), else the
            # most relevant ones
            shown = overview(topic, overview_limit(max_analysts, len(getattr(b, "documents", ()))))
            # the documents relevant to the topic: a stray file does not get an analyst of its own
            docs += [d for d in shown if d.source in relevant] or shown
    return docs


def human_feedback(state: GenerateAnalystsState, runtime: Runtime[Configuration]) -> dict[str, Any]:
    """With review on, pause for feedback on the analysts (resume with the feedback, or "approve")."""
    if not runtime.context.human_review:
        return {"human_analyst_feedback": None}
    answer = interrupt({"analysts": [a.model_dump() for a in state.get("analysts", [])]})
    feedback = str(answer).strip() if answer else ""
    return {"human_analyst_feedback": None if feedback.lower() in ("", "approve") else feedback}


def needs_replanning(state: GenerateAnalystsState) -> bool:
    return bool(state.get("human_analyst_feedback"))


def after_review(state: GenerateAnalystsState) -> Literal["create_analysts", "__end__"]:
    return "create_analysts" if needs_replanning(state) else "__end__"


# ---------------------------------------------------------------- interview


def _as_analyst_sees(messages: list[AnyMessage]) -> list[BaseMessage]:
    """The analyst's own questions are its (AI) turns; the expert's answers come to it as human turns."""
    return [
        HumanMessage(content=m.content) if getattr(m, "name", None) == EXPERT or isinstance(m, HumanMessage) else m
        for m in messages
    ]


def _as_expert_sees(messages: list[AnyMessage]) -> list[BaseMessage]:
    return [m if getattr(m, "name", None) == EXPERT else HumanMessage(content=m.content) for m in messages]


async def generate_question(state: InterviewState, runtime: Runtime[Configuration]) -> dict[str, Any]:
    """The analyst asks the next question, in character."""
    system = prompts.question_instructions.format(goals=state["analyst"].persona)
    msg, usage = await runtime.context.llm.chat([SystemMessage(content=system), *_as_analyst_sees(state["messages"])])
    question = AIMessage(content=msg.content, name=ANALYST)
    return {"messages": [question], "usage": usage}


async def search_query(state: InterviewState, runtime: Runtime[Configuration]) -> dict[str, Any]:
    """A retrieval query from the conversation (structured output)."""
    try:
        query, usage = await runtime.context.llm.structured(
            SearchQuery, [SystemMessage(content=prompts.search_instructions), *_as_expert_sees(state["messages"])]
        )
    except ModelAnswerError as exc:
        # The query only sharpens retrieval: a model that cannot write one (cut off at maxOutputTokens,
        # not the schema) does not end the interview; the analyst's question is searched instead.
        log.warning("no usable search query (%s); searching for the analyst's question", exc)
        return {"search_queries": [_last_question(state)]}
    return {"search_queries": [query.search_query.strip() or _last_question(state)], "usage": usage}


def _last_question(state: InterviewState) -> str:
    return str(state["messages"][-1].content)


def make_search_node(backend: str) -> Any:
    async def search(state: InterviewState, runtime: Runtime[Configuration]) -> dict[str, Any]:
        query = state["search_queries"][-1]
        found = runtime.context.backend(backend)
        docs = await found.search(query)
        log.debug("search %s %r: %d passages", backend, query, len(docs))
        # the analyst's own documents (the plan's coverage): one passage of each not yet retrieved
        best_passage = getattr(found, "best_passage", None)
        if best_passage is not None:
            have = {d.source for d in [*state.get("context", []), *docs]}
            for source in state.get("assigned", []):
                if source not in have:
                    passage = best_passage(source, query, state["analyst"].description)
                    if passage is not None:
                        docs.append(passage)
                        have.add(source)
        return {"context": docs}

    search.__name__ = f"search_{backend}"
    return search


async def generate_answer(state: InterviewState, runtime: Runtime[Configuration]) -> dict[str, Any]:
    """The expert answers only from the retrieved context, citing it as [n]."""
    context = state.get("context", [])
    if not context:
        return {"messages": [AIMessage(content=prompts.no_context_answer, name=EXPERT)]}
    system = prompts.answer_instructions.format(goals=state["analyst"].persona, context=format_context(context))
    msg, usage = await runtime.context.llm.chat([SystemMessage(content=system), *_as_expert_sees(state["messages"])])
    body, cited = cite(str(msg.content), number_sources(context))
    content = f"{body}\n\n{sources_block(cited, 'Sources:')}" if cited else body
    return {"messages": [AIMessage(content=content, name=EXPERT)], "usage": usage}


def route_messages(state: InterviewState, runtime: Runtime[Configuration]) -> Literal["ask_question", "save_interview"]:
    """End after max_num_turns expert answers, or when the analyst says thank you."""
    messages = state["messages"]
    max_turns = state.get("max_num_turns", runtime.context.max_num_turns)
    answers = [m for m in messages if isinstance(m, AIMessage) and m.name == EXPERT]
    if len(answers) >= max_turns:
        return "save_interview"
    if len(messages) >= 2 and THANK_YOU in str(messages[-2].content):
        return "save_interview"
    return "ask_question"


def save_interview(state: InterviewState) -> dict[str, Any]:
    return {"interview": get_buffer_string(state["messages"])}


async def write_section(state: InterviewState, runtime: Runtime[Configuration]) -> dict[str, Any]:
    """A section (title, summary, de-duplicated sources) from what the interview retrieved."""
    analyst: Analyst = state["analyst"]
    context = state.get("context", [])
    sources = number_sources(context)
    fallback_title = theme_of(analyst)
    usage = TokenUsage()
    checked = CitationCheck()
    if not context:
        summary = prompts.no_sources_summary if searchable(runtime.context.backends) else prompts.no_documents_summary
        title, cited = fallback_title, list[str]()
    else:
        retrieved = [(d.source, f"{d.title}\n{d.content}" if d.title else d.content) for d in context]
        system = prompts.section_writer_instructions.format(focus=analyst.description)
        request = HumanMessage(content=prompts.section_request.format(context=format_context(context)))
        msg, usage = await runtime.context.llm.chat([SystemMessage(content=system), request])
        title, summary, cited, checked = check_section(str(msg.content), sources, fallback_title, retrieved)
        floor = runtime.context.quality.min_citation_accuracy
        if floor is not None and checked.accuracy_percent < floor:
            # below the floor: written once more, told what was not supported
            log.warning(
                "section %r: citation accuracy %d%% < %d%%; writing it again", title, checked.accuracy_percent, floor
            )
            again = prompts.revision_feedback.format(failures="\n".join(f"- {f}" for f in checked.failures))
            msg, more = await runtime.context.llm.chat([SystemMessage(content=system + again), request])
            usage = usage + more
            title, summary, cited, checked = check_section(str(msg.content), sources, fallback_title, retrieved)
            checked.revised = 1
    total = (state.get("usage") or TokenUsage()) + usage
    section = Section(
        index=state.get("analyst_index", 0),
        analyst=analyst,
        title=title,
        summary=summary,
        content=section_markdown(title, summary, cited),
        sources=cited,
        found_sources=bool(context),
        usage=total,
        evidence=[Evidence(source=d.source, title=d.title, content=d.content) for d in context],
        check=checked,
    )
    return {"sections": [section], "usage": usage}


_FOCUS_VERBS = re.compile(
    r"^(?:focus(?:es|ing)? on|examin(?:es|ing)|explor(?:es|ing)|stud(?:ies|ying)|investigat(?:es|ing)|"
    r"analy[sz](?:es|ing)|look(?:s|ing) at|research(?:es|ing)?|specializ(?:es|ing) in|cover(?:s|ing))\s+",
    re.IGNORECASE,
)


def theme_of(analyst: Analyst) -> str:
    """What an analyst looks at, as a section title: the object of the description's first sentence
    ("Focuses on queen rearing in how bees swarm." -> "Queen rearing"), else the role. Never a person."""
    first = re.split(r"(?<=[.!?;:])\s", analyst.description.strip(), maxsplit=1)[0].rstrip(".!?;:")
    focus = _FOCUS_VERBS.sub("", first).strip()
    focus = re.split(r"\s+(?:in|within|across|for)\s+(?:how|what|why|the|a|an)\b|,", focus, maxsplit=1)[0]
    focus = focus.removeprefix("the ").removeprefix("The ")
    words = focus.split()
    if not words or len(words) > 10 or analyst.name.lower() in focus.lower():
        return analyst.role.strip() or "Findings"
    return focus[0].upper() + focus[1:]


def route_start(state: InterviewState, runtime: Runtime[Configuration]) -> Literal["ask_question", "write_section"]:
    """No interview when nothing can be searched (a documents source without documents): the section
    says so and no model call is spent."""
    return "ask_question" if searchable(runtime.context.backends) else "write_section"


def interview_input(
    analyst: Analyst, index: int, topic: str, max_num_turns: int, assigned: list[str] | None = None
) -> dict[str, Any]:
    return {
        "analyst": analyst,
        "analyst_index": index,
        "assigned": list(assigned or []),
        "max_num_turns": max_num_turns,
        "messages": [HumanMessage(content=prompts.interview_opening.format(topic=topic))],
    }


# ---------------------------------------------------------------- wiring


class InterviewOutput(TypedDict, total=False):
    sections: list[Section]
    usage: TokenUsage


def build_interview_graph(
    backends: list[str], checkpointer: BaseCheckpointSaver[Any] | None = None
) -> CompiledStateGraph[Any, Any, Any, Any]:
    """The interview subgraph; one parallel search branch per selected backend."""
    if not backends:
        raise ValueError("an interview needs at least one search backend")
    b = StateGraph(InterviewState, context_schema=Configuration, output_schema=InterviewOutput)
    b.add_node("ask_question", generate_question)
    b.add_node("search_query", search_query)
    for name in backends:
        b.add_node(f"search_{name}", make_search_node(name))
    b.add_node("answer_question", generate_answer)
    b.add_node("save_interview", save_interview)
    b.add_node("write_section", write_section)
    b.add_conditional_edges(START, route_start, ["ask_question", "write_section"])
    b.add_edge("ask_question", "search_query")
    for name in backends:
        b.add_edge("search_query", f"search_{name}")
    b.add_edge([f"search_{name}" for name in backends], "answer_question")
    b.add_conditional_edges("answer_question", route_messages, ["ask_question", "save_interview"])
    b.add_edge("save_interview", "write_section")
    b.add_edge("write_section", END)
    return b.compile(checkpointer=checkpointer, name="interview")


def build_planner_graph(checkpointer: BaseCheckpointSaver[Any] | None = None) -> CompiledStateGraph[Any, Any, Any, Any]:
    """The ``plan`` step: analysts, with an optional review loop."""
    b = StateGraph(GenerateAnalystsState, context_schema=Configuration)
    b.add_node("create_analysts", create_analysts)
    b.add_node("human_feedback", human_feedback)
    b.add_edge(START, "create_analysts")
    b.add_edge("create_analysts", "human_feedback")
    b.add_conditional_edges("human_feedback", after_review, ["create_analysts", END])
    return b.compile(checkpointer=checkpointer, name="planner")


def build_report_graph() -> CompiledStateGraph[Any, Any, Any, Any]:
    """The ``write`` step: the report from stored sections."""
    b = StateGraph(ReportState, context_schema=Configuration)
    b.add_node("collect_sections", lambda state: {})
    b.add_edge(START, "collect_sections")
    add_report_nodes(b, "collect_sections")
    return b.compile(name="report")


def build_research_graph(
    backends: list[str], checkpointer: BaseCheckpointSaver[Any] | None = None
) -> CompiledStateGraph[Any, Any, Any, Any]:
    """The whole research assistant in one graph (the ``run`` step); interviews fan out with Send."""

    def initiate_all_interviews(state: ResearchGraphState, runtime: Runtime[Configuration]) -> Any:
        if state.get("human_analyst_feedback"):
            return "create_analysts"
        turns = state.get("max_num_turns", runtime.context.max_num_turns)
        documents = state.get("documents") or []
        return [
            Send(
                "conduct_interview",
                interview_input(a, i, state["topic"], turns, documents[i] if i < len(documents) else []),
            )
            for i, a in enumerate(state["analysts"])
        ]

    b = StateGraph(ResearchGraphState, context_schema=Configuration)
    b.add_node("create_analysts", create_analysts)
    b.add_node("human_feedback", human_feedback)
    b.add_node("conduct_interview", build_interview_graph(backends))
    b.add_edge(START, "create_analysts")
    b.add_edge("create_analysts", "human_feedback")
    b.add_conditional_edges("human_feedback", initiate_all_interviews, ["create_analysts", "conduct_interview"])
    add_report_nodes(b, "conduct_interview")
    return b.compile(checkpointer=checkpointer, name="research_assistant")
