"""The node agent: what the kubelet does for this project's local cluster, with pods as processes.

``NodeAgent`` registers Nodes, keeps them Ready (status conditions and ``kube-node-lease``
Lease heartbeats), watches the pods bound to them and runs each pod in a
:class:`~localkube.podrunner.PodWorker` thread. The real kube-scheduler binds pods, the real
Job controller and garbage collector react to the statuses reported here, and real RBAC
decides what a pod's ServiceAccount token may do. See docs/node-agent.md.

Run it with ``python -m localkube.nodeagent --kubeconfig K --nodes a,b --state-dir D`` or
``localkube agent ...``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from localkube.containers import load_image, remove_all
from localkube.controlplane import SERVICE_CIDR
from localkube.nodenet import (
    API_RELAY_PORT,
    DNS_PORT,
    DnsServer,
    NodeAddresses,
    NodeNetwork,
    ServiceSync,
    TcpRelay,
    first_service_ip,
)
from localkube.podcontainer import ContainerNode
from localkube.podrunner import PodWorker, Runtime, pod_log_path, raw_json, usable_by
from localkube.podstatus import TERMINAL_PHASES, rfc3339

log = logging.getLogger("localkube.nodeagent")

KUBELET_VERSION = "v1.37.2"
LEASE_NAMESPACE = "kube-node-lease"
LEASE_SECONDS = 40
HEARTBEAT_SECONDS = 10.0
NODE_STATUS_SECONDS = 60.0
WATCH_SECONDS = 300
AGENT_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
DEFAULT_CAPACITY = {"cpu": "8", "memory": "16Gi", "pods": "110"}
IMAGE_NAME = os.environ.get("IMAGE", "research-operator:0.1.0")  # what hack/build-image.sh builds

__all__ = [
    "NodeAgent",
    "main",
    "pod_log_path",
    "find_pod_logs",
    "node_manifest",
    "node_status",
    "node_conditions",
]


def find_pod_logs(state_dir: Path, namespace: str, pod: str, container: str | None = None) -> list[Path]:
    """Log files of every pod named ``namespace/pod`` (any uid), oldest pod first."""
    dirs = sorted((state_dir / "pods").glob(f"{namespace}_{pod}_*"), key=lambda d: d.stat().st_mtime)
    # A pod named "a" must not match "a_b"-style directories of another pod: the uid has no "_".
    dirs = [d for d in dirs if d.name[len(f"{namespace}_{pod}_") :].count("_") == 0]
    logs: list[Path] = []
    for d in dirs:
        logs += sorted(p for p in d.glob("*.log") if container is None or p.stem == container)
    return logs


# -- Node objects (pure) ----------------------------------------------------------------------


def _arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)


def _read(path: str, default: str = "") -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return default


def _os_image() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return "Linux"


CONTAINER_RUNTIME_LABEL = "localkube.dev/runtime"
# Pods land on a container node only when they tolerate this taint (or select its label).
CONTAINER_TAINT = {"key": CONTAINER_RUNTIME_LABEL, "value": "runc", "effect": "NoSchedule"}


def container_node_manifest(name: str, pod_cidr: str, extra_taints: Sequence[Mapping[str, str]] = ()) -> dict[str, Any]:
    """A container node: labelled and tainted ``localkube.dev/runtime=runc``, with its pods' CIDR
    (and ``extra_taints``, which keep pods that only tolerate the runtime's taint away)."""
    node = node_manifest(name)
    node["metadata"]["labels"][CONTAINER_RUNTIME_LABEL] = "runc"
    taints = [dict(CONTAINER_TAINT), *(dict(t) for t in extra_taints)]
    node["spec"] = {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr], "taints": taints}
    return node


def parse_taint(text: str) -> dict[str, str]:
    """``KEY=VALUE:EFFECT`` (or ``KEY:EFFECT``), as ``kubectl taint`` writes a taint."""
    spec, sep, effect = text.rpartition(":")
    if not sep or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute") or not spec:
        raise ValueError(f"a taint is KEY=VALUE:EFFECT with EFFECT NoSchedule, PreferNoSchedule or NoExecute: {text!r}")
    key, _, value = spec.partition("=")
    return {"key": key, "value": value, "effect": effect} if value else {"key": key, "effect": effect}


