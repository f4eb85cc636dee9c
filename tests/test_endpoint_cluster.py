"""Shared model endpoints and namespace token budgets on the real control plane, with the real worker
and the offline model server (whose own stats count the requests in flight)."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client

from localkube.controlplane import free_port
from offline_model.launcher import ModelServerProcess
from research_api import leases as wire
from research_api.researchjob import GROUP, PLURAL, VERSION
from tests.fixtures.cluster import ClusterHandle
from tests.fixtures.operator import OperatorProcess
from tests.test_operator_cluster import create, researchjob, wait_phase

pytestmark = pytest.mark.cluster

ENDPOINTS = "modelendpoints"


@pytest.fixture
def endpoint(cluster: ClusterHandle) -> Iterator[Callable[..., str]]:
    """Create ModelEndpoints (cluster-scoped); deleted after the test."""
    custom = client.CustomObjectsApi(cluster.api_client())
    made: list[str] = []

    def make(base_url: str, max_concurrent: int, **spec: Any) -> str:
        name = f"ep-{uuid.uuid4().hex[:6]}"
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ModelEndpoint",
            "metadata": {"name": name},
            "spec": {"baseUrl": base_url, "maxConcurrentRequests": max_concurrent, **spec},
        }
        custom.create_cluster_custom_object(GROUP, VERSION, ENDPOINTS, body)
        made.append(name)
        return name

    yield make
    for name in made:
        custom.delete_cluster_custom_object(GROUP, VERSION, ENDPOINTS, name)


def conditions(api: client.ApiClient, namespace: str, name: str) -> dict[str, dict[str, Any]]:
    obj = client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def until(what: str, check: Callable[[], Any], timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = check()
        if out:
            return out
        time.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout}s")


def test_two_researchjobs_sharing_an_endpoint_never_exceed_its_capacity(
    cluster: ClusterHandle,
    operator: OperatorProcess,
    namespace: str,
    corpus_configmap: str,
    modelserver_factory: Callable[..., ModelServerProcess],
    endpoint: Callable[..., str],
) -> None:
    api = cluster.api_client()
    server = modelserver_factory(ttft_ms=1000, max_concurrency=64)
    capacity = 3
    name = endpoint(server.base_url, capacity)
    model = {"baseUrl": server.base_url, "maxConcurrency": 4}
    for rj in ("left", "right"):
        create(api, namespace, researchjob(rj, corpus_configmap, analysts={"count": 4}, model=model))
    for rj in ("left", "right"):
        status = wait_phase(api, namespace, rj, {"Succeeded", "Failed"}, timeout=400)["status"]
        assert status["phase"] == "Succeeded", status
    stats = server.stats()
    assert stats["max_running"] <= capacity, stats
    assert stats["rejected_concurrency"] == 0
    # Both fanned out (2 batches of 2 analysts each: up to 8 calls wanted at once): calls waited for
    # a lease, and the endpoint's whole capacity was lent.
    text = operator.metrics()
    waits = re.findall(
        rf'^research_operator_endpoint_lease_wait_seconds_bucket{{endpoint="{name}",le="(\S+)"}} (\S+)$', text, re.M
    )
    buckets = {le: float(n) for le, n in waits}
    assert buckets["+Inf"] > buckets["0.1"], buckets
    assert stats["max_running"] == capacity, stats

    def endpoint_status() -> dict[str, Any]:
        me = client.CustomObjectsApi(api).get_cluster_custom_object(GROUP, VERSION, ENDPOINTS, name)
        return dict(me.get("status") or {})

    until("the endpoint's status shows every pod gone", lambda: endpoint_status().get("pods") == 0, 60)
    assert endpoint_status()["observedGeneration"] == 1 and not endpoint_status().get("shares")
    assert f'research_operator_endpoint_max_concurrent_requests{{endpoint="{name}"}} 3.0' in operator.metrics()
    # Each call took a lease from the operator's broker (the pods' shares were only the fallback).
    assert metric(operator, "research_operator_endpoint_leases_granted_total", name) >= stats["total"] // 2
    assert metric(operator, "research_operator_endpoint_leases_in_flight", name) == 0


def metric(operator: OperatorProcess, family: str, endpoint: str) -> float:
    m = re.search(rf'^{family}{{endpoint="{endpoint}"}} (\S+)$', operator.metrics(), re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def worker_logs(cluster: ClusterHandle, namespace: str) -> str:
    return "\n".join(
        p.read_text(errors="replace") for p in (cluster.state_dir / "nodes" / "pods").glob(f"{namespace}_*/*.log")
    )


def worker_pid(pod: str) -> int | None:
    """The worker process of a pod of the local cluster (a local process whose HOSTNAME is the pod's name)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"HOSTNAME={pod}".encode() in environ and b"research-worker" in cmdline and b"setpriv" not in cmdline:
            return int(proc.name)
    return None


def test_a_namespace_token_budget_stops_the_second_researchjob_until_raised(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, corpus_configmap: str
) -> None:
    api = cluster.api_client()
    core = client.CoreV1Api(api)
    op_ns = operator.env["OPERATOR_NAMESPACE"]
    settings = f"budget-{uuid.uuid4().hex[:6]}"

    def budget(tokens: int) -> None:
        body = {
            "metadata": {"name": settings, "labels": {f"{GROUP}/kind": "operator-settings"}},
            "data": {"namespaceTokenBudgets": json.dumps({namespace: {"tokens": tokens, "period": "7d"}})},
        }
        try:
            core.replace_namespaced_config_map(settings, op_ns, body)
        except client.ApiException as e:
            if e.status != 404:
                raise
            core.create_namespaced_config_map(op_ns, body)
        until("the operator applies the budget", lambda: f"{namespace}:{tokens}/7d" in operator.log(), 30)

    budget(1)  # the first ResearchJob's planner may start; what it stores spends the budget
    try:
        create(api, namespace, researchjob("first", corpus_configmap, analysts={"count": 2}))
        first = until(
            "the first ResearchJob waits on the spent budget",
            lambda: (c := conditions(api, namespace, "first").get("TokenBudgetExhausted")) and c["status"] == "True",
        )
        assert first
        create(api, namespace, researchjob("second", corpus_configmap, analysts={"count": 2}))
        cond = until(
            "the second ResearchJob says why it does not start",
            lambda: (
                (c := conditions(api, namespace, "second").get("TokenBudgetExhausted")) and c["status"] == "True" and c
            ),
        )
        assert cond["reason"] == "TokenBudget" and f"namespace {namespace} spent" in cond["message"]
        time.sleep(3)  # and it stays so: no worker Job of the second one
        jobs = client.BatchV1Api(api).list_namespaced_job(namespace, label_selector=f"{GROUP}/job=second").items
        assert jobs == []
        obj = client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "second")
        assert obj["status"]["waitingFor"] == "TokenBudget"
        assert "TokenBudget" in cluster.kubectl("get", "rj", "second", "-n", namespace).stdout
        budget(10_000_000)  # raised: both carry on without a restart
        for rj in ("first", "second"):
            status = wait_phase(api, namespace, rj, {"Succeeded", "Failed"})["status"]
            assert status["phase"] == "Succeeded", status
            assert {c["type"]: c["status"] for c in status["conditions"]}["TokenBudgetExhausted"] == "False"
    finally:
        core.delete_namespaced_config_map(settings, op_ns)


