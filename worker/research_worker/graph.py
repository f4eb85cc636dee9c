"""The research assistant's graphs: node functions first, wiring at the bottom.

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

from research_worker import prompts
from research_worker.citations import (
    cite,
    memos,
    number_marks,
    parse_section,
    report_sources,
    section_markdown,
    sources_block,
    split_listing,
    to_marks,
)
from research_worker.configuration import Configuration
from research_worker.errors import ModelAnswerError
from research_worker.search import format_context, number_sources
from research_worker.state import (
    Analyst,
    GenerateAnalystsState,
    InterviewState,
    Report,
    ReportState,
    ResearchGraphState,
    SearchQuery,
    Section,
    TokenUsage,
    perspectives_of,
)

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
    perspectives, usage = await runtime.context.llm.structured(
        perspectives_of(max_analysts), [SystemMessage(content=system), HumanMessage(content=prompts.analyst_request)]
    )
    analysts = perspectives.analysts[:max_analysts]
    if not analysts:
        raise ModelAnswerError("the model's answer listed no analysts (an empty list) for the topic")
    return {"analysts": analysts, "usage": usage}


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
        docs = await runtime.context.backend(backend).search(query)
        log.debug("search %s %r: %d passages", backend, query, len(docs))
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
    fallback_title = f"{analyst.role}: {analyst.name}"
    usage = TokenUsage()
    if not context:
        title, summary, cited = fallback_title, prompts.no_sources_summary, list[str]()
    else:
        system = prompts.section_writer_instructions.format(focus=analyst.description)
        msg, usage = await runtime.context.llm.chat(
            [
                SystemMessage(content=system),
                HumanMessage(content=prompts.section_request.format(context=format_context(context))),
            ]
        )
        title, summary, cited = parse_section(str(msg.content), sources, fallback_title)
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
    )
    return {"sections": [section], "usage": usage}


def interview_input(analyst: Analyst, index: int, topic: str, max_num_turns: int) -> dict[str, Any]:
    return {
        "analyst": analyst,
        "analyst_index": index,
        "max_num_turns": max_num_turns,
        "messages": [HumanMessage(content=prompts.interview_opening.format(topic=topic))],
    }


# ---------------------------------------------------------------- report


def _memos(state: ReportState) -> str:
    return "\n\n".join(memos(state.get("sections", [])))


async def write_report(state: ReportState, runtime: Runtime[Configuration]) -> dict[str, Any]:
    """The report body from all sections, keeping their (renumbered) citations."""
    system = prompts.report_writer_instructions.format(topic=state["topic"], context=_memos(state))
    msg, usage = await runtime.context.llm.chat(
        [SystemMessage(content=system), HumanMessage(content=prompts.report_request)]
    )
    return {"content": str(msg.content), "usage": usage}


async def _intro_or_conclusion(
    state: ReportState, runtime: Runtime[Configuration], request: str
) -> tuple[str, TokenUsage]:
    system = prompts.intro_conclusion_instructions.format(topic=state["topic"], formatted_str_sections=_memos(state))
    msg, usage = await runtime.context.llm.chat([SystemMessage(content=system), HumanMessage(content=request)])
    return str(msg.content), usage


async def write_introduction(state: ReportState, runtime: Runtime[Configuration]) -> dict[str, Any]:
    text, usage = await _intro_or_conclusion(state, runtime, prompts.introduction_request)
    return {"introduction": text, "usage": usage}


async def write_conclusion(state: ReportState, runtime: Runtime[Configuration]) -> dict[str, Any]:
    text, usage = await _intro_or_conclusion(state, runtime, prompts.conclusion_request)
    return {"conclusion": text, "usage": usage}


def _ensure_heading(text: str, heading: str) -> str:
    text = split_listing(text)[0].strip()
    if re.search(rf"^#{{1,3}}\s*{heading}\b", text, re.IGNORECASE | re.MULTILINE):
        return text
    title = ""
    m = re.match(r"^#\s+.*\n?", text)
    if m:
        title, text = m.group(0).strip() + "\n\n", text[m.end() :].lstrip()
    return f"{title}## {heading}\n{text}"


def finalize_report(state: ReportState) -> dict[str, Any]:
    """Introduction, body, conclusion, and one de-duplicated Sources list: every source of every
    section once, numbered in order of first citation in the report."""
    known = report_sources(state.get("sections", []))
    content = re.sub(r"^\s*##\s*Insights\s*\n", "", state.get("content", ""), flags=re.IGNORECASE).strip()
    intro = _ensure_heading(state.get("introduction", ""), "Introduction")
    if not intro.startswith("# "):
        intro = f"# {state['topic']}\n\n{intro}"
    conclusion = _ensure_heading(state.get("conclusion", ""), "Conclusion")
    # intro/conclusion cite by the memos' numbering; the body by its own Sources list, if it wrote one
    parts = [to_marks(intro, known), to_marks(content, known), to_marks(conclusion, known)]
    (intro, body, conclusion), cited = number_marks(parts, known)
    sources = cited + [s for s in known if s not in cited]
    listed = "\n".join(f"[{i}] {s}  " for i, s in enumerate(sources, start=1)) or "No sources were found."
    final = f"{intro}\n\n---\n\n## Insights\n{body}\n\n---\n\n{conclusion}\n\n## Sources\n{listed}\n"
    report = Report(
        topic=state["topic"],
        markdown=final,
        sources=sources,
        sections=sorted(s.index for s in state.get("sections", [])),
        usage=state.get("usage") or TokenUsage(),
    )
    return {"final_report": final, "report": report}


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
    b.add_edge(START, "ask_question")
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


def _add_report_nodes(b: StateGraph[Any, Any, Any, Any], after: str) -> None:
    for node, fn in (
        ("write_report", write_report),
        ("write_introduction", write_introduction),
        ("write_conclusion", write_conclusion),
    ):
        b.add_node(node, fn)
        b.add_edge(after, node)
    b.add_node("finalize_report", finalize_report)
    b.add_edge(["write_report", "write_introduction", "write_conclusion"], "finalize_report")
    b.add_edge("finalize_report", END)


def build_report_graph() -> CompiledStateGraph[Any, Any, Any, Any]:
    """The ``write`` step: the report from stored sections."""
    b = StateGraph(ReportState, context_schema=Configuration)
    b.add_node("collect_sections", lambda state: {})
    b.add_edge(START, "collect_sections")
    _add_report_nodes(b, "collect_sections")
    return b.compile(name="report")


def build_research_graph(
    backends: list[str], checkpointer: BaseCheckpointSaver[Any] | None = None
) -> CompiledStateGraph[Any, Any, Any, Any]:
    """The whole research assistant in one graph (the ``run`` step); interviews fan out with Send."""

    def initiate_all_interviews(state: ResearchGraphState, runtime: Runtime[Configuration]) -> Any:
        if state.get("human_analyst_feedback"):
            return "create_analysts"
        turns = state.get("max_num_turns", runtime.context.max_num_turns)
        return [
            Send("conduct_interview", interview_input(a, i, state["topic"], turns))
            for i, a in enumerate(state["analysts"])
        ]

    b = StateGraph(ResearchGraphState, context_schema=Configuration)
    b.add_node("create_analysts", create_analysts)
    b.add_node("human_feedback", human_feedback)
    b.add_node("conduct_interview", build_interview_graph(backends))
    b.add_edge(START, "create_analysts")
    b.add_edge("create_analysts", "human_feedback")
    b.add_conditional_edges("human_feedback", initiate_all_interviews, ["create_analysts", "conduct_interview"])
    _add_report_nodes(b, "conduct_interview")
    return b.compile(checkpointer=checkpointer, name="research_assistant")
