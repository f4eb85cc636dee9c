"""The reconcile loop of one ResearchJob: gather its world, call the pure decisions (``reconcile``,
``admission``, ``finalizer``), apply them through ``kube``, then sleep until a watch wakes it.

A ResearchJob that waits (for caps, fair share or quota) is not polled: the watches wake it when
something that can unblock it changes (a worker Job finishes or goes, a ResourceQuota or the
settings change), and otherwise only a slow resync or its own deadline/TTL does. Only an API error
or a 403 "exceeded quota" that the computed headroom did not foresee backs off and retries.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from research_api.researchjob import (
    ModelSpec,
    Phase,
    ResearchJobSpec,
    ResearchJobStatus,
    SecretKeyRef,
    StoreType,
    WorkerSpec,
)
from research_api.task import Step
from research_operator import endpoints as ep
from research_operator import kube, metrics
from research_operator.admission import (
    Admission,
    BudgetVerdict,
    Demand,
    EndpointVerdict,
    PodResources,
    WaitReason,
    decide_admission,
    never_fits,
    quota_headroom,
)
from research_operator.builders import Owner, cleanup_job, worker_job, worker_rbac
from research_operator.constants import FINALIZER
from research_operator.finalizer import CLEANUP_STEP, CleanupState, decide_cleanup
from research_operator.reconcile import (
    JobView,
    Observed,
    Waiting,
    apply_waiting,
    batches,
    condition,
    decide,
    rfc3339,
    step_noun,
)
from research_operator.settings import Settings
from research_operator.world import WORLD, Blocked, Key, job_view

log = logging.getLogger(__name__)

BASE_SETTINGS = Settings.from_env()
MAX_BACKOFF = 60.0


def settings() -> Settings:
    """Static settings from the environment, overridden by the watched settings ConfigMap."""
    return BASE_SETTINGS.with_configmap(WORLD.settings_data) if WORLD.settings_data else BASE_SETTINGS


@dataclass
class Outcome:
    """What a pass tells the loop: back off (an error, an unforeseen 403) or sleep until ``wake_at``."""

    retry: bool = False
    wake_at: dt.datetime | None = None


LOOPS: dict[Key, asyncio.Task[None]] = {}


def ensure_loop(key: Key, logger: kopf.Logger) -> None:
    WORLD.event(key)
    if key not in LOOPS or LOOPS[key].done():
        namespace = key[0]
        name = WORLD.bodies[key].get("metadata", {}).get("name")
        LOOPS[key] = asyncio.create_task(reconcile_loop(key, logger), name=f"reconcile {namespace}/{name}")
    WORLD.wake(key)


def stop_loop(key: Key) -> None:
    task = LOOPS.pop(key, None)
    if task is not None:
        task.cancel()
    WORLD.forget(key)
    WORLD.wake_waiting()  # what it held or waited for is free


async def reconcile_loop(key: Key, logger: kopf.Logger) -> None:
    """Reconcile one ResearchJob until it is deleted: a pass, then sleep until woken."""
    wake = WORLD.event(key)
    backoff = 0.0
    woken = True
    until = 0.0  # when the pass after the last one falls due with no wake-up (resync, back-off, deadline)
    while key in WORLD.bodies:
        wake.clear()
        if woken and key not in WORLD.dirty and still_blocked(key):
            # A freed slot that is not ours to take: sleep on, to the same time as before.
            woken = await _sleep(wake, max(0.05, until - time.monotonic()))
            continue
        WORLD.dirty.discard(key)
        body = WORLD.bodies[key]
        ref = f"{key[0]}/{body.get('metadata', {}).get('name')}"
        start = time.monotonic()
        try:
            out = await reconcile_once(key, body, logger)
        except ApiException as e:
            logger.warning(f"reconcile of {ref} hit an API error {e.status}: {e.reason}")
            out = Outcome(retry=True)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - keep reconciling; the error is logged with its traceback
            logger.exception(f"reconcile of {ref} failed")
            out = Outcome(retry=True)
        finally:
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - start)
        cfg = settings()
        backoff = min(MAX_BACKOFF, max(cfg.quota_backoff_seconds, backoff * 2)) if out.retry else 0.0
        timeout = backoff or cfg.resync_seconds
        if out.wake_at is not None:
            timeout = min(timeout, max(0.05, (out.wake_at - _now()).total_seconds()))
        until = time.monotonic() + timeout
        woken = await _sleep(wake, timeout)


async def _sleep(wake: asyncio.Event, timeout: float) -> bool:
    """Sleep until woken (True) or the timeout (False)."""
    try:
        await asyncio.wait_for(wake.wait(), timeout=timeout)
        return True
    except TimeoutError:
        return False


def still_blocked(key: Key) -> bool:
    """Whether a ResearchJob woken only because a slot may have freed up (not by a change of its own)
    would still be admitted nothing: then its pass is skipped, so one finished Job among many waiting
    ResearchJobs costs a quick re-check each, not a full pass each."""
    b = WORLD.blocked.get(key)
    if b is None or not WORLD.waiting.get(key):
        return False
    namespace = key[0]
    demands = WORLD.demands(cached=True)
    me = next((d for d in demands if (d.namespace, d.name) == key), Demand(namespace, key[1], 0, b.count))
    quotas = WORLD.quotas_of(namespace)
    verdict = quota_headroom(quotas, b.pod, WORLD.reserved(namespace), b.priority_class)
    too_small = never_fits(quotas, b.pod, b.priority_class)
    cfg = settings()
    endpoint = WORLD.endpoints.get(b.endpoint) if b.endpoint else None
    capacity = _endpoint_verdict(endpoint, b.demand) if endpoint is not None else None
    budget = _budget_verdict(namespace, cfg, _now()) if b.step != CLEANUP_STEP else None
    adm = decide_admission(me, b.own_limit, demands, cfg.caps, verdict, too_small, capacity, budget)
    return adm.admitted == 0


def _endpoint_verdict(endpoint: ep.Endpoint, demand: int) -> EndpointVerdict:
    in_use = sum(p.demand for _, p in WORLD.endpoint_pods(endpoint.name))
    return EndpointVerdict(endpoint.name, endpoint.max_concurrent, in_use, demand, ep.standby(endpoint))


def _budget_verdict(namespace: str, cfg: Settings, now: dt.datetime) -> BudgetVerdict | None:
    budget = cfg.token_budgets.get(namespace)
    if budget is None:
        return None
    start, end = ep.window(now, budget.seconds)
    used = ep.spent(WORLD.usage_since(namespace), start)
    metrics.NAMESPACE_TOKENS.labels(namespace).set(used)
    return BudgetVerdict(namespace, budget.tokens, used, budget.period, rfc3339(end))


def _endpoint_of(model: ModelSpec | None, cfg: Settings) -> ep.Endpoint | None:
    if model is None:
        return None
    return ep.match(WORLD.endpoints.values(), model.base_url or cfg.default_model_base_url, model.name)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def _failure_detail(namespace: str, job: JobView) -> str:
    cache_key = (namespace, job.uid)
    if cache_key not in WORLD.failure_details:
        WORLD.failure_details[cache_key] = await kube.pod_failure_detail(namespace, job.name)
    return WORLD.failure_details[cache_key]


async def _with_detail(namespace: str, job: JobView) -> JobView:
    if job.failed and (detail := await _failure_detail(namespace, job)):
        return dataclasses.replace(job, message=f"{job.message}: {detail}")
    return job


# ------------------------------------------------------------------------------------------
# admission: the one path every worker Job takes
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Want:
    """Worker Jobs a pass wants to start, all of one step."""

    step: str
    jobs: list[dict[str, Any]]
    own_limit: int  # the ResearchJob's own bound on its running Jobs
    analysts: list[int] | None = None  # analysts of each Job (interview batches)


async def admit_and_create(
    key: Key, owner: Owner, want: Want, worker: WorkerSpec, cfg: Settings, model: ModelSpec | None = None
) -> tuple[Waiting, int]:
    """Admit what fits (caps, fair share, ResourceQuota headroom, the model endpoint's capacity, the
    namespace's token budget), record the admitted Jobs as ours before creating them, create them;
    the number created, and what still waits and why. ``model``: the ResearchJob's model (None for
    the cleanup Job, which calls no model)."""
    namespace = key[0]
    pod = PodResources.from_spec(worker.resources.requests.wire(), worker.resources.limits.wire())
    priority_class = worker.priority_class_name or ""
    endpoint = _endpoint_of(model, cfg)
    needs = [
        ep.demand(want.step, (want.analysts or [1] * len(want.jobs))[i], model.max_concurrency, endpoint)
        for i in range(len(want.jobs))
    ] if endpoint is not None and model is not None else []
    budget = _budget_verdict(namespace, cfg, _now()) if model is not None else None
    async with WORLD.admission_lock:
        WORLD.waiting[key] = len(want.jobs)
        demands = WORLD.demands()
        me = next((d for d in demands if (d.namespace, d.name) == key), Demand(namespace, key[1], 0, len(want.jobs)))
        quotas = WORLD.quotas_of(namespace)
        verdict = quota_headroom(quotas, pod, WORLD.reserved(namespace), priority_class)
        too_small = never_fits(quotas, pod, priority_class)
        capacity = _endpoint_verdict(endpoint, max(needs)) if endpoint is not None else None
        adm: Admission = decide_admission(
            me, want.own_limit, demands, cfg.caps, verdict, too_small, capacity, budget
        )
        admitted = want.jobs[: adm.admitted]
        if endpoint is not None and capacity is not None:
            cm = ep.share_configmap_name(owner.name)
            left = endpoint.max_concurrent - capacity.in_use  # pods admitted before come first
            for job, need in zip(admitted, needs, strict=False):
                first = max(0, min(need, left))  # 0: it starts paused and waits for its share
                left -= need
                ep.stamp(job, endpoint, need, ep.Share(first), cm, f"{time.time():.6f}")
        pending = WORLD.created[key]
        for job in admitted:
            pending[job["metadata"]["name"]] = job_view(job)
        WORLD.waiting[key] = len(want.jobs) - len(admitted)
        WORLD.bump()
    if endpoint is not None and admitted:
        await sync_endpoint(endpoint.name)  # the shares ConfigMap exists before the pods read it
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
    if endpoint is not None and len(admitted) > created:
        request_share_sync(endpoint.name)  # some were not created after all
    if still and refused is None:
        WORLD.blocked[key] = Blocked(
            still,
            want.own_limit,
            pod,
            priority_class,
            endpoint.name if endpoint is not None else "",
            max(needs) if needs else 0,
            want.step,
        )
    else:
        WORLD.blocked.pop(key, None)
    if refused is not None:
        return Waiting(step_noun(want.step, still), refused[0], refused[1], refused=True), created
    if still and adm.reason is not None:
        until = None
        if adm.reason == WaitReason.TOKEN_BUDGET and budget is not None:
            until = dt.datetime.fromisoformat(budget.resets.replace("Z", "+00:00"))
        return Waiting(step_noun(want.step, still), adm.reason, adm.message, until=until), created
    return Waiting(), created


# ------------------------------------------------------------------------------------------
# endpoint shares: written for the running pods whenever what is admitted against an endpoint changes
# ------------------------------------------------------------------------------------------

_SYNC_WANTED: set[str] = set()
_SYNC_LOCK: asyncio.Lock | None = None
_SYNC_EVENT: asyncio.Event | None = None
_SYNC_TASK: asyncio.Task[None] | None = None


def request_share_sync(endpoint: str) -> None:
    """Rewrite the shares of ``endpoint``'s pods soon (coalesced, in one background task)."""
    global _SYNC_EVENT, _SYNC_TASK
    _SYNC_WANTED.add(endpoint)
    if _SYNC_EVENT is None:
        _SYNC_EVENT = asyncio.Event()
    if _SYNC_TASK is None or _SYNC_TASK.done():
        _SYNC_TASK = asyncio.create_task(_share_syncer(_SYNC_EVENT), name="endpoint shares")
    _SYNC_EVENT.set()