def test_a_capacity_change_applies_to_running_pods(
    cluster: ClusterHandle,
    operator: OperatorProcess,
    namespace: str,
    corpus_configmap: str,
    modelserver_factory: Callable[..., ModelServerProcess],
    endpoint: Callable[..., str],
) -> None:
    api = cluster.api_client()
    core = client.CoreV1Api(api)
    server = modelserver_factory(ttft_ms=250, max_concurrency=64)
    name = endpoint(server.base_url, 4)
    spec = {
        "analysts": {"count": 4},
        "interview": {"maxTurns": 3},
        "parallelism": {"batchSize": 4, "maxActiveJobs": 1},
        "model": {"baseUrl": server.base_url, "maxConcurrency": 4},
    }
    create(api, namespace, researchjob("wide", corpus_configmap, **spec))

    def share() -> dict[str, Any]:
        try:
            cm = core.read_namespaced_config_map("wide-endpoint-share", namespace)
        except client.ApiException:
            return {}
        jobs: dict[str, Any] = json.loads(cm.data["shares.json"])["jobs"]
        # The planner's Job: it goes on to interview the one batch (continue_steps).
        return next((s for job, s in jobs.items() if job.endswith("-plan")), {})

    until("the interview pod runs with a share of 4", lambda: share().get("concurrency") == 4, 300)
    until("the interview pod uses it", lambda: server.stats()["running"] >= 2, 60)
    custom = client.CustomObjectsApi(api)
    custom.patch_cluster_custom_object(GROUP, VERSION, ENDPOINTS, name, {"spec": {"maxConcurrentRequests": 1}})
    until("the running pod's share drops to 1", lambda: share().get("concurrency") == 1, 30)
    time.sleep(3)  # the pod polls every 2 s; the requests already in flight finish (250 ms each)
    server.reset()
    status = wait_phase(api, namespace, "wide", {"Succeeded", "Failed"}, timeout=400)["status"]
    assert status["phase"] == "Succeeded", status
    stats = server.stats()
    assert stats["total"] > 4, "the interviews should have gone on after the change"
    assert stats["max_running"] <= 1, stats


