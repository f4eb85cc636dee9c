"""The ModelEndpoint API (group researchops.io, version v1alpha1, cluster-scoped): what one shared
model endpoint can take, declared by the cluster's admins.

Every worker pod of every ResearchJob that calls the endpoint (its base URL, and one of its models
when ``models`` is set) is admitted against it: a pod counts with the requests it can have in
flight, and gets a share of the endpoint's requests and tokens per minute. ``status`` shows what is
admitted now. ``research_api.crd`` generates the CRD from these models, like ResearchJob's.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from research_api.apimodel import MONEY_PATTERN
from research_api.researchjob import ApiModel, Condition

ENDPOINT_KIND = "ModelEndpoint"
ENDPOINT_PLURAL = "modelendpoints"
ENDPOINT_SINGULAR = "modelendpoint"
ENDPOINT_SHORT_NAMES = ["me"]


def normalize_url(url: str) -> str:
    """A base URL as compared between a ModelEndpoint and a ResearchJob (no trailing slash, lower-case
    scheme and host)."""
    url = url.strip().rstrip("/")
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    host, slash, path = rest.partition("/")
    return f"{scheme.lower()}://{host.lower()}{slash}{path}"


class EndpointKeyRef(ApiModel):
    """A key of a Secret in the operator's namespace (the Helm release's): the endpoint's API key,
    which only the operator reads. Tenants never handle it."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Secret, in the operator's namespace.")
    key: str = Field(min_length=1, max_length=253, description="Key within the Secret.")


class SelectorRequirement(ApiModel):
    """One requirement of a label selector, as in Kubernetes' LabelSelectorRequirement."""

    key: str = Field(min_length=1, max_length=317, description="The label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(description="In, NotIn, Exists or DoesNotExist.")
    values: list[str] | None = Field(
        None, max_length=100, description="For In and NotIn: the values (at least one); empty for the others."
    )


class NamespaceSelector(ApiModel):
    """Namespaces by their labels, as Kubernetes' LabelSelector: every matchLabels pair and every
    matchExpressions requirement must hold. An empty selector ({}) selects every namespace."""

    match_labels: dict[str, str] | None = Field(None, description="Labels the namespace must have, with these values.")
    match_expressions: list[SelectorRequirement] | None = Field(
        None, max_length=20, description="Requirements on the namespace's labels."
    )


class Prices(ApiModel):
    """What the endpoint charges, per million tokens, in a currency of the admins' choice (the same for
    every endpoint and every money budget of the cluster)."""

    input_per_million: str = Field(
        "0", pattern=MONEY_PATTERN, description='Price of a million prompt tokens, a decimal string, e.g. "2.50".'
    )
    output_per_million: str = Field(
        "0", pattern=MONEY_PATTERN, description='Price of a million output tokens, a decimal string, e.g. "10".'
    )


class ModelEndpointSpec(ApiModel):
    """The endpoint and its capacity, shared by every worker pod that calls it."""

    base_url: str = Field(
        min_length=1,
        max_length=2000,
        pattern=r"^https?://",
        description=(
            "OpenAI-compatible base URL (ending in /v1), as ResearchJobs name it in spec.model.baseUrl (or the "
            "operator's default endpoint). Compared without a trailing slash."
        ),
    )
    models: list[str] | None = Field(
        None,
        max_length=50,
        description="Model names this capacity is for; empty: every model served at baseUrl.",
    )
    max_concurrent_requests: int = Field(
        ge=1,
        le=100000,
        description=(
            "Most requests in flight at once, all pods together. A worker pod counts with what it can have in "
            "flight (its analysts in flight, at most spec.model.maxConcurrency); pods that do not fit wait."
        ),
    )
    requests_per_minute: int | None = Field(
        None, ge=1, description="Most requests per minute, all pods together; each admitted pod gets a share."
    )
    tokens_per_minute: int | None = Field(
        None, ge=1, description="Most tokens (prompt + completion) per minute, all pods together; shared likewise."
    )
    api_key_secret_ref: EndpointKeyRef | None = Field(
        None,
        description=(
            "The endpoint's API key: a Secret in the operator's namespace, read by the operator only. Worker pods "
            "of a ResearchJob that names this endpoint (spec.model.endpoint) call it through the operator's lease "
            "broker, which adds the key; the key never reaches the tenant's namespace. Needs the lease broker."
        ),
    )
    prices: Prices | None = Field(
        None,
        description=(
            "What a call costs: with prices, every model call of a ResearchJob admitted against this endpoint "
            "reserves its worst-case cost against money budgets (spec.budget.maxCost, namespace budgets with a "
            "cost) before it is sent, and status.cost shows what the ResearchJob spent. Absent: calls cost nothing."
        ),
    )
    namespace_selector: NamespaceSelector | None = Field(
        None,
        description=(
            "Namespaces whose ResearchJobs may name this endpoint in spec.model.endpoint. Absent: none ({} selects "
            "every namespace). ResearchJobs that name the base URL themselves (with their own key) are admitted "
            "against its capacity whatever this says."
        ),
    )


class EndpointShare(ApiModel):
    """What one admitted worker pod may use of the endpoint."""

    namespace: str = Field(description="Namespace of the ResearchJob.")
    research_job: str = Field(description="Name of the ResearchJob.")
    job: str = Field(description="Name of the worker Job.")
    concurrency: int = Field(description="Requests it may have in flight.")
    requests_per_minute: int | None = Field(None, description="Its share of the endpoint's requests per minute.")
    tokens_per_minute: int | None = Field(None, description="Its share of the endpoint's tokens per minute.")


class ModelEndpointStatus(ApiModel):
    """What the operator admitted against the endpoint, rewritten when it changes."""

    observed_generation: int | None = Field(None, description="The spec generation last applied.")
    requests_in_flight_limit: int = Field(
        0, description="Sum of the admitted pods' concurrency: the most requests they can have in flight."
    )
    pods: int = Field(0, description="Worker pods admitted against the endpoint.")
    waiting_research_jobs: int = Field(0, description="ResearchJobs whose worker Jobs wait for capacity.")
    shares: list[EndpointShare] | None = Field(None, description="Each admitted pod's share.")
    conditions: list[Condition] | None = Field(None, description="Conditions per the API conventions.")