async def _share_syncer(event: asyncio.Event) -> None:
    while True:
        await event.wait()
        event.clear()
        await asyncio.sleep(0.05)  # one rewrite for a burst of changes
        for name in sorted(_SYNC_WANTED):
            _SYNC_WANTED.discard(name)
            try:
                await sync_endpoint(name)
            except ApiException as e:
                log.warning(f"writing the shares of ModelEndpoint {name} hit an API error {e.status}: {e.reason}")
                _SYNC_WANTED.add(name)
                await asyncio.sleep(1.0)
                event.set()
            except Exception:  # noqa: BLE001 - keep syncing the other endpoints; logged with its traceback
                log.exception(f"writing the shares of ModelEndpoint {name} failed")


async def sync_endpoint(name: str) -> None:
    """Give every running pod admitted against ``name`` its current share (one ConfigMap per
    ResearchJob, written only when it changed), and show the use in the ModelEndpoint's status and
    metrics. A deleted ModelEndpoint leaves its pods their full demand, with no per-minute limits.
    One at a time, so a slower write never replaces a newer one."""
    global _SYNC_LOCK
    if _SYNC_LOCK is None:
        _SYNC_LOCK = asyncio.Lock()
    async with _SYNC_LOCK:
        await _sync_endpoint(name)


async def _sync_endpoint(name: str) -> None:
    endpoint = WORLD.endpoints.get(name)
    pods = WORLD.endpoint_pods(name)
    if endpoint is not None:
        table = ep.shares(endpoint, [p for _, p in pods])
    else:
        table = {p.job: ep.Share(p.demand) for _, p in pods}
    by_key: dict[Key, dict[str, ep.Share]] = {}
    for key, p in pods:
        by_key.setdefault(key, {})[p.job] = table[p.job]
    for key, mine in by_key.items():
        body = WORLD.bodies.get(key)
        if body is None:
            continue
        rj = str(body.get("metadata", {}).get("name"))
        owner = Owner(key[0], rj, key[1])
        cm = ep.shares_configmap(key[0], rj, owner.reference(), name, mine)
        data = cm["data"][ep.SHARES_KEY]
        if WORLD.shares_written.get(key) != data:
            await kube.put_configmap(cm)
            WORLD.shares_written[key] = data
    in_flight = sum(s.concurrency for s in table.values())
    waiting = WORLD.endpoint_waiters(name)
    minute_ago = _now() - dt.timedelta(minutes=1)
    recent = sum(
        obj.tokens
        for key in by_key
        for obj in (WORLD.stored_index or {}).get(key, [])
        if obj.created is not None and obj.created >= minute_ago
    )
    metrics.ENDPOINT_TOKENS_PER_MINUTE.labels(name).set(recent)
    metrics.ENDPOINT_IN_FLIGHT.labels(name).set(in_flight)
    metrics.ENDPOINT_PODS.labels(name).set(len(pods))
    metrics.ENDPOINT_WAITING.labels(name).set(waiting)
    if endpoint is not None:
        metrics.ENDPOINT_CAPACITY.labels(name).set(endpoint.max_concurrent)
        n = max(1, len(table))
        metrics.ENDPOINT_SHARE.labels(name, "concurrency").set(in_flight / n if table else 0)
        for resource, total in (
            ("requests_per_minute", endpoint.requests_per_minute),
            ("tokens_per_minute", endpoint.tokens_per_minute),
        ):
            metrics.ENDPOINT_SHARE.labels(name, resource).set((total or 0) / n if table else 0)
        status = {
            "observedGeneration": endpoint.generation,
            "requestsInFlightLimit": in_flight,
            "pods": len(pods),
            "waitingResearchJobs": waiting,
            "shares": [
                {"namespace": p.namespace, "researchJob": p.research_job, "job": p.job, **table[p.job].wire()}
                for _, p in sorted(pods, key=lambda kp: (kp[1].namespace, kp[1].job))
            ]
            or None,
        }
        if WORLD.endpoint_status.get(name) != status:
            await kube.patch_endpoint_status(name, status)
            WORLD.endpoint_status[name] = status


