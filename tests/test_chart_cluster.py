"""The Helm chart against the real API server of the local cluster.

Every rendered manifest is accepted by ``kubectl apply --dry-run=server`` in a namespace that
enforces the restricted Pod Security level, and so is a Pod made from each Deployment's template
(Pod Security is enforced on Pods; for Deployments it would only warn). The chart's RBAC, applied
for real, lets the operator's ServiceAccount create what the operator creates (the worker Role
passes the API server's escalation check) and nothing more.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from research_api.researchjob import ResearchJobSpec
from research_api.task import Step
from research_operator.decisions.manifests import Owner, worker_job, worker_network_policy, worker_rbac
from research_operator.settings import Settings
from tests.fixtures.cluster import ClusterHandle

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "research-operator"

ALL_ON = [
    "--set", "postgres.createSecret=true",
    "--set", "postgres.existingSecret=research-postgres",
    "--set", "postgres.dsn=postgresql://research:pw@db:5432/research",
    "--set", "modelServer.apiKeySecret.name=modelserver-key",
    "--set", "operator.logLevel=debug",
    "--set", "operator.replicaCount=2",
    "--set", "kueue.queueName=research",
    "--set", "settings.globalMaxActiveJobs=10",
    "--set", "settings.namespaceMaxActiveJobs=3",
]  # fmt: skip
LOCAL_MODE = [
    "--set", "operator.metricsPort=18080",
    "--set", "operator.healthPort=18081",
    "--set", "operator.leaseBroker.port=18090",
    "--set", "operator.leaseBroker.url=http://127.0.0.1:18090",
    "--set", "modelServer.port=18000",
    "--set", "modelServer.baseUrl=http://127.0.0.1:18000/v1",
]  # fmt: skip


@pytest.fixture(scope="module")
def chart_crd(cluster: ClusterHandle) -> None:
    """The chart's CRD, applied server-side as `helm install` would create it."""
    crds = CHART / "crds"
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crds))
    cluster.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/researchjobs.researchops.io",
        "crd/modelendpoints.researchops.io",
    )


