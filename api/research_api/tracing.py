"""Traces (OpenTelemetry), the part both processes share: when tracing is on, how it is turned on,
which variables the operator hands to worker pods, the W3C ``traceparent`` the task carries, and the
names of the span attributes.

Off unless configured: with no ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) and no
``OTEL_TRACES_EXPORTER``, nothing of OpenTelemetry is imported, no provider is installed and no
exporter thread runs. (The OpenTelemetry default of ``OTEL_TRACES_EXPORTER`` is ``otlp`` to
localhost; here an unset variable means off, so a cluster without a collector pays nothing.)
When on, spans go through a batch processor to the OTLP/HTTP exporter, which reads the standard
``OTEL_EXPORTER_OTLP_*`` variables itself; ``console`` prints them (debugging).

The OpenTelemetry packages are imported only in the functions that need them, so that this module,
like the rest of ``research_api``, costs the importer nothing more than pydantic.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"  # the collector's base URL (http://collector:4318)
TRACES_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"  # the full traces URL (.../v1/traces)
EXPORTER_ENV = "OTEL_TRACES_EXPORTER"  # otlp | console | none (comma-separated)
SDK_DISABLED_ENV = "OTEL_SDK_DISABLED"  # true: off, whatever else is set

# What the operator copies from its own environment into every worker container, so that a worker
# exports where the operator does. Headers (OTEL_EXPORTER_OTLP_HEADERS) are not among them: they may
# hold a collector's API key, and a Job's env is readable by whoever reads the Job.
WORKER_ENV = (
    ENDPOINT_ENV,
    TRACES_ENDPOINT_ENV,
    EXPORTER_ENV,
    SDK_DISABLED_ENV,
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_BSP_SCHEDULE_DELAY",
)

# W3C Trace Context, version 00: 00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>
TRACEPARENT_PATTERN = r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
_TRACEPARENT = re.compile(TRACEPARENT_PATTERN)

# Span attributes. The GenAI ones are the OpenTelemetry semantic conventions for a client inference
# span (gen_ai.* registry; a unit test checks them against opentelemetry-semantic-conventions).
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_SYSTEM = "gen_ai.system"  # the name before gen_ai.provider.name; older backends group by it
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_OUTPUT_TYPE = "gen_ai.output.type"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
ERROR_TYPE = "error.type"
K8S_NAMESPACE = "k8s.namespace.name"
K8S_JOB = "k8s.job.name"
K8S_POD = "k8s.pod.name"
# Ours: which ResearchJob, plan, step and analyst a span belongs to.
RJ_NAME = "researchops.research_job.name"
RJ_UID = "researchops.research_job.uid"
RJ_PLAN = "researchops.plan"
RJ_STEP = "researchops.step"
RJ_ANALYST = "researchops.analyst"
RJ_BATCH = "researchops.batch"
SLOT_WAIT = "researchops.slot.wait_seconds"  # how long a model call waited for a lease or a slot before it was sent

CHAT = "chat"  # gen_ai.operation.name of a chat completion
PROVIDER = "openai"  # every call speaks the OpenAI wire format through the openai client


def exporter_of(env: Mapping[str, str]) -> str | None:
    """The span exporter the environment asks for: ``otlp``, ``console``, or None (tracing off)."""
    if env.get(SDK_DISABLED_ENV, "").strip().lower() == "true":
        return None
    names = [n.strip().lower() for n in env.get(EXPORTER_ENV, "").split(",") if n.strip()]
    if names:
        if "none" in names:
            return None
        for name in names:
            if name in ("otlp", "console"):
                return name
        log.warning("%s=%s names no exporter this build has (otlp, console): tracing is off", EXPORTER_ENV, names)
        return None
    if env.get(ENDPOINT_ENV, "").strip() or env.get(TRACES_ENDPOINT_ENV, "").strip():
        return "otlp"
    return None


def worker_env(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The tracing variables of ``env`` a worker container gets (nothing when tracing is off)."""
    if exporter_of(env) is None:
        return ()
    return tuple((k, env[k]) for k in WORKER_ENV if env.get(k, "").strip())


def valid_traceparent(value: str | None) -> bool:
    return value is not None and _TRACEPARENT.match(value) is not None and value[3:35] != "0" * 32


_PROVIDER: Any = None  # the SDK TracerProvider this process installed, if any


def start(service_name: str, env: Mapping[str, str] | None = None, exporter: Any = None) -> bool:
    """Make this process's tracer provider, with a batch processor and the exporter the environment
    asks for (see the module doc); returns whether tracing is on. Only then is the SDK imported.
    ``env`` decides whether (default: the process's environment, which the OTLP exporter and the
    resource read their own variables from in any case). ``exporter``: a SpanExporter to use
    instead, whatever the environment says (tests), with a processor that exports each span as it
    ends. Idempotent.

    The provider is this module's own, not OpenTelemetry's global one: the operator's and the
    worker's spans are made only through ``tracer``."""
    global _PROVIDER
    if _PROVIDER is not None:
        return True
    e = os.environ if env is None else env
    kind = "given" if exporter is not None else exporter_of(e)
    if kind is None:
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    processor: SpanProcessor
    if exporter is not None:
        processor = SimpleSpanProcessor(exporter)
    elif kind == "console":
        processor = BatchSpanProcessor(ConsoleSpanExporter())
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        protocol = e.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or e.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
        if protocol and protocol != "http/protobuf":
            log.warning("OTLP protocol %s is not installed: spans go by http/protobuf (port 4318)", protocol)
        # endpoint, timeout, compression and headers from the OTEL_EXPORTER_OTLP_* variables
        processor = BatchSpanProcessor(OTLPSpanExporter())
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES still win: Resource.create merges them over these.
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}), shutdown_on_exit=False)
    provider.add_span_processor(processor)
    _PROVIDER = provider
    log.info("tracing on: %s spans of %s", kind, service_name)
    return True


def enabled() -> bool:
    """Whether this process exports spans (``start`` made a provider)."""
    return _PROVIDER is not None


def tracer(scope: str) -> Any:
    """The tracer of ``scope`` (a module path) from this process's provider; only while ``enabled``."""
    if _PROVIDER is None:
        raise RuntimeError("tracing is off: research_api.tracing.start made no provider")
    return _PROVIDER.get_tracer(scope)


def shutdown() -> None:
    """Export what is buffered and stop the exporter: call it before the process exits, or the last
    spans are lost. An unreachable collector holds it up for the exporter's timeout
    (``OTEL_EXPORTER_OTLP_TIMEOUT``, 10 s), then the spans are dropped."""
    global _PROVIDER
    provider, _PROVIDER = _PROVIDER, None
    if provider is not None:
        provider.shutdown()


def context_of(traceparent: str | None) -> Any:
    """The OpenTelemetry Context whose parent is ``traceparent`` (an empty one for None or a
    malformed value: a new trace)."""
    from opentelemetry.context import Context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if not valid_traceparent(traceparent):
        return Context()
    assert traceparent is not None
    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


def traceparent_of(span: Any) -> str | None:
    """The W3C ``traceparent`` naming ``span`` as the parent (None for a span that records nothing)."""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if not span.get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent")
