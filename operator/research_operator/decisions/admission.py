"""How many worker Jobs may start now: caps, ResourceQuota headroom and fairness.

Pure functions: the handlers gather the numbers, these decide. A worker Job is admitted only if
it fits every limit at once: the ResearchJob's ``maxActiveJobs``, the operator-wide cap, the
per-namespace cap, the headroom left in each ResourceQuota of the namespace for every
resource a Job and its pod consume, the capacity of the shared model endpoint it calls
(``EndpointVerdict``) and the namespace's token budget (``BudgetVerdict``). Fairness: while
several ResearchJobs wait, each may hold at most its fair share of a shared cap, so a large one
cannot starve small ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum

from kubernetes.utils import parse_quantity

from research_operator.decisions.ledger import Amount, Limit, money


def quantity(value: str) -> Decimal:
    """A Kubernetes quantity ("250m", "1Gi") as a Decimal."""
    return Decimal(parse_quantity(value))  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class PodResources:
    """Requests and limits of one worker pod (one container)."""

    requests_cpu: Decimal = Decimal(0)
    requests_memory: Decimal = Decimal(0)
    limits_cpu: Decimal = Decimal(0)
    limits_memory: Decimal = Decimal(0)

    @classmethod
    def from_spec(cls, requests: Mapping[str, str | None], limits: Mapping[str, str | None]) -> PodResources:
        def q(m: Mapping[str, str | None], k: str) -> Decimal:
            v = m.get(k)
            return quantity(v) if v else Decimal(0)

        return cls(q(requests, "cpu"), q(requests, "memory"), q(limits, "cpu"), q(limits, "memory"))

    def consumption(self) -> dict[str, Decimal]:
        """What one worker Job adds to each quota resource name while it runs."""
        one = Decimal(1)
        return {
            "count/jobs.batch": one,
            "count/pods": one,
            "pods": one,
            "requests.cpu": self.requests_cpu,
            "cpu": self.requests_cpu,
            "requests.memory": self.requests_memory,
            "memory": self.requests_memory,
            "limits.cpu": self.limits_cpu,
            "limits.memory": self.limits_memory,
        }


@dataclass(frozen=True)
class QuotaUsage:
    """One ResourceQuota's hard limits and ``status.used``, and the scopes that say which pods it
    counts (``spec.scopes`` and ``spec.scopeSelector``, as (scope, operator, values))."""

    name: str
    hard: Mapping[str, str]
    used: Mapping[str, str]
    scopes: tuple[str, ...] = ()
    selector: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    def counts(self, pod: PodResources, priority_class: str = "") -> bool:
        """Whether a worker pod of this shape falls under this quota. Worker pods are never
        Terminating (their deadline is on the Job, not the pod) and BestEffort only without any
        request or limit."""
        best_effort = not any((pod.requests_cpu, pod.requests_memory, pod.limits_cpu, pod.limits_memory))
        facts = {
            "Terminating": False,
            "NotTerminating": True,
            "BestEffort": best_effort,
            "NotBestEffort": not best_effort,
            "CrossNamespacePodAffinity": False,
        }
        for scope in self.scopes:
            if not facts.get(scope, False):
                return False
        for scope, operator, values in self.selector:
            if scope == "PriorityClass":
                has = bool(priority_class)
                ok = {
                    "In": priority_class in values,
                    "NotIn": priority_class not in values,
                    "Exists": has,
                    "DoesNotExist": not has,
                }.get(operator, False)
            elif operator in ("Exists", "DoesNotExist"):
                ok = facts.get(scope, False) == (operator == "Exists")
            else:
                ok = False
            if not ok:
                return False
        return True


@dataclass(frozen=True)
class QuotaVerdict:
    """How many more Jobs the quotas allow, and which quota and resource binds first."""

    jobs: int | None  # None: no quota limits worker Jobs
    binding: str | None = None

    @property
    def blocked(self) -> bool:
        return self.jobs is not None and self.jobs <= 0


POD_RESOURCES = frozenset(
    ("count/pods", "pods", "requests.cpu", "cpu", "requests.memory", "memory", "limits.cpu", "limits.memory")
)


def quota_headroom(
    quotas: Iterable[QuotaUsage],
    pod: PodResources,
    reserved: Mapping[str, Decimal] | None = None,
    priority_class: str = "",
) -> QuotaVerdict:
    """The number of worker Jobs that still fit in every quota of the namespace.

    ``reserved`` is what this operator's own Jobs will consume but the quotas' ``status.used`` does
    not show yet (Jobs it just created, Jobs whose next pod the Job controller has not created), so
    two passes in a row never hand out the same headroom."""
    need = pod.consumption()
    best: int | None = None
    binding: str | None = None
    for quota in quotas:
        if not quota.counts(pod, priority_class):
            continue
        for resource, hard_s in quota.hard.items():
            per_job = need.get(resource)
            if not per_job:
                continue
            hard = quantity(hard_s)
            used = quantity(quota.used.get(resource, "0")) + (reserved or {}).get(resource, Decimal(0))
            fits = max(0, math.floor((hard - used) / per_job))
            if best is None or fits < best:
                best, binding = fits, f"{quota.name}: {resource} {quota.used.get(resource, '0')}/{hard_s}"
    return QuotaVerdict(best, binding)


def never_fits(quotas: Iterable[QuotaUsage], pod: PodResources, priority_class: str = "") -> str | None:
    """Why one worker pod can never fit a quota of the namespace (its hard limit is below what a
    single worker Job consumes), naming the quota, the resource, the request and the limit; None if
    every quota could hold at least one."""
    need = pod.consumption()
    for quota in sorted(quotas, key=lambda q: q.name):
        if not quota.counts(pod, priority_class):
            continue
        for resource, hard_s in sorted(quota.hard.items()):
            per_job = need.get(resource)
            if per_job and quantity(hard_s) < per_job:
                what = "one worker Job" if resource == "count/jobs.batch" else "one worker pod"
                return (
                    f"ResourceQuota {quota.name} allows {resource} {hard_s}, less than {what} needs "
                    f"({_show(per_job, resource)}); lower spec.worker.resources or raise the quota"
                )
    return None


def _show(value: Decimal, resource: str) -> str:
    if resource.endswith("cpu"):
        return f"{int(value * 1000)}m" if value < 1 else f"{value.normalize():f}"
    if resource.endswith("memory"):
        mib = value / (1024 * 1024)
        return f"{mib.normalize():f}Mi" if mib == mib.to_integral_value() else f"{value.normalize():f}"
    return f"{value.normalize():f}"


@dataclass(frozen=True)
class Caps:
    """Admin limits on running worker Jobs (0 = unlimited)."""

    global_max_active: int = 0
    namespace_max_active: int = 0


@dataclass(frozen=True)
class Demand:
    """One ResearchJob's running and waiting worker Jobs."""

    namespace: str
    name: str
    active: int
    waiting: int


