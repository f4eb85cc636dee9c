"""The steps a worker Job runs: plan, interview (a batch), write; and run (everything, one process)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.types import Command

from research_api.task import ResearchTask
from research_worker.configuration import Configuration
from research_worker.errors import WorkerConfigError, WorkerError
from research_worker.graph import (
    build_interview_graph,
    build_planner_graph,
    build_report_graph,
    build_research_graph,
    interview_input,
)
from research_worker.llm import LLMClient, api_key_for, preflight
from research_worker.search import SearchBackend, build_backends
from research_worker.state import Report, Section, TokenUsage
from research_worker.store import AnalystPlan, Store
from research_worker.tracing import analyst_span, span

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    task: ResearchTask
    llm: LLMClient
    backends: list[SearchBackend]

    def config(self, *, human_review: bool = False) -> Configuration:
        return Configuration.from_task(self.task, self.llm, self.backends, human_review=human_review)


async def prepare(
    task: ResearchTask,
    *,
    tokens_used_before: int = 0,
    load_configmap: Callable[[str], Mapping[str, str]] | None = None,
) -> Runtime:
    """Check the model endpoint (fast failure on a bad key or address), then build the process's
    one model client and the task's search backends."""
    key = api_key_for(task.model)
    await preflight(task.model, key)
    llm = LLMClient(task.model, key, max_tokens_budget=task.budget.max_tokens, tokens_used_before=tokens_used_before)
    return Runtime(task, llm, build_backends(task.sources, load_configmap))


async def plan(rt: Runtime, store: Store) -> AnalystPlan:
    existing = await store.load_analysts()
    if existing is not None:
        log.info("plan %s already stored (%d analysts); nothing to do", rt.task.plan_id, len(existing.analysts))
        return existing
    graph = build_planner_graph()
    with span("plan"):
        state = await graph.ainvoke(
            {"topic": rt.task.topic, "max_analysts": rt.task.max_analysts, "human_analyst_feedback": rt.task.feedback},
            context=rt.config(),
        )
    result = AnalystPlan(
        topic=rt.task.topic,
        feedback=rt.task.feedback,
        analysts=state["analysts"],
        usage=state.get("usage") or TokenUsage(),
        documents=state.get("documents") or [],
    )
    if not await store.save_analysts(result):  # another pod stored it first: theirs wins
        stored = await store.load_analysts()
        assert stored is not None
        return stored
    rt.llm.stored(result.usage)
    log.info("stored %d analysts (%d tokens)", len(result.analysts), result.usage.total_tokens)
    return result


@dataclass
class InterviewOutcome:
    written: list[int]
    skipped: list[int]
    failed: dict[int, str]


async def interview(rt: Runtime, store: Store) -> InterviewOutcome:
    """Interview a batch of analysts concurrently, storing each section as soon as it is written.
    Analysts whose section is already stored are skipped; with a checkpointer (PostgreSQL) an
    unfinished interview resumes from its last completed node."""
    stored_plan = await store.load_analysts()
    if stored_plan is None:
        raise WorkerConfigError(f"no analysts are stored for plan {rt.task.plan_id}: run the plan step first")
    analysts = stored_plan.analysts
    indices = rt.task.analysts or list(range(len(analysts)))
    missing = [i for i in indices if i >= len(analysts)]
    if missing:
        raise WorkerConfigError(f"analysts {missing} do not exist: the plan has {len(analysts)} analysts")
    done = await store.section_indices()
    skipped = [i for i in indices if i in done]
    todo = [i for i in indices if i not in done]
    if skipped:
        log.info("analysts %s already have sections; skipping them", skipped)
    checkpointer = store.checkpointer()
    graph = build_interview_graph([b.name for b in rt.backends], checkpointer)
    limit = asyncio.Semaphore(rt.task.interview_concurrency or max(1, len(todo)))
    written: list[int] = []
    failed: dict[int, str] = {}

    async def one(i: int) -> None:
        async with limit, analyst_span(i):
            analyst = analysts[i]
            assigned = stored_plan.documents[i] if i < len(stored_plan.documents) else []
            inputs: Any = interview_input(analyst, i, rt.task.topic, rt.task.max_turns, assigned)
            config: RunnableConfig = {}
            out: dict[str, Any] | None = None
            if checkpointer is not None:
                config = {"configurable": {"thread_id": f"{rt.task.job.uid}:{rt.task.plan_id}:{i}"}}
                snapshot = await graph.aget_state(config)
                if snapshot.next:
                    log.info("analyst %d: resuming the interview at %s", i, ", ".join(snapshot.next))
                    inputs = None
                elif snapshot.values.get("sections"):
                    out = snapshot.values  # finished before the pod died, but not stored
            if out is None:
                out = await graph.ainvoke(inputs, config, context=rt.config())
            section: Section = out["sections"][0]
            await store.save_section(section)
            rt.llm.stored(section.usage)
            written.append(i)
            log.info(
                "analyst %d (%s): section stored, %d sources, %d tokens",
                i,
                analyst.name,
                len(section.sources),
                section.usage.total_tokens,
            )

    with span("interview"):
        results = await asyncio.gather(*(one(i) for i in todo), return_exceptions=True)
    first: BaseException | None = None
    for i, r in zip(todo, results, strict=True):
        if isinstance(r, BaseException):
            failed[i] = str(r) or type(r).__name__
            log.error("analyst %d failed: %s", i, failed[i])
            first = first or r
    if first is not None:
        raise first
    return InterviewOutcome(sorted(written), skipped, failed)


