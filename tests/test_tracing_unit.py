"""Traces without a cluster: when tracing is on, what the operator and the worker record (through an
in-memory exporter), how the trace is carried (status, task), and that nothing runs when it is off.

The cluster test (tests/test_tracing_cluster.py) reads the spans of a real ResearchJob from an
OTLP/HTTP collector."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from langchain_core.messages import HumanMessage
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from research_api import tracing
from research_api.researchjob import ResearchJobSpec
from research_api.status import Phase, ResearchJobStatus
from research_api.task import ResearchTask, Step
from research_operator.actions import tracing as operator_tracing
from research_operator.cache.world import WORLD
from research_operator.decisions.manifests import Owner, worker_job, worker_job_and_task
from research_operator.settings import Settings
from research_worker import tracing as worker_tracing
from research_worker.errors import ModelRequestRejected
from research_worker.state import SearchQuery
from tests.test_worker_llm_unit import Endpoint, completion

OWNER = Owner("team-a", "fair-sharing", "5a1c1f0e-0000-4000-8000-000000000001")
KEY = (OWNER.namespace, OWNER.uid)
SPEC = ResearchJobSpec.model_validate(
    {"topic": "How Kubernetes runs batch workloads", "sources": [{"type": "documents", "configMap": "corpus"}]}
)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process, every span kept in memory; off again afterwards."""
    exporter = InMemorySpanExporter()
    assert tracing.start("test", exporter=exporter)
    WORLD.traces.pop(KEY, None)
    yield exporter
    tracing.shutdown()
    WORLD.traces.pop(KEY, None)


def task_of(job: dict[str, Any]) -> ResearchTask:
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    return ResearchTask.model_validate_json(env["RESEARCH_TASK"])


def by_name(exporter: InMemorySpanExporter) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for s in exporter.get_finished_spans():
        out.setdefault(s.name, []).append(s)
    return out


# ------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "otlp"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, "otlp"),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, "otlp"),
        ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, None),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, None),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, None),  # not in this build: off, with a warning
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, None),
    ],
)
def test_tracing_is_on_only_when_an_endpoint_or_an_exporter_is_set(env: dict[str, str], expected: str | None) -> None:
    assert tracing.exporter_of(env) == expected


def test_workers_get_the_operators_tracing_variables_but_never_its_headers() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector.obs:4318",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=secret",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.1",
        "WORKER_IMAGE": "w:1",
    }
    job = worker_job(OWNER, SPEC, Settings.from_env(env), "abc123", Step.PLAN)
    worker_env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert worker_env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector.obs:4318"
    assert worker_env["OTEL_TRACES_SAMPLER_ARG"] == "0.1"
    assert "OTEL_EXPORTER_OTLP_HEADERS" not in worker_env
    assert "secret" not in json.dumps(job)
    off = worker_job(OWNER, SPEC, Settings.from_env({}), "abc123", Step.PLAN)
    assert not [e for e in off["spec"]["template"]["spec"]["containers"][0]["env"] if e["name"].startswith("OTEL_")]
    assert task_of(off).traceparent is None


