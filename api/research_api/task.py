"""The operator-to-worker task contract: what one worker process (one batch/v1 Job) must do.

Pydantic only, no LLM imports, so the operator can build and validate tasks cheaply. JSON/YAML
uses camelCase (``maxAnalysts``); Python uses snake_case. Secrets never travel in a task: the
model API key, the Tavily key and the PostgreSQL DSN are named by environment variable
(``apiKeyEnv``, ``dsnEnv``), and the Job feeds those variables from Secrets.

The rest of the operator-worker contract is beside it: the variables (``environment``), the exit
codes (``exitcodes``), the names and labels (``names``) and the stored records (``records``).
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from research_api.environment import API_KEY_ENV, DSN_ENV, TAVILY_KEY_ENV
from research_api.researchjob import GROUP, KIND, VERSION
from research_api.tracing import TRACEPARENT_PATTERN

# Defaults, in one place (the worker's configuration reads them from here).
DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_API_KEY_ENV = API_KEY_ENV
DEFAULT_MAX_ANALYSTS = 3
DEFAULT_MAX_TURNS = 2
DEFAULT_MAX_CONCURRENCY = 4
DEFAULT_MAX_RETRIES = 6
DEFAULT_TIMEOUT_SECONDS = 60.0
# Most tokens one model call may generate. A bound is what keeps a model that does not stop (a base
# model echoing its prompt, a loop) from decoding for minutes; a report body of ten sections fits.
DEFAULT_MAX_OUTPUT_TOKENS = 4096
DEFAULT_DSN_ENV = DSN_ENV
DEFAULT_TAVILY_KEY_ENV = TAVILY_KEY_ENV


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class Step(StrEnum):
    PLAN = "plan"
    INTERVIEW = "interview"
    WRITE = "write"
    RUN = "run"
    CLEANUP = "cleanup"  # delete every PostgreSQL row and checkpoint of a job uid


class JobRef(_Model):
    """The ResearchJob this task belongs to; the stored objects are owned by it."""

    namespace: str = Field(min_length=1, max_length=63)
    name: str = Field(min_length=1, max_length=253)
    uid: str = Field(min_length=1)
    api_version: str = f"{GROUP}/{VERSION}"
    kind: str = KIND

    def owner_reference(self) -> dict[str, Any]:
        return {"apiVersion": self.api_version, "kind": self.kind, "name": self.name, "uid": self.uid}


class EndpointShareRef(_Model):
    """This pod's share of a shared model endpoint (a ModelEndpoint): the first one, and where the
    operator keeps the current one (a ConfigMap in the job's namespace, key ``shares.json``, this
    Job's entry under ``jobs.<key>``), which the worker polls every ``poll_seconds``."""

    config_map: str = Field(min_length=1, max_length=253)
    key: str = Field(min_length=1, max_length=253)
    poll_seconds: float = Field(default=2.0, gt=0)
    concurrency: int = Field(ge=0)
    requests_per_minute: int | None = Field(default=None, ge=0)
    tokens_per_minute: int | None = Field(default=None, ge=0)
    # The operator's lease broker (research_api.leases): with it, each model call takes a lease of
    # the endpoint ``endpoint`` and the share above is only the fallback when the broker is unreachable.
    broker_url: str | None = Field(default=None, pattern=r"^https?://")
    endpoint: str | None = Field(default=None, min_length=1, max_length=253)


SHARES_KEY = "shares.json"  # the key of the shares ConfigMap's data (EndpointShares as JSON)


class ShareEntry(_Model):
    """One admitted Job's share of a shared endpoint: requests in flight, and its part of the
    endpoint's requests and tokens per minute."""

    concurrency: int = Field(ge=0)
    requests_per_minute: int | None = Field(default=None, ge=0)
    tokens_per_minute: int | None = Field(default=None, ge=0)


class EndpointShares(_Model):
    """What the operator writes, and the pods of one ResearchJob poll, under ``SHARES_KEY`` of its
    shares ConfigMap: each of its admitted Jobs' current share of ModelEndpoint ``endpoint``."""

    endpoint: str = ""
    jobs: dict[str, ShareEntry] = Field(default_factory=dict)

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)


class StructuredOutput(StrEnum):
    """How a structured answer (the analysts, a search query) is asked of the model."""

    JSON_SCHEMA = "json_schema"  # response_format json_schema: OpenAI, vLLM, llama.cpp (grammar), Ollama
    FUNCTION_CALLING = "function_calling"  # a forced tool call, for endpoints without json_schema
    JSON_MODE = "json_mode"  # response_format json_object plus the schema in the prompt


