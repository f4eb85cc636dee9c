"""The operator's in-memory view of the cluster, fed by watches (kopf event handlers).

Child Jobs, stored results (ConfigMaps of the ConfigMap store) and ResourceQuotas are kept here
as they change, so a reconcile pass reads them without an API request. Each ResearchJob has an
asyncio.Event that the watches set, which wakes its reconcile loop within a moment of a change.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from research_api.records import ReportQuality
from research_api.researchjob import AnalystStatus, ReportRef
from research_operator.decisions.admission import POD_RESOURCES, Demand, PodResources, QuotaUsage
from research_operator.decisions.endpoints import (
    Endpoint,
    PodUse,
)
from research_operator.decisions.reconcile import JobView, StepTokens, StoreView
from research_operator.settings import Settings

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, ResearchJob uid)
STORED_STEP = {"analysts": "plan", "section": "interview", "report": "write"}  # the step that stores each kind
WAKE_COALESCE = 0.05  # seconds: wake-ups of waiting ResearchJobs within this are served by one sweep
TERMINATING_MEMO = 30.0  # seconds a namespace that refused a create as being deleted is not asked again


@dataclass(frozen=True)
class Blocked:
    """What a pass asks admission for (``admit.decide``); kept while some of it waits, to ask again
    without a full pass."""

    count: int
    own_limit: int
    pod: PodResources
    priority_class: str = ""
    endpoint: str = ""  # the ModelEndpoint its Jobs would be admitted against
    demand: int = 0  # requests in flight one of its pods needs there
    step: str = ""
    metered: bool = True  # it calls a model, so the namespace's token budget applies (not the cleanup Job)
    # Held by its own namespace (a quota, the token budget): a slot freed elsewhere cannot help it,
    # and it does not contend for the caps' fair share.
    local: bool = False


@dataclass
class World:
    """Indices (kopf.index, filled by watches and complete before any handler runs, so a restarted
    operator never acts on a half-listed cluster), plus what this process created or deleted but the
    watch has not delivered yet, the per-ResearchJob wake-up events and the admission bookkeeping.

    Everything is keyed by identity: (namespace, ResearchJob uid) and, for Jobs, their uid. Intents
    (a create, a delete) are recorded before the request is sent, so a watch event that arrives
    before the request returns finds them."""

    job_index: Mapping[Key, Any] | None = None  # Key -> collection of JobView
    stored_index: Mapping[Key, Any] | None = None  # Key -> collection of StoredObject
    quota_index: Mapping[str, Any] | None = None  # namespace -> collection of QuotaUsage
    endpoint_index: Mapping[str, Any] | None = None  # ModelEndpoint name -> collection of Endpoint
    endpoints_seen: dict[str, Endpoint] = field(default_factory=dict)  # as the last watch event showed them
    shares_written: dict[Key, str] = field(default_factory=dict)  # the shares ConfigMap data last written
    # Each ResearchJob's trace (its W3C traceparent) once this process began or saw it, for the passes
    # that run before the status write naming it is seen (actions/tracing).
    traces: dict[Key, str] = field(default_factory=dict)
    endpoint_status: dict[str, dict[str, Any]] = field(default_factory=dict)  # status last written, by endpoint
    created: dict[Key, dict[str, JobView]] = field(default_factory=lambda: defaultdict(dict))
    deleted: dict[Key, set[str]] = field(default_factory=lambda: defaultdict(set))  # Job uids being deleted
    waiting: dict[Key, int] = field(default_factory=dict)  # worker Jobs each ResearchJob waits to start
    phases: dict[Key, str] = field(default_factory=dict)
    wakeups: dict[Key, asyncio.Event] = field(default_factory=dict)
    bodies: dict[Key, Any] = field(default_factory=dict)  # the latest ResearchJob (kopf.Body) seen by the watch
    settings_data: dict[str, str] = field(default_factory=dict)
    settings_loaded: bool = False  # the settings index was read once (before the first reconcile)
    rbac_ready: dict[Key, str] = field(default_factory=dict)  # the plan whose worker RBAC is in place
    failure_details: dict[tuple[str, str], str] = field(default_factory=dict)  # (ns, Job uid) -> pod's last words
    create_failures: dict[str, str] = field(default_factory=dict)  # Job uid -> the Job controller's FailedCreate
    terminating: dict[str, float] = field(default_factory=dict)  # namespace -> when a create met its deletion
    # The last look at the admission policy binding: (when, its name, its policy and actions or None)
    policy_probe: tuple[float, str, tuple[str, list[str], dt.datetime | None] | None] | None = None
    broker_ca: str = ""  # the lease broker's CA certificate (PEM), when it serves TLS
    # namespace -> (monotonic time looked, its labels or None: unreadable), for namespaceSelectors
    namespace_labels: dict[str, tuple[float, dict[str, str] | None]] = field(default_factory=dict)
    refused: set[Key] = field(default_factory=set)  # held back by tenancy policy: a settings change may free them
    kueue_indexes: dict[str, Any] = field(default_factory=dict)  # Kueue mode: Workloads, LocalQueues (kopf indices)
    dirty: set[Key] = field(default_factory=set)  # woken by a change of their own (not only a freed slot)
    blocked: dict[Key, Blocked] = field(default_factory=dict)  # what each waiting ResearchJob last waited for
    create_refused: set[Key] = field(default_factory=set)  # the scheduler's create for them was refused
    passing: set[Key] = field(default_factory=set)  # ResearchJobs whose pass runs now (it will post anew)
    # Who looks at the waiters a freed slot may let in (the admission scheduler); None: wake them all.
    on_freed: Callable[[list[Key]], None] | None = None
    version: int = 0  # bumped whenever running or waiting counts may have changed
    _demands: tuple[int, list[Demand]] = (-1, [])
    _wake_scopes: set[str | None] = field(default_factory=set)  # namespaces (None: all) to sweep soon
    _endpoint_pods: tuple[int, dict[str, list[tuple[Key, PodUse]]]] = (-1, {})
    _endpoint_namespaces: tuple[int, dict[str, dict[str, tuple[int, int, int]]]] = (-1, {})

    def attach(
        self,
        jobs: Mapping[Key, Any],
        stored: Mapping[Key, Any],
        quotas: Mapping[str, Any],
        endpoints: Mapping[str, Any] | None = None,
    ) -> None:
        self.job_index, self.stored_index, self.quota_index = jobs, stored, quotas
        if endpoints is not None:
            self.endpoint_index = endpoints

    @property
    def endpoints(self) -> dict[str, Endpoint]:
        """Every usable ModelEndpoint by name (an index: complete before any ResearchJob is admitted)."""
        return {name: e for name, found in (self.endpoint_index or {}).items() for e in list(found)[:1]}

    def jobs_of(self, key: Key) -> dict[str, JobView]:
        """The ResearchJob's Jobs by name: what the watch has, plus what this process created and the
        watch has not shown yet, less what it is deleting."""
        seen = {j.name: j for j in (self.job_index or {}).get(key, [])}
        pending = self.created.get(key)
        if pending:
            for name in [n for n in pending if n in seen]:
                del pending[name]  # the watch has it now
            if not pending:
                del self.created[key]  # so the passes that walk ``created`` see only live intents
        out = {**(pending or {}), **seen}
        gone = self.deleted.get(key)
        return {n: j for n, j in out.items() if not (gone and j.uid in gone)}

    def drop_intents(self, key: Key, names: list[str]) -> None:
        """Forget the creates of these Jobs (their requests failed or were never sent)."""
        pending = self.created.get(key)
        if pending is not None:
            for name in names:
                pending.pop(name, None)
            if not pending:
                del self.created[key]
        self.bump()

    def job_deleted(self, key: Key, job_uid: str) -> None:
        """The watch saw a Job go: forget the intent to delete it and what was cached about it."""
        gone = self.deleted.get(key)
        if gone is not None:
            gone.discard(job_uid)
            if not gone:
                del self.deleted[key]
        self.create_failures.pop(job_uid, None)
        self.failure_details.pop((key[0], job_uid), None)

    def namespace_terminating(self, namespace: str, now: float) -> bool:
        """Whether a create in ``namespace`` was refused because it is being deleted, within the last
        ``TERMINATING_MEMO`` seconds: its waiting ResearchJobs, all woken as its quota goes, then make
        no request that can only fail. Forgotten after that, so a namespace deleted and created
        again under the same name is tried again."""
        return self.terminating_for(namespace, now) is not None

    def terminating_for(self, namespace: str, now: float) -> float | None:
        """Seconds until the memo of ``namespace`` being deleted runs out (None: no memo). A pass that
        skips its ResearchJob for the memo sleeps until then: the memo's end is the event that ends
        its wait, besides a ResearchJob created in the namespace (``namespace_accepts_creates``)."""
        seen = self.terminating.get(namespace)
        if seen is None:
            return None
        left = TERMINATING_MEMO - (now - seen)
        if left <= 0:
            del self.terminating[namespace]
            return None
        return left

    def namespace_accepts_creates(self, namespace: str) -> None:
        """A ResearchJob was just created in ``namespace`` (a watch ADDED event): a namespace being
        deleted refuses every create, so this is a namespace of that name created again. Forget the
        memo, so its ResearchJobs are served at once, not after it runs out."""
        if self.terminating.pop(namespace, None) is not None:
            log.info(f"namespace {namespace} accepts creates again (created anew): serving its ResearchJobs")

    def quotas_of(self, namespace: str) -> list[QuotaUsage]:
        return list((self.quota_index or {}).get(namespace, []))

    def reserved(self, namespace: str) -> dict[str, Decimal]:
        """What this operator's Jobs in ``namespace`` are about to consume that the quotas' usage does
        not show yet: created Jobs the watch has not delivered, and active Jobs with no pod (the Job
        controller has yet to create it). Counting them twice for a moment only delays admission."""
        out: dict[str, Decimal] = defaultdict(Decimal)
        keys = {k for k in (*(self.job_index or {}).keys(), *self.created.keys()) if k[0] == namespace}
        for key in keys:
            pending = self.created.get(key) or {}
            for job in self.jobs_of(key).values():
                if job.name in pending:
                    out["count/jobs.batch"] += 1
                if job.unfinished and job.pods == 0:
                    for resource, amount in job.pod.consumption().items():
                        if resource in POD_RESOURCES:
                            out[resource] += amount
        return out

    def event(self, key: Key) -> asyncio.Event:
        if key not in self.wakeups:
            self.wakeups[key] = asyncio.Event()
        return self.wakeups[key]

    def wake(self, key: Key) -> None:
        """Wake a ResearchJob for a change of its own: its next pass is a full one."""
        if key in self.wakeups:
            self.dirty.add(key)
            self.wakeups[key].set()

    def bump(self) -> None:
        self.version += 1

    def wake_waiting(self, namespace: str | None = None) -> None:
        """A slot may have freed up: hand every ResearchJob with worker Jobs waiting for admission
        (optionally in one namespace) to ``on_freed`` (the admission scheduler, which admits what now
        fits and wakes only those). Calls within ``WAKE_COALESCE`` seconds are served by one sweep,
        so a burst of events (a namespace of Jobs deleted at once) costs one sweep, not one per event."""
        if not self._wake_scopes:
            try:
                asyncio.get_running_loop().call_later(WAKE_COALESCE, self._sweep)
            except RuntimeError:  # no event loop (a unit test): sweep at once
                self._wake_scopes.add(namespace)
                self._sweep()
                return
        self._wake_scopes.add(namespace)

    def _sweep(self) -> None:
        scopes, self._wake_scopes = self._wake_scopes, set()
        keys = self.waiters_in(scopes)
        if self.on_freed is not None:
            self.on_freed(keys)
            return
        for key in keys:
            event = self.wakeups.get(key)
            if event is not None:
                event.set()

    def waiters_in(self, scopes: set[str | None]) -> list[Key]:
        """The ResearchJobs waiting for admission that a slot freed in ``scopes`` (namespaces; None:
        anywhere) may let in: those of its namespace, and anywhere those not held by their own
        namespace's quota or budget."""
        everyone = None in scopes
        out = []
        for key, n in self.waiting.items():
            if n <= 0:
                continue
            b = self.blocked.get(key)
            if key[0] in scopes or (everyone and not (b is not None and b.local)):
                out.append(key)
        return out

    def wake_namespace(self, namespace: str) -> None:
        """Wake every ResearchJob of ``namespace`` for a full pass (rare: a namespace created anew)."""
        for key in [k for k in self.wakeups if k[0] == namespace]:
            self.wake(key)

    def wake_endpoint_waiters(self, endpoint: str) -> None:
        """Wake every ResearchJob whose worker Jobs wait for ``endpoint``'s capacity."""
        for key, b in self.blocked.items():
            if b.endpoint == endpoint and self.waiting.get(key):
                self.wake(key)

    def forget(self, key: Key) -> None:
        for d in (
            self.created,
            self.deleted,
            self.waiting,
            self.phases,
            self.wakeups,
            self.bodies,
            self.blocked,
            self.shares_written,
            self.traces,
        ):
            d.pop(key, None)
        self.rbac_ready.pop(key, None)
        self.refused.discard(key)
        self.dirty.discard(key)
        self.passing.discard(key)
        self.create_refused.discard(key)
        self.bump()

    def wake_refused(self) -> None:
        """Wake every ResearchJob that tenancy policy holds back (the allowlists or trust changed)."""
        for key in self.refused:
            event = self.wakeups.get(key)
            if event is not None:
                event.set()

    def store_view(self, key: Key) -> StoreView:
        analysts: dict[str, list[AnalystStatus]] = {}
        sections: dict[str, set[int]] = defaultdict(set)
        reports: dict[str, ReportRef] = {}
        qualities: dict[str, ReportQuality] = {}
        tokens = input_tokens = output_tokens = 0
        steps: dict[str, list[StepTokens]] = defaultdict(list)
        for obj in (self.stored_index or {}).get(key, []):
            tokens += obj.tokens
            input_tokens += obj.input_tokens
            output_tokens += obj.output_tokens
            step = STORED_STEP.get(obj.kind)
            if step is not None:
                steps[obj.plan].append(
                    StepTokens(
                        step,
                        obj.analyst if step == "interview" else None,
                        obj.input_tokens,
                        obj.output_tokens,
                        obj.tokens,
                    )
                )
            if obj.kind == "analysts" and obj.analysts is not None:
                analysts[obj.plan] = obj.analysts
            elif obj.kind == "section" and obj.analyst is not None:
                sections[obj.plan].add(obj.analyst)
            elif obj.kind == "report" and obj.postgres_id is not None:
                # The marker holds no report: status names the row (research-worker show-report reads it).
                reports[obj.plan] = ReportRef(postgres_id=obj.postgres_id, title=obj.title)
            elif obj.kind == "report":
                reports[obj.plan] = ReportRef(config_map=obj.name, key=obj.report_key, title=obj.title)
            if obj.kind == "report" and obj.quality is not None:
                qualities[obj.plan] = obj.quality
        return StoreView(
            analysts=analysts,
            sections={p: frozenset(s) for p, s in sections.items()},
            reports=reports,
            qualities=qualities,
            tokens=tokens,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            steps=dict(steps),
        )

    def demands(self, cached: bool = False) -> list[Demand]:
        """Every ResearchJob that runs or waits for worker Jobs: active ones counted from the Jobs
        themselves (complete after a restart, before any pass), waiting ones as each last reported.
        ``cached``: as of the last change this process saw (a Job event, an admission), which is
        what a quick re-check of many waiting ResearchJobs after one freed slot needs."""
        if cached and self._demands[0] == self.version:
            return self._demands[1]
        active: dict[Key, int] = {}
        for key, jobs in (self.job_index or {}).items():
            if key in self.created or self.deleted.get(key):
                continue  # counted below, with what only this process knows
            n = sum(1 for j in jobs if j.unfinished)
            if n:
                active[key] = n
        for key in {*self.created.keys(), *(k for k, gone in self.deleted.items() if gone)}:
            n = self.active_of(key)
            if n:
                active[key] = n
        # Waiting ones held by their own namespace's quota or budget do not contend for the caps.
        waiting = {k: n for k, n in self.waiting.items() if n and not ((b := self.blocked.get(k)) and b.local)}
        out = [Demand(k[0], k[1], n, waiting.get(k, 0)) for k, n in active.items()]
        out += [Demand(k[0], k[1], 0, n) for k, n in waiting.items() if k not in active]
        self._demands = (self.version, out)
        return out

    def endpoint_pods(self, endpoint: str) -> list[tuple[Key, PodUse]]:
        """The running worker Jobs admitted against ``endpoint`` (from the Jobs' annotations, plus
        what this process just created), with their ResearchJob. Computed for every endpoint at
        once and kept until running counts change (``version``), so the re-checks of many waiting
        ResearchJobs after one freed slot cost one pass over the Jobs, not one each."""
        return list(self._endpoint_table().get(endpoint, []))

    def _endpoint_table(self) -> dict[str, list[tuple[Key, PodUse]]]:
        """``endpoint_pods`` of every endpoint, as of ``version``."""
        if self._endpoint_pods[0] != self.version:
            table: dict[str, list[tuple[Key, PodUse]]] = defaultdict(list)
            for key in {*(self.job_index or {}).keys(), *self.created.keys()}:
                body = self.bodies.get(key)
                rj = str(((body or {}).get("metadata") or {}).get("name") or "")
                for job in self.jobs_of(key).values():
                    if job.active and job.endpoint:
                        use = PodUse(key[0], rj, job.name, max(1, job.concurrency), job.admitted)
                        table[job.endpoint].append((key, use))
            self._endpoint_pods = (self.version, dict(table))
        return self._endpoint_pods[1]

    def endpoint_namespaces(self, endpoint: str) -> dict[str, tuple[int, int, int]]:
        """Per namespace at ``endpoint``: (demand of its admitted pods, demand of its pods waiting for
        admission there, the demand of one such pod), for the fair shares of the endpoint across
        namespaces. Computed for every endpoint at once and kept until running or waiting counts
        change (``version``)."""
        if self._endpoint_namespaces[0] != self.version:
            table: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0, 0]))
            for name, pods in self._endpoint_table().items():
                for key, pod in pods:
                    table[name][key[0]][0] += pod.demand
            for key, b in self.blocked.items():
                n = self.waiting.get(key, 0)
                if b.endpoint and n > 0:
                    row = table[b.endpoint][key[0]]
                    row[1] += n * max(1, b.demand)
                    row[2] = max(row[2], b.demand)
            self._endpoint_namespaces = (
                self.version,
                {e: {ns: (v[0], v[1], v[2]) for ns, v in per.items()} for e, per in table.items()},
            )
        return dict(self._endpoint_namespaces[1].get(endpoint, {}))

    def usage_since(self, namespace: str) -> list[tuple[dt.datetime | None, int]]:
        """(when stored, tokens) of every stored result in ``namespace``."""
        return [
            (obj.created, obj.tokens)
            for key, objs in (self.stored_index or {}).items()
            if key[0] == namespace
            for obj in objs
        ]

    def endpoint_waiters(self, endpoint: str) -> int:
        return sum(1 for key, b in self.blocked.items() if b.endpoint == endpoint and self.waiting.get(key))

    def active_of(self, key: Key) -> int:
        """Unfinished worker Jobs of one ResearchJob: what counts against the caps (in Kueue mode
        also one still suspended in its LocalQueue: the caps bound what is handed to Kueue)."""
        return sum(1 for j in self.jobs_of(key).values() if j.unfinished)

    def active_interviews(self) -> int:
        return sum(1 for jobs in (self.job_index or {}).values() for j in jobs if j.step == "interview" and j.active)


WORLD = World()
BASE_SETTINGS = Settings.from_env()


_SNAPSHOT: tuple[Settings, dict[str, str], str, Settings] | None = None


def settings() -> Settings:
    """One typed snapshot of the settings: static settings from the environment, overridden by the
    watched settings ConfigMap (and the lease broker's CA, once the leader has it). Built once per
    change of either, not per call: a pass takes one snapshot and hands it down."""
    global _SNAPSHOT
    snap = _SNAPSHOT
    if snap is not None and snap[0] is BASE_SETTINGS and snap[1] == WORLD.settings_data and snap[2] == WORLD.broker_ca:
        return snap[3]
    s = BASE_SETTINGS.with_configmap(WORLD.settings_data) if WORLD.settings_data else BASE_SETTINGS
    s = replace(s, lease_broker_ca=WORLD.broker_ca) if WORLD.broker_ca else s
    _SNAPSHOT = (BASE_SETTINGS, dict(WORLD.settings_data), WORLD.broker_ca, s)
    return s
