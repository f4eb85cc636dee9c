"""Traces on the real control plane: the operator and its worker pods export to an OTLP/HTTP
collector (a small one in this test, on loopback, decoding what the OpenTelemetry exporter sends
with opentelemetry-proto), and one ResearchJob's spans are read back from it.

The module runs its own operator with OTEL_EXPORTER_OTLP_ENDPOINT set (the session's operator is
stopped meanwhile, ``no_test_operator``); the worker pods get the variable from it."""

from __future__ import annotations

import gzip
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tests.fixtures.cluster import ClusterHandle
from tests.fixtures.operator import OperatorProcess
from tests.test_operator_cluster import create, patch_spec, researchjob, wait_phase

pytestmark = pytest.mark.cluster


@dataclass(frozen=True)
class Span:
    service: str
    trace_id: str
    span_id: str
    parent: str  # "" for a root
    name: str
    kind: int
    start_ns: int
    attributes: dict[str, Any]


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return tuple(_value(x) for x in v.array_value.values)
    return getattr(v, which) if which else None


class Collector:
    """An OTLP/HTTP trace receiver (``POST /v1/traces``, protobuf) that keeps every span it got."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                collector.receive(ExportTraceServiceRequest.FromString(body))
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def receive(self, request: ExportTraceServiceRequest) -> None:
        got = []
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        Span(
                            service=str(resource.get("service.name")),
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent=s.parent_span_id.hex(),
                            name=s.name,
                            kind=s.kind,
                            start_ns=s.start_time_unix_nano,
                            attributes={a.key: _value(a.value) for a in s.attributes},
                        )
                    )
        with self.lock:
            self.spans.extend(got)

    def all(self) -> list[Span]:
        with self.lock:
            return list(self.spans)


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    c = Collector()
    c.thread.start()
    yield c
    c.server.shutdown()


@pytest.fixture(scope="module")
def traced_operator(
    operator: OperatorProcess,
    no_test_operator: None,
    collector: Collector,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    """An operator like the session's (same cluster, Lease and settings), exporting its spans to
    ``collector``, as the chart's ``tracing.otlpEndpoint`` makes it; short batch delays, so spans
    arrive while the test looks."""
    op = operator.replica("traced-operator", tmp_path_factory.mktemp("traced") / "operator.log")
    op.env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "200"})
    op.start()
    yield op
    op.kill(signal.SIGTERM)


def ancestors(span: Span, by_id: dict[str, Span]) -> list[Span]:
    out = []
    while span.parent:
        parent = by_id.get(span.parent)
        assert parent is not None, f"span {span.name} has a parent {span.parent} the collector never got"
        out.append(parent)
        span = parent
    return out


def tokens(span: Span) -> int:
    return int(span.attributes["gen_ai.usage.input_tokens"]) + int(span.attributes["gen_ai.usage.output_tokens"])


def test_one_trace_from_the_admission_to_the_last_model_call_with_the_tokens_of_the_status(
    cluster: ClusterHandle,
    traced_operator: OperatorProcess,
    collector: Collector,
    namespace: str,
    corpus_configmap: str,
) -> None:
    api = cluster.api_client()
    body = researchjob(
        "traced",
        corpus_configmap,
        analysts={"count": 2, "review": True},
        parallelism={"batchSize": 1, "maxActiveJobs": 2},
    )
    create(api, namespace, body)
    planned = wait_phase(api, namespace, "traced", {"AwaitingReview", "Failed"})
    assert planned["status"]["phase"] == "AwaitingReview", planned["status"]
    first = planned["status"]["traceparent"]
    # A new operator process admits the interviews: it knows the trace only from the status.
    traced_operator.kill(signal.SIGTERM)  # gracefully: it hands the Lease over and sends its last spans
    traced_operator.start()
    restarted = time.time_ns()
    patch_spec(api, namespace, "traced", {"analysts": {"approved": True}})
    done = wait_phase(api, namespace, "traced", {"Succeeded", "Failed"})
    status = done["status"]
    assert status["phase"] == "Succeeded", status
    assert status["traceparent"] == first
    trace_id = first.split("-")[1]
    uid = done["metadata"]["uid"]
    model = done["spec"]["model"]["name"]  # the CRD's default

    # Every pod exports its spans before it ends, the operator within its batch delay: wait until
    # the collector holds the report's writing and model calls that add up to the status.
    deadline = time.monotonic() + 60
    spans: list[Span] = []
    while time.monotonic() < deadline:
        spans = collector.all()
        chats = [s for s in spans if s.name.startswith("chat ")]
        if any(s.name == "write" for s in spans) and sum(tokens(s) for s in chats) >= status["tokensUsed"]:
            break
        time.sleep(0.5)

    chats = [s for s in spans if s.name.startswith("chat ")]
    assert chats, f"no model call span arrived; spans: {sorted({s.name for s in spans})}"
    # One trace: every span of this ResearchJob, the model calls included, is in the status's trace.
    assert {s.trace_id for s in chats} == {trace_id}
    ours = [s for s in spans if s.trace_id == trace_id]
    assert not [s for s in spans if s.attributes.get("researchops.research_job.uid") == uid and s.trace_id != trace_id]
    by_id = {s.span_id: s for s in ours}
    (root,) = [s for s in ours if not s.parent]
    assert root.name == f"ResearchJob {namespace}/traced" and root.service == "research-operator"
    assert root.attributes["researchops.research_job.uid"] == uid

    # The operator's admissions: the planner before the restart, both interview batches after it,
    # by the restarted process, in the same trace under the same root.
    admitted: dict[str, list[Span]] = {}
    for s in ours:
        if s.name.startswith("admit "):
            admitted.setdefault(s.name, []).append(s)
            assert s.parent == root.span_id and s.service == "research-operator"
    assert len(admitted["admit plan"]) == 1 and admitted["admit plan"][0].start_ns < restarted
    interviews = admitted["admit interview"]
    assert len(interviews) == 2 and all(s.start_ns > restarted for s in interviews)
    assert {s.attributes["researchops.batch"] for s in interviews} == {"0", "1"}

    # Each worker pod's span is a child of the admission of its Job; every model call descends
    # from the root through one of them.
    pods = [s for s in ours if s.name.startswith("research-worker ")]
    assert {s.name for s in pods} >= {"research-worker plan", "research-worker interview"}
    for pod in pods:
        assert pod.service == "research-worker"
        assert by_id[pod.parent].name.startswith("admit ")
    for chat in chats:
        lineage = ancestors(chat, by_id)
        assert lineage[-1] == root
        assert any(s.name.startswith("research-worker ") for s in lineage)
        assert chat.kind == 3  # SPAN_KIND_CLIENT
        assert chat.name == f"chat {model}"
        assert chat.attributes["gen_ai.operation.name"] == "chat"
        assert chat.attributes["gen_ai.provider.name"] == "openai"
        assert chat.attributes["gen_ai.request.model"] == model
        assert chat.attributes["gen_ai.response.model"] == model  # the offline model server answers as asked

    # The tokens: all of them, and each step's, are what the status says.
    assert sum(tokens(s) for s in chats) == status["tokensUsed"]
    by_step: dict[tuple[str, int | None], int] = {}
    for chat in chats:
        lineage = ancestors(chat, by_id)
        step = next(s for s in lineage if s.name in ("plan", "interview analyst", "write"))
        analyst = step.attributes.get("researchops.analyst")
        key = ("interview" if step.name == "interview analyst" else step.name, analyst)
        by_step[key] = by_step.get(key, 0) + tokens(chat)
    assert by_step == {(u["step"], u.get("analyst")): u["tokens"] for u in status["usage"]}
