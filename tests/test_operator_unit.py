"""The operator's pure decisions and builders, without a cluster."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from research_api.researchjob import AnalystStatus, Phase, ReportRef, ResearchJobSpec, ResearchJobStatus
from research_api.task import ResearchTask, Step
from research_operator.admission import (
    Caps,
    Demand,
    PodResources,
    QuotaUsage,
    QuotaVerdict,
    admit,
    quota_headroom,
)
from research_operator.builders import Owner, worker_job, worker_rbac
from research_operator.constants import plan_id
from research_operator.reconcile import JobView, Observed, StoreView, decide
from research_operator.settings import Settings

T0 = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
POD = PodResources.from_spec({"cpu": "100m", "memory": "256Mi"}, {"cpu": "1", "memory": "1Gi"})


def spec(**over: Any) -> ResearchJobSpec:
    base: dict[str, Any] = {
        "topic": "How Kubernetes schedules batch work",
        "analysts": {"count": 6},
        "parallelism": {"batchSize": 2, "maxActiveJobs": 2},
        "sources": [{"type": "documents", "configMap": "corpus"}],
    }
    base.update(over)
    return ResearchJobSpec.model_validate(base)


def analysts(n: int) -> list[AnalystStatus]:
    return [AnalystStatus(name=f"A{i}", role="r", affiliation="a", description="d") for i in range(n)]


def observe(
    jobs: list[JobView] | None = None,
    store: StoreView | None = None,
    prev: ResearchJobStatus | None = None,
    now: dt.datetime = T0,
) -> Observed:
    return Observed(
        generation=1,
        created=T0,
        now=now,
        jobs=jobs or [],
        store=store or StoreView(),
        previous=prev or ResearchJobStatus(),
    )


PID = plan_id(None)


# -- admission -------------------------------------------------------------------------------


def test_job_count_quota_leaves_room_for_exactly_the_remaining_jobs() -> None:
    q = QuotaUsage("q", {"count/jobs.batch": "3"}, {"count/jobs.batch": "1"})
    assert quota_headroom([q], POD).jobs == 2
    full = QuotaUsage("q", {"count/jobs.batch": "1"}, {"count/jobs.batch": "1"})
    verdict = quota_headroom([full], POD)
    assert verdict.blocked and verdict.binding == "q: count/jobs.batch 1/1"


def test_cpu_and_memory_quota_count_the_pod_requests_and_limits() -> None:
    q = QuotaUsage(
        "compute",
        {"requests.cpu": "1", "requests.memory": "8Gi", "limits.memory": "3Gi"},
        {"requests.cpu": "700m", "requests.memory": "0", "limits.memory": "1Gi"},
    )
    # cpu: 300m left / 100m = 3; memory limits: 2Gi left / 1Gi = 2 -> the tighter wins.
    verdict = quota_headroom([q], POD)
    assert verdict.jobs == 2
    assert verdict.binding is not None and "limits.memory" in verdict.binding


def test_no_quota_means_no_quota_limit() -> None:
    assert quota_headroom([], POD).jobs is None
    assert quota_headroom([QuotaUsage("cm", {"configmaps": "10"}, {"configmaps": "2"})], POD).jobs is None


def test_admission_never_exceeds_the_researchjob_limit_or_caps() -> None:
    me = Demand("ns", "a", active=1, waiting=5)
    assert admit(me, 2, [me], Caps(), QuotaVerdict(None)) == 1
    assert admit(me, 10, [me], Caps(global_max_active=3), QuotaVerdict(None)) == 2
    other = Demand("ns", "b", active=2, waiting=0)
    assert admit(me, 10, [me, other], Caps(namespace_max_active=4), QuotaVerdict(None)) == 1
    assert admit(me, 10, [me], Caps(), QuotaVerdict(0, "q")) == 0


def test_a_big_researchjob_cannot_starve_a_small_one() -> None:
    big = Demand("ns", "big", active=3, waiting=20)
    small = Demand("ns", "small", active=0, waiting=1)
    caps = Caps(global_max_active=4)
    # One slot is free: it is owed to the small job (below its fair share of 2), not the big one.
    assert admit(big, 10, [big, small], caps, QuotaVerdict(None)) == 0
    assert admit(small, 10, [big, small], caps, QuotaVerdict(None)) == 1
    # Alone, the big job may use every slot.
    assert admit(Demand("ns", "big", 0, 20), 10, [Demand("ns", "big", 0, 20)], caps, QuotaVerdict(None)) == 4


# -- reconcile ---------------------------------------------------------------------------------


def test_new_job_plans_first() -> None:
    d = decide(spec(), observe())
    assert d.status.phase == Phase.Planning and d.create_plan
    assert not d.waiting_batches
    assert d.events and d.events[0][1] == "Planning"


def test_running_planner_is_not_created_twice() -> None:
    d = decide(spec(), observe(jobs=[JobView(f"rj-{PID}-plan", "plan", PID)]))
    assert d.status.phase == Phase.Planning and not d.create_plan


def test_planned_analysts_become_batches_and_the_planner_job_is_removed() -> None:
    store = StoreView(analysts={PID: analysts(6)})
    d = decide(spec(), observe(jobs=[JobView("p", "plan", PID, succeeded=True)], store=store))
    assert d.status.phase == Phase.Interviewing
    assert d.waiting_batches == [0, 1, 2]
    assert d.status.batches.total == 3 and d.status.batches.queued == 3
    assert "p" in d.delete_jobs
    assert d.status.progress == "0/6"


def test_review_waits_for_approval_and_feedback_replans() -> None:
    store = StoreView(analysts={PID: analysts(6)})
    d = decide(spec(analysts={"count": 6, "review": True}), observe(store=store))
    assert d.status.phase == Phase.AwaitingReview and not d.waiting_batches
    waiting = {c.type: c for c in d.status.conditions or []}["AwaitingReview"]
    assert waiting.status == "True" and "approved=true" in waiting.message
    assert d.status.analysts and d.status.analysts[0].name == "A0"
    d = decide(spec(analysts={"count": 6, "review": True, "approved": True}), observe(store=store))
    assert d.status.phase == Phase.Interviewing
    d = decide(spec(analysts={"count": 6, "review": True, "feedback": "add an economist"}), observe(store=store))
    assert d.status.phase == Phase.Planning and d.create_plan
    assert d.status.plan_id == plan_id("add an economist") != PID


def test_finished_batches_free_their_jobs_and_sections_count() -> None:
    store = StoreView(analysts={PID: analysts(6)}, sections={PID: frozenset({0, 1, 2})})
    jobs = [JobView("b0", "interview", PID, 0, succeeded=True), JobView("b1", "interview", PID, 1)]
    d = decide(spec(), observe(jobs=jobs, store=store))
    assert d.status.progress == "3/6"
    assert d.delete_jobs == ["b0"]
    assert d.waiting_batches == [2]
    assert d.status.batches.active == 1 and d.status.batches.succeeded == 1


def test_all_sections_then_writer_then_succeeded() -> None:
    done = StoreView(analysts={PID: analysts(6)}, sections={PID: frozenset(range(6))})
    d = decide(spec(), observe(store=done))
    assert d.status.phase == Phase.Writing and d.create_writer
    report = StoreView(
        analysts=done.analysts,
        sections=done.sections,
        reports={PID: ReportRef(config_map="rj-report", key="report.md")},
    )
    d = decide(spec(), observe(store=report, prev=d.status))
    assert d.status.phase == Phase.Succeeded
    assert d.status.report and d.status.report.config_map == "rj-report"
    assert {c.type: c.status for c in d.status.conditions or []}["Complete"] == "True"


def test_failed_batch_fails_the_job_naming_the_analysts() -> None:
    store = StoreView(analysts={PID: analysts(6)}, sections={PID: frozenset({0})})
    jobs = [
        JobView("b0", "interview", PID, 0, failed=True, message="BackoffLimitExceeded"),
        JobView("b1", "interview", PID, 1),
    ]
    d = decide(spec(), observe(jobs=jobs, store=store))
    assert d.status.phase == Phase.Failed
    assert d.status.failed_analysts == ["A1"]
    assert "A1" in (d.status.message or "") and "BackoffLimitExceeded" in (d.status.message or "")
    assert "b1" in d.delete_jobs  # stop spending on a job that failed
    assert not d.waiting_batches
    assert d.events[-1][0] == "Warning"


def test_token_budget_and_deadline_end_in_failed() -> None:
    store = StoreView(analysts={PID: analysts(6)}, tokens=5000)
    d = decide(spec(budget={"maxTokens": 4000}), observe(store=store))
    assert d.status.phase == Phase.Failed and "5000" in (d.status.message or "")
    d = decide(spec(budget={"deadlineSeconds": 60}), observe(now=T0 + dt.timedelta(seconds=61)))
    assert d.status.phase == Phase.Failed
    assert {c.type: c.reason for c in d.status.conditions or []}["Failed"] == "DeadlineExceeded"


def test_condition_transition_time_is_kept_while_status_is_unchanged() -> None:
    first = decide(spec(), observe()).status
    later = decide(spec(), observe(prev=first, now=T0 + dt.timedelta(minutes=5))).status
    planned = {c.type: c for c in later.conditions or []}["Planned"]
    assert planned.last_transition_time == "2026-11-23T12:00:00Z"


def test_jobs_of_a_superseded_plan_are_deleted() -> None:
    d = decide(spec(analysts={"count": 6, "feedback": "more economists"}), observe(jobs=[JobView("old", "plan", PID)]))
    assert "old" in d.delete_jobs


def test_ttl_after_finished_deletes_the_researchjob() -> None:
    store = StoreView(reports={PID: ReportRef(config_map="r")})
    prev = ResearchJobStatus(phase=Phase.Succeeded, completion_time="2026-11-23T12:00:00Z")
    d = decide(spec(ttlSecondsAfterFinished=30), observe(store=store, prev=prev, now=T0 + dt.timedelta(seconds=31)))
    assert d.delete_self
    d = decide(spec(ttlSecondsAfterFinished=30), observe(store=store, prev=prev, now=T0 + dt.timedelta(seconds=5)))
    assert not d.delete_self


# -- builders ----------------------------------------------------------------------------------


def test_worker_job_is_owned_restricted_and_carries_a_valid_task() -> None:
    owner = Owner("research", "k8s-batch", "uid-1")
    s = spec(model={"apiKeySecretRef": {"name": "openai", "key": "api-key"}})
    job = worker_job(owner, s, Settings(), PID, Step.INTERVIEW, [2, 3], 1)
    assert job["metadata"]["name"] == f"k8s-batch-{PID}-b1"
    ref = job["metadata"]["ownerReferences"][0]
    assert ref["controller"] and ref["uid"] == "uid-1" and ref["kind"] == "ResearchJob"
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"] == ["research-worker", "interview"]
    assert c["securityContext"]["runAsNonRoot"] and c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    env = {e["name"]: e for e in c["env"]}
    assert env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "openai", "key": "api-key"}
    task = ResearchTask.model_validate(json.loads(env["RESEARCH_TASK"]["value"]))
    assert task.analysts == [2, 3] and task.plan == PID and task.job.uid == "uid-1"
    assert task.model.base_url == Settings().default_model_base_url
    assert "api-key" not in env["RESEARCH_TASK"]["value"]
    assert c["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    ignore, fail = job["spec"]["podFailurePolicy"]["rules"]
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    assert fail["action"] == "FailJob" and fail["onExitCodes"]["values"] == [2, 3, 5]


def test_child_names_fit_in_63_characters() -> None:
    owner = Owner("ns", "a" * 40, "u")
    job = worker_job(owner, spec(), Settings(), PID, Step.INTERVIEW, [0], 12)
    assert len(job["metadata"]["name"]) <= 63


def test_kueue_mode_creates_suspended_jobs_with_the_queue_label() -> None:
    owner = Owner("ns", "rj", "u")
    job = worker_job(owner, spec(), Settings(kueue_queue="research"), PID, Step.INTERVIEW, [0, 1], 0)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "research"


def test_worker_rbac_grants_only_configmaps_in_the_namespace() -> None:
    sa, role, binding = worker_rbac(Owner("ns", "rj", "u"))
    assert sa["kind"] == "ServiceAccount" and binding["subjects"][0]["name"] == sa["metadata"]["name"]
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    assert resources == {"configmaps", "researchjobs"}
    assert all("delete" not in rule["verbs"] and "*" not in rule["verbs"] for rule in role["rules"])


def test_settings_configmap_changes_caps_and_rejects_garbage() -> None:
    s = Settings().with_configmap({"globalMaxActiveJobs": "3", "namespaceMaxActiveJobs": "1"})
    assert s.caps == Caps(3, 1)
    try:
        Settings().with_configmap({"globalMaxActiveJobs": "lots"})
    except ValueError as e:
        assert "globalMaxActiveJobs" in str(e)
    else:
        raise AssertionError("a non-integer cap must be rejected")


# -- the store contract: what the worker writes, the operator reads -------------------------------


class _RecordingCore:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def create_namespaced_config_map(self, namespace: str, body: dict[str, Any]) -> None:
        self.bodies.append(body)


async def test_operator_reads_what_the_worker_configmap_store_writes() -> None:
    from research_operator.world import World, stored_object
    from research_worker.state import Analyst, Report, Section, TokenUsage
    from research_worker.store import AnalystPlan, ConfigMapStore

    owner = Owner("ns", "rj", "uid-1")
    task = ResearchTask.model_validate(
        json.loads(
            worker_job(owner, spec(), Settings(), PID, Step.INTERVIEW, [0, 1], 0)["spec"]["template"]["spec"][
                "containers"
            ][0]["env"][0]["value"]
        )
    )
    store = ConfigMapStore(task, api_client=None)
    store.core = _RecordingCore()
    people = [Analyst(name=f"A{i}", role="r", affiliation="a", description="d") for i in range(2)]
    await store.save_analysts(AnalystPlan(topic="t", analysts=people, usage=TokenUsage(total_tokens=100)))
    for i in range(2):
        await store.save_section(
            Section(
                index=i,
                analyst=people[i],
                title="T",
                content="## T",
                summary="s",
                sources=["a.md"],
                found_sources=True,
                usage=TokenUsage(total_tokens=1000),
            )
        )
    await store.save_report(
        Report(
            topic="t", markdown="# The Title\n\nbody", sources=[], sections=[0, 1], usage=TokenUsage(total_tokens=50)
        )
    )
    objs = [stored_object(body) for body in store.core.bodies]
    assert all(obj is not None for obj in objs)
    view = World(stored_index={("ns", "rj"): objs}).store_view(("ns", "rj"))
    assert [a.name for a in view.analysts[PID]] == ["A0", "A1"]
    assert view.sections[PID] == frozenset({0, 1})
    assert view.tokens == 2150
    report = view.reports[PID]
    assert report.title == "The Title" and report.key == "report.md"
    assert all(b["metadata"]["ownerReferences"][0]["uid"] == "uid-1" for b in store.core.bodies)


def test_the_writer_job_is_removed_once_the_report_is_stored() -> None:
    store = StoreView(
        analysts={PID: analysts(2)},
        sections={PID: frozenset({0, 1})},
        reports={PID: ReportRef(config_map="r", key="report.md")},
    )
    d = decide(spec(analysts={"count": 2}), observe(jobs=[JobView("w", "write", PID, succeeded=True)], store=store))
    assert d.status.phase == Phase.Succeeded and d.delete_jobs == ["w"]
