"""The records a worker stores and the operator reads: one pydantic model per stored object.

The ConfigMap store keeps each object whole under ``data.json`` (``AnalystPlan``, ``Section``,
``Report``). The PostgreSQL store keeps them in tables and writes, for the operator, marker
ConfigMaps of the same names and labels: the whole ``AnalystPlan``, and a ``SectionMarker`` or
``ReportMarker`` in place of a section or the report (annotated ``ANNOTATION_STORE: postgres``).
``stored_record`` reads any of them back. Unknown fields are ignored, so an operator reads what a
newer worker wrote.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from pydantic import BaseModel, Field

from research_api.names import CONFIGMAP_DATA_KEY
from research_api.task import QualityFloor

MARKER_STORE = "postgres"  # the ANNOTATION_STORE value of the PostgreSQL store's markers


class StoredKind(StrEnum):
    """The LABEL_KIND of a stored object."""

    ANALYSTS = "analysts"
    SECTION = "section"
    REPORT = "report"


class TokenUsage(BaseModel):
    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    calls: int = 0
    rate_limited: int = 0  # 429 answers the endpoint gave (retried) during these calls

    def __add__(self, other: TokenUsage) -> TokenUsage:
        return TokenUsage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
            calls=self.calls + other.calls,
            rate_limited=self.rate_limited + other.rate_limited,
        )


class Analyst(BaseModel):
    """An analyst persona. Also the schema the worker asks the model for (hence the descriptions)."""

    affiliation: str = Field(description="Primary affiliation of the analyst.")
    name: str = Field(description="Name of the analyst.")
    role: str = Field(description="Role of the analyst in the context of the topic.")
    description: str = Field(description="Description of the analyst focus, concerns, and motives.")

    @property
    def persona(self) -> str:
        return (
            f"Name: {self.name}\nRole: {self.role}\nAffiliation: {self.affiliation}\nDescription: {self.description}\n"
        )


class AnalystPlan(BaseModel):
    """The ``analysts`` object: the planned panel (in both stores, and whole in its marker)."""

    topic: str
    feedback: str | None = None
    analysts: list[Analyst]
    usage: TokenUsage = TokenUsage()
    # per analyst, the local documents relevant to the topic it is to reach (research_worker.coverage)
    documents: list[list[str]] = Field(default_factory=list)


class CitationCheck(BaseModel):
    """What checking a writer's cited sentences against the retrieved text found (research_worker.grounding)."""

    checked: int = 0  # sentences that carried a citation, as the model wrote them
    supported: int = 0  # ... supported by the retrieved text of a source they cite
    recited: int = 0  # ... not, but by another retrieved source's passage: re-cited to it
    dropped: int = 0  # ... supported by nothing retrieved: left out
    failures: list[str] = Field(default_factory=list)  # the first unsupported sentences, and what was done
    revised: int = 0  # writings done again with their failures as feedback (a quality floor was missed)

    def __add__(self, other: CitationCheck) -> CitationCheck:
        return CitationCheck(
            checked=self.checked + other.checked,
            supported=self.supported + other.supported,
            recited=self.recited + other.recited,
            dropped=self.dropped + other.dropped,
            failures=(self.failures + other.failures)[:20],
            revised=self.revised + other.revised,
        )

    @property
    def accuracy_percent(self) -> int:
        """Supported cited sentences as written, in whole percent rounded down (100 only when all are)."""
        return 100 if not self.checked else (100 * self.supported) // self.checked


class Evidence(BaseModel):
    """One passage an interview retrieved: what a citation of ``source`` is checked against."""

    source: str
    title: str = ""
    content: str


