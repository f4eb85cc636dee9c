"""The worker against an OpenAI-compatible server we did not write: llama.cpp's llama-server with
Gemma 3 270M (tests/fixtures/llamaserver.py). ``make test-llamacpp`` runs only this tier.

The model is tiny and a base model: these tests assert structure (schemas, stored objects, the
operator's phases and messages), never prose.
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import openai
import pytest
from kubernetes import client
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langgraph.runtime import Runtime
from pydantic import SecretStr

from research_api.names import CONFIGMAP_DATA_KEY
from research_api.researchjob import AnalystStatus
from research_api.task import ModelSettings, StructuredOutput
from research_worker.bounds import string_limit
from research_worker.configuration import Configuration
from research_worker.errors import ModelAnswerError, ModelContextExceeded, ModelTimeout
from research_worker.graph import create_analysts
from research_worker.llm import LLMClient
from research_worker.search import DocumentsBackend
from research_worker.state import SearchQuery, Section, perspectives_of
from research_worker.store import AnalystPlan
from tests.fixtures.cluster import ClusterHandle
from tests.fixtures.llamaserver import LlamaServer
from tests.fixtures.operator import CORPUS, OperatorProcess
from tests.test_operator_cluster import create, report_text, researchjob, sections, wait_phase

pytestmark = pytest.mark.llamacpp

# The analysts' and interviewers' conversation as the worker builds it: the interview opening and
# the analyst's question are two user turns in a row, which strict chat templates refuse.
INTERVIEW: list[BaseMessage] = [
    SystemMessage(content="You are an expert on Kubernetes batch scheduling. Answer briefly."),
    HumanMessage(content="So you said you were writing an article on Kubernetes Jobs?"),
    HumanMessage(content="Hello, I am Ada, a platform engineer. What does a Job's backoffLimit do?"),
]


def llm(server: LlamaServer, requests: list[httpx.Request] | None = None, **settings: Any) -> LLMClient:
    async def record(request: httpx.Request) -> None:
        if requests is not None:
            requests.append(request)

    knobs: dict[str, Any] = {
        "name": server.model,
        "base_url": server.base_url,
        "max_output_tokens": 64,
        "timeout_seconds": 600,  # CPU decoding on a shared machine: a call can take a minute
        "max_retries": 0,
        **settings,
    }
    http = httpx.AsyncClient(event_hooks={"request": [record]})
    return LLMClient(ModelSettings(**knobs), SecretStr("no-key-configured"), http_async_client=http)


def test_the_strict_template_refuses_two_user_turns_in_a_row(llama_server: LlamaServer) -> None:
    raw = openai.OpenAI(base_url=llama_server.base_url, api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="alternate"):
        raw.chat.completions.create(
            model=llama_server.model,
            messages=[{"role": m.type.replace("human", "user"), "content": str(m.content)} for m in INTERVIEW],
            max_tokens=8,
        )


async def test_the_worker_sends_alternating_turns_and_bounds_the_answer(llama_server: LlamaServer) -> None:
    msg, usage = await llm(llama_server, max_output_tokens=24).chat(INTERVIEW)
    assert isinstance(msg, AIMessage) and str(msg.content).strip()
    assert 0 < usage.output_tokens <= 24
    assert usage.input_tokens > 20  # both user turns reached the model


async def test_a_streamed_answer_reports_its_usage(llama_server: LlamaServer) -> None:
    client_ = llm(llama_server, max_output_tokens=16)
    chunks = [c async for c in client_.model.astream([HumanMessage(content="Name three Kubernetes objects.")])]
    text = "".join(str(c.content) for c in chunks)
    usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    assert text.strip() and len(chunks) > 2
    assert usage and 0 < usage[-1]["output_tokens"] <= 16


async def test_the_planner_shown_the_documents_gets_a_plan_that_the_grammar_ends_in_time(
    llama_server: LlamaServer,
) -> None:
    """The plan step's real call (the documents in its prompt) with json_schema: the answer parses
    (grammar), has exactly the analysts asked for (minItems = maxItems), and ends before
    maxOutputTokens because every string's maxLength from that bound is enforced by the grammar.
    Without the bounds this model repeats one sentence in a description until it is cut off."""
    requests: list[httpx.Request] = []
    client_ = llm(llama_server, requests, max_output_tokens=768)
    config = Configuration(llm=client_, backends=[DocumentsBackend.from_folder(CORPUS)], max_analysts=2)
    out = await create_analysts({"topic": "How Kubernetes runs and limits batch workloads"}, Runtime(context=config))
    analysts, usage = out["analysts"], out["usage"]
    assert len(analysts) == 2
    limit = string_limit(perspectives_of(2).model_json_schema(), 768)
    assert all(0 < len(v) <= limit for a in analysts for v in a.model_dump().values()), analysts
    assert usage.output_tokens < 768  # ended by the grammar, not cut off
    body = json.loads(requests[0].content)
    assert "<context>" in body["messages"][0]["content"]  # the documents were in the prompt
    analyst_schema = body["response_format"]["json_schema"]["schema"]["$defs"]["Analyst"]
    assert {p["maxLength"] for p in analyst_schema["properties"].values()} == {limit}

    query, _ = await client_.structured(SearchQuery, INTERVIEW)
    assert isinstance(query.search_query, str)


async def test_function_calling_gets_no_tool_call_and_fails_once_with_the_reason(llama_server: LlamaServer) -> None:
    """llama-server does not honour an object tool_choice, so the forced tool call never comes: the
    step must fail with that reason (exit 3), not loop. docs/worker.md says to use json_schema."""
    requests: list[httpx.Request] = []
    client_ = llm(llama_server, requests, structured_output=StructuredOutput.FUNCTION_CALLING)
    with pytest.raises(ModelAnswerError, match="function_calling") as err:
        await client_.structured(SearchQuery, INTERVIEW)
    assert err.value.exit_code == 3
    assert len(requests) == 1


async def test_a_prompt_over_the_context_fails_at_once_with_the_servers_reason(llama_server: LlamaServer) -> None:
    requests: list[httpx.Request] = []
    words = " ".join(f"pod{i} node{i} job{i}" for i in range(llama_server.ctx_per_slot))
    with pytest.raises(ModelContextExceeded) as err:
        await llm(llama_server, requests).chat([HumanMessage(content=words)])
    assert "does not fit the model's context" in str(err.value) and "context size" in str(err.value)
    assert len(requests) == 1  # a 400 is never retried


async def test_a_call_slower_than_its_timeout_says_timeout(llama_server: LlamaServer) -> None:
    requests: list[httpx.Request] = []
    client_ = llm(llama_server, requests, timeout_seconds=0.5, max_retries=1, max_output_tokens=2000)
    with pytest.raises(ModelTimeout) as err:
        await client_.chat([HumanMessage(content="Write a long essay about Kubernetes, in detail.")])
    assert "did not answer within the 0.5s timeout" in str(err.value)
    assert "unreachable" not in str(err.value)
    assert len(requests) == 2


# ------------------------------------------------------------------ a ResearchJob on the cluster


def corpus_files(api: client.ApiClient, namespace: str, name: str) -> list[str]:
    return list(client.CoreV1Api(api).read_namespaced_config_map(name, namespace).data)


def gemma_model(server: LlamaServer, **over: Any) -> dict[str, Any]:
    # The base model never stops by itself: a chat call decodes maxOutputTokens. A structured call
    # ends sooner: llama.cpp's grammar enforces the maxLength that every string of the schema gets
    # from maxOutputTokens (research_worker.bounds); the two-analyst plan takes ~170 tokens. A call
    # is tens of seconds on an idle 2-core machine and minutes on a loaded one: the timeout leaves room.
    return {"name": server.model, "baseUrl": server.base_url, "maxOutputTokens": 768, "timeoutSeconds": 900, **over}


@pytest.mark.cluster
@pytest.mark.timeout(2700)
def test_a_researchjob_completes_against_llama_server(
    cluster: ClusterHandle,
    operator: OperatorProcess,
    llama_server: LlamaServer,
    namespace: str,
    corpus_configmap: str,
) -> None:
    api = cluster.api_client()
    body = researchjob(
        "gemma",
        corpus_configmap,
        analysts={"count": 2},
        interview={"maxTurns": 1},
        model=gemma_model(llama_server),
        parallelism={"batchSize": 2, "maxActiveJobs": 1},
        sources=[{"type": "documents", "configMap": corpus_configmap, "maxResults": 1}],
    )
    create(api, namespace, body)
    obj = wait_phase(api, namespace, "gemma", {"Succeeded", "Failed"}, timeout=2600)
    status = obj["status"]
    assert status["phase"] == "Succeeded", status
    assert status["progress"] == "2/2" and status["tokensUsed"] > 0
    assert len(status["analysts"]) == 2
    for a in status["analysts"]:
        AnalystStatus.model_validate(a)

    core = client.CoreV1Api(api)
    plans = core.list_namespaced_config_map(namespace, label_selector="researchops.io/kind=analysts").items
    assert len(plans) == 1
    plan = AnalystPlan.model_validate_json(plans[0].data[CONFIGMAP_DATA_KEY])
    assert len(plan.analysts) == 2 and plan.usage.calls == 1

    stored = [Section.model_validate_json(cm.data[CONFIGMAP_DATA_KEY]) for cm in sections(api, namespace)]
    assert sorted(s.index for s in stored) == [0, 1]
    for s in stored:
        assert s.title.strip() and s.content.startswith("## ")
        # a question and (unless the model could not write one) a search query; an answer and the
        # section itself when the corpus matched
        assert 1 <= s.usage.calls <= (4 if s.found_sources else 2)
        assert s.analyst == plan.analysts[s.index]
        files = corpus_files(api, namespace, corpus_configmap)
        assert all(any(src.startswith(f) for f in files) for src in s.sources), s.sources  # no invented ones

    report = report_text(api, namespace, obj)
    assert report.startswith("# ")
    for heading in ("## Introduction", "## Insights", "## Conclusion"):
        assert heading in report
    # The Sources list holds exactly what the text cites (issue 25). A small model may cite nothing
    # (its text may still echo the words "## Sources" of its instructions): then the status says so
    # rather than claiming a grounded report.
    if (status.get("quality") or {}).get("sourcesCited"):
        assert re.search(r"^## Sources\s*$", report, re.MULTILINE), report[-2000:]
    else:
        grounded = next(c for c in status["conditions"] if c["type"] == "Grounded")
        assert grounded["status"] == "False" and grounded["reason"] == "NoCitations", grounded
    events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=gemma").items
    reasons = {e.reason for e in events}
    assert {"Planning", "Interviewing", "Writing", "Succeeded"} <= reasons


@pytest.mark.cluster
def test_an_answer_cut_off_at_max_output_tokens_fails_the_researchjob_once_with_the_reason(
    cluster: ClusterHandle,
    operator: OperatorProcess,
    llama_server: LlamaServer,
    namespace: str,
    corpus_configmap: str,
) -> None:
    api = cluster.api_client()
    body = researchjob(
        "clipped", corpus_configmap, analysts={"count": 2}, model=gemma_model(llama_server, maxOutputTokens=16)
    )
    create(api, namespace, body)
    obj = wait_phase(api, namespace, "clipped", {"Succeeded", "Failed"}, timeout=500)
    status = obj["status"]
    assert status["phase"] == "Failed", status
    assert "cut off" in status["message"] and "maxOutputTokens (16)" in status["message"], status["message"]
    # the worker's exit code 3 fails the Job at once: one pod, no retries of an answer that cannot fit
    pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector="researchops.io/step=plan").items
    assert len(pods) == 1, [p.metadata.name for p in pods]
