"""The worker's model client against scripted HTTP answers: bounded calls, alternating roles, and
failures that say what happened and are never retried when retrying cannot help.

The answers imitate what real servers send (llama.cpp's error bodies, OpenAI's); the proof against a
real third-party server is tests/test_llamacpp.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langgraph.runtime import Runtime
from pydantic import SecretStr

from localkube.controlplane import free_port
from research_api.researchjob import ResearchJobSpec
from research_api.task import ModelSettings, ResearchTask, Step, StructuredOutput
from research_operator.decisions.manifests import Owner, build_task, worker_job
from research_operator.settings import Settings
from research_worker.bounds import MIN_STRING_CHARS, TEXT_CHARS_PER_TOKEN, skeleton, string_limit
from research_worker.configuration import Configuration
from research_worker.errors import (
    ModelAnswerError,
    ModelContextExceeded,
    ModelEndpointError,
    ModelEndpointUnreachable,
    ModelRequestRejected,
    ModelTimeout,
)
from research_worker.graph import search_query
from research_worker.llm import LLMClient, alternate_roles, preflight
from research_worker.state import Perspectives, SearchQuery, perspectives_of

Handler = Callable[[httpx.Request], httpx.Response]


def completion(content: str, finish_reason: str = "stop", completion_tokens: int = 7) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 11, "completion_tokens": completion_tokens, "total_tokens": 11 + completion_tokens},
    }


class Endpoint:
    """Answers each request with ``handler`` and keeps the requests' JSON bodies."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(json.loads(request.content or b"{}"))
        return self.handler(request)

    def client(self, **settings: Any) -> LLMClient:
        knobs: dict[str, Any] = {"name": "m", "base_url": "http://llm.test/v1", "max_retries": 6, **settings}
        http = httpx.AsyncClient(transport=httpx.MockTransport(self))
        return LLMClient(ModelSettings(**knobs), SecretStr("k"), http_async_client=http)


CONVERSATION = [
    SystemMessage(content="You are an expert."),
    HumanMessage(content="So you said you were writing an article on queues?"),
    HumanMessage(content="Hi, I am Ada. How does Kueue admit a Job?"),
    AIMessage(content="It admits a workload when its quota fits.", name="expert"),
    AIMessage(content="Sources: [1] kueue.md"),
    HumanMessage(content="And when it does not fit?"),
]


def test_consecutive_turns_of_one_role_are_merged_so_roles_alternate() -> None:
    out = alternate_roles(CONVERSATION)
    assert [m.type for m in out] == ["system", "human", "ai", "human"]
    assert out[1].content == (
        "So you said you were writing an article on queues?\n\nHi, I am Ada. How does Kueue admit a Job?"
    )
    assert out[2].content == "It admits a workload when its quota fits.\n\nSources: [1] kueue.md"
    # nothing lost, nothing reordered
    joined = " ".join(str(m.content) for m in out)
    for m in CONVERSATION:
        assert str(m.content) in joined
    # already alternating messages are left as they are
    assert alternate_roles(out) == out


def test_system_messages_become_one_leading_system_message() -> None:
    out = alternate_roles([HumanMessage(content="q"), SystemMessage(content="a"), SystemMessage(content="b")])
    assert [m.type for m in out] == ["system", "human"]
    assert out[0].content == "a\n\nb"


async def test_each_call_is_bounded_and_sent_with_alternating_roles() -> None:
    ep = Endpoint(lambda r: httpx.Response(200, json=completion("fine")))
    msg, usage = await ep.client(max_output_tokens=256).chat(CONVERSATION)
    assert msg.content == "fine" and usage.output_tokens == 7
    body = ep.bodies[0]
    assert body["max_completion_tokens"] == 256
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]