class ModelSettings(_Model):
    name: str = DEFAULT_MODEL
    base_url: str | None = None  # None: the provider's default (OpenAI)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    max_concurrency: int = Field(default=DEFAULT_MAX_CONCURRENCY, ge=1, le=256)
    requests_per_second: float | None = Field(default=None, gt=0)
    api_key_env: str = Field(default=DEFAULT_API_KEY_ENV, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    max_retries: int = Field(default=DEFAULT_MAX_RETRIES, ge=0, le=20)
    timeout_seconds: float = Field(default=DEFAULT_TIMEOUT_SECONDS, gt=0)
    share: EndpointShareRef | None = None  # set when the endpoint's capacity is shared (ModelEndpoint)
    max_output_tokens: int | None = Field(default=DEFAULT_MAX_OUTPUT_TOKENS, ge=1)  # per call; None: no bound
    structured_output: StructuredOutput = StructuredOutput.JSON_SCHEMA
    # base_url is the lease broker's gateway to an admin-declared ModelEndpoint: the worker sends its
    # broker token (research_api.leases.TOKEN_PATH), the broker the endpoint's key.
    gateway: bool = False
    # The lease broker's CA (PEM) when it serves TLS (an https broker URL): the worker trusts it alone
    # for the broker and the gateway.
    broker_ca: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_key_in_task(cls, data: Any) -> Any:
        if isinstance(data, dict) and ({"apiKey", "api_key"} & data.keys()):
            raise ValueError("the API key must not be in the task: name its variable with apiKeyEnv")
        return data


class DocumentsSource(_Model):
    """Local text/Markdown documents, ranked with BM25: a folder, or a ConfigMap in the job's namespace."""

    type: Literal["documents"] = "documents"
    path: str | None = None
    config_map: str | None = None
    top_k: int = Field(default=3, ge=1, le=50)

    @model_validator(mode="after")
    def _one_location(self) -> DocumentsSource:
        if (self.path is None) == (self.config_map is None):
            raise ValueError("a documents source needs exactly one of path or configMap")
        return self


class TavilySource(_Model):
    type: Literal["tavily"] = "tavily"
    max_results: int = Field(default=3, ge=1, le=20)
    api_key_env: str = DEFAULT_TAVILY_KEY_ENV


class WikipediaSource(_Model):
    type: Literal["wikipedia"] = "wikipedia"
    max_docs: int = Field(default=2, ge=1, le=10)
    lang: str = "en"


Source = Annotated[DocumentsSource | TavilySource | WikipediaSource, Field(discriminator="type")]


class ConfigMapStoreSettings(_Model):
    type: Literal["configmap"] = "configmap"


class PostgresStoreSettings(_Model):
    type: Literal["postgres"] = "postgres"
    dsn_env: str = DEFAULT_DSN_ENV
    # Also write small marker ConfigMaps (names, labels and ownerReference of the ConfigMap store)
    # after each PostgreSQL commit, so the operator sees progress without reading the database.
    # The operator always sets it; off for a worker run by hand outside a cluster.
    markers: bool = False


StoreSettings = Annotated[ConfigMapStoreSettings | PostgresStoreSettings, Field(discriminator="type")]


class Budget(_Model):
    max_tokens: int | None = Field(default=None, ge=1)


class QualityFloor(_Model):
    """The least a writing must reach (whole percent; None: no floor). Below it a writer runs once more
    with its failures as feedback; the operator fails a ResearchJob whose report stays below it."""

    min_citation_accuracy: int | None = Field(default=None, ge=0, le=100)
    min_coverage: int | None = Field(default=None, ge=0, le=100)

    def over(self, default: QualityFloor) -> QualityFloor:
        """This floor, each unset field taken from ``default`` (the admins')."""
        return QualityFloor(
            min_citation_accuracy=self.min_citation_accuracy
            if self.min_citation_accuracy is not None
            else default.min_citation_accuracy,
            min_coverage=self.min_coverage if self.min_coverage is not None else default.min_coverage,
        )


def plan_id(feedback: str | None, job_uid: str = "") -> str:
    """Identifies a plan of one ResearchJob: the same review feedback always gives the same plan id,
    and another ResearchJob (another uid, even under the same name) another one, so the names of its
    Jobs and stored objects are its own."""
    return hashlib.sha256(f"{job_uid}\0{feedback or ''}".encode()).hexdigest()[:6]


class ResearchTask(_Model):
    job: JobRef
    step: Step | None = None  # the CLI's step wins; a different one here is an error
    topic: str = Field(min_length=3, max_length=2000)
    max_analysts: int = Field(default=DEFAULT_MAX_ANALYSTS, ge=1, le=50)
    feedback: str | None = None
    plan: str | None = Field(default=None, pattern=r"^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$")
    analysts: list[int] = Field(default_factory=list)  # interview: the batch (empty = every analyst)
    # Go on in this process when the next step can start here (no new pod, no second start-up): a
    # planner then interviews ``analysts``, and whichever pod stores the plan's last section claims
    # the report and writes it. The operator still runs the next step's Job if this pod does not.
    continue_steps: bool = False
    interview_concurrency: int | None = Field(default=None, ge=1)  # interviews in flight (None = all)
    max_turns: int = Field(default=DEFAULT_MAX_TURNS, ge=1, le=10)
    model: ModelSettings = Field(default_factory=ModelSettings)
    sources: list[Source] = Field(min_length=1)
    store: StoreSettings = Field(default_factory=ConfigMapStoreSettings)
    budget: Budget = Field(default_factory=Budget)
    quality: QualityFloor = Field(default_factory=QualityFloor)
    # W3C traceparent of the span that admitted this worker Job (research_api.tracing): the worker's
    # spans are its children, in the ResearchJob's one trace. None: tracing is off.
    traceparent: str | None = Field(default=None, pattern=TRACEPARENT_PATTERN)

    @model_validator(mode="after")
    def _check(self) -> ResearchTask:
        if len(set(self.analysts)) != len(self.analysts):
            raise ValueError("analysts: an index appears twice")
        bad = [i for i in self.analysts if not 0 <= i < self.max_analysts]
        if bad:
            raise ValueError(f"analysts: indices {bad} are outside 0..{self.max_analysts - 1}")
        kinds = [s.type for s in self.sources]
        if len({k for k in kinds if k != "documents"}) != len([k for k in kinds if k != "documents"]):
            raise ValueError("sources: tavily and wikipedia may each appear once")
        return self

    @property
    def plan_id(self) -> str:
        return self.plan or plan_id(self.feedback, self.job.uid)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True, exclude_none=True))
