"""Pods of the product image on the real node (``localkube real-node``: the kubelet, containerd, the
CNI bridge plugin, kube-proxy and CoreDNS): restricted Pod Security enforced by the runtime, the
API server through the ``kubernetes`` Service, ``kubectl logs`` through the kubelet, a Service's
ClusterIP and DNS names routed by kube-proxy and answered by CoreDNS, a memory limit that kills, and
SIGTERM on delete; and `down` leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from kubernetes import client

from localkube import realnode
from localkube.controlplane import REAL_NODE_PROCESS
from tests.fixtures.cluster import ClusterHandle
from tests.fixtures.realnode import CONTAINER_ID_PREFIX, RealNodeHandle
from tests.test_container_node import (
    CHECK,
    CLIENT,
    RESTRICTED_SC,
    check_pod,
    delete_and_wait_until_it_ends,
    model_server,
    pod,
    wait_pod,
)

pytestmark = [pytest.mark.cluster, pytest.mark.image, pytest.mark.realnode]

SECCOMP = """
import re
print("seccomp", re.search(r"Seccomp:\\t(\\d)", open("/proc/self/status").read()).group(1))
"""


def test_a_pod_of_the_image_runs_as_65532_read_only_under_restricted_pod_security_with_its_volumes_and_token(
    cluster: ClusterHandle, real_node: RealNodeHandle, namespace: str
) -> None:
    api = cluster.api_client()
    core = client.CoreV1Api(api)
    core.create_namespaced_pod(namespace, check_pod(api, namespace, real_node, SECCOMP + CHECK))  # enforce=restricted
    p = wait_pod(core, namespace, "check", {"Succeeded", "Failed"})
    log = real_node.pod_log(namespace, "check")
    assert p.status.phase == "Succeeded", log
    seen = json.loads(log.strip().splitlines()[-1])
    assert seen["uid"] == 65532, seen  # the image's user
    assert seen["capeff"] == "0000000000000000" and seen["nnp"] == "1", seen  # no capabilities, no escalation
    assert seen["rootfs"] == "Read-only file system", seen
    assert "seccomp 2" in log  # RuntimeDefault: a filter, applied by containerd and runc
    assert seen["config"] == "hello" and seen["secret"] == "s3cret", seen
    # Its own address, the same in its namespace, its env and its status (read with its own token
    # through the kubernetes Service, which kube-proxy routes to the API server).
    assert seen["ip"] == seen["env_ip"] == seen["api_pod_ip"] == p.status.pod_ip, seen
    assert p.status.pod_ip.startswith("10.244.") and seen["api_node"] == real_node.name
    assert p.status.container_statuses[0].container_id.startswith(CONTAINER_ID_PREFIX)
    # `kubectl logs` works: the API server asks the kubelet.
    assert cluster.kubectl("logs", "-n", namespace, "check").stdout == log


def test_a_service_resolves_and_routes_from_another_pod_and_a_deleted_pod_gets_sigterm(
    cluster: ClusterHandle, real_node: RealNodeHandle, namespace: str
) -> None:
    core = client.CoreV1Api(cluster.api_client())
    model_server(core, namespace, real_node)
    server_ip = core.read_namespaced_pod("model", namespace).status.pod_ip
    cluster_ip = core.read_namespaced_service("model", namespace).spec.cluster_ip
    container = {"command": ["python", "-c", CLIENT, namespace], "securityContext": RESTRICTED_SC}
    core.create_namespaced_pod(namespace, pod("client", real_node, container, restartPolicy="Never"))
    p = wait_pod(core, namespace, "client", {"Succeeded", "Failed"}, timeout=60)
    log = real_node.pod_log(namespace, "client")
    assert p.status.phase == "Succeeded", log
    assert p.status.pod_ip != server_ip
    assert f"{cluster_ip} {cluster_ip}" in log  # <svc>.<ns>.svc and the short name (search domains)
    assert '"id":"offline-research-1"' in log  # through the ClusterIP to the model server's pod
    assert "nothing: no such name" in log
    # A delete: SIGTERM from the kubelet through containerd, and the server's own shutdown (exit 0).
    ended = delete_and_wait_until_it_ends(core, namespace, "model")
    assert ended.get("exit", 0) == 0, ended
    assert "shutdown" in real_node.pod_log(namespace, "model").lower()


def test_a_container_over_its_memory_limit_is_oomkilled_in_the_pod_status(
    cluster: ClusterHandle, real_node: RealNodeHandle, namespace: str
) -> None:
    core = client.CoreV1Api(cluster.api_client())
    container = {
        "command": ["python", "-c", "x = bytearray(300 << 20); print('survived')"],
        "securityContext": RESTRICTED_SC,
        "resources": {"limits": {"memory": "64Mi"}},
    }
    core.create_namespaced_pod(namespace, pod("hungry", real_node, container, restartPolicy="Never"))
    p = wait_pod(core, namespace, "hungry", {"Succeeded", "Failed"})
    term = p.status.container_statuses[0].state.terminated
    assert p.status.phase == "Failed"
    assert (term.reason, term.exit_code) == ("OOMKilled", 137)
    assert "survived" not in real_node.pod_log(namespace, "hungry")


def test_the_node_writes_nothing_into_the_hosts_var_lib_or_var_log(
    cluster: ClusterHandle, real_node: RealNodeHandle, namespace: str
) -> None:
    """The kubelet's device plugin socket and /var/log/containers links, libcni's result cache and
    the pod logs are where the node's mount namespace puts them: its state dir, not the host's."""
    core = client.CoreV1Api(cluster.api_client())
    program = "import time; print('hello', flush=True); time.sleep(600)"
    container = {"command": ["python", "-c", program], "securityContext": RESTRICTED_SC}
    core.create_namespaced_pod(namespace, pod("hello", real_node, container, restartPolicy="Never"))
    uid = wait_pod(core, namespace, "hello", {"Running"}).metadata.uid
    deadline = time.monotonic() + 30
    while real_node.pod_log(namespace, "hello") != "hello\n":
        assert time.monotonic() < deadline, real_node.pod_log(namespace, "hello")
        time.sleep(0.2)
    root = real_node.layout.root
    # In the node's state dir ...
    assert (root / "var-lib" / "kubelet" / "device-plugins" / "kubelet.sock").exists()
    assert any((root / "var-lib" / "cni" / "results").glob("localkube-*-eth0"))  # the running pod's
    assert any((root / "var-log" / "containers").glob(f"hello_{namespace}_main-*.log"))
    assert (real_node.layout.pod_logs / f"{namespace}_hello_{uid}" / "main" / "0.log").exists()
    # ... and nothing of it in the host's.
    assert not Path("/var/lib/kubelet/device-plugins/kubelet.sock").exists()
    assert not any(Path("/var/lib/cni/results").glob("localkube-*"))
    assert not any(Path("/var/log/containers").glob(f"*_{namespace}_*"))
    assert not any(Path("/var/log/pods").glob(f"{namespace}_*"))


def test_a_node_killed_outright_is_cleaned_up_by_the_next_up_and_its_pod_runs_again(
    cluster: ClusterHandle, real_node: RealNodeHandle, namespace: str
) -> None:
    """SIGKILL to the node's supervisor takes its programs with it (their parent-death signal), not
    the containers and their shims; the next start removes those and the new kubelet runs the pod
    again."""
    core = client.CoreV1Api(cluster.api_client())
    container = {"command": ["sleep", "3600"], "securityContext": RESTRICTED_SC}
    core.create_namespaced_pod(namespace, pod("survivor", real_node, container))
    wait_pod(core, namespace, "survivor", {"Running"}, timeout=60)
    socket = str(real_node.layout.containerd_socket)
    shims = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and socket in _cmdline(p)]
    assert shims  # the pod's shims (sandbox and container)
    os.kill(cluster.cluster.recorded_pids()[REAL_NODE_PROCESS], signal.SIGKILL)
    time.sleep(1)
    assert all(_running(pid) for pid in shims)  # left behind, with their containers

    image, bin_dir = (
        Path(json.loads(realnode.node_file(cluster.cluster).read_text())["image"]),
        realnode.build_binaries(),
    )
    realnode.stop(cluster.cluster)  # forgets the dead supervisor (its Node stays, with the pod bound to it)
    assert realnode.start(cluster.cluster, real_node.name, image, bin_dir)
    assert not any(_running(pid) for pid in shims), [(pid, _cmdline(Path(f"/proc/{pid}"))) for pid in shims]
    deadline = time.monotonic() + 60
    while True:
        p = core.read_namespaced_pod("survivor", namespace)
        statuses = p.status.container_statuses or []
        if p.status.phase == "Running" and statuses and statuses[0].ready and statuses[0].restart_count >= 1:
            break
        assert time.monotonic() < deadline, p.status
        time.sleep(0.5)


def test_down_stops_the_pods_and_leaves_no_process_namespace_cgroup_or_node(
    cluster: ClusterHandle, real_node: RealNodeHandle, namespace: str
) -> None:
    """Last in the module: it stops the node (the fixture's own stop then finds nothing to do)."""
    core = client.CoreV1Api(cluster.api_client())
    container = {"command": ["sleep", "3600"], "securityContext": RESTRICTED_SC}
    core.create_namespaced_pod(namespace, pod("sleeper", real_node, container))
    wait_pod(core, namespace, "sleeper", {"Running"}, timeout=60)
    addresses = realnode.NodeAddresses.for_key(realnode.node_key(cluster.state_dir, real_node.name))
    cgroups = [Path("/sys/fs/cgroup", h, realnode.cgroup_root(addresses).lstrip("/")) for h in ("memory", "pids")]
    assert all(any(c.rglob("cgroup.procs")) for c in cgroups)  # the pod's container is in the node's cgroups

    assert realnode.stop(cluster.cluster)

    socket = str(real_node.layout.containerd_socket)
    left = [
        p.name
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and (socket in _cmdline(p) or str(real_node.layout.root) in _cmdline(p))
    ]
    assert not left, left  # no kubelet, containerd, shim, kube-proxy or CoreDNS of the node
    assert not any(c.exists() for c in cgroups)  # no container: its cgroups are gone
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert addresses.node_netns not in netns
    assert str(real_node.layout.root) not in Path("/proc/self/mountinfo").read_text()
    with pytest.raises(client.ApiException) as e:
        core.read_node(real_node.name)
    assert e.value.status == 404


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _running(pid: int) -> bool:
    """The process exists and is not a zombie waiting for its new parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
