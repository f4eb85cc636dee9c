"""The offline model server's wire format, errors, knobs, faults and accounting, via the openai SDK and httpx."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from offline_model.launcher import ModelServerProcess, free_port

MESSAGES = [
    {
        "role": "system",
        "content": "Context:\nThe operator admits interview Jobs under the namespace quota. "
        "Each interview Job runs one analyst's conversation with the expert.",
    },
    {"role": "user", "content": "What does the operator admit under the quota?"},
]


def client(server: ModelServerProcess, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key or "x", **kw)  # type: ignore[arg-type]


def test_models_lists_the_default_and_aliases(modelserver: ModelServerProcess) -> None:
    ids = [m.id for m in client(modelserver).models.list()]
    assert ids[0] == "offline-research-1"
    assert {"gpt-4o", "gpt-4o-mini"} <= set(ids)


def test_non_streaming_shape_and_usage(modelserver: ModelServerProcess) -> None:
    r = client(modelserver).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)  # type: ignore[arg-type]
    assert r.object == "chat.completion" and r.model == "gpt-4o-mini"
    assert r.choices[0].finish_reason == "stop"
    assert "interview Jobs" in (r.choices[0].message.content or "")
    assert r.usage is not None
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.completion_tokens > 3


def test_stream_usage_only_in_last_chunk_and_done(modelserver: ModelServerProcess) -> None:
    body = {
        "model": "offline-research-1",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{modelserver.base_url}/chat/completions", json=body, timeout=10) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 3
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    plain = httpx.post(
        f"{modelserver.base_url}/chat/completions", json={**body, "stream": False, "stream_options": None}, timeout=10
    )
    assert text == plain.json()["choices"][0]["message"]["content"]


def test_max_tokens_truncates_with_finish_reason_length(modelserver: ModelServerProcess) -> None:
    r = client(modelserver).chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        max_tokens=5,  # type: ignore[arg-type]
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 5


def error_of(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]  # type: ignore[no-any-return]


def test_bad_input_gets_openai_errors(modelserver: ModelServerProcess) -> None:
    url = f"{modelserver.base_url}/chat/completions"
    bad_json = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and error_of(bad_json)["type"] == "invalid_request_error"

    unknown = httpx.post(url, json={"model": "gpt-17", "messages": MESSAGES})
    assert unknown.status_code == 404 and error_of(unknown)["code"] == "model_not_found"

    missing = httpx.post(url, json={"model": "gpt-4o"})
    assert missing.status_code == 400
    assert error_of(missing)["param"] == "messages" and error_of(missing)["code"] == "missing_required_parameter"

    empty = httpx.post(url, json={"model": "gpt-4o", "messages": []})
    assert empty.status_code == 400 and error_of(empty)["code"] == "empty_array"

    role = httpx.post(url, json={"model": "gpt-4o", "messages": [{"role": "wizard", "content": "hi"}]})
    assert role.status_code == 400 and error_of(role)["param"] == "messages[0].role"

    impossible = {
        "type": "json_schema",
        "json_schema": {
            "name": "x",
            "schema": {
                "type": "object",
                "properties": {"tags": {"type": "array", "minItems": 3, "maxItems": 1}},
                "required": ["tags"],
            },
        },
    }
    unsat = httpx.post(url, json={"model": "gpt-4o", "messages": MESSAGES, "response_format": impossible})
    assert unsat.status_code == 400 and error_of(unsat)["param"] == "response_format"

    invalid_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "banana"}}}
    bad_schema = httpx.post(url, json={"model": "gpt-4o", "messages": MESSAGES, "response_format": invalid_schema})
    assert bad_schema.status_code == 400 and "Invalid schema" in str(error_of(bad_schema)["message"])

    no_json_word = httpx.post(
        url,
        json={
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_object"},
        },
    )
    assert no_json_word.status_code == 400

    # the SDK maps these onto its exception classes
    with pytest.raises(openai.NotFoundError):
        client(modelserver).chat.completions.create(model="nope", messages=MESSAGES)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client(modelserver).chat.completions.create(model="gpt-4o", messages=[])


def test_structured_output_validates_hard_schemas(modelserver: ModelServerProcess) -> None:
    schema = {
        "type": "object",
        "$defs": {
            "Step": {
                "type": "object",
                "additionalProperties": False,
                "required": ["order", "action", "kind"],
                "properties": {
                    "order": {"type": "integer", "minimum": 1},
                    "action": {"type": "string", "minLength": 10},
                    "kind": {"enum": ["admit", "reject", "defer"]},
                },
            },
        },
        "additionalProperties": False,
        "required": ["ticket", "steps", "matrix", "owner", "note"],
        "properties": {
            "ticket": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "steps": {"type": "array", "items": {"$ref": "#/$defs/Step"}, "minItems": 2, "maxItems": 2},
            "matrix": {
                "type": "array",
                "items": {"type": "array", "items": {"type": "number"}, "minItems": 2},
                "minItems": 1,
            },
            "owner": {"oneOf": [{"type": "null"}, {"type": "string", "format": "email"}]},
            "note": {"anyOf": [{"$ref": "#/$defs/Step"}, {"type": "null"}]},
        },
    }
    import jsonschema

    r = client(modelserver).chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,  # type: ignore[arg-type]
        response_format={"type": "json_schema", "json_schema": {"name": "plan", "schema": schema, "strict": True}},
    )
    value = json.loads(r.choices[0].message.content or "")
    jsonschema.validate(value, schema)
    assert len(value["steps"]) == 2
    assert any("quota" in s["action"] or "Job" in s["action"] for s in value["steps"])


def test_api_key_required_and_wrong_key_fails_fast(modelserver_factory) -> None:  # type: ignore[no-untyped-def]
    server = modelserver_factory(api_key="sekrit-key-123456")
    ok = client(server).chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert ok.choices[0].message.content
    started = time.monotonic()
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(base_url=server.base_url, api_key="wrong-key-000000").chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,  # type: ignore[arg-type]
        )
    assert time.monotonic() - started < 2  # 401 is not retried
    assert info.value.code == "invalid_api_key"
    missing = httpx.get(f"{server.base_url}/models")
    assert missing.status_code == 401 and error_of(missing)["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no key
    assert "sekrit-key-123456" not in server.log() and "wrong-key-000000" not in server.log()


def test_sdk_retries_survive_injected_429s(modelserver_factory) -> None:  # type: ignore[no-untyped-def]
    server = modelserver_factory(fault_429_rate=0.5, fault_seed=7, retry_after_ms=20)
    sdk = client(server, max_retries=6)
    for i in range(8):
        r = sdk.chat.completions.create(
            model="gpt-4o", messages=[*MESSAGES[:1], {"role": "user", "content": f"Question {i} about the quota?"}]
        )
        assert r.choices[0].message.content
    stats = server.stats()
    assert stats["faults"].get("429", 0) >= 3  # the retries really happened
    assert stats["by_status"]["200"] == 8
    raw = httpx.post(
        f"{server.base_url}/chat/completions",
        json={"model": "gpt-4o", "messages": MESSAGES},
        headers={"X-Offline-Fault": "429"},
    )
    assert raw.status_code == 429 and raw.headers["retry-after"] == "1" and raw.headers["retry-after-ms"] == "20"
    assert error_of(raw)["code"] == "rate_limit_exceeded"


def test_fault_sequence_is_repeatable(modelserver_factory) -> None:  # type: ignore[no-untyped-def]
    server = modelserver_factory(fault_500_rate=0.3, fault_503_rate=0.3, fault_seed=3)

    def run() -> list[int]:
        server.reset()
        url = f"{server.base_url}/chat/completions"
        return [httpx.post(url, json={"model": "gpt-4o", "messages": MESSAGES}).status_code for _ in range(12)]

    first = run()
    assert set(first) == {200, 500, 503}
    assert run() == first


def test_hung_response_trips_client_timeout(modelserver: ModelServerProcess) -> None:
    sdk = client(modelserver, timeout=0.5, max_retries=0)
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        sdk.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,  # type: ignore[arg-type]
            extra_headers={"X-Offline-Fault": "hang"},
        )
    assert time.monotonic() - started < 3
    deadline = time.monotonic() + 3  # the server notices the client left and frees the slot
    while modelserver.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert modelserver.stats()["running"] == 0


def test_latency_headers_shape_timing(modelserver: ModelServerProcess) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    headers = {"X-Offline-Latency-TTFT-Ms": "300", "X-Offline-Latency-Token-Ms": "10"}
    arrivals = []
    started = time.perf_counter()
    with httpx.stream("POST", f"{modelserver.base_url}/chat/completions", json=body, headers=headers, timeout=10) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line.removeprefix("data: "))["choices"][0]["delta"]
                if delta.get("content"):
                    arrivals.append(time.perf_counter() - started)
    assert len(arrivals) >= 8  # one sentence (the "Context:" label is not part of it)
    # The delays asked for are floors the server keeps (a loaded machine only adds to them); the
    # ceilings only tell a shaped stream from one that ignores the headers' scale (10x), so that a
    # busy CI machine cannot fail them. How close the shaping is goes in bench/modelserver_bench.py.
    assert 0.28 <= arrivals[0] < 3.0
    # Piece k carries at least one token and is not sent before ttft + k * per-token: a floor on the
    # last arrival that a late first piece cannot lower (the mean gap after a late first piece can).
    assert arrivals[-1] >= 0.28 + 0.008 * (len(arrivals) - 1)
    per_token = (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1)
    assert per_token < 0.1


def test_concurrency_limit_answers_429_with_retry_after(modelserver_factory) -> None:  # type: ignore[no-untyped-def]
    server = modelserver_factory(max_concurrency=2, ttft_ms=600, retry_after_ms=250)
    url = f"{server.base_url}/chat/completions"
    results: list[int] = []

    def call() -> None:
        results.append(httpx.post(url, json={"model": "gpt-4o", "messages": MESSAGES}, timeout=10).status_code)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    extra = httpx.post(url, json={"model": "gpt-4o", "messages": MESSAGES}, timeout=10)
    for t in threads:
        t.join()
    assert sorted(results) == [200, 200]
    assert extra.status_code == 429 and extra.headers["retry-after"] == "1"
    assert server.stats()["rejected_concurrency"] == 1 and server.stats()["max_running"] == 2


def test_stats_reset_metrics_and_request_log(modelserver_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log = tmp_path / "requests.jsonl"
    server = modelserver_factory(request_log=log)
    sdk = client(server)
    sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    sdk.chat.completions.create(
        model="gpt-4o",
        messages=[  # type: ignore[arg-type]
            {"role": "system", "content": "You are tasked with creating a set of AI analyst personas."},
            {"role": "user", "content": "Create 2 analysts about quotas."},
        ],
    )
    stats = server.stats()
    assert stats["by_kind"] == {"analysts": 1, "other": 1}
    assert stats["tokens"]["prompt"] > 0 and stats["tokens"]["completion"] > 0
    metrics = server.metrics()
    assert 'offline_model_requests_total{kind="other",status="200"} 1.0' in metrics
    assert "offline_model_tokens_total" in metrics and "offline_model_requests_running" in metrics
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["kind"] for e in entries] == ["other", "analysts"]
    server.reset()
    assert server.stats()["total"] == 0


def test_cli_env_and_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = {"MODELSERVER_PORT": str(port), "MODELSERVER_ALIASES": "my-model", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "offline_model", "--host", "127.0.0.1"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).json()
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        assert [m["id"] for m in models["data"]] == ["offline-research-1", "my-model"]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(10)
        err = proc.stderr.read() if proc.stderr else ""
    assert code == 0
    assert "serving offline-research-1, my-model" in err


def test_bad_flag_value_exits_nonzero() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "offline_model", "--fault-429-rate", "2"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2 and "fault_429_rate" in done.stderr
