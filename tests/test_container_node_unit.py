"""The container node's pure parts: Service rules, DNS answers, addresses, and what a pod's spec
becomes for runc (localkube.nodenet, localkube.podcontainer)."""

from __future__ import annotations

import socket
import stat
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from localkube import nodeagent
from localkube.containers import Image
from localkube.nodenet import NodeAddresses, dns_answer, nat_rules, service_table
from localkube.podcontainer import container_mounts, container_spec, image_reference, write_volumes
from localkube.podenv import ContainerConfigError

RELAY = ("10.0.0.1", "10.243.7.1", 6443)
IMAGE = Image(Path("/img"), ("research-operator",), (), ("PATH=/opt/venv/bin:/usr/bin",), "65532:65532", "/app")


def svc(ns: str, name: str, ip: str, *ports: tuple[str, int]) -> dict[str, Any]:
    return {
        "metadata": {"namespace": ns, "name": name},
        "spec": {"clusterIP": ip, "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports]},
    }


def endpoint_slice(ns: str, service: str, port: tuple[str, int], *endpoints: tuple[str, bool]) -> dict[str, Any]:
    return {
        "metadata": {"namespace": ns, "name": f"{service}-x", "labels": {"kubernetes.io/service-name": service}},
        "ports": [{"name": port[0], "port": port[1]}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}} for ip, ready in endpoints],
    }


def test_a_service_port_is_dnat_to_its_ready_endpoints_on_the_node_and_nowhere_else() -> None:
    table = service_table(
        [svc("ns", "model", "10.0.0.17", ("http", 80)), svc("ns", "empty", "10.0.0.18", ("", 81))],
        [
            endpoint_slice(
                "ns", "model", ("http", 8000), ("10.244.7.2", True), ("10.244.7.3", True), ("10.244.7.4", False)
            ),
            endpoint_slice("ns", "model", ("http", 8000), ("127.0.0.1", True)),  # a process pod: unreachable
        ],
        "10.244.7.0/24",
        RELAY,
    )
    rules = nat_rules(table)
    dnat = [line for line in rules.splitlines() if "-j DNAT" in line]
    assert dnat == [
        "-A LK-SERVICES -d 10.0.0.17/32 -p tcp -m tcp --dport 80 -m statistic --mode random --probability 0.50000 "
        "-j DNAT --to-destination 10.244.7.2:8000",
        "-A LK-SERVICES -d 10.0.0.17/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.244.7.3:8000",
    ]
    assert "-A FORWARD -d 10.0.0.18/32 -p tcp -m tcp --dport 81 -j REJECT --reject-with icmp-port-unreachable" in rules
    assert "-A POSTROUTING -m conntrack --ctstate DNAT -j MASQUERADE" in rules
    assert table.names == {"model.ns": ["10.0.0.17"], "empty.ns": ["10.0.0.18"]}


def test_the_kubernetes_service_goes_to_the_relay_to_the_api_server() -> None:
    table = service_table([svc("default", "kubernetes", "10.0.0.1", ("https", 443))], [], "10.244.7.0/24", RELAY)
    assert "-A LK-SERVICES -d 10.0.0.1/32 -p tcp -m tcp --dport 443 -j DNAT --to-destination 10.243.7.1:6443" in (
        nat_rules(table)
    )


def test_a_headless_service_resolves_to_its_ready_endpoints() -> None:
    table = service_table(
        [svc("ns", "db", "None", ("pg", 5432))],
        [endpoint_slice("ns", "db", ("pg", 5432), ("10.244.7.9", True), ("10.244.7.8", True))],
        "10.244.7.0/24",
        RELAY,
    )
    assert table.ports == [] and table.names == {"db.ns": ["10.244.7.8", "10.244.7.9"]}


def query(name: str, qtype: int = 1) -> bytes:
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, 1)


@pytest.mark.parametrize("name", ["model.ns.svc", "model.ns.svc.cluster.local", "MODEL.ns.svc.cluster.local"])
def test_a_service_name_answers_its_cluster_ip(name: str) -> None:
    reply = dns_answer(query(name), {"model.ns": ["10.0.0.17"]})
    assert reply is not None
    ident, flags, _, answers = struct.unpack("!HHHH", reply[:8])
    assert ident == 0x1234 and flags & 0x000F == 0 and answers == 1
    assert socket.inet_ntoa(reply[-4:]) == "10.0.0.17"


