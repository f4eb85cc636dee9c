"""A container node's network: a network namespace of the node's own, a bridge with the pods on it,
Services by DNAT, DNS for Service names, and a way to the API server. The kubelet's CNI plugin,
kube-proxy and CoreDNS in one small module, for the node agent's container mode (``--containers``).

The host's network is left as it is (its ``ip_forward`` stays 0, no route, no iptables rule is
added to it). Everything that routes lives in the node's namespace ``<prefix>-node``::

    host netns                         node netns <prefix>-node                 pod netns <prefix>-<uid>
    <prefix>h 10.243.K.1/30  <-veth->  uplink 10.243.K.2/30
      :6443 API server relay           cbr0 10.244.K.1/24 (bridge)  <-veth->   eth0 10.244.K.N/24
      :53   DNS (Service names)        ip_forward=1, iptables nat:             default via 10.244.K.1
                                       ClusterIP -> endpoints (DNAT), MASQUERADE out of uplink

- **Pods** get an address of the Node's ``podCIDR`` (10.244.K.0/24) on the bridge; they reach each
  other directly and everything else through the node namespace.
- **Services**: for each ClusterIP port, DNAT to the ready endpoints of its EndpointSlices (random
  choice, as kube-proxy's iptables mode), MASQUERADE for DNAT'd traffic (so a pod reaching a
  Service whose endpoint is on the same bridge gets its answers back through the node), REJECT for
  a port without endpoints. ``kubernetes`` (the first address of the Service range) goes to the
  relay on the host end of the uplink, which copies bytes to the API server on the host's loopback.
- **DNS**: ``<service>.<namespace>.svc[.cluster.local]`` answers the ClusterIP (or, headless, the
  endpoints); every other name is NXDOMAIN (pods have no way out of the node anyway).

The pure parts (addresses, ``nat_rules``, ``dns_answer``) are unit-tested; the rest needs root.
"""

from __future__ import annotations

import ctypes
import hashlib
import ipaddress
import logging
import os
import selectors
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

CLUSTER_DOMAIN = "cluster.local"
API_RELAY_PORT = 6443
DNS_PORT = 53


class NetworkError(Exception):
    """A command that sets up the node's or a pod's network failed."""


