"""The interface every store implements: one ResearchJob's results for one plan id."""

from __future__ import annotations

from typing import Any, Protocol

from research_api.records import AnalystPlan, Report, Section, TokenUsage


class Store(Protocol):
    """One ResearchJob's results for one plan id."""

    async def save_analysts(self, plan: AnalystPlan) -> bool: ...  # False: already stored
    async def load_analysts(self) -> AnalystPlan | None: ...
    async def save_section(self, section: Section) -> bool: ...  # False: already stored
    async def list_sections(self) -> list[Section]: ...
    async def section_indices(self) -> set[int]: ...
    async def save_report(self, report: Report) -> bool: ...
    async def load_report(self) -> Report | None: ...
    async def usage(self) -> dict[str, TokenUsage]: ...  # by step ("plan", "interview/3", "write")
    async def claim_report(self, holder: str) -> bool: ...  # False: another pod claimed writing it
    def checkpointer(self) -> Any: ...  # a LangGraph checkpointer, or None
    async def close(self) -> None: ...


def usage_of_results(plan: AnalystPlan | None, sections: list[Section], report: Report | None) -> dict[str, TokenUsage]:
    out: dict[str, TokenUsage] = {}
    if plan is not None:
        out["plan"] = plan.usage
    for s in sections:
        out[f"interview/{s.index}"] = s.usage
    if report is not None:
        out["write"] = report.usage
    return out