def test_a_worker_pod_killed_while_holding_leases_does_not_leak_capacity(
    cluster: ClusterHandle,
    operator: OperatorProcess,
    namespace: str,
    corpus_configmap: str,
    modelserver_factory: Callable[..., ModelServerProcess],
    endpoint: Callable[..., str],
) -> None:
    api = cluster.api_client()
    core = client.CoreV1Api(api)
    server = modelserver_factory(ttft_ms=1500, max_concurrency=64)
    capacity = 2
    name = endpoint(server.base_url, capacity)
    spec = {
        "analysts": {"count": 4},
        "interview": {"maxTurns": 2},
        "parallelism": {"batchSize": 4, "maxActiveJobs": 1},
        "model": {"baseUrl": server.base_url, "maxConcurrency": 4},
    }
    create(api, namespace, researchjob("victim", corpus_configmap, **spec))

    def interview_pod() -> str | None:
        pods = core.list_namespaced_pod(namespace, label_selector=f"{GROUP}/job=victim").items
        # The planner's pod goes on to interview the one batch (continue_steps).
        running = [p.metadata.name for p in pods if "-plan-" in p.metadata.name and p.status.phase == "Running"]
        return running[0] if running else None

    pod = until("the interview pod runs", interview_pod, 300)
    until(
        "it holds every lease", lambda: metric(operator, "research_operator_endpoint_leases_in_flight", name) == 2, 120
    )
    pid = until("its worker process", lambda: worker_pid(pod), 30)
    broker_takes_only_its_audience(core, operator, namespace, pod, pid)
    os.kill(pid, signal.SIGKILL)  # dies holding 2 leases: no release, no close
    until(
        "the broker drops the dead pod's leases when its heartbeats stop",
        lambda: metric(operator, "research_operator_endpoint_leases_expired_total", name) >= 2,
        60,
    )
    server.reset()
    # The Job's next pod (or anyone) gets the whole capacity again: nothing leaked.
    until("the endpoint is fully used again", lambda: server.stats()["max_running"] >= capacity, 300)
    status = wait_phase(api, namespace, "victim", {"Succeeded", "Failed"}, timeout=400)["status"]
    assert status["phase"] == "Succeeded", status
    assert server.stats()["max_running"] <= capacity


def jwt_audiences(token: str) -> list[str]:
    payload = token.split(".")[1]
    aud = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["aud"]
    return [aud] if isinstance(aud, str) else list(aud)


def broker_takes_only_its_audience(
    core: client.CoreV1Api, operator: OperatorProcess, namespace: str, pod: str, pid: int
) -> None:
    """The worker pod (leases in hand) has the projected token for the broker's audience, which the
    node agent materialised and refreshes; the broker, checking with the real API server's
    TokenReview, refuses the pod's API token and accepts the projected one."""
    volumes = {v.name: v for v in core.read_namespaced_pod(pod, namespace).spec.volumes}
    token = volumes[wire.TOKEN_VOLUME].projected.sources[0].service_account_token
    assert (token.audience, token.expiration_seconds, token.path) == (wire.TOKEN_AUDIENCE, 3600, wire.TOKEN_FILE)
    environ = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
    lease_token = Path(environ["LOCALKUBE_VOLUME_ROOT"], wire.TOKEN_PATH.lstrip("/")).read_text().strip()
    api_token = (Path(environ["KUBECONFIG"]).parent / "serviceaccount" / "token").read_text().strip()
    assert jwt_audiences(lease_token) == [wire.TOKEN_AUDIENCE]
    assert wire.TOKEN_AUDIENCE not in jwt_audiences(api_token)
    url = operator.env["LEASE_BROKER_URL"] + wire.PATH_HEARTBEAT
    # A Job the pod is not of: authenticated, then refused as such (404), so its session is untouched.
    body = wire.Heartbeat(endpoint="none", job="not-this-job", mode=wire.Mode.FALLBACK).model_dump(by_alias=True)
    tls = operator.broker_ssl()  # the broker serves TLS with a CA of its own
    refused = httpx.post(url, json=body, headers={"Authorization": f"Bearer {api_token}"}, timeout=10, verify=tls)
    assert refused.status_code == 401 and wire.TOKEN_AUDIENCE in refused.json()["error"], refused.text
    accepted = httpx.post(url, json=body, headers={"Authorization": f"Bearer {lease_token}"}, timeout=10, verify=tls)
    assert accepted.status_code == 404, accepted.text
    assert api_token not in operator.log() and lease_token not in operator.log()
    assert "refused a request" in operator.log()


