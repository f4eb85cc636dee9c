"""The local control plane does what a real cluster does: Job controller, quota, GC, RBAC."""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.fixtures.cluster import ClusterHandle

pytestmark = pytest.mark.cluster

RESTRICTED_CONTAINER_SC = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def python_job(name: str, code: str, service_account: str | None = None, backoff: int = 0) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [
            {
                "name": "main",
                "image": "python:3.11-slim",
                "command": ["python", "-c", code],
                "securityContext": RESTRICTED_CONTAINER_SC,
            }
        ],
    }
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"backoffLimit": backoff, "template": {"spec": pod_spec}},
    }


def wait_job_finished(batch: client.BatchV1Api, ns: str, name: str, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = batch.read_namespaced_job(name, ns)
        for cond in job.status.conditions or []:
            if cond.type in ("Complete", "Failed") and cond.status == "True":
                return str(cond.type)
        time.sleep(0.3)
    raise AssertionError(f"job {ns}/{name} did not finish in {timeout}s: {job.status}")


def test_nodes_are_ready(cluster: ClusterHandle) -> None:
    nodes = client.CoreV1Api(cluster.api_client()).list_node().items
    assert nodes
    for node in nodes:
        ready = {c.type: c.status for c in node.status.conditions}["Ready"]
        assert ready == "True", node.metadata.name
        assert node.status.allocatable["cpu"]


def test_server_reports_the_pinned_version(cluster: ClusterHandle) -> None:
    out = cluster.kubectl("version", "-o", "json").stdout
    assert '"gitVersion": "v1.37.2"' in out


def test_python_job_completes(cluster: ClusterHandle, namespace: str) -> None:
    api = cluster.api_client()
    batch = client.BatchV1Api(api)
    batch.create_namespaced_job(namespace, python_job("hello", "print('hello from a pod')"))
    assert wait_job_finished(batch, namespace, "hello") == "Complete"
    job = batch.read_namespaced_job("hello", namespace)
    assert job.status.succeeded == 1
    pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector="job-name=hello").items
    assert pods[0].status.phase == "Succeeded"
    assert pods[0].status.container_statuses[0].state.terminated.exit_code == 0
    assert "hello from a pod" in cluster.pod_log(namespace, pods[0].metadata.name)


def test_failing_job_reports_failed_with_exit_code(cluster: ClusterHandle, namespace: str) -> None:
    api = cluster.api_client()
    batch = client.BatchV1Api(api)
    batch.create_namespaced_job(namespace, python_job("boom", "raise SystemExit(3)"))
    assert wait_job_finished(batch, namespace, "boom") == "Failed"
    pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector="job-name=boom").items
    assert pods[0].status.container_statuses[0].state.terminated.exit_code == 3


def test_job_count_quota_rejects_second_job(cluster: ClusterHandle, namespace: str) -> None:
    api = cluster.api_client()
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    core.create_namespaced_resource_quota(
        namespace,
        {"metadata": {"name": "one-job"}, "spec": {"hard": {"count/jobs.batch": "1"}}},
    )
    # The quota controller fills in status.used before quota admission can count against it.
    deadline = time.monotonic() + 30
    while not (core.read_namespaced_resource_quota("one-job", namespace).status.used or {}):
        assert time.monotonic() < deadline, "quota status was never computed"
        time.sleep(0.2)
    batch.create_namespaced_job(namespace, python_job("first", "import time; time.sleep(5)"))
    with pytest.raises(ApiException) as err:
        batch.create_namespaced_job(namespace, python_job("second", "print(1)"))
    assert err.value.status == 403
    assert "exceeded quota" in err.value.body


def test_deleting_owner_garbage_collects_owned_configmap(cluster: ClusterHandle, namespace: str) -> None:
    core = client.CoreV1Api(cluster.api_client())
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}, "data": {"a": "b"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "owned", "ownerReferences": [ref]}, "data": {"c": "d"}}
    )
    core.delete_namespaced_config_map("owner", namespace)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            core.read_namespaced_config_map("owned", namespace)
        except ApiException as e:
            assert e.status == 404
            return
        time.sleep(0.3)
    raise AssertionError("owned ConfigMap was not garbage-collected")


RBAC_PROBE = """
import sys
from kubernetes import client, config
from kubernetes.client.rest import ApiException
config.load_config()
api = client.CoreV1Api()
import os
ns = os.environ['POD_NAMESPACE']
print('configmaps', len(api.list_namespaced_config_map(ns).items))
try:
    api.list_namespaced_secret(ns)
    print('secrets: allowed')
except ApiException as e:
    print('secrets:', e.status)
    sys.exit(0 if e.status == 403 else 1)
sys.exit(1)
"""


def test_pod_service_account_is_bound_by_rbac(cluster: ClusterHandle, namespace: str) -> None:
    api = cluster.api_client()
    core, batch, rbac = client.CoreV1Api(api), client.BatchV1Api(api), client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "configmap-reader"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "configmap-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
        },
    )
    job = python_job("rbac", RBAC_PROBE, service_account="reader")
    job["spec"]["template"]["spec"]["containers"][0]["env"] = [
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}
    ]
    batch.create_namespaced_job(namespace, job)
    result = wait_job_finished(batch, namespace, "rbac")
    pod = core.list_namespaced_pod(namespace, label_selector="job-name=rbac").items[0]
    log = cluster.pod_log(namespace, pod.metadata.name)
    assert result == "Complete", log
    # The pod's own token worked (it may list configmaps) and RBAC refused what it was not granted.
    assert "configmaps 1" in log  # kube-root-ca.crt is published into every namespace
    assert "secrets: 403" in log


def test_down_stops_exactly_what_up_started(tmp_path: Any, cluster: ClusterHandle) -> None:
    """A second cluster in its own state dir: `down` leaves none of its processes behind and does
    not touch the session's cluster."""
    import os

    from localkube.controlplane import Cluster

    other = Cluster(tmp_path / "state")
    other.up()
    pids = {name: int(p.read_text().split()[0]) for name, p in ((p.stem, p) for p in other.pids_dir.glob("*.pid"))}
    assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "node-agent"}
    assert set(other.down()) == set(pids)
    for name, pid in pids.items():
        try:
            os.kill(pid, 0)
            stat = open(f"/proc/{pid}/stat").read()
            assert stat.rsplit(")", 1)[1].split()[0] == "Z", f"{name} (pid {pid}) still runs"
        except ProcessLookupError:
            pass
    assert cluster.cluster.healthy(), "stopping another cluster must not touch this one"
