"""The report writers: the body, the introduction and the conclusion, each from the memos of the
sections that found something (in parallel), then ``finalize_report``, which puts them together
with one numbered Sources list. ``add_report_nodes`` wires them into a graph (research_worker.graph).
"""

from __future__ import annotations

import re
from typing import Any

from langchain_core.messages import HumanMessage, SystemMessage
from langgraph.graph import END, StateGraph
from langgraph.runtime import Runtime

from research_worker import prompts
from research_worker.citations import memos, number_marks, report_sources, split_listing, to_marks
from research_worker.configuration import Configuration
from research_worker.state import Report, ReportState, Section, TokenUsage


def _found(state: ReportState) -> list[Section]:
    return [s for s in state.get("sections", []) if s.found_sources]


def _memos(state: ReportState) -> str:
    return "\n\n".join(memos(_found(state)))


async def write_report(state: ReportState, runtime: Runtime[Configuration]) -> dict[str, Any]:
    """The report body from the sections that found something, keeping their (renumbered) citations."""
    if not _found(state):
        return {"content": ""}
    system = prompts.report_writer_instructions.format(topic=state["topic"], context=_memos(state))
    msg, usage = await runtime.context.llm.chat(
        [SystemMessage(content=system), HumanMessage(content=prompts.report_request)]
    )
    return {"content": str(msg.content), "usage": usage}


async def _intro_or_conclusion(
    state: ReportState, runtime: Runtime[Configuration], request: str
) -> tuple[str, TokenUsage]:
    if not _found(state):
        return "", TokenUsage()
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
    section once, numbered in order of first citation in the report. Sections that found nothing are
    named once, by their themes; a report with no sources has no Sources section."""
    sections = state.get("sections", [])
    known = report_sources(sections)
    empty = [s for s in sorted(sections, key=lambda s: s.index) if not s.found_sources]
    if sections and len(empty) == len(sections):
        reasons = list(dict.fromkeys(s.summary.strip() for s in empty))
        final = f"# {state['topic']}\n\n## No findings\n\n" + "\n\n".join(reasons) + "\n"
        if len(empty) > 1 or empty[0].title:
            final += "\nThemes that were planned: " + ", ".join(f"*{s.title}*" for s in empty) + ".\n"
        report = Report(
            topic=state["topic"],
            markdown=final,
            sources=[],
            sections=sorted(s.index for s in sections),
            usage=state.get("usage") or TokenUsage(),
        )
        return {"final_report": final, "report": report}
    content = re.sub(r"^\s*##\s*Insights\s*\n", "", state.get("content", ""), flags=re.IGNORECASE).strip()
    intro = _ensure_heading(state.get("introduction", ""), "Introduction")
    if not intro.startswith("# "):
        intro = f"# {state['topic']}\n\n{intro}"
    conclusion = _ensure_heading(state.get("conclusion", ""), "Conclusion")
    if empty:
        conclusion += "\n\nNothing was found in the sources for " + ", ".join(f"*{s.title}*" for s in empty) + "."
    # intro/conclusion cite by the memos' numbering; the body by its own Sources list, if it wrote one
    parts = [to_marks(intro, known), to_marks(content, known), to_marks(conclusion, known)]
    (intro, body, conclusion), cited = number_marks(parts, known)
    sources = cited + [s for s in known if s not in cited]
    final = f"{intro}\n\n---\n\n## Insights\n{body}\n\n---\n\n{conclusion}\n"
    if sources:
        final += "\n## Sources\n" + "\n".join(f"[{i}] {s}  " for i, s in enumerate(sources, start=1)) + "\n"
    report = Report(
        topic=state["topic"],
        markdown=final,
        sources=sources,
        sections=sorted(s.index for s in sections),
        usage=state.get("usage") or TokenUsage(),
    )
    return {"final_report": final, "report": report}


def add_report_nodes(b: StateGraph[Any, Any, Any, Any], after: str) -> None:
    """The three writers in parallel after ``after``, then finalize_report, then the end."""
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
