"""The model gateway of the lease broker (aiohttp on loopback, a fake endpoint behind it; the
TokenReview answered by the test) and the pure decisions around admin-owned endpoints."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from research_api import leases as wire
from research_api.modelendpoint import NamespaceSelector, SelectorRequirement
from research_api.researchjob import ResearchJobSpec
from research_api.task import Step
from research_operator.actions import kube
from research_operator.cache.world import WORLD
from research_operator.decisions.endpoints import Endpoint, PodUse, selector_matches
from research_operator.decisions.manifests import Owner, worker_job
from research_operator.decisions.tenancy import RefusalReason, endpoint_refusal
from research_operator.lease_broker import broker as broker_module
from research_operator.lease_broker.broker import Authenticator, Broker, Identity, names_endpoint
from research_operator.settings import Settings
from tests.test_leases_unit import api_server, book, token

KEY = "sk-admin-secret"


@contextlib.asynccontextmanager
async def upstream() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A model endpoint that records what it was sent and answers in two chunks."""
    seen: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append(
            {
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "auth": request.headers.get("Authorization"),
                "body": await request.read(),
            }
        )
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        answer = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Set-Cookie": "x=y"})
        await answer.prepare(request)
        await answer.write(b"data: one\n\n")
        await answer.write(b"data: two\n\n")
        await answer.write_eof()
        return answer

    app = web.Application(client_max_size=64 * 1024 * 1024)  # a model endpoint takes long prompts
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = list(runner.addresses)[0][1]
    try:
        yield f"http://127.0.0.1:{port}/v1", seen
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def gateway(
    monkeypatch: pytest.MonkeyPatch, base_url: str, labels: dict[str, str], named: bool = True, key: str | None = KEY
) -> AsyncIterator[str]:
    endpoint = Endpoint(
        "team-llm",
        base_url,
        4,
        key_secret=("team-llm-key", "api-key"),
        namespace_selector=NamespaceSelector(match_labels={"team": "a"}),
    )
    monkeypatch.setattr(WORLD, "endpoint_index", {"team-llm": [endpoint]})
    monkeypatch.setattr(WORLD, "job_index", {})
    monkeypatch.setattr(WORLD, "namespace_labels", {})
    monkeypatch.setattr(broker_module, "names_endpoint", lambda ident, name: named and name == "team-llm")
    reads: list[tuple[str, str, str]] = []

    async def ns_labels(name: str) -> dict[str, str]:
        return labels

    async def endpoint_key(namespace: str, name: str, k: str) -> str | None:
        reads.append((namespace, name, k))
        return key

    monkeypatch.setattr(kube, "namespace_labels", ns_labels)
    monkeypatch.setattr(kube, "endpoint_key", endpoint_key)
    b = Broker(book([]), Authenticator(api_server()))
    runner = web.AppRunner(b.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = list(runner.addresses)[0][1]
    try:
        yield wire.gateway_url(f"http://127.0.0.1:{port}", "team-llm")
    finally:
        if b.session is not None:
            await b.session.close()
        await runner.cleanup()


async def test_the_gateway_swaps_the_pods_token_for_the_endpoints_key_and_streams_the_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with upstream() as (base, seen), gateway(monkeypatch, base, {"team": "a"}) as url:
        async with httpx.AsyncClient() as http:
            answer = await http.post(
                f"{url}/chat/completions?api-version=1",
                content=b'{"model": "m"}',
                headers={"Authorization": f"Bearer {token()}", "Content-Type": "application/json", "Cookie": "c=d"},
            )
    assert answer.status_code == 200
    assert answer.text == "data: one\n\ndata: two\n\n"
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert "set-cookie" not in answer.headers  # only the answer headers a client needs come back
    [sent] = seen
    assert sent["path"] == "/v1/chat/completions" and sent["query"] == {"api-version": "1"}
    assert sent["auth"] == f"Bearer {KEY}"  # the pod's token never reaches the endpoint
    assert sent["body"] == b'{"model": "m"}'


@pytest.mark.parametrize(
    ("labels", "named", "auth", "status", "words"),
    [
        ({"team": "b"}, True, "pod", 403, "namespace ns may not use ModelEndpoint team-llm"),
        ({"team": "a"}, False, "pod", 403, "is not a worker of a ResearchJob that names ModelEndpoint team-llm"),
        ({"team": "a"}, True, "api", 401, wire.TOKEN_AUDIENCE),  # the pod's API token is no credential here
        ({"team": "a"}, True, "none", 401, "Authorization: Bearer"),
    ],
    ids=["namespace-not-selected", "researchjob-does-not-name-it", "api-token", "no-token"],
)
async def test_the_gateway_refuses_who_may_not_use_the_endpoint_and_sends_nothing(
    monkeypatch: pytest.MonkeyPatch, labels: dict[str, str], named: bool, auth: str, status: int, words: str
) -> None:
    headers = {
        "pod": {"Authorization": f"Bearer {token()}"},
        "api": {"Authorization": f"Bearer {token(audience='https://kubernetes.default.svc')}"},
        "none": {},
    }[auth]
    async with upstream() as (base, seen), gateway(monkeypatch, base, labels, named=named) as url:
        async with httpx.AsyncClient() as http:
            answer = await http.post(f"{url}/chat/completions", content=b"{}", headers=headers)
    assert answer.status_code == status
    assert words in answer.json()["error"]["message"]
    assert seen == []


async def test_a_missing_key_is_a_clear_error_and_an_unreachable_endpoint_a_502(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    auth = {"Authorization": f"Bearer {token()}"}
    async with upstream() as (base, seen), gateway(monkeypatch, base, {"team": "a"}, key=None) as url:
        async with httpx.AsyncClient() as http:
            answer = await http.get(f"{url}/models", headers=auth)
    assert answer.status_code == 503 and seen == []
    message = answer.json()["error"]["message"]
    assert f"Secret {Settings().namespace}/team-llm-key with key api-key does not exist" in message
    async with gateway(monkeypatch, "http://127.0.0.1:9/v1", {"team": "a"}) as url:  # nothing listens
        async with httpx.AsyncClient() as http:
            answer = await http.get(f"{url}/models", headers=auth)
    assert answer.status_code == 502 and "ModelEndpoint team-llm did not answer" in answer.json()["error"]["message"]


def test_only_the_pods_of_a_researchjob_that_names_the_endpoint_get_its_key(monkeypatch: pytest.MonkeyPatch) -> None:
    mine, theirs = ("ns", "uid-mine"), ("ns", "uid-theirs")
    pods = [(mine, PodUse("ns", "mine", "mine-b0", 1)), (theirs, PodUse("ns", "theirs", "theirs-b0", 1))]
    monkeypatch.setattr(WORLD, "endpoint_pods", lambda endpoint: pods if endpoint == "team-llm" else [])
    monkeypatch.setattr(
        WORLD,
        "bodies",
        {
            mine: {"spec": {"model": {"endpoint": "team-llm"}}},
            theirs: {"spec": {"model": {"baseUrl": "http://same-url/v1"}}},  # same URL, its own key
        },
    )
    sa = "mine-worker-uid-mine"
    assert names_endpoint(Identity("ns", sa, "mine-b0-abcde"), "team-llm")
    assert not names_endpoint(Identity("ns", "theirs-worker-uid-thei", "theirs-b0-abcde"), "team-llm")
    assert not names_endpoint(Identity("ns", "default", "mine-b0-abcde"), "team-llm")  # not its worker SA
    assert not names_endpoint(Identity("other", sa, "mine-b0-abcde"), "team-llm")
    assert not names_endpoint(Identity("ns", sa, "mine-b0-abcde"), "another")


def test_namespace_selectors_follow_kubernetes_label_selector_semantics() -> None:
    labels = {"team": "a", "tier": "gold"}
    assert selector_matches(NamespaceSelector(), labels)  # {} selects every namespace
    assert selector_matches(NamespaceSelector(match_labels={"team": "a"}), labels)
    assert not selector_matches(NamespaceSelector(match_labels={"team": "b"}), labels)

    def expr(op: str, *values: str) -> NamespaceSelector:
        req = SelectorRequirement(key="tier", operator=op, values=list(values) or None)  # type: ignore[arg-type]
        return NamespaceSelector(match_expressions=[req])

    assert selector_matches(expr("In", "gold", "silver"), labels)
    assert not selector_matches(expr("In", "silver"), labels)
    assert selector_matches(expr("NotIn", "silver"), labels) and selector_matches(expr("NotIn", "x"), {})
    assert selector_matches(expr("Exists"), labels) and not selector_matches(expr("Exists"), {})
    assert selector_matches(expr("DoesNotExist"), {}) and not selector_matches(expr("DoesNotExist"), labels)
    assert not Endpoint("e", "http://x/v1", 1).selects(labels)  # no selector: nobody may name it


def spec(**model: Any) -> ResearchJobSpec:
    return ResearchJobSpec.model_validate({"topic": "bees", "sources": [{"type": "wikipedia"}], "model": model})


def test_endpoint_refusals_name_the_field_and_what_to_do() -> None:
    ep = Endpoint("team-llm", "http://x/v1", 4, models=("m1",), namespace_selector=NamespaceSelector())
    eps = {"team-llm": ep}
    broker = "http://broker:8090"
    ok = endpoint_refusal(spec(endpoint="team-llm", name="m1"), "ns", eps, {}, broker, True)
    assert ok is None
    cases = {
        "missing": endpoint_refusal(spec(endpoint="nope", name="m1"), "ns", eps, {}, broker, True),
        "model": endpoint_refusal(spec(endpoint="team-llm", name="m2"), "ns", eps, {}, broker, True),
        "broker off": endpoint_refusal(spec(endpoint="team-llm", name="m1"), "ns", eps, {}, "", True),
        "labels unread": endpoint_refusal(spec(endpoint="team-llm", name="m1"), "ns", eps, None, broker, True),
        "own url": endpoint_refusal(spec(baseUrl="http://mine/v1"), "ns", eps, {}, broker, False),
    }
    assert cases["missing"] is not None and 'ModelEndpoint "nope" does not exist' in cases["missing"].message
    assert cases["model"] is not None and cases["model"].field == "spec.model.name"
    assert cases["broker off"] is not None and "operator.leaseBroker.enabled=true" in cases["broker off"].message
    assert cases["labels unread"] is not None and cases["labels unread"].recheck
    own = cases["own url"]
    assert own is not None and own.reason == RefusalReason.BASE_URL and "tenancy.allowTenantBaseUrls" in own.message
    assert endpoint_refusal(spec(baseUrl="http://mine/v1"), "ns", eps, {}, broker, True) is None
    narrow = {
        "team-llm": Endpoint(
            "team-llm", "http://x/v1", 4, namespace_selector=NamespaceSelector(match_labels={"t": "a"})
        )
    }
    refused = endpoint_refusal(spec(endpoint="team-llm"), "ns", narrow, {"t": "b"}, broker, True)
    assert refused is not None and refused.reason == RefusalReason.ENDPOINT and refused.recheck
    assert 'namespace "ns" may not use ModelEndpoint "team-llm"' in refused.message


def test_a_worker_of_a_named_endpoint_calls_the_gateway_with_its_broker_token_and_no_secret() -> None:
    settings = Settings(lease_broker_url="http://broker:8090")
    job = worker_job(Owner("ns", "rj", "uid-1"), spec(endpoint="team-llm"), settings, "p1", Step.PLAN)
    pod = job["spec"]["template"]["spec"]
    env = pod["containers"][0]["env"]
    task = json.loads(next(e["value"] for e in env if e["name"] == "RESEARCH_TASK"))
    assert task["model"]["baseUrl"] == "http://broker:8090/gateway/team-llm" and task["model"]["gateway"] is True
    assert not [e for e in env if "valueFrom" in e]  # no Secret reaches the pod
    assert any(v["name"] == wire.TOKEN_VOLUME for v in pod["volumes"])  # the token the gateway knows it by


async def test_a_long_prompt_goes_through_the_gateway_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request carries its whole prompt, retrieved passages included: megabytes, not kilobytes."""
    body = b'{"messages": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    async with upstream() as (base, seen), gateway(monkeypatch, base, {"team": "a"}) as url:
        async with httpx.AsyncClient(timeout=30) as http:
            answer = await http.post(
                f"{url}/chat/completions", content=body, headers={"Authorization": f"Bearer {token()}"}
            )
    assert answer.status_code == 200, answer.text
    assert seen[0]["body"] == body
