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
from collections.abc import Callable, Mapping
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from research_api.researchjob import (
    Phase,
    ResearchJobSpec,
    ResearchJobStatus,
    WorkerSpec,
)
from research_api.task import Step
from research_operator import metrics
from research_operator.actions import kube, tracing
from research_operator.actions.admit import Outcome, Want, admit_and_create, pods_blocked, with_detail
from research_operator.actions.admit import now as _now
from research_operator.actions.deletion import cleanup_state, finalize_once
from research_operator.actions.estimating import estimate_of
from research_operator.cache.world import WORLD, Key, settings
from research_operator.decisions import kueue, status, tenancy
from research_operator.decisions.admission import PodResources, WaitReason, never_fits
from research_operator.decisions.finalizer import decide_cleanup
from research_operator.decisions.ledger import SHORT_SECONDS
from research_operator.decisions.manifests import Owner, worker_job_and_task, worker_network_policy, worker_rbac
from research_operator.decisions.reconcile import (
    Observed,
    Waiting,
    batches,
    continues_steps,
    decide,
    has_started,
)
from research_operator.lease_broker import broker
from research_operator.settings import Settings

log = logging.getLogger(__name__)


MAX_BACKOFF = 60.0


LOOPS: dict[Key, asyncio.Task[None]] = {}


KEPT_METADATA = (
    "name",
    "namespace",
    "uid",
    "generation",
    "resourceVersion",
    "creationTimestamp",
    "deletionTimestamp",
    "finalizers",
)


def slim(body: Mapping[str, Any]) -> kopf.Body:
    """What the loop needs of a ResearchJob: identity, spec, status. Not managedFields, annotations
    or labels, which can be most of an object; the loop holds one per ResearchJob between passes."""
    meta = body.get("metadata") or {}
    raw: dict[str, Any] = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: meta[k] for k in KEPT_METADATA if k in meta},
        "spec": body.get("spec") or {},
        "status": body.get("status") or {},
    }
    return kopf.Body(raw)  # type: ignore[arg-type]  # kopf.RawBody is a TypedDict of the same keys


LOOP_RESTART_DELAY = 1.0  # seconds before a loop that ended with an error is started again


def ensure_loop(key: Key, logger: kopf.Logger) -> None:
    WORLD.event(key)
    if key not in LOOPS or LOOPS[key].done():
        _start_loop(key, logger)
    WORLD.wake(key)


def _start_loop(key: Key, logger: kopf.Logger) -> None:
    name = WORLD.bodies[key].get("metadata", {}).get("name")
    task = asyncio.create_task(reconcile_loop(key, logger), name=f"reconcile {key[0]}/{name}")
    LOOPS[key] = task
    task.add_done_callback(lambda t: _loop_ended(key, logger, t))


def _loop_ended(key: Key, logger: kopf.Logger, task: asyncio.Task[None]) -> None:
    """A loop that ended with an error (a bug: passes catch their own) is started again, for no
    Job or ConfigMap event would: they only wake a loop that runs."""
    if task.cancelled() or task.exception() is None:
        return
    logger.error(f"the reconcile loop ended with an error, starting it again: {task.exception()!r}")

    def again() -> None:
        if key in WORLD.bodies and LOOPS.get(key) is task:
            _start_loop(key, logger)
            WORLD.wake(key)

    asyncio.get_running_loop().call_later(LOOP_RESTART_DELAY, again)


def stop_loop(key: Key, *, cancel: bool = True) -> None:
    """End a ResearchJob's loop and forget it. ``cancel``: False when the loop itself ends."""
    _set_phase(key, None)
    task = LOOPS.pop(key, None)
    if task is not None and cancel:
        task.cancel()
    contended = bool(WORLD.waiting.get(key))
    WORLD.forget(key)
    caps = settings().caps
    # What it held comes back through its Jobs' deletion events; a waiting one leaves the fair share
    # of a cap to the others, which may now take slots it was owed.
    if contended and (caps.global_max_active or caps.namespace_max_active):
        WORLD.wake_waiting(None if caps.global_max_active else key[0])