async def test_a_read_timeout_says_timeout_after_n_seconds_not_unreachable() -> None:
    def hang(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    ep = Endpoint(hang)
    with pytest.raises(ModelTimeout) as err:
        await ep.client(timeout_seconds=2.5, max_retries=1).chat(CONVERSATION)
    text = str(err.value)
    assert "did not answer within the 2.5s timeout" in text and "timeoutSeconds" in text
    assert "unreachable" not in text
    assert len(ep.bodies) == 2  # the first try and one retry
    assert err.value.exit_code == 3


async def test_a_refused_connection_is_unreachable() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(ModelEndpointUnreachable, match="http://llm.test/v1 is unreachable"):
        await Endpoint(refuse).client(max_retries=0).chat(CONVERSATION)


async def test_a_400_is_reported_with_the_endpoints_reason_and_never_retried() -> None:
    body = {"error": {"code": 400, "message": "Conversation roles must alternate", "type": "invalid_request_error"}}
    ep = Endpoint(lambda r: httpx.Response(400, json=body))
    with pytest.raises(ModelRequestRejected) as err:
        await ep.client(max_retries=6).chat(CONVERSATION)
    text = str(err.value)
    assert "HTTP 400" in text and "Conversation roles must alternate" in text and "not retried" in text
    assert "after 6 retries" not in text
    assert len(ep.bodies) == 1


@pytest.mark.parametrize(
    "body",
    [
        # llama.cpp's llama-server
        {
            "error": {
                "code": 400,
                "message": "request (5000 tokens) exceeds the available context size (4096 tokens), try increasing it",
                "type": "exceed_context_size_error",
                "n_prompt_tokens": 5000,
                "n_ctx": 4096,
            }
        },
        # OpenAI
        {
            "error": {
                "message": "This model's maximum context length is 8192 tokens. However, you requested 9000 tokens.",
                "type": "invalid_request_error",
                "code": "context_length_exceeded",
            }
        },
    ],
)
async def test_a_prompt_over_the_context_fails_once_with_a_context_message(body: dict[str, Any]) -> None:
    ep = Endpoint(lambda r: httpx.Response(400, json=body))
    with pytest.raises(ModelContextExceeded) as err:
        await ep.client().chat(CONVERSATION)
    assert "does not fit the model's context" in str(err.value)
    assert body["error"]["message"][:40] in str(err.value)
    assert len(ep.bodies) == 1 and err.value.exit_code == 3


async def test_a_5xx_that_persists_says_after_how_many_retries() -> None:
    ep = Endpoint(lambda r: httpx.Response(503, json={"error": {"message": "loading model"}}))
    with pytest.raises(ModelEndpointError, match=r"HTTP 503 after 1 retries: loading model"):
        await ep.client(max_retries=1).chat(CONVERSATION)
    assert len(ep.bodies) == 2


@pytest.mark.parametrize("method", list(StructuredOutput))
async def test_structured_calls_use_the_configured_method(method: StructuredOutput) -> None:
    answer = {"analysts": [{"affiliation": "a", "name": "n", "role": "r", "description": "d"}]}

    def reply(request: httpx.Request) -> httpx.Response:
        if method == StructuredOutput.FUNCTION_CALLING:
            msg = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "Perspectives", "arguments": json.dumps(answer)},
                    }
                ],
            }
            data = completion("")
            data["choices"][0]["message"] = msg
            data["choices"][0]["finish_reason"] = "tool_calls"
            return httpx.Response(200, json=data)
        return httpx.Response(200, json=completion(json.dumps(answer)))

    ep = Endpoint(reply)
    parsed, _ = await ep.client(structured_output=method).structured(Perspectives, CONVERSATION[:2])
    assert parsed.analysts[0].name == "n"
    body = ep.bodies[0]
    if method == StructuredOutput.JSON_SCHEMA:
        assert body["response_format"]["type"] == "json_schema"
        assert body["response_format"]["json_schema"]["name"] == "Perspectives"
    elif method == StructuredOutput.JSON_MODE:
        assert body["response_format"] == {"type": "json_object"}
    else:
        assert body["tools"][0]["function"]["name"] == "Perspectives" and "response_format" not in body


def string_bounds(schema: dict[str, Any]) -> dict[str, int | None]:
    """Every string property's maxLength (None when it has none), by property name."""
    out: dict[str, int | None] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for name, sub in (node.get("properties") or {}).items():
                if isinstance(sub, dict) and sub.get("type") == "string":
                    out[name] = sub.get("maxLength")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return out


ANALYSTS = {"analysts": [{"affiliation": "a", "name": "n", "role": "r", "description": "d"}] * 2}


