"""kopf handlers: thin. Watches feed the in-memory world; one reconcile loop (an asyncio task) per
ResearchJob parses the spec, calls the pure decision, applies it, and sleeps until a watch wakes it.

Only watch-style handlers (``kopf.on.event``) are used: they add no finalizer, so a ResearchJob
(or its namespace) can always be deleted, even while the operator is not running.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import time
from typing import Any

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from research_api.researchjob import (
    GROUP,
    PLURAL,
    VERSION,
    Phase,
    ResearchJobSpec,
    ResearchJobStatus,
    SecretKeyRef,
    StoreType,
    WorkerSpec,
)
from research_api.task import Step
from research_operator import kueue, metrics
from research_operator.admission import Demand, PodResources, QuotaUsage, admit, quota_headroom
from research_operator.builders import Owner, cleanup_job, worker_job, worker_rbac
from research_operator.constants import FINALIZER, LABEL_JOB, LABEL_KIND
from research_operator.finalizer import CLEANUP_STEP, CleanupState, decide_cleanup
from research_operator.reconcile import JobView, Observed, batches, condition, decide
from research_operator.settings import Settings
from research_operator.world import WORLD, Key, StoredObject, job_view, owner_name, stored_object

log = logging.getLogger(__name__)

SETTINGS_LABEL = f"{GROUP}/operator-settings"
BASE_SETTINGS = Settings.from_env()
_api: client.ApiClient | None = None


def settings() -> Settings:
    """Static settings from the environment, overridden by the watched settings ConfigMap."""
    return BASE_SETTINGS.with_configmap(WORLD.settings_data) if WORLD.settings_data else BASE_SETTINGS


def api() -> client.ApiClient:
    global _api
    if _api is None:
        config.load_config()  # type: ignore[no-untyped-call]
        _api = client.ApiClient()
    return _api


async def call(verb: str, resource: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """One Kubernetes API request, off the event loop, counted in the metrics."""
    metrics.API_REQUESTS.labels(verb, resource).inc()
    return await asyncio.to_thread(fn, *args, **kwargs)


# ------------------------------------------------------------------------------------------
# startup
# ------------------------------------------------------------------------------------------


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Keep kopf's own bookkeeping out of .status, which belongs to the reconciler.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.posting.level = logging.WARNING  # only our own Events, not kopf's handler chatter
    settings.watching.server_timeout = 300
    settings.batching.worker_limit = 200
    api()


# ------------------------------------------------------------------------------------------
# watches that feed the world
# ------------------------------------------------------------------------------------------


@kopf.index("batch", "v1", "jobs", labels={LABEL_JOB: kopf.PRESENT})
def rj_jobs(body: kopf.Body, namespace: str | None, **_: Any) -> dict[Key, JobView] | None:
    rj = owner_name(body)
    return {(namespace, rj): job_view(body)} if rj and namespace else None


@kopf.index("", "v1", "configmaps", labels={LABEL_KIND: kopf.PRESENT})
def rj_stored(body: kopf.Body, namespace: str | None, **_: Any) -> dict[Key, StoredObject] | None:
    rj = owner_name(body)
    obj = stored_object(body) if rj and namespace else None
    return {(namespace, rj): obj} if obj is not None and rj and namespace else None


@kopf.index("", "v1", "resourcequotas")
def ns_quotas(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[str, QuotaUsage] | None:
    status = body.get("status") or {}
    usage = QuotaUsage(name, dict(status.get("hard") or {}), dict(status.get("used") or {}))
    return {namespace: usage} if namespace else None


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_JOB: kopf.PRESENT})
async def job_event(type: str, body: kopf.Body, namespace: str | None, name: str, **_: Any) -> None:
    rj = owner_name(body)
    if rj is None or namespace is None:
        return
    WORLD.wake((namespace, rj))
    view = job_view(body)
    if type == "DELETED":
        WORLD.deleted.discard(name)
    if type == "DELETED" or not view.active:
        WORLD.wake_waiting()  # a slot may have freed up: let waiting ResearchJobs compete for it


@kopf.on.event("", "v1", "configmaps", labels={LABEL_KIND: kopf.PRESENT})
async def stored_event(body: kopf.Body, namespace: str | None, **_: Any) -> None:
    rj = owner_name(body)
    if rj is not None and namespace is not None:
        WORLD.wake((namespace, rj))


@kopf.on.event("", "v1", "resourcequotas")
async def quota_event(namespace: str | None, **_: Any) -> None:
    if namespace is not None:
        WORLD.wake_waiting(namespace)


# Kueue mode: Kueue's Workloads (one per worker Job, owned by it) and LocalQueues, for the status.
# Only with KUEUE_WATCH (fixed at start): watching needs Kueue's CRDs and the RBAC the chart adds.
KUEUE_INDEXES: dict[str, Any] = {}  # index name -> kopf index, once the first ResearchJob event came

if BASE_SETTINGS.kueue_watch:

    @kopf.index(kueue.GROUP, kueue.VERSION, "workloads")
    def kueue_workloads(body: kopf.Body, namespace: str | None, **_: Any) -> dict[Key, kueue.WorkloadView] | None:
        wl = kueue.workload_view(body)
        return {(namespace, wl.job): wl} if wl is not None and namespace else None

    @kopf.index(kueue.GROUP, kueue.VERSION, "localqueues")
    def kueue_localqueues(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[Key, Any] | None:
        return {(namespace, name): kueue.localqueue_view(body)} if namespace else None

    @kopf.on.event(kueue.GROUP, kueue.VERSION, "workloads")
    async def workload_event(body: kopf.Body, namespace: str | None, **_: Any) -> None:
        wl = kueue.workload_view(body)
        if wl is not None and namespace is not None:
            for key, views in list((WORLD.job_index or {}).items()):
                if key[0] == namespace and any(j.name == wl.job for j in views):
                    WORLD.wake(key)

    @kopf.on.event(kueue.GROUP, kueue.VERSION, "localqueues")
    async def localqueue_event(namespace: str | None, **_: Any) -> None:
        for key in list(WORLD.bodies):
            if key[0] == namespace:
                WORLD.wake(key)


@kopf.on.event("", "v1", "configmaps", labels={SETTINGS_LABEL: "true"})
async def settings_event(type: str, body: kopf.Body, namespace: str | None, logger: kopf.Logger, **_: Any) -> None:
    if namespace != BASE_SETTINGS.namespace:
        return
    data = {} if type == "DELETED" else dict(body.get("data") or {})
    try:
        new = BASE_SETTINGS.with_configmap(data)
    except ValueError as e:
        logger.error(f"ignoring invalid operator settings: {e}")
        return
    if data != WORLD.settings_data:
        WORLD.settings_data = data
        logger.info(
            f"operator settings: globalMaxActiveJobs={new.global_max_active} "
            f"namespaceMaxActiveJobs={new.namespace_max_active}"
        )
        WORLD.wake_waiting()


@kopf.on.event(GROUP, VERSION, PLURAL)
async def researchjob_event(
    type: str,
    body: kopf.Body,
    namespace: str | None,
    name: str,
    logger: kopf.Logger,
    **kwargs: Any,
) -> None:
    if namespace is None:
        return
    # kopf passes each index by its function's name; they are complete before this first runs.
    WORLD.attach(kwargs["rj_jobs"], kwargs["rj_stored"], kwargs["ns_quotas"])
    KUEUE_INDEXES.update({k: kwargs[k] for k in ("kueue_workloads", "kueue_localqueues") if k in kwargs})
    key: Key = (namespace, name)
    if type == "DELETED":
        FINALIZED.discard(str(body.get("metadata", {}).get("uid")))
        task = LOOPS.pop(key, None)
        if task is not None:
            task.cancel()
        WORLD.forget(key)
        WORLD.wake_waiting()
        return
    WORLD.bodies[key] = body
    if key not in LOOPS or LOOPS[key].done():
        LOOPS[key] = asyncio.create_task(reconcile_loop(key, logger), name=f"reconcile {namespace}/{name}")
    WORLD.wake(key)


# ------------------------------------------------------------------------------------------
# the reconcile loop of one ResearchJob
# ------------------------------------------------------------------------------------------


LOOPS: dict[Key, asyncio.Task[None]] = {}


async def reconcile_loop(key: Key, logger: kopf.Logger) -> None:
    """Reconcile one ResearchJob until it is deleted: a pass, then sleep until woken or resync."""
    namespace, name = key
    wake = WORLD.event(key)
    backoff = 0.0
    while key in WORLD.bodies:
        wake.clear()
        start = time.monotonic()
        try:
            blocked = await reconcile_once(key, WORLD.bodies[key], logger)
        except ApiException as e:
            logger.warning(f"reconcile of {namespace}/{name} hit an API error {e.status}: {e.reason}")
            blocked = True
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - keep reconciling; the error is logged with its traceback
            logger.exception(f"reconcile of {namespace}/{name} failed")
            blocked = True
        finally:
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - start)
        if blocked:
            backoff = min(60.0, max(settings().quota_backoff_seconds, backoff * 2))
        else:
            backoff = 0.0
        timeout = backoff or settings().resync_seconds
        try:
            await asyncio.wait_for(wake.wait(), timeout=timeout)
        except TimeoutError:
            pass


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def _create(kind: str, obj: dict[str, Any], logger: kopf.Logger) -> str:
    """Create one child; 'created', 'exists' (409: a repeat or a race, which is fine) or 'quota'."""
    ns = obj["metadata"]["namespace"]
    fns = {
        "Job": client.BatchV1Api(api()).create_namespaced_job,
        "ServiceAccount": client.CoreV1Api(api()).create_namespaced_service_account,
        "Role": client.RbacAuthorizationV1Api(api()).create_namespaced_role,
        "RoleBinding": client.RbacAuthorizationV1Api(api()).create_namespaced_role_binding,
    }
    try:
        await call("create", kind.lower(), fns[kind], ns, obj)
    except ApiException as e:
        if e.status == 409:
            return "exists"
        if e.status == 403 and "exceeded quota" in (e.body or ""):
            return "quota"
        raise
    return "created"


async def _delete_job(namespace: str, job: str, propagation: str = "Background") -> None:
    try:
        await call(
            "delete",
            "job",
            client.BatchV1Api(api()).delete_namespaced_job,
            job,
            namespace,
            propagation_policy=propagation,
        )
    except ApiException as e:
        if e.status != 404:
            raise


async def _failure_detail(namespace: str, job: str) -> str:
    """The termination message of a failed Job's last pod (its error, for the status message)."""
    cached = WORLD.failure_details.get((namespace, job))
    if cached is not None:
        return cached
    pods = await call(
        "list", "pod", client.CoreV1Api(api()).list_namespaced_pod, namespace, label_selector=f"job-name={job}"
    )
    detail = ""
    for pod in sorted(pods.items, key=lambda p: p.metadata.creation_timestamp):
        for cs in (pod.status and pod.status.container_statuses) or []:
            term = cs.state and cs.state.terminated
            if term is not None and term.exit_code != 0 and term.message:
                lines = [ln for ln in term.message.strip().splitlines() if ln.strip()]
                detail = lines[-1][:400] if lines else detail
    WORLD.failure_details[(namespace, job)] = detail
    return detail


