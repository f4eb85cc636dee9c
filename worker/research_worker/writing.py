"""The report writers: the body, the introduction and the conclusion, each from the memos of the
sections that found something (in parallel), then ``finalize_report``, which checks every cited
sentence against the retrieved passages (research_worker.grounding), puts them together with one
numbered Sources list of exactly what the text cites, and measures the report's quality. Below the
task's quality floor the three writers run once more with the failures as feedback
(``revise_report``). ``add_report_nodes`` wires them into a graph (research_worker.graph).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from langchain_core.messages import HumanMessage, SystemMessage
from langgraph.graph import END, StateGraph
from langgraph.runtime import Runtime

from research_api import prompts
from research_api.records import CitationCheck, ReportQuality
from research_worker.citations import dedupe, memos, number_marks, report_sources, split_listing, to_marks
from research_worker.configuration import Configuration
from research_worker.coverage import relevant_documents
from research_worker.grounding import Evidence, check
from research_worker.state import Report, ReportState, Section, TokenUsage

log = logging.getLogger(__name__)


def _found(state: ReportState) -> list[Section]:
    return [s for s in state.get("sections", []) if s.found_sources]


def _memos(state: ReportState) -> str:
    return "\n\n".join(memos(_found(state)))


async def write_report(state: ReportState, runtime: Runtime[Configuration]) -> dict[str, Any]:
    """The report body from the sections that found something, keeping their (renumbered) citations."""
    if not _found(state):
        return {"content": ""}
    system = prompts.report_writer_instructions.format(topic=state["topic"], context=_memos(state))
    system += state.get("revision") or ""
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
    system += state.get("revision") or ""
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


def finalize_report(state: ReportState, runtime: Runtime[Configuration] | None = None) -> dict[str, Any]:
    """Introduction, body, conclusion, and one de-duplicated Sources list: each source the text cites,
    once, numbered in order of first citation. Every cited sentence is checked against the passages the
    interviews retrieved (re-cited or dropped when they do not support it); sections that found nothing
    are named once, by their themes; a report with no sources has no Sources section."""
    sections = state.get("sections", [])
    memo_sources = report_sources(sections)
    retrieved = [(e.source, f"{e.title}\n{e.content}" if e.title else e.content) for s in sections for e in s.evidence]
    # the memos' numbering first, then whatever else was retrieved (a sentence may be re-cited to it)
    known = dedupe(memo_sources + [src for src, _ in retrieved])
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
            quality=measure(state, runtime, CitationCheck(), []),
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
    parts = [to_marks(text, known, memo_sources) for text in (intro, content, conclusion)]
    checked = CitationCheck()
    if retrieved:  # sections stored without their passages (an older worker) cannot be checked
        evidence = Evidence.of(known, retrieved)
        for i, part in enumerate(parts):
            parts[i], result = check(part, evidence, known)
            checked = checked + result
    checked.revised = state.get("revised", 0)
    (intro, body, conclusion), sources = number_marks(parts, known)
    final = f"{intro}\n\n---\n\n## Insights\n{body}\n\n---\n\n{conclusion}\n"
    if sources:
        final += "\n## Sources\n" + "\n".join(f"[{i}] {s}  " for i, s in enumerate(sources, start=1)) + "\n"
    report = Report(
        topic=state["topic"],
        markdown=final,
        sources=sources,
        sections=sorted(s.index for s in sections),
        usage=state.get("usage") or TokenUsage(),
        quality=measure(state, runtime, checked, sources),
    )
    return {"final_report": final, "report": report}


def measure(
    state: ReportState, runtime: Runtime[Configuration] | None, checked: CitationCheck, cited: list[str]
) -> ReportQuality:
    """The report's quality figures: its own and its sections' citation checks, and coverage of the
    local documents relevant to the topic (research_worker.coverage)."""
    sections = state.get("sections", [])
    retrieved = dedupe([e.source for s in sections for e in s.evidence] or [src for s in sections for src in s.sources])
    documents = runtime.context.documents if runtime is not None else {}
    relevant = relevant_documents(documents, state["topic"]) if documents else []
    cited_keys = {c.strip().lower() for c in cited}
    got = {r.strip().lower() for r in retrieved}
    sections_check = CitationCheck()
    for s in sections:
        sections_check = sections_check + s.check
    return ReportQuality(
        sections=sections_check,
        report=checked,
        sources_retrieved=len(retrieved),
        sources_cited=len(cited),
        relevant=relevant,
        relevant_cited=sum(1 for d in relevant if d.lower() in cited_keys),
        unreached=[d for d in relevant if d.lower() not in got],
        uncited=[d for d in relevant if d.lower() in got and d.lower() not in cited_keys],
    )


def after_report(state: ReportState, runtime: Runtime[Configuration]) -> str:
    """Once more with feedback when the report misses the quality floor and was not yet written again."""
    report = state.get("report")
    if report is None or report.quality is None or state.get("revised", 0) >= 1:
        return END
    missed = report.quality.misses(runtime.context.quality)
    if not missed:
        return END
    log.warning("the report misses the quality floor (%s); writing it again", "; ".join(missed))
    return "revise_report"


def revise_report(state: ReportState) -> dict[str, Any]:
    """The failures of the first writing, as feedback for the second."""
    report = state["report"]
    assert report.quality is not None
    feedback = ""
    if report.quality.report.failures:
        feedback += prompts.revision_feedback.format(
            failures="\n".join(f"- {f}" for f in report.quality.report.failures)
        )
    if report.quality.cites_nothing:
        feedback += prompts.no_citations_feedback
    if report.quality.uncited:
        numbering = report_sources(state.get("sections", []))
        listed = [f"[{numbering.index(d) + 1}] {d}" for d in report.quality.uncited if d in numbering]
        if listed:
            feedback += prompts.coverage_feedback.format(sources="\n".join(listed))
    return {"revision": feedback, "revised": state.get("revised", 0) + 1}


def add_report_nodes(b: StateGraph[Any, Any, Any, Any], after: str) -> None:
    """The three writers in parallel after ``after``, then finalize_report, then the end (or, below
    the quality floor, revise_report and the three writers once more)."""
    for node, fn in (
        ("write_report", write_report),
        ("write_introduction", write_introduction),
        ("write_conclusion", write_conclusion),
    ):
        b.add_node(node, fn)
        b.add_edge(after, node)
    b.add_node("finalize_report", finalize_report)
    b.add_node("revise_report", revise_report)
    b.add_edge(["write_report", "write_introduction", "write_conclusion"], "finalize_report")
    b.add_conditional_edges("finalize_report", after_report, ["revise_report", END])
    for node in ("write_report", "write_introduction", "write_conclusion"):
        b.add_edge("revise_report", node)