def run_ip(*args: str, netns: str | None = None) -> None:
    cmd = ["ip", *(("-n", netns) if netns else ()), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NetworkError(f"{' '.join(cmd)}: {done.stderr.strip()}")


def in_netns(netns: str, *cmd: str, stdin: str | None = None) -> None:
    done = subprocess.run(["ip", "netns", "exec", netns, *cmd], input=stdin, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NetworkError(f"{' '.join(cmd)} in {netns}: {done.stderr.strip()}")


@dataclass(frozen=True)
class NodeAddresses:
    """The names and addresses of one container node, derived from a key (state dir and node name)
    so that two clusters on one machine do not share them."""

    prefix: str  # of every netns and host interface name: "lk" + 4 hex digits
    index: int  # K in 10.243.K.0/30 and 10.244.K.0/24

    @classmethod
    def for_key(cls, key: str) -> NodeAddresses:
        digest = hashlib.sha1(key.encode()).hexdigest()
        return cls(prefix=f"lk{digest[:4]}", index=1 + int(digest[4:8], 16) % 250)

    @property
    def node_netns(self) -> str:
        return f"{self.prefix}-node"

    @property
    def host_if(self) -> str:
        return f"{self.prefix}h"

    @property
    def host_ip(self) -> str:
        return f"10.243.{self.index}.1"

    @property
    def uplink_ip(self) -> str:
        return f"10.243.{self.index}.2"

    @property
    def pod_cidr(self) -> str:
        return f"10.244.{self.index}.0/24"

    @property
    def gateway(self) -> str:
        return f"10.244.{self.index}.1"

    def pod_netns(self, uid: str) -> str:
        return f"{self.prefix}-{uid.replace('-', '')[:10]}"


# -- Services -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServicePort:
    cluster_ip: str
    port: int
    protocol: str  # TCP or UDP
    endpoints: tuple[tuple[str, int], ...]  # ready (ip, port) pairs


@dataclass
class ServiceTable:
    """What the node knows of Services: their ports with endpoints (for DNAT) and names (for DNS)."""

    ports: list[ServicePort] = field(default_factory=list)
    names: dict[str, list[str]] = field(default_factory=dict)  # "svc.ns" -> addresses


def service_table(
    services: Iterable[Mapping[str, Any]],
    slices: Iterable[Mapping[str, Any]],
    pod_cidr: str,
    api_relay: tuple[str, str, int],
) -> ServiceTable:
    """From Service and EndpointSlice objects (dicts), the DNAT targets and DNS names. Endpoints
    outside ``pod_cidr`` (process pods' 127.0.0.1) cannot be reached from a container and are left
    out. ``api_relay``: (ClusterIP of default/kubernetes, relay address, relay port)."""
    net = ipaddress.ip_network(pod_cidr)
    by_service: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for sl in slices:
        meta = sl.get("metadata") or {}
        owner = (meta.get("labels") or {}).get("kubernetes.io/service-name")
        if owner:
            by_service.setdefault((str(meta.get("namespace")), str(owner)), []).append(sl)
    table = ServiceTable()
    for svc in services:
        meta, spec = svc.get("metadata") or {}, svc.get("spec") or {}
        ns, name = str(meta.get("namespace")), str(meta.get("name"))
        cluster_ip = str(spec.get("clusterIP") or "")
        headless = cluster_ip in ("", "None")
        ready_ips: set[str] = set()
        for sp in spec.get("ports") or []:
            protocol = str(sp.get("protocol") or "TCP")
            endpoints: list[tuple[str, int]] = []
            for sl in by_service.get((ns, name), []):
                target = next(
                    (p for p in sl.get("ports") or [] if (p.get("name") or "") == (sp.get("name") or "")), None
                )
                if target is None or target.get("port") is None:
                    continue
                for ep in sl.get("endpoints") or []:
                    if (ep.get("conditions") or {}).get("ready") is False:
                        continue
                    for addr in ep.get("addresses") or []:
                        if ipaddress.ip_address(addr) in net:
                            endpoints.append((str(addr), int(target["port"])))
                            ready_ips.add(str(addr))
            if ns == "default" and name == "kubernetes" and not headless:
                endpoints = [(api_relay[1], api_relay[2])]
            if not headless:
                table.ports.append(ServicePort(cluster_ip, int(sp["port"]), protocol, tuple(sorted(set(endpoints)))))
        if ns == "default" and name == "kubernetes":
            ready_ips = set()
        table.names[f"{name}.{ns}"] = [cluster_ip] if not headless else sorted(ready_ips)
    return table


def nat_rules(table: ServiceTable, uplink: str = "uplink") -> str:
    """The node namespace's ``iptables-restore`` input (nat and filter tables, replaced whole)."""
    nat = [
        "*nat",
        ":PREROUTING ACCEPT [0:0]",
        ":INPUT ACCEPT [0:0]",
        ":OUTPUT ACCEPT [0:0]",
        ":POSTROUTING ACCEPT [0:0]",
        ":LK-SERVICES - [0:0]",
        "-A PREROUTING -j LK-SERVICES",
        "-A OUTPUT -j LK-SERVICES",
    ]
    flt = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    for sp in sorted(table.ports, key=lambda p: (p.cluster_ip, p.port, p.protocol)):
        proto = sp.protocol.lower()
        match = f"-d {sp.cluster_ip}/32 -p {proto} -m {proto} --dport {sp.port}"
        if not sp.endpoints:
            flt.append(f"-A FORWARD {match} -j REJECT --reject-with icmp-port-unreachable")
            flt.append(f"-A OUTPUT {match} -j REJECT --reject-with icmp-port-unreachable")
            continue
        n = len(sp.endpoints)
        for i, (ip, port) in enumerate(sp.endpoints):
            pick = "" if i == n - 1 else f" -m statistic --mode random --probability {1 / (n - i):.5f}"
            nat.append(f"-A LK-SERVICES {match}{pick} -j DNAT --to-destination {ip}:{port}")
    nat += [
        "-A POSTROUTING -m conntrack --ctstate DNAT -j MASQUERADE",
        f"-A POSTROUTING -o {uplink} -j MASQUERADE",
        "COMMIT",
    ]
    flt.append("COMMIT")
    return "\n".join(nat + flt) + "\n"


# -- DNS ------------------------------------------------------------------------------------------


def _qname(packet: bytes, offset: int) -> tuple[str, int]:
    labels: list[str] = []
    while True:
        if offset >= len(packet):
            raise ValueError("truncated name")
        length = packet[offset]
        offset += 1
        if length == 0:
            return ".".join(labels), offset
        if length & 0xC0:
            raise ValueError("compressed names are not expected in a question")
        labels.append(packet[offset : offset + length].decode("ascii", errors="replace"))
        offset += length


def service_name_lookup(name: str, names: Mapping[str, list[str]]) -> list[str] | None:
    """The addresses of ``<svc>.<ns>.svc[.cluster.local]`` (None: no such name)."""
    name = name.lower().rstrip(".")
    for suffix in (f".svc.{CLUSTER_DOMAIN}", ".svc"):
        if name.endswith(suffix):
            key = name[: -len(suffix)]
            if key.count(".") == 1 and key in names:
                return names[key]
            return None
    return None


def dns_answer(query: bytes, names: Mapping[str, list[str]]) -> bytes | None:
    """The answer to one DNS query (A records of Service names; NXDOMAIN for unknown names, an empty
    answer for other record types of a known name). None for a packet that is not a query."""
    if len(query) < 12:
        return None
    ident, flags, qdcount = struct.unpack("!HHH", query[:6])
    if flags & 0x8000 or qdcount != 1:
        return None
    try:
        qname, end = _qname(query, 12)
    except ValueError:
        return None
    if end + 4 > len(query):
        return None
    qtype, qclass = struct.unpack("!HH", query[end : end + 4])
    question = query[12 : end + 4]
    addresses = service_name_lookup(qname, names)
    rcode = 3 if addresses is None else 0  # NXDOMAIN
    answers = b""
    count = 0
    if addresses and qtype in (1, 255) and qclass == 1:
        for addr in addresses:
            answers += struct.pack("!HHHIH", 0xC00C, 1, 1, 5, 4) + socket.inet_aton(addr)
            count += 1
    rd = flags & 0x0100
    header = struct.pack("!HHHHHH", ident, 0x8000 | 0x0400 | rd | 0x0080 | rcode, 1, count, 0, 0)
    return header + question + answers


class DnsServer(threading.Thread):
    """Answers Service names over UDP on ``address:port`` from ``names()``."""

    def __init__(self, address: str, port: int, names: Any) -> None:
        super().__init__(name="node-dns", daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((address, port))
        self.sock.settimeout(0.5)
        self.names = names
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                query, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = dns_answer(query, self.names())
            if reply is not None:
                try:
                    self.sock.sendto(reply, peer)
                except OSError:
                    pass

    def stop(self) -> None:
        self.stopping.set()
        self.sock.close()


# -- the relay to the API server -----------------------------------------------------------------


class TcpRelay(threading.Thread):
    """Accepts on ``listen`` and copies bytes both ways to ``target`` (the API server's loopback
    port): the node's pods reach the API server at the ``kubernetes`` Service without the host's
    loopback being routed. TLS goes through untouched (the serving certificate names 10.0.0.1)."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        super().__init__(name="node-api-relay", daemon=True)
        self.server = socket.create_server(listen, reuse_port=False)
        self.server.settimeout(0.5)
        self.target = target
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._pipe, args=(conn,), daemon=True, name="node-api-conn").start()

    def _pipe(self, conn: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            conn.close()
            return
        upstream.settimeout(None)
        conn.settimeout(None)
        sel = selectors.DefaultSelector()
        sel.register(conn, selectors.EVENT_READ, upstream)
        sel.register(upstream, selectors.EVENT_READ, conn)
        try:
            while not self.stopping.is_set():
                for key, _ in sel.select(timeout=1.0):
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    data = src.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            sel.close()
            conn.close()
            upstream.close()

    def stop(self) -> None:
        self.stopping.set()
        self.server.close()


# -- the node's namespace and the pods' ------------------------------------------------------------


class NodeNetwork:
    """Creates (``up``) and removes (``down``) the node's namespace, bridge and uplink, and gives pods
    their own namespace and address (``add_pod`` / ``remove_pod``)."""

    def __init__(self, addresses: NodeAddresses) -> None:
        self.addr = addresses
        self._lock = threading.Lock()
        self._used: dict[str, int] = {}  # pod uid -> last octet
        self._last = 1  # the octet given last: the next pod gets the next free one (host-local IPAM's order)
        self._rules = ""

    def up(self) -> None:
        self.down()  # whatever an earlier agent of this node left behind
        a = self.addr
        ns = a.node_netns
        run_ip("netns", "add", ns)
        try:
            run_ip("link", "add", a.host_if, "type", "veth", "peer", "name", "uplink", "netns", ns)
            run_ip("addr", "add", f"{a.host_ip}/30", "dev", a.host_if)
            run_ip("link", "set", a.host_if, "up")
            run_ip("link", "set", "lo", "up", netns=ns)
            run_ip("addr", "add", f"{a.uplink_ip}/30", "dev", "uplink", netns=ns)
            run_ip("link", "set", "uplink", "up", netns=ns)
            run_ip("link", "add", "cbr0", "type", "bridge", netns=ns)
            run_ip("addr", "add", f"{a.gateway}/24", "dev", "cbr0", netns=ns)
            run_ip("link", "set", "cbr0", "up", netns=ns)
            run_ip("route", "add", "default", "via", a.host_ip, netns=ns)
            in_netns(ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")  # the node's namespace only
            self.apply_rules(ServiceTable())
        except (NetworkError, subprocess.TimeoutExpired):
            self.down()
            raise
        log.info("node network %s up: bridge %s, pods %s", ns, a.gateway, a.pod_cidr)

    def down(self) -> None:
        prefix = f"{self.addr.prefix}-"
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
        for line in listed.splitlines():
            name = line.split()[0] if line.split() else ""
            if name.startswith(prefix) and name != self.addr.node_netns:
                subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.addr.host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", self.addr.node_netns], capture_output=True, check=False)
        with self._lock:
            self._used.clear()
        self._rules = ""

    def apply_rules(self, table: ServiceTable) -> bool:
        """Replace the node's Service rules if they changed; True when they did."""
        rules = nat_rules(table)
        if rules == self._rules:
            return False
        in_netns(self.addr.node_netns, "iptables-restore", stdin=rules)
        self._rules = rules
        return True

    def add_pod(self, uid: str, prefer: str | None = None) -> tuple[Path, str]:
        """A namespace for the pod, its veth on the bridge and an address: (netns path, pod IP).
        ``prefer``: the address the pod had (its ``status.podIP``), kept when it is this node's and
        free, as when an agent restarted takes over the pods bound to its node."""
        with self._lock:
            if uid in self._used:
                octet = self._used[uid]
            else:
                free = sorted(set(range(2, 255)) - set(self._used.values()))
                if not free:
                    raise NetworkError(f"no address left in {self.addr.pod_cidr}")
                base = f"10.244.{self.addr.index}."
                kept = prefer[len(base) :] if prefer and prefer.startswith(base) else ""
                if kept.isdigit() and int(kept) in free:
                    octet = self._used[uid] = int(kept)
                    self._last = max(self._last, octet)
                else:
                    # Round robin, as the CNI host-local IPAM: an address just freed is given again last.
                    octet = self._used[uid] = self._last = next((o for o in free if o > self._last), free[0])
        ip = f"10.244.{self.addr.index}.{octet}"
        netns, node_if = self.addr.pod_netns(uid), f"v{uid.replace('-', '')[:10]}"
        if Path("/run/netns", netns).exists():
            return Path("/run/netns", netns), ip
        run_ip("netns", "add", netns)
        try:
            run_ip(
                "link",
                "add",
                node_if,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                netns,
                netns=self.addr.node_netns,
            )
            run_ip("link", "set", node_if, "master", "cbr0", netns=self.addr.node_netns)
            run_ip("link", "set", node_if, "up", netns=self.addr.node_netns)
            run_ip("link", "set", "lo", "up", netns=netns)
            run_ip("addr", "add", f"{ip}/24", "dev", "eth0", netns=netns)
            run_ip("link", "set", "eth0", "up", netns=netns)
            run_ip("route", "add", "default", "via", self.addr.gateway, netns=netns)
            # The node may still hold the MAC address of the pod this address belonged to before and
            # send the new pod's replies there until the entry is probed again (about 5 s, a client's
            # connect timeout). Suspected, not proven, when a worker whose address a deleted pod had
            # held timed out on its first connection to a Service in the demo.
            run_ip("neigh", "flush", "to", ip, "dev", "cbr0", netns=self.addr.node_netns)
        except NetworkError:
            self.remove_pod(uid)
            raise
        return Path("/run/netns", netns), ip

    def remove_pod(self, uid: str) -> None:
        # Deleting the namespace deletes its eth0, and with it the other end on the bridge.
        subprocess.run(["ip", "netns", "del", self.addr.pod_netns(uid)], capture_output=True, check=False)
        with self._lock:
            self._used.pop(uid, None)

    def resolv_conf(self, namespace: str) -> str:
        search = " ".join([f"{namespace}.svc.{CLUSTER_DOMAIN}", f"svc.{CLUSTER_DOMAIN}", CLUSTER_DOMAIN])
        return f"search {search}\nnameserver {self.addr.host_ip}\noptions ndots:5\n"


def first_service_ip(service_cidr: str) -> str:
    """The ``kubernetes`` Service's ClusterIP: the first address of the range."""
    return str(next(ipaddress.ip_network(service_cidr).hosts()))


class ServiceSync(threading.Thread):
    """Keeps the node's Service rules and DNS names current: every ``period`` seconds it lists
    Services and EndpointSlices (``list_objects``) and, when they changed, replaces the rules. A
    stand-in for kube-proxy's watches; the node's pods see a new endpoint within that period."""

    def __init__(
        self,
        network: NodeNetwork,
        list_objects: Callable[[], tuple[list[dict[str, Any]], list[dict[str, Any]]]],
        api_relay: tuple[str, str, int],
        period: float = 1.0,
    ) -> None:
        super().__init__(name="node-services", daemon=True)
        self.network = network
        self.list_objects = list_objects
        self.api_relay = api_relay
        self.period = period
        self.table = ServiceTable()
        self.stopping = threading.Event()
        self.synced = threading.Event()

    def names(self) -> dict[str, list[str]]:
        return self.table.names

    def sync_once(self) -> None:
        services, slices = self.list_objects()
        table = service_table(services, slices, self.network.addr.pod_cidr, self.api_relay)
        if self.network.apply_rules(table):
            log.info("node %s: Service rules updated (%d ports)", self.network.addr.node_netns, len(table.ports))
        self.table = table
        self.synced.set()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.sync_once()
            except Exception as e:  # noqa: BLE001 - the API or iptables failed: try again next period
                log.warning("Service sync failed: %s", e)
            self.stopping.wait(self.period)

    def stop(self) -> None:
        self.stopping.set()


_CLONE_NEWNET = 0x40000000


def call_in_netns(netns: Path, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread of its own that first enters the network namespace ``netns`` (setns
    is per thread), so its sockets are the pod's: the kubelet's probes reach a pod's IP this way
    with no route from the host."""
    libc = ctypes.CDLL(None, use_errno=True)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(netns, os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name="in-netns", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]