async def write(rt: Runtime, store: Store) -> Report:
    existing = await store.load_report()
    if existing is not None:
        log.info("the report is already stored")
        return existing
    stored_plan = await store.load_analysts()
    if stored_plan is None:
        raise WorkerConfigError(f"no analysts are stored for plan {rt.task.plan_id}: run the plan step first")
    sections = await store.list_sections()
    have = {s.index for s in sections}
    missing = [i for i in range(len(stored_plan.analysts)) if i not in have]
    if missing:
        raise WorkerConfigError(f"sections of analysts {missing} are not stored yet: run their interviews first")
    with span("write"):
        state = await build_report_graph().ainvoke({"topic": rt.task.topic, "sections": sections}, context=rt.config())
    report: Report = state["report"]
    if not await store.save_report(report):
        stored = await store.load_report()
        assert stored is not None
        return stored
    rt.llm.stored(report.usage)
    return report


async def write_if_last(rt: Runtime, store: Store, holder: str) -> Report | None:
    """After this pod stored its sections: if every analyst of the plan now has one and no report is
    stored, claim the report (one pod wins, also when several finish at once) and write it here,
    which spares a writer pod's start-up. None when another pod has it, or sections are missing."""
    stored_plan = await store.load_analysts()
    if stored_plan is None or await store.load_report() is not None:
        return None
    have = await store.section_indices()
    if any(i not in have for i in range(len(stored_plan.analysts))):
        return None
    if not await store.claim_report(holder):
        log.info("every section is stored; another pod claimed the report")
        return None
    log.info("every section is stored; this pod writes the report")
    return await write(rt, store)


@dataclass
class RunResult:
    report: Report
    sections: list[Section]


async def run(rt: Runtime, *, ask_feedback: Callable[[list[dict[str, Any]]], str] | None = None) -> RunResult:
    """The whole research assistant in this process, with no store."""
    from langgraph.checkpoint.memory import InMemorySaver

    review = ask_feedback is not None
    graph = build_research_graph([b.name for b in rt.backends], InMemorySaver() if review else None)
    config: RunnableConfig = {"configurable": {"thread_id": "run"}} if review else {}
    inputs: Any = {
        "topic": rt.task.topic,
        "max_analysts": rt.task.max_analysts,
        "max_num_turns": rt.task.max_turns,
        "human_analyst_feedback": rt.task.feedback,
    }
    while True:
        state = await graph.ainvoke(inputs, config, context=rt.config(human_review=review))
        interrupts = state.get("__interrupt__") if isinstance(state, dict) else None
        if not interrupts:
            break
        assert ask_feedback is not None
        inputs = Command(resume=ask_feedback(interrupts[0].value["analysts"]))
    report = state.get("report")
    if not isinstance(report, Report):
        raise WorkerError("the graph finished without a report")
    return RunResult(report, sorted(state.get("sections", []), key=lambda s: s.index))
