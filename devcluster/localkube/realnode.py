"""A real node on the local cluster: the kubelet, containerd, the CNI ``bridge`` plugin, kube-proxy and
CoreDNS, all of them the real programs, run in a network namespace of the node's own.

    host netns                          node netns <prefix>-node (NodeNetwork)
    <prefix>h 10.243.K.1/30  <-veth->   uplink 10.243.K.2/30   the Node's InternalIP
      :6443 relay to the API server     cbr0 10.244.K.1/24     the CNI bridge, pods on 10.244.K.0/24
                                        containerd, kubelet (:10250), kube-proxy (iptables mode),
                                        CoreDNS on 10.243.K.2:53 behind the kube-dns Service 10.0.0.10

Programs are built from the Go module proxy (``hack/build-node.sh``); runc and the CNI plugins are
Debian's. Every file of the node lives under ``<cluster state>/real-nodes/<name>/``: the programs'
configs, containerd's root and state (images, snapshots, the pods' network namespaces), the
kubelet's root, the pod logs (``podLogsDir``), the IPAM state. The node's processes share one mount
namespace of their own (``unshare --mount --propagation slave``) in which ``/var/lib``, ``/var/log``
and ``/run/containerd`` are bind mounts of directories of that state dir, so what the programs write
there whatever their configuration (the kubelet's device plugin socket and ``/var/log/containers``
links, the CNI library's result cache, the runc shims' sockets) stays there too, and every mount the
node makes (container root file systems, volumes, network namespace pins) goes with that namespace.

``RealNode.run`` (``python -m localkube.realnode run``, recorded by ``localkube real-node up`` as the
process ``real-node``) starts it all and, on SIGTERM, stops it in order: the kubelet, the pods'
containers (through containerd), kube-proxy, CoreDNS, containerd, whatever is left in the node's
cgroup, the mount namespace, the network namespace. What the sandbox refuses and what is
substituted is in docs/node-agent.md. The pure parts (configs) are unit-tested.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from localkube import pki
from localkube.controlplane import REAL_NODE_PROCESS, REPO_ROOT, Cluster
from localkube.nodenet import API_RELAY_PORT, NodeAddresses, NodeNetwork, TcpRelay, call_in_netns

log = logging.getLogger(__name__)

RUNTIME_LABEL = "localkube.dev/runtime"
RUNTIME = "containerd"  # the value of RUNTIME_LABEL and of the taint's value on a real node
CLUSTER_CIDR = "10.244.0.0/16"
DNS_SERVICE_IP = "10.0.0.10"  # kube-system/kube-dns, as kubeadm numbers it (the 10th address)
CLUSTER_DOMAIN = "cluster.local"
IMAGE_BASE_NAME = "docker.io/library/research-operator"  # what `research-operator:TAG` normalises to
SANDBOX_SUFFIX = "-sandbox"
PINNED_LABEL = "io.cri-containerd.pinned=pinned"  # containerd's CRI reports such an image as pinned
CRI_NAMESPACE = "k8s.io"
CNI_BIN_DIR = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
RUNC = Path("/usr/sbin/runc")  # Debian's runc
COREDNS_USER = "localkube:coredns"
CGROUP_V1_ROOT = Path("/sys/fs/cgroup")


def build_binaries() -> Path:
    """Build (or find cached) kubelet, kube-proxy, containerd, its shim, ctr and CoreDNS."""
    out = subprocess.run(
        ["bash", str(REPO_ROOT / "hack" / "build-node.sh")], check=True, stdout=subprocess.PIPE, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


# -- where things live -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeLayout:
    """The paths of one real node, all below ``root`` (``<cluster state>/real-nodes/<name>``)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def containerd_root(self) -> Path:
        return self.root / "containerd" / "root"

    @property
    def containerd_state(self) -> Path:
        return self.root / "containerd" / "state"

    @property
    def containerd_socket(self) -> Path:
        return self.root / "containerd" / "containerd.sock"

    @property
    def shim_state(self) -> Path:
        """Bind-mounted over /run/containerd in the node's mount namespace: the shims' sockets."""
        return self.root / "containerd" / "run"

    @property
    def var_lib(self) -> Path:
        """Bind-mounted over /var/lib in the node's mount namespace: what the kubelet (its device
        plugin socket) and the CNI library (its result cache) write there regardless of their
        configured directories."""
        return self.root / "var-lib"

    @property
    def var_log(self) -> Path:
        """Bind-mounted over /var/log in the node's mount namespace (/var/log/containers links)."""
        return self.root / "var-log"

    @property
    def kubelet_root(self) -> Path:
        return self.root / "kubelet"

    @property
    def pod_logs(self) -> Path:
        return self.root / "pod-logs"

    @property
    def kept_logs(self) -> Path:
        """Hard links to every file of ``pod_logs`` (LogKeeper): the logs of deleted pods too."""
        return self.root / "pod-logs-kept"

    @property
    def cni_conf(self) -> Path:
        return self.root / "cni" / "net.d"

    @property
    def ipam(self) -> Path:
        return self.root / "cni" / "networks"

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    def kubeconfig(self, stem: str) -> Path:
        return self.config / f"{stem}.kubeconfig"


