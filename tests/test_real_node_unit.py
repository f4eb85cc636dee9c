"""The real node's pure parts (localkube.realnode): its programs' configs keep every file under the
node's state dir, the CNI network is the Node's podCIDR, the sandbox image is the product image
with a process that only waits, and pod logs read as `kubectl logs` prints them."""

from __future__ import annotations

import hashlib
import json
import tarfile
import tomllib
from pathlib import Path
from typing import Any

from localkube import realnode
from localkube.nodenet import NodeAddresses

ADDR = NodeAddresses(prefix="lk1234", index=7)


def layout(tmp_path: Path) -> realnode.NodeLayout:
    return realnode.NodeLayout(tmp_path / "state" / "real-nodes" / "n1")


def paths_in(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [p for v in value.values() for p in paths_in(v)]
    if isinstance(value, list):
        return [p for v in value for p in paths_in(v)]
    return [value] if isinstance(value, str) and value.startswith("/") else []


def test_containerd_keeps_its_root_state_socket_and_network_config_under_the_node_state_dir(tmp_path: Path) -> None:
    lay = layout(tmp_path)
    cfg = tomllib.loads(realnode.containerd_config(lay, "docker.io/library/research-operator:0.1.0-sandbox"))
    assert cfg["root"] == str(lay.containerd_root) and cfg["state"] == str(lay.containerd_state)
    assert cfg["grpc"]["address"] == str(lay.containerd_socket)
    runtime = cfg["plugins"]["io.containerd.cri.v1.runtime"]
    assert runtime["restrict_oom_score_adj"] is True  # root has no CAP_SYS_RESOURCE here
    assert runtime["netns_mounts_under_state_dir"] is True
    assert runtime["cni"]["conf_dir"] == str(lay.cni_conf) and runtime["cni"]["bin_dirs"] == ["/usr/lib/cni"]
    runc = runtime["containerd"]["runtimes"]["runc"]
    assert runc["runtime_type"] == "io.containerd.runc.v2" and runc["options"]["SystemdCgroup"] is False
    images = cfg["plugins"]["io.containerd.cri.v1.images"]
    assert images["pinned_images"]["sandbox"] == "docker.io/library/research-operator:0.1.0-sandbox"


def test_the_kubelet_and_kube_proxy_write_nothing_outside_the_node_state_dir(tmp_path: Path) -> None:
    lay = layout(tmp_path)
    kubelet = realnode.kubelet_config(lay, ADDR)
    proxy = realnode.kube_proxy_config(lay, "n1")
    # A cgroup of the node's own (in the cgroup hierarchies), not a file.
    assert kubelet.pop("cgroupRoot") == "/localkube-lk1234"
    for path in paths_in(kubelet) + paths_in(proxy):
        assert Path(path).is_relative_to(lay.root), path
    assert kubelet["podLogsDir"] == str(lay.pod_logs)
    assert kubelet["failCgroupV1"] is False and kubelet["cgroupDriver"] == "cgroupfs"
    assert kubelet["authentication"]["anonymous"]["enabled"] is False and kubelet["authorization"]["mode"] == "Webhook"
    assert kubelet["address"] == ADDR.uplink_ip == "10.243.7.2"
    assert kubelet["clusterDNS"] == [realnode.DNS_SERVICE_IP]
    assert kubelet["registerWithTaints"] == [
        {"key": realnode.RUNTIME_LABEL, "value": "containerd", "effect": "NoSchedule"}
    ]
    assert proxy["mode"] == "iptables" and proxy["conntrack"]["maxPerCore"] == 0


def test_pods_get_addresses_of_the_nodes_pod_cidr_on_its_bridge_with_ipam_state_in_the_state_dir(
    tmp_path: Path,
) -> None:
    lay = layout(tmp_path)
    net = realnode.cni_conflist(ADDR, lay.ipam)
    (bridge,) = net["plugins"]
    assert bridge["type"] == "bridge" and bridge["bridge"] == "cbr0" and bridge["isGateway"] is True
    assert bridge["ipam"]["type"] == "host-local"
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.244.7.0/24", "gateway": "10.244.7.1"}]]
    assert bridge["ipam"]["dataDir"] == str(lay.ipam)


def test_coredns_answers_the_cluster_domain_on_the_node_address_behind_the_kube_dns_service(tmp_path: Path) -> None:
    corefile = realnode.corefile(ADDR, tmp_path / "coredns.kubeconfig")
    assert "bind 10.243.7.2" in corefile and "kubernetes cluster.local" in corefile
    assert "forward" not in corefile  # nothing leaves the node
    objects = {obj["metadata"]["name"]: obj for _, obj in realnode.dns_objects(ADDR)}
    assert objects["kube-dns"]["spec"]["clusterIP"] == "10.0.0.10"
    assert objects["kube-dns-lk1234"]["endpoints"][0]["addresses"] == ["10.243.7.2"]
    # The kubernetes Service's endpoint: the relay to the API server on the host end of the uplink.
    assert objects["kubernetes-lk1234"]["endpoints"][0]["addresses"] == ["10.243.7.1"]


def oci_export(tmp_path: Path) -> Path:
    export = tmp_path / "export"
    blobs = export / "oci" / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}"

    layer = blob(b"layer")
    cfg = json.dumps(
        {"config": {"User": "65532:65532", "Entrypoint": ["research-operator"], "Cmd": ["x"], "ExposedPorts": {}}}
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blob(cfg), "size": len(cfg)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": 5}],
        }
    ).encode()
    desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": blob(manifest), "size": len(manifest)}
    (export / "oci" / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    (export / "oci" / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return export


def test_the_archive_holds_the_image_and_its_sandbox_the_same_layers_with_a_process_that_only_waits(
    tmp_path: Path,
) -> None:
    export = oci_export(tmp_path)
    out = tmp_path / "image.tar"
    with out.open("wb") as f:
        realnode.write_archive(f, export, "0.1.0")
    with tarfile.open(out) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]

    def blob(digest: str) -> Any:
        return json.loads(files[f"blobs/sha256/{digest.partition(':')[2]}"])

    index = json.loads(files["index.json"])
    tags = {m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"] for m in index["manifests"]}
    assert set(tags) == {"0.1.0", "0.1.0-sandbox"}
    product, sandbox = blob(tags["0.1.0"]), blob(tags["0.1.0-sandbox"])
    assert sandbox["layers"] == product["layers"]
    cfg = blob(sandbox["config"]["digest"])["config"]
    assert cfg["Entrypoint"] == ["sleep", "infinity"] and "Cmd" not in cfg
    assert cfg["User"] == "65532:65532"  # the image's non-root user
    assert blob(product["config"]["digest"])["config"]["Entrypoint"] == ["research-operator"]


def test_pod_logs_read_as_kubectl_logs_prints_them() -> None:
    text = (
        "2026-12-06T17:01:23.5Z stdout F hello\n"
        "2026-12-06T17:01:23.6Z stderr P a long \n"
        "2026-12-06T17:01:23.7Z stderr F line\n"
        "2026-12-06T17:01:23.8Z stdout F \n"
    )
    assert realnode.cri_log_lines(text) == ["hello\n", "a long line\n", "\n"]


def test_the_node_keeps_a_pods_whole_log_after_the_kubelet_deleted_it(tmp_path: Path) -> None:
    source, kept = tmp_path / "pod-logs", tmp_path / "kept"
    log = source / "ns_pod_uid" / "main" / "0.log"
    log.parent.mkdir(parents=True)
    log.write_text("2026-12-06T17:01:23.5Z stdout F first\n")
    keeper = realnode.LogKeeper(source, kept)
    keeper.sweep()
    with log.open("a") as f:  # written after the link: the same file
        f.write("2026-12-06T17:01:24.5Z stdout F last\n")
    log.unlink()  # the kubelet removes a deleted pod's logs
    keeper.sweep()
    text = (kept / "ns_pod_uid" / "main" / "0.log").read_text()
    assert realnode.cri_log_lines(text) == ["first\n", "last\n"]
