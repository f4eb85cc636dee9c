"""Tenants on the real control plane: a ResearchJob can use only what its author may use.

A tenant is a ServiceAccount whose Role allows ResearchJobs and ConfigMaps but not Secrets; the
tests act as it by impersonation (``Impersonate-User: system:serviceaccount:NS:NAME``, what
``kubectl --as`` sends). The chart's ValidatingAdmissionPolicy, its binding and its params (the
settings ConfigMap) are rendered with ``helm template`` and applied alone, under a release name of
this module, into a namespace of their own (so the test operator does not take them for its own
settings); the test operator (tests/fixtures/operator.py) is pointed at that binding through a
settings ConfigMap of its own, as the chart would. docs/security.md names these tests.

The tests run in file order: the first shows the operator without the policy in the cluster.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from research_api.researchjob import GROUP, PLURAL, VERSION
from tests.fixtures.cluster import RESTRICTED_LABELS, ClusterHandle
from tests.fixtures.operator import OperatorProcess

pytestmark = pytest.mark.cluster

CHART = Path(__file__).resolve().parents[1] / "charts" / "research-operator"
SUFFIX = uuid.uuid4().hex[:6]
RELEASE = f"tenancy-{SUFFIX}"
BINDING = f"{RELEASE}-research-operator-tenancy"  # the chart's admissionPolicyName for RELEASE
PARAMS = f"{RELEASE}-research-operator-settings"
TENANT = "tenant"
SECRET = "team-llm-key"  # a Secret of the tenant's namespace the tenant may not read
ATTACKER_URL = "http://listener.attacker.example:9000/v1"


# -- helpers ---------------------------------------------------------------------------------


def as_user(cluster: ClusterHandle, user: str) -> client.ApiClient:
    api = cluster.api_client()
    api.set_default_header("Impersonate-User", user)
    return api


def rj(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "topic": "What the shared cluster's teams may use",
        "analysts": {"count": 1},
        "interview": {"maxTurns": 1},
        "sources": [{"type": "documents", "configMap": "corpus", "maxResults": 1}],
        "parallelism": {"batchSize": 1, "maxActiveJobs": 1},
    }
    body.update(spec)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ResearchJob", "metadata": {"name": name}, "spec": body}


STEAL = {"model": {"baseUrl": ATTACKER_URL, "apiKeySecretRef": {"name": SECRET, "key": "api-key"}}}


def create(api: client.ApiClient, namespace: str, body: dict[str, Any], dry_run: bool = False) -> None:
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body, dry_run="All" if dry_run else None
    )


def refusal(fn: Callable[[], Any]) -> str:
    """The API server's message refusing ``fn``'s request (the test fails if it was accepted)."""
    with pytest.raises(client.ApiException) as e:
        fn()
    assert e.value.status == 403, e.value.body
    return str(e.value.body)


def eventually(check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except client.ApiException:
            pass
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.2)


def condition(api: client.ApiClient, namespace: str, name: str, ctype: str) -> dict[str, Any] | None:
    obj = client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == ctype), None)


def worker_jobs(api: client.ApiClient, namespace: str) -> list[Any]:
    return client.BatchV1Api(api).list_namespaced_job(namespace, label_selector=f"{GROUP}/job").items


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tenant_ns(cluster: ClusterHandle, researchjob_crd: Path) -> Iterator[str]:
    """A team namespace: a Secret and a corpus ConfigMap made by its admin, and the tenant
    ServiceAccount, allowed ResearchJobs and ConfigMaps, not Secrets."""
    ns = f"tenant-{SUFFIX}"
    api = cluster.api_client()
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    core.create_namespace({"metadata": {"name": ns, "labels": RESTRICTED_LABELS}})
    core.create_namespaced_service_account(ns, {"metadata": {"name": TENANT}})
    core.create_namespaced_secret(ns, {"metadata": {"name": SECRET}, "stringData": {"api-key": "sk-team-secret"}})
    core.create_namespaced_config_map(ns, {"metadata": {"name": "corpus"}, "data": {"a.md": "# Quotas\nTeams."}})
    rules = [
        {"apiGroups": [GROUP], "resources": ["researchjobs"], "verbs": ["get", "list", "create", "update", "patch"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "create"]},
    ]
    rbac.create_namespaced_role(ns, {"metadata": {"name": TENANT}, "rules": rules})
    subject = [{"kind": "ServiceAccount", "name": TENANT, "namespace": ns}]
    ref = {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": TENANT}
    rbac.create_namespaced_role_binding(ns, {"metadata": {"name": TENANT}, "roleRef": ref, "subjects": subject})
    try:
        yield ns
    finally:
        core.delete_namespace(ns, propagation_policy="Background")


@pytest.fixture(scope="module")
def tenant(cluster: ClusterHandle, tenant_ns: str) -> client.ApiClient:
    return as_user(cluster, f"system:serviceaccount:{tenant_ns}:{TENANT}")


@pytest.fixture(scope="module")
def policy(cluster: ClusterHandle, tenant_ns: str, tenant: client.ApiClient) -> Iterator[str]:
    """The chart's admission policy, its binding and its params, as `helm install` renders them with
    the default values; yields the namespace of the params. Removed afterwards."""
    ns = f"{RELEASE}-system"
    out = subprocess.run(
        [
            str(cluster.tools / "helm"), "template", RELEASE, str(CHART), "--namespace", ns,
            "--show-only", "templates/admission-policy.yaml", "--show-only", "templates/settings-configmap.yaml",
        ],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted(d["kind"] for d in docs) == [
        "ConfigMap",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ]
    client.CoreV1Api(cluster.api_client()).create_namespace({"metadata": {"name": ns}})
    cluster.kubectl("apply", "-f", "-", input=out.stdout)
    # The API server takes up a new policy within a moment: until it refuses, it is not in force.
    eventually(
        lambda: (
            "ValidatingAdmissionPolicy"
            in refusal_or_empty(lambda: create(tenant, tenant_ns, rj("probe", **STEAL), True))
        ),
        "the admission policy in force",
    )
    try:
        yield ns
    finally:
        cluster.kubectl("delete", "--ignore-not-found", "-f", "-", input=out.stdout)
        client.CoreV1Api(cluster.api_client()).delete_namespace(ns, propagation_policy="Background")
        # The API server drops a deleted binding a while after its params are gone, refusing every
        # create meanwhile ("no params found for policy binding"): the next module must not see it.
        eventually(
            lambda: accepted(lambda: create(cluster.api_client(), "default", rj("after-the-policy"), True)),
            "the admission policy out of force",
            timeout=180,
        )


def accepted(fn: Callable[[], Any]) -> bool:
    fn()
    return True


def refusal_or_empty(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except client.ApiException as e:
        return str(e.body)
    return ""


@pytest.fixture
def operator_settings(cluster: ClusterHandle, operator: OperatorProcess) -> Iterator[Callable[..., None]]:
    """Give the test operator these settings ConfigMap keys (as the chart renders them) and wait
    until it applied them; its own settings come back afterwards."""
    core = client.CoreV1Api(cluster.api_client())
    ns, name = operator.env["OPERATOR_NAMESPACE"], f"tenancy-{uuid.uuid4().hex[:6]}"

    def put(**data: str) -> None:
        body = {"metadata": {"name": name, "labels": {f"{GROUP}/kind": "operator-settings"}}, "data": data}
        try:
            core.replace_namespaced_config_map(name, ns, body)
        except client.ApiException as e:
            if e.status != 404:
                raise
            core.create_namespaced_config_map(ns, body)
        want = [f"{k}={v}" for k, v in data.items()]

        def applied() -> bool:
            lines = [ln for ln in operator.log().splitlines() if "operator settings:" in ln]
            return bool(lines) and all(w in lines[-1] for w in want)

        eventually(applied, f"the operator applied {data}")

    yield put
    core.delete_namespaced_config_map(name, ns)


# -- without the policy: the operator does not take the unsafe path --------------------------


def test_without_the_policy_the_operator_creates_no_job_and_says_why(
    cluster: ClusterHandle, tenant_ns: str, tenant: client.ApiClient, operator_settings: Callable[..., None]
) -> None:
    admin = cluster.api_client()
    # As the chart renders it with the policy on, but the policy is not in the cluster.
    operator_settings(admissionPolicyBinding=BINDING, trustAuthors="false")
    create(tenant, tenant_ns, rj("unchecked", **STEAL))  # nothing refuses it at admission
    # The operator's defense in depth: scheduling outside the allowlists, even from an admin.
    create(admin, tenant_ns, rj("critical", worker={"priorityClassName": "system-cluster-critical"}))
    try:
        held = eventually(lambda: condition(admin, tenant_ns, "unchecked", "PolicyViolation"), "PolicyViolation")
        assert (held["status"], held["reason"]) == ("True", "AuthorNotChecked")
        assert f'Secret "{SECRET}" (spec.model.apiKeySecretRef)' in held["message"]
        assert BINDING in held["message"] and "tenancy.admissionPolicy.enabled=true" in held["message"]
        sched = eventually(lambda: condition(admin, tenant_ns, "critical", "PolicyViolation"), "PolicyViolation")
        assert (sched["status"], sched["reason"]) == ("True", "SchedulingNotAllowed")
        assert 'spec.worker.priorityClassName: PriorityClass "system-cluster-critical"' in sched["message"]
        obj = client.CustomObjectsApi(admin).get_namespaced_custom_object(
            GROUP, VERSION, tenant_ns, PLURAL, "unchecked"
        )
        assert obj["status"]["phase"] == "Pending" and obj["status"]["waitingFor"] == "PolicyViolation"

        def warned() -> set[str]:  # Events are posted after the status write, in the background
            events = client.CoreV1Api(admin).list_namespaced_event(tenant_ns, field_selector="reason=PolicyViolation")
            return {e.involved_object.name for e in events.items}

        eventually(lambda: warned() == {"unchecked", "critical"}, "a PolicyViolation Event for each")
        time.sleep(1)  # a pass that would create a Job has run (the conditions came from one)
        assert worker_jobs(admin, tenant_ns) == []
    finally:
        for name in ("unchecked", "critical"):
            client.CustomObjectsApi(admin).delete_namespaced_custom_object(GROUP, VERSION, tenant_ns, PLURAL, name)


def test_a_researchjob_created_before_the_policy_is_held_when_the_policy_comes(
    cluster: ClusterHandle,
    tenant_ns: str,
    tenant: client.ApiClient,
    operator_settings: Callable[..., None],
    request: pytest.FixtureRequest,
) -> None:
    """The policy checks creates and updates, not what exists: a ResearchJob naming a Secret its
    author may not read, created while no policy was in force, must not run once the policy is
    there, although the operator then sees authors as checked."""
    admin = cluster.api_client()
    operator_settings(admissionPolicyBinding=BINDING, trustAuthors="false")
    create(tenant, tenant_ns, rj("early", **STEAL))
    held = eventually(lambda: condition(admin, tenant_ns, "early", "PolicyViolation"), "held: no policy yet")
    assert held["reason"] == "AuthorNotChecked" and "is not in the cluster" in held["message"], held
    request.getfixturevalue("policy")  # the chart's policy comes into force now
    try:
        cond = eventually(
            lambda: (
                (c := condition(admin, tenant_ns, "early", "PolicyViolation"))
                and "before the admission policy" in c["message"]
                and c
            ),
            "the ResearchJob held as created before the policy",
            timeout=60,
        )
        assert (cond["status"], cond["reason"]) == ("True", "AuthorNotChecked"), cond
        assert f'Secret "{SECRET}"' in cond["message"] and "create it again" in cond["message"]
        time.sleep(1)
        assert not [j for j in worker_jobs(admin, tenant_ns) if j.metadata.name.startswith("early-")]
    finally:
        client.CustomObjectsApi(admin).delete_namespaced_custom_object(GROUP, VERSION, tenant_ns, PLURAL, "early")


# -- with the policy: refused at apply -------------------------------------------------------


def test_a_secret_the_author_may_not_read_is_refused_at_apply_naming_it_and_the_permission(
    cluster: ClusterHandle, tenant_ns: str, tenant: client.ApiClient, policy: str
) -> None:
    user = f"system:serviceaccount:{tenant_ns}:{TENANT}"
    msg = refusal(lambda: create(tenant, tenant_ns, rj("steal", **STEAL)))
    assert f'spec.model.apiKeySecretRef: {user} may not get Secret \\"{SECRET}\\" in namespace {tenant_ns}' in msg
    assert "missing permission: get secrets" in msg
    # The same path through the PostgreSQL DSN and a Tavily key.
    dsn = {"store": {"type": "postgres", "dsnSecretRef": {"name": SECRET, "key": "dsn"}}}
    assert "spec.store.dsnSecretRef" in refusal(lambda: create(tenant, tenant_ns, rj("dsn", **dsn), True))
    tavily = {"sources": [{"type": "wikipedia"}, {"type": "tavily", "apiKeySecretRef": {"name": SECRET, "key": "k"}}]}
    assert "spec.sources[1].apiKeySecretRef" in refusal(lambda: create(tenant, tenant_ns, rj("tv", **tavily), True))
    # What a user of kubectl sees.
    out = cluster.kubectl(
        "create", "-n", tenant_ns, f"--as={user}", "-f", "-", check=False, input=yaml.safe_dump(rj("k", **STEAL))
    )
    assert out.returncode != 0
    assert f'may not get Secret "{SECRET}"' in out.stderr and "missing permission: get secrets" in out.stderr


def test_a_documents_configmap_the_author_may_not_read_is_refused(
    cluster: ClusterHandle, tenant_ns: str, policy: str
) -> None:
    """A user allowed only the one ConfigMap of their corpus may not read another's documents."""
    admin = cluster.api_client()
    rbac = client.RbacAuthorizationV1Api(admin)
    name = "reader"
    client.CoreV1Api(admin).create_namespaced_service_account(tenant_ns, {"metadata": {"name": name}})
    rules = [
        {"apiGroups": [GROUP], "resources": ["researchjobs"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["corpus"], "verbs": ["get"]},
    ]
    rbac.create_namespaced_role(tenant_ns, {"metadata": {"name": name}, "rules": rules})
    rbac.create_namespaced_role_binding(
        tenant_ns,
        {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": tenant_ns}],
        },
    )
    reader = as_user(cluster, f"system:serviceaccount:{tenant_ns}:{name}")
    create(reader, tenant_ns, rj("own"), dry_run=True)  # its own corpus: allowed
    two = {"sources": [{"type": "documents", "configMap": "corpus"}, {"type": "documents", "configMap": "hr-notes"}]}
    msg = eventually(lambda: refusal_or_empty(lambda: create(reader, tenant_ns, rj("two", **two), True)), "refused")
    assert "spec.sources[1].configMap" in msg and 'ConfigMap \\"hr-notes\\"' in msg
    assert "missing permission: get configmaps" in msg


def test_an_author_granted_get_on_the_secret_succeeds_and_the_operator_runs_it(
    cluster: ClusterHandle,
    tenant_ns: str,
    tenant: client.ApiClient,
    policy: str,
    operator_settings: Callable[..., None],
) -> None:
    admin = cluster.api_client()
    rbac = client.RbacAuthorizationV1Api(admin)
    rule = {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [SECRET], "verbs": ["get"]}
    rbac.create_namespaced_role(tenant_ns, {"metadata": {"name": "key-reader"}, "rules": [rule]})
    rbac.create_namespaced_role_binding(
        tenant_ns,
        {
            "metadata": {"name": "key-reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "key-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": TENANT, "namespace": tenant_ns}],
        },
    )
    # The operator as the chart configures it: authors are checked by the policy now in force.
    operator_settings(admissionPolicyBinding=BINDING, trustAuthors="false")
    keyed = {"model": {"apiKeySecretRef": {"name": SECRET, "key": "api-key"}}}  # the default endpoint
    eventually(lambda: accepted(lambda: create(tenant, tenant_ns, rj("mine", **keyed))), "the tenant's create accepted")
    try:
        jobs = eventually(lambda: worker_jobs(admin, tenant_ns), "the planner Job", timeout=60)
        env = jobs[0].spec.template.spec.containers[0].env
        refs = [e.value_from.secret_key_ref.name for e in env if e.value_from and e.value_from.secret_key_ref]
        assert refs == [SECRET]
        cond = eventually(lambda: condition(admin, tenant_ns, "mine", "PolicyViolation"), "its status written")
        assert (cond["status"], cond["reason"]) == ("False", "WithinPolicy")
    finally:
        client.CustomObjectsApi(admin).delete_namespaced_custom_object(GROUP, VERSION, tenant_ns, PLURAL, "mine")


def test_someone_who_may_not_read_the_secret_cannot_redirect_anothers_researchjob(
    cluster: ClusterHandle, tenant_ns: str, policy: str
) -> None:
    """The admin's ResearchJob uses the team key; a user without access to it may still label it
    (the operator's own finalizer writes are such updates) and approve its analysts, but not point
    it at their listener."""
    admin = cluster.api_client()
    user = "system:serviceaccount:{}:{}".format(tenant_ns, "editor")
    client.CoreV1Api(admin).create_namespaced_service_account(tenant_ns, {"metadata": {"name": "editor"}})
    client.RbacAuthorizationV1Api(admin).create_namespaced_role_binding(
        tenant_ns,
        {
            "metadata": {"name": "editor"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": TENANT},
            "subjects": [{"kind": "ServiceAccount", "name": "editor", "namespace": tenant_ns}],
        },
    )
    editor = as_user(cluster, user)
    body = rj(
        "teamjob", model={"apiKeySecretRef": {"name": SECRET, "key": "api-key"}}, analysts={"count": 1, "review": True}
    )
    create(admin, tenant_ns, body)
    custom = client.CustomObjectsApi(editor)
    try:
        patch = {"metadata": {"labels": {"team": "a"}}}
        eventually(
            lambda: custom.patch_namespaced_custom_object(GROUP, VERSION, tenant_ns, PLURAL, "teamjob", patch),
            "the editor's label accepted",
        )
        approve = {"spec": {"analysts": {"approved": True}}}
        custom.patch_namespaced_custom_object(GROUP, VERSION, tenant_ns, PLURAL, "teamjob", approve)
        redirect = {"spec": {"model": {"baseUrl": ATTACKER_URL}}}
        msg = refusal(
            lambda: custom.patch_namespaced_custom_object(GROUP, VERSION, tenant_ns, PLURAL, "teamjob", redirect)
        )
        assert f'{user} may not get Secret \\"{SECRET}\\"' in msg
    finally:
        client.CustomObjectsApi(admin).delete_namespaced_custom_object(GROUP, VERSION, tenant_ns, PLURAL, "teamjob")


def test_system_priority_and_control_plane_tolerations_are_refused_unless_admins_allow_them(
    cluster: ClusterHandle, tenant_ns: str, tenant: client.ApiClient, policy: str
) -> None:
    critical = rj("critical", worker={"priorityClassName": "system-cluster-critical"})
    msg = refusal(lambda: create(tenant, tenant_ns, critical, True))
    assert 'spec.worker.priorityClassName: PriorityClass \\"system-cluster-critical\\" is not allowed' in msg
    toleration = {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}
    tolerating = rj("cp", worker={"tolerations": [toleration]})
    msg = refusal(lambda: create(tenant, tenant_ns, tolerating, True))
    assert "spec.worker.tolerations: toleration of node-role.kubernetes.io/control-plane is not allowed" in msg
    selecting = rj("sel", worker={"nodeSelector": {"node-role.kubernetes.io/control-plane": ""}})
    assert "spec.worker.nodeSelector: node label" in refusal(lambda: create(tenant, tenant_ns, selecting, True))
    create(tenant, tenant_ns, rj("zone", worker={"nodeSelector": {"topology.kubernetes.io/zone": "a"}}), True)
    # Admins allow them in the settings ConfigMap (helm upgrade --set tenancy.allowed...=...).
    core = client.CoreV1Api(cluster.api_client())
    patch = {
        "data": {
            "allowedPriorityClasses": "system-cluster-critical",
            "allowedTolerationKeys": "node-role.kubernetes.io/control-plane",
        }
    }
    core.patch_namespaced_config_map(PARAMS, policy, patch)
    try:
        eventually(
            lambda: accepted(lambda: create(tenant, tenant_ns, critical, True)), "the allowed priority class accepted"
        )
        eventually(
            lambda: accepted(lambda: create(tenant, tenant_ns, tolerating, True)), "the allowed toleration accepted"
        )
    finally:
        core.patch_namespaced_config_map(
            PARAMS, policy, {"data": {"allowedPriorityClasses": "", "allowedTolerationKeys": ""}}
        )


def test_a_base_url_of_the_tenants_own_is_refused_when_admins_forbid_it(
    cluster: ClusterHandle,
    tenant_ns: str,
    tenant: client.ApiClient,
    policy: str,
    operator_settings: Callable[..., None],
) -> None:
    own = rj("own-url", model={"baseUrl": "http://listener.example:8000/v1"})
    create(tenant, tenant_ns, own, True)  # allowed by default
    core = client.CoreV1Api(cluster.api_client())
    core.patch_namespaced_config_map(PARAMS, policy, {"data": {"allowTenantBaseUrls": "false"}})
    try:
        msg = eventually(
            lambda: refusal_or_empty(lambda: create(tenant, tenant_ns, own, True)), "the policy refuses own base URLs"
        )
        assert "spec.model.baseUrl: ResearchJobs may not name their own model endpoint on this cluster" in msg
        create(tenant, tenant_ns, rj("default-url"), True)  # the default endpoint stays open
    finally:
        core.patch_namespaced_config_map(PARAMS, policy, {"data": {"allowTenantBaseUrls": "true"}})
    # The operator holds the same line where no policy checked it (created by an admin here).
    operator_settings(allowTenantBaseUrls="false")
    admin = cluster.api_client()
    create(admin, tenant_ns, rj("own-url-2", model={"baseUrl": "http://listener.example:8000/v1"}))
    cond = eventually(lambda: condition(admin, tenant_ns, "own-url-2", "PolicyViolation"), "the operator refuses it")
    assert cond["reason"] == "BaseUrlNotAllowed" and "tenancy.allowTenantBaseUrls=false" in cond["message"], cond
    assert not [j for j in worker_jobs(admin, tenant_ns) if j.metadata.labels.get(f"{GROUP}/job") == "own-url-2"]


def test_a_kueue_priority_admins_did_not_define_is_refused_at_apply(
    cluster: ClusterHandle, tenant_ns: str, tenant: client.ApiClient, policy: str
) -> None:
    top = rj("top", priority="highest-of-all")
    create(tenant, tenant_ns, top, True)  # without Kueue, spec.priority does nothing
    core = client.CoreV1Api(cluster.api_client())
    kueue = {"kueueQueueName": "research", "kueuePriorityClasses": '{"high":"research-high","low":"research-low"}'}
    core.patch_namespaced_config_map(PARAMS, policy, {"data": kueue})
    try:
        msg = eventually(
            lambda: refusal_or_empty(lambda: create(tenant, tenant_ns, top, True)), "an undefined priority refused"
        )
        assert 'spec.priority: \\"highest-of-all\\" is not a priority of this cluster' in msg, msg
        create(tenant, tenant_ns, rj("high", priority="high"), True)  # a name the admins mapped
        core.patch_namespaced_config_map(PARAMS, policy, {"data": {"allowedWorkloadPriorityClasses": "*"}})
        eventually(lambda: accepted(lambda: create(tenant, tenant_ns, top, True)), "any class allowed by '*'")
    finally:
        reset = {"kueueQueueName": "", "kueuePriorityClasses": "{}", "allowedWorkloadPriorityClasses": ""}
        core.patch_namespaced_config_map(PARAMS, policy, {"data": reset})


def test_a_tenant_cannot_read_another_namespaces_report_through_kubectl_or_the_plugin(
    cluster: ClusterHandle,
    operator: OperatorProcess,
    namespace: str,
    corpus_configmap: str,
    tenant_ns: str,
    tmp_path: Path,
) -> None:
    from tests.test_cli_cluster import plugin_env
    from tests.test_operator_cluster import create as create_rj
    from tests.test_operator_cluster import researchjob, wait_phase

    admin = cluster.api_client()
    create_rj(admin, namespace, researchjob("theirs", corpus_configmap, analysts={"count": 1}))
    obj = wait_phase(admin, namespace, "theirs", {"Succeeded", "Failed"})
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    report = obj["status"]["report"]["configMap"]
    # The tenant's own credentials: a token of their ServiceAccount in a kubeconfig of their own.
    token = cluster.kubectl("create", "token", TENANT, "-n", tenant_ns).stdout.strip()
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    config["users"] = [{"name": "tenant", "user": {"token": token}}]
    for ctx in config["contexts"]:
        ctx["context"]["user"] = "tenant"
    kubeconfig = tmp_path / "tenant.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))

    def plugin(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**plugin_env(cluster), "KUBECONFIG": str(config_path)}
        return subprocess.run(["kubectl-research", *args], capture_output=True, text=True, timeout=120, env=env)

    def as_tenant(*args: str) -> subprocess.CompletedProcess[str]:
        kubectl = [str(cluster.tools / "kubectl"), f"--kubeconfig={kubeconfig}", *args]
        return subprocess.run(kubectl, capture_output=True, text=True, timeout=60)

    mine = plugin(cluster.kubeconfig, "report", "-n", namespace, "theirs")
    assert mine.returncode == 0 and mine.stdout.startswith("# "), mine  # the owner's side reads it
    title = mine.stdout.splitlines()[0]
    theirs = plugin(kubeconfig, "report", "-n", namespace, "theirs")
    assert theirs.returncode != 0 and title not in theirs.stdout
    assert "forbidden" in theirs.stderr.lower() and theirs.stderr.count("\n") == 1, theirs.stderr
    for what in (
        ("get", "configmap", report),
        ("get", "configmaps", "-l", f"{GROUP}/job=theirs"),  # the sections
        ("get", "researchjobs.researchops.io", "theirs"),
    ):
        out = as_tenant(*what, "-n", namespace)
        assert out.returncode != 0 and "Forbidden" in out.stderr, (what, out.stdout, out.stderr)
    # The same credentials work in the tenant's own namespace: the refusals above are not a broken login.
    out = as_tenant("get", "researchjobs.researchops.io", "-n", tenant_ns)
    assert out.returncode == 0, out.stderr
