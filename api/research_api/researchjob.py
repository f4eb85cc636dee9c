"""The ResearchJob API (group researchops.io, version v1alpha1): typed spec and status.

These pydantic models are the one source of truth: ``research_api.crd`` turns them into the
CustomResourceDefinition in ``crds/`` (with descriptions, defaults, ranges, enums and CEL rules),
and the operator parses every object it reconciles through them. Field names are camelCase on the
wire (aliases) and snake_case in Python.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import ConfigDict, Field

from research_api.apimodel import MONEY_PATTERN
from research_api.apimodel import ApiModel as ApiModel
from research_api.status import (
    TERMINAL_PHASES as TERMINAL_PHASES,
)
from research_api.status import (
    AnalystStatus as AnalystStatus,
)
from research_api.status import (
    BatchCounts as BatchCounts,
)
from research_api.status import (
    Condition as Condition,
)
from research_api.status import (
    EstimateStatus as EstimateStatus,
)
from research_api.status import (
    Phase as Phase,
)
from research_api.status import (
    QualityStatus as QualityStatus,
)
from research_api.status import (
    ReportRef as ReportRef,
)
from research_api.status import (
    ResearchJobStatus as ResearchJobStatus,
)
from research_api.status import (
    StepUsage as StepUsage,
)

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
    endpoint: str | None = Field(
        None,
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description=(
            "A ModelEndpoint the admins declared for this namespace (its namespaceSelector), by name: the worker "
            "pods call it through the operator, with the key the admins gave it, so the ResearchJob names no "
            "baseUrl and no apiKeySecretRef."
        ),
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
            "the strings of a structured answer get a maxLength from it (not on OpenAI, whose strict mode "
            "refuses it), and a structured answer cut off at this bound fails the step with that reason."
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
    """Limits that end the job as Failed when reached, and ceilings on its estimate that hold it before it starts."""

    max_tokens: int | None = Field(
        None,
        ge=1000,
        description=(
            "Most LLM tokens (prompt + completion) the whole job may use. With a ModelEndpoint and the lease "
            "broker, each call reserves its worst case (its prompt and spec.model.maxOutputTokens) before it is "
            "sent, so the job never passes it: a call that cannot fit fails the job (BudgetExceeded)."
        ),
    )
    max_cost: str | None = Field(
        None,
        pattern=MONEY_PATTERN,
        description=(
            'Most the whole job may cost at its ModelEndpoint\'s prices (spec.prices), a decimal string, e.g. "5.00"; '
            "reserved before each call like maxTokens. Needs a ModelEndpoint with prices and the lease broker."
        ),
    )
    deadline_seconds: int | None = Field(
        None, ge=60, le=7 * 24 * 3600, description="Seconds from start after which the job fails (60-604800)."
    )
    max_estimated_tokens: int | None = Field(
        None,
        ge=1,
        description=(
            "A ceiling on the estimate: before it starts, the operator estimates the job's tokens from its spec "
            "and documents (status.estimate, as kubectl research submit --estimate prints) and does not start it "
            "while the estimate is above this (condition EstimateExceedsCeiling, phase Pending). Raise it, or "
            "lower the job's size, and it starts. No effect once it has started."
        ),
    )
    max_estimated_cost: str | None = Field(
        None,
        pattern=MONEY_PATTERN,
        description=(
            'The same ceiling in money at the ModelEndpoint\'s prices (spec.prices), a decimal string, e.g. "2.00"; '
            "without prices the cost is unknown and the job does not start (EstimateUnknown)."
        ),
    )


class QualitySpec(ApiModel):
    """The least the report must reach; unset fields take the admins' default (chart value quality)."""

    min_citation_accuracy: int | None = Field(
        None,
        ge=0,
        le=100,
        description=(
            "Percent of cited sentences that must be supported by the passage retrieved from the source "
            "they cite (0-100). Below it a writer runs once more with the failures as feedback; a report "
            "still below it fails the ResearchJob with the figures in its message."
        ),
    )
    min_coverage: int | None = Field(
        None,
        ge=0,
        le=100,
        description=(
            "Percent of the documents relevant to the topic that the report must cite (0-100); the report "
            "writer runs once more naming the ones left out, then the ResearchJob fails below it."
        ),
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
                    "rule": "!has(self.model) || !has(self.model.endpoint) || "
                    "(!has(self.model.baseUrl) && !has(self.model.apiKeySecretRef))",
                    "message": "model.endpoint names a ModelEndpoint, which brings its URL and key: "
                    "leave model.baseUrl and model.apiKeySecretRef out",
                    "fieldPath": ".model.endpoint",
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
    quality: QualitySpec = Field(default_factory=QualitySpec, description="The report quality floor.")
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
            "map is taken as the WorkloadPriorityClass name itself, where admins allow that class in "
            "tenancy.allowedWorkloadPriorityClasses; otherwise it is refused). A higher priority may preempt "
            "running worker Jobs of lower ones, which resume later. Without Kueue it has no effect; "
            "use worker.priorityClassName for pod priority."
        ),
    )
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        description="Seconds after Succeeded or Failed when the ResearchJob and all it made are deleted.",
    )


SourceSpec.model_rebuild()