def fair_share(cap: int, contenders: int) -> int:
    """Each contender's guaranteed share of ``cap`` (at least 1)."""
    return max(1, cap // max(1, contenders))


@dataclass(frozen=True)
class _Allowance:
    slots: int
    free: int  # slots free under the cap, before fairness
    share: int
    owed_to: int  # waiting peers below their share


def _share_allowance(cap: int, me: Demand, peers: list[Demand]) -> _Allowance:
    """Slots ``me`` may take under ``cap`` without taking what waiting peers below their share are owed."""
    others = [d for d in peers if (d.namespace, d.name) != (me.namespace, me.name)]
    free = cap - me.active - sum(d.active for d in others)
    contenders = 1 + sum(1 for d in others if d.waiting > 0 or d.active > 0)
    share = fair_share(cap, contenders)
    below = [d for d in others if d.waiting > 0 and d.active < share]
    if free <= 0:
        return _Allowance(0, free, share, len(below))
    owed = sum(min(share - d.active, d.waiting) for d in below)
    beyond_owed = max(0, free - owed)
    if me.active < share:
        return _Allowance(min(free, max(share - me.active, beyond_owed)), free, share, len(below))
    return _Allowance(beyond_owed, free, share, len(below))


class WaitReason(StrEnum):
    """Why a ResearchJob's next worker Jobs wait (a condition's reason)."""

    QUOTA_TOO_SMALL = "QuotaTooSmall"
    EXCEEDED_QUOTA = "ExceededQuota"
    NAMESPACE_CAP = "NamespaceCap"
    GLOBAL_CAP = "GlobalCap"
    FAIR_SHARE = "FairShare"
    MAX_ACTIVE_JOBS = "MaxActiveJobs"
    ENDPOINT_CAPACITY = "EndpointCapacity"
    TOKEN_BUDGET = "TokenBudget"

    @property
    def is_quota(self) -> bool:
        return self in (WaitReason.QUOTA_TOO_SMALL, WaitReason.EXCEEDED_QUOTA)

    @property
    def is_throttle(self) -> bool:
        """Caps, fairness and the ResearchJob's own bound (condition Throttled)."""
        return self in (
            WaitReason.NAMESPACE_CAP,
            WaitReason.GLOBAL_CAP,
            WaitReason.FAIR_SHARE,
            WaitReason.MAX_ACTIVE_JOBS,
        )


class Wake(StrEnum):
    """An event that can end a wait, and the watch handler (``handlers``) or timer that delivers it."""

    OWN_CHANGE = "its own ResearchJob, Jobs or stored results change (researchjob_event, job_event, configmap_event)"
    QUOTA_CHANGED = "a ResourceQuota of its namespace changes or goes (quota_event)"
    JOB_ENDED_IN_NAMESPACE = "a worker Job of its namespace ends or goes (job_event)"
    JOB_ENDED_ANYWHERE = "a worker Job of any namespace ends or goes, under a global cap (job_event)"
    WAITER_GONE = "a waiting ResearchJob goes, leaving its fair share (stop_loop)"
    SETTINGS_CHANGED = "the operator's settings ConfigMap changes (settings_changed)"
    ENDPOINT_FREED = "a Job admitted against its ModelEndpoint ends or goes (job_event)"
    ENDPOINT_CHANGED = "a ModelEndpoint changes (endpoint_event)"
    BUDGET_PERIOD_ENDS = "the token budget's period rolls over (the pass's wake_at)"


# Every wait names the events that end it; none ends only with the resync (tests/test_operator_unit.py
# checks that each is delivered, tests/test_wakeups_cluster.py that each ends the wait on a real
# cluster with the resync out of reach). A namespace being deleted is not a WaitReason of
# admission: see ``loop.reconcile_once`` (its ResearchJob's DELETED event, a ResearchJob created in
# a namespace of that name again, the memo's end).
ENDED_BY: dict[WaitReason, frozenset[Wake]] = {
    WaitReason.QUOTA_TOO_SMALL: frozenset({Wake.OWN_CHANGE, Wake.QUOTA_CHANGED}),
    WaitReason.EXCEEDED_QUOTA: frozenset({Wake.OWN_CHANGE, Wake.QUOTA_CHANGED, Wake.JOB_ENDED_IN_NAMESPACE}),
    WaitReason.NAMESPACE_CAP: frozenset(
        {Wake.OWN_CHANGE, Wake.JOB_ENDED_IN_NAMESPACE, Wake.WAITER_GONE, Wake.SETTINGS_CHANGED}
    ),
    WaitReason.GLOBAL_CAP: frozenset(
        {Wake.OWN_CHANGE, Wake.JOB_ENDED_ANYWHERE, Wake.WAITER_GONE, Wake.SETTINGS_CHANGED}
    ),
    WaitReason.FAIR_SHARE: frozenset(
        {Wake.OWN_CHANGE, Wake.JOB_ENDED_IN_NAMESPACE, Wake.JOB_ENDED_ANYWHERE, Wake.WAITER_GONE, Wake.SETTINGS_CHANGED}
    ),
    WaitReason.MAX_ACTIVE_JOBS: frozenset({Wake.OWN_CHANGE}),
    WaitReason.ENDPOINT_CAPACITY: frozenset({Wake.OWN_CHANGE, Wake.ENDPOINT_FREED, Wake.ENDPOINT_CHANGED}),
    WaitReason.TOKEN_BUDGET: frozenset({Wake.OWN_CHANGE, Wake.BUDGET_PERIOD_ENDS, Wake.SETTINGS_CHANGED}),
}


@dataclass(frozen=True)
class EndpointVerdict:
    """How many more worker pods of one ResearchJob fit the model endpoint they call: each counts with
    ``demand`` requests in flight against ``max_concurrent``, of which ``in_use`` are admitted."""

    name: str
    max_concurrent: int
    in_use: int
    demand: int
    standby: int = 0  # demand admitted beyond the capacity: pods that start paused (share 0)
    # Fairness across namespaces: what this ResearchJob's namespace has admitted at the endpoint, and
    # for every other namespace there (admitted, demand of its pods waiting to be admitted).
    mine: int = 0
    peers: tuple[tuple[int, int, int], ...] = ()  # (admitted, waiting, the demand of one of its pods)
    # The lease broker hands out each call's slot, fairest namespace first: an admitted pod holds no
    # slot while it does not call, so a namespace below its share is admitted even when all is taken.
    leased: bool = False

    @property
    def _fair(self) -> tuple[int, int, int]:
        """(demand this namespace may still be admitted, the fair share, namespaces it is owed to).
        Each namespace running or waiting at the endpoint is guaranteed ``total / namespaces`` (at
        least one pod); one at or above its share takes only what no waiting namespace below its
        share is owed, so a tenant that comes later is admitted ahead of a big one's backlog. With
        the lease broker (``leased``) a namespace below its share is admitted up to it even when a
        big one's pods, admitted while it was alone, hold everything: it need not wait for one of
        them to end (they are long-lived), as the broker's leases, fairest namespace first, keep the
        calls within the capacity. So its fairness holds in time, not only at the next freed slot."""
        total = self.max_concurrent + self.standby
        free = total - self.in_use
        contenders = 1 + sum(1 for used, wanted, _ in self.peers if used > 0 or wanted > 0)
        share = max(self.demand, total // contenders)
        # Below its share: one more of its pods still fits in it (else nothing is held for it).
        below = [(used, wanted) for used, wanted, pod in self.peers if wanted > 0 and used + max(1, pod) <= share]
        beyond_owed = max(0, free - sum(min(share - used, wanted) for used, wanted in below))
        if self.mine + self.demand <= share:
            if self.leased:
                return max(share - self.mine, beyond_owed), share, len(below)
            return max(0, min(free, max(share - self.mine, beyond_owed))), share, len(below)
        if free <= 0:
            return 0, share, len(below)
        return beyond_owed, share, len(below)

    @property
    def jobs(self) -> int:
        return max(0, self._fair[0] // max(1, self.demand))

    @property
    def message(self) -> str:
        running = min(self.in_use, self.max_concurrent)
        paused = f", {self.in_use - running} more standing by" if self.in_use > running else ""
        allowed, share, owed_to = self._fair
        free = self.max_concurrent + self.standby - self.in_use
        fair = (
            f"; the free capacity is owed to {owed_to} namespaces waiting below their fair share of {share}"
            if allowed < free and allowed < self.demand and owed_to
            else ""
        )
        return (
            f"ModelEndpoint {self.name}: {running}/{self.max_concurrent} requests in flight admitted{paused}, "
            f"a worker pod needs {self.demand}{fair}"
        )


@dataclass(frozen=True)
class BudgetVerdict:
    """The namespace's budget for the current period and what its ResearchJobs spent in it (tokens,
    and cost at the endpoints' prices), and what a model call waiting for it needs."""

    namespace: str
    budget: int | None  # tokens per period (None: the budget is in money only)
    spent: int
    period: str  # as configured, e.g. "24h"
    resets: str  # RFC 3339 end of the current period
    cost_budget: Decimal | None = None  # money per period (None: in tokens only)
    cost_spent: Decimal = Decimal(0)
    short: Amount | None = None  # a model call of the namespace waits: the budget cannot pay it this period

    @property
    def exhausted(self) -> bool:
        return (
            (self.budget is not None and self.spent >= self.budget)
            or (self.cost_budget is not None and self.cost_spent >= self.cost_budget)
            or self.short is not None
        )

    @property
    def message(self) -> str:
        spent = Limit(self.budget, self.cost_budget).describe(Amount(self.spent, self.cost_spent))
        if self.budget is not None and self.cost_budget is None:
            spent = f"{self.spent} of its {self.budget} tokens"
        waiting = (
            f" (a model call waits that may use up to {self.short.tokens} tokens"
            + (f", {money(self.short.cost)} in cost" if self.short.cost else "")
            + ")"
            if self.short is not None
            else ""
        )
        return (
            f"namespace {self.namespace} spent {spent} per {self.period}{waiting}; "
            f"no new worker Job starts before the period rolls over at {self.resets}"
        )


@dataclass(frozen=True)
class Admission:
    """How many of a ResearchJob's waiting worker Jobs may start now, and, if some must wait, why."""

    admitted: int
    reason: WaitReason | None = None
    message: str = ""


def decide_admission(
    me: Demand,
    own_limit: int,
    all_demands: list[Demand],
    caps: Caps,
    quota: QuotaVerdict,
    too_small: str | None = None,
    endpoint: EndpointVerdict | None = None,
    budget: BudgetVerdict | None = None,
) -> Admission:
    """Admit what fits every limit at once; name the limit that holds the rest back.

    ``me.waiting`` Jobs want to start; ``own_limit`` is the ResearchJob's own bound on its running
    Jobs (``maxActiveJobs`` for interview batches, 1 for the planner, writer and cleanup Job).
    ``too_small`` is set when a quota can never hold one worker pod (see ``never_fits``);
    ``endpoint`` when the model endpoint has a declared capacity, ``budget`` when the namespace has
    a token budget (spent: nothing starts until the period rolls over)."""
    if me.waiting <= 0:
        return Admission(0)
    if too_small is not None:
        return Admission(0, WaitReason.QUOTA_TOO_SMALL, too_small)
    if budget is not None and budget.exhausted:
        return Admission(0, WaitReason.TOKEN_BUDGET, budget.message)
    limits: list[tuple[int, WaitReason, str]] = []
    if endpoint is not None:
        limits.append((endpoint.jobs, WaitReason.ENDPOINT_CAPACITY, endpoint.message))
    if quota.jobs is not None:
        limits.append((quota.jobs, WaitReason.EXCEEDED_QUOTA, f"ResourceQuota {quota.binding}"))
    for cap, peers, reason, what in (
        (
            caps.namespace_max_active,
            [d for d in all_demands if d.namespace == me.namespace],
            WaitReason.NAMESPACE_CAP,
            "namespaceMaxActiveJobs",
        ),
        (caps.global_max_active, all_demands, WaitReason.GLOBAL_CAP, "globalMaxActiveJobs"),
    ):
        if cap <= 0:
            continue
        a = _share_allowance(cap, me, peers)
        if a.slots < max(0, a.free):
            why = f"the free slots are owed to {a.owed_to} waiting ResearchJobs below their fair share of {a.share}"
            limits.append((a.slots, WaitReason.FAIR_SHARE, f"{what}={cap}: {why}"))
        else:
            limits.append((a.slots, reason, f"{what}={cap}: {cap - a.free} worker Jobs running"))
    limits.append(
        (
            max(0, own_limit - me.active),
            WaitReason.MAX_ACTIVE_JOBS,
            f"maxActiveJobs={own_limit}: {me.active} worker Jobs of this ResearchJob running",
        )
    )
    admitted = max(0, min(me.waiting, *(n for n, _, _ in limits)))
    if admitted >= me.waiting:
        return Admission(admitted)
    _, reason, message = next(lim for lim in limits if lim[0] <= admitted)
    return Admission(admitted, reason, message)


def admit(
    me: Demand,
    rj_max_active: int,
    all_demands: list[Demand],
    caps: Caps,
    quota: QuotaVerdict,
) -> int:
    """How many of ``me``'s waiting batches may get a Job now."""
    return decide_admission(me, rj_max_active, all_demands, caps, quota).admitted