async def reconcile_loop(key: Key, logger: kopf.Logger) -> None:
    """Reconcile one ResearchJob until it is deleted: a pass, then sleep until woken."""
    wake = WORLD.event(key)
    backoff = 0.0
    while key in WORLD.bodies:
        wake.clear()
        WORLD.dirty.discard(key)
        body = WORLD.bodies[key]
        ref = f"{key[0]}/{body.get('metadata', {}).get('name')}"
        start = time.monotonic()
        WORLD.passing.add(key)
        try:
            out = await reconcile_once(key, body, logger)
        except kube.Gone as e:
            # A 422 also answers a status that fails the CRD's validation: end the loop only when the
            # ResearchJob is really gone, else no event might ever start it again.
            if not await _still_there(key, body):
                _forget_gone(key, ref, logger)
                return
            logger.warning(f"reconcile of {ref}: the API server refused the status write: {e}")
            out = Outcome(retry=True)
        except ApiException as e:
            if e.status == 404 and not await _still_there(key, body):
                _forget_gone(key, ref, logger)
                return
            logger.warning(f"reconcile of {ref} hit an API error {e.status}: {e.reason}")
            out = Outcome(retry=True)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - keep reconciling; the error is logged with its traceback
            logger.exception(f"reconcile of {ref} failed")
            out = Outcome(retry=True)
        finally:
            WORLD.passing.discard(key)
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - start)
        cfg = settings()
        backoff = min(MAX_BACKOFF, max(cfg.quota_backoff_seconds, backoff * 2)) if out.retry else 0.0
        timeout = backoff or cfg.resync_seconds
        if out.wake_at is not None:
            timeout = min(timeout, max(0.05, (out.wake_at - _now()).total_seconds()))
        await _sleep(wake, timeout)


async def _still_there(key: Key, body: kopf.Body) -> bool:
    try:
        return await kube.researchjob_exists(key[0], str(body.get("metadata", {}).get("name")), key[1])
    except ApiException:
        return True  # cannot tell: keep it, the pass is retried


def _forget_gone(key: Key, ref: str, logger: kopf.Logger) -> None:
    """A pass found its ResearchJob gone although no DELETED event came (it fell into the gap of a
    restarted watch): end its loop as the event would have."""
    logger.info(f"{ref} is gone; its reconcile loop ends")
    stop_loop(key, cancel=False)


async def _sleep(wake: asyncio.Event, timeout: float) -> bool:
    """Sleep until woken (True) or the timeout (False)."""
    try:
        await asyncio.wait_for(wake.wait(), timeout=timeout)
        return True
    except TimeoutError:
        return False


