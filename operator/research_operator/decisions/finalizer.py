"""Deleting a ResearchJob's rows in an external store (PostgreSQL): the pure decision.

ConfigMaps, Jobs and worker RBAC are garbage-collected through ownerReferences; rows in
PostgreSQL are not. So a ResearchJob with ``store.type: postgres`` carries the operator's own
finalizer ``researchops.io/external-store`` (added before its first worker Job). When it is
deleted, the operator first removes its worker Jobs (foreground, so no pod writes afterwards),
then runs a ``research-worker cleanup`` Job with the DSN from the job's Secret (the operator never
reads Secrets), and removes the finalizer once that Job succeeded. A failed cleanup Job is kept
for a while (its pods' logs say why), reported in a condition and an Event, then replaced.
ResearchJobs of the ConfigMap store get no finalizer, so they stay deletable while the operator
is down.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from research_operator.decisions.reconcile import JobView

CLEANUP_STEP = "cleanup"
CLEANUP_RETRY_AFTER = dt.timedelta(seconds=120)  # a failed cleanup Job is replaced this long after it failed


@dataclass(frozen=True)
class CleanupState:
    """What the decision needs of one ResearchJob."""

    postgres: bool  # spec.store.type == postgres, with a dsnSecretRef
    has_finalizer: bool
    deleting: bool  # metadata.deletionTimestamp is set
    workers: list[str]  # names of its worker Jobs (plan, interview, write) that still exist
    cleanup: JobView | None  # its cleanup Job, if one exists
    now: dt.datetime


@dataclass
class CleanupDecision:
    add_finalizer: bool = False
    delete_workers: list[str] = field(default_factory=list)
    create_cleanup: bool = False
    delete_cleanup: bool = False  # done (then the finalizer goes) or failed long enough ago (then a retry)
    remove_finalizer: bool = False
    failure: str | None = None  # the cleanup Job failed: why (for a condition and an Event)
    skipped: str | None = None  # the finalizer goes without a cleanup: why (for a Warning Event)
    message: str | None = None  # for status.message while the ResearchJob is being deleted


def decide_cleanup(s: CleanupState) -> CleanupDecision:
    d = CleanupDecision()
    if not s.deleting:
        # Added while the ResearchJob lives, before any worker Job can write a row; never removed
        # before deletion (a spec edited away from postgres may still have rows).
        d.add_finalizer = s.postgres and not s.has_finalizer
        return d
    if not s.has_finalizer:
        return d  # not ours to hold (configmap store, or already cleaned)
    if not s.postgres:
        d.remove_finalizer = True
        d.skipped = "the spec names no PostgreSQL DSN Secret any more, so its rows cannot be deleted"
        return d
    if s.workers:
        d.delete_workers = list(s.workers)
        d.message = f"deleting: stopping {len(s.workers)} worker Jobs before deleting the PostgreSQL rows"
        return d
    job = s.cleanup
    if job is None:
        d.create_cleanup = True
        d.message = "deleting: starting the cleanup Job that deletes the PostgreSQL rows"
    elif job.succeeded:
        d.delete_cleanup = True
        d.remove_finalizer = True
    elif job.failed:
        d.failure = f"the cleanup Job {job.name} failed: {job.message}".strip().rstrip(":")
        if job.finished is None or s.now - job.finished >= CLEANUP_RETRY_AFTER:
            d.delete_cleanup = True  # the next pass starts a new one
            d.message = f"deleting: {d.failure}; retrying"
        else:
            d.message = f"deleting: {d.failure}; retrying in {int(CLEANUP_RETRY_AFTER.total_seconds())}s"
    else:
        d.message = f"deleting: cleanup Job {job.name} is deleting the PostgreSQL rows"
    return d
