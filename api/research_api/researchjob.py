"""The ResearchJob API (group researchops.io, version v1alpha1): typed spec and status.

These pydantic models are the one source of truth: ``research_api.crd`` turns them into the
CustomResourceDefinition in ``crds/`` (with descriptions, defaults, ranges, enums and CEL rules),
and the operator parses every object it reconciles through them. Field names are camelCase on the
wire (aliases) and snake_case in Python.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "researchops.io"
VERSION = "v1alpha1"
KIND = "ResearchJob"
PLURAL = "researchjobs"
SINGULAR = "researchjob"
SHORT_NAMES = ["rj"]

# Limits that the CRD enforces and the operator relies on.
MAX_ANALYSTS = 50
MAX_BATCH_SIZE = 10
MAX_ACTIVE_JOBS = 50
MAX_TURNS = 10

# A Kubernetes quantity: the API server accepts a string ("250m", "1Gi") or a whole number (1),
# so a number is taken as its string form here; the type stays str.
Quantity = Annotated[
    str,
    Field(
        pattern=r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$",
        coerce_numbers_to_str=True,
        json_schema_extra={"x-kubernetes-int-or-string": True, "minimum": 0},
    ),
]


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are rejected."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def wire(self) -> dict[str, Any]:
        """The JSON form as stored in the API server (camelCase, no unset optionals)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# --------------------------------------------------------------------------------------------
# spec
# --------------------------------------------------------------------------------------------


class AnalystsSpec(ApiModel):
    """How the panel of analyst personas is planned and reviewed."""

    count: int = Field(3, ge=1, le=MAX_ANALYSTS, description="Number of analyst personas to plan (1-50).")
    review: bool = Field(
        False,
        description=(
            "Wait in phase AwaitingReview after planning until a human approves the analysts "
            "(set approved: true) or gives feedback (set feedback) to plan again."
        ),
    )
    feedback: str | None = Field(
        None,
        max_length=4000,
        description="Human feedback on the planned analysts; a new value plans the panel again with it.",
    )
    approved: bool = Field(False, description="Set to true to approve the planned analysts when review is on.")


class InterviewSpec(ApiModel):
    """How each analyst interviews the expert."""

    max_turns: int = Field(2, ge=1, le=MAX_TURNS, description="Expert answers per interview before it ends (1-10).")


class SourceType(StrEnum):
    documents = "documents"
    tavily = "tavily"
    wikipedia = "wikipedia"


class SourceSpec(ApiModel):
    """One search backend the expert answers from."""

    type: SourceType = Field(
        description="Search backend: documents (a ConfigMap of text/Markdown files), tavily, or wikipedia."
    )
    config_map: str | None = Field(
        None,
        min_length=1,
        max_length=253,
        description="For type documents: the ConfigMap in the job's namespace whose data keys are documents.",
    )
    max_results: int = Field(3, ge=1, le=20, description="Search results per query (1-20).")
    api_key_secret_ref: SecretKeyRef | None = Field(
        None, description="For type tavily: the Secret key holding the Tavily API key."
    )


