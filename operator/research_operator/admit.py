"""The one admission path of every worker Job (planner, interview batches, writer, cleanup): admit
what fits the caps, fair share and ResourceQuota headroom (the pure ``admission.decide_admission``),
record the admitted Jobs as ours before creating them, create them, and say what still waits.
``still_blocked`` re-asks admission cheaply for a ResearchJob woken only because a slot may have
freed up.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from typing import Any

from research_api.researchjob import WorkerSpec
from research_operator import kube, metrics
from research_operator.admission import (
    Admission,
    Demand,
    PodResources,
    WaitReason,
    decide_admission,
    never_fits,
    quota_headroom,
)
from research_operator.builders import Owner, worker_rbac
from research_operator.finalizer import CLEANUP_STEP
from research_operator.reconcile import JobView, Waiting, step_noun
from research_operator.settings import Settings
from research_operator.world import WORLD, Blocked, Key, job_view, settings


@dataclass
class Outcome:
    """What a pass tells the loop: back off (an error, an unforeseen 403) or sleep until ``wake_at``."""

    retry: bool = False
    wake_at: dt.datetime | None = None


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def _failure_detail(namespace: str, job: JobView) -> str:
    cache_key = (namespace, job.uid)
    if cache_key not in WORLD.failure_details:
        WORLD.failure_details[cache_key] = await kube.pod_failure_detail(namespace, job.name)
    return WORLD.failure_details[cache_key]


async def with_detail(namespace: str, job: JobView) -> JobView:
    if job.failed and (detail := await _failure_detail(namespace, job)):
        return dataclasses.replace(job, message=f"{job.message}: {detail}")
    return job


@dataclass(frozen=True)
class Want:
    """Worker Jobs a pass wants to start, all of one step."""

    step: str
    jobs: list[dict[str, Any]]
    own_limit: int  # the ResearchJob's own bound on its running Jobs


async def admit_and_create(
    key: Key, owner: Owner, want: Want, worker: WorkerSpec, cfg: Settings
) -> tuple[Waiting, int]:
    """Admit what fits (caps, fair share, ResourceQuota headroom), record the admitted Jobs as ours
    before creating them, create them; the number created, and what still waits and why."""
    namespace = key[0]
    pod = PodResources.from_spec(worker.resources.requests.wire(), worker.resources.limits.wire())
    priority_class = worker.priority_class_name or ""
    async with WORLD.admission_lock:
        WORLD.waiting[key] = len(want.jobs)
        me = Demand(namespace, key[1], WORLD.active_of(key), len(want.jobs))
        # Only the caps look at other ResearchJobs: without them, admission needs none of theirs.
        demands = WORLD.demands() if cfg.caps.global_max_active or cfg.caps.namespace_max_active else [me]
        quotas = WORLD.quotas_of(namespace)
        verdict = quota_headroom(quotas, pod, WORLD.reserved(namespace), priority_class)
        too_small = never_fits(quotas, pod, priority_class)
        adm: Admission = decide_admission(me, want.own_limit, demands, cfg.caps, verdict, too_small)
        admitted = want.jobs[: adm.admitted]
        pending = WORLD.created[key]
        for job in admitted:
            pending[job["metadata"]["name"]] = job_view(job)
        WORLD.waiting[key] = len(want.jobs) - len(admitted)
        WORLD.bump()
    if adm.reason is not None and adm.reason.is_quota:
        metrics.QUOTA_WAITS.labels(namespace).inc()
    if admitted and key not in WORLD.rbac_ready and want.step != CLEANUP_STEP:
        if not cfg.worker_service_account:
            for obj in worker_rbac(owner):
                await kube.create(obj)
        WORLD.rbac_ready.add(key)
    refused: tuple[WaitReason, str] | None = None
    created = 0
    for i, job in enumerate(admitted):
        try:
            outcome, message = await kube.create(job)
        except BaseException:
            for rest in admitted[i:]:
                pending.pop(rest["metadata"]["name"], None)
            raise
        if outcome in (kube.Created.QUOTA, kube.Created.TERMINATING):
            for rest in admitted[i:]:
                pending.pop(rest["metadata"]["name"], None)
            WORLD.waiting[key] = WORLD.waiting.get(key, 0) + len(admitted) - i
            why = message if outcome == kube.Created.QUOTA else f"namespace {namespace} is being deleted"
            refused = (WaitReason.EXCEEDED_QUOTA, why)
            metrics.QUOTA_WAITS.labels(namespace).inc()
            break
        if outcome == kube.Created.CREATED:
            metrics.JOBS_CREATED.labels(want.step).inc()
            created += 1
    still = WORLD.waiting.get(key, 0)
    if still and refused is None:
        WORLD.blocked[key] = Blocked(still, want.own_limit, pod, priority_class)
    else:
        WORLD.blocked.pop(key, None)
    if refused is not None:
        return Waiting(step_noun(want.step, still), refused[0], refused[1], refused=True), created
    if still and adm.reason is not None:
        return Waiting(step_noun(want.step, still), adm.reason, adm.message), created
    return Waiting(), created


def pods_blocked(jobs: list[JobView]) -> str | None:
    for job in jobs:
        failure = WORLD.create_failures.get(job.uid) if job.uid else None
        if failure and job.active and job.pods == 0:
            return f"{step_noun(job.step, 1).removeprefix('the ')} {job.name} cannot create its pod: {failure}"
    return None


def still_blocked(key: Key) -> bool:
    """Whether a ResearchJob woken only because a slot may have freed up (not by a change of its own)
    would still be admitted nothing: then its pass is skipped, so one finished Job among many waiting
    ResearchJobs costs a quick re-check each, not a full pass each."""
    b = WORLD.blocked.get(key)
    if b is None or not WORLD.waiting.get(key):
        return False
    namespace = key[0]
    caps = settings().caps
    me = Demand(namespace, key[1], WORLD.active_of(key), b.count)
    demands = WORLD.demands(cached=True) if caps.global_max_active or caps.namespace_max_active else [me]
    quotas = WORLD.quotas_of(namespace)
    verdict = quota_headroom(quotas, b.pod, WORLD.reserved(namespace), b.priority_class)
    too_small = never_fits(quotas, b.pod, b.priority_class)
    return decide_admission(me, b.own_limit, demands, caps, verdict, too_small).admitted == 0