def test_the_gen_ai_attribute_names_are_the_semantic_conventions() -> None:
    from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
    from opentelemetry.semconv.attributes import error_attributes, server_attributes

    assert tracing.GEN_AI_OPERATION_NAME == gen_ai.GEN_AI_OPERATION_NAME
    assert tracing.CHAT == gen_ai.GenAiOperationNameValues.CHAT.value
    assert tracing.GEN_AI_PROVIDER_NAME == gen_ai.GEN_AI_PROVIDER_NAME
    assert tracing.PROVIDER == gen_ai.GenAiProviderNameValues.OPENAI.value
    assert tracing.GEN_AI_SYSTEM == gen_ai.GEN_AI_SYSTEM
    assert tracing.GEN_AI_REQUEST_MODEL == gen_ai.GEN_AI_REQUEST_MODEL
    assert tracing.GEN_AI_REQUEST_MAX_TOKENS == gen_ai.GEN_AI_REQUEST_MAX_TOKENS
    assert tracing.GEN_AI_REQUEST_TEMPERATURE == gen_ai.GEN_AI_REQUEST_TEMPERATURE
    assert tracing.GEN_AI_RESPONSE_MODEL == gen_ai.GEN_AI_RESPONSE_MODEL
    assert tracing.GEN_AI_RESPONSE_ID == gen_ai.GEN_AI_RESPONSE_ID
    assert tracing.GEN_AI_RESPONSE_FINISH_REASONS == gen_ai.GEN_AI_RESPONSE_FINISH_REASONS
    assert tracing.GEN_AI_USAGE_INPUT_TOKENS == gen_ai.GEN_AI_USAGE_INPUT_TOKENS
    assert tracing.GEN_AI_USAGE_OUTPUT_TOKENS == gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS
    assert tracing.GEN_AI_OUTPUT_TYPE == gen_ai.GEN_AI_OUTPUT_TYPE
    assert tracing.SERVER_ADDRESS == server_attributes.SERVER_ADDRESS
    assert tracing.SERVER_PORT == server_attributes.SERVER_PORT
    assert tracing.ERROR_TYPE == error_attributes.ERROR_TYPE


def test_a_malformed_traceparent_is_refused_by_the_task() -> None:
    task = task_of(worker_job(OWNER, SPEC, Settings(), "abc123", Step.PLAN)).model_dump(by_alias=True)
    with pytest.raises(ValueError, match="traceparent"):
        ResearchTask.model_validate({**task, "traceparent": "not-a-traceparent"})
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert ResearchTask.model_validate({**task, "traceparent": tp}).traceparent == tp
    assert not tracing.valid_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01")


# ------------------------------------------------------------------------------------------
# off: nothing runs
# ------------------------------------------------------------------------------------------

OFF = """
import asyncio, json, sys, threading
from research_api import tracing
from research_api.status import ResearchJobStatus
import research_operator.registration.handlers
from research_operator.actions import tracing as operator_tracing
from research_operator.decisions.manifests import Owner
from research_worker import tracing as worker_tracing
from research_api.task import ModelSettings

before = threading.active_count()
on = tracing.start("research-worker")
trace = operator_tracing.research_job_trace(("ns", "uid"), Owner("ns", "rj", "uid"), ResearchJobStatus())
with operator_tracing.admission(None, {}, "plan") as span:
    admitted = span

async def call():
    async with worker_tracing.chat(ModelSettings(name="m"), structured=False) as c:
        c.usage(1, 2)
        return c._span

recorded = asyncio.run(call())
print(json.dumps({
    "on": on, "trace": trace, "admitted": admitted is not None, "recorded": recorded is not None,
    "threads": threading.active_count() - before,
    "exporter": sorted(m for m in sys.modules if m.startswith("opentelemetry.exporter")),
    "provider": tracing.enabled(),
}))
"""


def test_with_no_endpoint_tracing_is_off_no_exporter_is_loaded_and_no_thread_runs() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", OFF], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[-1])
    assert got == {
        "on": False,
        "trace": None,
        "admitted": False,
        "recorded": False,
        "threads": 0,
        "exporter": [],
        "provider": False,
    }


def test_with_an_endpoint_the_exporter_runs() -> None:
    """The same script with an endpoint: the check above can fail."""
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
    out = subprocess.run([sys.executable, "-c", OFF], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.splitlines()[-1])
    assert got["on"] is True and got["provider"] is True and got["trace"] is not None and got["recorded"] is True
    assert got["threads"] >= 1
    assert "opentelemetry.exporter.otlp.proto.http.trace_exporter" in got["exporter"]


# ------------------------------------------------------------------------------------------
# on: the operator's trace
# ------------------------------------------------------------------------------------------


