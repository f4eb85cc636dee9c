"""The operator's pure decisions and builders, without a cluster."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from decimal import Decimal
from typing import Any

from research_api import leases as wire
from research_api.records import CitationCheck, ReportQuality
from research_api.researchjob import AnalystStatus, Phase, ReportRef, ResearchJobSpec, ResearchJobStatus, SecretKeyRef
from research_api.task import QualityFloor, ResearchTask, Step
from research_operator.actions.kube import termination_detail
from research_operator.cache.views import job_view
from research_operator.constants import plan_id
from research_operator.decisions import endpoints as ep
from research_operator.decisions.admission import (
    BudgetVerdict,
    Caps,
    Demand,
    EndpointVerdict,
    PodResources,
    QuotaUsage,
    QuotaVerdict,
    WaitReason,
    admit,
    decide_admission,
    never_fits,
    quota_headroom,
)
from research_operator.decisions.manifests import (
    Owner,
    add_lease_broker_token,
    cleanup_job,
    worker_job,
    worker_job_and_task,
    worker_rbac,
)
from research_operator.decisions.reconcile import (
    JobView,
    Observed,
    StoreView,
    Waiting,
    continues_steps,
    decide,
)
from research_operator.decisions.status import apply_waiting, batches_started
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


def _reported(quality: ReportQuality) -> StoreView:
    return StoreView(
        analysts={PID: analysts(6)},
        sections={PID: frozenset(range(6))},
        reports={PID: ReportRef(config_map="rj-report", key="report.md")},
        qualities={PID: quality},
    )


def _quality(supported: int, checked: int, dropped: int, relevant_cited: int = 3) -> ReportQuality:
    return ReportQuality(
        sections=CitationCheck(checked=40, supported=39, recited=1),  # repaired before the report was written
        report=CitationCheck(checked=checked, supported=supported, dropped=dropped),
        sources_retrieved=4,
        sources_cited=3,
        relevant=["a.md", "b.md", "c.md"],
        relevant_cited=relevant_cited,
        uncited=["c.md"] if relevant_cited < 3 else [],
    )


def test_a_reports_quality_is_in_the_status_with_a_grounded_condition() -> None:
    d = decide(spec(), observe(store=_reported(_quality(30, 30, 0))))
    assert d.status.phase == Phase.Succeeded
    q = d.status.quality
    assert q is not None
    assert (q.sentences_checked, q.sentences_supported, q.citation_accuracy, q.coverage) == (30, 30, 100, 100)
    assert (q.sources_retrieved, q.sources_cited, q.relevant_documents, q.relevant_cited) == (4, 3, 3, 3)
    assert (q.section_sentences_checked, q.section_sentences_supported, q.section_sentences_recited) == (40, 39, 1)
    grounded = {c.type: c for c in d.status.conditions or []}["Grounded"]
    assert (grounded.status, grounded.reason) == ("True", "CitationsSupported")
    assert "30 of 30 cited sentences supported" in grounded.message


def test_unsupported_citations_show_in_status_and_without_a_floor_the_job_succeeds() -> None:
    d = decide(spec(), observe(store=_reported(_quality(28, 30, 2))))
    assert d.status.phase == Phase.Succeeded
    assert d.status.quality and d.status.quality.citation_accuracy == 93 and d.status.quality.sentences_dropped == 2
    grounded = {c.type: c for c in d.status.conditions or []}["Grounded"]
    assert (grounded.status, grounded.reason) == ("False", "UnsupportedCitations")


def test_a_report_below_the_quality_floor_fails_the_job_with_the_figures() -> None:
    floored = spec(quality={"minCitationAccuracy": 95})
    d = decide(floored, observe(store=_reported(_quality(28, 30, 2))))
    assert d.status.phase == Phase.Failed
    assert d.status.report and d.status.report.config_map == "rj-report"  # still there to read
    assert d.status.message == (
        "the report misses the quality floor: citation accuracy 93% (28 of 30 cited sentences supported; "
        "0 re-cited, 2 dropped) is below 95%"
    )
    conds = {c.type: c for c in d.status.conditions or []}
    assert (conds["Failed"].status, conds["Failed"].reason) == ("True", "BelowQualityFloor")
    assert (conds["Grounded"].status, conds["Grounded"].reason) == ("False", "BelowQualityFloor")
    assert decide(floored, observe(store=_reported(_quality(30, 30, 0)))).status.phase == Phase.Succeeded


def test_a_report_that_cites_nothing_it_retrieved_is_not_grounded_and_misses_any_accuracy_floor() -> None:
    silent = ReportQuality(sources_retrieved=5, relevant=["a.md", "b.md"])  # no sentence cites a source
    d = decide(spec(), observe(store=_reported(silent)))
    assert d.status.phase == Phase.Succeeded and d.status.quality and d.status.quality.citation_accuracy == 0
    grounded = {c.type: c for c in d.status.conditions or []}["Grounded"]
    assert (grounded.status, grounded.reason) == ("False", "NoCitations")
    d = decide(spec(quality={"minCitationAccuracy": 50}), observe(store=_reported(silent)))
    assert d.status.phase == Phase.Failed
    assert d.status.message == (
        "the report misses the quality floor: the report cites none of the 5 sources retrieved "
        "(citation accuracy 0%, below 50%)"
    )


def test_the_admins_quality_floor_applies_where_the_spec_sets_none() -> None:
    admin = QualityFloor(min_coverage=100)
    obs = observe(store=_reported(_quality(30, 30, 0, relevant_cited=2)))
    d = decide(spec(), dataclasses.replace(obs, quality_floor=admin))
    assert d.status.phase == Phase.Failed
    assert "coverage 66% (2 of 3 relevant documents cited; not cited: c.md) is below 100%" in (d.status.message or "")
    own = spec(quality={"minCoverage": 50})  # the spec's own floor wins
    assert decide(own, dataclasses.replace(obs, quality_floor=admin)).status.phase == Phase.Succeeded


def test_a_planner_carrying_the_first_batch_holds_it_until_it_ends() -> None:
    store = StoreView(analysts={PID: analysts(6)}, sections={PID: frozenset({0})})
    carrier = JobView("p", "plan", PID, 0)
    d = decide(spec(), observe(jobs=[carrier], store=store))
    assert d.status.phase == Phase.Interviewing
    assert d.waiting_batches == [1, 2]  # batch 0 is the planner's: no Job of its own
    assert d.status.batches.active == 1 and d.status.active_jobs == ["p"]
    assert "p" not in d.delete_jobs

    # It failed before storing its batch's sections: that is the batch failing (its retries were spent).
    failed = dataclasses.replace(carrier, failed=True, message="BackoffLimitExceeded")
    d = decide(spec(), observe(jobs=[failed], store=store))
    assert d.status.phase == Phase.Failed and d.status.failed_analysts == ["A1"]
    assert "p" not in d.delete_jobs  # kept, so the failure stays

    # It ended well without them: the batch gets a Job of its own, and the planner's Job goes.
    ended = dataclasses.replace(carrier, succeeded=True)
    d = decide(spec(), observe(jobs=[ended], store=store))
    assert d.waiting_batches == [0, 1, 2] and "p" in d.delete_jobs


def test_pods_go_on_to_the_next_step_unless_a_review_or_a_token_budget_comes_between() -> None:
    assert continues_steps(spec(), budgeted=False)
    assert not continues_steps(spec(), budgeted=True)  # each step admitted against the budget
    assert not continues_steps(spec(analysts={"count": 6, "review": True}), budgeted=False)
    assert continues_steps(spec(analysts={"count": 6, "review": True, "approved": True}), budgeted=False)


def test_the_writer_job_waits_for_the_pods_that_may_write_the_report_themselves() -> None:
    done = StoreView(analysts={PID: analysts(6)}, sections={PID: frozenset(range(6))})
    last = JobView("b2", "interview", PID, 2)
    d = decide(spec(), observe(jobs=[last], store=done))
    assert d.status.phase == Phase.Writing and not d.create_writer
    assert "b2" in (d.status.message or "") and "last" in (d.status.message or "")
    d = decide(spec(), observe(jobs=[dataclasses.replace(last, succeeded=True)], store=done))
    assert d.create_writer  # it ended without a report: the writer Job writes it


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


def test_the_worker_task_carries_the_quality_floor_spec_first_then_the_admins() -> None:
    owner = Owner("research", "k8s-batch", "uid-1")
    admin = Settings(quality_floor=QualityFloor(min_citation_accuracy=90, min_coverage=80))

    def floor_of(s: ResearchJobSpec, settings: Settings) -> QualityFloor:
        job = worker_job(owner, s, settings, PID, Step.WRITE)
        env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        return ResearchTask.model_validate(json.loads(env["RESEARCH_TASK"]["value"])).quality

    assert floor_of(spec(), Settings()) == QualityFloor()
    assert floor_of(spec(), admin) == QualityFloor(min_citation_accuracy=90, min_coverage=80)
    own = spec(quality={"minCitationAccuracy": 100})
    assert floor_of(own, admin) == QualityFloor(min_citation_accuracy=100, min_coverage=80)


def test_a_planner_that_goes_on_names_its_batch_and_tells_the_worker() -> None:
    owner = Owner("research", "k8s-batch", "uid-1")
    job = worker_job(owner, spec(), Settings(), PID, Step.PLAN, [0, 1], 0, continue_steps=True)
    assert job["metadata"]["name"] == f"k8s-batch-{PID}-plan"  # still the plan step's one name
    assert job["metadata"]["labels"]["researchops.io/batch"] == "0"
    assert job_view(job).step == "plan" and job_view(job).batch == 0
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["research-worker", "plan"]
    task = ResearchTask.model_validate(json.loads({e["name"]: e for e in c["env"]}["RESEARCH_TASK"]["value"]))
    assert task.continue_steps and task.analysts == [0, 1]
    alone = worker_job(owner, spec(), Settings(), PID, Step.PLAN)
    assert "researchops.io/batch" not in alone["metadata"]["labels"]


def test_the_job_fails_at_once_on_exactly_the_worker_errors_a_retry_cannot_fix() -> None:
    from research_worker import errors

    job = worker_job(Owner("ns", "rj", "u"), spec(), Settings(), PID, Step.WRITE)
    _, fail = job["spec"]["podFailurePolicy"]["rules"]
    codes = set(fail["onExitCodes"]["values"])
    final = (errors.WorkerConfigError, errors.ModelEndpointError, errors.ModelAuthError, errors.BudgetExceeded)
    retried = (errors.WorkerError, errors.StoreError, errors.ObjectTooLarge, errors.SearchError)
    assert {e.exit_code for e in final} == codes
    assert not {e.exit_code for e in retried} & codes
    cleanup = cleanup_job(Owner("ns", "rj", "u"), SecretKeyRef(name="pg", key="dsn"), Settings())
    (rule,) = cleanup["spec"]["podFailurePolicy"]["rules"]
    assert rule["onExitCodes"]["values"] == [errors.WorkerConfigError.exit_code]


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
    docs = {"topic": "tea", "analysts": {"count": 2}, "sources": [{"type": "documents", "configMap": "corpus"}]}
    sa, role, binding = worker_rbac(Owner("ns", "rj", "u"), ResearchJobSpec.model_validate(docs), "p1")
    assert sa["kind"] == "ServiceAccount" and binding["subjects"][0]["name"] == sa["metadata"]["name"]
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    assert resources == {"configmaps", "researchjobs"}
    assert all("delete" not in rule["verbs"] and "*" not in rule["verbs"] for rule in role["rules"])
    # Reads only by name: what this plan stores, its interviews' checkpoints, its endpoint shares and
    # its documents; no list. Updates only its interviews' checkpoints.
    reads = {n for rule in role["rules"] if "get" in rule["verbs"] for n in rule["resourceNames"]}
    assert reads == {
        "rj-p1-analysts", "rj-p1-section-000", "rj-p1-section-001", "rj-p1-report", "rj-p1-report-claim",
        "rj-p1-checkpoint-000", "rj-p1-checkpoint-001", "rj-endpoint-share", "corpus", "rj",
    }  # fmt: skip
    updates = {n for rule in role["rules"] if {"update", "patch"} & set(rule["verbs"]) for n in rule["resourceNames"]}
    assert updates == {"rj-p1-checkpoint-000", "rj-p1-checkpoint-001"}
    assert not [rule for rule in role["rules"] if {"list", "watch"} & set(rule["verbs"])]


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
    from research_operator.cache.views import stored_object
    from research_operator.cache.world import World
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


# -- admission outcome, waiting status, identity ---------------------------------------------------

CASES = [
    # (what the case is, me, own limit, peers, caps, quota verdict, too small) -> (admitted, reason, words)
    ("nothing limits", Demand("ns", "a", 0, 3), 5, [], Caps(), QuotaVerdict(None), None, (3, None, "")),
    (
        "own maxActiveJobs",
        Demand("ns", "a", 2, 3),
        3,
        [],
        Caps(),
        QuotaVerdict(None),
        None,
        (1, WaitReason.MAX_ACTIVE_JOBS, "maxActiveJobs=3"),
    ),
    (
        "global cap full",
        Demand("ns", "a", 0, 1),
        1,
        [Demand("other", "b", 2, 0)],
        Caps(global_max_active=2),
        QuotaVerdict(None),
        None,
        (0, WaitReason.GLOBAL_CAP, "globalMaxActiveJobs=2: 2 worker Jobs running"),
    ),
    (
        "namespace cap binds before global",
        Demand("ns", "a", 0, 4),
        4,
        [Demand("ns", "b", 3, 0)],
        Caps(global_max_active=10, namespace_max_active=4),
        QuotaVerdict(None),
        None,
        (1, WaitReason.NAMESPACE_CAP, "namespaceMaxActiveJobs=4"),
    ),
    (
        "fair share owed to a small job",
        Demand("ns", "big", 3, 20),
        10,
        [Demand("ns", "small", 0, 1)],
        Caps(global_max_active=4),
        QuotaVerdict(None),
        None,
        (0, WaitReason.FAIR_SHARE, "fair share of 2"),
    ),
    (
        "quota headroom",
        Demand("ns", "a", 0, 3),
        3,
        [],
        Caps(),
        QuotaVerdict(1, "q: pods 1/2"),
        None,
        (1, WaitReason.EXCEEDED_QUOTA, "ResourceQuota q: pods 1/2"),
    ),
    (
        "quota too small beats everything",
        Demand("ns", "a", 0, 1),
        1,
        [],
        Caps(global_max_active=5),
        QuotaVerdict(0, "q: requests.cpu 0/50m"),
        "ResourceQuota q allows requests.cpu 50m",
        (0, WaitReason.QUOTA_TOO_SMALL, "allows requests.cpu 50m"),
    ),
]


def test_admission_names_the_limit_that_holds_jobs_back() -> None:
    for what, me, own, peers, caps, quota, small, (n, reason, words) in CASES:
        a = decide_admission(me, own, [me, *peers], caps, quota, small)
        assert (a.admitted, a.reason) == (n, reason), what
        assert words in a.message, (what, a.message)


def test_a_quota_below_one_worker_pod_is_named_with_resource_request_and_limit() -> None:
    pod = PodResources.from_spec({"cpu": "100m", "memory": "256Mi"}, {"memory": "1Gi"})
    assert never_fits([QuotaUsage("roomy", {"requests.cpu": "1"}, {})], pod) is None
    why = never_fits([QuotaUsage("tiny", {"requests.cpu": "50m", "pods": "5"}, {"requests.cpu": "0"})], pod)
    assert why is not None and "tiny" in why and "requests.cpu 50m" in why and "100m" in why
    why = never_fits([QuotaUsage("mem", {"limits.memory": "512Mi"}, {})], pod)
    assert why is not None and "limits.memory 512Mi" in why and "1024Mi" in why
    assert "count/jobs.batch 0" in (never_fits([QuotaUsage("none", {"count/jobs.batch": "0"}, {})], pod) or "")


def test_reserved_consumption_keeps_two_passes_from_sharing_headroom() -> None:
    q = QuotaUsage("q", {"pods": "2", "requests.cpu": "1"}, {"pods": "0", "requests.cpu": "0"})
    assert quota_headroom([q], POD).jobs == 2
    reserved = {"pods": Decimal(1), "requests.cpu": Decimal("0.1")}
    assert quota_headroom([q], POD, reserved).jobs == 1


def _waiting_status(w: Waiting, prev: ResearchJobStatus | None = None) -> tuple[ResearchJobStatus, list[Any]]:
    st = ResearchJobStatus(phase=Phase.Planning, message="planning the analyst panel")
    events = apply_waiting(st, prev or ResearchJobStatus(), w, 1, T0)
    return st, events


def test_waiting_for_quota_sets_the_condition_the_message_and_one_warning() -> None:
    w = Waiting("the planner Job", WaitReason.EXCEEDED_QUOTA, "ResourceQuota q: count/jobs.batch 2/2")
    st, events = _waiting_status(w)
    conds = {c.type: c for c in st.conditions or []}
    assert conds["QuotaExceeded"].status == "True" and conds["QuotaExceeded"].reason == "ExceededQuota"
    assert "count/jobs.batch 2/2" in conds["QuotaExceeded"].message
    assert conds["Throttled"].status == "False" and conds["WorkerPodsBlocked"].status == "False"
    assert st.message == "waiting for quota: the planner Job: ResourceQuota q: count/jobs.batch 2/2"
    assert [(e[0], e[1]) for e in events] == [("Warning", "QuotaExceeded")]
    # The same wait on the next pass posts nothing new.
    st2, again = _waiting_status(w, prev=st)
    assert again == [] and st2.conditions == st.conditions


def test_a_quota_too_small_never_reads_as_running() -> None:
    w = Waiting("the planner Job", WaitReason.QUOTA_TOO_SMALL, "ResourceQuota tiny allows requests.cpu 50m, ...")
    st, events = _waiting_status(w)
    assert st.message is not None and st.message.startswith("cannot start the planner Job")
    assert "running" not in st.message
    assert [(e[0], e[1]) for e in events] == [("Warning", "QuotaTooSmall")]
    cond = next(c for c in st.conditions or [] if c.type == "QuotaExceeded")
    assert (cond.status, cond.reason) == ("True", "QuotaTooSmall")


def test_a_cap_sets_throttled_and_failed_pod_creation_is_reported() -> None:
    st, events = _waiting_status(Waiting("2 interview batches", WaitReason.GLOBAL_CAP, "globalMaxActiveJobs=1: 1 ..."))
    cond = next(c for c in st.conditions or [] if c.type == "Throttled")
    assert (cond.status, cond.reason) == ("True", "GlobalCap")
    assert st.message is not None and "waiting for a slot" in st.message
    assert events[0][:2] == ("Normal", "Throttled")
    blocked = "planner Job rj-x-plan cannot create its pod: forbidden: exceeded quota"
    st, events = _waiting_status(Waiting(pods_blocked=blocked))
    assert st.message == blocked and ("Warning", "FailedCreate", blocked) in events
    # Nothing waits: every waiting condition is False.
    st, events = _waiting_status(Waiting())
    assert all(c.status == "False" for c in st.conditions or []) and events == []


def test_plan_ids_and_child_names_belong_to_one_researchjob_uid() -> None:
    assert plan_id(None, "uid-1") != plan_id(None, "uid-2")
    assert plan_id("more economists", "uid-1") != plan_id(None, "uid-1")
    s = spec()
    a = decide(s, dataclasses.replace(observe(), uid="uid-1")).status.plan_id
    b = decide(s, dataclasses.replace(observe(), uid="uid-2")).status.plan_id
    assert a != b


def test_world_keys_jobs_by_researchjob_uid_and_deletes_by_job_uid() -> None:
    from research_operator.cache.world import World

    w = World()
    old = JobView(name="rj-p-b0", step="interview", plan="p", batch=0, uid="job-old")
    w.attach({("ns", "uid-old"): [old]}, {}, {})
    assert w.jobs_of(("ns", "uid-new")) == {}  # a new ResearchJob of the same name has no Jobs yet
    w.deleted[("ns", "uid-old")].add("job-old")
    assert w.jobs_of(("ns", "uid-old")) == {}
    w.attach({}, {}, {})  # the watch saw it go
    w.job_deleted(("ns", "uid-old"), "job-old")
    assert not w.deleted[("ns", "uid-old")]
    # What this process created counts before the watch shows it, against caps and quota alike.
    w.created[("ns", "uid-new")]["rj-q-plan"] = JobView(name="rj-q-plan", step="plan", plan="q", pod=POD)
    assert [(d.name, d.active) for d in w.demands()] == [("uid-new", 1)]
    assert w.reserved("ns")["count/jobs.batch"] == 1 and w.reserved("ns")["pods"] == 1
    assert w.reserved("other") == {}


def test_scoped_quotas_count_only_the_pods_they_select() -> None:
    full = {"pods": "0"}
    terminating = QuotaUsage("t", full, {}, scopes=("Terminating",))
    best_effort = QuotaUsage("be", full, {}, scopes=("BestEffort",))
    not_best_effort = QuotaUsage("nbe", full, {}, scopes=("NotBestEffort", "NotTerminating"))
    high = QuotaUsage("high", full, {}, selector=(("PriorityClass", "In", ("high",)),))
    no_class = QuotaUsage("plain", full, {}, selector=(("PriorityClass", "DoesNotExist", ()),))
    # Worker pods have requests and no pod-level deadline: NotBestEffort, NotTerminating.
    assert quota_headroom([terminating, best_effort], POD).jobs is None
    assert quota_headroom([not_best_effort], POD).jobs == 0
    assert quota_headroom([high], POD).jobs is None
    assert quota_headroom([high], POD, priority_class="high").jobs == 0
    assert quota_headroom([no_class], POD).jobs == 0 and quota_headroom([no_class], POD, None, "low").jobs is None
    assert never_fits([high], POD) is None and never_fits([high], POD, "high") is not None


def test_only_our_jobs_configmaps_and_failedcreate_events_are_watched() -> None:
    """The API server filters what reaches the operator: our labels on Jobs and ConfigMaps (the
    settings ConfigMap included), FailedCreate of Jobs on Events; ResearchJobs are ours whole."""
    import kopf
    from kopf._cogs.structs.references import Resource

    from research_operator.registration import handlers

    settings = kopf.OperatorSettings()
    handlers.configure_watching(settings)
    watching = settings.watching

    def selectors(group: str, plural: str, kind: str) -> tuple[list[str], list[str]]:
        r = Resource(group, "v1", plural, kind=kind, namespaced=True)
        return watching.label_selectors.collect(r), watching.field_selectors.collect(r)

    assert selectors("batch", "jobs", "Job") == (["researchops.io/job"], [])
    assert selectors("", "configmaps", "ConfigMap") == (["researchops.io/kind"], [])
    assert selectors("", "events", "Event") == ([], ["involvedObject.kind=Job,reason=FailedCreate"])
    assert selectors("researchops.io", "researchjobs", "ResearchJob") == ([], [])
    assert selectors("", "pods", "Pod") == ([], [])


# ---- shared model endpoints and namespace token budgets ----------------------------------------

EP = ep.Endpoint("shared", "http://model.example:8080/v1/", 8, requests_per_minute=600, tokens_per_minute=60000)


def test_an_endpoint_admits_pods_while_their_requests_in_flight_fit() -> None:
    me = Demand("a", "rj", 0, 5)
    cases = [  # (in use, demand per pod, admitted)
        (0, 2, 4),
        (6, 2, 1),
        (7, 2, 0),
        (8, 1, 0),
        (0, 3, 2),
    ]
    for in_use, need, want in cases:
        v = EndpointVerdict("shared", 8, in_use, need)
        adm = decide_admission(me, 50, [me], Caps(), QuotaVerdict(None), endpoint=v)
        assert adm.admitted == want, (in_use, need)
        if want < 5:
            assert adm.reason == WaitReason.ENDPOINT_CAPACITY
            assert f"{in_use}/8 requests in flight" in adm.message


def test_pods_beyond_the_capacity_stand_by_paused_and_take_freed_shares_in_admission_order() -> None:
    v = EndpointVerdict("shared", 8, 8, 2, standby=8)  # full, room for 4 more pods standing by
    me = Demand("a", "rj", 0, 6)
    adm = decide_admission(me, 50, [me], Caps(), QuotaVerdict(None), endpoint=v)
    assert (adm.admitted, adm.reason) == (4, WaitReason.ENDPOINT_CAPACITY)
    assert "8/8 requests in flight admitted" in EndpointVerdict("shared", 8, 12, 2, 8).message
    assert "4 more standing by" in EndpointVerdict("shared", 8, 12, 2, 8).message
    pods = [ep.PodUse("a", "rj", f"j{i}", 3, admitted=f"{100 + i}") for i in range(4)]
    table = ep.shares(EP, pods)
    assert [table[f"j{i}"].concurrency for i in range(4)] == [3, 3, 2, 0]  # the last one waits paused
    assert table["j3"].tokens_per_minute == 0
    after = ep.shares(EP, pods[1:])  # the first ends: the paused one gets its share
    assert [after[f"j{i}"].concurrency for i in range(1, 4)] == [3, 3, 2]


def test_the_tightest_limit_names_the_wait_endpoint_or_quota() -> None:
    me = Demand("a", "rj", 0, 4)
    v = EndpointVerdict("shared", 8, 4, 2)  # room for 2
    adm = decide_admission(me, 50, [me], Caps(), QuotaVerdict(1, "q: pods 3/4"), endpoint=v)
    assert (adm.admitted, adm.reason) == (1, WaitReason.EXCEEDED_QUOTA)
    adm = decide_admission(me, 50, [me], Caps(), QuotaVerdict(3, "q: pods 1/4"), endpoint=v)
    assert (adm.admitted, adm.reason) == (2, WaitReason.ENDPOINT_CAPACITY)


def test_a_spent_token_budget_starts_nothing_and_says_until_when() -> None:
    me = Demand("team", "rj", 0, 2)
    spent = BudgetVerdict("team", 10000, 10400, "1h", "2026-11-23T13:00:00Z")
    adm = decide_admission(me, 50, [me], Caps(), QuotaVerdict(None), budget=spent)
    assert (adm.admitted, adm.reason) == (0, WaitReason.TOKEN_BUDGET)
    assert "10400 of its 10000 tokens per 1h" in adm.message and "2026-11-23T13:00:00Z" in adm.message
    left = BudgetVerdict("team", 10000, 9999, "1h", "2026-11-23T13:00:00Z")
    assert decide_admission(me, 50, [me], Caps(), QuotaVerdict(None), budget=left).admitted == 2


def test_demand_is_what_a_pod_can_have_in_flight() -> None:
    assert ep.demand("interview", 3, 4, EP) == 3  # one call at a time per analyst
    assert ep.demand("interview", 6, 4, EP) == 4  # never more than maxConcurrency
    assert ep.demand("write", 1, 4, EP) == 3 and ep.demand("plan", 1, 4, EP) == 1
    assert ep.demand("plan", 2, 4, EP) == 2  # a planner that goes on to interview two analysts
    small = dataclasses.replace(EP, max_concurrent=2)
    assert ep.demand("interview", 5, 8, small) == 2  # a pod always fits an idle endpoint


def test_endpoints_match_by_url_then_model() -> None:
    generic = ep.Endpoint("any-model", "http://MODEL.example:8080/v1", 4)
    specific = ep.Endpoint("big", "http://model.example:8080/v1", 2, models=("gpt-4o",))
    other = ep.Endpoint("other", "http://elsewhere:8080/v1", 4)
    assert ep.match([generic, specific, other], "http://model.example:8080/v1/", "gpt-4o") == specific
    assert ep.match([generic, specific, other], "http://model.example:8080/v1", "offline-research-1") == generic
    assert ep.match([other], "http://model.example:8080/v1", "gpt-4o") is None


def test_shares_split_the_minute_limits_and_shrink_to_a_lowered_capacity() -> None:
    pods = [ep.PodUse("a", "rj1", "rj1-b0", 2), ep.PodUse("a", "rj1", "rj1-b1", 2), ep.PodUse("b", "rj2", "j", 4)]
    table = ep.shares(EP, pods)
    assert [table[p.job].concurrency for p in pods] == [2, 2, 4]
    assert sum(s.requests_per_minute or 0 for s in table.values()) == 600
    assert sum(s.tokens_per_minute or 0 for s in table.values()) == 60000
    assert table["j"].tokens_per_minute == 30000  # in proportion to its concurrency
    for capacity in (1, 2, 3, 5, 7):
        lowered = ep.shares(dataclasses.replace(EP, max_concurrent=capacity), pods)
        assert sum(s.concurrency for s in lowered.values()) == capacity
        assert all(s.concurrency <= p.demand for p, s in zip(pods, lowered.values(), strict=False))
    # One pod left: it gets the whole per-minute limits.
    alone = ep.shares(EP, pods[:1])
    assert alone["rj1-b0"] == ep.Share(2, 600, 60000)


def test_stamped_jobs_carry_the_endpoint_and_tell_the_worker_its_share() -> None:
    owner = Owner("team-a", "demo", "uid-1")
    job, task = worker_job_and_task(owner, spec(), Settings(), "abc123", Step.INTERVIEW, [0, 1], 0)
    ep.stamp(job, task, EP, 2, ep.Share(2, 300, 30000), "demo-endpoint-share")
    assert job["metadata"]["annotations"][ep.ANNOTATION_ENDPOINT] == "shared"
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    task = ResearchTask.model_validate(json.loads(env["RESEARCH_TASK"]))
    assert task.model.share is not None
    assert (task.model.share.config_map, task.model.share.key) == ("demo-endpoint-share", job["metadata"]["name"])
    assert (task.model.share.concurrency, task.model.share.tokens_per_minute) == (2, 30000)
    view = job_view(job)
    assert (view.endpoint, view.concurrency) == ("shared", 2)


# The volume types restricted Pod Security allows.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def test_only_a_pod_told_of_a_lease_broker_gets_a_token_for_it_and_never_its_api_token() -> None:
    owner = Owner("team-a", "demo", "uid-1")
    plain, task = worker_job_and_task(owner, spec(), Settings(), "abc123", Step.INTERVIEW, [0, 1], 0)
    ep.stamp(plain, task, EP, 2, ep.Share(2), "demo-endpoint-share")  # no broker: the share alone
    assert not [v for v in plain["spec"]["template"]["spec"]["volumes"] if "projected" in v]
    job, task = worker_job_and_task(owner, spec(), Settings(), "abc123", Step.INTERVIEW, [0, 1], 0)
    ep.stamp(job, task, EP, 2, ep.Share(2), "demo-endpoint-share", broker_url="http://leases.ops.svc:8090")
    add_lease_broker_token(add_lease_broker_token(job))  # as admission does; twice changes nothing
    pod = job["spec"]["template"]["spec"]
    projected = [v for v in pod["volumes"] if "projected" in v]
    assert projected == [
        {
            "name": wire.TOKEN_VOLUME,
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": wire.TOKEN_AUDIENCE,
                            "expirationSeconds": 3600,
                            "path": wire.TOKEN_FILE,
                        }
                    }
                ]
            },
        }
    ]
    mounts = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == wire.TOKEN_VOLUME]
    assert mounts == [{"name": wire.TOKEN_VOLUME, "mountPath": wire.TOKEN_DIR, "readOnly": True}]
    assert wire.TOKEN_PATH == f"{mounts[0]['mountPath']}/{wire.TOKEN_FILE}"  # where the worker reads it
    assert all(set(v) - {"name"} <= RESTRICTED_VOLUMES for v in pod["volumes"])
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_token_budgets_parse_and_periods_are_fixed_windows() -> None:
    budgets = ep.parse_budgets('{"team-a": {"tokens": 5000, "period": "1h"}, "team-b": {"tokens": 10}}')
    assert budgets["team-a"] == ep.TokenBudget(5000, "1h") and budgets["team-b"].seconds == 86400
    for bad in ('{"a": {"tokens": 0}}', '{"a": {"tokens": 5, "period": "soon"}}', "[1]", "{"):
        try:
            ep.parse_budgets(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")
    start, end = ep.window(T0 + dt.timedelta(minutes=17), 3600)
    assert (start, end) == (T0, T0 + dt.timedelta(hours=1))
    usage = [(T0 - dt.timedelta(seconds=1), 700), (T0, 100), (T0 + dt.timedelta(minutes=5), 50), (None, 9)]
    assert ep.spent(usage, start) == 150
    with_cm = Settings().with_configmap({"namespaceTokenBudgets": '{"x": {"tokens": 3, "period": "30m"}}'})
    assert with_cm.token_budgets == {"x": ep.TokenBudget(3, "30m")}


def test_waiting_for_the_endpoint_or_the_budget_has_its_own_condition_and_column() -> None:
    w = Waiting("2 interview batches", WaitReason.ENDPOINT_CAPACITY, "ModelEndpoint shared: 8/8")
    st, events = _waiting_status(w)
    conds = {c.type: c for c in st.conditions or []}
    assert (conds["WaitingForEndpoint"].status, conds["WaitingForEndpoint"].reason) == ("True", "EndpointCapacity")
    assert conds["Throttled"].status == "False" and conds["TokenBudgetExhausted"].status == "False"
    assert st.waiting_for == "EndpointCapacity"
    assert st.message is not None and "waiting for model endpoint capacity" in st.message
    assert [e[:2] for e in events] == [("Normal", "WaitingForEndpoint")]
    st, events = _waiting_status(Waiting("the planner Job", WaitReason.TOKEN_BUDGET, "namespace x spent 12 of its 10"))
    conds = {c.type: c for c in st.conditions or []}
    assert (conds["TokenBudgetExhausted"].status, conds["TokenBudgetExhausted"].reason) == ("True", "TokenBudget")
    assert st.waiting_for == "TokenBudget" and [e[:2] for e in events] == [("Warning", "TokenBudgetExhausted")]
    st, _ = _waiting_status(Waiting())
    assert st.waiting_for is None


def test_the_world_counts_running_jobs_per_endpoint_and_follows_changes() -> None:
    from research_operator.cache.world import World

    def job(name: str, endpoint: str, need: int, done: bool = False) -> JobView:
        return JobView(name, "interview", "p", uid=name, endpoint=endpoint, concurrency=need, succeeded=done)

    index: dict[tuple[str, str], list[JobView]] = {
        ("a", "u1"): [job("x-b0", "shared", 2), job("x-b1", "shared", 2, done=True)],
        ("b", "u2"): [job("y-b0", "shared", 3), job("y-b1", "other", 1), job("y-plan", "", 0)],
    }
    world = World()
    world.attach(index, {}, {})
    assert sorted(p.job for _, p in world.endpoint_pods("shared")) == ["x-b0", "y-b0"]
    assert sum(p.demand for _, p in world.endpoint_pods("shared")) == 5
    index[("a", "u1")][0] = job("x-b0", "shared", 2, done=True)
    world.bump()  # a Job event
    assert [p.job for _, p in world.endpoint_pods("shared")] == ["y-b0"]
    assert [p.job for _, p in world.endpoint_pods("other")] == ["y-b1"]


def test_researchjobs_held_by_their_own_quota_neither_contend_for_caps_nor_wake_for_other_namespaces() -> None:
    from research_operator.cache.world import Blocked, World

    w = World()
    quota_held, cap_held = ("a", "uid-q"), ("b", "uid-c")
    w.waiting.update({quota_held: 1, cap_held: 2})
    w.blocked[quota_held] = Blocked(1, 1, POD, local=True)
    w.blocked[cap_held] = Blocked(2, 2, POD)
    assert [(d.namespace, d.waiting) for d in w.demands()] == [("b", 2)]
    events = {k: w.event(k) for k in (quota_held, cap_held)}
    w.wake_waiting(None)  # a slot freed somewhere under a global cap (no event loop: swept at once)
    assert not events[quota_held].is_set() and events[cap_held].is_set()
    events[cap_held].clear()
    w.wake_waiting("a")  # something changed in its own namespace
    assert events[quota_held].is_set() and not events[cap_held].is_set()


async def test_a_namespace_being_deleted_is_asked_once_not_once_per_waiting_researchjob(monkeypatch: Any) -> None:
    """Deleting a namespace takes its quota too: every ResearchJob that waited there is woken and
    admitted. The first create that meets the deletion is the last request made there for a while."""
    from research_operator.actions import admit as admit_mod
    from research_operator.actions import kube
    from research_operator.actions.admit import Want, admit_and_create
    from research_operator.cache import world as world_mod
    from research_operator.cache.world import World

    w = World()
    monkeypatch.setattr(world_mod, "WORLD", w)
    monkeypatch.setattr(admit_mod, "WORLD", w)
    calls: list[str] = []

    async def create(obj: dict[str, Any], terminating: Any = None) -> tuple[kube.Created, str]:
        if terminating is not None and terminating():
            return kube.Created.TERMINATING, ""  # what kube.call's skip_if does: nothing sent
        calls.append(obj["kind"])
        return kube.Created.TERMINATING, ""

    monkeypatch.setattr(kube, "create", create)
    s, cfg = spec(), Settings(namespace="ops", default_model_base_url="http://model:8000/v1")
    clock = [1000.0]
    monkeypatch.setattr(admit_mod.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(world_mod, "TERMINATING_MEMO", 30.0)
    outcomes = []
    for i in range(5):
        owner = Owner("doomed", f"rj-{i}", f"uid-{i}")
        job = worker_job(owner, s, cfg, PID, Step.PLAN)
        rbac = (PID, worker_rbac(owner, s, PID))
        want = Want("plan", [job], 1)
        outcomes.append(await admit_and_create(("doomed", f"uid-{i}"), owner, want, s.worker, cfg, rbac=rbac))
    assert calls == ["ServiceAccount"], calls  # the first ResearchJob's first object; nothing after
    for waiting, created in outcomes:
        assert created == 0 and waiting.refused
        assert waiting.message == "namespace doomed is being deleted"
    assert not w.created, "nothing is left counted as created"
    assert w.waiting == {("doomed", f"uid-{i}"): 1 for i in range(5)}
    # Later (a namespace of the same name created again), it is asked again.
    clock[0] += 31
    owner = Owner("doomed", "rj-new", "uid-new")
    want = Want("plan", [worker_job(owner, s, cfg, PID, Step.PLAN)], 1)
    await admit_and_create(("doomed", "uid-new"), owner, want, s.worker, cfg, rbac=(PID, worker_rbac(owner, s, PID)))
    assert calls == ["ServiceAccount", "ServiceAccount"]


async def test_a_pass_that_finds_its_researchjob_gone_ends_its_loop(monkeypatch: Any) -> None:
    """A DELETED event can fall into the gap of a watch restarted after it expired: the pass that
    then finds its ResearchJob gone ends the loop and forgets it, instead of retrying forever."""
    import logging

    from research_operator.actions import admit as admit_mod
    from research_operator.actions import kube, loop
    from research_operator.cache.world import World

    w = World()
    monkeypatch.setattr(loop, "WORLD", w)
    monkeypatch.setattr(admit_mod, "WORLD", w)
    key = ("gone-ns", "uid-1")
    passes: list[str] = []

    async def reconcile_once(k: Any, body: Any, logger: Any) -> Any:
        passes.append(k[1])
        raise kube.Gone("gone-ns/rj")

    monkeypatch.setattr(loop, "reconcile_once", reconcile_once)

    async def exists(namespace: str, name: str, uid: str) -> bool:
        return False

    monkeypatch.setattr(kube, "researchjob_exists", exists)
    w.bodies[key] = {"metadata": {"name": "rj", "namespace": "gone-ns", "uid": "uid-1"}}
    w.waiting[key] = 2
    w.phases[key] = "Pending"
    loop.LOOPS[key] = None  # type: ignore[assignment]  # what ensure_loop would hold
    await loop.reconcile_loop(key, logging.getLogger("test"))  # returns: no sleep, no retry
    assert passes == ["uid-1"]
    assert key not in w.bodies and key not in w.waiting and key not in w.phases
    assert key not in loop.LOOPS


async def test_requests_queued_behind_the_api_threads_ask_skip_if_just_before_they_are_sent() -> None:
    """Thousands of creates queued at once for a namespace that turns out to be being deleted: only
    those already sent when the first refusal returns reach the API server."""
    import threading
    import time

    from research_operator.actions import kube

    refused = threading.Event()
    sent: list[int] = []

    def fake_create(i: int, _request_timeout: tuple[float, float] | None = None) -> None:
        assert _request_timeout == kube.REQUEST_TIMEOUT, "every request has a timeout"
        sent.append(i)
        time.sleep(0.01)
        refused.set()  # the API server answers: the namespace is being deleted

    async def one(i: int) -> bool:
        try:
            await kube.call("create", "serviceaccount", fake_create, i, skip_if=refused.is_set)
            return True
        except kube.Skipped:
            return False

    import asyncio

    results = await asyncio.gather(*(one(i) for i in range(200)))
    assert sum(results) == len(sent) <= kube.API_THREADS, (sum(results), len(sent))
    assert sum(results) >= 1


async def test_a_researchjob_skipped_for_a_namespace_being_deleted_sleeps_only_until_the_memo_ends(
    monkeypatch: Any,
) -> None:
    """The memo of a namespace being deleted ends its ResearchJobs' wait when it runs out (their pass
    names that moment), or at once when a ResearchJob is created there: a namespace being deleted
    refuses every create, so it is a namespace of that name created again."""
    import logging

    from research_operator.actions import loop
    from research_operator.cache import world as world_mod
    from research_operator.cache.world import World

    w = World()
    monkeypatch.setattr(loop, "WORLD", w)
    clock = [500.0]
    monkeypatch.setattr(loop.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(world_mod, "TERMINATING_MEMO", 30.0)
    w.terminating["reborn"] = 490.0  # a create was refused there 10 s ago
    key = ("reborn", "uid-new")
    body = {"metadata": {"name": "rj", "namespace": "reborn", "uid": "uid-new"}, "spec": {}}
    out = await loop.reconcile_once(key, body, logging.getLogger("test"))  # type: ignore[arg-type]
    assert out.wake_at is not None and not out.retry
    left = (out.wake_at - dt.datetime.now(dt.UTC)).total_seconds()
    assert 18 < left <= 20.5, left  # the memo's end, not the resync
    w.event(key)
    w.namespace_accepts_creates("reborn")
    w.wake_namespace("reborn")
    assert "reborn" not in w.terminating and not w.namespace_terminating("reborn", clock[0])
    assert w.wakeups[key].is_set() and key in w.dirty


def test_every_wait_names_the_events_that_end_it_and_each_is_delivered_by_a_handler() -> None:
    import re

    from research_operator.actions import loop
    from research_operator.decisions.admission import ENDED_BY, WaitReason, Wake
    from research_operator.registration import handlers

    assert set(ENDED_BY) == set(WaitReason), "a wait reason without the events that end it"
    assert all(ENDED_BY.values()), "a wait that only the resync ends"
    # The ResearchJob's own bound is freed only by its own Jobs; every other wait is ended by others too.
    assert [r for r, w in ENDED_BY.items() if w == {Wake.OWN_CHANGE}] == [WaitReason.MAX_ACTIVE_JOBS]
    for wake in Wake:
        names = re.findall(r"\(([^)]*)\)$", wake.value)
        assert names, wake
        for name in names[0].split(", "):
            if name == "the pass's wake_at":
                continue
            assert hasattr(handlers, name) or hasattr(loop, name), f"{wake.name}: no handler {name}"


async def test_a_status_write_refused_as_invalid_does_not_end_the_loop_of_a_researchjob_still_there(
    monkeypatch: Any,
) -> None:
    """A 422 answers both a uid test that failed (another ResearchJob of the name) and a status that
    fails the CRD's validation; only the first may end the loop, or the ResearchJob would never be
    reconciled again (no event would start a new loop)."""
    import asyncio
    import logging

    from research_operator.actions import admit as admit_mod
    from research_operator.actions import kube, loop
    from research_operator.cache.world import World

    w = World()
    monkeypatch.setattr(loop, "WORLD", w)
    monkeypatch.setattr(admit_mod, "WORLD", w)
    key = ("ns", "uid-1")
    passes: list[int] = []

    async def reconcile_once(k: Any, body: Any, logger: Any) -> Any:
        passes.append(1)
        if len(passes) == 1:
            raise kube.Gone("ns/rj: 422 status.message: Too long")
        del w.bodies[key]  # the second pass: it was deleted meanwhile (its event wakes the loop, which ends)
        w.event(key).set()
        return admit_mod.Outcome()

    async def exists(namespace: str, name: str, uid: str) -> bool:
        return True

    monkeypatch.setattr(loop, "reconcile_once", reconcile_once)
    monkeypatch.setattr(kube, "researchjob_exists", exists)
    monkeypatch.setattr(loop, "settings", lambda: Settings(namespace="ops", quota_backoff_seconds=0.01))
    w.bodies[key] = {"metadata": {"name": "rj", "namespace": "ns", "uid": "uid-1"}}
    loop.LOOPS[key] = None  # type: ignore[assignment]
    await asyncio.wait_for(loop.reconcile_loop(key, logging.getLogger("test")), 5)
    assert len(passes) == 2, "the refused status write was retried, not taken for a deletion"
    loop.LOOPS.pop(key, None)


async def test_a_reconcile_loop_that_ends_with_an_error_is_started_again(monkeypatch: Any) -> None:
    """Job and ConfigMap events only wake a loop that runs: one that died of an error outside a
    pass (here in reading the settings) must start again by itself."""
    import asyncio
    import logging

    from research_operator.actions import admit as admit_mod
    from research_operator.actions import loop
    from research_operator.cache.world import World

    w = World()
    monkeypatch.setattr(loop, "WORLD", w)
    monkeypatch.setattr(admit_mod, "WORLD", w)
    monkeypatch.setattr(loop, "LOOP_RESTART_DELAY", 0.01)
    key = ("ns", "uid-1")
    passes: list[int] = []
    broken = [True]

    async def reconcile_once(k: Any, body: Any, logger: Any) -> Any:
        passes.append(1)
        return admit_mod.Outcome()

    def settings() -> Settings:
        if broken[0]:
            broken[0] = False
            raise RuntimeError("a bug outside the pass")
        return Settings(namespace="ops", resync_seconds=600)

    monkeypatch.setattr(loop, "reconcile_once", reconcile_once)
    monkeypatch.setattr(loop, "settings", settings)
    w.bodies[key] = {"metadata": {"name": "rj", "namespace": "ns", "uid": "uid-1"}}
    w.waiting[key] = 1
    logger = logging.getLogger("test")
    loop.ensure_loop(key, logger)
    first = loop.LOOPS[key]
    for _ in range(200):
        if len(passes) >= 2:
            break
        await asyncio.sleep(0.01)
    assert first.done() and loop.LOOPS[key] is not first, "the loop that died was started again"
    assert len(passes) >= 2
    w.event(key).set()  # the restarted loop serves its wake-ups
    await asyncio.sleep(0.05)
    assert len(passes) >= 3
    loop.LOOPS.pop(key).cancel()


def test_a_late_small_tenant_is_admitted_at_an_endpoint_ahead_of_a_big_ones_backlog() -> None:
    """One endpoint of 4 in flight (and 4 standing by), a big tenant holding all 8 with more
    waiting, and a small tenant arriving later. When one of the big tenant's pods ends, the freed
    room is owed to the small tenant, below its fair share (4 of 8): the big tenant's next
    ResearchJob waits and says why, the small one is admitted. Alone at the endpoint, or with no
    one waiting below their share, admission is what it was (first come)."""
    big, small = Demand("big", "rj-7", 0, 1), Demand("small", "rj-1", 0, 1)
    # A big pod ended: 7 admitted, all the big tenant's; the small one waits for 2 (one pod of 2).
    v_big = EndpointVerdict("shared", 4, 6, 2, standby=4, mine=6, peers=((0, 2, 2),))
    adm = decide_admission(big, 50, [big], Caps(), QuotaVerdict(None), endpoint=v_big)
    assert (adm.admitted, adm.reason) == (0, WaitReason.ENDPOINT_CAPACITY)
    assert "owed to 1 namespaces waiting below their fair share of 4" in adm.message
    v_small = EndpointVerdict("shared", 4, 6, 2, standby=4, mine=0, peers=((6, 8, 2),))
    assert decide_admission(small, 50, [small], Caps(), QuotaVerdict(None), endpoint=v_small).admitted == 1
    # Nobody waits below its share: the big tenant takes the room as before.
    alone = EndpointVerdict("shared", 4, 6, 2, standby=4, mine=6, peers=((0, 0, 0),))
    assert decide_admission(big, 50, [big], Caps(), QuotaVerdict(None), endpoint=alone).admitted == 1
    # A waiting tenant whose next pod would not fit in its share holds nothing back from the others
    # (it takes its turn as before; a reservation it could never use would starve everyone).
    v = EndpointVerdict("shared", 8, 3, 1, standby=0, mine=3, peers=((3, 2, 2),))  # share 4: 3+2 > 4
    assert v.jobs == 5  # all that is free: the other's pod of 2 does not fit its share of 4


def test_with_leases_a_late_tenant_below_its_share_is_admitted_although_a_big_one_holds_it_all() -> None:
    """One endpoint of 4 (and 16 standing by, with the lease broker), all 20 held by a big tenant's
    long-lived pods admitted while it was alone. A small tenant arriving later is admitted up to its
    share (10) at once, not after the first big pod ends; the broker's leases keep the calls within
    4. The big tenant's next pod still waits, and without the broker nobody is admitted beyond."""
    small = Demand("small", "rj-1", 0, 2)
    leased = EndpointVerdict("shared", 4, 20, 2, standby=16, mine=0, peers=((20, 4, 2),), leased=True)
    adm = decide_admission(small, 50, [small], Caps(), QuotaVerdict(None), endpoint=leased)
    assert adm.admitted == 2, adm.message
    at_share = EndpointVerdict("shared", 4, 30, 2, standby=16, mine=10, peers=((20, 4, 2),), leased=True)
    assert decide_admission(small, 50, [small], Caps(), QuotaVerdict(None), endpoint=at_share).admitted == 0
    big = Demand("big", "rj-7", 0, 1)
    v_big = EndpointVerdict("shared", 4, 24, 2, standby=16, mine=20, peers=((4, 2, 2),), leased=True)
    adm = decide_admission(big, 50, [big], Caps(), QuotaVerdict(None), endpoint=v_big)
    assert (adm.admitted, adm.reason) == (0, WaitReason.ENDPOINT_CAPACITY)
    unleased = EndpointVerdict("shared", 4, 8, 2, standby=4, mine=0, peers=((8, 4, 2),))
    assert decide_admission(small, 50, [small], Caps(), QuotaVerdict(None), endpoint=unleased).admitted == 0


