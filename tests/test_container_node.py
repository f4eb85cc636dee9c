"""Pods as containers of the product image on the container node (``localkube.nodeagent
--containers``): restricted security enforced by the runtime, volumes, the API server through the
``kubernetes`` Service with the pod's projected token, Services that resolve and route, memory
limits that kill, SIGTERM on delete, and a ResearchJob whose workers all run there. The ResearchJob
tests run on the real node too (``container_or_real_node``; its own pod-level tests are in
tests/test_real_node.py)."""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from localkube.nodeagent import CONTAINER_RUNTIME_LABEL
from tests.fixtures.cluster import ClusterHandle
from tests.fixtures.containernode import ContainerNodeHandle
from tests.fixtures.operator import OperatorProcess
from tests.fixtures.realnode import RealNodeHandle
from tests.test_operator_cluster import PodEnds, create, report_text, researchjob, sections, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.image]

IMAGE = "research-operator:0.1.0"
RESTRICTED_SC = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}
POD_SC = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


def pod(
    name: str, node: ContainerNodeHandle | RealNodeHandle, container: dict[str, Any], **spec: Any
) -> dict[str, Any]:
    body = {"securityContext": POD_SC, "containers": [{"name": "main", "image": IMAGE, **container}], **spec}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": node.place(body)}


def wait_pod(core: client.CoreV1Api, namespace: str, name: str, phases: set[str], timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        p = core.read_namespaced_pod(name, namespace)
        if p.status.phase in phases:
            return p
        assert time.monotonic() < deadline, f"pod {name} stayed {p.status.phase}: {p.status}"
        time.sleep(0.3)


CHECK = """
import json, os, socket
from kubernetes import client, config
status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\\t" in line)
try:
    open("/opt/venv/x", "w")
    rootfs = "writable"
except OSError as e:
    rootfs = e.strerror
config.load_incluster_config()
me = client.CoreV1Api().read_namespaced_pod(os.environ["POD_NAME"], os.environ["POD_NAMESPACE"])
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "capeff": status["CapEff"].strip(), "nnp": status["NoNewPrivs"].strip(),
    "rootfs": rootfs, "config": open("/etc/app/greeting").read(), "secret": os.environ["PASSWORD"],
    "ip": socket.gethostbyname(socket.gethostname()), "env_ip": os.environ["POD_IP"],
    "api_pod_ip": me.status.pod_ip, "api_node": me.spec.node_name,
}))
"""


def delete_and_wait_until_it_ends(core: client.CoreV1Api, namespace: str, name: str) -> dict[str, Any]:
    """Delete the pod and watch it end: ``{"exit": code}`` of its first container as last seen
    terminated, or ``{}`` if the pod went before a terminated state was seen."""
    ended: dict[str, Any] = {}
    core.delete_namespaced_pod(name, namespace)
    deadline = time.monotonic() + 60
    while not ended:
        assert time.monotonic() < deadline, f"the pod {name} did not end"
        try:
            cs = core.read_namespaced_pod(name, namespace).status.container_statuses or []
        except client.ApiException as e:
            assert e.status == 404
            break
        if cs and cs[0].state.terminated is not None:
            ended["exit"] = cs[0].state.terminated.exit_code
        time.sleep(0.05)
    return ended


def check_pod(api: client.ApiClient, namespace: str, node: Any, script: str) -> dict[str, Any]:
    """A pod that runs ``script`` (CHECK's report) on ``node`` under the restricted profile, with a
    ConfigMap volume, a Secret variable and its own token allowed to read Pods (all three created here)."""
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "app"}, "data": {"greeting": "hello"}})
    core.create_namespaced_secret(namespace, {"metadata": {"name": "app"}, "stringData": {"password": "s3cret"}})
    rbac.create_namespaced_role(
        namespace,
        {"metadata": {"name": "read-pods"}, "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]},
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "read-pods"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-pods"},
            "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": namespace}],
        },
    )
    env = [
        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "app", "key": "password"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]
    container = {
        "command": ["python", "-c", script],
        "env": env,
        "securityContext": RESTRICTED_SC,
        "resources": {"limits": {"memory": "256Mi", "cpu": "1"}},
        "volumeMounts": [{"name": "app", "mountPath": "/etc/app", "readOnly": True}],
    }
    return pod("check", node, container, restartPolicy="Never", volumes=[{"name": "app", "configMap": {"name": "app"}}])


