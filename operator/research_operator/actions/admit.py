"""The one admission path of every worker Job (planner, interview batches, writer, cleanup): admit
what fits the caps, fair share and ResourceQuota headroom (the pure ``admission.decide_admission``),
record the admitted Jobs as ours before creating them, create them, and say what still waits.
``still_blocked`` re-asks admission cheaply for a ResearchJob woken only because a slot may have
freed up.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Any

from research_api.researchjob import ModelSpec, WorkerSpec
from research_operator import metrics
from research_operator.actions import kube, tracing
from research_operator.actions.shares import request_share_sync, sync_endpoint
from research_operator.cache.views import job_view
from research_operator.cache.world import WORLD, Blocked, Key
from research_operator.decisions import endpoints as ep
from research_operator.decisions.admission import (
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
from research_operator.decisions.manifests import Owner, add_lease_broker_token
from research_operator.decisions.reconcile import JobView, Waiting, rfc3339, step_noun
from research_operator.lease_broker import broker
from research_operator.settings import Settings

log = logging.getLogger(__name__)


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
    analysts: list[int] | None = None  # analysts of each Job (interview batches)


def _endpoint_verdict(endpoint: ep.Endpoint, demand: int, namespace: str, cfg: Settings) -> EndpointVerdict:
    by_ns = WORLD.endpoint_namespaces(endpoint.name)
    in_use = sum(admitted for admitted, _, _ in by_ns.values())
    mine = by_ns.get(namespace, (0, 0, 0))[0]
    peers = tuple(v for ns, v in sorted(by_ns.items()) if ns != namespace)
    standby = ep.standby(endpoint, bool(cfg.lease_broker_url))
    return EndpointVerdict(endpoint.name, endpoint.max_concurrent, in_use, demand, standby, mine, peers)


def _budget_verdict(namespace: str, cfg: Settings, when: dt.datetime) -> BudgetVerdict | None:
    budget = cfg.token_budgets.get(namespace)
    if budget is None:
        return None
    start, end = ep.window(when, budget.seconds)
    used, short = broker.namespace_use(namespace, start)
    metrics.NAMESPACE_TOKENS.labels(namespace).set(used.tokens)
    metrics.NAMESPACE_COST.labels(namespace).set(float(used.cost))
    return BudgetVerdict(
        namespace, budget.tokens, used.tokens, budget.period, rfc3339(end), budget.cost, used.cost, short
    )


def _endpoint_of(model: ModelSpec | None, cfg: Settings) -> ep.Endpoint | None:
    if model is None:
        return None
    return ep.calls(WORLD.endpoints, model.endpoint, model.base_url or cfg.default_model_base_url, model.name)


def _being_deleted(namespace: str) -> str:
    """What a ResearchJob says when its namespace refused a create as being deleted; remembered, so
    its other creates there are not sent for a while (``World.namespace_terminating``)."""
    WORLD.terminating[namespace] = time.monotonic()
    return f"namespace {namespace} is being deleted"


def _all_wait_for_deleted_namespace(key: Key, want: Want) -> tuple[Waiting, int]:
    """None of ``want`` is created: the namespace is being deleted (a create there was refused so)."""
    WORLD.waiting[key] = len(want.jobs)
    WORLD.blocked.pop(key, None)
    why = f"namespace {key[0]} is being deleted"
    what = step_noun(want.step, len(want.jobs))
    return Waiting(what, WaitReason.EXCEEDED_QUOTA, why, refused=True, namespace_terminating=True), 0


async def admit_and_create(
    key: Key,
    owner: Owner,
    want: Want,
    worker: WorkerSpec,
    cfg: Settings,
    model: ModelSpec | None = None,
    rbac: tuple[str, list[dict[str, Any]]] | None = None,
    traceparent: str | None = None,
) -> tuple[Waiting, int]:
    """Admit what fits (caps, fair share, ResourceQuota headroom, the model endpoint's capacity, the
    namespace's token budget), record the admitted Jobs as ours before creating them, create them;
    the number created, and what still waits and why. ``model``: the ResearchJob's model (None for
    the cleanup Job, which calls no model); ``rbac``: the plan id and the worker RBAC its pods need
    (``builders.worker_rbac``), made before the first Job of each plan; ``traceparent``: the
    ResearchJob's trace, which each Job's admission span joins (``tracing.admission``)."""
    namespace = key[0]
    pod = PodResources.from_spec(worker.resources.requests.wire(), worker.resources.limits.wire())
    priority_class = worker.priority_class_name or ""
    endpoint = _endpoint_of(model, cfg)
    needs = (
        [
            ep.demand(want.step, (want.analysts or [1] * len(want.jobs))[i], model.max_concurrency, endpoint)
            for i in range(len(want.jobs))
        ]
        if endpoint is not None and model is not None
        else []
    )
    if WORLD.namespace_terminating(namespace, time.monotonic()):
        return _all_wait_for_deleted_namespace(key, want)
    ask = Blocked(
        len(want.jobs),
        want.own_limit,
        pod,
        priority_class,
        endpoint.name if endpoint is not None else "",
        max(needs) if needs else 0,
        want.step,
        metered=model is not None,
    )
    async with WORLD.admission_lock:
        WORLD.waiting[key] = len(want.jobs)
        adm, capacity, budget = decide(key, ask, cfg, endpoint)
        admitted = want.jobs[: adm.admitted]
        if endpoint is not None and capacity is not None:
            cm = ep.share_configmap_name(owner.name)
            left = endpoint.max_concurrent - capacity.in_use  # pods admitted before come first
            for job, need in zip(admitted, needs, strict=False):
                first = max(0, min(need, left))  # 0: it starts paused and waits for its share
                left -= need
                ep.stamp(job, endpoint, need, ep.Share(first), cm, f"{time.time():.6f}", cfg.lease_broker_url)
                if cfg.lease_broker_url:
                    add_lease_broker_token(job)  # the broker accepts only a token bound to its audience
        if admitted:  # no entry for one that only waits: the passes that walk ``created`` stay small
            WORLD.created[key].update({job["metadata"]["name"]: job_view(job) for job in admitted})
        WORLD.waiting[key] = len(want.jobs) - len(admitted)
        WORLD.bump()
    names = [job["metadata"]["name"] for job in admitted]

    def terminating() -> bool:
        # Asked just before each create is sent: thousands of passes woken at once (their namespace's
        # quota went with the namespace) are all admitted before the first refusal comes back.
        return WORLD.namespace_terminating(namespace, time.monotonic())

    rbac_refused = False
    try:
        if endpoint is not None and admitted:
            await sync_endpoint(endpoint.name)  # the shares ConfigMap exists before the pods read it
        if admitted and rbac is not None and WORLD.rbac_ready.get(key) != rbac[0]:
            if not cfg.worker_service_account:
                for obj in rbac[1]:
                    outcome, _ = await kube.create(obj, terminating)
                    if outcome == kube.Created.TERMINATING:
                        rbac_refused = True
                        break
                    if outcome == kube.Created.EXISTS and obj["kind"] == "Role":
                        # Another plan's names (feedback), or this process restarted: this plan's now.
                        await kube.replace_role(obj)
            if not rbac_refused:
                WORLD.rbac_ready[key] = rbac[0]
    except BaseException:
        # Nothing was created: no intent may stay behind as a Job "running" (the pass is retried).
        WORLD.drop_intents(key, names)
        if endpoint is not None and admitted:
            request_share_sync(endpoint.name)
        raise
    if rbac_refused:
        _being_deleted(namespace)
        WORLD.drop_intents(key, names)
        if endpoint is not None:
            request_share_sync(endpoint.name)
        return _all_wait_for_deleted_namespace(key, want)
    if adm.reason is not None and adm.reason.is_quota:
        metrics.QUOTA_WAITS.labels(namespace).inc()
    refused: tuple[WaitReason, str] | None = None
    terminating_ns = False
    created = 0
    for i, job in enumerate(admitted):
        with tracing.admission(traceparent, job, want.step) as span:
            try:
                outcome, message = await kube.create(job, terminating)
            except BaseException:
                WORLD.drop_intents(key, [rest["metadata"]["name"] for rest in admitted[i:]])
                raise
            if outcome in (kube.Created.QUOTA, kube.Created.TERMINATING):
                tracing.refused(span, message or outcome.value)
        if outcome in (kube.Created.QUOTA, kube.Created.TERMINATING):
            WORLD.drop_intents(key, [rest["metadata"]["name"] for rest in admitted[i:]])
            WORLD.waiting[key] = WORLD.waiting.get(key, 0) + len(admitted) - i
            why = message if outcome == kube.Created.QUOTA else _being_deleted(namespace)
            terminating_ns = outcome == kube.Created.TERMINATING
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
        if endpoint is not None:
            WORLD.bump()  # what waits at an endpoint counts in its namespaces' fair shares
        local = adm.reason is not None and (adm.reason.is_quota or adm.reason == WaitReason.TOKEN_BUDGET)
        WORLD.blocked[key] = dataclasses.replace(ask, count=still, local=local)
    else:
        WORLD.blocked.pop(key, None)
    if refused is not None:
        what = step_noun(want.step, still)
        return Waiting(what, refused[0], refused[1], refused=True, namespace_terminating=terminating_ns), created
    if still and adm.reason is not None:
        until = None
        if adm.reason == WaitReason.TOKEN_BUDGET and budget is not None:
            until = dt.datetime.fromisoformat(budget.resets.replace("Z", "+00:00"))
        return Waiting(step_noun(want.step, still), adm.reason, adm.message, until=until), created
    return Waiting(), created


def pods_blocked(jobs: list[JobView]) -> str | None:
    for job in jobs:
        failure = WORLD.create_failures.get(job.uid) if job.uid else None
        if failure and job.active and job.pods == 0:
            return f"{step_noun(job.step, 1).removeprefix('the ')} {job.name} cannot create its pod: {failure}"
    return None


def still_blocked(key: Key, cfg: Settings) -> bool:
    """Whether a ResearchJob woken only because a slot may have freed up (not by a change of its own)
    would still be admitted nothing: then its pass is skipped, so one finished Job among many waiting
    ResearchJobs costs a quick re-check each, not a full pass each."""
    namespace = key[0]
    if WORLD.waiting.get(key) and WORLD.namespace_terminating(namespace, time.monotonic()):
        return True
    b = WORLD.blocked.get(key)
    if b is None or not WORLD.waiting.get(key):
        return False
    endpoint = WORLD.endpoints.get(b.endpoint) if b.endpoint else None
    return decide(key, b, cfg, endpoint, cached=True)[0].admitted == 0


def decide(
    key: Key, ask: Blocked, cfg: Settings, endpoint: ep.Endpoint | None, *, cached: bool = False
) -> tuple[Admission, EndpointVerdict | None, BudgetVerdict | None]:
    """The one admission decision of a ResearchJob's waiting Jobs (``ask``), from the world and one
    settings snapshot: what the pure ``admission.decide_admission`` admits, and the endpoint and
    budget verdicts it weighed. A pass asks it before creating; a ResearchJob woken only because a
    slot may have freed asks it again with the same ``ask`` (``cached``: the demands as of the last
    change this process saw, and only whether anything is admitted), so both ask the same question
    the same way."""
    namespace = key[0]
    quotas = WORLD.quotas_of(namespace)
    verdict = quota_headroom(quotas, ask.pod, WORLD.reserved(namespace), ask.priority_class)
    too_small = never_fits(quotas, ask.pod, ask.priority_class)
    me = Demand(namespace, key[1], WORLD.active_of(key), ask.count)
    if cached and (too_small is not None or verdict.blocked):
        # The quick re-check: its namespace's quota holds it whatever the caps say, so it need not
        # weigh them (the pass that creates does, to name the first limit that holds it).
        return Admission(0), None, None
    # Only the caps look at other ResearchJobs: without them, admission needs none of theirs.
    caps = cfg.caps
    demands = WORLD.demands(cached=cached) if caps.global_max_active or caps.namespace_max_active else [me]
    capacity = _endpoint_verdict(endpoint, ask.demand, namespace, cfg) if endpoint is not None else None
    budget = _budget_verdict(namespace, cfg, now()) if ask.metered else None
    return decide_admission(me, ask.own_limit, demands, caps, verdict, too_small, capacity, budget), capacity, budget
