"""The ResearchJob's status: phase, conditions, analysts, batches, the report. Written by the
operator only (the status subresource)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import ConfigDict, Field

from research_api.apimodel import ApiModel

# --------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------


class Phase(StrEnum):
    Pending = "Pending"
    Planning = "Planning"
    AwaitingReview = "AwaitingReview"
    Interviewing = "Interviewing"
    Writing = "Writing"
    Succeeded = "Succeeded"
    Failed = "Failed"


TERMINAL_PHASES = frozenset({Phase.Succeeded, Phase.Failed})


class Condition(ApiModel):
    """A condition per the Kubernetes API conventions."""

    type: str = Field(
        description="Condition type: Planned, AwaitingReview, QuotaExceeded, Throttled, WaitingForEndpoint, "
        "TokenBudgetExhausted, WorkerPodsBlocked, PolicyViolation, EstimateAboveCeiling, Complete, Grounded, Failed, "
        "CleanupFailed."
    )
    status: str = Field(description="True, False or Unknown.", pattern=r"^(True|False|Unknown)$")
    reason: str = Field(description="CamelCase reason for the last transition.")
    message: str = Field("", description="Human-readable details.")
    last_transition_time: str = Field(description="When the status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="The spec generation this condition is about.")


class AnalystStatus(ApiModel):
    """A planned analyst persona."""

    name: str = Field(description="Name of the analyst.")
    role: str = Field(description="Role of the analyst in the context of the topic.")
    affiliation: str = Field(description="Primary affiliation of the analyst.")
    description: str = Field(description="The analyst's focus, concerns and motives.")


class BatchCounts(ApiModel):
    """Worker batches by state."""

    total: int = Field(0, description="Batches in the plan.")
    queued: int = Field(0, description="Batches waiting for admission (limits or quota).")
    active: int = Field(0, description="Worker Jobs running.")
    succeeded: int = Field(0, description="Worker Jobs that completed.")
    failed: int = Field(0, description="Worker Jobs that failed beyond their retries.")


class ReportRef(ApiModel):
    """Where the finished report is."""

    config_map: str | None = Field(None, description="ConfigMap holding the report (store configmap).")
    key: str | None = Field(None, description="Data key of the report in that ConfigMap.")
    postgres_id: str | None = Field(None, description="Report id in the PostgreSQL store.")
    title: str | None = Field(None, description="Title of the report.")


class StepUsage(ApiModel):
    """What one step of the current plan used (its stored result's usage)."""

    step: str = Field(description="plan, interview or write.")
    analyst: int | None = Field(None, description="For an interview: the analyst's index.")
    tokens: int = Field(0, description="LLM tokens (prompt + completion).")
    cost: str | None = Field(None, description="Their cost at the ModelEndpoint's prices; absent without prices.")


class QualityStatus(ApiModel):
    """How well the report is supported by its sources and how much of them it covers. Every sentence
    a writer gave a citation is checked against the text retrieved from the source it cites; the first
    figures are the report's own (introduction, body and conclusion), the section ones its sections'."""

    sentences_checked: int = Field(
        0, description="Cited sentences of the report (introduction, body, conclusion) as written, each checked."
    )
    sentences_supported: int = Field(0, description="Of those, supported by the passage retrieved from a cited source.")
    sentences_recited: int = Field(
        0, description="Unsupported ones re-cited to the retrieved source whose passage supports them."
    )
    sentences_dropped: int = Field(0, description="Unsupported ones left out of the report (supported by nothing).")
    citation_accuracy: int = Field(
        100,
        ge=0,
        le=100,
        description="Percent of the report's checked sentences supported as written (rounded down: 100 only "
        "when all are; 0 when the report cites none of the sources retrieved).",
    )
    section_sentences_checked: int = Field(0, description="Cited sentences the section writers wrote, each checked.")
    section_sentences_supported: int = Field(0, description="Of those, supported as written.")
    section_sentences_recited: int = Field(0, description="Of those, re-cited to the source that supports them.")
    section_sentences_dropped: int = Field(0, description="Of those, left out of their section.")
    sources_retrieved: int = Field(0, description="Distinct sources the interviews retrieved.")
    sources_cited: int = Field(0, description="Distinct sources the report cites (its Sources list).")
    relevant_documents: int = Field(0, description="Documents of the documents sources relevant to the topic.")
    relevant_cited: int = Field(0, description="Of those, cited by the report.")
    coverage: int = Field(
        100, ge=0, le=100, description="Percent of relevant documents the report cites (rounded down)."
    )
    unreached_documents: list[str] | None = Field(
        None, description="Relevant documents no analyst's interview retrieved."
    )
    uncited_documents: list[str] | None = Field(
        None, description="Relevant documents retrieved but not cited by the report."
    )
    rewrites: int = Field(0, description="Writings done again, with their failures as feedback, to meet the floor.")
    failures: list[str] | None = Field(None, description="The first unsupported sentences and what was done with them.")


class StepEstimate(ApiModel):
    """The estimate of one step: plan, every interview together, or write."""

    step: str = Field(description="plan, interview (every analyst's together) or write.")
    calls: int = Field(0, description="Model calls.")
    input_tokens: int = Field(0, description="Prompt tokens.")
    output_tokens: int = Field(0, description="Completion tokens.")


class EstimateStatus(ApiModel):
    """What the job is estimated to spend, before it starts (research_api.estimate)."""

    calls: int = Field(0, description="Model calls.")
    input_tokens: int = Field(0, description="Prompt tokens.")
    output_tokens: int = Field(0, description="Completion tokens.")
    tokens: int = Field(0, description="Prompt and completion tokens.")
    cost: str | None = Field(
        None, description="Their cost at the ModelEndpoint's prices (its spec.prices); absent when unknown."
    )
    basis: str = Field("", description="What it was computed from, and what it leaves out.")
    steps: list[StepEstimate] | None = Field(None, description="The figures per step.")


class ResearchJobStatus(ApiModel):
    """Observed state, rebuilt from the child Jobs and the store on every pass."""

    model_config = ConfigDict(extra="ignore")

    phase: Phase = Field(Phase.Pending, description="Where the job is: Pending ... Succeeded or Failed.")
    observed_generation: int | None = Field(None, description="The spec generation last reconciled.")
    progress: str | None = Field(None, description="Sections written over analysts planned, e.g. 3/6.")
    sections_done: int = Field(0, description="Sections written.")
    analysts: list[AnalystStatus] | None = Field(None, description="The planned analyst panel.")
    plan_id: str | None = Field(None, description="Identifies the current plan (changes with feedback).")
    batches: BatchCounts = Field(default_factory=BatchCounts, description="Worker batches by state.")
    active_jobs: list[str] | None = Field(None, description="Names of the running worker Jobs.")
    tokens_used: int = Field(0, description="LLM tokens used so far.")
    cost: str | None = Field(
        None,
        description="What tokensUsed cost at the ModelEndpoint's prices (its spec.prices); absent when it has none.",
    )
    usage: list[StepUsage] | None = Field(
        None, description="Tokens and cost of each stored step of the current plan: plan, each interview, write."
    )
    estimate: EstimateStatus | None = Field(
        None,
        description="What the job was estimated to spend before it started, from its spec and documents "
        "(the figures kubectl research submit --estimate prints); compared with spec.budget.maxEstimatedTokens "
        "and maxEstimatedCost.",
    )
    report: ReportRef | None = Field(None, description="Where the finished report is.")
    quality: QualityStatus | None = Field(None, description="How well the report is supported by its sources.")
    failed_analysts: list[str] | None = Field(None, description="Analysts whose interviews failed.")
    message: str | None = Field(None, description="What is happening now, for humans.")
    waiting_for: str | None = Field(
        None,
        description="Why its next worker Jobs wait (the reason of the condition that holds them: EndpointCapacity, "
        "TokenBudget, ExceededQuota, GlobalCap, ...; PolicyViolation when admins' policy forbids starting it; "
        "EstimateExceedsCeiling or EstimateUnknown while its estimate ceiling holds it); "
        "empty when nothing waits.",
    )
    start_time: str | None = Field(None, description="When work started (RFC 3339).")
    completion_time: str | None = Field(None, description="When the job finished (RFC 3339).")
    conditions: list[Condition] | None = Field(None, description="Conditions per the API conventions.")
    traceparent: str | None = Field(
        None,
        description="W3C traceparent of the ResearchJob's trace when the operator exports traces: its trace id "
        "(the second field) finds the spans of the operator, its worker pods and their model calls.",
    )