def test_the_world_sums_each_namespaces_admitted_and_waiting_demand_at_an_endpoint() -> None:
    from research_operator.cache.world import Blocked, World

    def job(name: str, need: int) -> JobView:
        return JobView(name, "interview", "p", uid=name, endpoint="shared", concurrency=need)

    w = World()
    w.attach({("big", "u1"): [job("a-b0", 2), job("a-b1", 2)], ("small", "u2"): []}, {}, {})
    w.waiting.update({("big", "u1"): 3, ("small", "u2"): 1})
    w.blocked[("big", "u1")] = Blocked(3, 5, POD, endpoint="shared", demand=2)
    w.blocked[("small", "u2")] = Blocked(1, 5, POD, endpoint="shared", demand=3)
    assert w.endpoint_namespaces("shared") == {"big": (4, 6, 2), "small": (0, 3, 3)}
    w.waiting[("small", "u2")] = 0  # admitted: its next pass records it, and bumps the version
    w.bump()
    assert "small" not in w.endpoint_namespaces("shared")  # neither admitted nor waiting there
    assert w.endpoint_namespaces("other") == {}


def test_batches_started_in_a_pass_show_as_running_in_the_same_status_write() -> None:
    st = ResearchJobStatus(sections_done=1)
    st.batches.queued = 3
    batches_started(st, 4, 2)
    assert (st.batches.active, st.batches.queued) == (2, 1)
    assert st.message == "1/4 sections; 2 batch Jobs running, 1 waiting"
    before = st.message
    batches_started(st, 4, 0)  # none started (all wait): what the pass decided stays
    assert st.message == before


