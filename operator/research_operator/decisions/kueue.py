"""Kueue mode, pure parts: the labels of a worker Job, views of Kueue's Workloads and LocalQueues,
and what a ResearchJob's status says while its Jobs wait for Kueue.

In Kueue mode (``Settings.kueue_queue``) every worker Job (planner, interview batches, writer) is
created suspended with ``kueue.x-k8s.io/queue-name``; Kueue creates a Workload for it, admits it
against a ClusterQueue's quota by unsuspending it, and may later evict it (preemption by a
higher-priority Workload, a stopped queue) by suspending it again, which deletes its pods. The
operator never creates a second Job for the same step: a suspended Job is waiting, and when it
runs again the worker skips every analyst whose section is stored.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from research_api.researchjob import Phase, ResearchJobStatus
from research_operator.constants import KUEUE_PRIORITY_LABEL, KUEUE_QUEUE_LABEL
from research_operator.decisions.reconcile import JobView, condition
from research_operator.settings import Settings

GROUP = "kueue.x-k8s.io"
VERSION = "v1beta2"
CONDITION = "WaitingForKueue"  # the ResearchJob condition: True while a worker Job waits for Kueue

STEP_NAMES = {"plan": "planner", "write": "writer", "interview": "batch"}


def priority_class(priority: str | None, settings: Settings) -> str | None:
    """The WorkloadPriorityClass for a ResearchJob's spec.priority: the admins' mapping, else the
    name itself; without a priority the default class (None: Kueue's default priority)."""
    if priority is None:
        return settings.kueue_default_priority_class or None
    return dict(settings.kueue_priority_classes).get(priority, priority)


def job_labels(settings: Settings, priority: str | None) -> dict[str, str]:
    """The labels that hand a worker Job to Kueue (empty when Kueue mode is off)."""
    if not settings.kueue_queue:
        return {}
    out = {KUEUE_QUEUE_LABEL: settings.kueue_queue}
    wpc = priority_class(priority, settings)
    if wpc:
        out[KUEUE_PRIORITY_LABEL] = wpc
    return out


# ------------------------------------------------------------------------------------------------
# views of Kueue's objects
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadView:
    """What the operator needs of the Workload Kueue made for one worker Job."""

    name: str
    job: str  # the owning batch/v1 Job
    queue: str = ""  # spec.queueName (the LocalQueue)
    priority_class: str = ""
    priority: int | None = None
    cluster_queue: str = ""  # status.admission.clusterQueue, once quota is reserved
    quota_reserved: bool = False
    admitted: bool = False
    finished: bool = False
    pending: str = ""  # why it has no quota yet (QuotaReserved=False message)
    evicted: str = ""  # "<reason>: <message>" of an Evicted=True condition
    preempted: str = ""  # message of a Preempted=True condition


def _true(conds: Mapping[str, Mapping[str, Any]], ctype: str) -> bool:
    return str((conds.get(ctype) or {}).get("status")) == "True"


def workload_view(body: Mapping[str, Any]) -> WorkloadView | None:
    """The view of a Workload owned by a batch/v1 Job, else None."""
    meta, spec, status = body.get("metadata", {}), body.get("spec", {}), body.get("status") or {}
    owner = next(
        (r for r in meta.get("ownerReferences") or [] if r.get("kind") == "Job" and r.get("apiVersion") == "batch/v1"),
        None,
    )
    if owner is None:
        return None
    conds = {str(c.get("type")): c for c in status.get("conditions") or []}
    quota = conds.get("QuotaReserved") or {}
    evicted = conds.get("Evicted") or {}
    ref = spec.get("priorityClassRef") or {}
    return WorkloadView(
        name=str(meta.get("name")),
        job=str(owner.get("name")),
        queue=str(spec.get("queueName") or ""),
        priority_class=str(ref.get("name") or ""),
        priority=int(spec["priority"]) if isinstance(spec.get("priority"), int) else None,
        cluster_queue=str((status.get("admission") or {}).get("clusterQueue") or ""),
        quota_reserved=_true(conds, "QuotaReserved"),
        admitted=_true(conds, "Admitted"),
        finished=_true(conds, "Finished"),
        pending="" if _true(conds, "QuotaReserved") else str(quota.get("message") or ""),
        evicted=f"{evicted.get('reason')}: {evicted.get('message')}" if _true(conds, "Evicted") else "",
        preempted=str((conds.get("Preempted") or {}).get("message") or "") if _true(conds, "Preempted") else "",
    )


@dataclass(frozen=True)
class LocalQueueView:
    name: str
    cluster_queue: str
    active: bool = True
    message: str = ""  # why it is not active (e.g. its ClusterQueue does not exist)


def localqueue_view(body: Mapping[str, Any]) -> LocalQueueView:
    meta, spec, status = body.get("metadata", {}), body.get("spec", {}), body.get("status") or {}
    conds = {str(c.get("type")): c for c in status.get("conditions") or []}
    active = conds.get("Active")
    return LocalQueueView(
        name=str(meta.get("name")),
        cluster_queue=str(spec.get("clusterQueue") or ""),
        active=active is None or str(active.get("status")) == "True",
        message=f"{active.get('reason')}: {active.get('message')}" if active is not None else "",
    )


# ------------------------------------------------------------------------------------------------
# status
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KueueWait:
    """The WaitingForKueue condition (status, reason, message); the message also goes into status.message."""

    waiting: bool
    reason: str
    message: str


def _queue_phrase(queue: str, lq: LocalQueueView | None, wl: WorkloadView | None) -> str:
    cq = (wl.cluster_queue if wl is not None else "") or (lq.cluster_queue if lq is not None else "")
    return f"LocalQueue {queue}" + (f" (ClusterQueue {cq})" if cq else "")


def _job_wait(
    job: JobView, wl: WorkloadView | None, queue: str, lq: LocalQueueView | None, watching: bool, wpc: str | None
) -> tuple[str, str]:
    """(reason, sentence) for one suspended Job."""
    what = f"{STEP_NAMES.get(job.step, job.step)} Job {job.name}"
    where = _queue_phrase(queue, lq, wl)
    if lq is not None and not lq.active:
        return "LocalQueueInactive", f"{what} waits in {where}, which is not active: {lq.message}".rstrip(": ")
    if wl is None:
        if not watching:
            return "Pending", f"{what} waits for admission by Kueue in {where}"
        # Normal for a moment after the Job is created. If it lasts, Kueue does not run or cannot
        # make the Workload; Kueue only logs why (a missing WorkloadPriorityClass, say), so say it here.
        check = "Kueue runs" + (f" and WorkloadPriorityClass {wpc} exists (spec.priority)" if wpc else "")
        return (
            "NoWorkload",
            f"{what} waits in {where} for Kueue to create its Workload; if that lasts, check that {check}",
        )
    if wl.evicted and not wl.quota_reserved:
        return "Evicted", f"{what} was evicted by Kueue ({wl.evicted}) and waits in {where} to resume"
    if wl.quota_reserved:
        return "Admitting", f"{what} has quota in {where} and is being started"
    return "Pending", f"{what} waits for quota in {where}" + (f": {wl.pending}" if wl.pending else "")


def wait_status(
    jobs: Iterable[JobView],
    workloads: Mapping[str, WorkloadView],
    localqueues: Mapping[str, LocalQueueView],
    queue: str,
    watching: bool,
    priority_class: str | None = None,
) -> KueueWait:
    """Why the ResearchJob's suspended worker Jobs wait for Kueue, or that none does.

    ``workloads`` maps Job name -> its Workload, ``localqueues`` LocalQueue name -> view (both of
    the ResearchJob's namespace), ``queue`` is the LocalQueue new Jobs go to, ``watching`` whether
    the operator watches Workloads at all (without, it cannot tell a missing Workload), and
    ``priority_class`` the WorkloadPriorityClass its Jobs carry, if any."""
    waits: list[tuple[str, str]] = []
    for job in sorted(jobs, key=lambda j: j.name):
        if not job.suspended:
            continue
        wl = workloads.get(job.name)
        q = (wl.queue if wl is not None else "") or queue
        waits.append(_job_wait(job, wl, q, localqueues.get(q), watching, priority_class))
    if not waits:
        return KueueWait(False, "NotWaiting", "")
    order = ("LocalQueueInactive", "NoWorkload", "Evicted", "Pending", "Admitting")
    reason = min((r for r, _ in waits), key=order.index)
    first = next(m for r, m in waits if r == reason)
    more = len(waits) - 1
    return KueueWait(True, reason, first + (f"; {more} more worker Job(s) wait for Kueue" if more else ""))


def gather(
    namespace: str,
    jobs: Iterable[JobView],
    queue: str,
    workload_index: Mapping[tuple[str, str], Iterable[WorkloadView]] | None,
    localqueue_index: Mapping[tuple[str, str], Iterable[LocalQueueView]] | None,
) -> tuple[dict[str, WorkloadView], dict[str, LocalQueueView]]:
    """The Workloads of ``jobs`` (by Job name) and the LocalQueues they or new Jobs (``queue``) wait
    in (by name), from the watches' indices, keyed by (namespace, Job name) and (namespace,
    LocalQueue name)."""
    workloads: dict[str, WorkloadView] = {}
    for job in jobs:
        found = sorted((workload_index or {}).get((namespace, job.name), []), key=lambda w: w.finished)
        if found:
            workloads[job.name] = found[0]  # an unfinished one first, should Kueue ever have two
    queues: dict[str, LocalQueueView] = {}
    for name in {queue, *(w.queue for w in workloads.values())} - {""}:
        views = list((localqueue_index or {}).get((namespace, name), []))
        if views:
            queues[name] = views[0]
    return workloads, queues


def annotate(
    st: ResearchJobStatus,
    wait: KueueWait,
    prev: ResearchJobStatus,
    generation: int,
    now: dt.datetime,
    kueue_mode: bool,
) -> None:
    """Say in the status why worker Jobs wait for Kueue: condition WaitingForKueue (in Kueue mode,
    or while any Job waits) and the reason in status.message (replacing "planner/writer Job
    running" while that Job is suspended)."""
    if st.phase in (Phase.Succeeded, Phase.Failed):
        wait = KueueWait(False, "NotWaiting", "")
    if wait.waiting:
        if st.phase in (Phase.Planning, Phase.Writing) or not st.message:
            st.message = wait.message
        else:
            st.message = f"{st.message}; {wait.message}"
    if kueue_mode or wait.waiting:
        cond = condition(prev, CONDITION, wait.waiting, wait.reason, wait.message, generation, now)
        st.conditions = [*(c for c in st.conditions or [] if c.type != CONDITION), cond]
