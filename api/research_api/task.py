"""The operator-to-worker task contract: what one worker process (one batch/v1 Job) must do.

Pydantic only, no LLM imports, so the operator can build and validate tasks cheaply. JSON/YAML
uses camelCase (``maxAnalysts``); Python uses snake_case. Secrets never travel in a task: the
model API key, the Tavily key and the PostgreSQL DSN are named by environment variable
(``apiKeyEnv``, ``dsnEnv``), and the Job feeds those variables from Secrets.

The names and labels of the objects the ConfigMap store writes are defined here too, so the
operator finds what the worker stored without guessing.
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "researchops.io"
LABEL_JOB = f"{GROUP}/job"  # the owning ResearchJob's name (hashed when longer than 63)
LABEL_PLAN = f"{GROUP}/plan"  # the plan id
LABEL_KIND = f"{GROUP}/kind"  # analysts | section | report
LABEL_ANALYST = f"{GROUP}/analyst"  # the analyst index of a section
ANNOTATION_JOB_UID = f"{GROUP}/job-uid"
# On the marker ConfigMaps the PostgreSQL store writes for the operator (the rows themselves live
# in PostgreSQL): ANNOTATION_STORE says which store holds the full object, and the report marker
# carries the report's id in that store.
ANNOTATION_STORE = f"{GROUP}/store"
ANNOTATION_POSTGRES_REPORT = f"{GROUP}/postgres-report"

MAX_NAME = 253  # DNS subdomain (ConfigMap names)
MAX_LABEL_VALUE = 63
CONFIGMAP_DATA_LIMIT = 1024 * 1024  # bytes of data a ConfigMap may hold
CONFIGMAP_DATA_KEY = "data.json"  # each stored object, as JSON
CONFIGMAP_REPORT_KEY = "report.md"  # the report also as Markdown, for people

# Defaults, in one place (the worker's configuration reads them from here).
DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
DEFAULT_MAX_ANALYSTS = 3
DEFAULT_MAX_TURNS = 2
DEFAULT_MAX_CONCURRENCY = 4
DEFAULT_MAX_RETRIES = 6
DEFAULT_TIMEOUT_SECONDS = 60.0
# Most tokens one model call may generate. A bound is what keeps a model that does not stop (a base
# model echoing its prompt, a loop) from decoding for minutes; a report body of ten sections fits.
DEFAULT_MAX_OUTPUT_TOKENS = 4096
DEFAULT_DSN_ENV = "RESEARCH_PG_DSN"
DEFAULT_TAVILY_KEY_ENV = "TAVILY_API_KEY"


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
    api_version: str = "researchops.io/v1alpha1"
    kind: str = "ResearchJob"

    def owner_reference(self) -> dict[str, Any]:
        return {"apiVersion": self.api_version, "kind": self.kind, "name": self.name, "uid": self.uid}


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
    max_output_tokens: int | None = Field(default=DEFAULT_MAX_OUTPUT_TOKENS, ge=1)  # per call; None: no bound
    structured_output: StructuredOutput = StructuredOutput.JSON_SCHEMA

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


def plan_id(feedback: str | None) -> str:
    """Identifies a plan: the same review feedback always gives the same plan id."""
    return hashlib.sha256((feedback or "").encode()).hexdigest()[:6]


class ResearchTask(_Model):
    job: JobRef
    step: Step | None = None  # the CLI's step wins; a different one here is an error
    topic: str = Field(min_length=3, max_length=2000)
    max_analysts: int = Field(default=DEFAULT_MAX_ANALYSTS, ge=1, le=50)
    feedback: str | None = None
    plan: str | None = Field(default=None, pattern=r"^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$")
    analysts: list[int] = Field(default_factory=list)  # interview: the batch (empty = every analyst)
    interview_concurrency: int | None = Field(default=None, ge=1)  # interviews in flight (None = all)
    max_turns: int = Field(default=DEFAULT_MAX_TURNS, ge=1, le=10)
    model: ModelSettings = Field(default_factory=ModelSettings)
    sources: list[Source] = Field(min_length=1)
    store: StoreSettings = Field(default_factory=ConfigMapStoreSettings)
    budget: Budget = Field(default_factory=Budget)

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
        return self.plan or plan_id(self.feedback)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True, exclude_none=True))


def postgres_report_id(job_uid: str, plan: str) -> str:
    """The id of a report in the PostgreSQL store: ``<job uid>/<plan id>`` (the table's key)."""
    return f"{job_uid}/{plan}"


def parse_postgres_report_id(report_id: str) -> tuple[str, str]:
    uid, sep, plan = report_id.rpartition("/")
    if not sep or not uid or not plan:
        raise ValueError(f"a PostgreSQL report id is <job uid>/<plan id>, not {report_id!r}")
    return uid, plan


def markdown_title(markdown: str) -> str | None:
    """The text of the first level-1 heading (``# Title``), if any."""
    first = next((line for line in markdown.splitlines() if line.startswith("# ")), "")
    return first[2:].strip() or None


def label_value(value: str) -> str:
    """A label value of at most 63 characters (long values end in a hash)."""
    if len(value) <= MAX_LABEL_VALUE:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:8]
    return f"{value[: MAX_LABEL_VALUE - 9].rstrip('-.')}-{digest}"


def configmap_name(job: str, plan: str, kind: str, index: int | None = None) -> str:
    """The deterministic name of a stored object: ``<job>-<plan>-analysts``, ``<job>-<plan>-section-007``."""
    suffix = f"{plan}-{kind}" if index is None else f"{plan}-{kind}-{index:03d}"
    name = f"{job}-{suffix}"
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(job.encode()).hexdigest()[:8]
    return f"{job[: MAX_NAME - len(suffix) - 10].rstrip('-.')}-{digest}-{suffix}"