def test_workers_fall_back_to_their_share_when_the_broker_is_unreachable(
    cluster: ClusterHandle,
    operator: OperatorProcess,
    namespace: str,
    corpus_configmap: str,
    modelserver_factory: Callable[..., ModelServerProcess],
    endpoint: Callable[..., str],
) -> None:
    api = cluster.api_client()
    server = modelserver_factory(ttft_ms=120, max_concurrency=64)
    capacity = 3
    name = endpoint(server.base_url, capacity)
    # Workers are told a broker address where nothing listens (an unreachable broker, as they see it).
    operator.extra_env["LEASE_BROKER_URL"] = f"http://127.0.0.1:{free_port()}"
    operator.restart()
    try:
        model = {"baseUrl": server.base_url, "maxConcurrency": 4}
        for rj in ("left", "right"):
            create(api, namespace, researchjob(rj, corpus_configmap, analysts={"count": 4}, model=model))
        for rj in ("left", "right"):
            status = wait_phase(api, namespace, rj, {"Succeeded", "Failed"}, timeout=400)["status"]
            assert status["phase"] == "Succeeded", status
    finally:
        operator.extra_env.pop("LEASE_BROKER_URL")
        operator.restart()
    stats = server.stats()
    assert stats["max_running"] <= capacity, stats
    assert stats["rejected_concurrency"] == 0
    logs = worker_logs(cluster, namespace)
    assert "falling back to this pod's share of ModelEndpoint" in logs, logs[-3000:]
    assert metric(operator, "research_operator_endpoint_leases_granted_total", name) == 0


def test_an_operator_restart_mid_run_never_lets_more_than_the_capacity_in_flight(
    cluster: ClusterHandle,
    operator: OperatorProcess,
    namespace: str,
    corpus_configmap: str,
    modelserver_factory: Callable[..., ModelServerProcess],
    endpoint: Callable[..., str],
) -> None:
    api = cluster.api_client()
    server = modelserver_factory(ttft_ms=1500, max_concurrency=64)
    capacity = 3
    name = endpoint(server.base_url, capacity)
    spec = {
        "analysts": {"count": 4},
        "interview": {"maxTurns": 2},
        "parallelism": {"batchSize": 2, "maxActiveJobs": 2},
        "model": {"baseUrl": server.base_url, "maxConcurrency": 4},
    }
    for rj in ("left", "right"):
        create(api, namespace, researchjob(rj, corpus_configmap, **spec))
    until(
        "the interviews hold every lease",
        lambda: metric(operator, "research_operator_endpoint_leases_in_flight", name) == capacity,
        300,
    )
    operator.kill(signal.SIGKILL)  # the broker's state is gone; the workers still hold their leases
    operator.start()
    for rj in ("left", "right"):
        status = wait_phase(api, namespace, rj, {"Succeeded", "Failed"}, timeout=400)["status"]
        assert status["phase"] == "Succeeded", status
    stats = server.stats()
    assert stats["max_running"] <= capacity, stats
    assert "lease broker listening" in operator.log()
    assert metric(operator, "research_operator_endpoint_leases_granted_total", name) > 0  # leases again after it


