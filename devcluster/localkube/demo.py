"""``python -m localkube.demo [up|down]``: the one-command demo (``make demo``, ``make demo-down``).

``up`` (the default) starts or reuses the local control plane and its real node (``localreal-1``:
the kubelet and containerd run pods from the product image ``make image-build`` built, each with its
own network namespace and pod IP from the CNI bridge plugin; kube-proxy routes Services and CoreDNS
answers their names; ``localkube.realnode``), installs the Helm chart from that image onto that node
with ``helm upgrade --install`` (a rerun is an idempotent upgrade), creates the namespace
``research-demo`` whose pods go to that node too, submits the ResearchJob of
``examples/researchjob.yaml`` with the documents of ``examples/corpus/`` through the ``kubectl
research`` plugin, follows it with ``kubectl research watch`` until it ends and prints its report
with ``kubectl research report``. The workers reach the model server and the lease broker through
their Services. ``down`` uninstalls the release, deletes the demo namespace and stops the cluster.

``up --process-node`` runs the chart on the process node instead (pods as host processes sharing
the host network, with free host ports picked once and kept in the state dir): no root needed, and
what ``tests/test_e2e_helm.py`` installs.

Everything a user would type goes through the kubectl and helm binaries (and kubectl's plugin
lookup); the raw kubectl equivalents are printed alongside. The functions here are also what
``tests/test_e2e_helm.py`` drives.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import yaml

from localkube import realnode
from localkube.controlplane import (
    NAMESPACE_PLACEMENT_PLUGINS,
    REPO_ROOT,
    Cluster,
    cache_dir,
    free_port,
    kube_tools_dir,
)

RELEASE = "research-operator"
RELEASE_NAMESPACE = "research-operator-system"
OPERATOR_DEPLOYMENT = RELEASE  # the chart's fullname is the release name when it holds "research-operator"
MODELSERVER_DEPLOYMENT = f"{RELEASE}-modelserver"
LEASE = f"{RELEASE}-leader"
CHART = REPO_ROOT / "charts" / "research-operator"
DEMO_NAMESPACE = "research-demo"
EXAMPLES = REPO_ROOT / "examples"
CORPUS_DIR = EXAMPLES / "corpus"
CORPUS_CONFIGMAP = "demo-corpus"  # the name examples/researchjob.yaml refers to
RESEARCHJOB_FILE = EXAMPLES / "researchjob.yaml"
VALUES_FILE = "demo-values.yaml"  # in the cluster's state dir
CONTAINER_VALUES_FILE = "demo-container-values.yaml"  # the same, for the real node
NODE = "localreal-1"  # the name `localkube real-node up` gives it too: one real node per cluster
# The real node registers with the label and the taint localkube.dev/runtime=containerd (NoSchedule).
PLACEMENT: dict[str, Any] = {
    "nodeSelector": {realnode.RUNTIME_LABEL: realnode.RUNTIME},
    "tolerations": [
        {"key": realnode.RUNTIME_LABEL, "operator": "Equal", "value": realnode.RUNTIME, "effect": "NoSchedule"}
    ],
}
# Admission plugins (enabled by localkube.controlplane) that place a namespace's pods.
NODE_SELECTOR_ANNOTATION = "scheduler.alpha.kubernetes.io/node-selector"
TOLERATIONS_ANNOTATION = "scheduler.alpha.kubernetes.io/defaultTolerations"
JOB_LABEL = "researchops.io/job"
RESTRICTED_LABELS = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}
DEFAULT_TIMEOUT = 900.0
# The ModelEndpoint the demo declares for the chart's model server: each model call of the workers
# then takes a lease from the operator's broker. 4 = batchSize 2 x maxActiveJobs 2 of the example.
ENDPOINT = "offline"
ENDPOINT_CAPACITY = 4
FORWARDING = re.compile(r"Forwarding from 127\.0\.0\.1:(\d+) ->")  # kubectl port-forward's first line
BROKER_ANSWERS = re.compile(r"lease broker (\S+) answers: each model call takes a lease of ModelEndpoint (\S+)")

Emit = Callable[[str], None]


class DemoError(Exception):
    """A failure with a message that says what went wrong and where to look."""


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@dataclass(frozen=True)
class Kube:
    """kubectl and helm against one cluster, plus where that cluster keeps pod logs."""

    kubeconfig: Path
    tools: Path
    state_dir: Path

    @classmethod
    def of(cls, cluster: Cluster) -> Kube:
        return cls(cluster.kubeconfig, kube_tools_dir(), cluster.state_dir)

    def run(
        self, tool: str, *args: str, input: str | None = None, check: bool = True, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        argv = [str(self.tools / tool), f"--kubeconfig={self.kubeconfig}", *args]
        try:
            out = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise DemoError(f"`{tool} {' '.join(args)}` did not finish in {timeout:.0f}s") from e
        if check and out.returncode != 0:
            raise DemoError(f"`{tool} {' '.join(args)}` failed (exit {out.returncode}):\n{out.stderr.strip()}")
        return out

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        return self.run("kubectl", *args, input=input, check=check, timeout=timeout)

    def helm(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.run("helm", *args, check=check, timeout=timeout)

    def get(self, *args: str) -> dict[str, Any] | None:
        """``kubectl get ... -o json``, or None when the object does not exist."""
        out = self.kubectl("get", *args, "-o", "json", check=False)
        if out.returncode != 0:
            if "NotFound" in out.stderr:
                return None
            raise DemoError(f"`kubectl get {' '.join(args)}` failed:\n{out.stderr.strip()}")
        return dict(json.loads(out.stdout))

    def names(self, *args: str) -> list[str]:
        """``kubectl get ... -o name``: kind/name of every object listed."""
        return self.kubectl("get", *args, "-o", "name").stdout.split()

    def research(self, *args: str, emit: Emit | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """``kubectl research ...``: kubectl finds the plugin ``kubectl-research`` on PATH (installed in
        this Python's bin folder). With ``emit``, each line of its output is passed on as it comes."""
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{self.tools}{os.pathsep}{os.environ.get('PATH', '')}",
            "LOCALKUBE_STATE_DIR": str(self.state_dir),
        }
        argv = [str(self.tools / "kubectl"), "research", *args]
        what = f"`kubectl research {' '.join(args)}`"
        if emit is None:
            try:
                out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
            except subprocess.TimeoutExpired as e:
                raise DemoError(f"{what} did not finish in {timeout:.0f}s") from e
            if out.returncode != 0:
                raise DemoError(f"{what} failed (exit {out.returncode}): {out.stderr.strip()}")
            return out
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None and proc.stderr is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            emit(line.rstrip("\n"))
        err = proc.stderr.read()
        proc.wait()
        if proc.returncode != 0:
            raise DemoError(f"{what} failed (exit {proc.returncode}): {err.strip()}")
        return subprocess.CompletedProcess(argv, proc.returncode, "".join(lines), err)

    def pod_log_paths(self, namespace: str, pod: str) -> list[Path]:
        """The process node's agent writes each container's output to a file (docs/node-agent.md)."""
        return sorted((self.state_dir / "nodes" / "pods").glob(f"{namespace}_{pod}_*/*.log"))

    def pod_log(self, namespace: str, pod: str) -> str:
        """A pod's log: the process node's files, else ``kubectl logs`` (through the kubelet of a real
        node); empty when neither has it."""
        paths = self.pod_log_paths(namespace, pod)
        if paths:
            return "".join(p.read_text(errors="replace") for p in paths)
        return self.kubectl("logs", pod, "-n", namespace, "--all-containers", check=False).stdout

    @contextlib.contextmanager
    def port_forward(self, namespace: str, target: str, port: int, timeout: float = 30) -> Iterator[int]:
        """``kubectl port-forward TARGET :PORT`` (through the kubelet of the pod's node) while the
        block runs; yields the local port on 127.0.0.1."""
        argv = [str(self.tools / "kubectl"), f"--kubeconfig={self.kubeconfig}", "port-forward", "-n", namespace,
                "--address", "127.0.0.1", target, f":{port}"]  # fmt: skip
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        local: list[int] = []
        said: list[str] = []
        forwarding = threading.Event()

        def read() -> None:  # to the end: kubectl says a line for every connection
            assert proc.stdout is not None
            for line in proc.stdout:
                said.append(line)
                if not local and (m := FORWARDING.match(line)):
                    local.append(int(m.group(1)))
                    forwarding.set()
            forwarding.set()

        threading.Thread(target=read, daemon=True).start()
        try:
            if not forwarding.wait(timeout) or not local:
                what = f"`kubectl port-forward -n {namespace} {target} :{port}`"
                raise DemoError(f"{what} did not forward in {timeout:.0f}s: {''.join(said).strip()}")
            yield local[0]
        finally:
            proc.terminate()
            proc.wait(10)