@pytest.mark.parametrize("method", [StructuredOutput.JSON_SCHEMA, StructuredOutput.FUNCTION_CALLING])
async def test_a_self_hosted_endpoint_gets_every_string_bounded_by_the_output_budget(method: StructuredOutput) -> None:
    """A grammar-constrained endpoint (llama.cpp, vLLM, Ollama) must be able to end the answer in
    time: every string has a maxLength, the same for all, from maxOutputTokens."""

    def reply(request: httpx.Request) -> httpx.Response:
        if method == StructuredOutput.FUNCTION_CALLING:
            data = completion("")
            function = {"name": "Perspectives", "arguments": json.dumps(ANALYSTS)}
            call = {"id": "c1", "type": "function", "function": function}
            data["choices"][0]["message"] = {"role": "assistant", "content": None, "tool_calls": [call]}
            return httpx.Response(200, json=data)
        return httpx.Response(200, json=completion(json.dumps(ANALYSTS)))

    ep = Endpoint(reply)
    schema = perspectives_of(2)
    parsed, _ = await ep.client(max_output_tokens=768, structured_output=method).structured(schema, CONVERSATION[:2])
    assert type(parsed) is schema and len(parsed.analysts) == 2  # the caller's class, not the bounded one
    body = ep.bodies[0]
    sent = (
        body["response_format"]["json_schema"]["schema"]
        if method == StructuredOutput.JSON_SCHEMA
        else body["tools"][0]["function"]["parameters"]
    )
    bounds = string_bounds(sent)
    assert set(bounds) == {"affiliation", "name", "role", "description"}
    assert len(set(bounds.values())) == 1 and bounds["description"] == string_limit(schema.model_json_schema(), 768)
    if method == StructuredOutput.JSON_SCHEMA:
        assert body["response_format"]["json_schema"]["name"] == "Perspectives"


@pytest.mark.parametrize("base_url", [None, "https://api.openai.com/v1", "https://my-team.openai.azure.com/openai/v1"])
async def test_openais_strict_mode_gets_the_schema_without_max_length(base_url: str | None) -> None:
    """OpenAI's strict structured outputs refuse maxLength; its endpoints get the plain schema."""
    ep = Endpoint(lambda r: httpx.Response(200, json=completion(json.dumps(ANALYSTS))))
    await ep.client(base_url=base_url, max_output_tokens=768).structured(perspectives_of(2), CONVERSATION[:2])
    fmt = ep.bodies[0]["response_format"]["json_schema"]
    assert fmt["strict"] is True
    assert set(string_bounds(fmt["schema"]).values()) == {None}
    assert "maxLength" not in json.dumps(fmt)


async def test_a_search_query_is_bounded_to_a_line_however_large_the_output_budget() -> None:
    ep = Endpoint(lambda r: httpx.Response(200, json=completion(json.dumps({"search_query": "kueue"}))))
    await ep.client(max_output_tokens=4096).structured(SearchQuery, CONVERSATION[:2])
    sent = ep.bodies[0]["response_format"]["json_schema"]["schema"]
    assert string_bounds(sent) == {"search_query": SearchQuery.max_string_chars}
    assert "max_string_chars" not in json.dumps(sent)  # a class attribute, not a field


async def test_without_an_output_bound_no_string_is_bounded() -> None:
    ep = Endpoint(lambda r: httpx.Response(200, json=completion(json.dumps({"search_query": "kueue"}))))
    query, _ = await ep.client(max_output_tokens=None).structured(SearchQuery, CONVERSATION[:2])
    assert query.search_query == "kueue"
    assert string_bounds(ep.bodies[0]["response_format"]["json_schema"]["schema"]) == {"search_query": None}


@pytest.mark.parametrize("count", [1, 2, 3, 6, 10])
@pytest.mark.parametrize("max_output_tokens", [256, 768, 4096, 16384])
def test_the_bounded_strings_and_the_json_around_them_fit_the_output_budget(count: int, max_output_tokens: int) -> None:
    """At the budget's own rate (TEXT_CHARS_PER_TOKEN characters a token, a pessimistic rate for
    English) the strings at full length plus the empty JSON's estimate stay within maxOutputTokens,
    unless the panel is so large that each string is at its floor."""
    schema = perspectives_of(count).model_json_schema()
    limit = string_limit(schema, max_output_tokens)
    empty, strings = skeleton(schema, schema)
    assert strings == 4 * count
    used = strings * limit / TEXT_CHARS_PER_TOKEN + len(json.dumps(empty, separators=(",", ":"))) / 2
    assert limit == MIN_STRING_CHARS or used <= max_output_tokens
    assert limit >= MIN_STRING_CHARS