def test_a_researchjob_budget_is_reserved_before_each_call_and_status_shows_the_cost(
    cluster: ClusterHandle,
    operator: OperatorProcess,
    namespace: str,
    corpus_configmap: str,
    modelserver_factory: Callable[..., ModelServerProcess],
    endpoint: Callable[..., str],
) -> None:
    """Budgets that cannot be overshot: with a ModelEndpoint (and the operator's lease broker), a
    ResearchJob whose budget cannot pay its first call's worst case (its prompt and maxOutputTokens)
    fails before any token is spent, saying why; one with room succeeds and shows what it cost, per
    step, at the endpoint's prices."""
    api = cluster.api_client()
    server = modelserver_factory(max_concurrency=64)
    endpoint(server.base_url, 4, prices={"inputPerMillion": "2.50", "outputPerMillion": "10"})
    model = {"baseUrl": server.base_url, "maxOutputTokens": 4096}
    create(
        api,
        namespace,
        researchjob("tight", corpus_configmap, analysts={"count": 2}, model=model, budget={"maxTokens": 3000}),
    )
    create(
        api,
        namespace,
        researchjob(
            "roomy",
            corpus_configmap,
            analysts={"count": 2},
            model=model,
            budget={"maxTokens": 10_000_000, "maxCost": "100"},
        ),
    )
    tight = wait_phase(api, namespace, "tight", {"Succeeded", "Failed"})["status"]
    assert tight["phase"] == "Failed", tight
    assert "cannot pay the next model call" in tight["message"] and "0 of 3000 tokens spent" in tight["message"]
    assert tight["tokensUsed"] == 0  # refused before it was sent: nothing spent, nothing overshot
    roomy = wait_phase(api, namespace, "roomy", {"Succeeded", "Failed"}, timeout=400)["status"]
    assert roomy["phase"] == "Succeeded", roomy
    assert [(u["step"], u.get("analyst")) for u in roomy["usage"]] == [
        ("plan", None),
        ("interview", 0),
        ("interview", 1),
        ("write", None),
    ]
    assert sum(u["tokens"] for u in roomy["usage"]) == roomy["tokensUsed"] > 0
    assert float(roomy["cost"]) > 0 and abs(sum(float(u["cost"]) for u in roomy["usage"]) - float(roomy["cost"])) < 1e-5


def test_a_call_the_namespace_budget_cannot_pay_waits_and_says_so_until_the_budget_is_raised(
    cluster: ClusterHandle,
    operator: OperatorProcess,
    namespace: str,
    corpus_configmap: str,
    modelserver_factory: Callable[..., ModelServerProcess],
    endpoint: Callable[..., str],
) -> None:
    """With the lease broker, a namespace budget is never overshot: the planner's first call, whose
    worst case the budget cannot pay, waits (nothing is spent) and the ResearchJob says why; raised,
    the budget pays it and the ResearchJob goes on."""
    api = cluster.api_client()
    core = client.CoreV1Api(api)
    op_ns = operator.env["OPERATOR_NAMESPACE"]
    settings = f"budget-{uuid.uuid4().hex[:6]}"
    server = modelserver_factory(max_concurrency=64)
    endpoint(server.base_url, 4)

    def budget(tokens: int) -> None:
        body = {
            "metadata": {"name": settings, "labels": {f"{GROUP}/kind": "operator-settings"}},
            "data": {"namespaceTokenBudgets": json.dumps({namespace: {"tokens": tokens, "period": "7d"}})},
        }
        try:
            core.replace_namespaced_config_map(settings, op_ns, body)
        except client.ApiException as e:
            if e.status != 404:
                raise
            core.create_namespaced_config_map(op_ns, body)
        until("the operator applies the budget", lambda: f"{namespace}:{tokens}/7d" in operator.log(), 30)

    budget(3000)  # less than one call's worst case (its prompt and maxOutputTokens 4096)
    try:
        model = {"baseUrl": server.base_url, "maxOutputTokens": 4096}
        create(api, namespace, researchjob("patient", corpus_configmap, analysts={"count": 2}, model=model))
        cond = until(
            "the ResearchJob says its call waits for the namespace's budget",
            lambda: (
                (c := conditions(api, namespace, "patient").get("TokenBudgetExhausted")) and c["status"] == "True" and c
            ),
        )
        assert "waits until the period rolls over" in cond["message"], cond
        obj = client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "patient")
        assert obj["status"]["tokensUsed"] == 0 and server.stats()["total"] == 0  # nothing sent, nothing spent
        budget(10_000_000)
        status = wait_phase(api, namespace, "patient", {"Succeeded", "Failed"}, timeout=400)["status"]
        assert status["phase"] == "Succeeded", status
        assert {c["type"]: c["status"] for c in status["conditions"]}["TokenBudgetExhausted"] == "False"
    finally:
        core.delete_namespaced_config_map(settings, op_ns)