# ------------------------------------------------------------------------------------------------
# the release
# ------------------------------------------------------------------------------------------------


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def release_installed(kube: Kube) -> bool:
    out = kube.helm("status", RELEASE, "--namespace", RELEASE_NAMESPACE, check=False)
    return out.returncode == 0


def local_values(kube: Kube) -> Path:
    """The values the local cluster needs (free host ports), kept in the state dir for reruns.

    Pods share the host network and Services do not route there, so the operator's metrics, health
    and lease broker ports and the model server's port must be free on the host, and workers reach
    the model server and the lease broker at 127.0.0.1. Recorded ports are reused while the release
    holds them (or they are still free), which keeps ``helm upgrade`` a no-op on a rerun.
    """
    path = kube.state_dir / VALUES_FILE
    if path.exists():
        values = yaml.safe_load(path.read_text()) or {}
        op = values["operator"]
        ports = [op["metricsPort"], op["healthPort"], values["modelServer"]["port"]]
        broker = (op.get("leaseBroker") or {}).get("port")
        if broker and (release_installed(kube) or all(_port_free(p) for p in [*ports, broker])):
            return path
    ports = []
    while len(ports) < 4:
        port = free_port()
        if port not in ports:
            ports.append(port)
    metrics, health, model, leases = ports
    values = {
        "operator": {
            "metricsPort": metrics,
            "healthPort": health,
            "leaseBroker": {"port": leases, "url": f"https://127.0.0.1:{leases}"},
        },
        "modelServer": {"port": model, "baseUrl": f"http://127.0.0.1:{model}/v1"},
    }
    header = (
        "# Written by `python -m localkube.demo`: free host ports for the chart on the local cluster,\n"
        "# where every pod shares the host network. Reused by reruns; deleted by `demo down`.\n"
    )
    path.write_text(header + yaml.safe_dump(values, sort_keys=False))
    return path


