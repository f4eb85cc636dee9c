"""The node agent's pure parts, and a pod worker run against a recording fake API (no cluster)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from localkube import nodeagent
from localkube.images import ImageNotMapped, container_argv, image_repository
from localkube.podenv import ContainerConfigError, expand, expand_argv, resolve_env, service_env
from localkube.podrunner import PodWorker, Runtime, executable_by, pod_log_path, usable_by
from localkube.podstatus import (
    Conditions,
    ContainerState,
    exit_code_of,
    final_phase,
    pod_phase,
    pod_status,
    running_state,
    terminated_state,
    waiting_state,
)

# -- $(VAR) expansion -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)-$(B)", "1-two"),
        ("$$(A)", "$(A)"),  # escaped: never expanded
        ("$(MISSING)", "$(MISSING)"),  # unresolved: kept as written
        ("cost: $5 and $$", "cost: $5 and $"),
        ("open $(A", "open $(A"),
        ("end$", "end$"),
        ("$(A)$(A)", "11"),
        ("", ""),
    ],
)
def test_expand(text: str, expected: str) -> None:
    env = {"A": "1", "B": "two"}
    assert expand(text, env.get) == expected


def test_command_and_args_expand_with_the_full_environment() -> None:
    argv = expand_argv(["python", "-c", "print('$(GREETING)')", "$(NOPE)"], {"GREETING": "hi"})
    assert argv == ["python", "-c", "print('hi')", "$(NOPE)"]


# -- env resolution ----------------------------------------------------------------------------


class FakeLookup:
    def __init__(
        self,
        config_maps: dict[str, dict[str, str]] | None = None,
        secrets: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.config_maps = config_maps or {}
        self.secrets = secrets or {}

    def config_map(self, namespace: str, name: str) -> Mapping[str, str] | None:
        return self.config_maps.get(f"{namespace}/{name}")

    def secret(self, namespace: str, name: str) -> Mapping[str, str] | None:
        return self.secrets.get(f"{namespace}/{name}")


def make_pod(container: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "p1",
            "namespace": "ns",
            "uid": "uid-1",
            "labels": {"app": "web", "job-name": "j"},
            "annotations": {"note": "hello"},
        },
        "spec": {"nodeName": "node-a", "serviceAccountName": "runner", "containers": [container], **spec},
    }


def test_env_values_reference_earlier_variables_and_envfrom() -> None:
    container = {
        "name": "c",
        "envFrom": [
            {"configMapRef": {"name": "settings"}},
            {"secretRef": {"name": "creds"}, "prefix": "S_"},
        ],
        "env": [
            {"name": "FIRST", "value": "a"},
            {"name": "SECOND", "value": "$(FIRST)-$(MODE)-$(S_TOKEN)-$(LATER)"},
            {"name": "LATER", "value": "z"},
            {"name": "MODE", "value": "override"},
        ],
    }
    lookup = FakeLookup({"ns/settings": {"MODE": "fast", "bad=key": "x"}}, {"ns/creds": {"TOKEN": "s3cret"}})
    env = resolve_env(make_pod(container), container, lookup)
    # SECOND sees MODE from envFrom (the env override comes later) and not LATER (defined after).
    assert env["SECOND"] == "a-fast-s3cret-$(LATER)"
    assert env["MODE"] == "override"
    assert env["S_TOKEN"] == "s3cret"
    assert "bad=key" not in env


def test_value_from_refs_and_downward_api() -> None:
    container = {
        "name": "c",
        "resources": {"limits": {"memory": "512Mi"}, "requests": {"cpu": "250m"}},
        "env": [
            {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
            {"name": "LEVEL", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "level"}}},
            {"name": "OPT", "valueFrom": {"configMapKeyRef": {"name": "absent", "key": "x", "optional": True}}},
            {"name": "OPT_KEY", "valueFrom": {"secretKeyRef": {"name": "db", "key": "nokey", "optional": True}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "NOTE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['note']"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "CPU_LIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
            {"name": "CPU_M", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1m"}}},
            {"name": "MEM_MI", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
            {"name": "RAW", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NOT_EXPANDED", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "ref"}}},
        ],
    }
    lookup = FakeLookup({"ns/cfg": {"level": "debug", "ref": "$(POD_NAME)"}}, {"ns/db": {"password": "pw"}})
    env = resolve_env(make_pod(container), container, lookup, allocatable={"cpu": "8", "memory": "16Gi"})
    assert env["PASSWORD"] == "pw"
    assert env["LEVEL"] == "debug"
    assert "OPT" not in env and "OPT_KEY" not in env
    assert (env["POD_NAME"], env["POD_NS"], env["POD_UID"]) == ("p1", "ns", "uid-1")
    assert (env["APP"], env["NOTE"], env["NODE"], env["SA"], env["IP"]) == (
        "web",
        "hello",
        "node-a",
        "runner",
        "127.0.0.1",
    )
    assert env["CPU_LIMIT"] == "8"  # no limit: the node's allocatable
    assert env["CPU_M"] == "250"
    assert env["MEM_MI"] == "512"
    assert env["NOT_EXPANDED"] == "$(POD_NAME)"  # valueFrom results are taken literally


@pytest.mark.parametrize(
    ("var", "message"),
    [
        ({"secretKeyRef": {"name": "nope", "key": "k"}}, 'secret "nope" not found'),
        ({"secretKeyRef": {"name": "db", "key": "missing"}}, "couldn't find key missing in Secret ns/db"),
        ({"configMapKeyRef": {"name": "gone", "key": "k"}}, 'configmap "gone" not found'),
        ({"configMapKeyRef": {"name": "cfg", "key": "k2"}}, "couldn't find key k2 in ConfigMap ns/cfg"),
        ({"fieldRef": {"fieldPath": "spec.containers"}}, "unsupported fieldRef"),
    ],
)
def test_missing_non_optional_refs_are_config_errors(var: dict[str, Any], message: str) -> None:
    container = {"name": "c", "env": [{"name": "X", "valueFrom": var}]}
    lookup = FakeLookup({"ns/cfg": {"k": "v"}}, {"ns/db": {"password": "pw"}})
    with pytest.raises(ContainerConfigError, match=re.escape(message)):
        resolve_env(make_pod(container), container, lookup)


def test_env_from_missing_source() -> None:
    optional = {"name": "c", "envFrom": [{"configMapRef": {"name": "none", "optional": True}}]}
    assert resolve_env(make_pod(optional), optional, FakeLookup()) == {}
    required = {"name": "c", "envFrom": [{"secretRef": {"name": "none"}}]}
    with pytest.raises(ContainerConfigError, match='secret "none" not found'):
        resolve_env(make_pod(required), required, FakeLookup())


def test_service_env_points_at_the_apiserver_on_loopback() -> None:
    env = service_env(6443)
    assert env["KUBERNETES_SERVICE_HOST"] == "127.0.0.1"
    assert env["KUBERNETES_SERVICE_PORT"] == "6443"
    container = {
        "name": "c",
        "env": [{"name": "URL", "value": "https://$(KUBERNETES_SERVICE_HOST):$(KUBERNETES_SERVICE_PORT)"}],
    }
    assert resolve_env(make_pod(container), container, FakeLookup(), base_env=env)["URL"] == "https://127.0.0.1:6443"


# -- images ------------------------------------------------------------------------------------


def test_image_repository() -> None:
    assert image_repository("ghcr.io/acme/research-worker:0.3@sha256:ab") == "research-worker"
    assert image_repository("localhost:5000/research-operator") == "research-operator"
    assert image_repository("python:3.11-slim") == "python"


def test_container_argv_follows_entrypoint_and_cmd_rules() -> None:
    # command replaces the image; args follow
    assert container_argv({"image": "unknown/thing", "command": ["echo"], "args": ["hi"]}) == ["echo", "hi"]
    # no command: the mapped entry point, with args replacing the default CMD
    assert container_argv({"image": "ghcr.io/x/research-worker:1", "args": ["--job", "j"]}) == [
        "research-worker",
        "--job",
        "j",
    ]
    assert container_argv({"image": "registry/research-operator:dev"}) == ["research-operator"]
    assert container_argv({"image": "python:3.11"}) == ["python3"]
    assert container_argv({"image": "python:3.11", "args": ["-V"]}) == ["-V"]  # as with the real image


def test_unknown_image_without_command_is_not_mapped() -> None:
    with pytest.raises(ImageNotMapped, match="quay.io/foo/bar:1"):
        container_argv({"image": "quay.io/foo/bar:1"})


# -- status objects -----------------------------------------------------------------------------


def c_state(state: dict[str, Any], **kw: Any) -> ContainerState:
    return ContainerState(name=kw.pop("name", "main"), image="python:3.11", state=state, **kw)


def done(code: int) -> dict[str, Any]:
    return terminated_state(code, "2026-01-01T00:00:00Z", "2026-01-01T00:00:05Z")


def test_exit_codes_and_terminated_reasons() -> None:
    assert exit_code_of(0) == 0 and exit_code_of(3) == 3
    assert exit_code_of(-9) == 137 and exit_code_of(-15) == 143
    assert done(0)["terminated"]["reason"] == "Completed"
    assert done(2)["terminated"]["reason"] == "Error"


@pytest.mark.parametrize(
    ("policy", "states", "phase"),
    [
        ("Never", [done(0)], "Succeeded"),
        ("Never", [done(0), done(1)], "Failed"),
        ("Never", [done(0), running_state("t")], "Running"),
        ("Never", [waiting_state("ContainerCreating")], "Pending"),
        ("Never", [waiting_state("CreateContainerConfigError", "x")], "Pending"),
        ("OnFailure", [done(1)], "Running"),
        ("OnFailure", [done(0), done(0)], "Succeeded"),
        ("Always", [done(0)], "Running"),
    ],
)
def test_pod_phase(policy: str, states: list[dict[str, Any]], phase: str) -> None:
    containers = [c_state(s, name=f"c{i}") for i, s in enumerate(states)]
    assert pod_phase(policy, containers) == phase


def test_pod_phase_with_failed_init_and_restarting_container() -> None:
    assert pod_phase("Never", [c_state(waiting_state("PodInitializing"))], init_failed=True) == "Failed"
    restarting = c_state(waiting_state("CrashLoopBackOff", "back-off"), last_state=done(1), restart_count=1)
    assert pod_phase("OnFailure", [restarting]) == "Running"
    assert final_phase([c_state(done(0))]) == "Succeeded"
    assert final_phase([c_state(done(143))]) == "Failed"
    assert final_phase([c_state(running_state("t"))]) == "Failed"


def test_running_pod_status_has_the_fields_the_job_controller_reads() -> None:
    main = c_state(running_state("2026-01-01T00:00:00Z"), ready=True, started=True, container_id="localproc://42")
    status = pod_status(
        phase="Running",
        conditions=Conditions([{"type": "PodScheduled", "status": "True", "lastTransitionTime": "T0"}]),
        start_time="2026-01-01T00:00:00Z",
        init_containers=[],
        containers=[main],
        initialized=True,
    )
    conds = {c["type"]: c for c in status["conditions"]}
    assert {k: conds[k]["status"] for k in conds} == {
        "PodScheduled": "True",
        "PodReadyToStartContainers": "True",
        "Initialized": "True",
        "ContainersReady": "True",
        "Ready": "True",
    }
    assert conds["PodScheduled"]["lastTransitionTime"] == "T0"  # the scheduler's condition is kept
    assert status["phase"] == "Running"
    assert (status["hostIP"], status["podIP"], status["podIPs"]) == ("127.0.0.1", "127.0.0.1", [{"ip": "127.0.0.1"}])
    cs = status["containerStatuses"][0]
    assert cs["state"] == {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
    assert cs["ready"] is True and cs["restartCount"] == 0 and cs["containerID"] == "localproc://42"
    assert cs["image"] == "python:3.11" and cs["imageID"] == "localproc://python:3.11"
    assert "initContainerStatuses" not in status


def test_terminal_and_unready_statuses() -> None:
    conditions = Conditions()
    failed = pod_status(
        phase="Failed",
        conditions=conditions,
        start_time="t",
        init_containers=[],
        containers=[c_state(done(3))],
        initialized=True,
        reason="DeadlineExceeded",
        message="too long",
    )
    conds = {c["type"]: c for c in failed["conditions"]}
    assert conds["Ready"]["status"] == "False" and conds["Ready"]["reason"] == "PodCompleted"
    assert failed["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3
    assert (failed["reason"], failed["message"]) == ("DeadlineExceeded", "too long")

    init = c_state(running_state("t"), name="setup")
    pending = pod_status(
        phase="Pending",
        conditions=Conditions(),
        start_time="t",
        init_containers=[init],
        containers=[c_state(waiting_state("PodInitializing"))],
        initialized=False,
    )
    conds = {c["type"]: c for c in pending["conditions"]}
    assert conds["Initialized"]["status"] == "False"
    assert conds["Ready"]["reason"] == "ContainersNotReady"
    assert pending["initContainerStatuses"][0]["name"] == "setup"


def test_condition_transition_time_changes_only_with_status() -> None:
    conds = Conditions([{"type": "Ready", "status": "False", "lastTransitionTime": "old"}])
    conds.set("Ready", False, "ContainersNotReady")
    assert conds.get("Ready") == {
        "type": "Ready",
        "status": "False",
        "lastTransitionTime": "old",
        "reason": "ContainersNotReady",
    }
    conds.set("Ready", True)
    ready = conds.get("Ready")
    assert ready is not None and ready["lastTransitionTime"] != "old"


# -- nodes ----------------------------------------------------------------------------------------


def test_node_manifest_and_status() -> None:
    manifest = nodeagent.node_manifest("n1")
    labels = manifest["metadata"]["labels"]
    assert labels["kubernetes.io/hostname"] == "n1" and labels["kubernetes.io/os"] == "linux"
    assert labels["kubernetes.io/arch"] in ("amd64", "arm64")
    status = nodeagent.node_status("n1", {"cpu": "8", "memory": "16Gi", "pods": "110"})
    assert status["capacity"] == status["allocatable"] == {"cpu": "8", "memory": "16Gi", "pods": "110"}
    assert {"type": "InternalIP", "address": "127.0.0.1"} in status["addresses"]
    assert status["nodeInfo"]["kubeletVersion"] == "v1.37.2"
    conds = {c["type"]: c["status"] for c in status["conditions"]}
    assert conds == {"Ready": "True", "MemoryPressure": "False", "DiskPressure": "False", "PIDPressure": "False"}


def test_node_conditions_keep_transition_time_and_refresh_heartbeat() -> None:
    first = nodeagent.node_conditions(now="2026-01-01T00:00:00Z")
    later = nodeagent.node_conditions(first, now="2026-01-01T00:01:00Z")
    ready = next(c for c in later if c["type"] == "Ready")
    assert ready["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert ready["lastHeartbeatTime"] == "2026-01-01T00:01:00Z"


def test_lease_time_is_a_micro_time() -> None:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", nodeagent.lease_time())


def test_pod_log_path() -> None:
    p = pod_log_path(Path("/s"), "ns", "pod", "u1", "main")
    assert p == Path("/s/pods/ns_pod_u1/main.log")


# -- uid switching checks ------------------------------------------------------------------------


def test_usable_by_follows_directory_permissions() -> None:
    base = Path(tempfile.mkdtemp(prefix="na-perm-", dir="/tmp"))
    try:
        base.chmod(0o755)
        private = base / "private"
        private.mkdir(mode=0o700)
        script = private / "tool"
        script.write_text("#!/bin/sh\necho hi\n")
        script.chmod(0o755)
        other = 65532 if os.stat(private).st_uid != 65532 else 65533
        assert not usable_by(script, other, set(), 1)
        private.chmod(0o711)
        assert usable_by(script, other, set(), 1)
        assert executable_by(script, other, set())
        assert not usable_by(script, other, set(), 2)  # not writable by others
        # A script whose interpreter the uid cannot reach is not executable by it.
        hidden = base / "hidden"
        hidden.mkdir(mode=0o700)
        interp = hidden / "interp"
        interp.write_text("")
        interp.chmod(0o755)
        script.write_text(f"#!{interp}\n")
        assert not executable_by(script, other, set())
    finally:
        shutil.rmtree(base)


# -- a pod worker against a fake API ---------------------------------------------------------------


class FakeCore:
    """Records what the worker sends; enough of CoreV1Api for one pod."""

    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []
        self.deleted: list[tuple[str, str, int | None]] = []
        self.events: list[tuple[str, str]] = []
        self.tokens = 0
        self.requests: list[tuple[list[str], int]] = []  # (audiences, expirationSeconds) of each TokenRequest
        self.lock = threading.Lock()

    def patch_namespaced_pod_status(self, name: str, namespace: str, body: dict[str, Any], **kw: Any) -> None:
        assert kw["_content_type"] == "application/strategic-merge-patch+json"
        with self.lock:
            self.patches.append(json.loads(json.dumps(body)))

    def create_namespaced_event(self, namespace: str, body: Any) -> None:
        with self.lock:
            self.events.append((body.reason, body.message))

    def delete_namespaced_pod(
        self, name: str, namespace: str, grace_period_seconds: int | None = None, **kw: Any
    ) -> None:
        with self.lock:
            self.deleted.append((namespace, name, grace_period_seconds))

    def create_namespaced_service_account_token(self, name: str, namespace: str, body: Any, **kw: Any) -> Any:
        self.tokens += 1
        assert body.spec.bound_object_ref.kind == "Pod"
        self.requests.append((list(body.spec.audiences or []), body.spec.expiration_seconds))

        class Resp:
            data = json.dumps({"status": {"token": f"token-{name}-{self.tokens}"}}).encode()

        return Resp()

    def phases(self) -> list[str]:
        with self.lock:
            return [p["status"]["phase"] for p in self.patches]

    def last_status(self) -> dict[str, Any]:
        with self.lock:
            return dict(self.patches[-1]["status"])


def worker_pod(command: list[str], **spec: Any) -> dict[str, Any]:
    pod = make_pod({"name": "main", "image": "python:3.11", "command": command})
    pod["metadata"]["uid"] = f"uid-{time.monotonic_ns()}"
    pod["spec"].update({"restartPolicy": "Never", "automountServiceAccountToken": False, **spec})
    return pod


def runtime(tmp_path: Path, core: FakeCore, lookup: FakeLookup | None = None) -> Runtime:
    return Runtime(
        core=cast(client.CoreV1Api, core),
        lookup=lookup or FakeLookup(),
        state_dir=tmp_path,
        python_bin_dir=Path(sys.executable).parent,
        server="https://127.0.0.1:6443",
        ca_pem=b"-----BEGIN CERTIFICATE-----\n",
        allocatable={"cpu": "8", "memory": "16Gi"},
        backoff_base=0.3,
        config_retry=0.3,
    )


def wait_for(check: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_worker_runs_a_pod_to_success_and_logs_output(tmp_path: Path) -> None:
    core = FakeCore()
    pod = worker_pod(["python", "-c", "import os; print('hello', os.environ['WHO'], os.getcwd())"])
    pod["spec"]["containers"][0]["env"] = [{"name": "WHO", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    w = PodWorker(runtime(tmp_path, core), pod)
    w.start()
    w.join(20)
    assert not w.is_alive()
    assert core.phases()[-1] == "Succeeded"
    assert "Running" in core.phases() or "Pending" in core.phases()
    term = core.last_status()["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0 and term["reason"] == "Completed"
    log = pod_log_path(tmp_path, "ns", "p1", pod["metadata"]["uid"], "main").read_text()
    assert log.startswith("hello p1 ") and log.strip().endswith("/work")
    assert all(p["metadata"]["uid"] == pod["metadata"]["uid"] for p in core.patches)  # uid precondition


def test_worker_reports_failure_with_log_tail(tmp_path: Path) -> None:
    core = FakeCore()
    w = PodWorker(runtime(tmp_path, core), worker_pod(["python", "-c", "import sys; print('boom'); sys.exit(3)"]))
    w.start()
    w.join(20)
    assert core.phases()[-1] == "Failed"
    term = core.last_status()["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (3, "Error")
    assert "boom" in term["message"]


def test_worker_init_containers_run_first_in_order(tmp_path: Path) -> None:
    core = FakeCore()
    marker = tmp_path / "order.txt"
    pod = worker_pod(["python", "-c", f"open({str(marker)!r}, 'a').write('main\\n')"])
    pod["spec"]["initContainers"] = [
        {
            "name": f"init{i}",
            "image": "python",
            "command": ["python", "-c", f"open({str(marker)!r}, 'a').write('init{i}\\n')"],
        }
        for i in (1, 2)
    ]
    w = PodWorker(runtime(tmp_path, core), pod)
    w.start()
    w.join(20)
    assert marker.read_text().split() == ["init1", "init2", "main"]
    status = core.last_status()
    assert status["phase"] == "Succeeded"
    assert [s["state"]["terminated"]["exitCode"] for s in status["initContainerStatuses"]] == [0, 0]


def test_worker_waits_on_missing_secret_then_starts(tmp_path: Path) -> None:
    core = FakeCore()
    lookup = FakeLookup()
    pod = worker_pod(["python", "-c", "import os; print(os.environ['PW'])"])
    pod["spec"]["containers"][0]["env"] = [{"name": "PW", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}}]
    w = PodWorker(runtime(tmp_path, core, lookup), pod)
    w.start()
    wait_for(lambda: core.patches)
    waiting = core.last_status()["containerStatuses"][0]["state"]["waiting"]
    assert waiting["reason"] == "CreateContainerConfigError"
    assert waiting["message"] == 'secret "db" not found'
    assert core.last_status()["phase"] == "Pending"
    lookup.secrets["ns/db"] = {"pw": "letmein"}
    w.join(20)
    assert core.phases()[-1] == "Succeeded"
    assert pod_log_path(tmp_path, "ns", "p1", pod["metadata"]["uid"], "main").read_text() == "letmein\n"


def test_worker_restarts_on_failure_with_backoff(tmp_path: Path) -> None:
    core = FakeCore()
    counter = tmp_path / "runs"
    code = (
        f"import pathlib, sys; p = pathlib.Path({str(counter)!r}); "
        "p.write_text(p.read_text() + 'x' if p.exists() else 'x'); sys.exit(0 if len(p.read_text()) >= 3 else 1)"
    )
    w = PodWorker(runtime(tmp_path, core), worker_pod(["python", "-c", code], restartPolicy="OnFailure"))
    w.start()
    w.join(30)
    status = core.last_status()
    assert status["phase"] == "Succeeded"
    cs = status["containerStatuses"][0]
    assert cs["restartCount"] == 2
    assert cs["lastState"]["terminated"]["exitCode"] == 1
    assert any(
        p["status"]["containerStatuses"][0]["state"].get("waiting", {}).get("reason") == "CrashLoopBackOff"
        for p in core.patches
    )


def test_worker_deletion_terminates_the_process_group_and_deletes(tmp_path: Path) -> None:
    core = FakeCore()
    pod = worker_pod(
        ["python", "-c", "import time; print('up', flush=True); time.sleep(600)"], terminationGracePeriodSeconds=5
    )
    w = PodWorker(runtime(tmp_path, core), pod)
    w.start()
    wait_for(lambda: "Running" in core.phases())
    pid = int(core.last_status()["containerStatuses"][0]["containerID"].rsplit("/", 1)[1])
    os.kill(pid, 0)
    deleting = json.loads(json.dumps(pod))
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    deleting["metadata"]["deletionGracePeriodSeconds"] = 5
    w.update(deleting)
    w.join(15)
    assert not w.is_alive()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    term = core.last_status()["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 143  # SIGTERM
    assert core.last_status()["phase"] == "Failed"
    assert core.deleted == [("ns", "p1", 0)]


def test_worker_active_deadline(tmp_path: Path) -> None:
    core = FakeCore()
    w = PodWorker(runtime(tmp_path, core), worker_pod(["sleep", "600"], activeDeadlineSeconds=1))
    w.start()
    w.join(15)
    status = core.last_status()
    assert (status["phase"], status["reason"]) == ("Failed", "DeadlineExceeded")
    assert status["containerStatuses"][0]["state"]["terminated"]["exitCode"] in (137, 143)
    assert core.deleted == []  # the Job controller deletes it; the agent only reports


def test_worker_readiness_exec_probe_gates_ready(tmp_path: Path) -> None:
    core = FakeCore()
    flag = tmp_path / "ready-flag"
    pod = worker_pod(["sleep", "600"], restartPolicy="Always")
    pod["spec"]["containers"][0]["readinessProbe"] = {
        "exec": {"command": ["test", "-e", str(flag)]},
        "periodSeconds": 1,
    }
    w = PodWorker(runtime(tmp_path, core), pod)
    w.start()
    try:
        wait_for(lambda: "Running" in core.phases())
        time.sleep(1.2)
        assert core.last_status()["containerStatuses"][0]["ready"] is False
        flag.write_text("")
        wait_for(lambda: core.last_status()["containerStatuses"][0]["ready"] is True)
        conds = {c["type"]: c["status"] for c in core.last_status()["conditions"]}
        assert conds["Ready"] == "True"
    finally:
        w.gone()
        w.join(10)


def test_worker_writes_service_account_kubeconfig(tmp_path: Path) -> None:
    core = FakeCore()
    pod = worker_pod(["python", "-c", "import os; print(os.environ['KUBECONFIG'])"])
    pod["spec"]["automountServiceAccountToken"] = True
    w = PodWorker(runtime(tmp_path, core), pod)
    w.start()
    w.join(20)
    assert core.phases()[-1] == "Succeeded"
    pod_dir = tmp_path / "pods" / f"ns_p1_{pod['metadata']['uid']}"
    kubeconfig_path = pod_log_path(tmp_path, "ns", "p1", pod["metadata"]["uid"], "main").read_text().strip()
    assert kubeconfig_path == str(pod_dir / "kubeconfig")
    cfg = yaml.safe_load(Path(kubeconfig_path).read_text())
    assert cfg["users"][0]["user"]["token"] == "token-runner-1"
    assert cfg["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:6443"
    assert cfg["contexts"][0]["context"]["namespace"] == "ns"
    assert (pod_dir / "serviceaccount" / "token").read_text() == "token-runner-1"
    assert (pod_dir / "serviceaccount" / "namespace").read_text() == "ns"


def test_worker_materialises_projected_service_account_tokens_at_their_mount_path(tmp_path: Path) -> None:
    """A projected serviceAccountToken volume: a token for its audience, bound to the pod, that the
    process finds at its mountPath below $LOCALKUBE_VOLUME_ROOT (no mounts here), refreshed later."""
    core = FakeCore()
    read = "import os; print(open(os.environ['LOCALKUBE_VOLUME_ROOT'] + '/var/run/secrets/x/tok').read())"
    pod = worker_pod(["python", "-c", read])
    pod["spec"]["volumes"] = [
        {"name": "tmp", "emptyDir": {}},
        {
            "name": "x",
            "projected": {
                "sources": [
                    {"serviceAccountToken": {"audience": "example.com/x", "expirationSeconds": 900, "path": "tok"}},
                    {"configMap": {"name": "ignored"}},
                ]
            },
        },
    ]
    pod["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "x", "mountPath": "/var/run/secrets/x", "readOnly": True},
    ]
    w = PodWorker(runtime(tmp_path, core), pod)
    w.start()
    w.join(20)
    assert core.phases()[-1] == "Succeeded", core.last_status()
    assert pod_log_path(tmp_path, "ns", "p1", pod["metadata"]["uid"], "main").read_text().strip() == "token-runner-1"
    assert core.requests == [(["example.com/x"], 900)]  # automount is off: no API token was requested
    token = w._projected["x"][0]
    assert 0 < token.refresh_at - time.monotonic() <= 900 * 0.8
    token.refresh_at = 0.0  # due: the agent's loop refreshes it in place
    w._refresh_projected_if_due(pod)
    assert (w.run_dir / "volumes" / "x" / "tok").read_text() == "token-runner-2"
    assert (w.run_dir / "mounts" / "main" / "var/run/secrets/x/tok").read_text() == "token-runner-2"


def test_worker_unmapped_image_waits(tmp_path: Path) -> None:
    core = FakeCore()
    pod = worker_pod([])
    pod["spec"]["containers"][0] = {"name": "main", "image": "quay.io/who/knows:1"}
    w = PodWorker(runtime(tmp_path, core), pod)
    w.start()
    try:
        wait_for(lambda: core.patches)
        waiting = core.last_status()["containerStatuses"][0]["state"]["waiting"]
        assert waiting["reason"] == "ImageNotMapped" and "quay.io/who/knows:1" in waiting["message"]
    finally:
        w.gone()
        w.join(10)


def test_find_pod_logs_matches_the_pod_not_its_prefix(tmp_path: Path) -> None:
    for d, c in (("ns_web_u1", "main"), ("ns_web_u1", "init"), ("ns_web_extra_u2", "main")):
        pod_log = tmp_path / "pods" / d / f"{c}.log"
        pod_log.parent.mkdir(parents=True, exist_ok=True)
        pod_log.write_text(d)
    assert [p.name for p in nodeagent.find_pod_logs(tmp_path, "ns", "web")] == ["init.log", "main.log"]
    assert [p.parent.name for p in nodeagent.find_pod_logs(tmp_path, "ns", "web", "main")] == ["ns_web_u1"]
    assert nodeagent.find_pod_logs(tmp_path, "ns", "nope") == []


# -- the agent's dispatch (a fake API behind a real NodeAgent) ------------------------------------


@pytest.fixture
def agent(tmp_path: Path) -> Any:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {
                            "server": "https://127.0.0.1:6443",
                            "certificate-authority-data": "LS0tLS1CRUdJTg==",
                        },
                    }
                ],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    a = nodeagent.NodeAgent(
        str(kubeconfig), ["node-a"], tmp_path / "state", backoff_base=0.2, run_root=tmp_path / "run"
    )
    fake = FakeCore()
    a.core = cast(client.CoreV1Api, fake)
    a.rt.core = cast(client.CoreV1Api, fake)
    yield a, fake
    a.shutdown()


def test_agent_reads_server_and_ca_from_kubeconfig(agent: Any) -> None:
    a, _ = agent
    assert a.rt.server == "https://127.0.0.1:6443" and a.rt.apiserver_port == 6443
    assert a.rt.ca_pem == b"-----BEGIN"
    assert a.capacity["cpu"] == "8" and int(a.capacity["ephemeral-storage"]) > 0


def test_agent_runs_new_pods_and_kills_those_gone_from_a_relist(agent: Any) -> None:
    a, fake = agent
    pod = worker_pod(["sleep", "600"], restartPolicy="Always")
    a._on_pod("ADDED", pod)
    wait_for(lambda: "Running" in fake.phases())
    assert a.running_pods() == ["ns/p1"]
    pid = int(fake.last_status()["containerStatuses"][0]["containerID"].rsplit("/", 1)[1])
    a._relisted("node-a", [])  # the pod is no longer in the API
    wait_for(lambda: not a.running_pods())
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"))
    assert fake.deleted == []  # a vanished pod is not deleted again


def test_agent_never_reruns_finished_pods_and_deletes_them_once(agent: Any) -> None:
    a, fake = agent
    pod = worker_pod(["true"])
    a._on_pod("ADDED", pod)
    wait_for(lambda: "Succeeded" in fake.phases())
    wait_for(lambda: not a.running_pods())
    stale = json.loads(json.dumps(pod))
    stale["status"] = {"phase": "Running"}  # an event from before the final status patch
    a._on_pod("MODIFIED", stale)
    assert not a.running_pods()
    deleting = json.loads(json.dumps(stale))
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    a._on_pod("MODIFIED", deleting)
    a._on_pod("MODIFIED", deleting)
    assert fake.deleted == [("ns", "p1", 0)]
    a._on_pod("DELETED", deleting)
    assert pod["metadata"]["uid"] not in a._finished


def test_a_pod_deleted_just_as_it_finishes_by_itself_gets_its_final_delete(agent: Any) -> None:
    """The deletion arrives while the pod's last container has exited and its worker is finishing
    (a Job deleted in the foreground right as its pod completes): the event reaches the worker, which
    has already decided to finish and never stops for the deletion, so when it is done the agent must
    make the final delete, or the pod and a Job deleted in the foreground with it stay forever."""
    a, fake = agent
    deleting = worker_pod(["true"])
    uid = deleting["metadata"]["uid"]
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"

    class Finishing:  # a worker past its last look at the pod, as the deletion event reaches it
        node = "node-a"
        pod = worker_pod(["true"])

        def update(self, pod: dict[str, Any]) -> None:
            self.pod = pod

        def shutdown(self) -> None:
            pass

    with a._lock:
        a._workers[uid] = Finishing()
    a._on_pod("MODIFIED", deleting)  # handed to the worker, which no longer looks
    assert fake.deleted == []
    a._worker_done(uid, "Succeeded")
    assert fake.deleted == [("ns", "p1", 0)]
    a._on_pod("MODIFIED", deleting)  # a later event asks nothing more
    assert fake.deleted == [("ns", "p1", 0)]


def test_agent_shutdown_kills_every_process(agent: Any) -> None:
    a, fake = agent
    for i in range(3):
        p = worker_pod(["sleep", "600"], restartPolicy="Always")
        p["metadata"]["name"] = f"p{i}"
        a._on_pod("ADDED", p)
    wait_for(lambda: sum(1 for ph in fake.phases() if ph == "Running") >= 3)
    pids = {
        int(patch["status"]["containerStatuses"][0]["containerID"].rsplit("/", 1)[1])
        for patch in fake.patches
        if patch["status"]["phase"] == "Running"
    }
    assert len(pids) == 3
    a.shutdown()
    assert not a.running_pods()
    for pid in pids:
        wait_for(
            lambda pid=pid: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
        )


def test_unready_condition_messages_read_like_the_kubelets() -> None:
    status = pod_status(
        phase="Running",
        conditions=Conditions(),
        start_time="t",
        init_containers=[],
        containers=[c_state(running_state("t"), name="a"), c_state(running_state("t"), name="b", ready=True)],
        initialized=True,
    )
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["message"] == "containers with unready status: [a]"


def test_pod_run_root_leaves_a_private_state_dir() -> None:
    base = Path(tempfile.mkdtemp(prefix="na-root-", dir="/tmp"))
    try:
        base.chmod(0o755)
        public = nodeagent.pod_run_root(base / "public")
        assert public == base / "public" / "pods"
        private_home = base / "home"
        private_home.mkdir(mode=0o700)
        elsewhere = nodeagent.pod_run_root(private_home / "state")
        assert not str(elsewhere).startswith(str(private_home))
        assert usable_by(elsewhere, 65534, set(), 1)
        assert elsewhere == nodeagent.pod_run_root(private_home / "state")  # stable per state dir
        shutil.rmtree(elsewhere.parent)
    finally:
        shutil.rmtree(base)


class FlakyCore(FakeCore):
    """Fails the first status patches with a server error."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def patch_namespaced_pod_status(self, name: str, namespace: str, body: dict[str, Any], **kw: Any) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise ApiException(status=500, reason="etcd hiccup")
        super().patch_namespaced_pod_status(name, namespace, body, **kw)


