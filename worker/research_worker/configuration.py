"""The graphs' runtime configuration (LangGraph ``context_schema``): typed settings with their
defaults in one place (the task contract's defaults, ``research_api.task``), plus the process's
shared model client and search backends."""

from __future__ import annotations

from dataclasses import dataclass, field

from research_api.task import DEFAULT_MAX_ANALYSTS, DEFAULT_MAX_TURNS, QualityFloor, ResearchTask
from research_worker.llm import LLMClient
from research_worker.search import SearchBackend


@dataclass(kw_only=True)
class Configuration:
    llm: LLMClient
    backends: list[SearchBackend] = field(default_factory=list)
    max_analysts: int = DEFAULT_MAX_ANALYSTS
    max_num_turns: int = DEFAULT_MAX_TURNS
    human_review: bool = False  # interrupt after planning for feedback (``run --review``)
    quality: QualityFloor = field(default_factory=QualityFloor)  # below it a writer runs once more

    @property
    def backend_names(self) -> list[str]:
        return [b.name for b in self.backends]

    @property
    def documents(self) -> dict[str, str]:
        """The local documents (of the documents source), by name."""
        out: dict[str, str] = {}
        for b in self.backends:
            out.update(getattr(b, "documents", None) or {})
        return out

    def backend(self, name: str) -> SearchBackend:
        for b in self.backends:
            if b.name == name:
                return b
        raise KeyError(name)

    @classmethod
    def from_task(
        cls, task: ResearchTask, llm: LLMClient, backends: list[SearchBackend], *, human_review: bool = False
    ) -> Configuration:
        return cls(
            llm=llm,
            backends=backends,
            max_analysts=task.max_analysts,
            max_num_turns=task.max_turns,
            human_review=human_review,
            quality=task.quality,
        )