def container_values(kube: Kube) -> Path:
    """The values for the chart on the demo's real node, kept in the state dir: the image as
    built here (never pulled: there is no registry), and the operator and model server placed on
    the node. Every other value is the chart's default: the workers reach the model server and the
    lease broker at their Services' DNS names, and each pod listens on its own IP."""
    path = kube.state_dir / CONTAINER_VALUES_FILE
    values = {
        "image": {"repository": "research-operator", "tag": "0.1.0", "pullPolicy": "Never"},
        "operator": PLACEMENT,
        "modelServer": PLACEMENT,
    }
    header = (
        f"# Written by `python -m localkube.demo`: the chart on the real node {NODE},\n"
        "# from the image `make image-build` built. Rewritten by reruns; deleted by `demo down`.\n"
    )
    path.write_text(header + yaml.safe_dump(values, sort_keys=False))
    return path


def model_url(kube: Kube) -> str:
    """The operator's default model URL (the chart's model server), from its settings ConfigMap."""
    settings = kube.get("configmap", f"{RELEASE}-settings", "-n", RELEASE_NAMESPACE) or {}
    url = (settings.get("data") or {}).get("defaultModelBaseUrl")
    if not url:
        raise DemoError(f"configmap/{RELEASE}-settings in {RELEASE_NAMESPACE} names no defaultModelBaseUrl")
    return str(url)


def endpoint_manifest(base_url: str, capacity: int = ENDPOINT_CAPACITY) -> dict[str, Any]:
    return {
        "apiVersion": "researchops.io/v1alpha1",
        "kind": "ModelEndpoint",
        "metadata": {"name": ENDPOINT},
        "spec": {"baseUrl": base_url, "maxConcurrentRequests": capacity},
    }


def install(kube: Kube, values_file: Path, *extra: str) -> str:
    """``helm upgrade --install`` the chart into research-operator-system; returns helm's output."""
    out = kube.helm(
        "upgrade", "--install", RELEASE, str(CHART),
        "--namespace", RELEASE_NAMESPACE, "--create-namespace",
        "--values", str(values_file), *extra,
    )  # fmt: skip
    return out.stdout


def wait_available(kube: Kube, timeout: float = 180) -> None:
    """Wait until the operator and the model server Deployments have rolled out and are Available."""
    deployments = [OPERATOR_DEPLOYMENT]
    if kube.get("deployment", MODELSERVER_DEPLOYMENT, "-n", RELEASE_NAMESPACE) is not None:
        deployments.append(MODELSERVER_DEPLOYMENT)
    deadline = time.monotonic() + timeout
    for name in deployments:
        left = max(1, int(deadline - time.monotonic()))
        out = kube.kubectl(
            "rollout", "status", f"deployment/{name}", "-n", RELEASE_NAMESPACE, f"--timeout={left}s",
            check=False, timeout=left + 30,
        )  # fmt: skip
        if out.returncode != 0:
            raise DemoError(f"deployment/{name} did not become Available in {timeout:.0f}s.\n" + _why_not_ready(kube))


def _why_not_ready(kube: Kube) -> str:
    lines = []
    pods = kube.get("pods", "-n", RELEASE_NAMESPACE, "-l", f"app.kubernetes.io/instance={RELEASE}") or {}
    for pod in pods.get("items", []):
        name = pod["metadata"]["name"]
        ready = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}.get("Ready")
        lines.append(f"  pod {name}: phase {pod.get('status', {}).get('phase')}, Ready={ready}")
        lines += [f"    log: {p}" for p in kube.pod_log_paths(RELEASE_NAMESPACE, name)]
    lease = kube.get("lease", LEASE, "-n", RELEASE_NAMESPACE)
    if lease is not None:
        holder = lease.get("spec", {}).get("holderIdentity")
        lines.append(
            f"  Lease {RELEASE_NAMESPACE}/{LEASE} is held by {holder!r}; only its holder reconciles"
            " (is another research-operator running against this cluster?)"
        )
    return "\n".join(lines) or "  no pods of the release exist"


def operator_pod(kube: Kube) -> dict[str, Any]:
    selector = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator"
    pods = kube.get("pods", "-n", RELEASE_NAMESPACE, "-l", selector) or {"items": []}
    running = [p for p in pods["items"] if p.get("status", {}).get("phase") == "Running"]
    if not running:
        raise DemoError(f"no running operator pod in {RELEASE_NAMESPACE}")
    return dict(running[0])


