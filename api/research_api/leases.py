"""The lease broker's wire contract: per-request leases of a shared model endpoint.

The operator serves it (``research_operator.broker``), the worker calls it
(``research_worker.leases``); neither defines these paths, bodies or timings itself. Every request
carries a ServiceAccount token of the worker pod bound to the broker's own audience
(``TOKEN_AUDIENCE``: a projected token the kubelet writes at ``TOKEN_PATH``, never the pod's API
token), which the broker checks with a TokenReview for that audience: the namespace, the
ServiceAccount and the pod (a Job's pod is named after it) must be those of a worker Job admitted
against the endpoint.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

PATH_HEARTBEAT = "/v1/heartbeat"
PATH_ACQUIRE = "/v1/acquire"
PATH_RELEASE = "/v1/release"
PATH_CLOSE = "/v1/close"
# The model gateway: ``{broker}/gateway/{endpoint}/{path}`` is ``{the endpoint's baseUrl}/{path}``
# with the endpoint's API key (an admin-declared ModelEndpoint with apiKeySecretRef), for pods whose
# ResearchJob names that endpoint. The pod authenticates with the same broker token.
PATH_GATEWAY = "/gateway"

HEARTBEAT_SECONDS = 2.0  # a worker's heartbeat period
SESSION_TTL_SECONDS = 10.0  # a session (and its leases) lapses this long after the last heartbeat
QUIET_MARGIN_SECONDS = 2.0  # a worker waits a TTL and this before it calls under its share
MAX_WAIT_SECONDS = 25.0  # one acquire request waits at most this long; the worker asks again

# The worker's token for the broker: a projected ServiceAccount token volume (serviceAccountToken
# source) valid only for this audience, so a token seen on the wire is no credential for the
# Kubernetes API, and the pod's API token is refused by the broker.
TOKEN_AUDIENCE = "researchops.io/lease-broker"
TOKEN_EXPIRATION_SECONDS = 3600  # the kubelet rotates it at 80 % of its lifetime
TOKEN_VOLUME = "lease-broker-token"
TOKEN_DIR = "/var/run/secrets/researchops.io/lease-broker"  # the volume's mountPath (read-only)
TOKEN_FILE = "token"  # the source's path in the volume
TOKEN_PATH = f"{TOKEN_DIR}/{TOKEN_FILE}"


def gateway_url(broker_url: str, endpoint: str) -> str:
    """The OpenAI-compatible base URL of ModelEndpoint ``endpoint`` through the broker's gateway."""
    return f"{broker_url.rstrip('/')}{PATH_GATEWAY}/{endpoint}"


class Mode(StrEnum):
    LEASE = "lease"  # the worker calls only under leases from the broker
    FALLBACK = "fallback"  # the worker calls under its ConfigMap share (it could not reach the broker)


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class BudgetKind(StrEnum):
    """The budgets a model call is reserved against (research_operator.ledger)."""

    RESEARCH_JOB = "researchJob"  # the ResearchJob's spec.budget.maxTokens / maxCost
    NAMESPACE = "namespace"  # the namespace's budget for the current period (operator settings)


class Reserve(_Wire):
    """A call's worst case, reserved against every budget it falls under before it is sent: an upper
    bound of its prompt's tokens and its output bound (spec.model.maxOutputTokens)."""

    input_tokens: int = Field(ge=0, le=100_000_000)
    output_tokens: int = Field(ge=1, le=100_000_000)


class CallUsage(_Wire):
    """What a call really used, as the endpoint reported it; its reservation is settled to it."""

    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)


class Heartbeat(_Wire):
    endpoint: str = Field(min_length=1, max_length=253)  # the ModelEndpoint's name
    job: str = Field(min_length=1, max_length=253)  # the worker Job's name
    mode: Mode
    carried: int = Field(default=0, ge=0)  # calls in flight under the share
    held: list[str] = Field(default_factory=list, max_length=1024)  # lease ids held
    seen: int = Field(default=0, ge=0)  # the highest grant number received
    tokens: int = Field(default=0, ge=0)  # tokens used since the last heartbeat the broker answered
    # The reservation of each held lease, so that a restarted broker re-declares them against the
    # budgets as it re-declares the leases.
    reserved: dict[str, Reserve] = Field(default_factory=dict, max_length=1024)


class HeartbeatReply(_Wire):
    lost: list[str] = Field(default_factory=list)  # held leases the broker does not know: stop their calls


class Acquire(_Wire):
    endpoint: str = Field(min_length=1, max_length=253)
    job: str = Field(min_length=1, max_length=253)
    wait_seconds: float = Field(default=MAX_WAIT_SECONDS, gt=0, le=MAX_WAIT_SECONDS)
    reserve: Reserve | None = None  # None: a worker that reserves nothing (counted when it stores results)


class BudgetNote(_Wire):
    """Why a call was not granted for a budget: refused (it can never fit: the worker fails with
    the budget-exceeded exit code) or waiting (until other reservations settle, the period rolls
    over at ``until`` or the admins raise the budget)."""

    budget: BudgetKind
    message: str
    until: float | None = None  # seconds from now until the period rolls over (a namespace budget)


class AcquireReply(_Wire):
    lease: str | None = None  # None: none free within the wait; ask again (or see refused / waiting)
    seq: int = 0
    refused: BudgetNote | None = None  # the call can never be paid by this budget: do not send it
    waiting: BudgetNote | None = None  # the call waits for a budget, not for the endpoint


class Release(_Wire):
    lease: str = Field(min_length=1, max_length=64)
    # What the call used; None: unknown (it failed or was cut short after it may have been sent),
    # so its reservation is settled at its worst case.
    usage: CallUsage | None = None


class Close(_Wire):
    pass
