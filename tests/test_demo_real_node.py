"""``make demo`` on the real node (issue 23): ``python -m localkube.demo up`` as a user runs it, on
the session's cluster, with what it prints checked as a user reads it: the chart's pods on the real
node ``localreal-1`` (the kubelet, containerd, kube-proxy, CoreDNS) with pod IPs, the example
ResearchJob Succeeded, the report, and the worker pods' logs (``kubectl research logs``, which reads
them through the kubelet) saying that the lease broker answered at its Service. A pod watch records
every worker pod the operator created: each ran there as a containerd container with its own IP. A
second ``up`` on the running cluster reuses the node and the release; a third, after the node
stopped (as a reboot stops it), starts the node again, whose kubelet starts the pods again in
place. The module ends with ``demo down`` without stopping the cluster (the session's)."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from kubernetes import client, watch

from localkube import demo
from localkube.controlplane import REAL_NODE_PROCESS, Cluster
from localkube.demo import DEMO_NAMESPACE, NODE, RELEASE, RELEASE_NAMESPACE, Kube
from tests.fixtures.cluster import ClusterHandle

pytestmark = [pytest.mark.cluster, pytest.mark.image, pytest.mark.realnode]

BROKER_SERVICE_URL = re.compile(rf"lease broker https://{RELEASE}-leases\.{RELEASE_NAMESPACE}\.svc:\d+ answers")


class PodWatch(threading.Thread):
    """Every pod of a namespace seen while the watch runs: the last state of each (by uid)."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        super().__init__(daemon=True)
        self.core = client.CoreV1Api(api)
        self.namespace = namespace
        self.pods: dict[str, dict[str, Any]] = {}
        self.stop_flag = threading.Event()

    def run(self) -> None:
        w = watch.Watch()
        while not self.stop_flag.is_set():
            for ev in w.stream(self.core.list_namespaced_pod, self.namespace, timeout_seconds=2):
                pod = ev["object"]
                seen = self.pods.setdefault(pod.metadata.uid, {"name": pod.metadata.name})
                seen["node"] = pod.spec.node_name or seen.get("node")
                if pod.status.pod_ip:
                    seen["ip"] = pod.status.pod_ip
                ids = [c.container_id for c in pod.status.container_statuses or [] if c.container_id]
                seen["containers"] = ids or seen.get("containers", [])
                if self.stop_flag.is_set():
                    break

    def stop(self) -> None:
        self.stop_flag.set()
        self.join(timeout=10)


@dataclass
class DemoRun:
    kube: Kube
    code: int
    lines: list[str]
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def listed_pods(run: DemoRun) -> list[list[str]]:
    """The release's pods as the demo lists them: NAME, STATUS, IP, NODE."""
    return [line.split() for line in run.lines if line.endswith(f" {NODE}") and "Running" in line]


def run_demo(cluster: ClusterHandle) -> DemoRun:
    kube = Kube(cluster.kubeconfig, cluster.tools, cluster.state_dir)
    pods = PodWatch(cluster.api_client(), DEMO_NAMESPACE)
    pods.start()
    lines: list[str] = []
    try:
        code = demo.up(timeout=300, emit=lines.append)
    finally:
        pods.stop()
    return DemoRun(kube, code, lines, pods.pods)


@pytest.fixture(scope="module")
def demo_runs(cluster: ClusterHandle, no_test_operator: None) -> Iterator[list[DemoRun]]:
    if os.geteuid() != 0:
        pytest.fail("the real node needs root (containerd, runc, network and mount namespaces)")
    assert Cluster().state_dir == cluster.state_dir  # the demo runs on the session's cluster
    runs: list[DemoRun] = []
    try:
        runs.append(run_demo(cluster))
        runs.append(run_demo(cluster))  # `make demo` again on the running cluster
        # The node stops (as a reboot stops it): its containers go, the release's pods stay in the
        # API, bound to the Node.
        assert cluster.cluster.stop_process(REAL_NODE_PROCESS)
        runs.append(run_demo(cluster))
        yield runs
    finally:
        demo.down(emit=lambda _: None, stop_cluster=False)