def node_key(state_dir: Path, name: str) -> str:
    return f"{state_dir.resolve()}:{name}:real"


def cgroup_root(addresses: NodeAddresses) -> str:
    """The kubelet's ``cgroupRoot``: the node's pods live below it in every hierarchy."""
    return f"/localkube-{addresses.prefix}"


# -- configs (pure) ---------------------------------------------------------------------------------


def containerd_config(layout: NodeLayout, sandbox_image: str) -> str:
    """containerd's config (version 3): its own root, state and socket; the CRI plugin with Debian's
    runc (cgroupfs), the CNI bridge config of this node, the sandbox image from the product image."""
    sock = layout.containerd_socket
    return f"""version = 3
root = '{layout.containerd_root}'
state = '{layout.containerd_state}'
# Plugins that would use the host's /var/run, /opt or /etc, and snapshotters this node does not use.
disabled_plugins = ['io.containerd.nri.v1.nri', 'io.containerd.internal.v1.opt',
  'io.containerd.snapshotter.v1.btrfs', 'io.containerd.snapshotter.v1.zfs',
  'io.containerd.snapshotter.v1.devmapper', 'io.containerd.snapshotter.v1.blockfile',
  'io.containerd.snapshotter.v1.erofs',
  'io.containerd.tracing.processor.v1.otlp', 'io.containerd.internal.v1.tracing']

[grpc]
  address = '{sock}'

[ttrpc]
  address = '{sock}.ttrpc'

[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = '{sandbox_image}'

  [plugins.'io.containerd.cri.v1.runtime']
    # The sandbox gives root no CAP_SYS_RESOURCE: a negative oom_score_adj (the pause container's
    # -998) fails runc create. Keep the scores containers ask for at or above containerd's own.
    restrict_oom_score_adj = true
    # Pin the pods' network namespaces below the state dir, not in the host's /var/run/netns.
    netns_mounts_under_state_dir = true
    enable_cdi = false
    cdi_spec_dirs = []
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = 'io.containerd.runc.v2'
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = '{RUNC}'
          SystemdCgroup = false
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ['{CNI_BIN_DIR}']
      conf_dir = '{layout.cni_conf}'
      max_conf_num = 1

  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_address = '127.0.0.1'
"""


def cni_conflist(addresses: NodeAddresses, ipam_dir: Path) -> dict[str, Any]:
    """The CNI network: the ``bridge`` plugin on the node's ``cbr0`` (the pods' gateway, hairpin for a
    pod that reaches itself through a Service), ``host-local`` IPAM on the Node's ``podCIDR``, and
    ``loopback`` (containerd runs it for each pod's ``lo``)."""
    return {
        "cniVersion": "0.4.0",
        "name": "localkube",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cbr0",
                "isGateway": True,
                "isDefaultGateway": True,
                "hairpinMode": True,
                "ipMasq": False,  # the node's own rule masquerades what leaves through the uplink
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": addresses.pod_cidr, "gateway": addresses.gateway}]],
                    "dataDir": str(ipam_dir),
                },
            }
        ],
    }


def kubelet_config(layout: NodeLayout, addresses: NodeAddresses) -> dict[str, Any]:
    """The KubeletConfiguration: containerd's socket, cgroupfs on this hybrid cgroup layout, TLS with
    a certificate of the cluster CA, the cluster's CA for clients (the API server) and webhook
    authorization, every directory below the node's state dir."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "containerRuntimeEndpoint": f"unix://{layout.containerd_socket}",
        # 1.35+ refuse cgroup v1 by default; this machine has v1 hierarchies and a v2 `unified` mount.
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",  # no systemd here
        "cgroupRoot": cgroup_root(addresses),
        "failSwapOn": False,
        "address": addresses.uplink_ip,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "tlsCertFile": str(layout.pki / "tls.crt"),
        "tlsPrivateKeyFile": str(layout.pki / "tls.key"),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(layout.pki / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "clusterDNS": [DNS_SERVICE_IP],
        "clusterDomain": CLUSTER_DOMAIN,
        "resolvConf": "",  # pods get the cluster's DNS only, none of the host's resolvers
        "podLogsDir": str(layout.pod_logs),
        "staticPodPath": "",
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        "registerWithTaints": [{"key": RUNTIME_LABEL, "value": RUNTIME, "effect": "NoSchedule"}],
        "maxPods": 110,
    }


def kube_proxy_config(layout: NodeLayout, name: str) -> dict[str, Any]:
    """kube-proxy in iptables mode in the node's namespace (its sysctls and rules stay there); it
    leaves the conntrack table's size alone (a host setting)."""
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": {"kubeconfig": str(layout.kubeconfig("kube-proxy"))},
        "hostnameOverride": name,
        "clusterCIDR": CLUSTER_CIDR,
        "bindAddress": "0.0.0.0",
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
    }


