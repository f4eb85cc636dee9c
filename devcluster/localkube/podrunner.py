"""Run one pod's containers as local processes and report its status (one thread per pod).

A :class:`PodWorker` owns a pod from the moment the agent sees it bound to one of its nodes
until the pod reaches a terminal phase or is deleted. It runs init containers one after
another, then the containers side by side, each as its own process group
(``start_new_session``) with stdout and stderr appended to
``<state_dir>/pods/<namespace>_<name>_<uid>/<container>.log``. It patches ``pods/status`` only
when the status changes, never touches finalizers, and on deletion sends SIGTERM, waits the
grace period, SIGKILLs, reports the terminated containers and makes the kubelet's final
``delete`` with ``gracePeriodSeconds=0``.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import urllib3
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from localkube import containers as runc
from localkube.images import ImageNotMapped, container_argv
from localkube.nodenet import NetworkError, call_in_netns
from localkube.podcontainer import (
    ContainerNode,
    PodContainerProcess,
    container_mounts,
    container_spec,
    image_argv,
    user_of,
    write_volumes,
)
from localkube.podenv import (
    HOST_IP,
    POD_IP,
    ContainerConfigError,
    ObjectLookup,
    expand_argv,
    resolve_env,
    service_env,
)
from localkube.podstatus import (
    TERMINAL_PHASES,
    Conditions,
    ContainerState,
    container_id_for,
    exit_code_of,
    final_phase,
    log_tail,
    pod_phase,
    pod_status,
    rfc3339,
    running_state,
    terminated_state,
    waiting_state,
)

log = logging.getLogger(__name__)

TICK = 0.2
CONFIG_RETRY = 3.0  # seconds between attempts to resolve a CreateContainerConfigError
TOKEN_SECONDS = 3600
MIN_TOKEN_SECONDS = 600  # the API server's minimum expirationSeconds
# Set for a container that mounts a volume the agent materialises (projected serviceAccountToken
# sources): the files are below this directory at their mountPath (no mount namespaces here).
VOLUME_ROOT_ENV = "LOCALKUBE_VOLUME_ROOT"
MAX_BACKOFF = 300.0
SETPRIV = shutil.which("setpriv")


def raw_json(resp: Any) -> dict[str, Any]:
    """The JSON body of a call made with ``_preload_content=False``."""
    data: dict[str, Any] = json.loads(resp.data)
    return data


def pod_dir_name(namespace: str, name: str, uid: str) -> str:
    return f"{namespace}_{name}_{uid}"


def pod_log_path(state_dir: Path, namespace: str, name: str, uid: str, container: str) -> Path:
    """Where a container's stdout and stderr go: ``<state>/pods/<ns>_<pod>_<uid>/<container>.log``."""
    return state_dir / "pods" / pod_dir_name(namespace, name, uid) / f"{container}.log"