async def reconcile_once(key: Key, body: kopf.Body, logger: kopf.Logger) -> bool:
    """One pass. Returns True when blocked (quota or error), so the loop backs off."""
    namespace, name = key
    meta = body.get("metadata", {})
    if meta.get("deletionTimestamp"):
        return await finalize_once(key, body, logger)
    cfg = settings()
    prev = ResearchJobStatus.model_validate(body.get("status") or {})
    try:
        spec = ResearchJobSpec.model_validate(dict(body.get("spec") or {}))
    except ValidationError as e:
        msg = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        await _patch_status(key, _invalid_status(prev, msg, meta))
        kopf.warn(body, reason="InvalidSpec", message=msg)
        return False
    owner = Owner(namespace, name, str(meta.get("uid")))
    # The external-store finalizer goes on before the first worker Job can write a row.
    add = decide_cleanup(_cleanup_state(body, [], None)).add_finalizer
    if add and not await _set_finalizer(key, str(meta.get("uid")), present=True):
        return False  # the ResearchJob is gone or was replaced
    now = _now()
    created = dt.datetime.fromisoformat(str(meta.get("creationTimestamp")).replace("Z", "+00:00"))
    jobs = [
        dataclasses.replace(j, message=f"{j.message}: {detail}" if detail else j.message)
        if j.failed and (detail := await _failure_detail(namespace, j.name))
        else j
        for j in WORLD.jobs_of(key).values()
    ]
    obs = Observed(
        generation=int(meta.get("generation") or 0),
        created=created,
        now=now,
        jobs=jobs,
        store=WORLD.store_view(key),
        previous=prev,
    )
    d = decide(spec, obs)
    st = d.status
    logger.debug(
        f"pass: phase={st.phase} plan={d.create_plan} waiting={d.waiting_batches} writer={d.create_writer} "
        f"delete={d.delete_jobs} jobs={[j.name for j in jobs]}"
    )
    remaining: int | None = None
    if spec.budget.deadline_seconds is not None:
        remaining = int(spec.budget.deadline_seconds - (now - created).total_seconds())

    if (d.create_plan or d.create_writer or d.waiting_batches) and key not in WORLD.rbac_ready:
        if not cfg.worker_service_account:
            for obj in worker_rbac(owner):
                await _create(obj["kind"], obj, logger)
        WORLD.rbac_ready.add(key)

    quota_blocked: str | None = None
    for step, wanted in ((Step.PLAN, d.create_plan), (Step.WRITE, d.create_writer)):
        if wanted:
            job = worker_job(owner, spec, cfg, st.plan_id or "", step, active_deadline_seconds=remaining)
            outcome = await _create("Job", job, logger)
            if outcome == "created":
                metrics.JOBS_CREATED.labels(step.value).inc()
                WORLD.created[key][job["metadata"]["name"]] = job_view(job)
            elif outcome == "quota":
                quota_blocked = f"the {step.value} Job is waiting for quota"

    for job_name_ in d.delete_jobs:
        await _delete_job(namespace, job_name_)
        WORLD.deleted.add(job_name_)

    created_now = 0
    # Every unfinished child Job counts against the caps (in Kueue mode also one still suspended in
    # its LocalQueue: the caps bound what is handed to Kueue); waiting batches make it a contender.
    active = sum(1 for j in WORLD.jobs_of(key).values() if j.unfinished)
    WORLD.demands[key] = Demand(namespace, name, active, len(d.waiting_batches))
    if d.waiting_batches:
        async with WORLD.admission_lock:
            me = Demand(namespace, name, active, len(d.waiting_batches))
            verdict = quota_headroom(
                WORLD.quotas_of(namespace),
                PodResources.from_spec(spec.worker.resources.requests.wire(), spec.worker.resources.limits.wire()),
            )
            n = admit(me, spec.parallelism.max_active_jobs, WORLD.active_demands(), cfg.caps, verdict)
            if n == 0 and verdict.blocked:
                quota_blocked = f"ResourceQuota {verdict.binding}"
            plan = batches(spec.analysts.count, spec.parallelism.batch_size)
            for b in d.waiting_batches[:n]:
                job = worker_job(
                    owner, spec, cfg, st.plan_id or "", Step.INTERVIEW, plan[b], b, active_deadline_seconds=remaining
                )
                outcome = await _create("Job", job, logger)
                if outcome == "quota":
                    quota_blocked = "the API server answered 403 exceeded quota"
                    break
                if outcome == "created":
                    metrics.JOBS_CREATED.labels("interview").inc()
                created_now += 1
                WORLD.created[key][job["metadata"]["name"]] = job_view(job)
            WORLD.demands[key] = Demand(namespace, name, active + created_now, len(d.waiting_batches) - created_now)
        started = 0 if cfg.kueue_queue else created_now  # in Kueue mode a new Job waits, suspended
        st.batches.active += started
        st.batches.queued -= started
        if started:
            st.message = (
                f"{st.sections_done}/{spec.analysts.count} sections; {st.batches.active} batch Jobs running, "
                f"{st.batches.queued} waiting"
            )
    if st.phase in (Phase.Succeeded, Phase.Failed):
        WORLD.demands.pop(key, None)

    if quota_blocked:
        metrics.QUOTA_WAITS.labels(namespace).inc()
        st.message = f"waiting for quota: {quota_blocked}"
    mine = list(WORLD.jobs_of(key).values())
    workloads, queues = kueue.gather(
        namespace, mine, cfg.kueue_queue, KUEUE_INDEXES.get("kueue_workloads"), KUEUE_INDEXES.get("kueue_localqueues")
    )
    wpc = kueue.priority_class(spec.priority, cfg)
    wait = kueue.wait_status(mine, workloads, queues, cfg.kueue_queue, cfg.kueue_watch, wpc)
    kueue.annotate(st, wait, prev, obs.generation, now, kueue_mode=bool(cfg.kueue_queue))
    quota_cond = condition(
        prev,
        "QuotaExceeded",
        quota_blocked is not None,
        "ExceededQuota" if quota_blocked else "WithinQuota",
        quota_blocked or "",
        obs.generation,
        now,
    )
    st.conditions = [*(st.conditions or []), quota_cond]
    if quota_blocked and not any(c.type == "QuotaExceeded" and c.status == "True" for c in prev.conditions or []):
        kopf.event(body, type="Warning", reason="QuotaExceeded", message=f"waiting: {quota_blocked}")

    if WORLD.phases.get(key) != st.phase:  # a pass may run before our last status write is seen
        for etype, reason, message in d.events:
            kopf.event(
                body, type=etype, reason=reason, message=(st.message or message) if reason == st.phase else message
            )
    await _patch_status(key, st, prev)
    WORLD.phases[key] = st.phase
    _update_phase_gauges()

    if d.delete_self:
        kopf.event(
            body,
            type="Normal",
            reason="TTLExpired",
            message="deleting the finished ResearchJob (ttlSecondsAfterFinished)",
        )
        await call(
            "delete",
            "researchjob",
            client.CustomObjectsApi(api()).delete_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
        )
    return quota_blocked is not None