def uninstall(kube: Kube) -> bool:
    """``helm uninstall``; False when the release was not installed."""
    if not release_installed(kube):
        return False
    kube.helm("uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, "--wait=watcher", "--timeout=120s")
    return True


# ------------------------------------------------------------------------------------------------
# the demo's namespace, documents and ResearchJob
# ------------------------------------------------------------------------------------------------


def create_namespace(kube: Kube, namespace: str, placement: dict[str, Any] | None = None) -> None:
    """The namespace, enforcing the restricted Pod Security level (worker pods meet it). With
    ``placement`` (a nodeSelector and tolerations) every pod created in it gets them, through the
    PodNodeSelector and PodTolerationRestriction admission plugins and the namespace's annotations:
    the worker pods the operator creates there go to that node without anything in the ResearchJob."""
    meta: dict[str, Any] = {"name": namespace, "labels": RESTRICTED_LABELS}
    if placement is not None:
        meta["annotations"] = {
            NODE_SELECTOR_ANNOTATION: ",".join(f"{k}={v}" for k, v in placement["nodeSelector"].items()),
            TOLERATIONS_ANNOTATION: json.dumps(placement["tolerations"]),
        }
    kube.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": meta}))
    if placement is not None:
        check_placement(kube, namespace, placement)


def check_placement(kube: Kube, namespace: str, placement: dict[str, Any]) -> None:
    """A pod created in the namespace (a server-side dry run) gets the namespace's placement, or the
    API server lacks the admission plugins (a cluster started by an older localkube)."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "placement-check-"},
        "spec": {
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "c", "image": "research-operator:0.1.0",
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            }],
        },
    }  # fmt: skip
    out = kube.kubectl("create", "-n", namespace, "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(pod))
    spec = json.loads(out.stdout)["spec"]
    selector = spec.get("nodeSelector") or {}
    keys = {t.get("key") for t in spec.get("tolerations") or []}
    if any(selector.get(k) != v for k, v in placement["nodeSelector"].items()) or not all(
        t["key"] in keys for t in placement["tolerations"]
    ):
        raise DemoError(
            f"a pod created in namespace {namespace} does not get the namespace's nodeSelector and tolerations: "
            "the running API server was started without the PodNodeSelector and PodTolerationRestriction "
            "admission plugins (by an older localkube). Restart the cluster: make demo-down && make demo"
        )


def apply_corpus(kube: Kube, namespace: str, name: str = CORPUS_CONFIGMAP, folder: Path = CORPUS_DIR) -> int:
    """``kubectl create configmap --from-file`` the folder (one document per file), as an apply."""
    docs = sorted(folder.glob("*.md"))
    if not docs:
        raise DemoError(f"no documents (*.md) in {folder}")
    rendered = kube.kubectl(
        "create", "configmap", name, f"--from-file={folder}", "-n", namespace, "--dry-run=client", "-o", "yaml"
    ).stdout
    kube.kubectl("apply", "-f", "-", input=rendered)
    return len(docs)


def load_researchjob(path: Path = RESEARCHJOB_FILE) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))


def submit_args(body: dict[str, Any], namespace: str, folder: Path = CORPUS_DIR) -> list[str]:
    """``kubectl research submit`` flags for a ResearchJob manifest whose documents are ``folder``
    (the plugin makes them the ConfigMap NAME-documents, owned by the ResearchJob)."""
    spec = body["spec"]
    args = ["submit", str(body["metadata"]["name"]), "-n", namespace, "--topic", str(spec["topic"])]
    args += ["--documents", str(folder)]
    analysts, parallelism = spec.get("analysts") or {}, spec.get("parallelism") or {}
    for flag, value in (
        ("--analysts", analysts.get("count")),
        ("--batch-size", parallelism.get("batchSize")),
        ("--max-active-jobs", parallelism.get("maxActiveJobs")),
        ("--max-turns", (spec.get("interview") or {}).get("maxTurns")),
        ("--max-results", next((s.get("maxResults") for s in spec.get("sources") or [] if s.get("maxResults")), None)),
    ):
        if value is not None:
            args += [flag, str(value)]
    if analysts.get("review"):
        args.append("--review")
    return args


def delete_researchjob(kube: Kube, namespace: str, name: str, timeout: float = 120) -> None:
    """Delete a ResearchJob and wait until everything it owned is gone, so that a new one of the
    same name starts from scratch (its children have deterministic names)."""
    kube.kubectl("delete", "researchjob", name, "-n", namespace, "--ignore-not-found", f"--timeout={int(timeout)}s")
    deadline = time.monotonic() + timeout
    left: list[str] = []
    while time.monotonic() < deadline:
        left = kube.names(
            "jobs,pods,configmaps,serviceaccounts,roles,rolebindings", "-n", namespace, "-l", f"{JOB_LABEL}={name}"
        )
        if not left:
            return
        time.sleep(1)
    raise DemoError(f"deleted ResearchJob {namespace}/{name}, but after {timeout:.0f}s these remain: {left}")


def apply_researchjob(kube: Kube, namespace: str, body: dict[str, Any]) -> str:
    """``kubectl apply`` the ResearchJob; returns its name."""
    kube.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(body))
    return str(body["metadata"]["name"])


# ------------------------------------------------------------------------------------------------
# following a ResearchJob
# ------------------------------------------------------------------------------------------------

ROW = "{:>7}  {:<15} {:<9} {:<7} {:<7} {}"


def _row(elapsed: str, status: dict[str, Any]) -> str:
    batches = status.get("batches") or {}
    return ROW.format(
        elapsed,
        status.get("phase", "-"),
        status.get("progress") or "-",
        batches.get("active", 0),
        batches.get("queued", 0),
        status.get("message") or "",
    )


def follow(
    kube: Kube, namespace: str, name: str, timeout: float = DEFAULT_TIMEOUT, emit: Emit = _say, poll: float = 1.0
) -> dict[str, Any]:
    """Print a line whenever the ResearchJob's phase, progress, batches or message change (like
    ``kubectl get rj -w``) until it is Succeeded; returns the object. Raises DemoError when it
    fails (with its message and the failed pods' logs) or on timeout."""
    from kubernetes import client, config  # the python client only reads; users' actions use kubectl

    api = cast(client.ApiClient, config.new_client_from_config(config_file=str(kube.kubeconfig)))  # type: ignore[no-untyped-call]
    custom = client.CustomObjectsApi(api)
    start = time.monotonic()
    emit(ROW.format("ELAPSED", "PHASE", "PROGRESS", "ACTIVE", "QUEUED", "MESSAGE"))
    last: tuple[Any, ...] | None = None
    status: dict[str, Any] = {}
    try:
        while True:
            elapsed = time.monotonic() - start
            try:
                obj = cast(
                    dict[str, Any],
                    custom.get_namespaced_custom_object("researchops.io", "v1alpha1", namespace, "researchjobs", name),
                )
            except client.ApiException as e:
                if e.status == 404:
                    raise DemoError(f"ResearchJob {namespace}/{name} was deleted while the demo followed it") from e
                raise
            status = obj.get("status") or {}
            batches = status.get("batches") or {}
            key = (status.get("phase"), status.get("progress"), batches.get("active"), batches.get("queued"),
                   status.get("message"))  # fmt: skip
            if key != last:
                emit(_row(f"{elapsed:.0f}s", status))
                last = key
            if status.get("phase") == "Succeeded":
                return dict(obj)
            if status.get("phase") == "Failed":
                raise DemoError(_failure(kube, namespace, name, status))
            if elapsed > timeout:
                raise DemoError(
                    f"ResearchJob {namespace}/{name} did not finish in {timeout:.0f}s; it is in phase "
                    f"{status.get('phase', 'Pending')}: {status.get('message') or 'no message'}.\n"
                    f"  kubectl describe rj {name} -n {namespace}\n" + _operator_logs(kube)
                )
            time.sleep(poll)
    finally:
        api.close()  # type: ignore[no-untyped-call]


def _operator_logs(kube: Kube) -> str:
    pods = kube.get("pods", "-n", RELEASE_NAMESPACE, "-l", "app.kubernetes.io/component=operator") or {}
    paths = [p for pod in pods.get("items", []) for p in kube.pod_log_paths(RELEASE_NAMESPACE, pod["metadata"]["name"])]
    return "".join(f"  operator log: {p}\n" for p in paths)


def _failure(kube: Kube, namespace: str, name: str, status: dict[str, Any]) -> str:
    lines = [f"ResearchJob {namespace}/{name} failed: {status.get('message') or 'no message'}"]
    pods = kube.get("pods", "-n", namespace, "-l", f"{JOB_LABEL}={name}") or {}
    failed = [p for p in pods.get("items", []) if p.get("status", {}).get("phase") == "Failed"]
    for pod in failed or pods.get("items", []):
        pod_name = pod["metadata"]["name"]
        lines.append(f"  pod {pod_name} ({pod.get('status', {}).get('phase')}):")
        state = "" if kube.state_dir == cache_dir() / "cluster" else f" --state-dir {kube.state_dir}"
        lines.append(f"    {sys.executable} -m localkube.cli{state} logs {namespace}/{pod_name}")
        lines += [f"    log file: {p}" for p in kube.pod_log_paths(namespace, pod_name)]
    lines.append(f"  kubectl describe rj {name} -n {namespace}")
    return "\n".join(lines)


def report_command(namespace: str, ref: dict[str, Any]) -> str:
    key = str(ref.get("key", "report.md")).replace(".", "\\.")
    return f"kubectl get configmap {ref['configMap']} -n {namespace} -o jsonpath='{{.data.{key}}}'"


def read_report(kube: Kube, namespace: str, obj: dict[str, Any]) -> str:
    """The report, read the way a user does: kubectl get configmap ... -o jsonpath."""
    ref = (obj.get("status") or {}).get("report") or {}
    if not ref.get("configMap"):
        raise DemoError(f"ResearchJob {namespace}/{obj['metadata']['name']} succeeded but names no report ConfigMap")
    key = str(ref.get("key", "report.md")).replace(".", "\\.")
    out = kube.kubectl("get", "configmap", ref["configMap"], "-n", namespace, "-o", f"jsonpath={{.data.{key}}}")
    return out.stdout


# ------------------------------------------------------------------------------------------------
# up / down
# ------------------------------------------------------------------------------------------------


def start_node(cluster: Cluster) -> tuple[Path, bool]:
    """The demo's real node on ``cluster`` (started, or reused when it runs the current image): the
    image export ``make image-build`` made and whether the node was started. Its programs and the
    image are built now if missing (cached: milliseconds). Root only (containerd, runc, network and
    mount namespaces)."""
    if os.geteuid() != 0:
        raise DemoError(
            "the real node runs the kubelet, containerd and runc in network and mount namespaces of their own,"
            " which needs root; without root: python -m localkube.demo up --process-node"
        )
    from localkube.containers import build_image

    bin_dir = realnode.build_binaries()
    image = build_image()
    since = time.time()
    started = realnode.start(cluster, NODE, image.directory, bin_dir)
    if started:
        wait_restarted(Kube.of(cluster), since)
    return image.directory, started


def wait_restarted(kube: Kube, since: float, timeout: float = 90) -> None:
    """A kubelet started anew finds the release's pods bound to the node with their containers gone
    (they went with the node that ran them) and starts them again in place; until it has reported
    that, their status still says Ready, and a rollout would look done. Wait until every pod of the
    release on the node reports containers started since ``since``."""
    floor = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(since)))
    deadline = time.monotonic() + timeout
    while True:
        pods = (kube.get("pods", "-n", RELEASE_NAMESPACE) or {}).get("items", [])
        stale = [
            p["metadata"]["name"]
            for p in pods
            if (p.get("spec") or {}).get("nodeName") == NODE
            and not p["metadata"].get("deletionTimestamp")
            and any(
                "" < str(((c.get("state") or {}).get("running") or {}).get("startedAt") or "") < floor
                for c in (p.get("status") or {}).get("containerStatuses") or []
            )
        ]
        if not stale:
            return
        if time.monotonic() > deadline:
            raise DemoError(f"the real node {NODE} did not start these pods again: {', '.join(stale)}")
        time.sleep(0.5)