def corefile(addresses: NodeAddresses, kubeconfig: Path) -> str:
    """CoreDNS with its ``kubernetes`` plugin only: Service (and pod) names of the cluster domain.
    No ``forward``: pods have no way out of the node, so other names are refused."""
    return f""".:53 {{
    bind {addresses.uplink_ip}
    errors
    health 127.0.0.1:8080
    ready 127.0.0.1:8181
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} localkube
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    cache 5
}}
"""


def dns_objects(addresses: NodeAddresses) -> list[tuple[str, dict[str, Any]]]:
    """(API collection path, object): the kube-dns Service at 10.0.0.10 and its EndpointSlice naming
    CoreDNS on the node's address, and the EndpointSlice of the ``kubernetes`` Service naming the
    relay to the API server (the API server runs with ``--endpoint-reconciler-type=none``)."""
    managed = {"endpointslice.kubernetes.io/managed-by": "localkube.dev"}
    return [
        (
            "/api/v1/namespaces/kube-system/services",
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
                "spec": {
                    "clusterIP": DNS_SERVICE_IP,
                    "ports": [
                        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                        {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                    ],
                },
            },
        ),
        (
            "/apis/discovery.k8s.io/v1/namespaces/kube-system/endpointslices",
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"kube-dns-{addresses.prefix}",
                    "namespace": "kube-system",
                    "labels": {"kubernetes.io/service-name": "kube-dns", **managed},
                },
                "addressType": "IPv4",
                "endpoints": [{"addresses": [addresses.uplink_ip], "conditions": {"ready": True}}],
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                ],
            },
        ),
        (
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"kubernetes-{addresses.prefix}",
                    "namespace": "default",
                    "labels": {"kubernetes.io/service-name": "kubernetes", **managed},
                },
                "addressType": "IPv4",
                "endpoints": [{"addresses": [addresses.host_ip], "conditions": {"ready": True}}],
                "ports": [{"name": "https", "port": API_RELAY_PORT, "protocol": "TCP"}],
            },
        ),
    ]


COREDNS_ROLE: dict[str, Any] = {
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "ClusterRole",
    "metadata": {"name": COREDNS_USER},
    "rules": [
        {"apiGroups": [""], "resources": ["services", "pods", "namespaces"], "verbs": ["list", "watch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
    ],
}
COREDNS_BINDING: dict[str, Any] = {
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "ClusterRoleBinding",
    "metadata": {"name": COREDNS_USER},
    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": COREDNS_USER},
    "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": COREDNS_USER}],
}


# The API server's client certificate towards kubelets (localkube.pki): what `kubectl logs` and
# `kubectl exec` need from a kubelet, as kubeadm binds its apiserver-kubelet-client.
KUBELET_API_BINDING: dict[str, Any] = {
    "apiVersion": "rbac.authorization.k8s.io/v1",
    "kind": "ClusterRoleBinding",
    "metadata": {"name": "localkube:kube-apiserver-kubelet-client"},
    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:kubelet-api-admin"},
    "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "kube-apiserver-kubelet-client"}],
}