def test_a_pod_runs_from_the_image_under_restricted_pod_security_with_its_volumes_and_token(
    cluster: ClusterHandle, container_node: ContainerNodeHandle, namespace: str
) -> None:
    api = cluster.api_client()
    core = client.CoreV1Api(api)
    core.create_namespaced_pod(namespace, check_pod(api, namespace, container_node, CHECK))  # enforce=restricted
    p = wait_pod(core, namespace, "check", {"Succeeded", "Failed"})
    log = container_node.pod_log(namespace, "check")
    assert p.status.phase == "Succeeded", log
    seen = json.loads(log.strip().splitlines()[-1])
    assert seen["uid"] == 65532 and seen["gid"] == 65532, seen  # the image's user
    assert seen["capeff"] == "0000000000000000" and seen["nnp"] == "1", seen  # no capabilities, no escalation
    assert seen["rootfs"] == "Read-only file system", seen
    assert seen["config"] == "hello" and seen["secret"] == "s3cret", seen
    # Its own address, the same in its namespace, its env and its status (read with its own token).
    assert seen["ip"] == seen["env_ip"] == seen["api_pod_ip"] == p.status.pod_ip, seen
    assert p.status.pod_ip.startswith("10.244.") and seen["api_node"] == container_node.name
    assert p.status.container_statuses[0].container_id.startswith("runc://")


def test_a_container_over_its_memory_limit_is_oomkilled_in_the_pod_status(
    cluster: ClusterHandle, container_node: ContainerNodeHandle, namespace: str
) -> None:
    core = client.CoreV1Api(cluster.api_client())
    container = {
        "command": ["python", "-c", "x = bytearray(300 << 20); print('survived')"],
        "securityContext": RESTRICTED_SC,
        "resources": {"limits": {"memory": "64Mi"}},
    }
    core.create_namespaced_pod(namespace, pod("hungry", container_node, container, restartPolicy="Never"))
    p = wait_pod(core, namespace, "hungry", {"Succeeded", "Failed"})
    term = p.status.container_statuses[0].state.terminated
    assert p.status.phase == "Failed"
    assert (term.reason, term.exit_code) == ("OOMKilled", 137)
    assert "survived" not in container_node.pod_log(namespace, "hungry")


CLIENT = """
import socket, sys, time, urllib.request
ns = sys.argv[1]
print(socket.gethostbyname(f"model.{ns}.svc"), socket.gethostbyname("model"))
for attempt in range(20):  # the node's Service rules follow a new endpoint within a second
    try:
        print(urllib.request.urlopen(f"http://model.{ns}.svc/v1/models", timeout=10).read().decode())
        break
    except OSError as e:
        print("not yet:", e)
        time.sleep(0.5)
try:
    socket.gethostbyname(f"nothing.{ns}.svc")
except OSError:
    print("nothing: no such name")
"""