def node_manifest(name: str) -> dict[str, Any]:
    """The Node object as created at registration (status is patched separately)."""
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": _arch(),
                "beta.kubernetes.io/os": "linux",
                "beta.kubernetes.io/arch": _arch(),
                "localkube.dev/node-agent": "true",
            },
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {},
    }


def node_conditions(previous: list[dict[str, Any]] | None = None, now: str | None = None) -> list[dict[str, Any]]:
    """Ready=True and no pressure; ``lastTransitionTime`` kept from ``previous`` when unchanged."""
    now = now or rfc3339()
    before = {c["type"]: c for c in previous or []}
    wanted = [
        ("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
        ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
        ("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
        ("Ready", "True", "KubeletReady", "node agent is posting ready status"),
    ]
    out = []
    for type_, status, reason, message in wanted:
        old = before.get(type_)
        transition = old["lastTransitionTime"] if old and old.get("status") == status else now
        out.append(
            {
                "type": type_,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": now,
                "lastTransitionTime": transition,
            }
        )
    return out


def node_status(
    name: str,
    capacity: Mapping[str, str],
    previous_conditions: list[dict[str, Any]] | None = None,
    runtime: str = "localproc://0.1.0",
) -> dict[str, Any]:
    """The Node status this agent reports: capacity = allocatable, loopback address, Ready."""
    return {
        "capacity": dict(capacity),
        "allocatable": dict(capacity),
        "conditions": node_conditions(previous_conditions),
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        "nodeInfo": {
            "machineID": _read("/etc/machine-id", "localkube"),
            "systemUUID": _read("/sys/class/dmi/id/product_uuid", name) or name,
            "bootID": _read("/proc/sys/kernel/random/boot_id"),
            "kernelVersion": platform.release(),
            "osImage": _os_image(),
            "containerRuntimeVersion": runtime,
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": _arch(),
        },
    }


def lease_time() -> str:
    """A ``MicroTime`` for Lease renewTime."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1e6):06d}Z"


def pod_run_root(state_dir: Path) -> Path:
    """Where pods' work dirs and credentials go: ``<state>/pods`` when any uid can reach it.

    A state dir under a private home (``/root`` is mode 0700) cannot be entered by the uid a
    pod runs as, so its work dir, kubeconfig and token then live in
    ``$TMPDIR/localkube-<hash of state dir>/pods`` instead; logs stay in the state dir.
    """
    pods = state_dir / "pods"
    pods.mkdir(parents=True, exist_ok=True)
    pods.chmod(0o711)
    if usable_by(pods, 65534, set(), 1):
        return pods
    digest = hashlib.sha1(str(state_dir.resolve()).encode()).hexdigest()[:10]
    base = Path(tempfile.gettempdir()) / f"localkube-{digest}"
    (base / "pods").mkdir(parents=True, exist_ok=True)
    base.chmod(0o711)
    (base / "pods").chmod(0o711)
    return base / "pods"


# -- reading the API as plain dicts --------------------------------------------------------------


_json = raw_json


class ApiLookup:
    """ConfigMaps, Secrets and ServiceAccounts read through the API (``None`` on 404)."""

    def __init__(self, core: client.CoreV1Api) -> None:
        self.core = core

    def _get(self, fn: Any, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return _json(fn(name, namespace, _preload_content=False))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def config_map(self, namespace: str, name: str) -> Mapping[str, str] | None:
        obj = self._get(self.core.read_namespaced_config_map, namespace, name)
        return None if obj is None else dict(obj.get("data") or {})

    def secret(self, namespace: str, name: str) -> Mapping[str, str] | None:
        obj = self._get(self.core.read_namespaced_secret, namespace, name)
        if obj is None:
            return None
        return {k: base64.b64decode(v).decode("utf-8", errors="replace") for k, v in (obj.get("data") or {}).items()}

    def service_account(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get(self.core.read_namespaced_service_account, namespace, name)


def _kubeconfig_cluster(path: str) -> tuple[str, bytes]:
    """The server URL and CA certificate (PEM) of the kubeconfig's current context."""
    cfg = yaml.safe_load(Path(path).read_text())
    ctx_name = cfg.get("current-context")
    ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
    cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
    if cluster.get("certificate-authority-data"):
        ca = base64.b64decode(cluster["certificate-authority-data"])
    else:
        ca_path = Path(cluster["certificate-authority"])
        if not ca_path.is_absolute():
            ca_path = Path(path).parent / ca_path
        ca = ca_path.read_bytes()
    return str(cluster["server"]), ca


# -- the agent ------------------------------------------------------------------------------------


class NodeAgent:
    """Registers ``node_names`` and runs the pods bound to them until stopped.

    ``python_bin_dir`` comes first on each pod's ``PATH`` (the project's virtualenv ``bin``
    by default), so ``python``, ``research-worker`` and ``kopf`` resolve.
    """

    def __init__(
        self,
        kubeconfig: str,
        node_names: list[str],
        state_dir: Path,
        capacity: Mapping[str, str] | None = None,
        python_bin_dir: Path | None = None,
        max_grace: float = 30.0,
        backoff_base: float = 10.0,
        run_root: Path | None = None,
        containers: Path | None = None,
        taints: Sequence[Mapping[str, str]] = (),
    ) -> None:
        """``containers``: an image export (``hack/build-image.sh``); the node then runs its pods as
        containers of that image with runc, on a network of its own (one node only). ``taints``: more
        taints for a container node, beside the runtime's."""
        if not node_names:
            raise ValueError("at least one node name is needed")
        if containers is not None and len(node_names) != 1:
            raise ValueError("a container node agent serves exactly one node")
        self.kubeconfig = kubeconfig
        self.node_names = list(node_names)
        self.state_dir = Path(state_dir)
        self.capacity = {**DEFAULT_CAPACITY, **(capacity or {})}
        if "ephemeral-storage" not in self.capacity:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.capacity["ephemeral-storage"] = str(shutil.disk_usage(self.state_dir).total)
        self.python_bin_dir = python_bin_dir or Path(sys.executable).parent
        self.api = cast(client.ApiClient, config.new_client_from_config(config_file=kubeconfig))  # type: ignore[no-untyped-call]
        self.core = client.CoreV1Api(self.api)
        self.coordination = client.CoordinationV1Api(self.api)
        server, ca = _kubeconfig_cluster(kubeconfig)
        self.lookup = ApiLookup(self.core)
        self.rt = Runtime(
            core=self.core,
            lookup=self.lookup,
            state_dir=self.state_dir,
            python_bin_dir=self.python_bin_dir,
            server=server,
            ca_pem=ca,
            allocatable=dict(self.capacity),
            max_grace=max_grace,
            backoff_base=backoff_base,
            on_done=self._worker_done,
            read_service_account=self.lookup.service_account,
            run_root=run_root or pod_run_root(self.state_dir),
        )
        self.container_node: ContainerNode | None = None
        self.extra_taints = [dict(t) for t in taints]
        if self.extra_taints and containers is None:
            raise ValueError("extra taints are for a container node")
        self._node_services: list[Any] = []  # relay, DNS, Service sync of a container node
        if containers is not None:
            image = load_image(containers)
            addresses = NodeAddresses.for_key(f"{self.state_dir.resolve()}:{node_names[0]}")
            self.container_node = ContainerNode(
                image=image,
                image_name=IMAGE_NAME,
                network=NodeNetwork(addresses),
                runtime_dir=self.state_dir / "runc",
                api_service_ip=first_service_ip(SERVICE_CIDR),
            )
            self.rt.containers = self.container_node
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: dict[str, PodWorker] = {}
        self._finished: dict[str, tuple[str, str]] = {}  # uid -> (node, phase) of pods no longer run
        self._deleting: set[str] = set()
        self._streams: list[Any] = []  # open watch responses
        self._node_uids: dict[str, str] = {}
        self._conditions: dict[str, list[dict[str, Any]]] = {}
        self._threads: list[threading.Thread] = []

    # -- lifecycle ------------------------------------------------------------------------------
    def run(self) -> None:
        """Register the nodes and serve pods until SIGTERM/SIGINT or :meth:`stop`."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self._stop.set())
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.shutdown()

    def start(self) -> None:
        """Register nodes and start the heartbeat and pod-watch threads (non-blocking)."""
        if self.container_node is not None:
            self._start_node_network(self.container_node)
        for name in self.node_names:
            self._register(name)
        threads = [threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)]
        threads += [
            threading.Thread(target=self._watch_loop, args=(n,), name=f"watch-{n}", daemon=True)
            for n in self.node_names
        ]
        for t in threads:
            t.start()
        self._threads = threads
        log.info("node agent serving nodes %s (state in %s)", ", ".join(self.node_names), self.state_dir)

    def stop(self) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        """Stop watching and kill every pod process this agent started."""
        self._stop.set()
        with self._lock:
            streams = list(self._streams)
        for resp in streams:
            try:
                resp.shutdown()  # unblocks the watch thread's read
            except Exception:  # noqa: BLE001 - best effort; the threads are daemons
                pass
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            worker.shutdown()
        for worker in workers:
            worker.join(timeout=15)
        for service in self._node_services:
            service.stop()
        if self.container_node is not None:
            self.container_node.network.down()
        log.info("node agent stopped (%d pod workers ended)", len(workers))

    # -- a container node's network --------------------------------------------------------------
    def _start_node_network(self, node: ContainerNode) -> None:
        """The node's namespace and bridge, the relay to the API server, DNS and the Service rules."""
        left = remove_all(node.runtime_dir)
        if left:
            log.warning("removed %d containers an earlier agent left running: %s", len(left), ", ".join(left))
        net = node.network
        net.up()
        api_port = self.rt.apiserver_port
        relay = TcpRelay((net.addr.host_ip, API_RELAY_PORT), ("127.0.0.1", api_port))
        api_relay = (node.api_service_ip, net.addr.host_ip, API_RELAY_PORT)
        sync = ServiceSync(net, self._services_and_slices, api_relay)
        dns = DnsServer(net.addr.host_ip, DNS_PORT, sync.names)
        self._node_services = [relay, sync, dns]
        for t in self._node_services:
            t.start()
        sync.synced.wait(10)
        log.info(
            "container node: pods in %s, image %s, API server at %s:443, DNS at %s",
            net.addr.pod_cidr,
            node.image.directory,
            node.api_service_ip,
            net.addr.host_ip,
        )

    def _services_and_slices(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        services = _json(self.core.list_service_for_all_namespaces(_preload_content=False)).get("items") or []
        discovery = client.DiscoveryV1Api(self.api)
        slices = _json(discovery.list_endpoint_slice_for_all_namespaces(_preload_content=False)).get("items") or []
        return services, slices

    # -- nodes ----------------------------------------------------------------------------------
    def _manifest(self, name: str) -> dict[str, Any]:
        if self.container_node is not None:
            return container_node_manifest(name, self.container_node.network.addr.pod_cidr, self.extra_taints)
        return node_manifest(name)

    def _register(self, name: str) -> None:
        manifest = client.V1Node.from_dict(self._manifest(name))
        assert manifest is not None
        try:
            node = _json(self.core.create_node(manifest, _preload_content=False))
            log.info("registered node %s", name)
        except ApiException as e:
            if e.status != 409:
                raise
            labels = self._manifest(name)["metadata"]["labels"]
            node = _json(self.core.patch_node(name, {"metadata": {"labels": labels}}, _preload_content=False))
            log.info("node %s already registered; taking it over", name)
        self._node_uids[name] = node["metadata"]["uid"]
        self._conditions[name] = (node.get("status") or {}).get("conditions") or []
        self._post_status(name)
        self._renew_lease(name)
        self._untaint(name)

    def _post_status(self, name: str) -> None:
        runtime = "runc://1.1.5" if self.container_node is not None else "localproc://0.1.0"
        status = node_status(name, self.capacity, self._conditions.get(name), runtime)
        resp = self.core.patch_node_status(
            name,
            {"status": status},
            _content_type="application/strategic-merge-patch+json",
            _preload_content=False,
        )
        self._conditions[name] = (_json(resp).get("status") or {}).get("conditions") or []

    def _renew_lease(self, name: str) -> None:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": name,
                "namespace": LEASE_NAMESPACE,
                "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": self._node_uids[name]}],
            },
            "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": lease_time()},
        }
        try:
            self.coordination.patch_namespaced_lease(
                name,
                LEASE_NAMESPACE,
                {"spec": body["spec"]},
                _content_type="application/merge-patch+json",
                _preload_content=False,
            )
        except ApiException as e:
            if e.status != 404:
                raise
            lease = client.V1Lease.from_dict(body)
            assert lease is not None
            self.coordination.create_namespaced_lease(LEASE_NAMESPACE, lease, _preload_content=False)

    def _untaint(self, name: str) -> None:
        """Drop not-ready/unreachable taints the node lifecycle controller left on a healthy node."""
        node = _json(self.core.read_node(name, _preload_content=False))
        if node["metadata"]["uid"] != self._node_uids.get(name):
            log.warning("node %s was recreated or replaced; registering again", name)
            self._register(name)
            return
        taints = (node.get("spec") or {}).get("taints") or []
        keep = [t for t in taints if t.get("key") not in AGENT_TAINTS]
        if len(keep) != len(taints):
            patch = {"metadata": {"resourceVersion": node["metadata"]["resourceVersion"]}, "spec": {"taints": keep}}
            try:
                self.core.patch_node(name, patch, _content_type="application/merge-patch+json", _preload_content=False)
                log.info("removed not-ready taints from node %s", name)
            except ApiException as e:
                if e.status != 409:
                    raise

    def _heartbeat_loop(self) -> None:
        last_status = time.monotonic()
        while not self._stop.wait(HEARTBEAT_SECONDS):
            post = time.monotonic() - last_status >= NODE_STATUS_SECONDS
            for name in self.node_names:
                try:
                    self._renew_lease(name)
                    self._untaint(name)
                    if post:
                        self._post_status(name)
                except ApiException as e:
                    if e.status == 404:
                        try:
                            self._register(name)
                        except (ApiException, OSError) as e2:
                            log.warning("re-registering node %s failed: %s", name, e2)
                    else:
                        log.warning("heartbeat for node %s failed: %s %s", name, e.status, e.reason)
                except Exception as e:  # noqa: BLE001 - the heartbeat must outlive API hiccups
                    log.warning("heartbeat for node %s failed: %s", name, e)
            if post:
                last_status = time.monotonic()

    # -- pods -----------------------------------------------------------------------------------
    def _watch_events(self, node: str, rv: str) -> Iterator[dict[str, Any]]:
        """Pod watch events for ``node`` from ``rv`` until the server ends the watch.

        An ``ERROR`` event (``410 Gone`` when ``rv`` is too old) is raised as ``ApiException``.
        """
        resp: Any = self.core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={node}",
            resource_version=rv,
            watch=True,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_SECONDS,
            _request_timeout=(10, WATCH_SECONDS + 30),
            _preload_content=False,
        )
        with self._lock:
            self._streams.append(resp)
        try:
            for line in iter_resp_lines(resp):  # type: ignore[no-untyped-call]
                if not line or not line.strip():
                    continue
                event: dict[str, Any] = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    raise ApiException(status=int(status.get("code") or 500), reason=str(status.get("message")))
                yield event
        finally:
            with self._lock:
                if resp in self._streams:
                    self._streams.remove(resp)
            resp.close()
            resp.release_conn()

    def _watch_loop(self, node: str) -> None:
        rv: str | None = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    listing = _json(
                        self.core.list_pod_for_all_namespaces(
                            field_selector=f"spec.nodeName={node}", _preload_content=False
                        )
                    )
                    rv = str(listing["metadata"]["resourceVersion"])
                    self._relisted(node, listing.get("items") or [])
                for event in self._watch_events(node, rv):
                    if self._stop.is_set():
                        return
                    obj = event["object"]
                    new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                    if new_rv:
                        rv = str(new_rv)
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self._on_pod(event["type"], obj)
            except ApiException as e:
                if self._stop.is_set():
                    return
                if e.status == 410:
                    log.info("pod watch for %s expired; relisting", node)
                else:
                    log.warning("pod watch for %s failed: %s %s; relisting", node, e.status, e.reason)
                    self._stop.wait(1.0)
                rv = None
            except Exception as e:  # noqa: BLE001 - reconnect on any transport error
                if self._stop.is_set():
                    return
                log.warning("pod watch for %s broke: %s; relisting", node, e)
                self._stop.wait(1.0)
                rv = None

    def _relisted(self, node: str, pods: list[dict[str, Any]]) -> None:
        present = {p["metadata"]["uid"] for p in pods}
        with self._lock:
            vanished = [w for uid, w in self._workers.items() if uid not in present and w.node == node]
            for uid in [u for u, (n, _) in self._finished.items() if n == node and u not in present]:
                del self._finished[uid]
                self._deleting.discard(uid)
        for w in vanished:
            w.gone()
        for pod in pods:
            self._on_pod("ADDED", pod)

    def _on_pod(self, etype: str, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid = str(meta["uid"])
        if etype == "DELETED":
            with self._lock:
                worker = self._workers.get(uid)
                self._finished.pop(uid, None)
                self._deleting.discard(uid)
            if worker is not None:
                worker.gone()
            return
        delete_now = False
        with self._lock:
            worker = self._workers.get(uid)
            if worker is not None:
                worker.update(pod)
                return
            phase = (pod.get("status") or {}).get("phase")
            if uid in self._finished or phase in TERMINAL_PHASES:
                self._finished.setdefault(uid, (str(pod["spec"].get("nodeName")), str(phase)))
                if meta.get("deletionTimestamp") and uid not in self._deleting:
                    self._deleting.add(uid)
                    delete_now = True
            elif not self._stop.is_set():
                worker = PodWorker(self.rt, pod)
                self._workers[uid] = worker
                worker.start()
        if delete_now:
            # A finished pod being deleted: nothing runs, so the kubelet's final delete is due now.
            self._final_delete(meta)

    def _final_delete(self, meta: dict[str, Any]) -> None:
        """The kubelet's final delete of a pod that runs nothing (grace 0, only this incarnation)."""
        uid = str(meta["uid"])
        try:
            self.core.delete_namespaced_pod(
                meta["name"],
                meta["namespace"],
                grace_period_seconds=0,
                body=client.V1DeleteOptions(grace_period_seconds=0, preconditions=client.V1Preconditions(uid=uid)),
            )
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("deleting %s/%s failed: %s %s", meta["namespace"], meta["name"], e.status, e.reason)

    def _worker_done(self, uid: str, phase: str | None) -> None:
        delete_now = None
        with self._lock:
            worker = self._workers.pop(uid, None)
            if phase is not None and worker is not None:
                self._finished[uid] = (worker.node, phase)
                meta = worker.pod["metadata"]
                if meta.get("deletionTimestamp"):
                    self._deleting.add(uid)
                    # Its deletion may have come while it was finishing by itself (its last container
                    # exited, so it never stopped for the deletion): no later event asks again, and
                    # without this final delete the pod, and a Job deleted in the foreground with it,
                    # would stay forever. A second one after the worker's own is answered 404.
                    delete_now = meta
        if delete_now is not None:
            self._final_delete(delete_now)

    # -- introspection (tests, CLI) ---------------------------------------------------------------
    def running_pods(self) -> list[str]:
        with self._lock:
            return sorted(f"{w.namespace}/{w.pod_name}" for w in self._workers.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="localkube agent", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", required=True, help="admin kubeconfig the agent uses")
    parser.add_argument("--nodes", default="localnode-1", help="comma-separated Node names to register")
    parser.add_argument("--state-dir", type=Path, required=True, help="where pod dirs and logs go")
    parser.add_argument("--cpu", default=DEFAULT_CAPACITY["cpu"])
    parser.add_argument("--memory", default=DEFAULT_CAPACITY["memory"])
    parser.add_argument("--pods", default=DEFAULT_CAPACITY["pods"])
    parser.add_argument(
        "--python-bin-dir", type=Path, default=None, help="prepended to pods' PATH (default: this Python's bin)"
    )
    parser.add_argument("--max-grace", type=float, default=30.0, help="cap on termination grace periods (s)")
    parser.add_argument("--backoff", type=float, default=10.0, help="first restart back-off (s), doubling up to 300")
    parser.add_argument(
        "--containers",
        type=Path,
        default=None,
        metavar="IMAGE_EXPORT",
        help="run pods as runc containers of this image export (hack/build-image.sh); one node, root only",
    )
    parser.add_argument(
        "--taint",
        action="append",
        default=[],
        metavar="KEY=VALUE:EFFECT",
        help="another taint of the container node, beside localkube.dev/runtime=runc:NoSchedule (repeatable)",
    )
    parser.add_argument("--log-level", default=os.environ.get("LOCALKUBE_AGENT_LOG", "INFO"))
    args = parser.parse_args(argv)
    try:
        taints = [parse_taint(t) for t in args.taint]
    except ValueError as e:
        parser.error(str(e))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(threadName)s: %(message)s")
    logging.getLogger().setLevel(args.log_level)
    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
    agent = NodeAgent(
        kubeconfig=args.kubeconfig,
        node_names=nodes,
        state_dir=args.state_dir,
        capacity={"cpu": args.cpu, "memory": args.memory, "pods": args.pods},
        python_bin_dir=args.python_bin_dir,
        max_grace=args.max_grace,
        backoff_base=args.backoff,
        containers=args.containers,
        taints=taints,
    )
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
