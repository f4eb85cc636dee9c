"""Pod and container status objects in the form the kubelet reports them.

Pure data and functions (no API calls, no processes) so that the phase rules the Job
controller depends on are unit-tested:

- ``restartPolicy: Never``: the pod is ``Succeeded`` when every container exited 0, ``Failed``
  when all exited and one did not exit 0.
- ``OnFailure``: a container that exits non-zero is restarted; the pod is ``Succeeded`` once all
  containers exited 0.
- ``Always``: containers are always restarted; the pod stays ``Running``.
- A pod that is being deleted or whose ``activeDeadlineSeconds`` passed ends ``Failed`` unless
  every container had exited 0.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from localkube.podenv import HOST_IP, POD_IP

TERMINAL_PHASES = ("Succeeded", "Failed")


def rfc3339(when: dt.datetime | None = None) -> str:
    """Second-precision UTC timestamp as the API's ``Time`` fields use."""
    when = when or dt.datetime.now(dt.UTC)
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def exit_code_of(returncode: int) -> int:
    """A container exit code: a process killed by signal N exits 128+N (SIGKILL -> 137)."""
    return 128 - returncode if returncode < 0 else returncode


def waiting_state(reason: str, message: str = "") -> dict[str, Any]:
    state: dict[str, Any] = {"reason": reason}
    if message:
        state["message"] = message
    return {"waiting": state}


def running_state(started_at: str) -> dict[str, Any]:
    return {"running": {"startedAt": started_at}}


def terminated_state(
    exit_code: int,
    started_at: str | None,
    finished_at: str,
    container_id: str | None = None,
    message: str = "",
    reason: str | None = None,
) -> dict[str, Any]:
    term: dict[str, Any] = {
        "exitCode": exit_code,
        "reason": reason or ("Completed" if exit_code == 0 else "Error"),
        "finishedAt": finished_at,
    }
    # startedAt is required by the API for a terminated state; an unstarted one reuses finishedAt.
    term["startedAt"] = started_at or finished_at
    if message:
        term["message"] = message
    if container_id:
        term["containerID"] = container_id
    return {"terminated": term}


@dataclass
class ContainerState:
    """The status the agent keeps for one container (init or regular)."""

    name: str
    image: str
    state: dict[str, Any] = field(default_factory=lambda: waiting_state("ContainerCreating"))
    last_state: dict[str, Any] = field(default_factory=dict)
    restart_count: int = 0
    ready: bool = False
    started: bool = False
    container_id: str | None = None
    image_ref: str | None = None  # a container node's imageID (the export's cache key); None: a process

    @property
    def running(self) -> bool:
        return "running" in self.state

    @property
    def terminated(self) -> dict[str, Any] | None:
        term = self.state.get("terminated")
        return dict(term) if term is not None else None

    @property
    def exit_code(self) -> int | None:
        term = self.terminated
        return int(term["exitCode"]) if term is not None else None

    @property
    def ever_ran(self) -> bool:
        return self.running or self.terminated is not None or bool(self.last_state)

    def to_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "name": self.name,
            "image": self.image,
            "imageID": self.image_ref or image_id(self.image),
            "state": self.state,
            "lastState": self.last_state,
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
        }
        if self.container_id:
            status["containerID"] = self.container_id
        return status


def image_id(image: str) -> str:
    """Images are not pulled; the ID says so and names the image."""
    return f"localproc://{image}" if image else ""


def container_id_for(pid: int) -> str:
    return f"localproc://{pid}"


def pod_phase(restart_policy: str, containers: list[ContainerState], init_failed: bool = False) -> str:
    """The pod phase from the containers' states (init containers are finished when called)."""
    if init_failed:
        return "Failed"
    if not containers:
        return "Pending"
    codes = [c.exit_code for c in containers]
    if all(code is not None for code in codes):
        if all(code == 0 for code in codes):
            if restart_policy in ("Never", "OnFailure"):
                return "Succeeded"
            return "Running"  # Always: they are restarted
        if restart_policy == "Never":
            return "Failed"
        return "Running"  # restarts are pending
    if any(c.ever_ran for c in containers):
        return "Running"
    return "Pending"