def test_make_demo_runs_the_chart_and_the_researchjob_as_containers_and_prints_the_report(
    demo_runs: list[DemoRun],
) -> None:
    run = demo_runs[0]
    assert run.code == 0, run.text
    out = run.text
    # The release's pods, as the demo lists them (kubectl get pods -o wide): on the node, with pod IPs.
    listed = listed_pods(run)
    assert {row[0].rsplit("-", 2)[0] for row in listed} == {RELEASE, f"{RELEASE}-modelserver"}, out
    assert all(row[2].startswith("10.244.") for row in listed), listed

    # The example ResearchJob Succeeded, and its report is printed.
    assert re.search(r"Succeeded: 4/4 sections, \d+ tokens", out), out[-3000:]
    report = out.split("-" * 100)[1]
    assert report.strip().startswith("# ") and "## Sources" in report, report[:500]
    assert re.search(r"\[\d+\]", report)
    obj = run.kube.get("researchjob", "fair-sharing", "-n", DEMO_NAMESPACE)
    assert obj is not None and obj["status"]["phase"] == "Succeeded", (obj or {}).get("status")

    # Every worker pod (planner, interview batches, writer) ran on the node as a container with its own IP.
    assert run.workers, "no worker pod was seen"
    for pod in run.workers.values():
        assert pod["node"] == NODE, pod
        assert pod.get("ip", "").startswith("10.244."), pod  # not 127.0.0.1: a network namespace of its own
        assert pod["containers"] and all(c.startswith("containerd://") for c in pod["containers"]), pod

    # The workers' logs (`kubectl research logs` through the kubelet, and the node's copies of the
    # deleted pods' logs): each pod took its
    # leases from the broker at its Service's DNS name (the leader's EndpointSlice), none fell back.
    answered = [line for line in run.lines if BROKER_SERVICE_URL.search(line)]
    assert answered, out[-3000:]
    logs = demo.worker_logs(run.kube, DEMO_NAMESPACE, "fair-sharing")
    assert "falling back to this pod's share" not in logs
    assert f"{RELEASE}-modelserver.{RELEASE_NAMESPACE}.svc:8000/v1" in logs


def test_make_demo_again_reuses_the_node_and_the_release_and_succeeds_anew(demo_runs: list[DemoRun]) -> None:
    first, again, _ = demo_runs
    assert again.code == 0, again.text
    assert "reused the running cluster" in again.text
    assert "reused the node (kubelet, containerd" in again.text
    assert "deleting the previous run's researchjob/fair-sharing" in again.text
    assert re.search(r"Succeeded: 4/4 sections", again.text), again.text[-3000:]
    # The release's pods were not replaced by the rerun's helm upgrade.
    assert [row[0] for row in listed_pods(first)] == [row[0] for row in listed_pods(again)], again.text
    assert again.workers and all(p["node"] == NODE for p in again.workers.values())


def test_make_demo_after_the_node_stopped_starts_it_and_the_releases_pods_come_back(demo_runs: list[DemoRun]) -> None:
    first, _, restarted = demo_runs
    assert restarted.code == 0, restarted.text
    assert "started the node (kubelet, containerd" in restarted.text
    assert re.search(r"Succeeded: 4/4 sections", restarted.text), restarted.text[-3000:]
    # The same pods, their containers started again in place (kubectl would show RESTARTS 1),
    # listed with their pod IPs.
    rows = listed_pods(restarted)
    assert [row[0] for row in rows] == [row[0] for row in listed_pods(first)], restarted.text
    assert all(len(row) == 4 and row[2].startswith("10.244.") for row in rows), rows
    assert restarted.workers and all(p["node"] == NODE for p in restarted.workers.values())
