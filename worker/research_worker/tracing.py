"""The worker's spans (research_api.tracing says when tracing is on and how it is exported).

``research-worker <step>`` (the pod), a child of the span that admitted its Job (the task's
``traceparent``); in it ``plan``, ``interview`` (with one ``interview analyst`` per analyst) and
``write``; in those, one ``chat <model>`` span per model call, with the OpenTelemetry GenAI
attributes (operation, provider, request and response model, token usage, finish reasons) and
the server's address. No prompt, answer or key is recorded.

When tracing is off every helper here is a no-op that imports nothing of OpenTelemetry.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

from research_api import tracing
from research_api.task import ModelSettings, ResearchTask

SCOPE = "research_worker"


def _tracer() -> Any:
    return tracing.tracer(SCOPE)


@contextlib.contextmanager
def pod(task: ResearchTask, step: str) -> Iterator[None]:
    """The span of this worker process's step, a child of the task's ``traceparent`` (a new trace
    without one: a worker run by hand)."""
    if not tracing.enabled():
        yield
        return
    attributes: dict[str, Any] = {
        tracing.K8S_NAMESPACE: task.job.namespace,
        tracing.RJ_NAME: task.job.name,
        tracing.RJ_UID: task.job.uid,
        tracing.RJ_PLAN: task.plan_id,
        tracing.RJ_STEP: step,
    }
    if os.environ.get("HOSTNAME"):
        attributes[tracing.K8S_POD] = os.environ["HOSTNAME"]
    with _tracer().start_as_current_span(
        f"research-worker {step}",
        context=tracing.context_of(task.traceparent),
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        try:
            yield
        except BaseException as exc:
            _failed(current, exc)
            raise


@contextlib.contextmanager
def span(name: str, *, analyst: int | None = None) -> Iterator[None]:
    """A span of one part of the work (``plan``, ``interview``, ``write``), a child of the current one."""
    if not tracing.enabled():
        yield
        return
    attributes = {tracing.RJ_ANALYST: analyst} if analyst is not None else {}
    with _tracer().start_as_current_span(name, attributes=attributes):
        yield


@contextlib.asynccontextmanager
async def analyst_span(analyst: int) -> AsyncIterator[None]:
    """The span ``interview analyst`` of one analyst's interview."""
    with span("interview analyst", analyst=analyst):
        yield


class Call:
    """What a model call's span records once it returns (a no-op when tracing is off)."""

    def __init__(self, span: Any = None) -> None:
        self._span = span

    def usage(self, input_tokens: int, output_tokens: int) -> None:
        if self._span is not None:
            self._span.set_attribute(tracing.GEN_AI_USAGE_INPUT_TOKENS, input_tokens)
            self._span.set_attribute(tracing.GEN_AI_USAGE_OUTPUT_TOKENS, output_tokens)

    def answered(self, message: Any) -> None:
        """The answer (an AIMessage): the model that answered, its id, why it stopped, the tokens."""
        if self._span is None or message is None:
            return
        meta = getattr(message, "response_metadata", None) or {}
        if meta.get("model_name"):
            self._span.set_attribute(tracing.GEN_AI_RESPONSE_MODEL, str(meta["model_name"]))
        if meta.get("id"):
            self._span.set_attribute(tracing.GEN_AI_RESPONSE_ID, str(meta["id"]))
        if meta.get("finish_reason"):
            self._span.set_attribute(tracing.GEN_AI_RESPONSE_FINISH_REASONS, [str(meta["finish_reason"])])
        usage = getattr(message, "usage_metadata", None)
        if usage:
            self.usage(int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0)))


@contextlib.asynccontextmanager
async def chat(settings: ModelSettings, *, structured: bool, waited: float = 0.0) -> AsyncIterator[Call]:
    """The span ``chat <model>`` of one model call (a CLIENT span, GenAI semantic conventions), begun
    when the call is sent; ``waited``: the seconds it waited for a lease or a slot before. An
    exception that ends the call sets ``error.type`` to its class and the span's status to error
    (never its message)."""
    if not tracing.enabled():
        yield Call()
        return
    from opentelemetry.trace import SpanKind

    url = urlsplit(settings.base_url or "https://api.openai.com/v1")
    attributes: dict[str, Any] = {
        tracing.GEN_AI_OPERATION_NAME: tracing.CHAT,
        tracing.GEN_AI_PROVIDER_NAME: tracing.PROVIDER,
        tracing.GEN_AI_SYSTEM: tracing.PROVIDER,
        tracing.GEN_AI_REQUEST_MODEL: settings.name,
        tracing.GEN_AI_REQUEST_TEMPERATURE: settings.temperature,
        tracing.GEN_AI_OUTPUT_TYPE: "json" if structured else "text",
        tracing.SLOT_WAIT: round(waited, 6),
    }
    if settings.max_output_tokens is not None:
        attributes[tracing.GEN_AI_REQUEST_MAX_TOKENS] = settings.max_output_tokens
    if url.hostname:
        attributes[tracing.SERVER_ADDRESS] = url.hostname
        attributes[tracing.SERVER_PORT] = url.port or (443 if url.scheme == "https" else 80)
    with _tracer().start_as_current_span(
        f"{tracing.CHAT} {settings.name}",
        kind=SpanKind.CLIENT,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        try:
            yield Call(current)
        except BaseException as exc:
            _failed(current, exc)
            raise


async def propagate(request: Any) -> None:
    """An httpx request hook: the request carries the W3C ``traceparent`` of the current span (the
    model call's), so an endpoint that traces (vLLM's ``--otlp-traces-endpoint``, a gateway) puts its
    own spans under the call. Installed only while tracing is on."""
    if not tracing.enabled():
        return
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    TraceContextTextMapPropagator().inject(request.headers)


def _failed(current: Any, exc: BaseException) -> None:
    """Mark a span failed by ``exc``: its class as ``error.type``, not its text (an error may quote
    the model's answer)."""
    from opentelemetry.trace import Status, StatusCode

    current.set_attribute(tracing.ERROR_TYPE, type(exc).__name__)
    current.set_status(Status(StatusCode.ERROR))
