"""Every wait of a ResearchJob ends with the event that can end it, never only with the resync.

The session's operator resyncs every 10 s, which would hide a lost wake-up; here it runs with a
resync of 600 s, so a ResearchJob that goes on within the bounds below (far under 600 s) was woken
by the event named in each test: a Job that held a cap slot going (in its namespace, or in another
namespace under a global cap), a namespace deleted and created again under the same name, the
steps of a PostgreSQL finalizer's cleanup, and all of these across an operator restart mid-wait.
Real control plane, real worker pods, offline model.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from research_api.researchjob import GROUP, PLURAL, VERSION
from tests.fixtures.cluster import RESTRICTED_LABELS, ClusterHandle
from tests.fixtures.operator import CORPUS, OperatorProcess
from tests.test_operator_cluster import create, researchjob
from tests.test_operator_shared_cluster import caps, get_rj, namespaces

pytestmark = pytest.mark.cluster

LONG_RESYNC = "600"
BOUND = 150.0  # seconds: generous for a loaded 2-core machine, and a quarter of the resync
ONE = {"count": 1}


@pytest.fixture(scope="module")
def slow_resync(operator: OperatorProcess) -> Iterator[OperatorProcess]:
    """The session's operator, restarted with a resync far beyond every bound of this module."""
    operator.extra_env = {**operator.extra_env, "RESYNC_SECONDS": LONG_RESYNC}
    operator.restart()
    yield operator
    operator.extra_env = {k: v for k, v in operator.extra_env.items() if k != "RESYNC_SECONDS"}
    operator.restart()


def status(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    return dict(((get_rj(api, namespace, name) or {}).get("status")) or {})


def until(what: str, check: Any, timeout: float = BOUND) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"{what}: not within {timeout:.0f}s, with the resync at {LONG_RESYNC}s (last: {last})")


def true_condition(st: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in st.get("conditions") or [] if c["type"] == kind and c["status"] == "True"), None)


def rj(name: str, **spec: Any) -> dict[str, Any]:
    return researchjob(name, "corpus", analysts=ONE, parallelism={"batchSize": 1, "maxActiveJobs": 1}, **spec)


def holder(api: client.ApiClient, namespace: str, slow_model: str) -> None:
    """A ResearchJob whose worker pod holds a cap slot: every call to its model takes a minute."""
    create(api, namespace, rj("holder", model={"baseUrl": slow_model}))
    until(
        "the holder's worker Job to run",
        lambda: any(
            (j.status.active or 0) > 0
            for j in client.BatchV1Api(api).list_namespaced_job(namespace, label_selector=f"{GROUP}/job").items
        ),
    )


def throttled(api: client.ApiClient, namespace: str, name: str, reason: str) -> dict[str, Any]:
    cond = until(
        f"{namespace}/{name} to say it waits ({reason})",
        lambda: (c := true_condition(status(api, namespace, name), "Throttled")) and c["reason"] == reason and c,
    )
    return dict(cond)


def succeeds(api: client.ApiClient, namespace: str, name: str) -> None:
    st = until(
        f"{namespace}/{name} to end once the slot it waited for was free",
        lambda: (s := status(api, namespace, name)).get("phase") in ("Succeeded", "Failed") and s,
    )
    assert st["phase"] == "Succeeded", st


def delete_rj(api: client.ApiClient, namespace: str, name: str) -> None:
    client.CustomObjectsApi(api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


@pytest.fixture
def slow_model(modelserver_factory: Any) -> str:
    return str(modelserver_factory(ttft_ms=60_000).base_url)


def test_a_job_that_goes_wakes_the_researchjob_waiting_for_its_namespace_slot(
    cluster: ClusterHandle, slow_resync: OperatorProcess, slow_model: str
) -> None:
    api = cluster.api_client()
    with namespaces(cluster, 1) as (ns,), caps(api, slow_resync, namespaceMaxActiveJobs=1):
        holder(api, ns, slow_model)
        create(api, ns, rj("waiter"))
        cond = throttled(api, ns, "waiter", "NamespaceCap")
        assert "namespaceMaxActiveJobs=1" in cond["message"], cond
        delete_rj(api, ns, "holder")  # its Job goes with it (garbage collector): the Job's DELETED event
        succeeds(api, ns, "waiter")


def global_slot_freed_elsewhere(
    cluster: ClusterHandle, operator: OperatorProcess, slow_model: str, restart: bool
) -> None:
    """A ResearchJob of one namespace waits for the only global slot, held by another namespace's;
    the holder goes (after an operator restart mid-wait, with ``restart``) and the waiter goes on."""
    api = cluster.api_client()
    with namespaces(cluster, 2) as (ns_a, ns_b), caps(api, operator, globalMaxActiveJobs=1):
        holder(api, ns_a, slow_model)
        create(api, ns_b, rj("waiter"))
        throttled(api, ns_b, "waiter", "GlobalCap")
        if restart:
            operator.restart()  # SIGKILL mid-wait; the new process rebuilds its world from the watches
            time.sleep(2)
            assert not client.BatchV1Api(api).list_namespaced_job(ns_b).items, "the restart alone must not admit it"
            assert true_condition(status(api, ns_b, "waiter"), "Throttled"), status(api, ns_b, "waiter")
        delete_rj(api, ns_a, "holder")
        succeeds(api, ns_b, "waiter")


def test_a_job_of_another_namespace_that_goes_frees_the_global_slot(
    cluster: ClusterHandle, slow_resync: OperatorProcess, slow_model: str
) -> None:
    global_slot_freed_elsewhere(cluster, slow_resync, slow_model, restart=False)


def test_a_researchjob_waiting_across_an_operator_restart_is_woken_when_the_slot_frees(
    cluster: ClusterHandle, slow_resync: OperatorProcess, slow_model: str
) -> None:
    global_slot_freed_elsewhere(cluster, slow_resync, slow_model, restart=True)


def hold_researchjobs(cluster: ClusterHandle, namespace: str) -> str:
    """A ValidatingAdmissionPolicy that refuses to delete the ResearchJobs of ``namespace``: the
    namespace controller then keeps the namespace Terminating with its ResearchJobs alive (not
    being deleted), as a namespace with many objects is for a while. Returns the policy's name."""
    name = f"hold-{namespace}"
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [GROUP],
                        "apiVersions": ["*"],
                        "operations": ["DELETE"],
                        "resources": [PLURAL],
                    }
                ]
            },
            "validations": [{"expression": f"request.namespace != '{namespace}'", "message": "held by the test"}],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"]},
    }
    cluster.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [policy, binding]})
    )
    return name


