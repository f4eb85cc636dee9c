"""End to end as a user does it, through the helm and kubectl binaries (issue 6).

One Helm release (the module's fixture, installed the way ``make demo`` installs it) serves every
test here, in order: the sample ResearchJob of ``examples/`` ends with a cited report; ``helm
upgrade --reuse-values --set settings.globalMaxActiveJobs=1`` reaches the running operator without
a restart; ``helm uninstall`` removes the release and leaves the CRD and the users' ResearchJobs,
which can still be deleted afterwards with everything they own.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from localkube import demo
from localkube.demo import CHART, LEASE, RELEASE, RELEASE_NAMESPACE, Kube
from tests.fixtures.cluster import ClusterHandle
from tests.test_operator_cluster import JobWatch

pytestmark = pytest.mark.cluster

SETTINGS_CONFIGMAP = f"{RELEASE}-settings"
RELEASE_SELECTOR = f"app.kubernetes.io/instance={RELEASE}"
# What every namespace has from the start; anything else in the release namespace is the release's.
NAMESPACE_DEFAULTS = {"configmap/kube-root-ca.crt", "serviceaccount/default"}


@pytest.fixture(scope="module")
def release(cluster: ClusterHandle, no_test_operator: None) -> Iterator[Kube]:
    """The chart installed into research-operator-system as `make demo` installs it."""
    kube = Kube(cluster.kubeconfig, cluster.tools, cluster.state_dir)
    demo.install(kube, demo.local_values(kube))
    demo.wait_available(kube)
    yield kube
    demo.uninstall(kube)


@pytest.fixture(scope="module")
def user_namespace(release: Kube) -> Iterator[str]:
    """A namespace like research-demo: restricted Pod Security, the example documents."""
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    demo.create_namespace(release, name)
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
