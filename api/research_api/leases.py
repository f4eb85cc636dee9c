"""The lease broker's wire contract: per-request leases of a shared model endpoint.

The operator serves it (``research_operator.lease_broker.broker``), the worker calls it
(``research_worker.leases``); neither defines these paths, bodies or timings itself. Every request
carries a ServiceAccount token of the worker pod bound to the broker's own audience
(``TOKEN_AUDIENCE``: a projected token the kubelet writes at ``TOKEN_PATH``, never the pod's API
token), which the broker checks with a TokenReview for that audience: the namespace, the
ServiceAccount and the pod (a Job's pod is named after it) must be those of a worker Job admitted
against the endpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from enum import StrEnum
from typing import Any

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
# A request through the gateway of a ResearchJob under a budget names the lease (and so the
# reservation) that covers it; the gateway forwards it only if that reservation covers its worst case.
LEASE_HEADER = "X-Researchops-Lease"

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


# The prompt bound (both sides): a byte-level BPE or SentencePiece tokenizer with byte fallback makes at
# most one token per UTF-8 byte; a chat template adds a few tokens per message; a structured answer's
# schema (response_format or tools) is part of the prompt, with its wrapper.
MESSAGE_FRAMING_TOKENS = 16
SCHEMA_FRAMING_TOKENS = 512


def prompt_bound(texts: Iterable[str], schema: str = "") -> int:
    """An upper bound of the prompt tokens of a request whose messages hold ``texts`` and whose
    structured answer has JSON schema ``schema``."""
    total = MESSAGE_FRAMING_TOKENS + sum(len(t.encode()) + MESSAGE_FRAMING_TOKENS for t in texts)
    return total + (len(schema.encode()) + SCHEMA_FRAMING_TOKENS if schema else 0)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p if isinstance(p, str) else str((p or {}).get("text", "")) for p in content)
    return ""


def request_bound(body: bytes) -> tuple[int, int | None] | None:
    """The worst case of an OpenAI chat request as the gateway forwards it: (the prompt bound, the
    output bound: max_completion_tokens or max_tokens, None when the request sets none); None when the
    body is not a chat request. The schemas of response_format and tools count with their bytes, and
    without the framing a worker's reservation adds for them (``SCHEMA_FRAMING_TOKENS``), which so
    covers how the client library words the schema it was given."""
    try:
        data = json.loads(body or b"{}")
        messages = data.get("messages")
        if not isinstance(messages, list):
            return None
        texts = [_content_text(m.get("content")) if isinstance(m, dict) else "" for m in messages]
        extra = {k: data[k] for k in ("response_format", "tools") if data.get(k)}
        schema = len(json.dumps(_schemas(extra)).encode()) if extra else 0
        out = data.get("max_completion_tokens", data.get("max_tokens"))
        return prompt_bound(texts) + schema, int(out) if out is not None else None
    except (ValueError, TypeError, AttributeError):
        return None


def _schemas(extra: dict[str, Any]) -> list[Any]:
    """The JSON schemas a request's response_format and tools carry (what the worker measured)."""
    out: list[Any] = []
    fmt = extra.get("response_format")
    if isinstance(fmt, dict):
        out.append((fmt.get("json_schema") or {}).get("schema") if fmt.get("type") == "json_schema" else fmt)
    for tool in extra.get("tools") or []:
        if isinstance(tool, dict):
            out.append((tool.get("function") or {}).get("parameters"))
    return out


def gateway_url(broker_url: str, endpoint: str) -> str:
    """The OpenAI-compatible base URL of ModelEndpoint ``endpoint`` through the broker's gateway."""
    return f"{broker_url.rstrip('/')}{PATH_GATEWAY}/{endpoint}"


class Mode(StrEnum):
    LEASE = "lease"  # the worker calls only under leases from the broker
    FALLBACK = "fallback"  # the worker calls under its ConfigMap share (it could not reach the broker)


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class BudgetKind(StrEnum):
    """The budgets a model call is reserved against (research_operator.decisions.ledger)."""

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
    # What this pod's calls used that no result it stored holds yet, so that a restarted broker, which
    # knows only the stored usage, counts it against the budgets (taken while it recovers).
    unstored: CallUsage | None = None


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