def test_a_namespace_deleted_and_created_again_gets_its_new_researchjob_a_status_at_once(
    cluster: ClusterHandle, slow_resync: OperatorProcess
) -> None:
    """ResearchJobs of a namespace being deleted meet its deletion when they create their Jobs; a
    ResearchJob of a namespace of the same name created right after is served at once, not after
    the operator's memo of the deletion or the resync."""
    api = cluster.api_client()
    core = client.CoreV1Api(api)
    ns = f"t-reborn-{uuid.uuid4().hex[:6]}"
    data = {p.name: p.read_text() for p in sorted(CORPUS.glob("*.md"))}

    def make_namespace() -> None:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns, labels=RESTRICTED_LABELS)))
        until("the default ServiceAccount", lambda: core.list_namespaced_service_account(ns).items, 30)
        core.create_namespaced_config_map(ns, {"metadata": {"name": "corpus"}, "data": data})

    def held() -> bool:
        try:
            delete_rj_dry_run(api, ns, "old-0")
        except client.ApiException as e:
            return e.status in (403, 422) and "held by the test" in str(e.body)
        return False

    refusal = f"namespace {ns} is being deleted"
    make_namespace()
    policy = hold_researchjobs(cluster, ns)
    try:
        core.create_namespaced_resource_quota(
            ns, {"metadata": {"name": "no-jobs"}, "spec": {"hard": {"count/jobs.batch": "0"}}}
        )
        for i in range(3):
            create(api, ns, rj(f"old-{i}"))
        until(
            "the ResearchJobs to wait for the quota", lambda: true_condition(status(api, ns, "old-2"), "QuotaExceeded")
        )
        until("the policy to hold the ResearchJobs", held, 30)
        core.delete_namespace(ns, propagation_policy="Background")
        # The namespace is Terminating and its ResearchJobs stay; the quota that held them goes.
        until("the quota to go", lambda: not core.list_namespaced_resource_quota(ns).items, 60)
        until("a create of the operator to meet the deletion", lambda: refusal in slow_resync.log(), 30)
    finally:
        cluster.kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", policy)
    until("the namespace to be gone", lambda: not [n for n in core.list_namespace().items if n.metadata.name == ns])
    make_namespace()
    try:
        create(api, ns, rj("new"))
        st = until("a status for the ResearchJob of the namespace created again", lambda: status(api, ns, "new"), 20)
        assert st.get("phase") in ("Pending", "Planning", "Interviewing", "Writing", "Succeeded"), st
        succeeds(api, ns, "new")
    finally:
        core.delete_namespace(ns, propagation_policy="Background")


def delete_rj_dry_run(api: client.ApiClient, namespace: str, name: str) -> None:
    client.CustomObjectsApi(api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, dry_run="All")


@pytest.mark.postgres
def test_each_step_of_a_postgres_cleanup_is_woken_by_the_job_it_waits_for(
    cluster: ClusterHandle, slow_resync: OperatorProcess, postgres_dsn: str
) -> None:
    """Deleting a PostgreSQL-store ResearchJob mid-run waits twice: for its worker Jobs to go, then
    for the cleanup Job to succeed; each Job's event ends the wait, and the ResearchJob goes."""
    from tests.test_operator_postgres import dsn_secret
    from tests.test_operator_postgres import researchjob as pg_researchjob

    api = cluster.api_client()
    with namespaces(cluster, 1) as (ns,):
        dsn_secret(api, ns, "pg", postgres_dsn)
        create(api, ns, pg_researchjob("mid", "corpus", "pg", parallelism={"batchSize": 1, "maxActiveJobs": 1}))
        until("a first section", lambda: status(api, ns, "mid").get("sectionsDone", 0) >= 1)
        delete_rj(api, ns, "mid")
        until("the ResearchJob to go after its cleanup", lambda: get_rj(api, ns, "mid") is None)
        assert "PostgreSQL rows deleted; removing the finalizer" in slow_resync.log()