class BrokenLookup(FakeLookup):
    def __init__(self) -> None:
        super().__init__()
        self.broken = True

    def secret(self, namespace: str, name: str) -> Mapping[str, str] | None:
        if self.broken:
            raise ApiException(status=503, reason="unavailable")
        return {"pw": "x"}


def test_terminal_status_is_retried_until_it_lands(tmp_path: Path) -> None:
    core = FlakyCore(failures=3)
    w = PodWorker(runtime(tmp_path, cast(FakeCore, core)), worker_pod(["true"]))
    w.start()
    w.join(30)
    assert core.failures == 0
    assert core.phases()[-1] == "Succeeded"


def test_api_errors_while_configuring_are_retried_not_fatal(tmp_path: Path) -> None:
    core = FakeCore()
    lookup = BrokenLookup()
    pod = worker_pod(["true"])
    pod["spec"]["containers"][0]["env"] = [{"name": "PW", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}}]
    w = PodWorker(runtime(tmp_path, core, lookup), pod)
    w.start()
    wait_for(lambda: core.patches)
    waiting = core.last_status()["containerStatuses"][0]["state"]["waiting"]
    assert waiting["reason"] == "CreateContainerConfigError" and "503" in waiting["message"]
    lookup.broken = False
    w.join(20)
    assert core.phases()[-1] == "Succeeded"


def test_failed_liveness_probe_restarts_the_container(tmp_path: Path) -> None:
    core = FakeCore()
    pod = worker_pod(["sleep", "600"], restartPolicy="Always", terminationGracePeriodSeconds=2)
    pod["spec"]["containers"][0]["livenessProbe"] = {
        "exec": {"command": ["false"]},
        "periodSeconds": 1,
        "failureThreshold": 1,
    }
    w = PodWorker(runtime(tmp_path, core), pod)
    w.start()
    try:
        wait_for(lambda: core.last_status()["containerStatuses"][0]["restartCount"] >= 1 if core.patches else False)
        cs = core.last_status()["containerStatuses"][0]
        assert cs["lastState"]["terminated"]["exitCode"] == 143  # SIGTERM from the kill
        assert any(reason == "Killing" for reason, _ in core.events)
        assert any(reason == "Unhealthy" for reason, _ in core.events)
    finally:
        w.gone()
        w.join(10)
