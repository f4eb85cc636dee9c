"""How many worker Jobs may start now: caps, ResourceQuota headroom and fairness.

Pure functions: the handlers gather the numbers, these decide. A worker Job is admitted only if
it fits every limit at once: the ResearchJob's ``maxActiveJobs``, the operator-wide cap, the
per-namespace cap, and the headroom left in each ResourceQuota of the namespace for every
resource a Job and its pod consume. Fairness: while several ResearchJobs wait, each may hold at
most its fair share of a shared cap, so a large one cannot starve small ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal

from kubernetes.utils import parse_quantity


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
    """One ResourceQuota's ``status.hard`` and ``status.used``."""

    name: str
    hard: Mapping[str, str]
    used: Mapping[str, str]


@dataclass(frozen=True)
class QuotaVerdict:
    """How many more Jobs the quotas allow, and which quota and resource binds first."""

    jobs: int | None  # None: no quota limits worker Jobs
    binding: str | None = None

    @property
    def blocked(self) -> bool:
        return self.jobs is not None and self.jobs <= 0


def quota_headroom(quotas: Iterable[QuotaUsage], pod: PodResources) -> QuotaVerdict:
    """The number of worker Jobs that still fit in every quota of the namespace."""
    need = pod.consumption()
    best: int | None = None
    binding: str | None = None
    for quota in quotas:
        for resource, hard_s in quota.hard.items():
            per_job = need.get(resource)
            if not per_job:
                continue
            hard = quantity(hard_s)
            used = quantity(quota.used.get(resource, "0"))
            fits = max(0, math.floor((hard - used) / per_job))
            if best is None or fits < best:
                best, binding = fits, f"{quota.name}: {resource} {quota.used.get(resource, '0')}/{hard_s}"
    return QuotaVerdict(best, binding)


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


def _share_allowance(cap: int, me: Demand, peers: list[Demand]) -> int:
    """Slots ``me`` may take under ``cap`` without taking what waiting peers below their share are owed."""
    others = [d for d in peers if (d.namespace, d.name) != (me.namespace, me.name)]
    free = cap - me.active - sum(d.active for d in others)
    if free <= 0:
        return 0
    contenders = 1 + sum(1 for d in others if d.waiting > 0 or d.active > 0)
    share = fair_share(cap, contenders)
    owed = sum(min(share - d.active, d.waiting) for d in others if d.waiting > 0 and d.active < share)
    beyond_owed = max(0, free - owed)
    if me.active < share:
        return min(free, max(share - me.active, beyond_owed))
    return beyond_owed


def admit(
    me: Demand,
    rj_max_active: int,
    all_demands: list[Demand],
    caps: Caps,
    quota: QuotaVerdict,
) -> int:
    """How many of ``me``'s waiting batches may get a Job now."""
    n = min(me.waiting, rj_max_active - me.active)
    if caps.global_max_active > 0:
        n = min(n, _share_allowance(caps.global_max_active, me, all_demands))
    if caps.namespace_max_active > 0:
        same_ns = [d for d in all_demands if d.namespace == me.namespace]
        n = min(n, _share_allowance(caps.namespace_max_active, me, same_ns))
    if quota.jobs is not None:
        n = min(n, quota.jobs)
    return max(0, n)