def node_kubeconfig(server: str, ca: Path, cert: Path, key: Path) -> dict[str, Any]:
    """A kubeconfig for a node program: the API server through the relay, whose address is not in
    its certificate, so the name ``kubernetes`` is verified instead."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "localkube",
                "cluster": {"server": server, "certificate-authority": str(ca), "tls-server-name": "kubernetes"},
            }
        ],
        "users": [{"name": "node", "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "localkube", "context": {"cluster": "localkube", "user": "node"}}],
        "current-context": "localkube",
    }


def cri_log_lines(text: str) -> list[str]:
    """The lines a container wrote, from a kubelet log file (CRI format: ``<time> <stream> <P|F>
    <text>``, P for a part of a longer line), as ``kubectl logs`` prints them."""
    out: list[str] = []
    partial = ""
    for line in text.splitlines():
        parts = line.split(" ", 3)
        if len(parts) < 3:
            continue
        content = parts[3] if len(parts) == 4 else ""
        if parts[2] == "P":
            partial += content
            continue
        out.append(partial + content + "\n")
        partial = ""
    if partial:
        out.append(partial)
    return out


# -- the image --------------------------------------------------------------------------------------


def sandbox_config(config: dict[str, Any]) -> dict[str, Any]:
    """The sandbox (pause) image's config from the product image's: the same layers, a process that
    only waits (``sleep infinity`` of the image's coreutils) as the image's non-root user."""
    cfg = dict(config.get("config") or {})
    cfg.pop("Cmd", None)
    cfg.pop("ExposedPorts", None)
    cfg.update(Entrypoint=["sleep", "infinity"], WorkingDir="/")
    return {**config, "config": cfg}


def _blob(layout_dir: Path, digest: str) -> Path:
    algo, _, hexdigest = digest.partition(":")
    return layout_dir / "blobs" / algo / hexdigest


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image_archive(export: Path, tag: str) -> tuple[dict[str, bytes], list[Path], str]:
    """An OCI archive of the export's layout (``<export>/oci``, what ``hack/build-image.sh`` writes)
    with one more image, ``<tag>-sandbox``: (new files by archive path, blob files of the export,
    the product manifest's digest)."""
    oci = export / "oci"
    index = json.loads((oci / "index.json").read_text())
    manifest_desc = index["manifests"][0]
    manifest = json.loads(_blob(oci, manifest_desc["digest"]).read_bytes())
    config = json.loads(_blob(oci, manifest["config"]["digest"]).read_bytes())
    sb_config = json.dumps(sandbox_config(config)).encode()
    sb_config_digest = _digest(sb_config)
    sb_manifest = json.dumps(
        {**manifest, "config": {**manifest["config"], "digest": sb_config_digest, "size": len(sb_config)}}
    ).encode()
    sb_manifest_digest = _digest(sb_manifest)
    new_index = {
        "schemaVersion": 2,
        "manifests": [
            {**manifest_desc, "annotations": {"org.opencontainers.image.ref.name": tag}},
            {
                "mediaType": manifest_desc["mediaType"],
                "digest": sb_manifest_digest,
                "size": len(sb_manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag + SANDBOX_SUFFIX},
            },
        ],
    }
    files = {
        "oci-layout": (oci / "oci-layout").read_bytes(),
        "index.json": json.dumps(new_index).encode(),
        f"blobs/sha256/{sb_config_digest.partition(':')[2]}": sb_config,
        f"blobs/sha256/{sb_manifest_digest.partition(':')[2]}": sb_manifest,
    }
    blobs = sorted((oci / "blobs" / "sha256").iterdir())
    return files, blobs, str(manifest_desc["digest"])


def write_archive(stream: io.RawIOBase | Any, export: Path, tag: str) -> None:
    files, blobs, _ = image_archive(export, tag)
    with tarfile.open(fileobj=stream, mode="w|") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for blob in blobs:
            tar.add(blob, arcname=f"blobs/sha256/{blob.name}", recursive=False)


class LogKeeper(threading.Thread):
    """Keeps every pod log file the kubelet writes, for post-mortems and tests, as a cluster's log
    collector would: the kubelet deletes a pod's logs with the pod. Each new file of ``source`` gets a
    hard link in ``target`` (same relative path), which sees everything written to it later and
    stays when the kubelet removes the original."""

    def __init__(self, source: Path, target: Path, period: float = 0.5) -> None:
        super().__init__(name="pod-log-keeper", daemon=True)
        self.source, self.target, self.period = source, target, period
        self.stopping = threading.Event()

    def sweep(self) -> None:
        for path in self.source.glob("*/*/*.log"):
            kept = self.target / path.relative_to(self.source)
            if kept.exists():
                continue
            try:
                kept.parent.mkdir(parents=True, exist_ok=True)
                os.link(path, kept)
            except FileNotFoundError:
                continue  # removed between the listing and the link

    def run(self) -> None:
        while not self.stopping.wait(self.period):
            self.sweep()

    def stop(self) -> None:
        self.stopping.set()
        self.sweep()


# -- the node ---------------------------------------------------------------------------------------


class RealNode:
    """Starts and stops one real node (see the module's docstring). ``run()`` blocks until SIGTERM."""

    def __init__(self, cluster: Cluster, name: str, image: Path, bin_dir: Path, tag: str = "0.1.0") -> None:
        self.cluster = cluster
        self.name = name
        self.image = image
        self.bin = bin_dir
        self.tag = tag
        self.layout = NodeLayout(cluster.state_dir / "real-nodes" / name)
        self.addr = NodeAddresses.for_key(node_key(cluster.state_dir, name))
        self.network = NodeNetwork(self.addr)
        self.relay: TcpRelay | None = None
        self.log_keeper: LogKeeper | None = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.holder: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()

    # -- helpers ----------------------------------------------------------------------------
    @property
    def image_ref(self) -> str:
        return f"{IMAGE_BASE_NAME}:{self.tag}"

    @property
    def sandbox_ref(self) -> str:
        return f"{IMAGE_BASE_NAME}:{self.tag}{SANDBOX_SUFFIX}"

    def _in_node(self, argv: list[str]) -> list[str]:
        """argv run in the node's mount and network namespaces, killed if this process dies."""
        assert self.holder is not None
        return [
            "setpriv", "--pdeathsig", "KILL", "nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt",
            f"--net=/run/netns/{self.addr.node_netns}", "--", *argv,
        ]  # fmt: skip

    def _start(self, name: str, argv: list[str]) -> None:
        self.layout.logs.mkdir(parents=True, exist_ok=True)
        with open(self.layout.logs / f"{name}.log", "ab") as logf:
            self.procs[name] = subprocess.Popen(
                self._in_node(argv),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # stopped one by one, in order, not by the group's SIGTERM
                env={**os.environ, "PATH": f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"},
            )
        log.info("started %s (pid %d)", name, self.procs[name].pid)

    def _stop(self, name: str, grace: float = 15.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def ctr(self, *args: str, timeout: float = 60) -> str:
        cmd = [str(self.bin / "ctr"), "--address", str(self.layout.containerd_socket), "-n", CRI_NAMESPACE, *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def _wait(self, what: str, check: Callable[[], bool], timeout: float, proc: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            p = self.procs.get(proc or "")
            if p is not None and p.poll() is not None:
                raise RuntimeError(f"{proc} exited ({p.returncode}) while waiting for {what}: {self._tail(proc or '')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}: {self._tail(proc or '')}")
            time.sleep(0.25)

    def _tail(self, name: str) -> str:
        try:
            return "\n".join((self.layout.logs / f"{name}.log").read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return "(no log)"

    def _ensure(self, path: str, obj: dict[str, Any]) -> None:
        """Create ``obj`` in the collection ``path`` unless it exists (a Service with a fixed
        ClusterIP that exists is refused for its address before its name)."""
        if self.cluster.request("GET", f"{path}/{obj['metadata']['name']}", timeout=10)[0] == 200:
            return
        status, body = self.cluster.request("POST", path, json.dumps(obj), timeout=10)
        if status not in (200, 201, 409):
            raise RuntimeError(f"POST {path}: {status} {body[:300]}")

    # -- up ---------------------------------------------------------------------------------
    def up(self) -> None:
        self.teardown()  # whatever a killed node of this name left
        lay, a = self.layout, self.addr
        dirs = [lay.config, lay.logs, lay.containerd_root, lay.containerd_state, lay.kubelet_root, lay.pod_logs]
        dirs += [lay.kept_logs, lay.cni_conf, lay.ipam, lay.pki, *(source for source, _ in self.bind_mounts())]
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        self._certificates()
        self.network.up()
        # The node's own base rules: only what leaves through the uplink is masqueraded (to the
        # uplink's address, which the host reaches); kube-proxy adds its chains beside it.
        subprocess.run(
            ["ip", "netns", "exec", a.node_netns, "iptables-restore"],
            input="*nat\n-A POSTROUTING -o uplink -j MASQUERADE\nCOMMIT\n*filter\nCOMMIT\n",
            text=True, check=True, capture_output=True,
        )  # fmt: skip
        port = int(json.loads((self.cluster.state_dir / "cluster.json").read_text())["ports"]["apiserver"])
        self.relay = TcpRelay((a.host_ip, API_RELAY_PORT), ("127.0.0.1", port))
        self.relay.start()
        server = f"https://{a.host_ip}:{API_RELAY_PORT}"
        for stem in ("kubelet", "kube-proxy", "coredns"):
            cfg = node_kubeconfig(server, lay.pki / "ca.crt", lay.pki / f"{stem}.crt", lay.pki / f"{stem}.key")
            lay.kubeconfig(stem).write_text(yaml.safe_dump(cfg))
            lay.kubeconfig(stem).chmod(0o600)
        self._cgroups(create=True)
        self._mount_namespace()

        (lay.config / "containerd.toml").write_text(containerd_config(lay, self.sandbox_ref))
        (lay.cni_conf / "10-localkube.conflist").write_text(json.dumps(cni_conflist(a, lay.ipam), indent=2))
        self._start("containerd", [str(self.bin / "containerd"), "--config", str(lay.config / "containerd.toml")])
        self._wait("containerd's socket", lay.containerd_socket.exists, 60, "containerd")
        self._wait("containerd to answer", self._containerd_answers, 60, "containerd")
        self._import_image()

        for path, obj in [
            ("/apis/rbac.authorization.k8s.io/v1/clusterroles", COREDNS_ROLE),
            ("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", COREDNS_BINDING),
            ("/apis/rbac.authorization.k8s.io/v1/clusterrolebindings", KUBELET_API_BINDING),
            *dns_objects(a),
        ]:
            self._ensure(path, obj)
        (lay.config / "kubelet.yaml").write_text(yaml.safe_dump(kubelet_config(lay, a)))
        self.log_keeper = LogKeeper(lay.pod_logs, lay.kept_logs)
        self.log_keeper.start()
        self._start(
            "kubelet",
            [
                str(self.bin / "kubelet"),
                f"--config={lay.config / 'kubelet.yaml'}",
                f"--kubeconfig={lay.kubeconfig('kubelet')}",
                f"--root-dir={lay.kubelet_root}",
                f"--cert-dir={lay.pki}",
                f"--hostname-override={self.name}",
                f"--node-ip={a.uplink_ip}",
                f"--node-labels={RUNTIME_LABEL}={RUNTIME}",
                "--v=1",
            ],
        )
        self._wait(f"Node {self.name} registered", self._node_exists, 90, "kubelet")
        # What the node IPAM controller would do (this control plane does not allocate CIDRs): the
        # Node's podCIDR is the range host-local gives its pods.
        cidr = {"spec": {"podCIDR": a.pod_cidr, "podCIDRs": [a.pod_cidr]}}
        status, body = self.cluster.request(
            "PATCH", f"/api/v1/nodes/{self.name}", json.dumps(cidr), "application/merge-patch+json", timeout=10
        )
        if status != 200:
            raise RuntimeError(f"setting the Node's podCIDR: {status} {body[:300]}")
        (lay.config / "kube-proxy.yaml").write_text(yaml.safe_dump(kube_proxy_config(lay, self.name)))
        self._start("kube-proxy", [str(self.bin / "kube-proxy"), f"--config={lay.config / 'kube-proxy.yaml'}", "--v=1"])
        (lay.config / "Corefile").write_text(corefile(a, lay.kubeconfig("coredns")))
        self._start("coredns", [str(self.bin / "coredns"), "-conf", str(lay.config / "Corefile")])
        self._wait(f"Node {self.name} Ready", lambda: self.cluster.node_ready(self.name), 120, "kubelet")
        self._wait("kube-proxy's rules", self._proxy_synced, 60, "kube-proxy")
        self._wait("CoreDNS ready", self._coredns_ready, 60, "coredns")
        log.info("real node %s up: pods %s, InternalIP %s", self.name, a.pod_cidr, a.uplink_ip)

    def _certificates(self) -> None:
        p = self.layout.pki
        shutil.copy(self.cluster.pki_dir / "ca.crt", p / "ca.crt")
        for stem, user, groups in (
            ("kubelet", f"system:node:{self.name}", ("system:nodes",)),
            ("kube-proxy", "system:kube-proxy", ()),
            ("coredns", COREDNS_USER, ()),
        ):
            pki.issue_client(self.cluster.pki_dir, pki.ClientIdentity(stem, user, groups), out_dir=p)
        pki.issue_serving(p, self.cluster.pki_dir, self.name, ips=(self.addr.uplink_ip,))

    def _cgroups(self, create: bool) -> list[Path]:
        """The node's cgroup (the kubelet's cgroupRoot) in every v1 hierarchy: created for ``up``
        (the kubelet requires it to exist), returned for the sweep of ``teardown``."""
        rel = cgroup_root(self.addr).lstrip("/")
        dirs = []
        for hierarchy in sorted(CGROUP_V1_ROOT.iterdir()) if CGROUP_V1_ROOT.is_dir() else []:
            if hierarchy.name == "unified" or not (hierarchy / "cgroup.procs").exists():
                continue
            d = hierarchy / rel
            if create:
                d.mkdir(exist_ok=True)
                if hierarchy.name == "cpuset":  # a new cpuset has no cpus nor mems: take the parent's
                    for f in ("cpuset.cpus", "cpuset.mems"):
                        (d / f).write_text((hierarchy / f).read_text())
            dirs.append(d)
        return dirs

    def bind_mounts(self) -> list[tuple[Path, str]]:
        """What the node's mount namespace sees in place of the host's: the paths its programs write
        to whatever their configuration says (the kubelet's /var/lib/kubelet/device-plugins and
        /var/log/containers, libcni's /var/lib/cni, the shims' /run/containerd/s)."""
        lay = self.layout
        return [(lay.var_lib, "/var/lib"), (lay.var_log, "/var/log"), (lay.shim_state, "/run/containerd")]

    def _mount_namespace(self) -> None:
        for _, target in self.bind_mounts():
            if self.layout.root.resolve().is_relative_to(target):
                raise RuntimeError(f"the cluster's state dir must not be below {target} (the node mounts over it)")
        self.holder = subprocess.Popen(
            ["setpriv", "--pdeathsig", "KILL", "unshare", "--mount", "--propagation", "slave", "sleep", "infinity"],
            start_new_session=True,
        )
        mnt = f"--mount=/proc/{self.holder.pid}/ns/mnt"
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{self.holder.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
            if time.monotonic() > deadline:
                raise RuntimeError("the node's mount namespace was not created")
            time.sleep(0.05)
        for source, target in self.bind_mounts():
            subprocess.run(["nsenter", mnt, "--", "mkdir", "-p", target], check=True, capture_output=True)
            subprocess.run(
                ["nsenter", mnt, "--", "mount", "--bind", str(source), target], check=True, capture_output=True
            )

    def _containerd_answers(self) -> bool:
        try:
            self.ctr("version", timeout=10)
        except (RuntimeError, subprocess.TimeoutExpired):
            return False
        return True

    def _import_image(self) -> None:
        """The product image and its sandbox image into containerd (namespace k8s.io), unpacked;
        skipped when containerd holds this export's image already."""
        _, _, digest = image_archive(self.image, self.tag)
        listed = self.ctr("images", "ls")
        if any(line.split()[:1] == [self.image_ref] and digest in line for line in listed.splitlines()) and any(
            line.split()[:1] == [self.sandbox_ref] for line in listed.splitlines()
        ):
            log.info("image %s already in containerd", self.image_ref)
            return
        start = time.monotonic()
        cmd = [str(self.bin / "ctr"), "--address", str(self.layout.containerd_socket), "-n", CRI_NAMESPACE]
        # Pinned: the kubelet's image garbage collection leaves them (no registry could give them back).
        cmd += ["images", "import", "--local", "--base-name", IMAGE_BASE_NAME, "--label", PINNED_LABEL, "-"]
        with open(self.layout.logs / "image-import.log", "ab") as logf:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=logf, stderr=subprocess.STDOUT)
            assert proc.stdin is not None
            try:
                write_archive(proc.stdin, self.image, self.tag)
            finally:
                proc.stdin.close()
            if proc.wait(600) != 0:
                raise RuntimeError(f"ctr images import failed: {self._tail('image-import')}")
        log.info("imported %s and %s in %.1fs", self.image_ref, self.sandbox_ref, time.monotonic() - start)

    def _node_exists(self) -> bool:
        status, _ = self.cluster.request("GET", f"/api/v1/nodes/{self.name}")
        return status == 200

    def _proxy_synced(self) -> bool:
        done = subprocess.run(
            ["ip", "netns", "exec", self.addr.node_netns, "iptables-save", "-t", "nat"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        return f"-d {DNS_SERVICE_IP}/32" in done.stdout

    def _coredns_ready(self) -> bool:
        def ready() -> bool:
            with urllib.request.urlopen("http://127.0.0.1:8181/ready", timeout=2) as resp:
                return int(resp.status) == 200

        try:
            return call_in_netns(Path("/run/netns", self.addr.node_netns), ready)
        except OSError:
            return False

    # -- down -------------------------------------------------------------------------------
    def teardown(self) -> None:
        """Stop everything in order and remove what the node made outside its state dir: the
        kubelet first (so nothing restarts the pods), the pods' containers through containerd, the
        node's programs, any process left in the node's cgroup, the mount and network namespaces."""
        self._stop("kubelet")
        if self.layout.containerd_socket.exists() and "containerd" in self.procs:
            self._remove_containers()
        for name in ("kube-proxy", "coredns", "containerd"):
            self._stop(name)
        self._kill_shims()
        self._sweep_cgroups()
        if self.holder is not None and self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait()
        self.holder = None
        if self.relay is not None:
            self.relay.stop()
            self.relay = None
        if self.log_keeper is not None:
            self.log_keeper.stop()
            self.log_keeper = None
        self.network.down()

    def _remove_containers(self) -> None:
        try:
            for task in self.ctr("tasks", "ls", "-q").split():
                try:
                    self.ctr("tasks", "kill", "-a", "-s", "SIGKILL", task, timeout=20)
                except RuntimeError:
                    pass
            deadline = time.monotonic() + 20
            for cid in self.ctr("containers", "ls", "-q").split():
                while time.monotonic() < deadline:
                    try:
                        self.ctr("tasks", "rm", "-f", cid, timeout=20)
                    except RuntimeError as e:
                        if "not found" not in str(e):
                            time.sleep(0.2)
                            continue
                    break
                try:
                    self.ctr("containers", "rm", cid, timeout=20)
                except RuntimeError as e:
                    log.warning("%s", e)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            log.warning("removing the pods' containers: %s", e)

    def _kill_shims(self) -> None:
        """containerd's shims leave containerd's session: find ours by the socket on their command line."""
        address = str(self.layout.containerd_socket)
        for pid in _pids():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and address.encode() in argv:
                _kill(pid)

    def _sweep_cgroups(self) -> None:
        """Kill whatever still runs in the node's cgroup (containers whose shim is gone), then remove
        the cgroups, deepest first."""
        dirs = self._cgroups(create=False)
        for d in dirs:
            for procs in d.rglob("cgroup.procs") if d.is_dir() else []:
                for pid in procs.read_text().split():
                    _kill(int(pid))
        for d in dirs:
            if not d.is_dir():
                continue
            for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                _rmdir(sub)
            _rmdir(d)

    # -- the supervisor -----------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        try:
            self.up()
            (self.layout.root / "ready").write_text(self.name)
            while not self.stopping.wait(1.0):
                for name, proc in self.procs.items():
                    if proc.poll() is not None:
                        log.error("%s exited (%s): %s", name, proc.returncode, self._tail(name))
                        return 1
            return 0
        finally:
            (self.layout.root / "ready").unlink(missing_ok=True)
            self.teardown()
            log.info("real node %s down", self.name)


def _pids() -> Iterator[int]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _rmdir(path: Path) -> None:
    for _ in range(50):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # busy until the killed processes are gone
            time.sleep(0.1)


# -- the cluster's side: start, find, stop -----------------------------------------------------------


def node_file(cluster: Cluster) -> Path:
    return cluster.state_dir / "real-node.json"


def running(cluster: Cluster) -> dict[str, str] | None:
    """The real node the cluster runs (``name``, ``image``), if its supervisor is alive."""
    pid = cluster.recorded_pids().get(REAL_NODE_PROCESS)
    if pid is None or not node_file(cluster).exists():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return dict(json.loads(node_file(cluster).read_text()))


def start(cluster: Cluster, name: str, image: Path, bin_dir: Path, timeout: float = 300) -> bool:
    """Start the real node ``name`` on the running cluster (reused when it runs with that image).
    Returns True when it was started."""
    wanted = {"name": name, "image": str(image)}
    if running(cluster) == wanted and cluster.node_ready(name):
        return False
    stop(cluster)
    ready = NodeLayout(cluster.state_dir / "real-nodes" / name).root / "ready"
    ready.unlink(missing_ok=True)  # a supervisor killed outright leaves it
    argv = [sys.executable, "-m", "localkube.realnode", "--state-dir", str(cluster.state_dir), "run",
            "--name", name, "--image", str(image), "--bin-dir", str(bin_dir)]  # fmt: skip
    cluster.spawn(REAL_NODE_PROCESS, argv)
    node_file(cluster).write_text(json.dumps(wanted))
    try:
        cluster.wait_for(f"real node {name} up", ready.exists, timeout, REAL_NODE_PROCESS)
    except BaseException:
        stop(cluster)
        raise
    return True


def stop(cluster: Cluster) -> bool:
    """Stop the real node (its pods, programs, namespaces) and delete its Node. True if it ran."""
    node = running(cluster)
    stopped = cluster.stop_process(REAL_NODE_PROCESS)
    if node is not None:
        cluster.request("DELETE", f"/api/v1/nodes/{node['name']}", timeout=10)
        # Its endpoints of kube-dns and kubernetes name addresses that are gone with it.
        addresses = NodeAddresses.for_key(node_key(cluster.state_dir, node["name"]))
        for path, obj in dns_objects(addresses):
            if obj["kind"] == "EndpointSlice":
                cluster.request("DELETE", f"{path}/{obj['metadata']['name']}", timeout=10)
    node_file(cluster).unlink(missing_ok=True)
    return stopped


def main(argv: list[str] | None = None) -> int:
    from localkube.controlplane import default_state_dir

    parser = argparse.ArgumentParser(prog="localkube.realnode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, default=default_state_dir())
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run the node in the foreground until SIGTERM")
    run.add_argument("--name", required=True)
    run.add_argument("--image", type=Path, required=True, help="the export of hack/build-image.sh")
    run.add_argument("--bin-dir", type=Path, required=True, help="the binaries of hack/build-node.sh")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return RealNode(Cluster(args.state_dir), args.name, args.image, args.bin_dir).run()


if __name__ == "__main__":
    sys.exit(main())
