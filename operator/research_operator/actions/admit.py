"""The one admission scheduler of every worker Job (planner, interview batches, writer, cleanup):
a single task (``Scheduler``) decides, in fair order, what fits the caps, fair share, ResourceQuota
headroom, the model endpoint's capacity and the token budget (``decide``, around the pure
``admission.decide_admission``), records the admitted Jobs as ours, creates them, and keeps what
waits until a freed slot lets it in; a pass posts what it wants (``admit_and_create``) and gets
back what was created and what still waits and why.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import time
import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from research_api.researchjob import ModelSpec, WorkerSpec
from research_api.task import ResearchTask
from research_operator import metrics
from research_operator.actions import kube, tracing
from research_operator.actions.shares import request_share_sync, sync_endpoint
from research_operator.cache.views import job_view
from research_operator.cache.world import WORLD, Blocked, Key, settings
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
from research_operator.decisions.finalizer import CLEANUP_STEP
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
    # Each Job's task as built (``manifests.worker_job_and_task``): admission changes it (the share,
    # the trace) and writes it into the Job, never reading back the JSON it was just given.
    tasks: list[ResearchTask] | None = None
    # While it waits in the scheduler's queue: its Jobs and tasks serialized and compressed (about a
    # tenth of them as Python objects, which thousands of waiting ResearchJobs would hold), and
    # ``jobs`` and ``tasks`` empty; ``unpacked`` rebuilds them when it is admitted.
    packed: bytes = b""

    def packed_for_queue(self) -> Want:
        tasks = [t.to_json() for t in self.tasks] if self.tasks is not None else None
        data = json.dumps({"jobs": self.jobs, "tasks": tasks}, separators=(",", ":")).encode()
        return dataclasses.replace(self, jobs=[], tasks=None, packed=zlib.compress(data))

    def unpacked(self) -> Want:
        if not self.packed:
            return self
        data = json.loads(zlib.decompress(self.packed))
        tasks = [ResearchTask.model_validate_json(t) for t in data["tasks"]] if data["tasks"] is not None else None
        return dataclasses.replace(self, jobs=data["jobs"], tasks=tasks, packed=b"")

    def after(self, n: int) -> Want:
        """What is left of it once its first ``n`` Jobs are admitted."""
        return dataclasses.replace(
            self,
            jobs=self.jobs[n:],
            analysts=self.analysts[n:] if self.analysts is not None else None,
            tasks=self.tasks[n:] if self.tasks is not None else None,
        )

    def task(self, i: int) -> ResearchTask | None:
        return self.tasks[i] if self.tasks is not None else None


def _endpoint_verdict(endpoint: ep.Endpoint, demand: int, namespace: str, cfg: Settings) -> EndpointVerdict:
    by_ns = WORLD.endpoint_namespaces(endpoint.name)
    in_use = sum(admitted for admitted, _, _ in by_ns.values())
    mine = by_ns.get(namespace, (0, 0, 0))[0]
    peers = tuple(v for ns, v in sorted(by_ns.items()) if ns != namespace)
    leased = bool(cfg.lease_broker_url)
    standby = ep.standby(endpoint, leased=leased)
    return EndpointVerdict(endpoint.name, endpoint.max_concurrent, in_use, demand, standby, mine, peers, leased)


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


@dataclass(eq=False)
class Request:
    """What a pass wants started (``want``: the built manifests of one step) with what admitting it
    needs; kept by the scheduler while some of it waits, so a freed slot admits it without a pass."""

    key: Key
    owner: Owner
    want: Want
    ask: Blocked
    cfg: Settings  # the snapshot the manifests were built with
    endpoint: ep.Endpoint | None
    needs: list[int]  # requests in flight each Job's pod needs at the endpoint
    rbac: tuple[str, list[dict[str, Any]]] | None
    traceparent: str | None
    on_started: Callable[[int], None] | None  # told how many Jobs were created, when any were
    seq: int
    built: float = field(default_factory=time.monotonic)
    answer: asyncio.Future[tuple[Waiting, int]] | None = None  # the posting pass awaits it


@dataclass
class _Admitted:
    """One decision of the scheduler: the request, the Jobs it admitted (recorded as ours) and what
    admission weighed."""

    req: Request
    adm: Admission
    budget: BudgetVerdict | None
    admitted: list[dict[str, Any]]
    tasks: list[ResearchTask | None]  # each admitted Job's task, as admission changed it


BATCH_YIELDS = 3  # turns of the event loop a cycle waits for more posts, decided with it in fair order


class Scheduler:
    """The one admission scheduler: a single task decides every admission. Passes post what they
    want (``admit_and_create``) and await the answer; the requests of one cycle are registered as
    waiting first (so each decision sees every peer that waits) and decided in fair order (the
    namespace and ResearchJob below their share of the endpoint and the caps first, then arrival).
    What is admitted is recorded as ours at once and created by a task of its own; what waits stays
    queued with its manifests. A freed slot (``World.wake_waiting``) asks the scheduler to look at
    the waiters in its scope, again in fair order: it admits and creates what now fits and wakes only
    those owners (their pass writes the status); the others sleep on. Decisions never await, so
    nothing else changes the world between one and the next: no lock."""

    def __init__(self) -> None:
        self.posted: dict[Key, Request] = {}
        self.queued: dict[Key, Request] = {}
        self.freed: set[Key] = set()
        self._deciding: dict[Key, Request] = {}  # the posts of the cycle under way
        self._seq = 0
        self._kick: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _ensure(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (a test): start afresh
            self.posted.clear()
            self.queued.clear()
            self.freed.clear()
            self._kick, self._task, self._loop = asyncio.Event(), None, loop
        assert self._kick is not None
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(self._kick), name="admission scheduler")
        WORLD.on_freed = self.recheck
        return self._kick

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def submit(self, req: Request) -> tuple[Waiting, int]:
        """Post what a pass wants; the answer: what still waits and why, and how many were created."""
        kick = self._ensure()
        req.answer = asyncio.get_running_loop().create_future()
        old = self.posted.pop(req.key, None)
        if old is not None and old.answer is not None and not old.answer.done():
            old.answer.cancel()  # a newer pass of the same ResearchJob asks instead
        self.queued.pop(req.key, None)
        self.posted[req.key] = req
        kick.set()
        return await req.answer

    def recheck(self, keys: list[Key]) -> None:
        """A slot may have freed up for these waiting ResearchJobs: look at them in the next cycle."""
        self.freed.update(keys)
        try:
            self._ensure().set()
        except RuntimeError:  # no event loop (a unit test of the world): wake them as before
            for key in keys:
                if (event := WORLD.wakeups.get(key)) is not None:
                    event.set()

    async def _run(self, kick: asyncio.Event) -> None:
        while True:
            await kick.wait()
            for _ in range(BATCH_YIELDS):  # the passes woken with the first post post too
                await asyncio.sleep(0)
            kick.clear()
            try:
                self.cycle()
            except Exception:  # noqa: BLE001 - a bug: keep scheduling; what was posted gets the error
                log.exception("an admission cycle failed")
                for req in (*self._deciding.values(), *self.posted.values()):
                    if req.answer is not None and not req.answer.done():
                        req.answer.set_exception(RuntimeError("the admission cycle failed"))
                self.posted.clear()
            self._deciding = {}

    def cycle(self) -> None:
        """Decide every posted request, then every freed waiter, in fair order."""
        posted, self.posted = self.posted, {}
        self._deciding = posted  # answered with the error if the cycle fails
        cfg = settings()  # one snapshot for every decision of the cycle
        for req in posted.values():  # every one of them waits, for the others' decisions
            WORLD.waiting[req.key] = req.ask.count
            if req.endpoint is not None:
                prev = WORLD.blocked.get(req.key)
                WORLD.blocked[req.key] = dataclasses.replace(req.ask, local=prev.local if prev else False)
        WORLD.bump()
        for req in fair_order(list(posted.values())):
            if req.answer is not None and req.answer.done():
                continue  # its pass was cancelled
            try:
                self._start(self._admit(req, cfg))
            except Exception as e:  # noqa: BLE001 - the pass that posted it handles it
                if req.answer is not None and not req.answer.done():
                    req.answer.set_exception(e)
        freed, self.freed = self.freed, set()
        if not freed:
            return
        now_ = time.monotonic()
        for key in [k for k in self.queued if k not in WORLD.blocked or not WORLD.waiting.get(k)]:
            del self.queued[key]  # its pass wants nothing now, or it is gone
        ready = [
            q
            for key in freed
            if (q := self.queued.get(key)) is not None
            and key not in WORLD.dirty  # a change of its own: its pass comes and posts anew
            and key not in WORLD.passing
            and not WORLD.namespace_terminating(key[0], now_)
        ]
        for req in fair_order(ready):
            b = WORLD.blocked.get(req.key)
            if b is None or decide(req.key, b, cfg, req.endpoint, cached=True)[0].admitted == 0:
                continue
            if req.cfg is not cfg:  # built with other settings: its pass builds them anew
                del self.queued[req.key]
                WORLD.wake(req.key)
                continue
            del self.queued[req.key]
            self._start(self._admit(dataclasses.replace(req, want=_aged(req.want.unpacked(), req.built)), cfg))

    def _admit(self, req: Request, cfg: Settings) -> _Admitted | tuple[Request, tuple[Waiting, int]]:
        """The decision for one request (never awaits): the Jobs admitted are recorded as ours."""
        key, want, endpoint = req.key, req.want, req.endpoint
        if WORLD.namespace_terminating(key[0], time.monotonic()):
            return req, _all_wait_for_deleted_namespace(key, want)
        WORLD.waiting[key] = len(want.jobs)
        adm, capacity, budget = decide(key, req.ask, cfg, endpoint)
        admitted = want.jobs[: adm.admitted]
        tasks = [want.task(i) for i in range(len(admitted))]
        if endpoint is not None and capacity is not None:
            cm = ep.share_configmap_name(req.owner.name)
            left = endpoint.max_concurrent - capacity.in_use  # pods admitted before come first
            for i, (job, need) in enumerate(zip(admitted, req.needs, strict=False)):
                first = max(0, min(need, left))  # 0: it starts paused and waits for its share
                left -= need
                when = f"{time.time():.6f}"
                tasks[i] = ep.stamp(job, tasks[i], endpoint, need, ep.Share(first), cm, when, cfg.lease_broker_url)
                if cfg.lease_broker_url:
                    add_lease_broker_token(job)  # the broker accepts only a token bound to its audience
        if admitted:  # no entry for one that only waits: the passes that walk ``created`` stay small
            WORLD.created[key].update({job["metadata"]["name"]: job_view(job) for job in admitted})
        still = len(want.jobs) - len(admitted)
        WORLD.waiting[key] = still
        if still:  # it waits from now on: a slot freed while its admitted Jobs are created is seen
            WORLD.blocked[key] = _still_waiting(req.ask, adm, still)
            rest, needs = want.after(len(admitted)), req.needs[len(admitted) :]
            self.queued[key] = dataclasses.replace(req, want=rest.packed_for_queue(), needs=needs, answer=None)
        else:
            WORLD.blocked.pop(key, None)
            self.queued.pop(key, None)
        WORLD.bump()
        return _Admitted(req, adm, budget, admitted, tasks)

    def _start(self, decided: _Admitted | tuple[Request, tuple[Waiting, int]]) -> None:
        if isinstance(decided, tuple):
            req, answer = decided
            if req.answer is not None and not req.answer.done():
                req.answer.set_result(answer)
            return
        asyncio.get_running_loop().create_task(self._create(decided), name=f"admit {decided.req.key[0]}")

    async def _create(self, d: _Admitted) -> None:
        """Create what was admitted; answer the pass that posted it, or (admitted from the queue)
        wake its owner, whose pass writes the status."""
        req = d.req
        try:
            answer = await _create_admitted(d)
        except BaseException as e:
            if req.answer is not None and not req.answer.done():
                req.answer.set_exception(e)
            else:
                log.exception(f"creating the Jobs admitted for {req.key[0]}/{req.owner.name} failed")
                WORLD.wake(req.key)  # its pass tries again
            if not isinstance(e, Exception):
                raise
            return
        waiting, created = answer
        if waiting.refused and (q := self.queued.get(req.key)) is not None and q.seq == req.seq:
            del self.queued[req.key]  # refused by the API server: its pass backs off and asks again
        if created and req.on_started is not None:
            req.on_started(created)
        if req.answer is not None:
            if not req.answer.done():
                req.answer.set_result(answer)
            return
        if waiting.refused:
            WORLD.create_refused.add(req.key)  # its pass asks again, even in a namespace being deleted
        WORLD.wake(req.key)


SCHEDULER = Scheduler()


def _still_waiting(ask: Blocked, adm: Admission, count: int) -> Blocked:
    """What ``count`` Jobs of ``ask`` that still wait are kept as: held by their own namespace (a
    quota, the token budget) or contending for the caps."""
    local = adm.reason is not None and (adm.reason.is_quota or adm.reason == WaitReason.TOKEN_BUDGET)
    return dataclasses.replace(ask, count=count, local=local)


def fair_order(reqs: list[Request]) -> list[Request]:
    """Requests in the order they are decided: the namespace holding least of the endpoint each asks
    for, then least of the caps' slots, then the ResearchJob holding least, then arrival. So work
    that arrives later from a namespace below its share goes ahead of a backlog above its share."""
    if len(reqs) < 2:
        return reqs
    by_ns: dict[str, int] = defaultdict(int)
    for d in WORLD.demands(cached=True):
        by_ns[d.namespace] += d.active

    def rank(req: Request) -> tuple[int, int, int, int]:
        ns = req.key[0]
        at_endpoint = WORLD.endpoint_namespaces(req.endpoint.name).get(ns, (0, 0, 0))[0] if req.endpoint else 0
        return (at_endpoint, by_ns[ns], WORLD.active_of(req.key), req.seq)

    return sorted(reqs, key=rank)


def _aged(want: Want, built: float) -> Want:
    """``want`` created later than it was built: each Job's deadline is shortened by the wait."""
    waited = int(time.monotonic() - built)
    if waited <= 0:
        return want
    jobs = []
    for job in want.jobs:
        deadline = job["spec"].get("activeDeadlineSeconds")
        if deadline is not None and want.step != CLEANUP_STEP:  # the cleanup Job's own bound stays
            job = {**job, "spec": {**job["spec"], "activeDeadlineSeconds": max(1, deadline - waited)}}
        jobs.append(job)
    return dataclasses.replace(want, jobs=jobs)