def _pods_blocked(jobs: list[JobView]) -> str | None:
    for job in jobs:
        failure = WORLD.create_failures.get(job.uid) if job.uid else None
        if failure and job.active and job.pods == 0:
            return f"{step_noun(job.step, 1).removeprefix('the ')} {job.name} cannot create its pod: {failure}"
    return None


# ------------------------------------------------------------------------------------------
# one pass
# ------------------------------------------------------------------------------------------


async def reconcile_once(key: Key, body: kopf.Body, logger: kopf.Logger) -> Outcome:
    namespace, uid = key
    meta = body.get("metadata", {})
    name = str(meta.get("name"))
    if meta.get("deletionTimestamp"):
        return await finalize_once(key, body, logger)
    cfg = settings()
    prev = ResearchJobStatus.model_validate(body.get("status") or {})
    try:
        spec = ResearchJobSpec.model_validate(dict(body.get("spec") or {}))
    except ValidationError as e:
        msg = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        await kube.patch_status(namespace, name, uid, _invalid_status(prev, msg, meta), prev)
        kopf.warn(body, reason="InvalidSpec", message=msg)
        return Outcome()
    owner = Owner(namespace, name, uid)
    # The external-store finalizer goes on before the first worker Job can write a row.
    add = decide_cleanup(_cleanup_state(body, [], None)).add_finalizer
    if add and not await kube.set_finalizer(namespace, name, uid, present=True):
        return Outcome()  # the ResearchJob is gone or was replaced
    now = _now()
    created = dt.datetime.fromisoformat(str(meta.get("creationTimestamp")).replace("Z", "+00:00"))
    jobs = [await _with_detail(namespace, j) for j in WORLD.jobs_of(key).values()]
    obs = Observed(
        generation=int(meta.get("generation") or 0),
        created=created,
        now=now,
        jobs=jobs,
        store=WORLD.store_view(key),
        previous=prev,
        uid=uid,
    )
    d = decide(spec, obs)
    st = d.status
    remaining: int | None = None
    if spec.budget.deadline_seconds is not None:
        remaining = int(spec.budget.deadline_seconds - (now - created).total_seconds())

    for job in jobs:
        if job.name in d.delete_jobs and job.uid:
            WORLD.deleted[key].add(job.uid)  # before the request: the watch may answer first
            await kube.delete_job(namespace, job.name, job.uid)

    plan_id = st.plan_id or ""
    want: Want | None = None
    if d.create_plan or d.create_writer:
        step = Step.PLAN if d.create_plan else Step.WRITE
        single = worker_job(owner, spec, cfg, plan_id, step, active_deadline_seconds=remaining)
        want = Want(step.value, [single], own_limit=1)
    elif d.waiting_batches:
        plan = batches(spec.analysts.count, spec.parallelism.batch_size)
        built = [
            worker_job(owner, spec, cfg, plan_id, Step.INTERVIEW, plan[b], b, active_deadline_seconds=remaining)
            for b in d.waiting_batches
        ]
        want = Want(
            Step.INTERVIEW.value,
            built,
            own_limit=spec.parallelism.max_active_jobs,
            analysts=[len(plan[b]) for b in d.waiting_batches],
        )
    waiting = Waiting()
    if want is not None:
        waiting, _ = await admit_and_create(key, owner, want, spec.worker, cfg, spec.model)
        if want.step == Step.INTERVIEW.value:
            started = len(want.jobs) - WORLD.waiting.get(key, 0)
            st.batches.active += started
            st.batches.queued -= started
            if started:
                st.message = (
                    f"{st.sections_done}/{spec.analysts.count} sections; {st.batches.active} batch Jobs running, "
                    f"{st.batches.queued} waiting"
                )
    elif WORLD.waiting.pop(key, None) is not None:
        WORLD.blocked.pop(key, None)
        WORLD.bump()
    live = [j for j in WORLD.jobs_of(key).values() if j.active]
    waiting = dataclasses.replace(waiting, pods_blocked=_pods_blocked(live))
    events = apply_waiting(st, prev, waiting, obs.generation, now)

    if WORLD.phases.get(key) != st.phase:  # a pass may run before our last status write is seen
        for etype, reason, message in d.events:
            kopf.event(
                body, type=etype, reason=reason, message=(st.message or message) if reason == st.phase else message
            )
    for etype, reason, message in events:
        kopf.event(body, type=etype, reason=reason, message=message)
    await kube.patch_status(namespace, name, uid, st, prev)
    WORLD.phases[key] = st.phase
    _update_phase_gauges()

    if d.delete_self:
        kopf.event(
            body,
            type="Normal",
            reason="TTLExpired",
            message="deleting the finished ResearchJob (ttlSecondsAfterFinished)",
        )
        await kube.delete_researchjob(namespace, name, uid)
    wake_at = d.wake_at
    if waiting.until is not None:  # the token budget's period rolls over then
        wake_at = min(wake_at, waiting.until) if wake_at is not None else waiting.until
    return Outcome(retry=waiting.refused, wake_at=wake_at)


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
        cleanup = await _with_detail(namespace, cleanup)
    workers = [j for j in all_jobs if j.step != CLEANUP_STEP]
    d = decide_cleanup(_cleanup_state(body, sorted(j.name for j in workers), cleanup))
    for job in workers:  # foreground: the Job stays until its pods are gone
        if job.name in d.delete_workers and job.uid:
            await kube.delete_job(namespace, job.name, job.uid, propagation="Foreground")
    waiting = Waiting()
    if d.create_cleanup:
        ref = _dsn_ref(body)
        assert ref is not None
        try:
            worker: WorkerSpec | None = WorkerSpec.model_validate((body.get("spec") or {}).get("worker") or {})
        except ValidationError:
            worker = None
        foreground = "foregroundDeletion" in (meta.get("finalizers") or [])
        cleaner = cleanup_job(owner, ref, settings(), worker, owned=not foreground)
        waiting, started = await admit_and_create(
            key, owner, Want(CLEANUP_STEP, [cleaner], 1), worker or WorkerSpec(), settings()
        )
        if waiting.message.startswith(f"namespace {namespace} is being deleted"):
            d.skipped = (
                f"namespace {namespace} is being deleted, so no cleanup Job can start there; the PostgreSQL "
                f"rows of job uid {uid} are left: delete them with `research-worker cleanup --job-uid {uid}`"
            )
            d.remove_finalizer = True
            waiting = Waiting()
        elif waiting.reason is not None:
            d.message = f"deleting: {step_noun(CLEANUP_STEP, 1)} waits: {waiting.message}"
        elif started:
            kopf.event(
                body,
                type="Normal",
                reason="CleanupStarted",
                message=f"cleanup Job {cleaner['metadata']['name']} started",
            )
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
        await kube.patch_status(namespace, name, uid, st, prev)
    if d.remove_finalizer:
        await kube.set_finalizer(namespace, name, uid, present=False)
        FINALIZED.add(uid)
        if not d.skipped:
            logger.info(f"{namespace}/{name}: PostgreSQL rows deleted; finalizer removed")
    return Outcome(retry=d.failure is not None or waiting.refused)


def _invalid_status(prev: ResearchJobStatus, msg: str, meta: kopf.Meta | dict[str, object]) -> ResearchJobStatus:
    gen = int(str(meta.get("generation") or 0))
    st = prev.model_copy()
    st.phase = Phase.Failed
    st.message = f"invalid spec: {msg}"
    st.conditions = [condition(prev, "Failed", True, "InvalidSpec", msg, gen, _now())]
    return st


def _update_phase_gauges() -> None:
    counts = {p.value: 0 for p in Phase}
    for phase in WORLD.phases.values():
        counts[str(phase)] = counts.get(str(phase), 0) + 1
    for phase, n in counts.items():
        metrics.JOBS_BY_PHASE.labels(phase).set(n)
    metrics.BATCHES_ACTIVE.set(WORLD.active_interviews())
    metrics.BATCHES_QUEUED.set(sum(WORLD.waiting.values()))