def pods_wide(kube: Kube, namespace: str) -> list[str]:
    """What ``kubectl get pods -o wide`` shows of each pod: NAME, STATUS (the phase), IP and NODE."""
    row = "{:<52} {:<10} {:<15} {}"
    pods = (kube.get("pods", "-n", namespace) or {}).get("items", [])
    lines = [row.format("NAME", "STATUS", "IP", "NODE")]
    for p in sorted(pods, key=lambda p: str(p["metadata"]["name"])):
        status = p.get("status") or {}
        fields = (status.get("phase"), status.get("podIP"), (p.get("spec") or {}).get("nodeName"))
        lines.append(row.format(p["metadata"]["name"], *(f or "<none>" for f in fields)))
    return lines


def worker_logs(kube: Kube, namespace: str, name: str) -> str:
    """The worker pods' logs of the ResearchJob ``namespace/name``, as ``kubectl research logs``
    prints them: of the pods that still exist, and of those whose Jobs the operator deleted once
    their results were stored (as it does on any cluster, freeing their quota), the copies the real
    node keeps of their log files (a log collector's part; the process node keeps its files, which
    the plugin reads itself)."""
    try:
        shown = kube.research("logs", name, "-n", namespace).stdout
    except DemoError:  # no worker pod left
        shown = ""
    rj = kube.get("researchjob", name, "-n", namespace)
    kept = realnode.NodeLayout(kube.state_dir / "real-nodes" / NODE).kept_logs
    if rj is None or not kept.is_dir():
        return shown
    created = dt.datetime.fromisoformat(rj["metadata"]["creationTimestamp"]).timestamp()
    listed = {line.split()[2] for line in shown.splitlines() if line.startswith("==> pod ")}
    # A worker pod is <name>-<plan id>-<plan|write|b<batch>>-<5 chars>, its folder <ns>_<pod>_<uid>.
    worker = re.compile(rf"{re.escape(namespace)}_({re.escape(name)}-[0-9a-f]{{6}}-(?:plan|write|b\d+)-[a-z0-9]{{5}})_")
    out = [shown]
    for pod_dir in sorted(kept.iterdir(), key=lambda d: d.stat().st_mtime):
        m = worker.match(pod_dir.name)
        if m is None or m.group(1) in listed or pod_dir.stat().st_mtime < created - 1:
            continue  # another pod, one shown above, or one of an earlier ResearchJob of that name
        pod = m.group(1)
        out.append(f"==> pod {pod} (deleted; its log as the node kept it) <==\n")
        out += [line for f in sorted(pod_dir.glob("*/*.log")) for line in realnode.cri_log_lines(f.read_text())]
    return "".join(out)