async def test_a_job_whose_pod_a_quota_seen_late_can_never_fit_is_deleted_to_wait(monkeypatch: Any) -> None:
    """The quota was created moments before the ResearchJob and its watch event came after the
    planner Job was made: the Job controller keeps failing to create the pod. Once the quota is
    seen, that Job (no pod ever, its FailedCreate seen) is deleted; the step then waits, saying
    QuotaTooSmall, like any other. Jobs that have pods, or fit, are left alone."""
    from research_operator.actions import kube
    from research_operator.actions import loop as loop_mod
    from research_operator.cache import world as world_mod
    from research_operator.cache.world import World
    from research_operator.decisions.admission import QuotaUsage

    w = World()
    monkeypatch.setattr(world_mod, "WORLD", w)
    monkeypatch.setattr(loop_mod, "WORLD", w)
    deleted: list[tuple[str, str, str]] = []

    async def delete_job(namespace: str, name: str, uid: str = "", propagation: str = "Background") -> None:
        deleted.append((namespace, name, uid))

    monkeypatch.setattr(kube, "delete_job", delete_job)
    key = ("ns", "uid-rj")
    blocked = JobView("rj-p-plan", "plan", "p", uid="uid-job", pods=0)
    running = JobView("rj-p-b1", "interview", "p", batch=1, uid="uid-running", pods=1)
    w.job_index = {key: [blocked, running]}
    w.create_failures = {"uid-job": "exceeded quota: tiny", "uid-running": "exceeded quota: tiny"}
    worker = spec().worker  # requests.cpu 100m by default

    class Log:
        def info(self, msg: str) -> None:
            self.last = msg

    log = Log()
    w.quota_index = {"ns": [QuotaUsage("roomy", {"requests.cpu": "2"}, {})]}
    await loop_mod.drop_jobs_that_never_fit(key, worker, log)  # type: ignore[arg-type]
    assert deleted == []  # the quota can hold one: the Job controller will create the pod in time
    w.quota_index = {"ns": [QuotaUsage("tiny", {"requests.cpu": "50m"}, {})]}
    await loop_mod.drop_jobs_that_never_fit(key, worker, log)  # type: ignore[arg-type]
    assert deleted == [("ns", "rj-p-plan", "uid-job")]
    assert "uid-job" in w.deleted[key] and "rj-p-plan" not in w.jobs_of(key)
    assert "tiny" in log.last and "requests.cpu" in log.last