async def admit_and_create(
    key: Key,
    owner: Owner,
    want: Want,
    worker: WorkerSpec,
    cfg: Settings,
    model: ModelSpec | None = None,
    rbac: tuple[str, list[dict[str, Any]]] | None = None,
    traceparent: str | None = None,
    on_started: Callable[[int], None] | None = None,
) -> tuple[Waiting, int]:
    """Post to the scheduler what a pass wants started and await its answer: admitted what fits
    (caps, fair share, ResourceQuota headroom, the model endpoint's capacity, the namespace's token
    budget), recorded as ours and created; the number created, and what still waits and why (the
    scheduler keeps it, and creates it when a slot frees up). ``model``: the ResearchJob's model
    (None for the cleanup Job, which calls no model); ``rbac``: the plan id and the worker RBAC its
    pods need (``builders.worker_rbac``), made before the first Job of each plan; ``traceparent``:
    the ResearchJob's trace, which each Job's admission span joins (``tracing.admission``);
    ``on_started``: told how many Jobs were created, whoever created them."""
    if model is not None and (want.tasks is None or len(want.tasks) != len(want.jobs)):
        raise ValueError("the worker Jobs of a step that calls a model are admitted with their tasks")
    pod = PodResources.from_spec(worker.resources.requests.wire(), worker.resources.limits.wire())
    endpoint = _endpoint_of(model, cfg)
    needs = (
        [
            ep.demand(want.step, (want.analysts or [1] * len(want.jobs))[i], model.max_concurrency, endpoint)
            for i in range(len(want.jobs))
        ]
        if endpoint is not None and model is not None
        else []
    )
    ask = Blocked(
        len(want.jobs),
        want.own_limit,
        pod,
        worker.priority_class_name or "",
        endpoint.name if endpoint is not None else "",
        max(needs) if needs else 0,
        want.step,
        metered=model is not None,
    )
    req = Request(key, owner, want, ask, cfg, endpoint, needs, rbac, traceparent, on_started, SCHEDULER.next_seq())
    return await SCHEDULER.submit(req)


async def _create_admitted(d: _Admitted) -> tuple[Waiting, int]:
    """Create the Jobs the scheduler admitted (and the worker RBAC before a plan's first Job); the
    number created, and what still waits and why."""
    req, adm, budget, admitted = d.req, d.adm, d.budget, d.admitted
    key, want, endpoint, rbac, cfg = req.key, req.want, req.endpoint, req.rbac, req.cfg
    namespace = key[0]
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
        with tracing.admission(req.traceparent, job, want.step, d.tasks[i]) as span:
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
        WORLD.blocked[key] = _still_waiting(req.ask, adm, still)
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
