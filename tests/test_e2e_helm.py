"""End to end as a user does it, through the helm and kubectl binaries (issues 6 and 23).

One Helm release (the module's fixture, installed the way ``make demo`` installs it) serves every
test here, in order: the sample ResearchJob of ``examples/`` ends with a cited report; ``helm
upgrade --reuse-values --set settings.globalMaxActiveJobs=1`` reaches the running operator without
a restart; the worker pods hold leases of the chart's broker; an upgrade that replaces the operator
keeps a running ResearchJob going; ``helm uninstall`` removes the release and leaves the CRD and the
users' ResearchJobs, which can still be deleted afterwards with everything they own.

All of it twice (``node``): on the process node (pods as host processes on host ports, the chart's
values as ``make demo --process-node`` writes them, no root) and on the real node (the image built
here run by the kubelet and containerd, pods on their own IPs, workers reaching the model server and
the broker through their Services; marker ``realnode``). On the real node the test reads the
operator's ``/metrics`` and the model server's counters as a user would, through ``kubectl
port-forward``, and the logs through ``kubectl logs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from kubernetes import config as kubeconfig
from kubernetes.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families

from localkube import demo
from localkube.demo import CHART, LEASE, RELEASE, RELEASE_NAMESPACE, Kube
from research_api.researchjob import GROUP, PLURAL, VERSION
from research_operator.actions import kube as operator_kube
from tests.fixtures.cluster import ClusterHandle
from tests.fixtures.realnode import RealNodeHandle
from tests.test_operator_cluster import JobWatch

pytestmark = pytest.mark.cluster

SETTINGS_CONFIGMAP = f"{RELEASE}-settings"
RELEASE_SELECTOR = f"app.kubernetes.io/instance={RELEASE}"
# What every namespace has from the start; anything else in the release namespace is the release's.
NAMESPACE_DEFAULTS = {"configmap/kube-root-ca.crt", "serviceaccount/default"}


@pytest.fixture(scope="module", params=["process_node", pytest.param("real_node", marks=pytest.mark.realnode)])
def node(request: pytest.FixtureRequest) -> RealNodeHandle | None:
    """Where the release and the workers run: None for the process node, else the real node."""
    if request.param == "process_node":
        return None
    real: RealNodeHandle = request.getfixturevalue("real_node")
    assert real.name == demo.NODE  # the node the demo's values place the release on
    return real


@pytest.fixture(scope="module")
def release(cluster: ClusterHandle, no_test_operator: None, node: RealNodeHandle | None) -> Iterator[Kube]:
    """The chart installed into research-operator-system as `make demo` installs it (with
    ``--process-node`` on the process node)."""
    kube = Kube(cluster.kubeconfig, cluster.tools, cluster.state_dir)
    if node is None:
        demo.install(kube, demo.local_values(kube))
    else:
        demo.create_namespace(kube, RELEASE_NAMESPACE)  # restricted Pod Security for the release's pods too
        demo.install(kube, demo.container_values(kube))
    demo.wait_available(kube)
    yield kube
    demo.uninstall(kube)


@pytest.fixture(scope="module")
def user_namespace(release: Kube, node: RealNodeHandle | None) -> Iterator[str]:
    """A namespace like research-demo: restricted Pod Security, the example documents; on the real
    node, its pods go there (the namespace's node selector and tolerations)."""
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    demo.create_namespace(release, name, None if node is None else demo.PLACEMENT)
    demo.apply_corpus(release, name)
    yield name
    release.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


def sample_researchjob(**spec: Any) -> dict[str, Any]:
    """examples/researchjob.yaml, with one expert answer per interview to keep the run short."""
    body = demo.load_researchjob()
    body["spec"]["interview"]["maxTurns"] = 1
    body["spec"].update(spec)
    return body


@dataclass
class Run:
    namespace: str
    name: str
    obj: dict[str, Any]


@pytest.fixture(scope="module")
def sample_run(release: Kube, user_namespace: str) -> Run:
    body = sample_researchjob()
    name = demo.apply_researchjob(release, user_namespace, body)
    obj = demo.follow(release, user_namespace, name, timeout=300, emit=lambda _: None)
    return Run(user_namespace, name, obj)


def kubectl_get_rj(kube: Kube, namespace: str, name: str) -> list[str]:
    """The row of `kubectl get rj` for that ResearchJob, split into columns."""
    out = kube.kubectl("get", "rj", "-n", namespace).stdout.splitlines()
    assert out[0].split()[:4] == ["NAME", "PHASE", "PROGRESS", "ACTIVE"], out[0]
    return next(line.split() for line in out[1:] if line.split()[0] == name)


def test_the_sample_researchjob_ends_with_a_cited_report(release: Kube, sample_run: Run) -> None:
    status = sample_run.obj["status"]
    assert status["phase"] == "Succeeded", status
    assert status["progress"] == "4/4" and status["sectionsDone"] == 4
    assert kubectl_get_rj(release, sample_run.namespace, sample_run.name)[1:3] == ["Succeeded", "4/4"]

    # Read where status.report points, with the command the demo prints.
    ref = status["report"]
    assert ref["key"] == "report.md"
    command = demo.report_command(sample_run.namespace, ref)
    assert command == (
        f"kubectl get configmap {ref['configMap']} -n {sample_run.namespace} -o jsonpath='{{.data.report\\.md}}'"
    )
    report = demo.read_report(release, sample_run.namespace, sample_run.obj)

    title = report.splitlines()[0]
    assert title.startswith("# ") and len(title) > 10, title
    assert ref["title"] and ref["title"] in title
    for heading in ("## Introduction", "## Conclusion", "## Sources"):
        assert heading in report, heading
    body, _, sources = report.partition("## Sources")
    cited = {int(n) for n in re.findall(r"\[(\d+)\]", body)}
    listed = dict(re.findall(r"^\[(\d+)\]\s+(\S+)", sources, re.M))
    assert cited, "the report cites no source"
    assert cited <= {int(n) for n in listed}, (cited, listed)
    corpus = {p.name for p in demo.CORPUS_DIR.glob("*.md")}
    assert set(listed.values()) <= corpus, listed


def test_helm_upgrade_changes_the_global_cap_on_the_running_operator(release: Kube, user_namespace: str) -> None:
    before = demo.operator_pod(release)
    release.helm(
        "upgrade", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE,
        "--reuse-values", "--set", "settings.globalMaxActiveJobs=1",
    )  # fmt: skip
    try:
        settings = release.get("configmap", SETTINGS_CONFIGMAP, "-n", RELEASE_NAMESPACE)
        assert settings is not None and settings["data"]["globalMaxActiveJobs"] == "1"
        pod = before["metadata"]["name"]
        deadline = time.monotonic() + 60
        while "globalMaxActiveJobs=1" not in release.pod_log(RELEASE_NAMESPACE, pod):
            assert time.monotonic() < deadline, (
                f"the operator never logged the new cap: {release.pod_log_paths(RELEASE_NAMESPACE, pod)}"
            )
            time.sleep(0.5)
        after = demo.operator_pod(release)
        assert after["metadata"]["uid"] == before["metadata"]["uid"], "the operator pod was replaced"
        restarts = [c["restartCount"] for c in after["status"]["containerStatuses"]]
        assert restarts == [c["restartCount"] for c in before["status"]["containerStatuses"]]

        from kubernetes import config

        jobs = JobWatch(config.new_client_from_config(config_file=str(release.kubeconfig)), user_namespace)
        jobs.start()
        jobs.ready.wait(5)
        body = sample_researchjob(analysts={"count": 6}, parallelism={"batchSize": 2, "maxActiveJobs": 3})
        body["metadata"]["name"] = "capped"
        demo.apply_researchjob(release, user_namespace, body)
        rows: list[str] = []
        obj = demo.follow(release, user_namespace, "capped", timeout=400, emit=rows.append)
        jobs.stop()
    finally:
        release.helm(
            "upgrade", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE,
            "--reuse-values", "--set", "settings.globalMaxActiveJobs=0",
        )  # fmt: skip
    assert obj["status"]["progress"] == "6/6"
    assert kubectl_get_rj(release, user_namespace, "capped")[1:3] == ["Succeeded", "6/6"]
    assert jobs.max_active_interviews == 1, f"interview Jobs at once: {jobs.max_active_interviews}"
    # Three batches were allowed by the ResearchJob; the cap made the others visibly wait.
    assert any(re.search(r"1 batch Jobs running, [12] waiting", row) for row in rows), "\n".join(rows)


LEASES_SERVICE = f"{RELEASE}-leases"
OPERATOR_SA = f"system:serviceaccount:{RELEASE_NAMESPACE}:{RELEASE}"  # the chart's ServiceAccount


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of one series name in a Prometheus exposition: (labels, value)."""
    return [(s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def metric(text: str, name: str, **labels: str) -> float:
    """One sample, 0 when the series is not there (yet)."""
    return next((v for lab, v in samples(text, name) if lab == labels), 0.0)


class MetricsWatch(threading.Thread):
    """Polls the operator's /metrics (as Prometheus would) and keeps the highest value of gauges."""

    def __init__(self, url: str, endpoint: str, families: tuple[str, ...]) -> None:
        super().__init__(daemon=True)
        self.url, self.endpoint, self.families = url, endpoint, families
        self.peak = dict.fromkeys(families, 0.0)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            try:
                text = httpx.get(self.url, timeout=5).text
            except httpx.HTTPError:
                continue
            for family in self.families:
                self.peak[family] = max(self.peak[family], metric(text, family, endpoint=self.endpoint))


def test_worker_pods_hold_leases_from_the_charts_broker(
    release: Kube, user_namespace: str, node: RealNodeHandle | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease broker as the chart runs it: in the operator pod, as the chart's ServiceAccount and
    under the chart's RBAC only. A ModelEndpoint of capacity 1 is declared for the release's offline
    model server; the worker pods of a ResearchJob (planner, two interview pods, writer) hold a
    session with the broker and take a lease for every model call, which the broker grants only
    after a TokenReview of the pod's projected token for the audience researchops.io/lease-broker:
    a TokenReview the chart's ClusterRole must allow, or every request is answered 503 and the
    workers fall back to their ConfigMap shares (then no lease is granted: checked by running this
    with `tokenreviews` taken out of the ClusterRole, which fails with 0 leases for 12 calls).

    The broker's Service: on the real node the leader writes its EndpointSlice with its own pod IP,
    and the workers reach the broker and the model server at their Services' DNS names. On the
    process node the pods' IP is 127.0.0.1, which the API server refuses in an EndpointSlice, so the
    leader writes none and says why, and workers use the loopback URLs of the chart's local values;
    what the leader does on a real cluster (``point_service_at``) is then done with the operator's
    own code as the chart's ServiceAccount: the chart's Role allows exactly that, the API server
    accepts the slice, and the slice is owned by the Service (``helm uninstall`` removes it, checked
    below). On both, the Role allows no other Service.
    """
    values = json.loads(release.helm("get", "values", RELEASE, "-n", RELEASE_NAMESPACE, "--all", "-o", "json").stdout)
    broker_port = int(values["operator"]["leaseBroker"]["port"])
    model_url = demo.model_url(release)  # what the workers call
    pod = demo.operator_pod(release)
    assert pod["spec"]["serviceAccountName"] == RELEASE

    capacity = 1
    endpoint = f"chart-{uuid.uuid4().hex[:6]}"
    manifest = {
        "apiVersion": "researchops.io/v1alpha1",
        "kind": "ModelEndpoint",
        "metadata": {"name": endpoint},
        "spec": {"baseUrl": model_url, "maxConcurrentRequests": capacity},
    }
    release.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    with contextlib.ExitStack() as forwards:
        # How the host reaches the model server's counters and the operator's /metrics.
        if node is None:
            host_model_url, metrics_url = model_url, f"http://127.0.0.1:{values['operator']['metricsPort']}/metrics"
        else:
            url = httpx.URL(model_url)
            assert url.host == f"{demo.MODELSERVER_DEPLOYMENT}.{RELEASE_NAMESPACE}.svc", model_url
            service = f"service/{demo.MODELSERVER_DEPLOYMENT}"
            local = forwards.enter_context(release.port_forward(RELEASE_NAMESPACE, service, int(url.port or 80)))
            host_model_url = f"http://127.0.0.1:{local}{url.path.rstrip('/')}"
            operator = f"pod/{pod['metadata']['name']}"
            local = forwards.enter_context(
                release.port_forward(RELEASE_NAMESPACE, operator, values["operator"]["metricsPort"])
            )
            metrics_url = f"http://127.0.0.1:{local}/metrics"
        httpx.post(f"{host_model_url}/offline/stats/reset", timeout=10).raise_for_status()
        families = ("research_operator_endpoint_pods_in_touch", "research_operator_endpoint_leases_in_flight")
        watch = MetricsWatch(metrics_url, endpoint, families)
        watch.start()
        started = time.monotonic()
        try:
            body = sample_researchjob(analysts={"count": 2}, parallelism={"batchSize": 1, "maxActiveJobs": 2})
            body["metadata"]["name"] = "leased"
            demo.apply_researchjob(release, user_namespace, body)
            obj = demo.follow(release, user_namespace, "leased", timeout=300, emit=lambda _: None)
        finally:
            watch.done.set()
            watch.join()
            release.kubectl("delete", "modelendpoint", endpoint, "--ignore-not-found", check=False)
        took = time.monotonic() - started
        assert obj["status"]["progress"] == "2/2", obj["status"]
        stats = httpx.get(f"{host_model_url}/offline/stats", timeout=10).json()
        text = httpx.get(metrics_url, timeout=10).text

    granted = metric(text, "research_operator_endpoint_leases_granted_total", endpoint=endpoint)
    # Every model call the server answered was made under a lease, never more than the capacity at once.
    assert stats["total"] > 0 and granted >= stats["total"], (granted, stats, f"{took:.0f}s")
    assert stats["max_running"] <= capacity, stats
    assert watch.peak["research_operator_endpoint_pods_in_touch"] >= 1, watch.peak
    assert watch.peak["research_operator_endpoint_leases_in_flight"] <= capacity, watch.peak
    # The broker verified every request: no refusal, no failed TokenReview (503).
    codes = {(lab["path"], lab["code"]) for lab, _ in samples(text, "research_operator_lease_broker_requests_total")}
    assert ("/v1/heartbeat", "200") in codes and ("/v1/acquire", "200") in codes, codes
    assert not [c for c in codes if c[1] in ("401", "403", "503")], codes
    log = release.pod_log(RELEASE_NAMESPACE, pod["metadata"]["name"])
    assert "TokenReview failed" not in log and "refused a request" not in log
    # The workers' logs say where the broker answered.
    # Also of the pods deleted with their Jobs once their results were stored (the nodes' kept logs).
    workers = demo.worker_logs(release, user_namespace, "leased")
    broker_host = "127.0.0.1" if node is None else f"{LEASES_SERVICE}.{RELEASE_NAMESPACE}.svc"
    assert f"lease broker https://{broker_host}:{broker_port} answers" in workers, workers[-3000:]
    assert "falling back to this pod's share" not in workers

    # The broker's Service, and the EndpointSlice the leader writes for it.
    service = release.get("service", LEASES_SERVICE, "-n", RELEASE_NAMESPACE)
    assert service is not None and not service["spec"].get("selector"), service
    assert [p["port"] for p in service["spec"]["ports"]] == [broker_port]
    if node is not None:
        ip = pod["status"]["podIP"]
        assert ip.startswith("10.244."), ip
        written = release.get("endpointslice", LEASES_SERVICE, "-n", RELEASE_NAMESPACE)
        assert written is not None, log[-3000:]
        assert [e["addresses"] for e in written["endpoints"]] == [[ip]]
    else:
        assert pod["status"]["podIP"] == "127.0.0.1"
        assert "this pod's IP 127.0.0.1 is a loopback address, which an EndpointSlice cannot hold" in log
        assert release.get("endpointslice", LEASES_SERVICE, "-n", RELEASE_NAMESPACE) is None
    # As the chart's ServiceAccount, with the operator's own code: on the process node, what the
    # leader does on a real cluster (create, then update as a new leader does: a 409, then a PUT
    # without resourceVersion); on both, no other Service: the Role names the one.
    api = kubeconfig.new_client_from_config(config_file=str(release.kubeconfig))
    api.set_default_header("Impersonate-User", OPERATOR_SA)
    monkeypatch.setattr(operator_kube, "_api", api)
    if node is None:
        for ip in ("192.0.2.10", "192.0.2.11"):  # documentation addresses: nothing serves them, nothing calls them
            asyncio.run(operator_kube.point_service_at(RELEASE_NAMESPACE, LEASES_SERVICE, ip, broker_port))
        written = release.get("endpointslice", LEASES_SERVICE, "-n", RELEASE_NAMESPACE)
        assert written is not None
        assert [e["addresses"] for e in written["endpoints"]] == [["192.0.2.11"]]
    assert [p["port"] for p in written["ports"]] == [broker_port]
    assert written["metadata"]["labels"]["kubernetes.io/service-name"] == LEASES_SERVICE
    assert [o["uid"] for o in written["metadata"]["ownerReferences"]] == [service["metadata"]["uid"]]
    with pytest.raises(ApiException) as refused:
        asyncio.run(operator_kube.point_service_at(RELEASE_NAMESPACE, "someone-else", "192.0.2.10", broker_port))
    assert refused.value.status == 403, refused.value


@dataclass
class Uninstalled:
    kube: Kube
    operator_pods: list[str]


@pytest.fixture(scope="module")
def uninstalled(release: Kube, sample_run: Run) -> Uninstalled:
    pods = release.names("pods", "-n", RELEASE_NAMESPACE, "-l", RELEASE_SELECTOR)
    assert pods, "the release runs no pods before the uninstall"
    out = release.helm("uninstall", RELEASE, "-n", RELEASE_NAMESPACE, "--wait=watcher", "--timeout=120s")
    assert f'release "{RELEASE}" uninstalled' in out.stdout, out.stdout
    deadline = time.monotonic() + 90
    while release.names("pods", "-n", RELEASE_NAMESPACE, "-l", RELEASE_SELECTOR):
        assert time.monotonic() < deadline, "the release's pods are still there 90s after helm uninstall"
        time.sleep(1)
    return Uninstalled(release, pods)


def test_helm_upgrade_that_replaces_the_operator_keeps_a_running_researchjob_going(
    release: Kube, user_namespace: str
) -> None:
    """An upgrade that changes the operator's pod (here its log level) while a ResearchJob has
    worker Jobs running: the old operator goes, the new one takes over, and the ResearchJob ends
    with every section stored."""
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=str(release.kubeconfig))
    custom = client.CustomObjectsApi(api)
    body = sample_researchjob(analysts={"count": 4}, parallelism={"batchSize": 1, "maxActiveJobs": 2})
    body["metadata"]["name"] = "upgraded"
    demo.apply_researchjob(release, user_namespace, body)
    deadline = time.monotonic() + 180
    while True:  # mid-flight: interviews running
        st = custom.get_namespaced_custom_object(GROUP, VERSION, user_namespace, PLURAL, "upgraded").get("status") or {}
        if (st.get("batches") or {}).get("active"):
            break
        assert time.monotonic() < deadline and st.get("phase") not in ("Succeeded", "Failed"), st
        time.sleep(0.3)
    before = demo.operator_pod(release)
    release.helm(
        "upgrade", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE,
        "--reuse-values", "--set", "operator.logLevel=debug", "--wait", "--timeout", "180s",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while release.get("pod", before["metadata"]["name"], "-n", RELEASE_NAMESPACE) is not None:
            assert time.monotonic() < deadline, "the upgrade did not replace the operator pod"
            time.sleep(0.5)
        after = demo.operator_pod(release)
        assert after["metadata"]["uid"] != before["metadata"]["uid"]
        obj = demo.follow(release, user_namespace, "upgraded", timeout=400, emit=lambda _: None)
    finally:
        release.helm(
            "upgrade", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE,
            "--reuse-values", "--set", "operator.logLevel=info", "--wait", "--timeout", "180s",
        )  # fmt: skip
    assert obj["status"]["phase"] == "Succeeded" and obj["status"]["progress"] == "4/4", obj["status"]
    # Nothing was lost in the handover: a stored section for each of the four analysts.
    selector = "researchops.io/job=upgraded,researchops.io/kind=section"
    cms = release.get("configmaps", "-n", user_namespace, "-l", selector)
    assert cms is not None and len(cms["items"]) == 4, [c["metadata"]["name"] for c in (cms or {}).get("items", [])]


def test_helm_uninstall_removes_the_release_and_keeps_the_crd_and_researchjobs(
    uninstalled: Uninstalled, sample_run: Run
) -> None:
    kube = uninstalled.kube
    assert kube.helm("status", RELEASE, "-n", RELEASE_NAMESPACE, check=False).returncode != 0
    assert RELEASE not in kube.helm("list", "-n", RELEASE_NAMESPACE, "-q").stdout.split()

    # Nothing of the release is left: namespaced or cluster-wide, by label and by name.
    left = set(kube.names("deployments,services,configmaps,serviceaccounts,roles,rolebindings,pods",
                          "-n", RELEASE_NAMESPACE))  # fmt: skip
    assert left <= NAMESPACE_DEFAULTS, left - NAMESPACE_DEFAULTS
    # Also the lease broker's EndpointSlice, which the leader (not helm) writes: owned by its Service.
    deadline = time.monotonic() + 60
    while slices := kube.names("endpointslices", "-n", RELEASE_NAMESPACE):
        assert time.monotonic() < deadline, f"still there 60s after helm uninstall: {slices}"
        time.sleep(1)
    assert not kube.names("clusterroles,clusterrolebindings", "-l", RELEASE_SELECTOR)
    for kind in ("clusterrole", "clusterrolebinding"):
        assert kube.get(kind, RELEASE) is None, f"{kind}/{RELEASE} is still there"

    # Helm never deletes CRDs from crds/, so the API and the users' ResearchJobs stay as they were.
    assert kube.get("crd", "researchjobs.researchops.io") is not None
    ns, name = sample_run.namespace, sample_run.name
    assert kubectl_get_rj(kube, ns, name)[1:3] == ["Succeeded", "4/4"]
    assert "## Sources" in demo.read_report(kube, ns, sample_run.obj)
    owned = f"researchops.io/job={name}"
    children = set(kube.names("configmaps,serviceaccounts,roles,rolebindings", "-n", ns, "-l", owned))
    assert f"configmap/{sample_run.obj['status']['report']['configMap']}" in children
    worker = f"{name}-worker-{sample_run.obj['metadata']['uid'][:8]}"
    assert {f"serviceaccount/{worker}", f"role.rbac.authorization.k8s.io/{worker}"} <= children, children

    # No finalizer holds it: deleting works without the operator, and the garbage collector
    # removes everything the ResearchJob owned. The user's documents stay.
    kube.kubectl("delete", "rj", name, "-n", ns, "--timeout=60s")
    assert kube.get("rj", name, "-n", ns) is None
    deadline = time.monotonic() + 60
    while left := kube.names("jobs,pods,configmaps,serviceaccounts,roles,rolebindings", "-n", ns, "-l", owned):
        assert time.monotonic() < deadline, f"still there 60s after deleting the ResearchJob: {left}"
        time.sleep(1)
    assert kube.get("configmap", demo.CORPUS_CONFIGMAP, "-n", ns) is not None


def test_helm_uninstall_leaves_no_leader_lease(uninstalled: Uninstalled) -> None:
    lease = uninstalled.kube.get("lease", LEASE, "-n", RELEASE_NAMESPACE)
    holder = (lease or {}).get("spec", {}).get("holderIdentity")
    assert lease is None, f"lease/{LEASE} (held by {holder}) outlived helm uninstall"