class SecretKeyRef(ApiModel):
    """A key of a Secret in the ResearchJob's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Secret.")
    key: str = Field(min_length=1, max_length=253, description="Key within the Secret.")


class StructuredOutputMethod(StrEnum):
    json_schema = "json_schema"
    function_calling = "function_calling"
    json_mode = "json_mode"


class ModelSpec(ApiModel):
    """The OpenAI-compatible chat model the analysts, experts and writers use."""

    name: str = Field(
        "offline-research-1", min_length=1, max_length=200, description="Model name sent to the endpoint."
    )
    base_url: str | None = Field(
        None,
        max_length=2000,
        pattern=r"^https?://",
        description=(
            "OpenAI-compatible base URL (ending in /v1). Empty: the operator's default, "
            "the bundled offline model server unless the admins configured another."
        ),
    )
    api_key_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding the API key; never stored in the spec or logged."
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature (0-2).")
    max_concurrency: int = Field(4, ge=1, le=64, description="Concurrent LLM requests per worker pod (1-64).")
    requests_per_second: float = Field(10.0, gt=0, le=1000, description="LLM requests per second per worker pod.")
    max_output_tokens: int = Field(
        4096,
        ge=16,
        le=1_000_000,
        description=(
            "Most tokens one LLM call may generate (16-1000000). Bounds a model that does not stop; "
            "a structured answer cut off at this bound fails the step with that reason."
        ),
    )
    timeout_seconds: int = Field(
        60,
        ge=1,
        le=3600,
        description=(
            "Seconds one LLM call may take, from sending the request to the last token (1-3600). "
            "Raise it for a slow endpoint (a CPU-only model server)."
        ),
    )
    structured_output: StructuredOutputMethod = Field(
        StructuredOutputMethod.json_schema,
        description=(
            "How structured answers are asked for: json_schema (response_format with the schema; "
            "OpenAI, vLLM, llama.cpp's grammar, Ollama), function_calling (a forced tool call) or "
            "json_mode (a JSON object, the schema in the prompt)."
        ),
    )


class ParallelismSpec(ApiModel):
    """How analysts are batched into worker Jobs and how many run at once."""

    batch_size: int = Field(
        2,
        ge=1,
        le=MAX_BATCH_SIZE,
        description="Analysts per worker Job (1-10); they run concurrently in the pod.",
    )
    max_active_jobs: int = Field(
        2,
        ge=1,
        le=MAX_ACTIVE_JOBS,
        description=(
            "Most worker Jobs of this ResearchJob running at once (1-50). Admin caps and "
            "namespace ResourceQuotas may allow fewer."
        ),
    )


class Toleration(ApiModel):
    """A Kubernetes toleration for the worker pods."""

    key: str | None = Field(None, description="Taint key the toleration applies to.")
    operator: str | None = Field(None, description="Exists or Equal.", pattern=r"^(Exists|Equal)$")
    value: str | None = Field(None, description="Taint value the toleration matches.")
    effect: str | None = Field(
        None,
        description="NoSchedule, PreferNoSchedule or NoExecute.",
        pattern=r"^(NoSchedule|PreferNoSchedule|NoExecute)$",
    )
    toleration_seconds: int | None = Field(None, description="How long a NoExecute taint is tolerated.")


class ResourceList(ApiModel):
    """cpu and memory quantities."""

    cpu: Quantity | None = Field(None, description="CPU quantity, e.g. 250m.")
    memory: Quantity | None = Field(None, description="Memory quantity, e.g. 512Mi.")


class ResourcesSpec(ApiModel):
    """Requests and limits of each worker pod's container."""

    requests: ResourceList = Field(
        default_factory=lambda: ResourceList(cpu="100m", memory="256Mi"),
        description="Resources requested by each worker pod.",
    )
    limits: ResourceList = Field(
        default_factory=lambda: ResourceList(cpu="1", memory="1Gi"),
        description="Resource limits of each worker pod.",
    )


class WorkerSpec(ApiModel):
    """Scheduling and resources of the worker pods."""

    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Requests and limits.")
    node_selector: dict[str, str] | None = Field(None, description="Node labels the worker pods must match.")
    tolerations: list[Toleration] | None = Field(None, description="Tolerations of the worker pods.")
    priority_class_name: str | None = Field(None, max_length=253, description="PriorityClass of the worker pods.")


class BudgetSpec(ApiModel):
    """Limits that end the job as Failed when reached."""

    max_tokens: int | None = Field(
        None, ge=1000, description="Most LLM tokens (prompt + completion) the whole job may use."
    )
    deadline_seconds: int | None = Field(
        None, ge=60, le=7 * 24 * 3600, description="Seconds from start after which the job fails (60-604800)."
    )


class StoreType(StrEnum):
    configmap = "configmap"
    postgres = "postgres"