async def test_a_structured_answer_cut_off_at_the_output_bound_says_so() -> None:
    ep = Endpoint(lambda r: httpx.Response(200, json=completion('{"analysts": [{"affil', "length", 64)))
    with pytest.raises(ModelAnswerError) as err:
        await ep.client(max_output_tokens=64).structured(Perspectives, CONVERSATION[:2])
    assert "cut off" in str(err.value) and "maxOutputTokens (64)" in str(err.value)
    assert len(ep.bodies) == 1 and err.value.exit_code == 3


@pytest.mark.parametrize("method", list(StructuredOutput))
async def test_a_malformed_structured_answer_fails_once_with_the_reason(method: StructuredOutput) -> None:
    ep = Endpoint(lambda r: httpx.Response(200, json=completion('{"analysts": "three of them"}')))
    with pytest.raises(ModelAnswerError, match="Perspectives") as err:
        await ep.client(structured_output=method).structured(Perspectives, CONVERSATION[:2])
    assert len(ep.bodies) == 1 and err.value.exit_code == 3


def test_the_researchjobs_model_settings_reach_the_workers_task() -> None:
    spec = ResearchJobSpec.model_validate(
        {
            "topic": "Queues",
            "sources": [{"type": "documents", "configMap": "corpus"}],
            "model": {"maxOutputTokens": 300, "timeoutSeconds": 240, "structuredOutput": "function_calling"},
        }
    )
    owner = Owner("ns", "rj", "uid-1")
    task = build_task(owner, spec, Settings(), Step.PLAN, "abc123")
    assert task.model.max_output_tokens == 300
    assert task.model.timeout_seconds == 240
    assert task.model.structured_output == StructuredOutput.FUNCTION_CALLING
    job = worker_job(owner, spec, Settings(), "abc123", Step.PLAN)
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert ResearchTask.model_validate_json(env["RESEARCH_TASK"]).model.timeout_seconds == 240
    # the defaults bound every call
    default = build_task(owner, spec.model_copy(update={"model": type(spec.model)()}), Settings(), Step.PLAN, "abc")
    assert default.model.max_output_tokens == 4096 and default.model.timeout_seconds == 60


async def test_an_interview_whose_query_is_cut_off_searches_for_the_analysts_question() -> None:
    """The search query only sharpens retrieval: a model that cannot write one does not end the interview."""
    ep = Endpoint(lambda r: httpx.Response(200, json=completion('{"search_query": "kueue kueue kueue', "length", 32)))
    state: Any = {"messages": CONVERSATION[1:3]}
    runtime: Any = Runtime(context=Configuration(llm=ep.client(max_output_tokens=32)))
    out = await search_query(state, runtime)
    assert out["search_queries"] == ["Hi, I am Ada. How does Kueue admit a Job?"]
    assert len(ep.bodies) == 1


async def test_the_preflight_waits_for_an_endpoint_that_starts_listening_a_moment_later() -> None:
    """A new pod's network, or a Service whose endpoint just became ready, may refuse the first
    connections: the worker's preflight tries again instead of failing its ResearchJob."""

    class Models(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            body = json.dumps({"data": [{"id": "m"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    port = free_port()
    servers: list[ThreadingHTTPServer] = []

    def listen_later() -> None:
        servers.append(ThreadingHTTPServer(("127.0.0.1", port), Models))
        servers[0].serve_forever()

    timer = threading.Timer(1.5, listen_later)
    timer.start()
    try:
        ids = await preflight(ModelSettings(name="m", base_url=f"http://127.0.0.1:{port}/v1"), SecretStr("k"))
    finally:
        while not servers:  # the preflight gave up before it listened: let it listen, then stop it
            time.sleep(0.1)
        servers[0].shutdown()
        timer.join()
    assert ids == ["m"]