def test_a_researchjob_gets_one_trace_kept_in_its_status_and_continued_after_a_restart(
    spans: InMemorySpanExporter,
) -> None:
    first = operator_tracing.research_job_trace(KEY, OWNER, ResearchJobStatus())
    assert first is not None and tracing.valid_traceparent(first)
    # a pass before the status write is seen: the same trace, no second root
    assert operator_tracing.research_job_trace(KEY, OWNER, ResearchJobStatus()) == first
    roots = by_name(spans)[f"ResearchJob {OWNER.namespace}/{OWNER.name}"]
    assert len(roots) == 1 and roots[0].parent is None
    assert roots[0].attributes is not None and roots[0].attributes[tracing.RJ_UID] == OWNER.uid

    WORLD.traces.clear()  # a restarted operator: only the status remembers
    status = ResearchJobStatus(phase=Phase.Interviewing, traceparent=first)
    assert operator_tracing.research_job_trace(KEY, OWNER, status) == first
    job, task = worker_job_and_task(OWNER, SPEC, Settings(), "abc123", Step.INTERVIEW, [1, 2], 1)
    with operator_tracing.admission(first, job, "interview", task):
        pass
    (admit,) = by_name(spans)["admit interview"]
    assert admit.parent is not None and admit.parent.span_id == roots[0].context.span_id
    assert admit.context.trace_id == roots[0].context.trace_id
    assert admit.attributes is not None
    assert admit.attributes[tracing.K8S_JOB] == job["metadata"]["name"]
    assert admit.attributes[tracing.RJ_BATCH] == "1"
    # the Job's task names the admission span as its parent
    tp = task_of(job).traceparent
    assert tp is not None and tp.split("-")[1:3] == [f"{admit.context.trace_id:032x}", f"{admit.context.span_id:016x}"]
    assert len(by_name(spans)[f"ResearchJob {OWNER.namespace}/{OWNER.name}"]) == 1, "no second root"


def test_a_researchjob_finished_before_tracing_began_gets_no_trace(spans: InMemorySpanExporter) -> None:
    assert operator_tracing.research_job_trace(KEY, OWNER, ResearchJobStatus(phase=Phase.Succeeded)) is None
    assert spans.get_finished_spans() == ()


def test_the_status_carries_the_trace_the_pass_observed() -> None:
    import datetime as dt

    from research_operator.decisions.reconcile import Observed, StoreView, decide

    now = dt.datetime(2026, 12, 6, tzinfo=dt.UTC)
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    obs = Observed(1, now, now, [], StoreView(), ResearchJobStatus(), uid=OWNER.uid, traceparent=tp)
    assert decide(SPEC, obs).status.traceparent == tp
    off = Observed(1, now, now, [], StoreView(), ResearchJobStatus(), uid=OWNER.uid)
    assert decide(SPEC, off).status.traceparent is None


# ------------------------------------------------------------------------------------------
# on: the worker's spans
# ------------------------------------------------------------------------------------------