@dataclass
class Runtime:
    """What pod workers share: API access, where things go, and the agent's settings."""

    core: client.CoreV1Api
    lookup: ObjectLookup
    state_dir: Path
    python_bin_dir: Path
    server: str
    ca_pem: bytes
    allocatable: dict[str, str]
    max_grace: float = 30.0
    backoff_base: float = 10.0
    on_done: Callable[[str, str | None], None] = lambda uid, phase: None
    read_service_account: Callable[[str, str], dict[str, Any] | None] = lambda namespace, name: None
    run_root: Path | None = None
    config_retry: float = CONFIG_RETRY
    containers: ContainerNode | None = None  # set: pods run as containers of the node's image (runc)

    @property
    def pod_run_root(self) -> Path:
        """Where pods' work dirs and credentials go: ``<state>/pods`` unless set elsewhere."""
        return self.run_root or self.state_dir / "pods"

    @property
    def apiserver_port(self) -> int:
        return int(self.server.rsplit(":", 1)[1].split("/", 1)[0])

    def event(self, pod: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """Record an Event on the pod, as the kubelet does (best effort)."""
        meta = pod["metadata"]
        now = rfc3339()
        body = {
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "reason": reason,
            "message": message,
            "type": type_,
            "source": {"component": "kubelet", "host": pod["spec"].get("nodeName", "")},
            "reportingComponent": "kubelet",
            "reportingInstance": pod["spec"].get("nodeName", ""),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            event = client.CoreV1Event.from_dict(body)
            assert event is not None
            self.core.create_namespaced_event(meta["namespace"], event)
        except (ApiException, ValueError) as e:
            log.debug("event %s for %s/%s not recorded: %s", reason, meta["namespace"], meta["name"], e)


# -- probes ---------------------------------------------------------------------------------


@dataclass
class Probe:
    kind: str  # readiness | liveness | startup
    spec: dict[str, Any]
    successes: int = 0
    failures: int = 0
    ok: bool = False
    next_at: float = 0.0

    @property
    def period(self) -> float:
        return float(self.spec.get("periodSeconds") or 10)

    @property
    def timeout(self) -> float:
        return float(self.spec.get("timeoutSeconds") or 1)

    def record(self, success: bool) -> bool:
        """Count a result; returns True when the probe's verdict changed."""
        before = self.ok
        if success:
            self.successes += 1
            self.failures = 0
            if self.successes >= int(self.spec.get("successThreshold") or 1):
                self.ok = True
        else:
            self.failures += 1
            self.successes = 0
            if self.failures >= int(self.spec.get("failureThreshold") or 3):
                self.ok = False
        return before != self.ok


def resolve_port(port: Any, container: Mapping[str, Any]) -> int:
    if isinstance(port, int):
        return port
    if isinstance(port, str) and port.isdigit():
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise ValueError(f"container has no port named {port!r}")


def http_probe(spec: Mapping[str, Any], container: Mapping[str, Any], timeout: float) -> tuple[bool, str]:
    get = spec["httpGet"]
    scheme = str(get.get("scheme") or "HTTP").lower()
    host = get.get("host") or HOST_IP
    port = resolve_port(get.get("port"), container)
    path = str(get.get("path") or "/")
    req = urllib.request.Request(f"{scheme}://{host}:{port}{path}", headers={"User-Agent": "kube-probe/1.37"})
    for h in get.get("httpHeaders") or []:
        req.add_header(str(h["name"]), str(h["value"]))
    ctx = None
    if scheme == "https":
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the kubelet does not verify probe certificates either
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
            code = int(resp.status)
    except urllib.error.HTTPError as e:
        code = int(e.code)
    except (OSError, ValueError) as e:
        return False, f"Get {req.full_url}: {e}"
    return 200 <= code < 400, f"HTTP probe failed with statuscode: {code}"


def tcp_probe(spec: Mapping[str, Any], container: Mapping[str, Any], timeout: float) -> tuple[bool, str]:
    sock_spec = spec["tcpSocket"]
    host = sock_spec.get("host") or HOST_IP
    port = resolve_port(sock_spec.get("port"), container)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, ""
    except OSError as e:
        return False, f"dial tcp {host}:{port}: {e}"


# -- uid switching --------------------------------------------------------------------------


def _may(st: os.stat_result, uid: int, gids: set[int], bit: int) -> bool:
    """Whether uid (with gids) has permission ``bit`` (4 read, 2 write, 1 exec) on a file."""
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & (bit << 6))
    if st.st_gid in gids:
        return bool(st.st_mode & (bit << 3))
    return bool(st.st_mode & bit)


def usable_by(path: Path, uid: int, gids: set[int], bit: int) -> bool:
    """Whether ``path`` (symlinks resolved) can be reached and used with ``bit`` by uid."""
    try:
        real = path.resolve(strict=True)
        for parent in reversed(real.parents):
            if not _may(parent.stat(), uid, gids, 1):
                return False
        return _may(real.stat(), uid, gids, bit)
    except OSError:
        return False


def executable_by(path: Path, uid: int, gids: set[int]) -> bool:
    """Like ``usable_by(..., 1)``, following a ``#!`` script's interpreter too."""
    if not usable_by(path, uid, gids, 1):
        return False
    try:
        with open(path, "rb") as f:
            head = f.readline(512)
    except OSError:
        return False
    if head.startswith(b"#!"):
        parts = head[2:].decode(errors="replace").split()
        if parts and not usable_by(path, uid, gids, 4):
            return False
        if parts and not executable_by(Path(parts[0]), uid, gids):
            return False
    return True


@dataclass
class Identity:
    """The uid/gid a container's process runs as; ``None`` keeps the agent's."""

    uid: int | None = None
    gid: int | None = None
    groups: list[int] = field(default_factory=list)
    note: str = ""


def desired_identity(pod: Mapping[str, Any], container: Mapping[str, Any]) -> tuple[int | None, int | None, list[int]]:
    """runAsUser/runAsGroup (container overrides pod), plus supplementalGroups and fsGroup."""
    psc = (pod.get("spec") or {}).get("securityContext") or {}
    csc = container.get("securityContext") or {}
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    gid = csc.get("runAsGroup", psc.get("runAsGroup"))
    groups = [int(g) for g in psc.get("supplementalGroups") or []]
    if psc.get("fsGroup") is not None:
        groups.append(int(psc["fsGroup"]))
    return (int(uid) if uid is not None else None, int(gid) if gid is not None else None, groups)


def run_as_non_root(pod: Mapping[str, Any], container: Mapping[str, Any]) -> bool:
    psc = (pod.get("spec") or {}).get("securityContext") or {}
    csc = container.get("securityContext") or {}
    return bool(csc.get("runAsNonRoot", psc.get("runAsNonRoot", False)))


# -- one container ----------------------------------------------------------------------------


@dataclass
class Container:
    spec: dict[str, Any]
    status: ContainerState
    init: bool = False
    proc: subprocess.Popen[bytes] | PodContainerProcess | None = None
    started_mono: float = 0.0
    started_at: str | None = None
    retry_at: float = 0.0
    backoff: float = 0.0
    log_offset: int = 0
    probes: list[Probe] = field(default_factory=list)
    kill_at: float | None = None  # SIGKILL deadline after a liveness-failure SIGTERM
    last_waiting_message: str = ""

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    def probe(self, kind: str) -> Probe | None:
        return next((p for p in self.probes if p.kind == kind), None)


@dataclass
class ProjectedToken:
    """One ``serviceAccountToken`` source of a projected volume: a TokenRequest for ``audience``
    bound to the pod, written to ``<run dir>/volumes/<volume>/<path>`` and refreshed at 80 %."""

    volume: str
    path: str
    audience: str
    seconds: int
    refresh_at: float = 0.0
    written: bool = False


def projected_tokens(pod: Mapping[str, Any]) -> dict[str, list[ProjectedToken]]:
    """The pod's projected volumes with serviceAccountToken sources, by volume name (other sources
    of such a volume, and other volume types, are not materialised)."""
    out: dict[str, list[ProjectedToken]] = {}
    for v in pod["spec"].get("volumes") or []:
        for src in (v.get("projected") or {}).get("sources") or []:
            sat = src.get("serviceAccountToken")
            if sat is None:
                continue
            seconds = max(MIN_TOKEN_SECONDS, int(sat.get("expirationSeconds") or TOKEN_SECONDS))
            out.setdefault(str(v["name"]), []).append(
                ProjectedToken(str(v["name"]), str(sat["path"]), str(sat.get("audience") or ""), seconds)
            )
    return out


def _inside(base: Path, relative: str) -> Path:
    """``base/relative``, refusing a path that leaves ``base`` (the API server refuses those too)."""
    target = Path(os.path.normpath(base / relative.lstrip("/")))  # lexically: mount points are symlinks
    if target != base and base not in target.parents:
        raise ContainerConfigError(f"path {relative!r} leaves {base}")
    return target


class PodWorker(threading.Thread):
    """Runs one pod; see the module docstring."""

    def __init__(self, rt: Runtime, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.rt = rt
        self.uid = str(meta["uid"])
        self.namespace = str(meta["namespace"])
        self.pod_name = str(meta["name"])
        self.node = str(pod["spec"].get("nodeName") or "")
        self._pod = pod
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._gone = False
        self._shutdown = False
        self.dir = rt.state_dir / "pods" / pod_dir_name(self.namespace, self.pod_name, self.uid)
        # work dir, kubeconfig and token: where the pod's uid can reach them (see Runtime.run_root)
        self.run_dir = rt.pod_run_root / pod_dir_name(self.namespace, self.pod_name, self.uid)
        spec = pod["spec"]
        self.restart_policy = str(spec.get("restartPolicy") or "Always")
        status = pod.get("status") or {}
        self.conditions = Conditions(status.get("conditions"))
        self.start_time = str(status.get("startTime") or rfc3339())
        self.start_mono = time.monotonic() - _age(self.start_time)
        self.init_containers = [self._make(c, True, status) for c in spec.get("initContainers") or []]
        self.containers = [self._make(c, False, status) for c in spec.get("containers") or []]
        self.initialized = not self.init_containers
        self.init_failed = False
        self._last_status: dict[str, Any] | None = None
        self._publish_retry_at = 0.0
        self._token_refresh_at = 0.0
        self._sa_env: dict[str, str] = {}
        self._projected = projected_tokens(pod)
        self._identity_warned: set[str] = set()
        self.pod_ip = POD_IP
        self.netns: Path | None = None  # container mode: the pod's network namespace
        self._restarts = 0

    def _make(self, spec: dict[str, Any], init: bool, status: Mapping[str, Any]) -> Container:
        key = "initContainerStatuses" if init else "containerStatuses"
        old = next((s for s in status.get(key) or [] if s.get("name") == spec["name"]), None)
        cs = ContainerState(name=spec["name"], image=str(spec.get("image") or ""))
        if old is not None:
            # The pod ran under an earlier agent process, whose processes are gone now.
            cs.restart_count = int(old.get("restartCount") or 0)
            state = old.get("state") or {}
            if "terminated" in state:
                cs.state = state
            elif "running" in state:
                cs.state = terminated_state(
                    137,
                    state["running"].get("startedAt"),
                    rfc3339(),
                    message="The container could not be located when the node agent restarted",
                    reason="ContainerStatusUnknown",
                )
            cs.last_state = old.get("lastState") or {}
        c = Container(spec=spec, status=cs, init=init)
        if not init:
            for kind in ("startup", "readiness", "liveness"):
                probe_spec = spec.get(f"{kind}Probe")
                if probe_spec:
                    c.probes.append(Probe(kind, probe_spec))
        return c

    # -- called from the watch thread ---------------------------------------------------------
    def update(self, pod: dict[str, Any]) -> None:
        with self._lock:
            self._pod = pod
        self._wake.set()

    def gone(self) -> None:
        """The pod object disappeared: kill the processes, report nothing."""
        self._gone = True
        self._wake.set()

    def shutdown(self) -> None:
        """The agent stops: kill the processes, report nothing."""
        self._shutdown = True
        self._wake.set()

    @property
    def pod(self) -> dict[str, Any]:
        with self._lock:
            return self._pod

    # -- main loop ----------------------------------------------------------------------------
    def run(self) -> None:
        phase: str | None = None
        try:
            phase = self._run()
        except Exception:
            log.exception("pod worker %s/%s crashed", self.namespace, self.pod_name)
            self._kill_all(0)
        finally:
            if self.rt.containers is not None:
                self.rt.containers.network.remove_pod(self.uid)
            self.rt.on_done(self.uid, phase)

    def _run(self) -> str | None:
        self._prepare_dirs()
        if self.rt.containers is not None:
            self._sandbox()
        recovered = [c for c in self.init_containers + self.containers if c.status.terminated is not None]
        for c in recovered:
            self._after_exit(c, recovered=True)
        while True:
            pod = self.pod
            if self._gone or self._shutdown:
                self._kill_all(0 if self._shutdown else 2)
                return None
            if pod["metadata"].get("deletionTimestamp"):
                return self._stop_for_deletion(pod)
            deadline = pod["spec"].get("activeDeadlineSeconds")
            if deadline is not None and time.monotonic() - self.start_mono >= float(deadline):
                return self._deadline_exceeded(pod)
            self._refresh_token_if_due(pod)
            self._refresh_projected_if_due(pod)
            if not self.initialized:
                self._step_init(pod)
            if self.init_failed:
                return self._finish(pod, "Failed")
            if self.initialized:
                self._step_containers(pod)
                phase = pod_phase(self.restart_policy, [c.status for c in self.containers])
                if phase in TERMINAL_PHASES:
                    return self._finish(pod, phase)
            self._publish(pod, self._phase_now())
            self._wake.wait(TICK)
            self._wake.clear()

    def _phase_now(self) -> str:
        if self.init_failed:
            return "Failed"
        if not self.initialized:
            return "Pending"
        return pod_phase(self.restart_policy, [c.status for c in self.containers])

    def _step_init(self, pod: dict[str, Any]) -> None:
        for c in self.init_containers:
            if c.status.exit_code == 0 and c.proc is None:
                continue
            if c.proc is None:
                if time.monotonic() >= c.retry_at:
                    self._start(pod, c)
            else:
                self._poll(c)
            if c.status.exit_code != 0:
                return  # wait for this one (running, restarting or blocked)
            if c.proc is not None:
                return
        self.initialized = True

    def _step_containers(self, pod: dict[str, Any]) -> None:
        for c in self.containers:
            if c.proc is None:
                if c.status.terminated is None and time.monotonic() >= c.retry_at:
                    self._start(pod, c)
                elif c.status.terminated is not None and c.retry_at and time.monotonic() >= c.retry_at:
                    self._start(pod, c)
            else:
                self._poll(c)
                if c.proc is not None:
                    self._probe(pod, c)

    # -- starting -------------------------------------------------------------------------------
    def _sandbox(self) -> None:
        """Container mode: the pod's network namespace and IP (the CNI plugin's work), retried
        until it works or the pod goes."""
        assert self.rt.containers is not None
        while not (self._gone or self._shutdown or self.pod["metadata"].get("deletionTimestamp")):
            try:
                had = (self.pod.get("status") or {}).get("podIP")
                self.netns, self.pod_ip = self.rt.containers.network.add_pod(self.uid, prefer=had)
                return
            except NetworkError as e:
                log.warning("%s/%s: pod network: %s", self.namespace, self.pod_name, e)
                self.rt.event(self.pod, "Warning", "FailedCreatePodSandBox", f"Failed to create pod sandbox: {e}")
                self._wake.wait(3.0)
                self._wake.clear()

    def _prepare_dirs(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o711)
        (self.run_dir / "work").mkdir(parents=True, exist_ok=True)
        self.run_dir.chmod(0o711)

    def _start(self, pod: dict[str, Any], c: Container) -> None:
        if self.rt.containers is not None:
            self._start_container(pod, c, self.rt.containers)
            return
        spec = c.spec
        try:
            sa_env = self._service_account_env(pod)
            sa_env = {**sa_env, **self._volume_env(pod, c)}
            env = resolve_env(
                pod, spec, self.rt.lookup, base_env=service_env(self.rt.apiserver_port), allocatable=self.rt.allocatable
            )
            argv = expand_argv(container_argv(spec), env)
        except ContainerConfigError as e:
            self._waiting(pod, c, "CreateContainerConfigError", str(e), self.rt.config_retry)
            return
        except ImageNotMapped as e:
            self._waiting(pod, c, "ImageNotMapped", str(e), 10.0)
            return
        except (ApiException, OSError, urllib3.exceptions.HTTPError) as e:
            # The API could not be read (not a missing object): retry like any configuration error.
            reason = f"{e.status} {e.reason}" if isinstance(e, ApiException) else str(e)
            self._waiting(
                pod, c, "CreateContainerConfigError", f"reading the pod's configuration: {reason}", self.rt.config_retry
            )
            return
        proc_env = {
            "PATH": f"{self.rt.python_bin_dir}:{os.environ.get('PATH') or '/usr/local/bin:/usr/bin:/bin'}",
            "HOSTNAME": self.pod_name,
            "HOME": str(self.run_dir / "work"),
            "LANG": "C.UTF-8",
        }
        proc_env.update(env)
        for k, v in sa_env.items():
            proc_env.setdefault(k, v)
        identity = self._identity(pod, c, argv, proc_env)
        if identity is None:
            return
        cwd = spec.get("workingDir") or str(self.run_dir / "work")
        exe = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=proc_env["PATH"])
        now = rfc3339()
        if not Path(cwd).is_dir():
            self._start_error(pod, c, now, f"chdir to cwd ({cwd!r}) set in config.json failed: no such directory")
            return
        if exe is None or not os.access(exe, os.X_OK):
            self._start_error(pod, c, now, f'exec: "{argv[0]}": executable file not found in $PATH')
            return
        logpath = self.dir / f"{c.name}.log"
        full_argv = [exe, *argv[1:]]
        if SETPRIV:
            # The process dies with its agent thread even when the agent is SIGKILLed.
            full_argv = [SETPRIV, "--pdeathsig", "KILL", "--", *full_argv]
        with open(logpath, "ab") as logf:
            c.log_offset = logf.tell()
            try:
                c.proc = subprocess.Popen(
                    full_argv,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    cwd=cwd,
                    env=proc_env,
                    start_new_session=True,
                    user=identity.uid,
                    group=identity.gid,
                    extra_groups=identity.groups if identity.uid is not None else None,
                    umask=0o022,
                )
            except OSError as e:
                self._start_error(pod, c, now, f"failed to start {argv[0]!r}: {e}")
                return
        if c.status.ever_ran and (c.status.terminated is not None or c.status.last_state):
            if c.status.terminated is not None:
                c.status.last_state = c.status.state
            c.status.restart_count += 1
        c.started_mono = time.monotonic()
        c.started_at = now
        c.retry_at = 0.0
        c.last_waiting_message = ""
        c.status.state = running_state(now)
        c.status.container_id = container_id_for(c.proc.pid)
        startup = c.probe("startup")
        c.status.started = startup is None
        c.status.ready = not c.init and c.probe("readiness") is None and c.status.started
        for p in c.probes:
            p.ok = p.kind == "liveness"
            p.successes = p.failures = 0
            p.next_at = c.started_mono + float(p.spec.get("initialDelaySeconds") or 0)
        log.info("started %s/%s container %s (pid %d)", self.namespace, self.pod_name, c.name, c.proc.pid)
        self.rt.event(pod, "Normal", "Started", f"Started container {c.name}")

    def _start_container(self, pod: dict[str, Any], c: Container, node: ContainerNode) -> None:
        """Container mode: the pod's volumes, then the container with runc in the pod's network
        namespace (see localkube.podcontainer)."""
        spec = c.spec
        image = str(spec.get("image") or "")
        if not node.serves(image):
            msg = f'Container image "{image}" is not present with pull policy of Never (the node has {node.image_name})'
            self._waiting(pod, c, "ErrImageNeverPull", msg, 10.0)
            return
        if self.netns is None:
            self._waiting(pod, c, "ContainerCreating", "the pod network is not ready", 1.0)
            return
        try:
            uid, gid = user_of(pod, spec, node.image)
            fs_group = (pod["spec"].get("securityContext") or {}).get("fsGroup")
            group = None if fs_group is None else int(fs_group)
            volumes, _ = write_volumes(pod, self.run_dir / "volumes", self.rt.lookup, uid, group, self.pod_ip)
            work = self.run_dir / "work"
            os.chown(work, uid, gid)  # token files follow the work dir's owner (_write_projected)
            for ts in self._projected.values():
                for t in ts:
                    if not t.written:
                        self._write_projected(pod, t)
            env = resolve_env(
                pod,
                spec,
                self.rt.lookup,
                base_env=service_env(443, node.api_service_ip),
                allocatable=self.rt.allocatable,
                pod_ip=self.pod_ip,
            )
            argv = expand_argv(image_argv(spec, node.image), env)
            cspec = container_spec(
                pod,
                spec,
                node.image,
                argv,
                env,
                mounts=container_mounts(spec, volumes),
                netns=self.netns,
                pod_ip=self.pod_ip,
                resolv_conf=node.network.resolv_conf(self.namespace),
            )
        except ContainerConfigError as e:
            self._waiting(pod, c, "CreateContainerConfigError", str(e), self.rt.config_retry)
            return
        except (ApiException, OSError, urllib3.exceptions.HTTPError) as e:
            reason = f"{e.status} {e.reason}" if isinstance(e, ApiException) else str(e)
            self._waiting(
                pod, c, "CreateContainerConfigError", f"reading the pod's configuration: {reason}", self.rt.config_retry
            )
            return
        self._restarts += 1
        cid = f"{self.uid.replace('-', '')[:12]}-{c.name}-{self._restarts}"[:60]
        container = runc.Container(
            node.image, cspec, name=cid, state_dir=node.runtime_dir, log_path=self.dir / f"{c.name}.log"
        )
        now = rfc3339()
        c.log_offset = (self.dir / f"{c.name}.log").stat().st_size if (self.dir / f"{c.name}.log").exists() else 0
        try:
            container.start()
        except OSError as e:
            container.delete()
            self._start_error(pod, c, now, f"failed to create the container: {e}")
            return
        c.proc = PodContainerProcess(container)
        if c.status.ever_ran and (c.status.terminated is not None or c.status.last_state):
            if c.status.terminated is not None:
                c.status.last_state = c.status.state
            c.status.restart_count += 1
        c.started_mono = time.monotonic()
        c.started_at = now
        c.retry_at = 0.0
        c.last_waiting_message = ""
        c.status.state = running_state(now)
        c.status.container_id = f"runc://{cid}"
        c.status.image_ref = f"localhost/{node.image_name}@{node.image.directory.name}"
        startup = c.probe("startup")
        c.status.started = startup is None
        c.status.ready = not c.init and c.probe("readiness") is None and c.status.started
        for p in c.probes:
            p.ok = p.kind == "liveness"
            p.successes = p.failures = 0
            p.next_at = c.started_mono + float(p.spec.get("initialDelaySeconds") or 0)
        log.info("started %s/%s container %s (runc %s, uid %s)", self.namespace, self.pod_name, c.name, cid, uid)
        self.rt.event(pod, "Normal", "Started", f"Started container {c.name}")

    def _identity(self, pod: dict[str, Any], c: Container, argv: list[str], env: dict[str, str]) -> Identity | None:
        uid, gid, groups = desired_identity(pod, c.spec)
        if os.geteuid() != 0:
            return Identity(note="agent is not root")
        if uid is None:
            if run_as_non_root(pod, c.spec):
                self._waiting(
                    pod,
                    c,
                    "CreateContainerConfigError",
                    "container has runAsNonRoot and image will run as root (set runAsUser)",
                    self.rt.config_retry,
                )
                return None
            return Identity()
        if uid == 0 and run_as_non_root(pod, c.spec):
            self._waiting(
                pod,
                c,
                "CreateContainerConfigError",
                "container's runAsUser breaks non-root policy",
                self.rt.config_retry,
            )
            return None
        if gid is None:
            try:
                gid = pwd.getpwuid(uid).pw_gid
            except KeyError:
                gid = uid
        all_gids = {gid, *groups}
        exe = argv[0] if "/" in argv[0] else shutil.which(argv[0], path=env["PATH"])
        reasons = []
        if exe is not None and not executable_by(Path(exe), uid, all_gids):
            reasons.append(f"{exe} is not executable by uid {uid}")
        if not usable_by(self.run_dir, uid, all_gids, 1):
            reasons.append(f"the pod directory {self.run_dir} is not reachable by uid {uid}")
        if reasons:
            if c.name not in self._identity_warned:
                self._identity_warned.add(c.name)
                msg = "; ".join(reasons) + f"; running as the agent's uid {os.geteuid()} instead"
                log.warning("%s/%s container %s: %s", self.namespace, self.pod_name, c.name, msg)
                self.rt.event(pod, "Warning", "RunAsUserIgnored", msg)
            return Identity(note="fallback")
        self._chown_for(uid, gid, groups)
        return Identity(uid=uid, gid=gid, groups=sorted(set(groups)))

    def _chown_for(self, uid: int, gid: int, groups: list[int]) -> None:
        fs_group = ((self.pod.get("spec") or {}).get("securityContext") or {}).get("fsGroup")
        work = self.run_dir / "work"
        os.chown(work, uid, int(fs_group) if fs_group is not None else gid)
        work.chmod(0o2775 if fs_group is not None else 0o755)
        sa = self.run_dir / "serviceaccount"
        for f in [sa, *sa.glob("*"), self.run_dir / "kubeconfig", *self._projected_files()]:
            if f.exists():
                os.chown(f, uid, gid)

    def _start_error(self, pod: dict[str, Any], c: Container, now: str, message: str) -> None:
        """The runtime could not start the process: terminated with exit code 128, StartError."""
        log.warning("%s/%s container %s: %s", self.namespace, self.pod_name, c.name, message)
        if c.status.terminated is not None:
            c.status.last_state = c.status.state
        c.status.state = terminated_state(128, now, now, message=message, reason="StartError")
        c.status.ready = False
        c.retry_at = 0.0
        self.rt.event(pod, "Warning", "Failed", f"Error: {message}")
        self._after_exit(c)

    def _waiting(self, pod: dict[str, Any], c: Container, reason: str, message: str, retry: float) -> None:
        if "waiting" in c.status.state and c.status.terminated is None:
            c.status.state = waiting_state(reason, message)
        elif c.status.terminated is not None:
            # A restart that cannot be configured: keep the last run in lastState.
            c.status.last_state = c.status.state
            c.status.state = waiting_state(reason, message)
        c.retry_at = time.monotonic() + retry
        if message != c.last_waiting_message:
            c.last_waiting_message = message
            log.warning("%s/%s container %s: %s: %s", self.namespace, self.pod_name, c.name, reason, message)
            self.rt.event(pod, "Warning", "Failed", f"Error: {message}")

    # -- service account --------------------------------------------------------------------------
    def _automount(self, pod: dict[str, Any]) -> bool:
        spec = pod["spec"]
        if spec.get("automountServiceAccountToken") is not None:
            return bool(spec["automountServiceAccountToken"])
        sa = self.rt.read_service_account(self.namespace, self._sa_name(pod))
        if sa is not None and sa.get("automountServiceAccountToken") is not None:
            return bool(sa["automountServiceAccountToken"])
        return True

    def _sa_name(self, pod: dict[str, Any]) -> str:
        return str(pod["spec"].get("serviceAccountName") or "default")

    def _service_account_env(self, pod: dict[str, Any]) -> dict[str, str]:
        if self._sa_env or not self._automount(pod):
            return self._sa_env
        self._write_token(pod)
        self._sa_env = {"KUBECONFIG": str(self.run_dir / "kubeconfig")}
        return self._sa_env

    def _refresh_token_if_due(self, pod: dict[str, Any]) -> None:
        if self._sa_env and time.monotonic() >= self._token_refresh_at:
            try:
                self._write_token(pod)
            except ContainerConfigError as e:
                log.warning("%s/%s: token refresh failed: %s", self.namespace, self.pod_name, e)
                self._token_refresh_at = time.monotonic() + 30

    def _request_token(self, pod: dict[str, Any], audiences: list[str], seconds: int, what: str = "") -> str:
        """A TokenRequest for the pod's ServiceAccount, bound to the pod. ``what``: named in the error."""
        sa = self._sa_name(pod)
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": audiences,
                "expirationSeconds": seconds,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.pod_name, "uid": self.uid},
            },
        }
        request = client.AuthenticationV1TokenRequest.from_dict(body)
        assert request is not None
        try:
            resp = self.rt.core.create_namespaced_service_account_token(
                sa, self.namespace, request, _preload_content=False
            )
            return str(raw_json(resp)["status"]["token"])
        except ApiException as e:
            raise ContainerConfigError(
                f"failed to fetch token for ServiceAccount {self.namespace}/{sa}{what}: {e.status} {e.reason}"
            ) from e

    def _write_token(self, pod: dict[str, Any]) -> None:
        sa = self._sa_name(pod)
        token = self._request_token(pod, [], TOKEN_SECONDS)
        # Refresh at 80% of the lifetime, like the kubelet's token manager.
        self._token_refresh_at = time.monotonic() + TOKEN_SECONDS * 0.8
        sa_dir = self.run_dir / "serviceaccount"
        sa_dir.mkdir(exist_ok=True)
        _atomic_write(sa_dir / "token", token.encode(), 0o600)
        _atomic_write(sa_dir / "ca.crt", self.rt.ca_pem, 0o644)
        _atomic_write(sa_dir / "namespace", self.namespace.encode(), 0o644)
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "localkube",
                    "cluster": {
                        "server": self.rt.server,
                        "certificate-authority-data": base64.b64encode(self.rt.ca_pem).decode(),
                    },
                }
            ],
            "users": [{"name": f"system:serviceaccount:{self.namespace}:{sa}", "user": {"token": token}}],
            "contexts": [
                {
                    "name": "pod",
                    "context": {
                        "cluster": "localkube",
                        "user": f"system:serviceaccount:{self.namespace}:{sa}",
                        "namespace": self.namespace,
                    },
                }
            ],
            "current-context": "pod",
        }
        _atomic_write(self.run_dir / "kubeconfig", yaml.safe_dump(kubeconfig).encode(), 0o600)
        # Keep ownership for a pod running under another uid (set at its first start).
        work_owner = (self.run_dir / "work").stat()
        if work_owner.st_uid != os.geteuid():
            for f in [sa_dir, *sa_dir.glob("*"), self.run_dir / "kubeconfig"]:
                os.chown(f, work_owner.st_uid, -1)

    # -- projected serviceAccountToken volumes --------------------------------------------------------
    def _projected_files(self) -> list[Path]:
        return [self.run_dir / "volumes" / t.volume / t.path for ts in self._projected.values() for t in ts]

    def _volume_env(self, pod: dict[str, Any], c: Container) -> dict[str, str]:
        """Materialise the projected token volumes ``c`` mounts: their tokens (first start), and a
        per-container tree ``<run dir>/mounts/<container>`` where each mountPath is a symlink to its
        volume's directory; the process gets that tree as ``LOCALKUBE_VOLUME_ROOT``."""
        mounts = [m for m in c.spec.get("volumeMounts") or [] if str(m.get("name")) in self._projected]
        if not mounts:
            return {}
        for ts in self._projected.values():
            for t in ts:
                if not t.written:
                    self._write_projected(pod, t)
        root = self.run_dir / "mounts" / c.name
        for m in mounts:
            volume_dir = self.run_dir / "volumes" / str(m["name"])
            target = _inside(volume_dir, str(m["subPath"])) if m.get("subPath") else volume_dir
            link = _inside(root, str(m["mountPath"]))
            link.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            if link.is_symlink() and os.readlink(link) == str(target):
                continue
            if link.is_symlink():
                link.unlink()
            link.symlink_to(target)
        return {VOLUME_ROOT_ENV: str(root)}

    def _write_projected(self, pod: dict[str, Any], t: ProjectedToken) -> None:
        what = f" (volume {t.volume}, audience {t.audience or 'the API server'})"
        token = self._request_token(pod, [t.audience] if t.audience else [], t.seconds, what)
        t.refresh_at = time.monotonic() + t.seconds * 0.8  # like the kubelet's token manager
        volume_dir = self.run_dir / "volumes" / t.volume
        path = _inside(volume_dir, t.path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
        (self.run_dir / "volumes").chmod(0o711)
        _atomic_write(path, token.encode(), 0o600)
        t.written = True
        work_owner = (self.run_dir / "work").stat()  # a pod running under another uid (set at its first start)
        if work_owner.st_uid != os.geteuid():
            os.chown(path, work_owner.st_uid, -1)

    def _refresh_projected_if_due(self, pod: dict[str, Any]) -> None:
        now = time.monotonic()
        for ts in self._projected.values():
            for t in ts:
                if t.written and now >= t.refresh_at:
                    try:
                        self._write_projected(pod, t)
                    except ContainerConfigError as e:
                        log.warning("%s/%s: token refresh failed: %s", self.namespace, self.pod_name, e)
                        t.refresh_at = now + 30

    # -- running ------------------------------------------------------------------------------------
    def _poll(self, c: Container) -> None:
        assert c.proc is not None
        rc = c.proc.poll()
        if c.kill_at is not None and rc is None and time.monotonic() >= c.kill_at:
            _signal(c.proc, signal.SIGKILL)
        if rc is None:
            return
        _signal(c.proc, signal.SIGKILL)  # whatever the container left behind in its group
        self._record_exit(c, rc)
        self._after_exit(c)

    def _record_exit(self, c: Container, returncode: int) -> None:
        assert c.proc is not None
        code = exit_code_of(returncode)
        message = ""
        if code != 0 or c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            message = self._log_tail(c) if code != 0 else ""
        reason: str | None = None
        if isinstance(c.proc, PodContainerProcess):
            reason, runc_message = c.proc.finish()
            if reason == "StartError":
                code, message = 128, runc_message
        c.status.state = terminated_state(
            code, c.started_at, rfc3339(), container_id=c.status.container_id, message=message, reason=reason
        )
        c.status.ready = False
        c.status.started = False
        log.info("%s/%s container %s (pid %d) exited with %d", self.namespace, self.pod_name, c.name, c.proc.pid, code)
        c.proc = None
        c.kill_at = None

    def _after_exit(self, c: Container, recovered: bool = False) -> None:
        """Decide whether and when a finished container restarts."""
        code = c.status.exit_code
        if c.init:
            if code == 0:
                return
            if self.restart_policy == "Never":
                self.init_failed = True
                return
        elif self.restart_policy == "Never" or (self.restart_policy == "OnFailure" and code == 0):
            return
        ran_for = time.monotonic() - c.started_mono if c.started_mono else 0.0
        if ran_for > 2 * MAX_BACKOFF:
            c.backoff = 0.0
        delay = c.backoff
        c.backoff = min(MAX_BACKOFF, self.rt.backoff_base if c.backoff == 0 else c.backoff * 2)
        c.retry_at = time.monotonic() + delay
        if delay > 0:
            c.status.last_state = c.status.state
            msg = f"back-off {delay:.0f}s restarting failed container={c.name} pod={self.pod_name}"
            c.status.state = waiting_state("CrashLoopBackOff", msg)
            if not recovered:
                self.rt.event(self.pod, "Warning", "BackOff", f"Back-off restarting failed container {c.name}")
        elif recovered:
            c.status.last_state = c.status.state
            c.status.state = waiting_state("ContainerCreating")

    def _log_tail(self, c: Container) -> str:
        try:
            with open(self.dir / f"{c.name}.log", "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                start = max(c.log_offset, size - 2048)
                f.seek(start)
                return log_tail(f.read())
        except OSError:
            return ""

    def _probe(self, pod: dict[str, Any], c: Container) -> None:
        now = time.monotonic()
        startup = c.probe("startup")
        for p in c.probes:
            if now < p.next_at or (p.kind != "startup" and startup is not None and not startup.ok):
                continue
            if p.kind == "startup" and p.ok:
                continue
            p.next_at = now + p.period
            ok, msg = self._run_probe(c, p)
            changed = p.record(ok)
            if not ok and changed:
                self.rt.event(pod, "Warning", "Unhealthy", f"{p.kind.capitalize()} probe failed: {msg}")
            if p.kind == "startup":
                if p.ok:
                    c.status.started = True
                elif p.failures >= int(p.spec.get("failureThreshold") or 3):
                    self._kill_for_restart(pod, c, "startup")
            elif p.kind == "liveness" and not p.ok:
                self._kill_for_restart(pod, c, "liveness")
        readiness = c.probe("readiness")
        c.status.ready = c.status.started and (readiness is None or readiness.ok) and c.proc is not None

    def _kill_for_restart(self, pod: dict[str, Any], c: Container, kind: str) -> None:
        if c.proc is None or c.kill_at is not None:
            return
        grace = min(float(pod["spec"].get("terminationGracePeriodSeconds") or 30), self.rt.max_grace)
        self.rt.event(pod, "Normal", "Killing", f"Container {c.name} failed {kind} probe, will be restarted")
        _signal(c.proc, signal.SIGTERM)
        c.kill_at = time.monotonic() + grace

    def _run_probe(self, c: Container, p: Probe) -> tuple[bool, str]:
        spec = p.spec
        if isinstance(c.proc, PodContainerProcess) and self.netns is not None:
            return self._container_probe(c.proc, c, p)
        try:
            if "exec" in spec:
                return self._exec_probe(c, spec, p.timeout)
            if "httpGet" in spec:
                return http_probe(spec, c.spec, p.timeout)
            if "tcpSocket" in spec:
                return tcp_probe(spec, c.spec, p.timeout)
        except ValueError as e:
            return False, str(e)
        # grpc probes are not supported: count them as passing rather than wedging the pod.
        return True, ""

    def _container_probe(self, proc: PodContainerProcess, c: Container, p: Probe) -> tuple[bool, str]:
        """Container mode: exec probes through ``runc exec``; HTTP and TCP probes to the pod's IP
        from a thread in the pod's network namespace (the host has no route to pods)."""
        spec = p.spec
        assert self.netns is not None
        try:
            if "exec" in spec:
                argv = [str(a) for a in spec["exec"].get("command") or []]
                if not argv:
                    return False, "exec probe has no command"
                code, out = proc.container.exec(argv, p.timeout)
                return code == 0, out[-200:]
            if "httpGet" in spec:
                get = {**spec["httpGet"], "host": spec["httpGet"].get("host") or self.pod_ip}
                return call_in_netns(self.netns, lambda: http_probe({**spec, "httpGet": get}, c.spec, p.timeout))
            if "tcpSocket" in spec:
                sock = {**spec["tcpSocket"], "host": spec["tcpSocket"].get("host") or self.pod_ip}
                return call_in_netns(self.netns, lambda: tcp_probe({**spec, "tcpSocket": sock}, c.spec, p.timeout))
        except (ValueError, OSError, subprocess.TimeoutExpired) as e:
            return False, str(e)
        return True, ""

    def _exec_probe(self, c: Container, spec: Mapping[str, Any], timeout: float) -> tuple[bool, str]:
        assert c.proc is not None
        argv = [str(a) for a in spec["exec"].get("command") or []]
        if not argv:
            return False, "exec probe has no command"
        pod = self.pod
        try:
            env = resolve_env(pod, c.spec, self.rt.lookup, base_env=service_env(self.rt.apiserver_port))
        except ContainerConfigError as e:
            return False, str(e)
        env = {"PATH": f"{self.rt.python_bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", **env}
        try:
            st = (self.run_dir / "work").stat()
            as_user = st.st_uid if os.geteuid() == 0 and st.st_uid != 0 else None
            done = subprocess.run(
                argv,
                cwd=c.spec.get("workingDir") or str(self.run_dir / "work"),
                env=env,
                capture_output=True,
                timeout=timeout,
                user=as_user,
                extra_groups=[] if as_user is not None else None,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired:
            return False, f"command timed out after {timeout:.0f}s"
        except OSError as e:
            return False, str(e)
        return done.returncode == 0, done.stdout.decode(errors="replace")[-200:]

    # -- stopping -----------------------------------------------------------------------------------
    def _kill_all(self, grace: float) -> None:
        procs = [c for c in self.init_containers + self.containers if c.proc is not None]
        for c in procs:
            assert c.proc is not None
            _signal(c.proc, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        deadline = time.monotonic() + grace
        while grace > 0 and time.monotonic() < deadline and any(c.proc and c.proc.poll() is None for c in procs):
            time.sleep(0.05)
        for c in procs:
            assert c.proc is not None
            _signal(c.proc, signal.SIGKILL)
            rc = c.proc.wait()
            self._record_exit(c, rc)

    def _stop_for_deletion(self, pod: dict[str, Any]) -> str | None:
        meta = pod["metadata"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
        grace = min(float(grace), self.rt.max_grace)
        if any(c.proc is not None for c in self.init_containers + self.containers):
            names = ", ".join(c.name for c in self.containers if c.proc is not None)
            self.rt.event(pod, "Normal", "Killing", f"Stopping container {names}")
        self._kill_all(grace)
        phase = self._phase_now()
        if phase not in TERMINAL_PHASES:
            self._unknown_for_unstarted()
            phase = final_phase([c.status for c in self.containers])
        self._publish_final(pod, phase)
        self._final_delete()
        return phase

    def _unknown_for_unstarted(self) -> None:
        """Containers that never ran are reported terminated, as the kubelet does for a stopped pod."""
        now = rfc3339()
        for c in self.init_containers + self.containers:
            if c.status.terminated is None:
                c.status.state = terminated_state(
                    137,
                    None,
                    now,
                    message="The container could not be located when the pod was terminated",
                    reason="ContainerStatusUnknown",
                )
                c.status.ready = False

    def _deadline_exceeded(self, pod: dict[str, Any]) -> str:
        grace = min(float(pod["spec"].get("terminationGracePeriodSeconds", 30)), self.rt.max_grace)
        log.info("%s/%s: active deadline exceeded", self.namespace, self.pod_name)
        self.rt.event(
            pod, "Normal", "DeadlineExceeded", "Pod was active on the node longer than the specified deadline"
        )
        self._kill_all(grace)
        self._unknown_for_unstarted()
        self._publish_final(
            pod,
            "Failed",
            reason="DeadlineExceeded",
            message="Pod was active on the node longer than the specified deadline",
        )
        return "Failed"

    def _finish(self, pod: dict[str, Any], phase: str) -> str:
        self._kill_all(0)
        if phase == "Failed":
            self._unknown_for_unstarted()
        self._publish_final(pod, phase)
        return phase

    def _final_delete(self) -> None:
        body = client.V1DeleteOptions(grace_period_seconds=0, preconditions=client.V1Preconditions(uid=self.uid))
        try:
            self.rt.core.delete_namespaced_pod(self.pod_name, self.namespace, grace_period_seconds=0, body=body)
            log.info("deleted %s/%s", self.namespace, self.pod_name)
        except ApiException as e:
            if e.status not in (404, 409):
                log.warning("final delete of %s/%s failed: %s %s", self.namespace, self.pod_name, e.status, e.reason)

    # -- status -------------------------------------------------------------------------------------
    def _publish(self, pod: dict[str, Any], phase: str, reason: str | None = None, message: str | None = None) -> bool:
        """Patch the status if it changed; returns False when the patch failed (and may be retried)."""
        if time.monotonic() < self._publish_retry_at and phase not in TERMINAL_PHASES:
            return False
        gates = [str(g["conditionType"]) for g in pod["spec"].get("readinessGates") or []]
        current = {c["type"]: c.get("status") for c in (pod.get("status") or {}).get("conditions") or []}
        status = pod_status(
            phase=phase,
            conditions=self.conditions,
            start_time=self.start_time,
            init_containers=[c.status for c in self.init_containers],
            containers=[c.status for c in self.containers],
            initialized=self.initialized,
            readiness_gates_ok=all(current.get(g) == "True" for g in gates),
            reason=reason,
            message=message,
            pod_ip=self.pod_ip,
        )
        if status == self._last_status:
            return True
        # podIPs and hostIPs merge by ip in a strategic-merge patch: replace them, or a pod whose
        # address changed (its node's agent restarted) would get two, which the API server refuses.
        lists = {k: [{"$patch": "replace"}, *status[k]] for k in ("podIPs", "hostIPs")}
        body = {"metadata": {"uid": self.uid}, "status": {**status, **lists}}
        try:
            self.rt.core.patch_namespaced_pod_status(
                self.pod_name,
                self.namespace,
                body,
                _content_type="application/strategic-merge-patch+json",
                _preload_content=False,
            )
            self._last_status = status
            return True
        except ApiException as e:
            if e.status in (404, 409):
                self._gone = True
                return True  # nothing left to report to
            log.warning(
                "status patch of %s/%s failed: %s %s %s", self.namespace, self.pod_name, e.status, e.reason, e.body
            )
        except (OSError, urllib3.exceptions.HTTPError) as e:
            log.warning("status patch of %s/%s failed: %s", self.namespace, self.pod_name, e)
        self._publish_retry_at = time.monotonic() + 1.0
        return False

    def _publish_final(
        self, pod: dict[str, Any], phase: str, reason: str | None = None, message: str | None = None
    ) -> None:
        """A terminal status must reach the API: the Job controller waits for it. Retry for a while."""
        deadline = time.monotonic() + 120
        while not self._publish(pod, phase, reason, message):
            if self._shutdown or time.monotonic() > deadline:
                log.error("giving up reporting %s/%s as %s", self.namespace, self.pod_name, phase)
                return
            time.sleep(1.0)


def _age(timestamp: str) -> float:
    try:
        then = dt.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return 0.0
    return max(0.0, (dt.datetime.now(dt.UTC) - then).total_seconds())


def _signal(proc: subprocess.Popen[bytes] | PodContainerProcess, sig: int) -> None:
    """Signal a container: its process group (a process pod) or its init through runc."""
    if isinstance(proc, PodContainerProcess):
        proc.signal(sig)
    else:
        _killpg(proc.pid, sig)


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