class StoreSpec(ApiModel):
    """Where analysts, sections and the report are kept."""

    type: StoreType = Field(
        StoreType.configmap,
        description="configmap (ConfigMaps owned by the ResearchJob) or postgres (an external PostgreSQL).",
    )
    dsn_secret_ref: SecretKeyRef | None = Field(
        None, description="For postgres: the Secret key holding the connection string (DSN)."
    )


class RetriesSpec(ApiModel):
    """Retries of failed worker pods."""

    backoff_limit: int = Field(
        2, ge=0, le=10, description="Pod retries per worker Job before the batch counts as failed (0-10)."
    )


class ResearchJobSpec(ApiModel):
    """What to research and how to run it on the cluster."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!self.sources.exists(s, s.type == 'documents' && !has(s.configMap))",
                    "message": "a source of type documents needs configMap: the ConfigMap holding the documents",
                    "fieldPath": ".sources",
                },
                {
                    "rule": "self.store.type != 'postgres' || has(self.store.dsnSecretRef)",
                    "message": "store type postgres needs store.dsnSecretRef: the Secret key holding the DSN",
                    "fieldPath": ".store.dsnSecretRef",
                    "reason": "FieldValueRequired",
                },
                {
                    "rule": "!self.sources.exists(s, s.type == 'tavily' && !has(s.apiKeySecretRef))",
                    "message": "a source of type tavily needs apiKeySecretRef: the Secret key holding the Tavily key",
                    "fieldPath": ".sources",
                },
            ]
        }
    )

    topic: str = Field(min_length=3, max_length=2000, description="The research topic.")
    analysts: AnalystsSpec = Field(default_factory=AnalystsSpec, description="The analyst panel.")
    interview: InterviewSpec = Field(default_factory=InterviewSpec, description="Interview settings.")
    sources: list[SourceSpec] = Field(
        min_length=1, max_length=5, description="Search backends the experts answer from (1-5)."
    )
    model: ModelSpec = Field(default_factory=ModelSpec, description="The chat model.")
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec, description="Batching and parallelism.")
    worker: WorkerSpec = Field(default_factory=WorkerSpec, description="Worker pod settings.")
    budget: BudgetSpec = Field(default_factory=BudgetSpec, description="Token and time budget.")
    store: StoreSpec = Field(default_factory=StoreSpec, description="Where results are stored.")
    retries: RetriesSpec = Field(default_factory=RetriesSpec, description="Retry policy.")
    priority: str | None = Field(
        None,
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description=(
            "Priority of the worker Jobs when the operator runs in Kueue mode: a name the operator maps "
            "to a Kueue WorkloadPriorityClass (chart value kueue.priorityClasses; a name not in that "
            "map is taken as the WorkloadPriorityClass name itself). A higher priority may preempt "
            "running worker Jobs of lower ones, which resume later. Without Kueue it has no effect; "
            "use worker.priorityClassName for pod priority."
        ),
    )
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        description="Seconds after Succeeded or Failed when the ResearchJob and all it made are deleted.",
    )


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
        "TokenBudgetExhausted, WorkerPodsBlocked, Complete, Failed, CleanupFailed."
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
    report: ReportRef | None = Field(None, description="Where the finished report is.")
    failed_analysts: list[str] | None = Field(None, description="Analysts whose interviews failed.")
    message: str | None = Field(None, description="What is happening now, for humans.")
    waiting_for: str | None = Field(
        None,
        description="Why its next worker Jobs wait (the reason of the condition that holds them: EndpointCapacity, "
        "TokenBudget, ExceededQuota, GlobalCap, ...); empty when nothing waits.",
    )
    start_time: str | None = Field(None, description="When work started (RFC 3339).")
    completion_time: str | None = Field(None, description="When the job finished (RFC 3339).")
    conditions: list[Condition] | None = Field(None, description="Conditions per the API conventions.")


SourceSpec.model_rebuild()