async def reconcile_once(key: Key, body: kopf.Body, logger: kopf.Logger) -> Outcome:
    namespace, uid = key
    meta = body.get("metadata", {})
    name = str(meta.get("name"))
    if meta.get("deletionTimestamp"):
        return await finalize_once(key, body, logger)
    left = WORLD.terminating_for(namespace, time.monotonic())
    refused_create = key in WORLD.create_refused  # the scheduler's create met the deletion: say so once
    WORLD.create_refused.discard(key)
    if left is not None and not refused_create:
        # Its namespace refused a create as being deleted moments ago: this ResearchJob is about to
        # go with it, and every request for it would only fail. Its wait ends with its DELETED
        # event, a ResearchJob created in a namespace of that name created again (which forgets
        # the memo and wakes it), or the memo's end, when it asks once more.
        return Outcome(wake_at=_now() + dt.timedelta(seconds=left))
    cfg = settings()
    prev = ResearchJobStatus.model_validate(body.get("status") or {})
    try:
        spec = ResearchJobSpec.model_validate(dict(body.get("spec") or {}))
    except ValidationError as e:
        msg = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        invalid = status.invalid_spec(prev, msg, int(meta.get("generation") or 0), _now())
        await kube.patch_status(namespace, name, uid, invalid, prev)
        kopf.warn(body, reason="InvalidSpec", message=msg)
        return Outcome()
    owner = Owner(namespace, name, uid)
    checks, since = await author_checks(cfg, logger) if tenancy.references(spec) else (tenancy.AuthorChecks.OFF, None)
    refused = tenancy.refusal(spec, cfg.allowlists, checks, cfg.admission_policy_binding)
    if refused is None:
        labels = await broker.namespace_labels(namespace) if spec.model.endpoint else {}
        refused = tenancy.endpoint_refusal(
            spec, namespace, WORLD.endpoints, labels, cfg.lease_broker_url, cfg.tenant_base_urls
        )
    created = dt.datetime.fromisoformat(str(meta.get("creationTimestamp")).replace("Z", "+00:00"))
    if refused is None and checks == tenancy.AuthorChecks.ENFORCED:
        # Started: it has Jobs or stored results (a plan id alone is named on the first pass).
        begun = bool(WORLD.jobs_of(key)) or bool(WORLD.store_view(key).analysts)
        refused = tenancy.predates_policy(spec, created, begun, since)
    if refused is not None:
        WORLD.refused.add(key)  # a settings change wakes it
    else:
        WORLD.refused.discard(key)
    # The external-store finalizer goes on before the first worker Job can write a row (a refused
    # ResearchJob writes none, and its cleanup Job would hand its Secret to a pod too).
    add = decide_cleanup(cleanup_state(body, [], None)).add_finalizer and refused is None
    if add and not await kube.set_finalizer(namespace, name, uid, present=True):
        return Outcome()  # the ResearchJob is gone or was replaced
    now = _now()
    await drop_jobs_that_never_fit(key, spec.worker, logger)
    jobs = [await with_detail(namespace, j) for j in WORLD.jobs_of(key).values()]
    store = WORLD.store_view(key)
    estimated = None
    # Not for a job the admins' policy refuses: its documents are read only once it may use them.
    if refused is None and not has_started(prev, len(jobs), len(store.analysts)):
        estimated = await estimate_of(namespace, spec, kube.configmap_data, WORLD.endpoints, cfg.default_model_base_url)
    obs = Observed(
        generation=int(meta.get("generation") or 0),
        created=created,
        now=now,
        jobs=jobs,
        store=store,
        previous=prev,
        uid=uid,
        refusal=refused,
        prices=broker.prices_of(key),
        quality_floor=cfg.quality_floor,
        estimate=estimated,
        traceparent=tracing.research_job_trace(key, owner, prev),
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
    plan = batches(spec.analysts.count, spec.parallelism.batch_size)
    # Pods go on to the next step when they can: the planner interviews the first batch, and the pod
    # that stores the last section writes the report.
    chain = continues_steps(spec, budgeted=namespace in cfg.token_budgets)
    if d.create_plan and chain:
        single, task = worker_job_and_task(
            owner, spec, cfg, plan_id, Step.PLAN, plan[0], 0, active_deadline_seconds=remaining, continue_steps=True
        )
        want = Want(Step.PLAN.value, [single], own_limit=1, analysts=[len(plan[0])], tasks=[task])
    elif d.create_plan or d.create_writer:
        step = Step.PLAN if d.create_plan else Step.WRITE
        single, task = worker_job_and_task(owner, spec, cfg, plan_id, step, active_deadline_seconds=remaining)
        want = Want(step.value, [single], own_limit=1, tasks=[task])
    elif d.waiting_batches:
        built = [
            worker_job_and_task(
                owner,
                spec,
                cfg,
                plan_id,
                Step.INTERVIEW,
                plan[b],
                b,
                active_deadline_seconds=remaining,
                continue_steps=chain,
            )
            for b in d.waiting_batches
        ]
        want = Want(
            Step.INTERVIEW.value,
            [job for job, _ in built],
            own_limit=spec.parallelism.max_active_jobs,
            analysts=[len(plan[b]) for b in d.waiting_batches],
            tasks=[task for _, task in built],
        )
    waiting = Waiting()
    started: int | None = None
    if want is not None:
        made = worker_rbac(owner, spec, plan_id)
        if cfg.worker_egress is not None:
            made.append(worker_network_policy(owner, cfg.worker_egress))
        rbac = (plan_id, made)
        waiting, _ = await admit_and_create(key, owner, want, spec.worker, cfg, spec.model, rbac, obs.traceparent)
        if want.step == Step.INTERVIEW.value:
            # In Kueue mode a new Job waits, suspended, until Kueue admits it.
            started = 0 if cfg.kueue_queue else len(want.jobs) - WORLD.waiting.get(key, 0)
    elif WORLD.waiting.pop(key, None) is not None:
        WORLD.blocked.pop(key, None)
        WORLD.bump()
    if waiting.reason is None and (why := broker.budget_wait(key)) is not None:
        # A running pod's model call waits for the namespace's budget (the lease broker's ledger): say
        # so, and look again when the note would lapse (the broker wakes it when a call begins to wait).
        until = now + dt.timedelta(seconds=SHORT_SECONDS)
        waiting = Waiting("a model call of a running worker Job", WaitReason.TOKEN_BUDGET, why, until=until)
    live = [j for j in WORLD.jobs_of(key).values() if j.active]
    waiting = dataclasses.replace(waiting, pods_blocked=pods_blocked(live))
    mine = list(WORLD.jobs_of(key).values())
    workloads, queues = kueue.gather(
        namespace,
        mine,
        cfg.kueue_queue,
        WORLD.kueue_indexes.get("kueue_workloads"),
        WORLD.kueue_indexes.get("kueue_localqueues"),
    )
    wait = kueue.wait_status(
        mine, workloads, queues, cfg.kueue_queue, cfg.kueue_watch, kueue.priority_class(spec.priority, cfg)
    )
    events = status.after_pass(
        st,
        prev,
        waiting,
        started=started,
        analysts=spec.analysts.count,
        kueue_wait=wait,
        kueue_mode=bool(cfg.kueue_queue),
        generation=obs.generation,
        now=now,
    )

    if WORLD.phases.get(key) != st.phase:  # a pass may run before our last status write is seen
        for etype, reason, message in d.events:
            kopf.event(
                body, type=etype, reason=reason, message=(st.message or message) if reason == st.phase else message
            )
    for etype, reason, message in [*d.notices, *events]:
        kopf.event(body, type=etype, reason=reason, message=message)
    log_decision(logger, st, prev)
    await kube.patch_status(namespace, name, uid, st, prev)
    _set_phase(key, st.phase)

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


def log_decision(logger: kopf.Logger, st: ResearchJobStatus, prev: ResearchJobStatus) -> None:
    """One log line when what a ResearchJob does or waits for changes (never one per pass): the
    operator's decisions, readable in its log (`kubectl logs`) and printed by a failing test."""
    if (st.phase, st.message, st.waiting_for) == (prev.phase, prev.message, prev.waiting_for):
        return
    waits = f"; waiting for {st.waiting_for}" if st.waiting_for else ""
    logger.info(f"decision: phase {st.phase.value}: {st.message or ''}{waits}")


POLICY_PROBE_SECONDS = 10.0  # how long one look at the admission policy binding serves


async def drop_jobs_that_never_fit(key: Key, worker: WorkerSpec, logger: kopf.Logger) -> None:
    """A worker Job created before the operator saw a ResourceQuota its pod can never fit (the quota
    was created moments before the ResearchJob, and its watch event came after): the Job controller
    only keeps failing to create the pod. Such a Job (no pod ever, its FailedCreate seen) is deleted,
    and its step waits as every other one does, saying QuotaTooSmall, until the quota is raised."""
    namespace = key[0]
    pod = PodResources.from_spec(worker.resources.requests.wire(), worker.resources.limits.wire())
    why = never_fits(WORLD.quotas_of(namespace), pod, worker.priority_class_name or "")
    if why is None:
        return
    for job in list(WORLD.jobs_of(key).values()):
        if job.active and not job.pods and job.uid and job.uid in WORLD.create_failures:
            WORLD.deleted[key].add(job.uid)  # before the request: the watch may answer first
            await kube.delete_job(namespace, job.name, job.uid)
            WORLD.create_failures.pop(job.uid, None)
            logger.info(f"decision: deleted {job.name}, whose pod can never be created: {why}")


async def author_checks(cfg: Settings, logger: kopf.Logger) -> tuple[tenancy.AuthorChecks, dt.datetime | None]:
    """Whether the admission policy that checks authors is in force (the binding the settings name
    and its policy exist), and since when; looked up at most every ``POLICY_PROBE_SECONDS`` by this
    process."""
    binding = cfg.admission_policy_binding
    seen = WORLD.policy_probe
    if binding and (seen is None or seen[1] != binding or time.monotonic() - seen[0] > POLICY_PROBE_SECONDS):
        try:
            found = await kube.admission_policy_binding(binding)
        except ApiException as e:
            logger.warning(
                f"cannot read ValidatingAdmissionPolicyBinding {binding} ({e.status} {e.reason}): "
                "taking authors as unchecked"
            )
            found = None
        WORLD.policy_probe = seen = (time.monotonic(), binding, found)
    found = seen[2] if binding and seen is not None else None
    return tenancy.author_checks(binding, cfg.trust_authors, found), found[2] if found is not None else None


def _set_phase(key: Key, phase: str | None) -> None:
    """Record a ResearchJob's phase (None: it is gone) and keep the per-phase gauge in step, one
    change at a time (a pass never walks every ResearchJob)."""
    old = WORLD.phases.get(key)
    if old == phase:
        return
    if old is not None:
        metrics.JOBS_BY_PHASE.labels(str(old)).dec()
    if phase is not None:
        metrics.JOBS_BY_PHASE.labels(str(phase)).inc()
        WORLD.phases[key] = phase


def _snapshot(fn: Callable[[], float]) -> Callable[[], float]:
    """A gauge computed at scrape time (from the metrics thread, while the loop may change the
    world: a collection changed mid-iteration is read again)."""

    def read() -> float:
        for _ in range(5):
            try:
                return fn()
            except RuntimeError:
                continue
        return float("nan")

    return read


for _phase in Phase:
    metrics.JOBS_BY_PHASE.labels(_phase.value).set(0)
metrics.BATCHES_ACTIVE.set_function(_snapshot(lambda: float(WORLD.active_interviews())))
metrics.BATCHES_QUEUED.set_function(_snapshot(lambda: float(sum(list(WORLD.waiting.values())))))
