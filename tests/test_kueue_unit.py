"""Kueue mode without a cluster: the Jobs the operator hands to Kueue, the priority mapping, the
views of Kueue's objects and what the status says while Jobs wait (tests/test_kueue_cluster.py
runs the same against the real Kueue)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from localkube import kueue as localkueue
from research_api.researchjob import Phase, ResearchJobSpec, ResearchJobStatus
from research_api.task import Step
from research_operator.constants import plan_id
from research_operator.decisions import kueue
from research_operator.decisions.manifests import Owner, worker_job
from research_operator.decisions.reconcile import JobView, Observed, StoreView, decide
from research_operator.settings import Settings
from tests.test_operator_unit import analysts, observe, spec

T0 = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
PID = plan_id(None)
OWNER = Owner("ns", "rj", "u")
KUEUE = Settings(
    kueue_queue="research",
    kueue_priority_classes=(("high", "research-high"), ("low", "research-low")),
    kueue_watch=True,
)


# -- the Jobs handed to Kueue ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "batch", "index"), [(Step.PLAN, None, None), (Step.INTERVIEW, [0, 1], 0), (Step.WRITE, None, None)]
)
def test_every_step_is_created_suspended_in_the_local_queue(
    step: Step, batch: list[int] | None, index: int | None
) -> None:
    job = worker_job(OWNER, spec(priority="high"), KUEUE, PID, step, batch, index)
    assert job["spec"]["suspend"] is True
    labels = job["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "research"
    assert labels["kueue.x-k8s.io/priority-class"] == "research-high"
    # Kueue reads its labels on the Job; the pods carry only the operator's own.
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert not any(k.startswith("kueue.x-k8s.io/") for k in pod_labels)


def test_without_kueue_jobs_start_at_once_and_carry_no_kueue_labels() -> None:
    job = worker_job(OWNER, spec(priority="high"), Settings(), PID, Step.PLAN)
    assert "suspend" not in job["spec"]
    assert not any(k.startswith("kueue.x-k8s.io/") for k in job["metadata"]["labels"])


def test_priority_maps_to_a_workload_priority_class() -> None:
    assert kueue.priority_class("high", KUEUE) == "research-high"
    assert kueue.priority_class("urgent", KUEUE) == "urgent"  # unmapped: the class of that name
    assert kueue.priority_class(None, KUEUE) is None  # Kueue's default priority
    with_default = Settings(kueue_queue="q", kueue_default_priority_class="research-normal")
    assert kueue.priority_class(None, with_default) == "research-normal"
    labels = kueue.job_labels(Settings(kueue_queue="q"), None)
    assert labels == {"kueue.x-k8s.io/queue-name": "q"}


def test_spec_priority_must_be_a_name() -> None:
    assert spec(priority="high").priority == "high"
    with pytest.raises(ValueError, match="priority"):
        spec(priority="High Priority")


def test_priority_mapping_from_env_and_configmap() -> None:
    s = Settings.from_env({"KUEUE_QUEUE_NAME": "research", "KUEUE_PRIORITY_CLASSES": '{"high": "research-high"}'})
    assert s.kueue_watch is True  # Kueue mode watches Workloads unless KUEUE_WATCH=false
    assert kueue.priority_class("high", s) == "research-high"
    assert Settings.from_env({"KUEUE_QUEUE_NAME": "q", "KUEUE_WATCH": "false"}).kueue_watch is False
    assert Settings.from_env({}).kueue_watch is False
    s2 = s.with_configmap({"kueuePriorityClasses": '{"low": "research-low"}', "kueueDefaultPriorityClass": "mid"})
    assert s2.kueue_priority_classes == (("low", "research-low"),) and s2.kueue_default_priority_class == "mid"
    for bad in ('["high"]', '{"high": "Research High"}', "{not json"):
        with pytest.raises(ValueError, match="kueuePriorityClasses"):
            Settings().with_configmap({"kueuePriorityClasses": bad})
    with pytest.raises(ValueError, match="KUEUE_DEFAULT_PRIORITY_CLASS"):
        Settings.from_env({"KUEUE_DEFAULT_PRIORITY_CLASS": "no_underscores"})


# -- Kueue's objects -----------------------------------------------------------------------------


def workload(job: str, *conditions: dict[str, Any], cq: str | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"conditions": list(conditions)}
    if cq:
        status["admission"] = {"clusterQueue": cq, "podSetAssignments": []}
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "Workload",
        "metadata": {
            "name": f"job-{job}-1a2b3",
            "namespace": "ns",
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": job, "uid": "j", "controller": True}],
        },
        "spec": {
            "queueName": "research",
            "priority": 1000,
            "priorityClassRef": {"group": "kueue.x-k8s.io", "kind": "WorkloadPriorityClass", "name": "research-high"},
            "podSets": [],
        },
        "status": status,
    }


def cond(ctype: str, status: bool, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": ctype, "status": "True" if status else "False", "reason": reason, "message": message}


PENDING = cond("QuotaReserved", False, "Pending", "couldn't assign flavors to pod set main: insufficient unused quota")
RESERVED = cond("QuotaReserved", True, "QuotaReserved")
PREEMPTED = cond("Evicted", True, "Preempted", "Preempted to accommodate a workload due to prioritization")


def test_workload_view_reads_queue_priority_admission_and_eviction() -> None:
    wl = kueue.workload_view(workload("rj-b0", RESERVED, cond("Admitted", True, "Admitted"), cq="team"))
    assert wl is not None
    assert (wl.job, wl.queue, wl.priority_class, wl.priority) == ("rj-b0", "research", "research-high", 1000)
    assert wl.quota_reserved and wl.admitted and wl.cluster_queue == "team" and not wl.evicted
    pending = kueue.workload_view(workload("rj-b0", PENDING))
    assert pending is not None and not pending.quota_reserved
    assert pending.pending.startswith("couldn't assign flavors")
    evicted = kueue.workload_view(workload("rj-b0", cond("QuotaReserved", False, "Pending"), PREEMPTED))
    assert evicted is not None and evicted.evicted.startswith("Preempted: Preempted to accommodate")
    orphan = workload("x")
    orphan["metadata"]["ownerReferences"] = []
    assert kueue.workload_view(orphan) is None  # not a Job's: not ours to read


def job(name: str, step: str = "interview", batch: int | None = 0, **kw: Any) -> JobView:
    return JobView(name=name, step=step, plan=PID, batch=batch, **kw)


def views(*bodies: dict[str, Any]) -> dict[str, kueue.WorkloadView]:
    out = {}
    for b in bodies:
        wl = kueue.workload_view(b)
        assert wl is not None
        out[wl.job] = wl
    return out


LQ = {"research": kueue.LocalQueueView("research", "team")}


def test_waiting_names_the_job_the_local_queue_the_cluster_queue_and_kueues_reason() -> None:
    w = kueue.wait_status([job("rj-b0", suspended=True)], views(workload("rj-b0", PENDING)), LQ, "research", True)
    assert w.waiting and w.reason == "Pending"
    assert w.message == (
        "batch Job rj-b0 waits for quota in LocalQueue research (ClusterQueue team): "
        "couldn't assign flavors to pod set main: insufficient unused quota"
    )


def test_an_evicted_job_says_so_and_that_it_will_resume() -> None:
    wls = views(workload("rj-b1", cond("QuotaReserved", False, "Pending"), PREEMPTED))
    w = kueue.wait_status([job("rj-b1", batch=1, suspended=True), job("rj-b2", batch=2)], wls, LQ, "research", True)
    assert w.reason == "Evicted" and "evicted by Kueue (Preempted: " in w.message and "to resume" in w.message


def test_running_jobs_do_not_wait_and_several_waiting_ones_are_counted() -> None:
    running = kueue.wait_status([job("rj-b0")], {}, LQ, "research", True)
    assert not running.waiting and running.reason == "NotWaiting"
    two = kueue.wait_status(
        [job("rj-b0", suspended=True), job("rj-b1", batch=1, suspended=True)],
        views(workload("rj-b0", PENDING), workload("rj-b1", PENDING)),
        LQ,
        "research",
        True,
    )
    assert two.message.endswith("; 1 more worker Job(s) wait for Kueue")


def test_no_workload_and_an_inactive_local_queue_are_explained() -> None:
    none = kueue.wait_status([job("rj-plan", "plan", None, suspended=True)], {}, LQ, "research", True, "urgent")
    assert none.reason == "NoWorkload"
    assert none.message == (
        "planner Job rj-plan waits in LocalQueue research (ClusterQueue team) for Kueue to create its Workload; "
        "if that lasts, check that Kueue runs and WorkloadPriorityClass urgent exists (spec.priority)"
    )
    lq = kueue.localqueue_view(
        {
            "metadata": {"name": "research"},
            "spec": {"clusterQueue": "gone"},
            "status": {
                "conditions": [
                    {
                        "type": "Active",
                        "status": "False",
                        "reason": "ClusterQueueDoesNotExist",
                        "message": "Can't submit new workloads to clusterQueue",
                    }
                ]
            },
        }
    )
    w = kueue.wait_status(
        [job("rj-b0", suspended=True)], views(workload("rj-b0", PENDING)), {"research": lq}, "research", True
    )
    assert w.reason == "LocalQueueInactive"
    assert w.message == (
        "batch Job rj-b0 waits in LocalQueue research (ClusterQueue gone), which is not active: "
        "ClusterQueueDoesNotExist: Can't submit new workloads to clusterQueue"
    )
    blind = kueue.wait_status([job("rj-b0", suspended=True)], {}, {}, "research", False)
    assert blind.reason == "Pending" and "LocalQueue research" in blind.message  # no Workload watch: no guess


def test_annotate_sets_the_condition_and_the_message_per_phase() -> None:
    wait = kueue.KueueWait(True, "Pending", "planner Job rj-plan waits for quota in LocalQueue research")
    st = ResearchJobStatus(phase=Phase.Planning, message="planner Job rj-plan running")
    kueue.annotate(st, wait, ResearchJobStatus(), 1, T0, kueue_mode=True)
    assert st.message == wait.message
    (c,) = st.conditions or []
    assert (c.type, c.status, c.reason, c.message) == ("WaitingForKueue", "True", "Pending", wait.message)

    st = ResearchJobStatus(phase=Phase.Interviewing, message="2/6 sections; 1 batch Jobs running, 1 waiting")
    kueue.annotate(st, wait, ResearchJobStatus(), 1, T0, kueue_mode=True)
    assert st.message == f"2/6 sections; 1 batch Jobs running, 1 waiting; {wait.message}"

    done = ResearchJobStatus(phase=Phase.Succeeded, message="report ready")
    kueue.annotate(done, wait, ResearchJobStatus(), 1, T0, kueue_mode=True)
    assert done.message == "report ready" and (done.conditions or [])[0].status == "False"

    plain = ResearchJobStatus(phase=Phase.Interviewing, message="m")
    kueue.annotate(plain, kueue.KueueWait(False, "NotWaiting", ""), ResearchJobStatus(), 1, T0, kueue_mode=False)
    assert plain.conditions is None  # no Kueue, nothing waiting: no condition


def test_gather_picks_this_namespaces_workloads_and_queues() -> None:
    wl = kueue.workload_view(workload("rj-b0", PENDING))
    assert wl is not None
    other = kueue.LocalQueueView("research", "elsewhere")
    got_wls, got_lqs = kueue.gather(
        "ns",
        [job("rj-b0"), job("rj-b1", batch=1)],
        "research",
        {("ns", "rj-b0"): [wl], ("other", "rj-b1"): [wl]},
        {("ns", "research"): [LQ["research"]], ("other", "research"): [other]},
    )
    assert got_wls == {"rj-b0": wl} and got_lqs == {"research": LQ["research"]}


# -- the decision with suspended (queued or evicted) Jobs -------------------------------------------


def interviewing(jobs: list[JobView], done: frozenset[int] = frozenset(), **over: Any) -> Observed:
    store = StoreView(analysts={PID: analysts(6)}, sections={PID: done})
    return observe(jobs, store, **over)


def test_an_evicted_batch_waits_as_queued_and_gets_no_second_job() -> None:
    s: ResearchJobSpec = spec()
    jobs = [job("rj-b0", suspended=True), job("rj-b1", batch=1)]
    d = decide(s, interviewing(jobs, frozenset({0})))  # batch 0 stored analyst 0 before its eviction
    assert 0 not in d.waiting_batches and d.delete_jobs == []
    assert d.status.batches.queued == 2  # the evicted batch 0 and batch 2, which has no Job yet
    assert d.status.batches.active == 1 and d.status.active_jobs == ["rj-b1"]
    assert d.waiting_batches == [2]


def test_a_suspended_batch_whose_sections_are_all_stored_is_deleted() -> None:
    d = decide(spec(), interviewing([job("rj-b0", suspended=True)], frozenset({0, 1})))
    assert d.delete_jobs == ["rj-b0"]  # it would only hold its place in the queue


def test_failure_also_deletes_jobs_still_waiting_in_kueue() -> None:
    s = spec(budget={"maxTokens": 1000})
    store = StoreView(analysts={PID: analysts(6)}, sections={PID: frozenset()}, tokens=5000)
    d = decide(s, observe([job("rj-b0"), job("rj-b1", batch=1, suspended=True)], store))
    assert d.status.phase == Phase.Failed
    assert sorted(d.delete_jobs) == ["rj-b0", "rj-b1"]


def test_suspended_jobs_hold_a_slot_under_the_caps() -> None:
    assert job("x", suspended=True).unfinished and not job("x", suspended=True).active
    assert not job("x", succeeded=True).unfinished and not job("x", failed=True).unfinished


# -- localkube.kueue: Kueue's manifests made fit for a cluster without a Service network ---------


def fake_kueue_home(tmp: Path) -> Path:
    """The layout hack/build-kueue.sh copies from Kueue's module source, with a few objects."""
    import yaml

    crd, hooks, rbac = tmp / "config" / "crd", tmp / "config" / "webhook", tmp / "config" / "rbac"
    for d in (crd / "bases", crd / "patches", hooks, rbac):
        d.mkdir(parents=True)
    for name in ("workloads", "resourceflavors"):
        (crd / "bases" / f"kueue.x-k8s.io_{name}.yaml").write_text(
            yaml.safe_dump(
                {"kind": "CustomResourceDefinition", "metadata": {"name": f"{name}.kueue.x-k8s.io"}, "spec": {}}
            )
        )
    patch = {"metadata": {"name": "workloads.kueue.x-k8s.io"}, "spec": {"conversion": {"strategy": "Webhook"}}}
    (crd / "patches" / "webhook_in_workloads.yaml").write_text(yaml.safe_dump(patch))
    (crd / "kustomization.yaml").write_text(
        yaml.safe_dump({"patches": [{"path": "patches/webhook_in_workloads.yaml"}]})
    )

    def hook(name: str, group: str, resource: str) -> dict[str, Any]:
        path = f"/mutate-{group}-{resource}"
        return {
            "name": name,
            "clientConfig": {"service": {"name": "webhook-service", "namespace": "system", "path": path}},
            "rules": [{"apiGroups": [group], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": [resource]}],
            "failurePolicy": "Fail",
        }

    mutating = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "mutating-webhook-configuration"},
        "webhooks": [
            hook("mjob.kb.io", "batch", "jobs"),
            hook("mpod.kb.io", "", "pods"),
            hook("mworkload.kb.io", "kueue.x-k8s.io", "workloads"),
            hook("mrayjob.kb.io", "ray.io", "rayjobs"),
        ],
    }
    (hooks / "manifests.yaml").write_text(yaml.safe_dump(mutating))
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "manager-role"}}
    (rbac / "role.yaml").write_text(yaml.safe_dump(role))
    (rbac / "metrics_auth_role.yaml").write_text(yaml.safe_dump({**role, "metadata": {"name": "metrics-auth-role"}}))
    return tmp