def broker_lines(logs: str) -> list[tuple[str, str, str]]:
    """(pod, broker URL, ModelEndpoint) of each worker pod whose log (``kubectl research logs``) says
    the lease broker answered."""
    out, pod = [], ""
    for line in logs.splitlines():
        if line.startswith("==> pod "):
            pod = line.split()[2]
        elif m := BROKER_ANSWERS.search(line):
            out.append((pod, m.group(1), m.group(2)))
    return out


def up(timeout: float = DEFAULT_TIMEOUT, emit: Emit = _say, containers: bool = True) -> int:
    """The demo; ``containers=False`` runs it on the process node (``--process-node``)."""
    started = time.monotonic()

    def step(text: str) -> None:
        emit(f"\n==> [{time.monotonic() - started:5.1f}s] {text}")

    cluster = Cluster()
    step(f"Local control plane (state dir {cluster.state_dir})")
    was_running = cluster.healthy()
    cluster.up()
    emit("    reused the running cluster" if was_running else "    started etcd, the control plane and the node agent")
    kube = Kube.of(cluster)

    placement: dict[str, Any] | None = None
    if containers:
        missing = set(NAMESPACE_PLACEMENT_PLUGINS) - (cluster.admission_plugins() or set(NAMESPACE_PLACEMENT_PLUGINS))
        if missing:
            raise DemoError(
                f"the running API server was started without the {' and '.join(sorted(missing))} admission "
                "plugins (by an older localkube), which place the demo namespace's pods on the real node. "
                "Restart the cluster: make demo-down && make demo"
            )
        step(f"Real node {NODE}: the kubelet and containerd run pods from the image research-operator:0.1.0")
        image_dir, node_started = start_node(cluster)
        emit(f"    {'started' if node_started else 'reused'} the node (kubelet, containerd, kube-proxy, CoreDNS);"
             f" image export {image_dir}")  # fmt: skip
        emit("    each pod gets its own network namespace and an IP of 10.244.0.0/16 (CNI bridge); kube-proxy")
        emit("    routes Services and CoreDNS answers their names")
        emit(f"    (kubectl get node {NODE} -o wide; kubectl logs reads a pod's log through the kubelet)")
        values = container_values(kube)
        placement = PLACEMENT
    else:
        values = local_values(kube)
    step(f"helm upgrade --install {RELEASE} charts/research-operator -n {RELEASE_NAMESPACE} -f {values}")
    emit("    " + values.read_text().split("\n", 2)[2].strip().replace("\n", "\n    "))
    if containers:
        create_namespace(kube, RELEASE_NAMESPACE)  # restricted Pod Security for the release's pods too
    install(kube, values)
    wait_available(kube)
    emit(f"    deployment/{OPERATOR_DEPLOYMENT} and deployment/{MODELSERVER_DEPLOYMENT} are Available")
    if containers:
        emit(f"    kubectl get pods -n {RELEASE_NAMESPACE} -o wide")
        for line in pods_wide(kube, RELEASE_NAMESPACE):
            emit(f"      {line}")

    what = " (restricted Pod Security)"
    if placement is not None:
        what = f" (restricted Pod Security; its pods go to {NODE}, annotation {NODE_SELECTOR_ANNOTATION})"
    step(f"Namespace {DEMO_NAMESPACE}{what}")
    create_namespace(kube, DEMO_NAMESPACE, placement)

    endpoint = endpoint_manifest(model_url(kube))
    step(
        f"kubectl apply -f -   (ModelEndpoint {ENDPOINT}: the chart's model server, at most {ENDPOINT_CAPACITY} calls"
        " at once, each leased from the operator's broker)"
    )
    emit(f"    spec: {json.dumps(endpoint['spec'])}")
    kube.kubectl("apply", "-f", "-", input=json.dumps(endpoint))

    body = load_researchjob()
    name = str(body["metadata"]["name"])
    if kube.get("researchjob", name, "-n", DEMO_NAMESPACE) is not None:
        emit(f"    deleting the previous run's researchjob/{name} and what it owned")
        delete_researchjob(kube, DEMO_NAMESPACE, name)
    args = submit_args(body, DEMO_NAMESPACE, CORPUS_DIR.relative_to(REPO_ROOT))
    step("kubectl research " + " ".join(a if " " not in a else f'"{a}"' for a in args))
    emit(
        f"    (the spec of examples/researchjob.yaml; without the plugin: kubectl create configmap {CORPUS_CONFIGMAP} "
        f"--from-file=examples/corpus/ -n {DEMO_NAMESPACE} && kubectl apply -f examples/researchjob.yaml "
        f"-n {DEMO_NAMESPACE})"
    )
    for line in kube.research(*submit_args(body, DEMO_NAMESPACE)).stdout.splitlines():
        emit(f"    {line}")

    step(f"kubectl research watch {name} -n {DEMO_NAMESPACE}   (or: kubectl get rj {name} -n {DEMO_NAMESPACE} -w)")
    try:
        kube.research("watch", name, "-n", DEMO_NAMESPACE, "--timeout", str(int(timeout)),
                      emit=lambda line: emit(f"    {line}"), timeout=timeout + 60)  # fmt: skip
    except DemoError as e:
        obj = kube.get("researchjob", name, "-n", DEMO_NAMESPACE) or {}
        status = obj.get("status") or {}
        if status.get("phase") == "Failed":
            raise DemoError(_failure(kube, DEMO_NAMESPACE, name, status)) from e
        raise DemoError(f"{e}\n  kubectl describe rj {name} -n {DEMO_NAMESPACE}\n" + _operator_logs(kube)) from e
    obj = kube.get("researchjob", name, "-n", DEMO_NAMESPACE) or {}
    status = obj["status"]
    ref = status["report"]
    step(f"Succeeded: {status.get('progress')} sections, {status.get('tokensUsed', 0)} tokens")
    emit(f"    kubectl research report {name} -n {DEMO_NAMESPACE}   (-o html --output report.html for a web page)")
    emit(f"    or: {report_command(DEMO_NAMESPACE, ref)}")
    emit(f'    (first: eval "$({sys.executable} -m localkube.cli env)")')
    report = kube.research("report", name, "-n", DEMO_NAMESPACE).stdout
    emit("\n" + "-" * 100 + "\n" + report.rstrip() + "\n" + "-" * 100)

    step(f"kubectl research logs {name} -n {DEMO_NAMESPACE} | grep 'lease broker'   (the worker pods' logs)")
    emit("    (the operator deletes each worker Job once its results are stored; the logs of deleted pods are")
    emit("    the copies the local node keeps, as a cluster's log collector would)")
    answered = broker_lines(worker_logs(kube, DEMO_NAMESPACE, name))
    for pod, url, endpoint_name in answered:
        emit(f"    {pod}: lease broker {url} answers: each model call takes a lease of ModelEndpoint {endpoint_name}")
    if not answered:
        emit("    no worker's log says the lease broker answered: no call was leased (see kubectl research logs)")

    step("What this was")
    if containers:
        emit(
            f"    Every pod (operator, model server, workers) ran on {NODE} as a containerd container of the\n"
            "    image built here, on a read-only root, with its own pod IP; the workers called the model at\n"
            f"    {endpoint['spec']['baseUrl']}"
            + (
                f",\n    leased from the broker at {answered[0][1]} (the Service\n"
                "    whose EndpointSlice the operator's leader writes with its own pod IP)."
                if answered
                else "."
            )
        )
    emit(
        "    A real Kubernetes control plane ran the operator from the Helm chart; it planned the analysts,\n"
        "    interviewed them in batch worker Jobs under their parallelism limits, and wrote the report.\n"
        "    The model was the chart's offline model server: deterministic and extractive, it answers with\n"
        "    sentences picked from the documents (no LLM, no network, no API key), so the prose is stilted\n"
        "    but every citation points at a real document. To use a real OpenAI-compatible endpoint (OpenAI,\n"
        "    vLLM, Ollama) set spec.model in the ResearchJob or settings.defaultModelBaseUrl in the chart;\n"
        '    see "Use a real model" in README.md.\n'
        f"    Took {time.monotonic() - started:.0f}s. Stop everything with: make demo-down"
    )
    return 0