def model_server(
    core: client.CoreV1Api, namespace: str, node: ContainerNodeHandle | RealNodeHandle, *flags: str
) -> None:
    """The offline model server from the image as a pod behind the Service ``model`` (port 80)."""
    container = {
        "command": ["research-modelserver", "--host", "0.0.0.0", "--port", "8000", *flags],
        "ports": [{"name": "http", "containerPort": 8000}],
        "readinessProbe": {"httpGet": {"path": "/v1/models", "port": "http"}, "periodSeconds": 1},
        "securityContext": RESTRICTED_SC,
    }
    body = pod("model", node, container)
    body["metadata"]["labels"] = {"app": "model"}
    core.create_namespaced_pod(namespace, body)
    core.create_namespaced_service(
        namespace,
        {
            "metadata": {"name": "model"},
            "spec": {"selector": {"app": "model"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
        },
    )
    discovery = client.DiscoveryV1Api(core.api_client)
    deadline = time.monotonic() + 120
    while True:  # ready, and in the Service's EndpointSlice (which the node's Service rules follow)
        slices = discovery.list_namespaced_endpoint_slice(namespace, label_selector="kubernetes.io/service-name=model")
        if any((ep.conditions and ep.conditions.ready) for sl in slices.items for ep in sl.endpoints or []):
            return
        assert time.monotonic() < deadline, f"the model server never became ready: {node.pod_log(namespace, 'model')}"
        time.sleep(0.3)


def test_a_service_resolves_and_routes_and_a_deleted_pod_gets_sigterm(
    cluster: ClusterHandle, container_node: ContainerNodeHandle, namespace: str
) -> None:
    core = client.CoreV1Api(cluster.api_client())
    model_server(core, namespace, container_node)
    cluster_ip = core.read_namespaced_service("model", namespace).spec.cluster_ip
    container = {"command": ["python", "-c", CLIENT, namespace], "securityContext": RESTRICTED_SC}
    core.create_namespaced_pod(namespace, pod("client", container_node, container, restartPolicy="Never"))
    p = wait_pod(core, namespace, "client", {"Succeeded", "Failed"}, timeout=60)
    log = container_node.pod_log(namespace, "client")
    assert p.status.phase == "Succeeded", log
    assert f"{cluster_ip} {cluster_ip}" in log  # <svc>.<ns>.svc and the short name (search domains)
    assert '"id":"offline-research-1"' in log  # through the ClusterIP to the model server's pod
    assert "nothing: no such name" in log
    # A delete: SIGTERM through runc, and the server's own shutdown (exit 0), not the SIGKILL after 30 s.
    ended = delete_and_wait_until_it_ends(core, namespace, "model")
    assert ended.get("exit", 0) == 0, ended
    assert (
        "Shutting down" in container_node.pod_log(namespace, "model")
        or "shutdown" in container_node.pod_log(namespace, "model").lower()
    )


@contextlib.contextmanager
def placement_allowed(operator: OperatorProcess) -> Iterator[None]:
    """Tenancy refuses a toleration or node label that admins did not allow: allow the node's."""
    allowed = {
        "ALLOWED_TOLERATION_KEYS": CONTAINER_RUNTIME_LABEL,
        "ALLOWED_NODE_SELECTOR_KEYS": CONTAINER_RUNTIME_LABEL,
    }
    operator.extra_env = {**operator.extra_env, **allowed}
    operator.restart()
    try:
        yield
    finally:
        operator.extra_env = {k: v for k, v in operator.extra_env.items() if k not in allowed}
        operator.restart()


def worker_placement(node: ContainerNodeHandle | RealNodeHandle) -> dict[str, Any]:
    placement = node.place({})
    return {"nodeSelector": placement["nodeSelector"], "tolerations": placement["tolerations"]}


def test_a_researchjob_succeeds_with_every_worker_a_container_reaching_the_model_through_its_service(
    cluster: ClusterHandle,
    container_or_real_node: ContainerNodeHandle | RealNodeHandle,
    operator: OperatorProcess,
    namespace: str,
    corpus_configmap: str,
) -> None:
    api, node = cluster.api_client(), container_or_real_node
    core = client.CoreV1Api(api)
    model_server(core, namespace, node)
    body = researchjob(
        "boxed",
        corpus_configmap,
        analysts={"count": 2},
        parallelism={"batchSize": 2, "maxActiveJobs": 1},
        model={"baseUrl": f"http://model.{namespace}.svc/v1"},
        worker=worker_placement(node),
    )
    with placement_allowed(operator):
        create(api, namespace, body)
        obj = wait_phase(api, namespace, "boxed", {"Succeeded", "Failed"}, timeout=240)
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    assert len(sections(api, namespace)) == 2
    assert "Introduction" in report_text(api, namespace, obj)
    workers = core.list_namespaced_pod(namespace, label_selector="researchops.io/step").items
    assert workers and {p.spec.node_name for p in workers} == {node.name}
    for p in workers:
        assert p.status.container_statuses[0].container_id.startswith(node.container_id_prefix)
        assert p.status.pod_ip.startswith("10.244.")


def test_a_worker_container_deleted_mid_interview_stops_on_sigterm_as_pid_one_and_nothing_is_done_twice(
    cluster: ClusterHandle,
    container_or_real_node: ContainerNodeHandle | RealNodeHandle,
    operator: OperatorProcess,
    namespace: str,
    corpus_configmap: str,
) -> None:
    """The worker is its container's pid 1 here, where an unhandled SIGTERM is ignored until the
    SIGKILL at the end of the grace period (30 s): it must stop by itself, keep what it stored,
    and its retried pod must redo none of it."""
    api, node = cluster.api_client(), container_or_real_node
    core = client.CoreV1Api(api)
    # One request at a time, 0.7 s each: the four interviews take turns and store their sections
    # one by one at the end, so the pod can be deleted between the first and the last.
    model_server(core, namespace, node, "--ttft-ms", "700")
    ends = PodEnds(api, namespace)
    ends.start()
    body = researchjob(
        "stopped",
        corpus_configmap,
        analysts={"count": 4},
        interview={"maxTurns": 2},
        parallelism={"batchSize": 4, "maxActiveJobs": 1},
        model={"baseUrl": f"http://model.{namespace}.svc/v1", "maxConcurrency": 1},
        worker=worker_placement(node),
    )
    with placement_allowed(operator):
        create(api, namespace, body)
        deadline = time.monotonic() + 240
        while not sections(api, namespace):
            assert time.monotonic() < deadline, "no section was ever stored"
            time.sleep(0.1)
        running = [
            p
            for p in core.list_namespaced_pod(namespace, label_selector="researchops.io/step").items
            if p.status.phase == "Running"
        ]
        assert len(running) == 1, [p.metadata.name for p in running]
        victim = running[0].metadata.name
        assert len(sections(api, namespace)) < 4, "the pod was deleted only after every section was stored"
        core.delete_namespaced_pod(victim, namespace)  # grace period 30 s
        obj = wait_phase(api, namespace, "stopped", {"Succeeded", "Failed"}, timeout=240)
    ends.stop()
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    term = ends.terminated[victim]
    assert term.exit_code == 143, term  # its own exit on SIGTERM; ignored, it would be SIGKILLed (137)
    # The deleted pod is gone from the API; the others may still be ending when the report is stored.
    workers = {p.metadata.name for p in core.list_namespaced_pod(namespace, label_selector="researchops.io/step").items}
    logs = {pod: node.pod_log(namespace, pod) for pod in (set(ends.terminated) | workers) - {"model"}}
    assert "SIGTERM: stopping; no further model calls, what is stored stays stored" in logs[victim]
    stored_by = [
        (pod, int(m)) for pod, text in logs.items() for m in re.findall(r"analyst (\d+) \(.*?\): section stored", text)
    ]
    assert sorted(i for _, i in stored_by) == [0, 1, 2, 3], stored_by  # each section computed and stored once
    first = sorted(i for pod, i in stored_by if pod == victim)
    assert any(f"analysts {first} already have sections; skipping them" in text for text in logs.values()), logs
    assert len(sections(api, namespace)) == 4
    assert "Introduction" in report_text(api, namespace, obj)


def test_a_worker_over_its_memory_limit_is_oomkilled_retried_and_the_researchjob_says_so(
    cluster: ClusterHandle,
    container_or_real_node: ContainerNodeHandle | RealNodeHandle,
    operator: OperatorProcess,
    namespace: str,
    corpus_configmap: str,
) -> None:
    api, node = cluster.api_client(), container_or_real_node
    core = client.CoreV1Api(api)
    model_server(core, namespace, node)
    resources = {"requests": {"cpu": "100m", "memory": "32Mi"}, "limits": {"cpu": "1", "memory": "48Mi"}}
    body = researchjob(
        "tight",
        corpus_configmap,
        analysts={"count": 1},
        retries={"backoffLimit": 1},
        model={"baseUrl": f"http://model.{namespace}.svc/v1"},
        worker={**worker_placement(node), "resources": resources},
    )
    with placement_allowed(operator):
        create(api, namespace, body)
        obj = wait_phase(api, namespace, "tight", {"Succeeded", "Failed"}, timeout=180)
    assert obj["status"]["phase"] == "Failed", obj["status"]
    failed = [c for c in obj["status"]["conditions"] if c["type"] == "Failed"]
    assert failed and failed[0]["status"] == "True"
    said = "OOMKilled: the worker went over its memory limit of 48Mi; raise spec.worker.resources.limits.memory"
    assert said in failed[0]["message"] and said in obj["status"]["message"], obj["status"]
    workers = core.list_namespaced_pod(namespace, label_selector="researchops.io/step").items
    assert len(workers) == 2, [p.metadata.name for p in workers]  # the first, and its one retry
    for p in workers:
        term = p.status.container_statuses[0].state.terminated
        assert (term.reason, term.exit_code) == ("OOMKilled", 137), term