def final_phase(containers: list[ContainerState]) -> str:
    """The phase of a pod stopped by deletion or deadline: Succeeded only if all exited 0."""
    if containers and all(c.exit_code == 0 for c in containers):
        return "Succeeded"
    return "Failed"


class Conditions:
    """Pod conditions whose ``lastTransitionTime`` changes only when their status does."""

    def __init__(self, existing: list[dict[str, Any]] | None = None) -> None:
        self._conds: dict[str, dict[str, Any]] = {}
        for cond in existing or []:
            self._conds[str(cond["type"])] = dict(cond)

    def set(self, type_: str, status: bool, reason: str | None = None, message: str | None = None) -> None:
        value = "True" if status else "False"
        old = self._conds.get(type_)
        cond: dict[str, Any] = {"type": type_, "status": value}
        if old is not None and old.get("status") == value and old.get("lastTransitionTime"):
            cond["lastTransitionTime"] = old["lastTransitionTime"]
        else:
            cond["lastTransitionTime"] = rfc3339()
        if old is not None and old.get("lastProbeTime") is not None:
            cond["lastProbeTime"] = old["lastProbeTime"]
        if reason:
            cond["reason"] = reason
        if message:
            cond["message"] = message
        self._conds[type_] = cond

    def get(self, type_: str) -> dict[str, Any] | None:
        return self._conds.get(type_)

    def as_list(self) -> list[dict[str, Any]]:
        order = ["PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled"]
        return sorted(
            self._conds.values(),
            key=lambda c: (order.index(c["type"]) if c["type"] in order else len(order), c["type"]),
        )


def pod_status(
    *,
    phase: str,
    conditions: Conditions,
    start_time: str,
    init_containers: list[ContainerState],
    containers: list[ContainerState],
    initialized: bool,
    readiness_gates_ok: bool = True,
    reason: str | None = None,
    message: str | None = None,
    pod_ip: str = POD_IP,
) -> dict[str, Any]:
    """A complete ``status`` object for a patch of the ``pods/status`` subresource."""
    terminal = phase in TERMINAL_PHASES
    if conditions.get("PodScheduled") is None:
        conditions.set("PodScheduled", True)
    conditions.set("PodReadyToStartContainers", not terminal)
    if init_containers and not initialized and not terminal:
        pending = [c.name for c in init_containers if c.exit_code != 0]
        conditions.set(
            "Initialized",
            False,
            "ContainersNotInitialized",
            f"containers with incomplete status: [{' '.join(pending)}]",
        )
    else:
        conditions.set("Initialized", True, "PodCompleted" if terminal and init_containers else None)
    all_ready = bool(containers) and all(c.ready for c in containers)
    if terminal:
        conditions.set("ContainersReady", False, "PodCompleted")
        conditions.set("Ready", False, "PodCompleted")
    elif all_ready:
        conditions.set("ContainersReady", True)
        if readiness_gates_ok:
            conditions.set("Ready", True)
        else:
            conditions.set("Ready", False, "ReadinessGatesNotReady", "the pod's readiness gates are not all True")
    else:
        unready = [c.name for c in containers if not c.ready]
        msg = f"containers with unready status: [{' '.join(unready)}]"
        conditions.set("ContainersReady", False, "ContainersNotReady", msg)
        conditions.set("Ready", False, "ContainersNotReady", msg)
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": conditions.as_list(),
        "hostIP": HOST_IP,
        "hostIPs": [{"ip": HOST_IP}],
        "podIP": pod_ip,
        "podIPs": [{"ip": pod_ip}],
        "startTime": start_time,
        "containerStatuses": [c.to_status() for c in containers],
    }
    if init_containers:
        status["initContainerStatuses"] = [c.to_status() for c in init_containers]
    if reason:
        status["reason"] = reason
    if message:
        status["message"] = message
    return status


def log_tail(data: bytes, max_lines: int = 80, max_bytes: int = 2048) -> str:
    """The end of a log, as the kubelet's FallbackToLogsOnError takes it (80 lines, 2 KiB)."""
    text = data[-max_bytes:].decode("utf-8", errors="replace")
    lines = text.splitlines()[-max_lines:]
    return "\n".join(lines)