def down(emit: Emit = _say, stop_cluster: bool = True) -> int:
    """Uninstall the release, delete the demo namespace, stop the real node and (unless
    ``stop_cluster`` is False) the cluster."""
    cluster = Cluster()
    if not cluster.healthy():
        emit("the local cluster is not running")
        stopped = cluster.down()
        if stopped:
            emit("stopped: " + ", ".join(stopped))
        return 0
    kube = Kube.of(cluster)
    emit(f"helm uninstall {RELEASE} -n {RELEASE_NAMESPACE}: " + ("done" if uninstall(kube) else "was not installed"))
    out = kube.kubectl("delete", "modelendpoint", ENDPOINT, "--ignore-not-found", check=False)
    emit(f"modelendpoint {ENDPOINT}: " + ("deleted" if out.returncode == 0 else out.stderr.strip()))
    out = kube.kubectl("delete", "namespace", DEMO_NAMESPACE, "--ignore-not-found", "--timeout=90s", check=False)
    emit(f"namespace {DEMO_NAMESPACE}: " + ("deleted" if out.returncode == 0 else out.stderr.strip()))
    (kube.state_dir / VALUES_FILE).unlink(missing_ok=True)
    (kube.state_dir / CONTAINER_VALUES_FILE).unlink(missing_ok=True)
    if realnode.stop(cluster):
        emit(f"real node {NODE}: stopped, Node deleted")
    if stop_cluster:
        emit("stopped: " + ", ".join(cluster.down()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localkube.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("command", nargs="?", choices=["up", "down"], default="up")
    parser.add_argument(
        "--process-node",
        action="store_true",
        help="up: run the chart on the process node (pods as host processes on the host network; no root needed)",
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds the ResearchJob may take (default 900)"
    )
    args = parser.parse_args(argv)
    try:
        return up(timeout=args.timeout, containers=not args.process_node) if args.command == "up" else down()
    except DemoError as e:
        sys.stdout.flush()
        sys.stderr.write(f"\ndemo failed: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