def test_unknown_names_are_nxdomain_and_other_record_types_are_empty() -> None:
    names = {"model.ns": ["10.0.0.17"]}
    for name in ("other.ns.svc.cluster.local", "model.ns.svc.ns.svc.cluster.local", "example.com"):
        reply = dns_answer(query(name), names)
        assert reply is not None and struct.unpack("!H", reply[2:4])[0] & 0x000F == 3, name
    aaaa = dns_answer(query("model.ns.svc.cluster.local", 28), names)
    assert aaaa is not None and struct.unpack("!HH", aaaa[2:4] + aaaa[6:8]) == (0x8580, 0)
    assert dns_answer(b"\x00\x01", names) is None


def test_two_nodes_or_clusters_get_their_own_names_and_addresses() -> None:
    a, b = NodeAddresses.for_key("/tmp/a:ctr-1"), NodeAddresses.for_key("/tmp/b:ctr-1")
    assert a.prefix != b.prefix
    assert len(a.host_if) <= 15  # an interface name; namespaces are files and may be longer
    assert a.pod_netns("0123-4567-89ab") == f"{a.prefix}-0123456789"
    assert a.pod_cidr == f"10.244.{a.index}.0/24" and a.gateway == f"10.244.{a.index}.1"


@pytest.mark.parametrize(
    ("image", "same"),
    [
        ("research-operator:0.1.0", True),
        ("localhost/research-operator:0.1.0", True),
        ("docker.io/library/research-operator:0.1.0", True),
        ("research-operator:0.2.0", False),
        ("research-operator", False),
        ("python:3.11", False),
    ],
)
def test_the_node_serves_only_its_own_image(image: str, same: bool) -> None:
    assert (image_reference(image) == image_reference("research-operator:0.1.0")) is same


RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def pod(container: Mapping[str, Any], **pod_sc: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u-1"},
        "spec": {"securityContext": pod_sc, "containers": [container]},
    }


def spec_of(container: dict[str, Any], **pod_sc: Any) -> Any:
    return container_spec(
        pod(container, **pod_sc),
        container,
        IMAGE,
        ["research-worker", "plan"],
        {"A": "1"},
        mounts=(),
        netns=Path("/run/netns/x"),
        pod_ip="10.244.7.2",
        resolv_conf="nameserver 10.243.7.1\n",
    )


def test_a_restricted_container_runs_as_the_image_user_read_only_without_privileges_within_its_limits() -> None:
    c = {"name": "w", "securityContext": RESTRICTED, "resources": {"limits": {"memory": "256Mi", "cpu": "500m"}}}
    s = spec_of(c, runAsNonRoot=True, fsGroup=2000)
    assert s.user == "65532:65532" and s.groups == (2000,)
    assert s.readonly_root and s.no_new_privileges
    assert s.limits.memory_bytes == 256 << 20 and s.limits.cpu_millis == 500
    assert s.netns == Path("/run/netns/x") and s.ip == "10.244.7.2"


def test_run_as_user_and_group_override_the_image_and_a_writable_root_is_asked_for() -> None:
    s = spec_of(
        {"name": "w", "securityContext": {"runAsUser": 1000, "allowPrivilegeEscalation": True}}, runAsGroup=3000
    )
    assert s.user == "1000:3000" and not s.readonly_root and not s.no_new_privileges