# ------------------------------------------------------------------------------------------
# deletion of external rows (the external-store finalizer)
# ------------------------------------------------------------------------------------------


def _dsn_ref(body: kopf.Body) -> SecretKeyRef | None:
    """The DSN Secret key of a postgres-store ResearchJob (read from the raw spec, so a spec that no
    longer validates can still be cleaned up), else None."""
    store = (body.get("spec") or {}).get("store") or {}
    if store.get("type") != StoreType.postgres.value:
        return None
    try:
        return SecretKeyRef.model_validate(store.get("dsnSecretRef") or {})
    except ValidationError:
        return None


def _cleanup_state(body: kopf.Body, workers: list[str], cleanup: JobView | None) -> CleanupState:
    meta = body.get("metadata", {})
    return CleanupState(
        postgres=_dsn_ref(body) is not None,
        has_finalizer=FINALIZER in (meta.get("finalizers") or []),
        deleting=bool(meta.get("deletionTimestamp")),
        workers=workers,
        cleanup=cleanup,
        now=_now(),
    )


async def _set_finalizer(key: Key, uid: str, *, present: bool) -> bool:
    """Add or remove our finalizer with an optimistic-concurrency merge patch (resourceVersion), so
    finalizers others add at the same time are kept. False if the ResearchJob (this uid) is gone."""
    namespace, name = key
    custom = client.CustomObjectsApi(api())
    for _ in range(5):
        try:
            obj = await call(
                "get", "researchjob", custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name
            )
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        meta = obj.get("metadata", {})
        if meta.get("uid") != uid:
            return False
        current = list(meta.get("finalizers") or [])
        if (FINALIZER in current) == present:
            return True
        wanted = [*current, FINALIZER] if present else [f for f in current if f != FINALIZER]
        patch = {"metadata": {"finalizers": wanted, "resourceVersion": meta.get("resourceVersion")}}
        try:
            await call(
                "patch",
                "researchjob",
                custom.patch_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                patch,
            )
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            if e.status != 409:
                raise
    raise ApiException(status=409, reason=f"the finalizers of {namespace}/{name} kept changing")


