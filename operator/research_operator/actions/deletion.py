"""Deleting a postgres-store ResearchJob's rows in its external store (the finalizer
``researchops.io/external-store``): stop its workers, run a cleanup Job (admitted like every worker
Job), then let the ResearchJob go. The decision is the pure ``finalizer.decide_cleanup``.
"""

from __future__ import annotations

import kopf
from pydantic import ValidationError

from research_api.researchjob import ResearchJobStatus, SecretKeyRef, StoreType, WorkerSpec
from research_operator.actions import kube
from research_operator.actions.admit import Outcome, Want, admit_and_create, now, with_detail
from research_operator.cache.world import WORLD, Key, settings
from research_operator.constants import FINALIZER
from research_operator.decisions import status
from research_operator.decisions.finalizer import CLEANUP_STEP, CleanupState, decide_cleanup
from research_operator.decisions.manifests import Owner, cleanup_job
from research_operator.decisions.reconcile import JobView, Waiting, step_noun


def dsn_ref(body: kopf.Body) -> SecretKeyRef | None:
    """The DSN Secret key of a postgres-store ResearchJob (read from the raw spec, so a spec that no
    longer validates can still be cleaned up), else None."""
    store = (body.get("spec") or {}).get("store") or {}
    if store.get("type") != StoreType.postgres.value:
        return None
    try:
        return SecretKeyRef.model_validate(store.get("dsnSecretRef") or {})
    except ValidationError:
        return None


def cleanup_state(body: kopf.Body, workers: list[str], cleanup: JobView | None) -> CleanupState:
    meta = body.get("metadata", {})
    return CleanupState(
        postgres=dsn_ref(body) is not None,
        has_finalizer=FINALIZER in (meta.get("finalizers") or []),
        deleting=bool(meta.get("deletionTimestamp")),
        workers=workers,
        cleanup=cleanup,
        now=now(),
    )


FINALIZED: set[str] = set()  # uids of ResearchJobs whose finalizer this process removed (until DELETED)


async def finalize_once(key: Key, body: kopf.Body, logger: kopf.Logger) -> Outcome:
    """A pass over a ResearchJob being deleted: stop its workers, delete its PostgreSQL rows with a
    cleanup Job (admitted like every worker Job), then let it go."""
    namespace, uid = key
    meta = body.get("metadata", {})
    name = str(meta.get("name"))
    if FINALIZER not in (meta.get("finalizers") or []) or uid in FINALIZED:
        return Outcome()  # FINALIZED: the body may predate our removing the finalizer; starting again would leak a Job
    owner = Owner(namespace, name, uid)
    all_jobs = list(WORLD.jobs_of(key).values())
    cleanup = next((j for j in all_jobs if j.step == CLEANUP_STEP), None)
    if cleanup is not None:
        cleanup = await with_detail(namespace, cleanup)
    workers = [j for j in all_jobs if j.step != CLEANUP_STEP]
    d = decide_cleanup(cleanup_state(body, sorted(j.name for j in workers), cleanup))
    for job in workers:  # foreground: the Job stays until its pods are gone
        if job.name in d.delete_workers and job.uid:
            await kube.delete_job(namespace, job.name, job.uid, propagation="Foreground")
    waiting = Waiting()
    if d.create_cleanup:
        ref = dsn_ref(body)
        assert ref is not None
        try:
            worker: WorkerSpec | None = WorkerSpec.model_validate((body.get("spec") or {}).get("worker") or {})
        except ValidationError:
            worker = None
        foreground = "foregroundDeletion" in (meta.get("finalizers") or [])
        cleaner = cleanup_job(owner, ref, settings(), worker, owned=not foreground)

        def started(n: int) -> None:  # by this pass, or later by the scheduler
            kopf.event(body, type="Normal", reason="CleanupStarted", message=f"cleanup Job {job_name} started")

        job_name = cleaner["metadata"]["name"]
        waiting, _ = await admit_and_create(
            key, owner, Want(CLEANUP_STEP, [cleaner], 1), worker or WorkerSpec(), settings(), on_started=started
        )
        if waiting.namespace_terminating:
            d.skipped = (
                f"namespace {namespace} is being deleted, so no cleanup Job can start there; the PostgreSQL "
                f"rows of job uid {uid} are left: delete them with `research-worker cleanup --job-uid {uid}`"
            )
            d.remove_finalizer = True
            waiting = Waiting()
        elif waiting.reason is not None:
            d.message = f"deleting: {step_noun(CLEANUP_STEP, 1)} waits: {waiting.message}"
    elif WORLD.waiting.pop(key, None) is not None:
        WORLD.blocked.pop(key, None)
        WORLD.bump()
    if d.delete_cleanup and cleanup is not None:
        WORLD.deleted[key].add(cleanup.uid)
        await kube.delete_job(namespace, cleanup.name, cleanup.uid)
        if not d.remove_finalizer:
            kopf.event(
                body, type="Normal", reason="CleanupRetry", message=f"replacing the failed cleanup Job {cleanup.name}"
            )
    if d.skipped:
        logger.warning(f"{namespace}/{name}: {d.skipped}")
        kopf.warn(body, reason="CleanupSkipped", message=d.skipped)
    prev = ResearchJobStatus.model_validate(body.get("status") or {})
    failed_before = any(c.type == "CleanupFailed" and c.status == "True" for c in prev.conditions or [])
    if d.failure and not failed_before:
        kopf.warn(
            body,
            reason="CleanupFailed",
            message=f"{d.failure}; it is retried. To let the ResearchJob go without deleting its rows, remove "
            f"the finalizer {FINALIZER}",
        )
    st = status.cleaning_up(prev, d.message, d.failure, int(meta.get("generation") or 0), now())
    if st is not None:
        if st.message != prev.message:
            logger.info(f"decision: deleting: {st.message}")
        await kube.patch_status(namespace, name, uid, st, prev)
    if d.remove_finalizer:
        if not d.skipped:
            # Said before the patch: the ResearchJob's DELETED event that follows it ends this loop.
            logger.info(f"{namespace}/{name}: PostgreSQL rows deleted; removing the finalizer")
        await kube.set_finalizer(namespace, name, uid, present=False)
        FINALIZED.add(uid)
    return Outcome(retry=d.failure is not None or waiting.refused)