def render(cluster: ClusterHandle, release: str, namespace: str, *args: str) -> str:
    out = subprocess.run(
        [str(cluster.tools / "helm"), "template", release, str(CHART), "--namespace", namespace, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def docs_of(manifest: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(manifest) if d]


def dry_run(cluster: ClusterHandle, manifest: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl("apply", "--dry-run=server", "-o", "name", "-f", "-", *extra, input=manifest, check=False)


@pytest.mark.parametrize(
    "args", [[], ["--set", "modelServer.enabled=false", "--set", "settings.defaultModelBaseUrl=https://example.com/v1"],
             ALL_ON, LOCAL_MODE],
    ids=["defaults", "no-modelserver", "all-on", "local-mode"],
)  # fmt: skip
def test_every_rendered_manifest_is_accepted_by_the_api_server(
    cluster: ClusterHandle, chart_crd: None, namespace: str, args: list[str]
) -> None:
    release = f"ro-{uuid.uuid4().hex[:6]}"
    manifest = render(cluster, release, namespace, *args)
    docs = docs_of(manifest)
    out = dry_run(cluster, manifest)
    assert out.returncode == 0, out.stderr
    accepted = set(out.stdout.split())
    for d in docs:
        group = d["apiVersion"].rpartition("/")[0]
        kind = d["kind"].lower() + (f".{group}" if group else "")
        assert f"{kind}/{d['metadata']['name']}" in accepted, (kind, d["metadata"]["name"], accepted)
    assert "Warning" not in out.stderr, out.stderr


def test_pods_of_every_deployment_pass_restricted_pod_security(
    cluster: ClusterHandle, chart_crd: None, namespace: str
) -> None:
    release = f"ro-{uuid.uuid4().hex[:6]}"
    docs = docs_of(render(cluster, release, namespace, *ALL_ON))
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert len(deployments) == 2
    # A Pod is admitted only with an existing ServiceAccount (the namespace goes after the test).
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(next(d for d in docs if d["kind"] == "ServiceAccount")))
    for d in deployments:
        template = d["spec"]["template"]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": d["metadata"]["name"],
                "namespace": namespace,
                "labels": template["metadata"]["labels"],
            },
            "spec": template["spec"],
        }
        out = dry_run(cluster, json.dumps(pod))
        assert out.returncode == 0, f"{d['metadata']['name']}: {out.stderr}"
    # The check has teeth: the same Pod with a privileged container is refused.
    bad = json.loads(json.dumps(pod))
    bad["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    out = dry_run(cluster, json.dumps(bad))
    assert out.returncode != 0 and "violates PodSecurity" in out.stderr, out.stderr


@pytest.fixture
def operator_rbac(cluster: ClusterHandle, chart_crd: None, namespace: str) -> Iterator[str]:
    """The chart's ServiceAccount and RBAC applied for real; yields the ServiceAccount's user name."""
    release = f"ro-{uuid.uuid4().hex[:6]}"
    docs = [
        d
        for d in docs_of(render(cluster, release, namespace))
        if d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
    ]
    manifest = yaml.safe_dump_all(docs)
    cluster.kubectl("apply", "-f", "-", input=manifest)
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")["metadata"]["name"]
    try:
        yield f"system:serviceaccount:{namespace}:{sa}"
    finally:
        cluster.kubectl("delete", "--ignore-not-found", "-f", "-", input=manifest, check=False)


def test_operator_rbac_lets_it_create_worker_rbac_and_jobs(
    cluster: ClusterHandle, namespace: str, operator_rbac: str
) -> None:
    owner = Owner(namespace, "demo", str(uuid.uuid4()))
    # For real, in the test namespace: the RoleBinding's escalation check looks the Role up. The
    # Role grants ConfigMap writes and ResearchJob reads, and the API server lets the operator
    # create it only because it holds those permissions itself. (Without their owner, which does
    # not exist here, the garbage collector would delete them at once: drop the ownerReference.)
    spec = ResearchJobSpec.model_validate({"topic": "Kubernetes operators", "sources": [{"type": "wikipedia"}]})
    for obj in worker_rbac(owner, spec, "p1"):
        obj["metadata"] = {k: v for k, v in obj["metadata"].items() if k != "ownerReferences"}
        out = create_as(cluster, operator_rbac, obj)
        assert out.returncode == 0, f"{obj['kind']}: {out.stderr}"
    # A new plan's names replace the Role's (an update, which the same escalation check allows).
    role = next(o for o in worker_rbac(owner, spec, "p2") if o["kind"] == "Role")
    role["metadata"] = {k: v for k, v in role["metadata"].items() if k != "ownerReferences"}
    out = cluster.kubectl("replace", f"--as={operator_rbac}", "-f", "-", input=json.dumps(role), check=False)
    assert out.returncode == 0, out.stderr
    job = worker_job(owner, spec, Settings(), "p1", Step.PLAN)
    out = create_as(cluster, operator_rbac, job, dry_run=True)
    assert out.returncode == 0, out.stderr
    # Without the chart's RBAC the same requests are refused: the check has teeth.
    out = create_as(cluster, f"system:serviceaccount:{namespace}:default", job, dry_run=True)
    assert out.returncode != 0 and "forbidden" in out.stderr, out.stderr


def create_as(
    cluster: ClusterHandle, user: str, obj: dict[str, Any], dry_run: bool = False
) -> subprocess.CompletedProcess[str]:
    """A POST as `user`, like the operator's creates (kubectl apply would GET first)."""
    flags = ["--dry-run=server"] if dry_run else []
    return cluster.kubectl("create", *flags, f"--as={user}", "-f", "-", input=json.dumps(obj), check=False)


def can_i(cluster: ClusterHandle, user: str, *args: str) -> bool:
    out = cluster.kubectl("auth", "can-i", f"--as={user}", *args, check=False)
    return out.stdout.strip() == "yes"


def test_operator_rbac_allows_its_watches_and_nothing_more(
    cluster: ClusterHandle, namespace: str, operator_rbac: str
) -> None:
    allowed = [
        ("watch", "researchjobs.researchops.io", "-A"),
        ("patch", "researchjobs.researchops.io/status", "-n", "team-a"),
        ("delete", "researchjobs.researchops.io", "-n", "team-a"),
        ("watch", "jobs.batch", "-A"),
        ("watch", "configmaps", "-A"),
        ("watch", "resourcequotas", "-A"),
        ("watch", "customresourcedefinitions.apiextensions.k8s.io"),
        ("watch", "modelendpoints.researchops.io"),
        ("patch", "modelendpoints.researchops.io", "--subresource=status"),
        ("create", "configmaps", "-n", "team-a"),  # the endpoint-shares ConfigMap its pods poll
        ("create", "events", "-n", "team-a"),
        # the Lease is named after the release's fullname, which is also the ServiceAccount's name
        ("update", f"leases.coordination.k8s.io/{operator_rbac.rsplit(':', 1)[1]}-leader", "-n", namespace),
        ("create", "tokenreviews.authentication.k8s.io"),  # the lease broker checks worker pods' tokens
        ("create", "endpointslices.discovery.k8s.io", "-n", namespace),  # its Service's one slice
        ("update", f"endpointslices.discovery.k8s.io/{operator_rbac.rsplit(':', 1)[1]}-leases", "-n", namespace),
        ("get", f"services/{operator_rbac.rsplit(':', 1)[1]}-leases", "-n", namespace),  # the slice's owner
        # whether the admission policy that checks authors is in force: its own policy and binding
        ("get", f"validatingadmissionpolicies.admissionregistration.k8s.io/{operator_rbac.rsplit(':', 1)[1]}-tenancy"),
        (
            "get",
            f"validatingadmissionpolicybindings.admissionregistration.k8s.io/{operator_rbac.rsplit(':', 1)[1]}-tenancy",
        ),
    ]
    denied = [
        ("get", "secrets", "-n", "team-a"),
        ("list", "secrets", "-A"),
        ("create", "pods", "-n", "team-a"),
        ("create", "pods/exec", "-n", "team-a"),
        ("delete", "configmaps", "-n", "team-a"),
        ("update", "researchjobs.researchops.io", "-n", "team-a"),
        ("create", "modelendpoints.researchops.io"),  # admins declare endpoints; the operator only reads them
        ("patch", "modelendpoints.researchops.io"),
        ("create", "clusterroles.rbac.authorization.k8s.io"),
        ("delete", "namespaces"),
        ("create", "leases.coordination.k8s.io", "-n", namespace),  # the chart creates the one Lease
        ("create", "leases.coordination.k8s.io", "-n", "kube-system"),
        ("update", "leases.coordination.k8s.io/someone-else", "-n", namespace),
        ("update", "endpointslices.discovery.k8s.io/someone-else", "-n", namespace),
        ("create", "endpointslices.discovery.k8s.io", "-n", "team-a"),
        ("get", "services/someone-else", "-n", namespace),
        ("list", "services", "-n", namespace),
        ("get", "validatingadmissionpolicybindings.admissionregistration.k8s.io/someone-else"),
        ("list", "validatingadmissionpolicybindings.admissionregistration.k8s.io"),
        (
            "delete",
            f"validatingadmissionpolicybindings.admissionregistration.k8s.io/{operator_rbac.rsplit(':', 1)[1]}-tenancy",
        ),
    ]
    for args in allowed:
        assert can_i(cluster, operator_rbac, *args), f"operator cannot {args}"
    for args in denied:
        assert not can_i(cluster, operator_rbac, *args), f"operator can {args}"


@pytest.fixture
def people_rbac(cluster: ClusterHandle, chart_crd: None, namespace: str) -> Iterator[str]:
    """The chart's roles for people applied for real, the platform admins being the group
    "platform-team"; yields the release's fullname."""
    release = f"ro-{uuid.uuid4().hex[:6]}"
    docs = [
        d
        for d in docs_of(render(cluster, release, namespace, "--set", "rbac.platformAdmins.groups={platform-team}"))
        if d["metadata"]["name"].endswith(("-view", "-edit", "-platform-admin"))
    ]
    assert {d["kind"] for d in docs} == {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}, docs
    manifest = yaml.safe_dump_all(docs)
    cluster.kubectl("apply", "-f", "-", input=manifest)
    try:
        yield f"{release}-research-operator"
    finally:
        cluster.kubectl("delete", "--ignore-not-found", "-f", "-", input=manifest, check=False)


def test_default_roles_grant_researchjobs_by_aggregation_and_only_platform_admins_declare_endpoints(
    cluster: ClusterHandle, namespace: str, people_rbac: str
) -> None:
    # The tenant recipe of docs/security.md: Kubernetes' own roles, bound in the tenant's namespace.
    for user, role in (("alice", "edit"), ("bob", "view"), ("dana", "admin")):
        binding = f"{user}-{role}"
        cluster.kubectl("create", "rolebinding", binding, f"--clusterrole={role}", f"--user={user}", "-n", namespace)
    rj = "researchjobs.researchops.io"

    expected = {
        ("alice", "create", rj, "-n", namespace): True,
        ("alice", "patch", rj, "-n", namespace): True,  # approving a review is a patch of the spec
        ("alice", "delete", rj, "-n", namespace): True,
        ("dana", "create", rj, "-n", namespace): True,
        ("bob", "list", rj, "-n", namespace): True,
        ("bob", "get", f"{rj}/status", "-n", namespace): True,
        ("bob", "create", rj, "-n", namespace): False,
        ("bob", "delete", rj, "-n", namespace): False,
        ("alice", "list", rj, "-n", "kube-system"): False,  # their namespace only
        # Tenants never declare endpoints (the caps live in the operator's namespace, not theirs).
        ("alice", "create", "modelendpoints.researchops.io"): False,
        ("dana", "create", "modelendpoints.researchops.io"): False,
    }

    def wrong() -> dict[tuple[str, ...], bool]:
        answers = {ask: can_i(cluster, ask[0], *ask[1:]) for ask in expected}
        return {ask: got for ask, got in answers.items() if got != expected[ask]}

    # The ClusterRole aggregation controller fills view/edit/admin shortly after the roles appear.
    deadline = time.monotonic() + 60
    while (differ := wrong()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not differ, f"these answers differ from the recipe: {differ}"

    admin = ["--as=carol", "--as-group=platform-team"]
    for ask in (
        ("create", "modelendpoints.researchops.io"),
        ("delete", "modelendpoints.researchops.io"),
        ("list", rj, "-A"),
        ("list", "jobs.batch", "-A"),
        ("list", "resourcequotas", "-A"),
        ("patch", f"configmaps/{people_rbac}-settings", "-n", namespace),
    ):
        out = cluster.kubectl("auth", "can-i", *admin, *ask, check=False)
        assert out.stdout.strip() == "yes", (ask, out.stdout, out.stderr)
    for ask in (
        ("get", "secrets", "-n", namespace),  # the platform role reads no Secret
        ("patch", "configmaps/someone-else", "-n", namespace),
        ("create", rj, "-n", "kube-system"),
    ):
        out = cluster.kubectl("auth", "can-i", *admin, *ask, check=False)
        assert out.stdout.strip() == "no", (ask, out.stdout, out.stderr)


def test_with_worker_network_policies_on_the_operator_may_create_one_the_api_server_accepts(
    cluster: ClusterHandle, chart_crd: None, namespace: str
) -> None:
    release = f"ro-{uuid.uuid4().hex[:6]}"
    docs = docs_of(render(cluster, release, namespace, "--set", "networkPolicy.workers.enabled=true"))
    rbac = [d for d in docs if d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding")]
    rbac = [d for d in rbac if d["metadata"]["name"] == f"{release}-research-operator"]
    manifest = yaml.safe_dump_all(rbac)
    cluster.kubectl("apply", "-f", "-", input=manifest)
    try:
        env = next(
            e["value"]
            for d in docs
            if d["kind"] == "Deployment" and d["metadata"]["name"] == f"{release}-research-operator"
            for e in d["spec"]["template"]["spec"]["containers"][0]["env"]
            if e["name"] == "WORKER_NETWORK_POLICY_EGRESS"
        )
        policy = worker_network_policy(Owner(namespace, "demo", str(uuid.uuid4())), tuple(json.loads(env)))
        policy["metadata"].pop("ownerReferences")  # its owner does not exist here
        sa = f"system:serviceaccount:{namespace}:{release}-research-operator"
        out = create_as(cluster, sa, policy)
        assert out.returncode == 0, out.stderr
    finally:
        cluster.kubectl("delete", "--ignore-not-found", "-f", "-", input=manifest, check=False)