FINALIZED: set[str] = set()  # uids of ResearchJobs whose finalizer this process removed (until DELETED)


async def finalize_once(key: Key, body: kopf.Body, logger: kopf.Logger) -> bool:
    """A pass over a ResearchJob being deleted: stop its workers, delete its PostgreSQL rows with a
    cleanup Job, then let it go. Returns True when it should back off."""
    namespace, name = key
    meta = body.get("metadata", {})
    uid = str(meta.get("uid"))
    if FINALIZER not in (meta.get("finalizers") or []) or uid in FINALIZED:
        return False  # FINALIZED: the body may predate our removing the finalizer; starting again would leak a Job
    owner = Owner(namespace, name, uid)
    all_jobs = list((WORLD.job_index or {}).get(key, []))
    cleanup = next((j for j in all_jobs if j.step == CLEANUP_STEP), None)
    if cleanup is not None and cleanup.failed and (detail := await _failure_detail(namespace, cleanup.name)):
        cleanup = dataclasses.replace(cleanup, message=f"{cleanup.message}: {detail}")
    workers = sorted(j.name for j in all_jobs if j.step != CLEANUP_STEP)
    d = decide_cleanup(_cleanup_state(body, workers, cleanup))
    for worker_name in d.delete_workers:  # foreground: the Job stays until its pods are gone
        await _delete_job(namespace, worker_name, propagation="Foreground")
    if d.create_cleanup:
        ref = _dsn_ref(body)
        assert ref is not None
        try:
            worker: WorkerSpec | None = WorkerSpec.model_validate((body.get("spec") or {}).get("worker") or {})
        except ValidationError:
            worker = None
        foreground = "foregroundDeletion" in (meta.get("finalizers") or [])
        job = cleanup_job(owner, ref, settings(), worker, owned=not foreground)
        try:
            outcome = await _create("Job", job, logger)
        except ApiException as e:
            if e.status == 403 and "being terminated" in (e.body or ""):
                d.skipped = (
                    f"namespace {namespace} is being deleted, so no cleanup Job can start there; the PostgreSQL "
                    f"rows of job uid {uid} are left: delete them with `research-worker cleanup --job-uid {uid}`"
                )
                d.remove_finalizer = True
            else:
                raise
        else:
            if outcome == "created":
                metrics.JOBS_CREATED.labels(CLEANUP_STEP).inc()
                kopf.event(
                    body,
                    type="Normal",
                    reason="CleanupStarted",
                    message=f"cleanup Job {job['metadata']['name']} started",
                )
            elif outcome == "quota":
                d.message = "deleting: the cleanup Job is waiting for quota"
    if d.delete_cleanup and cleanup is not None:
        await _delete_job(namespace, cleanup.name)
        WORLD.failure_details.pop((namespace, cleanup.name), None)  # the next Job of that name fails anew
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
    if d.message or d.failure or failed_before:
        st = prev.model_copy()
        st.message = d.message or st.message
        gen = int(meta.get("generation") or 0)
        cond = condition(
            prev,
            "CleanupFailed",
            d.failure is not None,
            "CleanupJobFailed" if d.failure else "CleaningUp",
            d.failure or "",
            gen,
            _now(),
        )
        st.conditions = [*(c for c in prev.conditions or [] if c.type != "CleanupFailed"), cond]
        await _patch_status(key, st, prev)
    if d.remove_finalizer:
        await _set_finalizer(key, uid, present=False)
        FINALIZED.add(uid)
        if not d.skipped:
            logger.info(f"{namespace}/{name}: PostgreSQL rows deleted; finalizer removed")
    return d.failure is not None


