"""The node agent against the real control plane: Job, Deployment and deletion behaviour."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.fixtures.cluster import ClusterHandle

pytestmark = pytest.mark.cluster

SC = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def container(command: list[str], **extra: Any) -> dict[str, Any]:
    return {"name": "main", "image": "python:3.11-slim", "command": command, "securityContext": SC, **extra}


def job(name: str, command: list[str], backoff: int = 0, policy: str = "Never", **pod: Any) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": backoff,
            "template": {"spec": {"restartPolicy": policy, "containers": [container(command)], **pod}},
        },
    }


def pod(name: str, command: list[str], **spec: Any) -> dict[str, Any]:
    extra = spec.pop("container_extra", {})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [container(command, **extra)], **spec},
    }


def until(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def job_condition(batch: client.BatchV1Api, ns: str, name: str) -> client.V1JobCondition | None:
    j = batch.read_namespaced_job(name, ns)
    for cond in j.status.conditions or []:
        if cond.type in ("Complete", "Failed") and cond.status == "True":
            return cond
    return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def container_pid(p: client.V1Pod) -> int:
    return int(p.status.container_statuses[0].container_id.rsplit("/", 1)[1])


def test_failing_job_fails_after_backoff_limit(cluster: ClusterHandle, namespace: str) -> None:
    batch = client.BatchV1Api(cluster.api_client())
    core = client.CoreV1Api(cluster.api_client())
    batch.create_namespaced_job(
        namespace, job("fails", ["python", "-c", "import sys; sys.exit('bad input')"], backoff=1)
    )
    cond = until("job failure", lambda: job_condition(batch, namespace, "fails"), 120)
    assert cond.type == "Failed" and cond.reason == "BackoffLimitExceeded"
    pods = core.list_namespaced_pod(namespace, label_selector="job-name=fails").items
    assert len(pods) == 2  # backoffLimit 1: the first pod and one retry
    for p in pods:
        assert p.status.phase == "Failed"
        term = p.status.container_statuses[0].state.terminated
        assert term.exit_code == 1 and term.reason == "Error"
        assert term.message == "bad input"  # the log's tail
    assert batch.read_namespaced_job("fails", namespace).status.failed == 2


def test_on_failure_restarts_in_place_and_job_controller_deletes_pod(cluster: ClusterHandle, namespace: str) -> None:
    batch = client.BatchV1Api(cluster.api_client())
    core = client.CoreV1Api(cluster.api_client())
    batch.create_namespaced_job(
        namespace, job("crashy", ["python", "-c", "raise SystemExit(1)"], backoff=1, policy="OnFailure")
    )
    cond = until("job failure", lambda: job_condition(batch, namespace, "crashy"), 120)
    assert cond.reason == "BackoffLimitExceeded"
    # The Job controller deletes the restarting pod; the agent stops it and makes the final delete.
    until(
        "pod removal",
        lambda: not core.list_namespaced_pod(namespace, label_selector="job-name=crashy").items,
        60,
    )


def test_deleting_a_pod_kills_its_process(cluster: ClusterHandle, namespace: str) -> None:
    core = client.CoreV1Api(cluster.api_client())
    core.create_namespaced_pod(
        namespace,
        pod("sleeper", ["python", "-c", "import time; print('sleeping', flush=True); time.sleep(600)"]),
    )
    running = until(
        "pod running",
        lambda: (p := core.read_namespaced_pod("sleeper", namespace)).status.phase == "Running" and p,
    )
    pid = container_pid(running)
    assert pid_alive(pid)
    conds = {c.type: c.status for c in running.status.conditions}
    assert conds["Ready"] == "True" and conds["ContainersReady"] == "True"
    core.delete_namespaced_pod("sleeper", namespace)

    def gone() -> bool:
        try:
            core.read_namespaced_pod("sleeper", namespace)
        except ApiException as e:
            return e.status == 404
        return False

    until("pod deleted", gone, 45)
    assert not pid_alive(pid)
    assert "sleeping" in cluster.pod_log(namespace, "sleeper")


def test_pod_active_deadline(cluster: ClusterHandle, namespace: str) -> None:
    core = client.CoreV1Api(cluster.api_client())
    core.create_namespaced_pod(namespace, pod("late", ["sleep", "600"], activeDeadlineSeconds=2))
    failed = until(
        "deadline",
        lambda: (p := core.read_namespaced_pod("late", namespace)).status.phase == "Failed" and p,
    )
    assert failed.status.reason == "DeadlineExceeded"
    assert failed.status.container_statuses[0].state.terminated is not None


def test_missing_secret_blocks_until_created(cluster: ClusterHandle, namespace: str) -> None:
    core = client.CoreV1Api(cluster.api_client())
    env = [{"name": "PW", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}]
    core.create_namespaced_pod(
        namespace,
        pod("needs-secret", ["python", "-c", "import os; print(len(os.environ['PW']))"], container_extra={"env": env}),
    )

    def waiting_reason() -> str | None:
        statuses = core.read_namespaced_pod("needs-secret", namespace).status.container_statuses or []
        w = statuses[0].state.waiting if statuses else None
        return w.reason if w else None

    assert until("config error", waiting_reason) == "CreateContainerConfigError"
    core.create_namespaced_secret(namespace, {"metadata": {"name": "db"}, "stringData": {"password": "hunter2"}})
    until(
        "pod success",
        lambda: core.read_namespaced_pod("needs-secret", namespace).status.phase == "Succeeded",
    )
    assert cluster.pod_log(namespace, "needs-secret").strip() == "7"


def test_deployment_becomes_available_through_http_readiness(cluster: ClusterHandle, namespace: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    apps = client.AppsV1Api(cluster.api_client())
    probe = {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1}
    server = container(
        ["python", "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        ports=[{"name": "http", "containerPort": port}],
        readinessProbe=probe,
    )
    apps.create_namespaced_deployment(
        namespace,
        {
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [server], "terminationGracePeriodSeconds": 2},
                },
            },
        },
    )
    until(
        "deployment available",
        lambda: (apps.read_namespaced_deployment("web", namespace).status.available_replicas or 0) == 1,
    )
    core = client.CoreV1Api(cluster.api_client())
    p = core.list_namespaced_pod(namespace, label_selector="app=web").items[0]
    pid = container_pid(p)
    apps.delete_namespaced_deployment("web", namespace, propagation_policy="Foreground")
    until("server process stopped", lambda: not pid_alive(pid), 45)