@pytest.mark.parametrize(
    ("container", "pod_sc", "message"),
    [
        ({"name": "w", "securityContext": {"runAsUser": 0}}, {"runAsNonRoot": True}, "runAsNonRoot"),
        ({"name": "w", "securityContext": {"privileged": True}}, {}, "privileged"),
        ({"name": "w", "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}, {}, "NET_ADMIN"),
    ],
)
def test_what_the_node_refuses_is_a_config_error(
    container: dict[str, Any], pod_sc: dict[str, Any], message: str
) -> None:
    with pytest.raises(ContainerConfigError, match=message):
        spec_of(container, **pod_sc)


class Lookup:
    def config_map(self, namespace: str, name: str) -> Mapping[str, str] | None:
        return {"greeting": "hello", "other": "x"} if name == "cfg" else None

    def secret(self, namespace: str, name: str) -> Mapping[str, str] | None:
        return {"password": "s3cret"} if name == "sec" else None


def test_volumes_are_written_and_mounted_as_the_kubelet_would(tmp_path: Path) -> None:
    p = pod({"name": "w"})
    p["spec"]["volumes"] = [
        {"name": "cfg", "configMap": {"name": "cfg", "items": [{"key": "greeting", "path": "g/greeting.txt"}]}},
        {"name": "sec", "secret": {"secretName": "sec", "defaultMode": 0o440}},
        {"name": "tmp", "emptyDir": {}},
        {
            "name": "kube-api-access-x",
            "projected": {
                "sources": [
                    {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                    {"configMap": {"name": "cfg", "items": [{"key": "other", "path": "ca.crt"}]}},
                    {
                        "downwardAPI": {
                            "items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]
                        }
                    },
                ]
            },
        },
        {"name": "gone", "configMap": {"name": "missing", "optional": True}},
    ]
    dirs, tokens = write_volumes(p, tmp_path, Lookup(), 65532, None, "10.244.7.2")
    assert (dirs["cfg"] / "g" / "greeting.txt").read_text() == "hello"
    assert not (dirs["cfg"] / "other").exists()
    assert stat.S_IMODE((dirs["sec"] / "password").stat().st_mode) == 0o440
    assert stat.S_IMODE(dirs["tmp"].stat().st_mode) == 0o777
    assert (dirs["kube-api-access-x"] / "namespace").read_text() == "ns"
    assert [(t.volume, t.path, t.seconds) for t in tokens] == [("kube-api-access-x", "token", 3607)]
    mounts = container_mounts(
        {
            "volumeMounts": [
                {"name": "cfg", "mountPath": "/etc/cfg"},
                {"name": "tmp", "mountPath": "/tmp", "subPath": "t"},
            ]
        },
        dirs,
    )
    assert [(m.destination, m.source, m.readonly) for m in mounts] == [
        ("/etc/cfg", dirs["cfg"], False),
        ("/tmp", dirs["tmp"] / "t", False),
    ]


def test_a_missing_configmap_or_a_host_path_is_refused(tmp_path: Path) -> None:
    p = pod({"name": "w"})
    p["spec"]["volumes"] = [{"name": "cfg", "configMap": {"name": "missing"}}]
    with pytest.raises(ContainerConfigError, match='configMap "missing" not found'):
        write_volumes(p, tmp_path, Lookup(), 65532, None, "10.244.7.2")
    p["spec"]["volumes"] = [{"name": "h", "hostPath": {"path": "/etc"}}]
    with pytest.raises(ContainerConfigError, match="hostPath volumes are not supported"):
        write_volumes(p, tmp_path, Lookup(), 65532, None, "10.244.7.2")


def test_a_container_node_can_carry_more_taints_than_the_runtimes() -> None:
    """The demo's node is tainted localkube.dev/dedicated=demo beside the runtime's taint, so a pod
    that tolerates only the runtime (the tests' own container nodes) never lands on it."""
    taint = nodeagent.parse_taint("localkube.dev/dedicated=demo:NoSchedule")
    assert taint == {"key": "localkube.dev/dedicated", "value": "demo", "effect": "NoSchedule"}
    assert nodeagent.parse_taint("dedicated:NoExecute") == {"key": "dedicated", "effect": "NoExecute"}
    node = nodeagent.container_node_manifest("n1", "10.244.3.0/24", [taint])
    assert node["spec"]["taints"] == [nodeagent.CONTAINER_TAINT, taint]
    assert node["metadata"]["labels"][nodeagent.CONTAINER_RUNTIME_LABEL] == "runc"
    for bad in ("dedicated=demo", "dedicated=demo:Sometimes", ":NoSchedule"):
        with pytest.raises(ValueError, match="KEY=VALUE:EFFECT"):
            nodeagent.parse_taint(bad)