def _invalid_status(prev: ResearchJobStatus, msg: str, meta: Any) -> ResearchJobStatus:
    gen = int(meta.get("generation") or 0)
    st = prev.model_copy()
    st.phase = Phase.Failed
    st.message = f"invalid spec: {msg}"
    st.conditions = [condition(prev, "Failed", True, "InvalidSpec", msg, gen, _now())]
    return st


async def _patch_status(key: Key, st: ResearchJobStatus, prev: ResearchJobStatus | None = None) -> None:
    new = st.model_dump(by_alias=True, mode="json")  # None values delete stale keys (merge patch)
    if prev is not None and new == prev.model_dump(by_alias=True, mode="json"):
        return
    namespace, name = key
    try:
        await call(
            "patch",
            "researchjob/status",
            client.CustomObjectsApi(api()).patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": new},
        )
    except ApiException as e:
        if e.status != 404:
            raise


def _update_phase_gauges() -> None:
    counts = {p.value: 0 for p in Phase}
    for phase in WORLD.phases.values():
        counts[str(phase)] = counts.get(str(phase), 0) + 1
    for phase, n in counts.items():
        metrics.JOBS_BY_PHASE.labels(phase).set(n)
    metrics.BATCHES_ACTIVE.set(WORLD.active_interviews())
    metrics.BATCHES_QUEUED.set(sum(d.waiting for d in WORLD.demands.values()))