def test_only_served_webhooks_are_registered_and_they_call_loopback(tmp_path: Path) -> None:
    home = fake_kueue_home(tmp_path)
    (mutating,) = localkueue.webhook_configurations(home, "https://127.0.0.1:9443", "Q0E=")
    assert mutating["metadata"]["name"] == "kueue-mutating-webhook-configuration"
    # Only the batch/job integration runs: a pod or RayJob webhook nobody serves would block creates.
    assert [h["name"] for h in mutating["webhooks"]] == ["mjob.kb.io", "mworkload.kb.io"]
    assert mutating["webhooks"][0]["clientConfig"] == {
        "url": "https://127.0.0.1:9443/mutate-batch-jobs",
        "caBundle": "Q0E=",
    }


def test_patched_crds_convert_through_loopback_and_the_manager_gets_kueues_roles(tmp_path: Path) -> None:
    home = fake_kueue_home(tmp_path)
    by_name = {c["metadata"]["name"]: c for c in localkueue.crds(home, "https://127.0.0.1:9443", "Q0E=")}
    conv = by_name["workloads.kueue.x-k8s.io"]["spec"]["conversion"]
    assert conv["webhook"]["clientConfig"] == {"url": "https://127.0.0.1:9443/convert", "caBundle": "Q0E="}
    assert "conversion" not in by_name["resourceflavors.kueue.x-k8s.io"]["spec"]
    objs = localkueue.rbac(home)
    bindings = [o for o in objs if o["kind"] == "ClusterRoleBinding"]
    assert {b["roleRef"]["name"] for b in bindings} == {"kueue-manager-role", "kueue-metrics-auth-role"}
    assert all(
        b["subjects"] == [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "kueue-manager"}]
        for b in bindings
    )
    cfg = localkueue.configuration(9443, 8081, 8443, tmp_path / "certs")
    assert cfg["internalCertManagement"] == {"enable": False}
    assert cfg["webhook"] == {"host": "127.0.0.1", "port": 9443, "certDir": str(tmp_path / "certs")}
    assert cfg["integrations"]["frameworks"] == ["batch/job"]