class ReportQuality(BaseModel):
    """How well a report is supported by its sources and how much of them it covers. The citation
    figures that count are the report's own (introduction, body and conclusion as their writers wrote
    them): that is what is delivered. The sections' are kept beside them: their unsupported sentences
    were repaired before the report was written from them."""

    sections: CitationCheck = Field(default_factory=CitationCheck)  # the section writers' cited sentences
    report: CitationCheck = Field(default_factory=CitationCheck)  # introduction, body and conclusion
    sources_retrieved: int = 0  # distinct sources the interviews retrieved
    sources_cited: int = 0  # distinct sources the report cites (= its Sources list)
    relevant: list[str] = Field(default_factory=list)  # local documents relevant to the topic
    relevant_cited: int = 0
    unreached: list[str] = Field(default_factory=list)  # relevant documents no interview retrieved
    uncited: list[str] = Field(default_factory=list)  # relevant documents retrieved but not cited

    @property
    def total(self) -> CitationCheck:
        """Every writer's figures together (the sections' and the report's)."""
        return self.sections + self.report

    @property
    def cites_nothing(self) -> bool:
        """Sources were retrieved but no sentence of the report cites one: nothing in it is grounded."""
        return self.report.checked == 0 and self.sources_retrieved > 0

    @property
    def accuracy_percent(self) -> int:
        """The report's cited sentences supported as written, in whole percent; 0 for a report that cites
        nothing it could have cited (a vacuous 100 would pass any floor)."""
        return 0 if self.cites_nothing else self.report.accuracy_percent

    @property
    def coverage_percent(self) -> int:
        """Relevant documents the report cites, in whole percent rounded down (100 with none relevant)."""
        return 100 if not self.relevant else (100 * self.relevant_cited) // len(self.relevant)

    def _accuracy(self) -> str:
        r = self.report
        return (
            f"citation accuracy {self.accuracy_percent}% ({r.supported} of {r.checked} cited sentences supported; "
            f"{r.recited} re-cited, {r.dropped} dropped)"
        )

    def figures(self) -> str:
        """The figures in one line, for a message."""
        s = self.sections
        return (
            f"{self._accuracy()}, coverage {self.coverage_percent}% ({self.relevant_cited} of {len(self.relevant)} "
            f"relevant documents cited), {self.sources_cited} of {self.sources_retrieved} retrieved sources cited; "
            f"sections: {s.supported} of {s.checked} cited sentences supported ({s.recited} re-cited, "
            f"{s.dropped} dropped)"
        )

    def misses(self, floor: QualityFloor) -> list[str]:
        """What of the report's figures misses ``floor``, in words (empty: it meets it)."""
        out = []
        if floor.min_citation_accuracy is not None and self.cites_nothing:
            out.append(
                f"the report cites none of the {self.sources_retrieved} sources retrieved (citation accuracy 0%, "
                f"below {floor.min_citation_accuracy}%)"
            )
        elif floor.min_citation_accuracy is not None and self.accuracy_percent < floor.min_citation_accuracy:
            out.append(f"{self._accuracy()} is below {floor.min_citation_accuracy}%")
        if floor.min_coverage is not None and self.coverage_percent < floor.min_coverage:
            missing = self.unreached + self.uncited
            out.append(
                f"coverage {self.coverage_percent}% ({self.relevant_cited} of {len(self.relevant)} relevant "
                f"documents cited; not cited: {', '.join(missing)}) is below {floor.min_coverage}%"
            )
        return out


class Section(BaseModel):
    """A ``section`` object: a written report section; ``[n]`` in ``content`` cites ``sources[n-1]``."""

    index: int
    analyst: Analyst
    title: str
    content: str  # markdown: "## title", "### Summary", "### Sources"
    summary: str
    sources: list[str]
    found_sources: bool
    usage: TokenUsage = Field(default_factory=TokenUsage)
    # every passage the interview retrieved (the report's citations are checked against them too)
    evidence: list[Evidence] = Field(default_factory=list)
    check: CitationCheck = Field(default_factory=CitationCheck)


class Report(BaseModel):
    """The ``report`` object: the finished report."""

    topic: str
    markdown: str
    sources: list[str]
    sections: list[int]
    usage: TokenUsage = Field(default_factory=TokenUsage)
    quality: ReportQuality | None = None


class SectionMarker(BaseModel):
    """What a section marker holds: enough for progress and token accounting, not the content."""

    index: int
    analyst: str
    title: str
    found_sources: bool
    sources: int
    usage: TokenUsage


class ReportMarker(BaseModel):
    """What the report marker holds; the report itself is read from PostgreSQL by ``postgres_id``."""

    title: str | None
    postgres_id: str
    sections: list[int]
    sources: int
    usage: TokenUsage
    quality: ReportQuality | None = None


StoredRecord = AnalystPlan | Section | Report | SectionMarker | ReportMarker

RECORD_TYPES: dict[tuple[StoredKind, bool], type[StoredRecord]] = {
    (StoredKind.ANALYSTS, False): AnalystPlan,
    (StoredKind.ANALYSTS, True): AnalystPlan,
    (StoredKind.SECTION, False): Section,
    (StoredKind.SECTION, True): SectionMarker,
    (StoredKind.REPORT, False): Report,
    (StoredKind.REPORT, True): ReportMarker,
}


def stored_record(kind: StoredKind, data: Mapping[str, str], marker: bool) -> StoredRecord:
    """The record under ``data.json`` of a stored ConfigMap of ``kind`` (``marker``: of the PostgreSQL
    store). Raises pydantic's ValidationError (a ValueError) when it is not that record."""
    model = RECORD_TYPES[(kind, marker)]
    return model.model_validate_json(data.get(CONFIGMAP_DATA_KEY) or "{}")


def markdown_title(markdown: str) -> str | None:
    """The text of the first level-1 heading (``# Title``), if any."""
    first = next((line for line in markdown.splitlines() if line.startswith("# ")), "")
    return first[2:].strip() or None