def test_an_oom_killed_worker_is_named_with_the_limit_to_raise_and_other_failures_by_their_last_line() -> None:
    assert termination_detail("OOMKilled", "Traceback ...\n  half a line", "48Mi") == (
        "OOMKilled: the worker went over its memory limit of 48Mi; raise spec.worker.resources.limits.memory"
    )
    assert termination_detail("Error", "Traceback (most recent call last):\nboom: the store is gone\n\n", "1Gi") == (
        "boom: the store is gone"
    )
    assert termination_detail("Error", None, None) == ""


def test_a_failing_cleanup_says_so_in_a_condition_until_it_succeeds() -> None:
    """While a PostgreSQL-store ResearchJob is deleted: condition CleanupFailed turns True with the
    cleanup Job's failure, back to False (CleaningUp) when the retried Job runs, and a pass with
    nothing to say writes nothing."""
    from research_operator.decisions import status

    quiet = ResearchJobStatus(phase=Phase.Succeeded, message="report written")
    assert status.cleaning_up(quiet, None, None, 3, T0) is None
    failed = status.cleaning_up(
        quiet, "deleting its rows", "cleanup Job rj-cleanup failed: BackoffLimitExceeded", 3, T0
    )
    assert failed is not None and failed.message == "deleting its rows"
    cond = next(c for c in failed.conditions or [] if c.type == "CleanupFailed")
    assert (cond.status, cond.reason, cond.message) == (
        "True",
        "CleanupJobFailed",
        "cleanup Job rj-cleanup failed: BackoffLimitExceeded",
    )
    retried = status.cleaning_up(failed, None, None, 3, T0 + dt.timedelta(seconds=30))
    assert retried is not None and retried.message == "deleting its rows"
    cond = next(c for c in retried.conditions or [] if c.type == "CleanupFailed")
    assert (cond.status, cond.reason) == ("False", "CleaningUp")


def test_an_invalid_spec_fails_the_researchjob_naming_the_fields() -> None:
    from research_operator.decisions import status

    st = status.invalid_spec(ResearchJobStatus(), "analysts.count: must be at least 1", 2, T0)
    assert st.phase == Phase.Failed and st.message == "invalid spec: analysts.count: must be at least 1"
    assert [(c.type, c.status, c.reason) for c in st.conditions or []] == [("Failed", "True", "InvalidSpec")]
