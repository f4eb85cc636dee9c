"""The chart on the container node (issue 23), and on the real node (the kubelet, containerd,
kube-proxy, CoreDNS; marker realnode): installed from the locally built image into a namespace that
enforces restricted Pod Security, the operator and the model server run as containers with their
own IPs, the leader writes the lease broker's EndpointSlice with its pod IP, and a ResearchJob whose
workers are containers there Succeeds, every model call through the model server's Service under a
lease granted through the broker's Service."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from localkube import demo
from localkube.demo import RELEASE, RELEASE_NAMESPACE, Kube
from localkube.nodeagent import CONTAINER_RUNTIME_LABEL
from tests.fixtures.cluster import ClusterHandle
from tests.fixtures.containernode import ContainerNodeHandle
from tests.fixtures.realnode import RealNodeHandle

pytestmark = [pytest.mark.cluster, pytest.mark.image]

LEASES_SERVICE = f"{RELEASE}-leases"
Node = ContainerNodeHandle | RealNodeHandle


@pytest.fixture(scope="module")
def boxed_release(
    cluster: ClusterHandle, container_or_real_node: Node, no_test_operator: None, tmp_path_factory: Any
) -> Iterator[Kube]:
    """The chart with every pod of the release on the node (its Services, no host ports)."""
    kube = Kube(cluster.kubeconfig, cluster.tools, cluster.state_dir)
    demo.create_namespace(kube, RELEASE_NAMESPACE)  # restricted Pod Security for the release's pods too
    placement = container_or_real_node.place({})
    values = {
        "image": {"repository": "research-operator", "tag": "0.1.0", "pullPolicy": "Never"},
        "operator": placement,
        "modelServer": placement,
        "tenancy": {
            "allowedTolerationKeys": [CONTAINER_RUNTIME_LABEL],
            "allowedNodeSelectorKeys": ["kubernetes.io/os", CONTAINER_RUNTIME_LABEL],
        },
    }
    path = Path(tmp_path_factory.mktemp("chart")) / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    demo.install(kube, path)
    try:
        demo.wait_available(kube)
        yield kube
    finally:
        demo.uninstall(kube)


def test_the_chart_runs_on_the_node_and_a_researchjob_succeeds_through_its_services(
    boxed_release: Kube, container_or_real_node: Node
) -> None:
    kube, node = boxed_release, container_or_real_node
    pods = kube.get("pods", "-n", RELEASE_NAMESPACE, "-l", f"app.kubernetes.io/instance={RELEASE}")
    assert pods is not None and pods["items"]
    for p in pods["items"]:
        assert p["spec"]["nodeName"] == node.name, p["metadata"]["name"]
        assert p["status"]["podIP"].startswith("10.244."), p["status"]
        assert all(c["containerID"].startswith(node.container_id_prefix) for c in p["status"]["containerStatuses"])
    operator = demo.operator_pod(kube)
    # The leader points the broker's Service at its own pod IP (on a process node it cannot: 127.0.0.1).
    deployment = kube.get("deployment", RELEASE, "-n", RELEASE_NAMESPACE)
    assert deployment is not None
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0].get("env", [])}
    broker_port = int(env["LEASE_BROKER_PORT"])
    written = None
    for _ in range(60):
        written = kube.get("endpointslice", LEASES_SERVICE, "-n", RELEASE_NAMESPACE)
        if written is not None:
            break
        time.sleep(1)
    assert written is not None, node.pod_log(RELEASE_NAMESPACE, operator["metadata"]["name"])[-3000:]
    assert [e["addresses"] for e in written["endpoints"]] == [[operator["status"]["podIP"]]]
    assert [p["port"] for p in written["ports"]] == [broker_port]

    settings = kube.get("configmap", f"{RELEASE}-settings", "-n", RELEASE_NAMESPACE)
    assert settings is not None
    model_url = settings["data"]["defaultModelBaseUrl"]
    assert ".svc" in model_url, model_url  # the model server's Service, by its DNS name
    namespace = f"box-{uuid.uuid4().hex[:6]}"
    demo.create_namespace(kube, namespace)
    demo.apply_corpus(kube, namespace)
    endpoint = f"box-{uuid.uuid4().hex[:6]}"
    manifest = {
        "apiVersion": "researchops.io/v1alpha1",
        "kind": "ModelEndpoint",
        "metadata": {"name": endpoint},
        "spec": {"baseUrl": model_url, "maxConcurrentRequests": 1},
    }
    kube.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    try:
        body = demo.load_researchjob()
        body["spec"]["interview"]["maxTurns"] = 1
        body["spec"].update(
            analysts={"count": 2},
            parallelism={"batchSize": 1, "maxActiveJobs": 2},
            worker=node.place({}),
        )
        name = demo.apply_researchjob(kube, namespace, body)
        obj = demo.follow(kube, namespace, name, timeout=300, emit=lambda _: None)
    finally:
        kube.kubectl("delete", "modelendpoint", endpoint, "--ignore-not-found", check=False)
    assert obj["status"]["phase"] == "Succeeded" and obj["status"]["progress"] == "2/2", obj["status"]
    workers = kube.get("pods", "-n", namespace, "-l", "researchops.io/step")
    assert workers is not None and workers["items"]
    logs = ""
    for p in workers["items"]:
        assert p["spec"]["nodeName"] == node.name
        logs += node.pod_log(namespace, p["metadata"]["name"])
    # Every worker reached the broker through its Service name (DNS, then the leader's EndpointSlice).
    assert f"lease broker https://{LEASES_SERVICE}.{RELEASE_NAMESPACE}.svc:{broker_port} answers" in logs, logs[-3000:]
    assert "falling back to this pod's share" not in logs
    kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
