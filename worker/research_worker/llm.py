"""The chat model: one pooled ChatOpenAI per process, bounded concurrency, a request-rate limit,
retries that honour Retry-After, a fail-fast preflight, and token accounting with a budget.

Retries are the openai SDK's (``max_retries``): it retries 408/409/429/5xx, timeouts and
connection errors with exponential backoff (0.5 s doubling to 8 s, jittered), waits what a
``Retry-After`` / ``retry-after-ms`` header says when it is at most 120 s, and never retries any
other 4xx (a 400 such as a prompt over the model's context fails the call at once).

Every call is bounded: ``max_output_tokens`` per answer and ``timeout_seconds`` per request. The
messages are sent with alternating roles (consecutive user or assistant turns merged into one),
as strict chat templates (Gemma, Llama 2, Mistral) require. Every failure becomes a
:class:`~research_worker.errors.WorkerError` that says what happened: a timeout after N s, a
refused request with the endpoint's own reason, a context overflow, an answer cut off at the
output bound or not matching the schema. A structured answer's strings carry a ``maxLength`` from
the output bound (research_worker.bounds), so a grammar-constrained endpoint ends it in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextvars import ContextVar
from typing import Any, TypeVar

import httpx
import openai
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.rate_limiters import InMemoryRateLimiter
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, SecretStr, ValidationError

from research_api import leases as wire
from research_api.task import ModelSettings
from research_api.tracing import enabled as tracing_on
from research_worker.bounds import bounded, strict_subset_only
from research_worker.errors import (
    BudgetExceeded,
    ModelAnswerError,
    ModelAuthError,
    ModelContextExceeded,
    ModelEndpointError,
    ModelEndpointUnreachable,
    ModelRequestRejected,
    ModelTimeout,
    WorkerConfigError,
)
from research_worker.leases import LeaseClient, LeaseLost, Ticket, broker_ssl, broker_token
from research_worker.share import ShareLimiter
from research_worker.state import TokenUsage
from research_worker.stopping import Stop
from research_worker.tracing import chat as chat_span
from research_worker.tracing import propagate

log = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)

PREFLIGHT_TIMEOUT = 5.0
LEASE_LOST_ATTEMPTS = 5  # a call whose lease is lost (the broker unreachable) is made again
PREFLIGHT_ATTEMPTS = 4
# How long the preflight keeps trying to connect: a new pod's network, or a Service whose endpoint
# just became ready, may refuse or drop the first connections for a moment.
PREFLIGHT_CONNECT_WINDOW = 12.0
# A call without an output bound (max_output_tokens None) reserves what the ResearchJob CRD allows at most.
UNBOUNDED_OUTPUT_TOKENS = 1_000_000


def prompt_bound(messages: Sequence[BaseMessage], schema: str = "") -> int:
    """An upper bound of a request's prompt tokens, for its budget reservation
    (``research_api.leases.prompt_bound``: the UTF-8 bytes of every message and of the structured
    answer's schema, with framing). Generous (about four times the tokens of English prose), so a
    reservation is settled below it, never above."""
    return wire.prompt_bound([_text(m.content) for m in messages], schema)


# The lease of the call in progress: a request through the operator's gateway names it (wire.LEASE_HEADER).
_LEASE: ContextVar[str | None] = ContextVar("lease", default=None)


async def _name_lease(request: httpx.Request) -> None:
    lease = _LEASE.get()
    if lease is not None:
        request.headers[wire.LEASE_HEADER] = lease


def usage_of(message: BaseMessage | None) -> TokenUsage:
    meta = getattr(message, "usage_metadata", None) or {}
    return TokenUsage(
        input_tokens=int(meta.get("input_tokens", 0)),
        output_tokens=int(meta.get("output_tokens", 0)),
        total_tokens=int(meta.get("total_tokens", 0)),
        calls=1,
    )


# Sent when no key is configured for a self-hosted endpoint (the offline model server, vLLM, Ollama):
# the OpenAI client needs some bearer value; an endpoint that does check keys answers 401 to it.
NO_KEY = "no-key-configured"


# A key, or a callable that returns the current one (the gateway's rotated broker token).
ApiKey = SecretStr | Callable[[], str]


def _verify(settings: ModelSettings) -> ssl.SSLContext | bool:
    """Through the gateway, trust the lease broker's own CA alone; elsewhere the system's CAs."""
    return broker_ssl(settings.broker_ca) if settings.gateway and settings.broker_ca else True


def _bearer(api_key: ApiKey) -> str:
    return api_key.get_secret_value() if isinstance(api_key, SecretStr) else api_key()


def api_key_for(settings: ModelSettings) -> ApiKey:
    """What authenticates the model calls: through the lease broker's gateway to an admin-declared
    ModelEndpoint, the pod's broker token (read at each request: the kubelet rotates it; the gateway
    adds the endpoint's own key), else the key from ``settings.api_key_env``."""
    if settings.gateway:
        broker_token()  # fail now, with the reason, when the pod has no token
        return broker_token
    return api_key_from_env(settings.api_key_env, settings.base_url)


def api_key_from_env(var: str, base_url: str | None = None) -> SecretStr:
    """The model API key from ``var``. Without one, a self-hosted ``base_url`` is called with no
    real key (it may not need one); OpenAI's own endpoint always needs one."""
    value = os.environ.get(var)
    if value:
        return SecretStr(value)
    if base_url:
        log.info("no API key in $%s; calling %s without one", var, base_url)
        return SecretStr(NO_KEY)
    raise WorkerConfigError(f"the model API key variable {var} is not set (feed it from a Secret)")


def _error_text(resp: httpx.Response) -> str:
    """The error message of an OpenAI-style error answer (``{"error": {"message": ...}}``), cut short."""
    try:
        err = resp.json().get("error")
        text = str(err.get("message") if isinstance(err, dict) else err)
    except (ValueError, AttributeError):
        text = resp.text
    return text[:300]


def _retry_after(resp: httpx.Response, attempt: int) -> float:
    for header, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = resp.headers.get(header)
        if value:
            try:
                return min(float(value) / divisor, 10.0)
            except ValueError:
                pass
    return float(min(0.25 * 2**attempt, 4.0))


async def preflight(settings: ModelSettings, api_key: ApiKey) -> list[str]:
    """``GET {base_url}/models`` with a short timeout: a wrong key or an unreachable endpoint fails
    here in seconds, with a clear message, instead of in a long retry loop. A connection that cannot
    be made is tried again for ``PREFLIGHT_CONNECT_WINDOW`` (a new pod's network or a Service's new
    endpoint may drop the first ones). Returns the model ids."""
    base = (settings.base_url or "https://api.openai.com/v1").rstrip("/")
    url = f"{base}/models"
    headers = {"Authorization": f"Bearer {_bearer(api_key)}"}
    give_up = time.monotonic() + PREFLIGHT_CONNECT_WINDOW
    async with httpx.AsyncClient(timeout=PREFLIGHT_TIMEOUT, verify=_verify(settings)) as client:
        attempt = connects = 0
        while attempt < PREFLIGHT_ATTEMPTS:
            try:
                resp = await client.get(url, headers=headers)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # no request reached it: try again
                pause = min(0.5 * 2**connects, 4.0)
                connects += 1
                if time.monotonic() + pause >= give_up:
                    tried = f"{connects} tries within {PREFLIGHT_CONNECT_WINDOW:.0f}s"
                    if isinstance(exc, httpx.ConnectTimeout):
                        msg = f"did not answer within {PREFLIGHT_TIMEOUT:.0f}s (ConnectTimeout; {tried})"
                    else:
                        msg = f"is unreachable: {exc} ({tried})"
                    raise ModelEndpointUnreachable(f"model endpoint {base} {msg}") from None
                log.warning("model endpoint %s: %s; trying again in %.1fs", base, type(exc).__name__, pause)
                await asyncio.sleep(pause)
                continue
            except httpx.TimeoutException as exc:
                raise ModelEndpointUnreachable(
                    f"model endpoint {base} did not answer within {PREFLIGHT_TIMEOUT:.0f}s ({type(exc).__name__})"
                ) from None
            except httpx.HTTPError as exc:
                raise ModelEndpointUnreachable(f"model endpoint {base} is unreachable: {exc}") from None
            if resp.status_code in (401, 403) and settings.gateway:
                raise ModelAuthError(
                    f"the operator's model gateway refused this pod (HTTP {resp.status_code}): {_error_text(resp)}"
                )
            if resp.status_code in (401, 403) and _bearer(api_key) == NO_KEY:
                raise ModelAuthError(
                    f"model endpoint {base} requires an API key (HTTP {resp.status_code}): "
                    f"set ${settings.api_key_env} from a Secret (spec.model.apiKeySecretRef)"
                )
            if resp.status_code in (401, 403):
                raise ModelAuthError(
                    f"model endpoint {base} rejected the API key from ${settings.api_key_env} (HTTP {resp.status_code})"
                )
            if resp.status_code == 429 or resp.status_code >= 500:
                await asyncio.sleep(_retry_after(resp, attempt))
                attempt += 1
                continue
            if resp.status_code == 404:
                log.warning("model endpoint %s has no /models; skipping the model check", base)
                return []
            if resp.status_code != 200:
                raise ModelEndpointError(f"model endpoint {base}/models answered HTTP {resp.status_code}")
            try:
                ids = [str(m["id"]) for m in resp.json().get("data", [])]
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ModelEndpointError(f"model endpoint {base}/models did not answer a model list") from None
            if ids and settings.name not in ids:
                raise ModelEndpointError(
                    f"model {settings.name!r} is not served by {base} (it serves: {', '.join(ids[:10])})"
                )
            return ids
    raise ModelEndpointUnreachable(f"model endpoint {base} kept answering 429/5xx to the preflight")


# 429 answers seen during the current call (the openai SDK retries them inside one call).
_RATE_LIMITED: ContextVar[list[int] | None] = ContextVar("rate_limited", default=None)


async def _count_429(response: httpx.Response) -> None:
    if response.status_code == 429:
        box = _RATE_LIMITED.get()
        if box is not None:
            box[0] += 1


def _text(content: str | list[str | dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(part if isinstance(part, str) else str(part.get("text", "")) for part in content)


def alternate_roles(messages: Sequence[BaseMessage]) -> list[BaseMessage]:
    """The messages as strict chat templates accept them: the system messages first, as one, then
    user and assistant turns that alternate. Consecutive turns of one role are merged into one
    (their texts joined by a blank line), so no content is lost; the order is kept."""
    system = [m for m in messages if isinstance(m, SystemMessage)]
    out: list[BaseMessage] = []
    if system:
        out.append(SystemMessage(content="\n\n".join(_text(m.content) for m in system)))
    for m in messages:
        if isinstance(m, SystemMessage):
            continue
        prev = out[-1] if out else None
        if prev is not None and not isinstance(prev, SystemMessage) and prev.type == m.type:
            merged = f"{_text(prev.content)}\n\n{_text(m.content)}"
            out[-1] = AIMessage(content=merged) if isinstance(m, AIMessage) else HumanMessage(content=merged)
        else:
            out.append(m)
    return out


# How endpoints say that the prompt is longer than the model's context: OpenAI
# (context_length_exceeded), llama.cpp (exceed_context_size_error), vLLM ("maximum context length"),
# Ollama and others ("context window", "too many tokens", "prompt is too long").
_CONTEXT_OVERFLOW = re.compile(
    r"context_length_exceeded|exceed_context_size|maximum context length|context (size|window|length)"
    r"|prompt is too long|too many tokens|input tokens exceed",
    re.IGNORECASE,
)
# Statuses the SDK retries; any other status was answered to the first attempt.
_RETRIED_STATUSES = frozenset({408, 409, 429})


def _status_detail(exc: openai.APIStatusError) -> str:
    """The endpoint's own reason: its error message, else the start of its body."""
    body = exc.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:500]
    return (exc.message or str(body))[:500]


class LLMClient:
    """What the graph nodes call. One per process; safe to share between concurrent interviews.

    With a shared endpoint (``settings.share``), the requests in flight and the requests and tokens
    per minute follow this pod's share, which ``research_worker.share.follow`` keeps current."""

    def __init__(
        self,
        settings: ModelSettings,
        api_key: ApiKey,
        *,
        max_tokens_budget: int | None = None,
        tokens_used_before: int = 0,
        http_async_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.settings = settings
        if http_async_client is None:
            http_async_client = httpx.AsyncClient(timeout=settings.timeout_seconds, verify=_verify(settings))
        http_async_client.event_hooks.setdefault("response", []).append(_count_429)  # 429s, counted
        if settings.gateway:
            http_async_client.event_hooks.setdefault("request", []).append(_name_lease)
        if tracing_on():
            http_async_client.event_hooks.setdefault("request", []).append(propagate)  # traceparent header
        limiter = (
            InMemoryRateLimiter(
                requests_per_second=settings.requests_per_second,
                check_every_n_seconds=min(0.05, 0.5 / settings.requests_per_second),
                max_bucket_size=max(1.0, settings.requests_per_second),
            )
            if settings.requests_per_second
            else None
        )
        self.model = ChatOpenAI(
            model=settings.name,
            base_url=settings.base_url,
            api_key=api_key,
            temperature=settings.temperature,
            max_retries=settings.max_retries,
            timeout=settings.timeout_seconds,
            max_completion_tokens=settings.max_output_tokens,
            rate_limiter=limiter,
            stream_usage=True,
            http_async_client=http_async_client,
        )
        self._structured: dict[type[BaseModel], tuple[Any, str]] = {}  # the runnable, its schema's JSON
        self._sem = asyncio.Semaphore(settings.max_concurrency)
        share = settings.share
        self.share: ShareLimiter | None = (
            ShareLimiter(
                min(share.concurrency, settings.max_concurrency), share.requests_per_minute, share.tokens_per_minute
            )
            if share is not None
            else None
        )
        self.leases: LeaseClient | None = None  # set when the operator runs a lease broker (share.brokerUrl)
        self.stop: Stop | None = None  # set by the CLI: SIGTERM stops the model calls (research_worker.stopping)
        self.rate_limited = 0  # 429 answers seen by this process
        self.budget = max_tokens_budget
        self.used_before = tokens_used_before
        self.usage = TokenUsage()
        self.stored_usage = TokenUsage()  # of ``usage``, what results this process stored hold

    def stored(self, usage: TokenUsage) -> None:
        """A result holding ``usage`` was stored by this process."""
        self.stored_usage = self.stored_usage + usage

    def unstored(self) -> wire.CallUsage:
        """What this process's calls used that no result it stored holds yet (the lease broker counts
        it against the budgets after a restart)."""
        return wire.CallUsage(
            input_tokens=max(0, self.usage.input_tokens - self.stored_usage.input_tokens),
            output_tokens=max(0, self.usage.output_tokens - self.stored_usage.output_tokens),
        )

    def _check_budget(self) -> None:
        used = self.used_before + self.usage.total_tokens
        if self.budget is not None and used >= self.budget:
            raise BudgetExceeded(f"token budget exhausted: {used} of {self.budget} tokens used")

    def _account(self, usage: TokenUsage) -> None:
        self.usage = self.usage + usage

    @contextlib.asynccontextmanager
    async def _slot(self, reserve: wire.Reserve) -> AsyncIterator[Ticket]:
        if self.leases is not None:
            async with self._sem, self.leases.slot(reserve) as ticket:
                yield ticket
        elif self.share is not None:
            async with self.share.slot():
                yield Ticket()
        else:
            async with self._sem:
                yield Ticket()

    def _tally(self, usage: TokenUsage, box: list[int]) -> TokenUsage:
        self.rate_limited += box[0]
        if self.share is not None:
            self.share.spent(usage.total_tokens)
        if self.leases is not None:
            self.leases.spent(usage.total_tokens)
        return usage.model_copy(update={"rate_limited": box[0]}) if box[0] else usage

    async def _call(
        self,
        runnable: Any,
        messages: Sequence[BaseMessage],
        what: str,
        box: list[int],
        answer: Callable[[Any], BaseMessage | None] = lambda out: out,
        schema: str = "",
    ) -> Any:
        """One model call: ``answer`` picks the message with the usage out of the result, ``schema`` is
        the structured answer's JSON schema (part of the prompt's worst case)."""
        for attempt in range(LEASE_LOST_ATTEMPTS):
            try:
                if self.stop is not None:  # SIGTERM: no new call; the one in flight drained or cancelled
                    sent = asyncio.Event()  # set when the request goes out (after its slot and lease)
                    work = self._call_once(runnable, messages, what, box, answer, schema, sent)
                    return await self.stop.race(work, sent)
                return await self._call_once(runnable, messages, what, box, answer, schema)
            except LeaseLost as exc:
                log.warning("%s: %s (attempt %d of %d)", what, exc, attempt + 1, LEASE_LOST_ATTEMPTS)
        raise ModelEndpointError(f"{what}: the endpoint lease was lost {LEASE_LOST_ATTEMPTS} times in a row")

    async def _call_once(
        self,
        runnable: Any,
        messages: Sequence[BaseMessage],
        what: str,
        box: list[int],
        answer: Callable[[Any], BaseMessage | None],
        schema: str,
        sent_event: asyncio.Event | None = None,
    ) -> Any:
        self._check_budget()
        base = self.settings.base_url or "https://api.openai.com/v1"
        sent = alternate_roles(messages)
        reserve = wire.Reserve(
            input_tokens=prompt_bound(sent, schema),
            output_tokens=self.settings.max_output_tokens or UNBOUNDED_OUTPUT_TOKENS,
        )
        asked = time.monotonic()
        # (the span begins once the slot is had: its duration is the call's; the wait is an attribute)
        async with (
            self._slot(reserve) as ticket,
            chat_span(self.settings, structured=bool(schema), waited=time.monotonic() - asked) as span,
        ):
            _RATE_LIMITED.set(box)
            _LEASE.set(ticket.lease)
            start = time.monotonic()
            if sent_event is not None:
                sent_event.set()
            try:
                out = await runnable.ainvoke(sent)
                span.answered(answer(out))
                used = usage_of(answer(out))
                if used.total_tokens > 0:  # an endpoint that reports no usage: settled at the worst case
                    ticket.usage = wire.CallUsage(input_tokens=used.input_tokens, output_tokens=used.output_tokens)
                return out
            except openai.AuthenticationError:
                ticket.usage = wire.CallUsage()  # refused at once: nothing was generated
                raise ModelAuthError(
                    f"model endpoint rejected the API key from ${self.settings.api_key_env} (HTTP 401)"
                ) from None
            except openai.NotFoundError as exc:
                ticket.usage = wire.CallUsage()
                raise ModelEndpointError(f"model {self.settings.name!r} not found: {_status_detail(exc)}") from None
            except openai.APITimeoutError:
                raise ModelTimeout(
                    f"{what}: model endpoint {base} did not answer within the {self.settings.timeout_seconds:g}s "
                    f"timeout (spec.model.timeoutSeconds); gave up after {time.monotonic() - start:.0f}s and "
                    f"{self.settings.max_retries} retries. A slow endpoint needs a longer timeout or a lower "
                    f"spec.model.maxOutputTokens (now {self.settings.max_output_tokens})"
                ) from None
            except openai.APIConnectionError as exc:
                raise ModelEndpointUnreachable(
                    f"{what}: model endpoint {base} is unreachable ({exc.__cause__ or exc}); "
                    f"gave up after {self.settings.max_retries} retries"
                ) from None
            except openai.APIStatusError as exc:
                if exc.status_code not in _RETRIED_STATUSES and exc.status_code < 500:
                    ticket.usage = wire.CallUsage()  # answered to the first attempt: nothing was generated
                detail = _status_detail(exc)
                if exc.status_code in (400, 413, 422) and _CONTEXT_OVERFLOW.search(f"{detail} {exc.body}"):
                    raise ModelContextExceeded(
                        f"{what}: the prompt does not fit the model's context: model endpoint answered "
                        f"HTTP {exc.status_code}: {detail}"
                    ) from None
                if exc.status_code in _RETRIED_STATUSES or exc.status_code >= 500:
                    raise ModelEndpointError(
                        f"{what}: model endpoint answered HTTP {exc.status_code} after "
                        f"{self.settings.max_retries} retries: {detail}"
                    ) from None
                raise ModelRequestRejected(
                    f"{what}: model endpoint refused the request with HTTP {exc.status_code} (not retried): {detail}"
                ) from None
            except openai.LengthFinishReasonError as exc:
                usage = exc.completion.usage
                if usage is not None:
                    ticket.usage = wire.CallUsage(
                        input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens
                    )
                    span.usage(usage.prompt_tokens, usage.completion_tokens)
                got = f" after {usage.completion_tokens} tokens" if usage else ""
                raise ModelAnswerError(
                    f"{what}: the answer was cut off{got} at spec.model.maxOutputTokens "
                    f"({self.settings.max_output_tokens}) before it was complete"
                ) from None
            except openai.ContentFilterFinishReasonError:
                raise ModelAnswerError(f"{what}: the endpoint's content filter stopped the answer") from None
            except (ValidationError, json.JSONDecodeError) as exc:
                # the SDK parses a json_schema answer itself: invalid JSON or a schema mismatch
                first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
                raise ModelAnswerError(f"{what}: the model's answer is malformed: {first}") from None

    async def chat(self, messages: Sequence[BaseMessage]) -> tuple[AIMessage, TokenUsage]:
        box = [0]
        msg = await self._call(self.model, messages, "chat call", box, lambda out: out)
        assert isinstance(msg, AIMessage)
        usage = self._tally(usage_of(msg), box)
        self._account(usage)
        if (msg.response_metadata or {}).get("finish_reason") == "length":
            log.warning(
                "an answer was cut off at maxOutputTokens (%s); raise spec.model.maxOutputTokens for longer text",
                self.settings.max_output_tokens,
            )
        return msg, usage

    async def structured(self, schema: type[T], messages: Sequence[BaseMessage]) -> tuple[T, TokenUsage]:
        cached = self._structured.get(schema)
        if cached is None:
            # The strings' maxLength lets a grammar-constrained endpoint end the answer within the
            # output bound (research_worker.bounds); OpenAI's strict mode refuses the keyword.
            limit = self.settings.max_output_tokens
            asked = schema if limit is None or strict_subset_only(self.settings.base_url) else bounded(schema, limit)
            runnable = self.model.with_structured_output(
                asked, method=self.settings.structured_output.value, include_raw=True
            )
            # what the request carries, for its prompt bound
            cached = self._structured[schema] = (runnable, json.dumps(asked.model_json_schema()))
        runnable, schema_text = cached
        what = f"structured call for {schema.__name__} ({self.settings.structured_output.value})"
        box = [0]
        out = await self._call(runnable, messages, what, box, lambda out: out.get("raw"), schema_text)
        raw = out.get("raw")
        usage = self._tally(usage_of(raw), box)
        self._account(usage)
        parsed = out.get("parsed")
        if not isinstance(parsed, schema):
            err = out.get("parsing_error")
            if err is None and parsed is None:
                err = "no structured answer (no JSON content and no tool call)"
            if (getattr(raw, "response_metadata", None) or {}).get("finish_reason") == "length":
                raise ModelAnswerError(
                    f"{what}: the answer was cut off at spec.model.maxOutputTokens "
                    f"({self.settings.max_output_tokens}) before it was complete: {_first_line(err)}"
                )
            raise ModelAnswerError(f"{what}: the model's answer did not match {schema.__name__}: {_first_line(err)}")
        if type(parsed) is not schema:  # parsed as the bounded subclass: hand back the caller's class
            parsed = schema.model_validate(parsed.model_dump())
        return parsed, usage


def _first_line(err: object) -> str:
    text = str(err) if err is not None else "no answer"
    return (text.splitlines() or [text])[0][:300]