async def test_each_model_call_is_a_chat_span_with_the_gen_ai_attributes_under_the_workers_step(
    spans: InMemorySpanExporter,
) -> None:
    admitted = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    task = task_of(worker_job(OWNER, SPEC, Settings(), "abc123", Step.PLAN)).model_copy(
        update={"traceparent": admitted}
    )
    structured = json.dumps({"search_query": "kueue admission"})
    answers = iter([completion("an answer", completion_tokens=7), completion(structured, completion_tokens=5)])
    llm_requests: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        llm_requests.append(request)
        return httpx.Response(200, json=next(answers))

    llm = Endpoint(answer).client(max_output_tokens=256)
    with worker_tracing.pod(task, "plan"), worker_tracing.span("plan"):
        _, used = await llm.chat([HumanMessage(content="the secret prompt")])
        _, used2 = await llm.structured(SearchQuery, [HumanMessage(content="the secret prompt")])

    named = by_name(spans)
    (pod,) = named["research-worker plan"]
    (step,) = named["plan"]
    chats = named["chat m"]
    assert len(chats) == 2
    assert pod.parent is not None and f"{pod.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert f"{pod.context.trace_id:032x}" == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert step.parent is not None and step.parent.span_id == pod.context.span_id
    for chat, usage, kind in zip(chats, (used, used2), ("text", "json"), strict=True):
        assert chat.kind == SpanKind.CLIENT
        assert chat.parent is not None and chat.parent.span_id == step.context.span_id
        attributes = dict(chat.attributes or {})
        assert isinstance(attributes.pop("researchops.slot.wait_seconds"), float)
        assert attributes == {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "openai",
            "gen_ai.system": "openai",
            "gen_ai.request.model": "m",
            "gen_ai.request.temperature": 0.0,
            "gen_ai.request.max_tokens": 256,
            "gen_ai.output.type": kind,
            "server.address": "llm.test",
            "server.port": 80,
            "gen_ai.response.model": "m",
            "gen_ai.response.id": "chatcmpl-1",
            "gen_ai.response.finish_reasons": ("stop",),
            "gen_ai.usage.input_tokens": usage.input_tokens,
            "gen_ai.usage.output_tokens": usage.output_tokens,
        }
    assert [c.attributes["gen_ai.usage.output_tokens"] for c in chats if c.attributes] == [7, 5]
    # each request names its chat span as the parent, for an endpoint that traces
    sent = [r.headers.get("traceparent", "").split("-")[1:3] for r in llm_requests]
    assert sent == [[f"{c.context.trace_id:032x}", f"{c.context.span_id:016x}"] for c in chats]
    assert "secret" not in json.dumps([dict(s.attributes or {}) for s in spans.get_finished_spans()])


async def test_a_failed_model_call_is_an_error_span_with_its_class_not_its_text(spans: InMemorySpanExporter) -> None:
    refused = httpx.Response(400, json={"error": {"message": "the secret prompt is refused"}})
    llm = Endpoint(lambda _: refused).client()
    with pytest.raises(ModelRequestRejected):
        await llm.chat([HumanMessage(content="the secret prompt")])
    (chat,) = by_name(spans)["chat m"]
    assert chat.status.status_code == StatusCode.ERROR
    assert chat.attributes is not None and chat.attributes["error.type"] == "ModelRequestRejected"
    assert "gen_ai.usage.input_tokens" not in chat.attributes
    assert not chat.events and not chat.status.description


async def test_a_call_that_waited_for_a_slot_says_how_long_and_its_span_begins_when_it_is_sent(
    spans: InMemorySpanExporter,
) -> None:
    gate = asyncio.Event()
    arrived: list[int] = []

    async def answer(request: httpx.Request) -> httpx.Response:
        arrived.append(1)
        if len(arrived) == 1:
            await gate.wait()  # the first call holds the one slot until the test lets it go
        return httpx.Response(200, json=completion("an answer"))

    llm = Endpoint(answer).client(max_concurrency=1)  # an async handler: httpx.MockTransport awaits it
    first = asyncio.create_task(llm.chat([HumanMessage(content="first")]))
    while not arrived:
        await asyncio.sleep(0)
    second = asyncio.create_task(llm.chat([HumanMessage(content="second")]))
    for _ in range(20):
        await asyncio.sleep(0)  # the second call is waiting for the slot now
    assert len(arrived) == 1
    gate.set()
    await asyncio.gather(first, second)
    a, b = sorted(by_name(spans)["chat m"], key=lambda s: s.start_time or 0)
    assert a.attributes is not None and b.attributes is not None
    assert b.attributes["researchops.slot.wait_seconds"] > a.attributes["researchops.slot.wait_seconds"]
    assert b.start_time is not None and a.end_time is not None and b.start_time >= a.end_time
