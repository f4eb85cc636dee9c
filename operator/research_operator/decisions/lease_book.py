"""Per-request leases of a shared model endpoint: the broker's book, pure (time is a parameter).

A worker pod admitted against a ``ModelEndpoint`` holds a *session* with the broker (a heartbeat
every ``HEARTBEAT_SECONDS``) and takes one *lease* per model call, returned when the call ends, so
a slot an analyst does not use while its pod does CPU work is lent to another pod at once.

Safety (never more than ``maxConcurrentRequests`` in flight) rests on one rule: **every admitted pod
is counted either by its leases (while its session is live) or by its ConfigMap share (while it is
not)**. A pod without a live session may be calling under its share (the fallback when the broker
is unreachable, a worker of an older operator, a pod still starting), so the broker lends only what
the shares of those pods leave. A session lapses ``SESSION_TTL_SECONDS`` after the last heartbeat
the broker received; the worker drops its leases (cancelling their calls) at the same TTL counted
from the last heartbeat it *sent* that succeeded, and only starts calling under its share after a
further quiet TTL, so the two views never overlap. A broker that starts (a restart, a failover)
grants nothing for ``recovery_seconds`` while live workers re-declare the leases they hold.

Fairness: waiting requests are granted to the namespace, then the ResearchJob, holding the fewest
leases of the endpoint (max-min fairness), the longest-waiting first among equals; requests and
tokens per minute are endpoint-wide buckets charged at grant (a request) and at release (its tokens).

Budgets: with a ``ledger`` (``research_operator.decisions.ledger``), a request that carries its worst case is
granted only when that reservation fits every budget it falls under; it is settled when the lease is
returned (to the usage the worker reports, else at the worst case), and the reservations of a lapsed
session at their worst case. A request that must wait for a budget does not hold back the others.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from research_api.leases import (
    HEARTBEAT_SECONDS,
    QUIET_MARGIN_SECONDS,
    SESSION_TTL_SECONDS,
    CallUsage,
    Mode,
    Reserve,
)
from research_operator.decisions.ledger import Budgets, Decision, Ledger, Prices, Reservation, Verdict

REQUEST_BURST_SECONDS = 1.0
TOKEN_BURST_SECONDS = 10.0


def recovery_seconds(ttl: float = SESSION_TTL_SECONDS, heartbeat: float = HEARTBEAT_SECONDS) -> float:
    """How long a starting broker grants nothing: every lease a predecessor granted has been either
    re-declared by a live worker or dropped by it by then."""
    return ttl + heartbeat + QUIET_MARGIN_SECONDS


@dataclass(frozen=True)
class PodRef:
    """An admitted worker pod (its Job), as the operator's world sees it."""

    namespace: str
    research_job: str
    job: str
    share: int  # its ConfigMap share of concurrency (what it may use without the broker)
    uid: str = ""  # the ResearchJob's uid (its budgets)


SessionKey = tuple[str, str]  # (namespace, pod name): a Job's retried pod has a session of its own


@dataclass
class Lease:
    id: str
    seq: int  # per-session grant number (0: re-declared to a restarted broker)


@dataclass
class Session:
    namespace: str
    research_job: str
    job: str
    pod: str
    endpoint: str
    last_seen: float
    mode: Mode = Mode.LEASE
    carried: int = 0  # calls started under the share before the worker came (back) to the broker
    leases: dict[str, Lease] = field(default_factory=dict)
    seq: int = 0
    closed_at: float | None = None  # the worker said it makes no more calls
    uid: str = ""  # the ResearchJob's uid

    def live(self, now: float, ttl: float) -> bool:
        return self.closed_at is None and now - self.last_seen < ttl

    def just_closed(self, now: float, ttl: float) -> bool:
        """Closed within a TTL: its Job is counted as idle. Later a retried pod of the Job (one that
        cannot reach the broker falls back to the share only after a TTL) is counted by the share again."""
        return self.closed_at is not None and now - self.closed_at < ttl


@dataclass
class _Bucket:
    per_minute: int | None
    burst_seconds: float
    level: float = 0.0
    stamp: float = 0.0

    def refill(self, now: float) -> None:
        if self.per_minute:
            cap = max(1.0, self.per_minute / 60 * self.burst_seconds)
            self.level = min(cap, self.level + (now - self.stamp) * self.per_minute / 60)
        self.stamp = now

    def ready(self, now: float) -> bool:
        self.refill(now)
        return self.per_minute is None or self.level >= 1.0

    def take(self, amount: float, now: float) -> None:
        if self.per_minute is not None:
            self.refill(now)
            self.level -= amount


@dataclass
class Limits:
    max_concurrent: int
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


@dataclass
class Waiter:
    session: SessionKey
    endpoint: str
    since: float
    order: int
    granted: Lease | None = None
    gone: bool = False  # the request ended (timed out, disconnected) before a grant
    reservation: Reservation | None = None  # its worst case, reserved against its budgets at grant
    refused: Verdict | None = None  # no budget of its can ever pay it: answered at once
    note: Verdict | None = None  # why it waits for a budget, as of the last grant pass


class LeaseError(Exception):
    """A request the broker refuses (HTTP status and a message for the worker's log)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Book:
    """Every endpoint's sessions, leases and waiting requests in this process.

    ``pods(endpoint)`` returns the pods admitted against an endpoint now (from the operator's world)
    and ``limits(endpoint)`` its declared limits (None: no such ModelEndpoint)."""

    pods: Callable[[str], Iterable[PodRef]]
    limits: Callable[[str], Limits | None]
    started: float
    ttl: float = SESSION_TTL_SECONDS
    recovery: float = field(default_factory=recovery_seconds)
    sessions: dict[SessionKey, Session] = field(default_factory=dict)
    waiters: list[Waiter] = field(default_factory=list)
    buckets: dict[str, tuple[_Bucket, _Bucket]] = field(default_factory=dict)
    _order: itertools.count[int] = field(default_factory=itertools.count)
    expired: dict[str, int] = field(default_factory=dict)  # leases dropped with a lapsed session, by endpoint
    # Budgets (None: none enforced here): the ledger, each ResearchJob's budgets (namespace, name,
    # uid, now) and each endpoint's prices.
    ledger: Ledger | None = None
    declared: set[SessionKey] = field(default_factory=set)  # pods whose unstored usage was taken (recovery)
    budgets: Callable[[str, str, str, float], Budgets] | None = None
    prices: Callable[[str], Prices] = field(default=lambda endpoint: Prices())

    # -- what is in flight ------------------------------------------------------------------
    def recovering(self, now: float) -> bool:
        return now - self.started < self.recovery

    def _counted(self, s: Session, share: int) -> int:
        if s.mode == Mode.FALLBACK:
            return max(share, s.carried + len(s.leases))
        return len(s.leases) + s.carried

    def in_use(self, endpoint: str, now: float) -> int:
        """What may be in flight at ``endpoint`` now: live sessions' leases (and calls they carried
        over from their share), and the share of every admitted pod without a live session."""
        admitted = {(p.namespace, p.job): p for p in self.pods(endpoint)}
        total = 0
        live_jobs: set[tuple[str, str]] = set()
        closed_jobs: set[tuple[str, str]] = set()
        for s in self.sessions.values():
            if s.endpoint != endpoint:
                continue
            job = (s.namespace, s.job)
            if s.live(now, self.ttl):
                p = admitted.get(job)
                total += self._counted(s, p.share if p else 0)
                live_jobs.add(job)
            elif s.just_closed(now, self.ttl):
                closed_jobs.add(job)
        for job, p in admitted.items():
            if job not in live_jobs and job not in closed_jobs:
                total += p.share
        return total

    def leases_in_flight(self, endpoint: str, now: float) -> int:
        return sum(len(s.leases) for s in self.sessions.values() if s.endpoint == endpoint and s.live(now, self.ttl))

    def in_touch(self, endpoint: str, now: float) -> int:
        return sum(1 for s in self.sessions.values() if s.endpoint == endpoint and s.live(now, self.ttl))

    def waiting(self, endpoint: str) -> int:
        return sum(1 for w in self.waiters if w.endpoint == endpoint and not w.gone and w.granted is None)

    # -- requests from workers ----------------------------------------------------------------
    def _admitted(self, endpoint: str, namespace: str, job: str) -> PodRef:
        if self.limits(endpoint) is None:
            raise LeaseError(404, f"no ModelEndpoint {endpoint}")
        for p in self.pods(endpoint):
            if (p.namespace, p.job) == (namespace, job):
                return p
        raise LeaseError(404, f"Job {namespace}/{job} is not admitted against ModelEndpoint {endpoint}")

    def heartbeat(
        self,
        endpoint: str,
        namespace: str,
        job: str,
        pod: str,
        now: float,
        *,
        mode: Mode,
        carried: int,
        held: Iterable[str],
        seen: int,
        tokens: int = 0,
        reserved: Mapping[str, Reserve] | None = None,
        unstored: CallUsage | None = None,
    ) -> list[str]:
        """A worker's heartbeat: it is alive, in ``mode``, with ``carried`` calls under its share and
        the leases ``held``; ``seen`` is the last grant number it received. Returns the held leases
        the broker no longer knows (the worker cancels their calls)."""
        ref = self._admitted(endpoint, namespace, job)
        key = (namespace, pod)
        s = self.sessions.get(key)
        if s is None or s.endpoint != endpoint or s.job != job or s.closed_at is not None:
            s = Session(namespace, ref.research_job, job, pod, endpoint, now, uid=ref.uid)
            self.sessions[key] = s
        elif not s.live(now, self.ttl):
            self._drop(s)
        s.last_seen, s.mode, s.carried = now, mode, max(0, carried)
        s.seq = max(s.seq, seen)  # a restarted broker numbers its grants after what the worker has seen
        self._buckets(endpoint)[1].take(max(0, tokens), now)  # tokens are charged when calls return
        if self.ledger is not None and unstored is not None and self.recovering(now) and key not in self.declared:
            # what the pod's calls used under a predecessor that no stored result holds yet
            self.declared.add(key)
            used = self.prices(endpoint).amount(unstored.input_tokens, unstored.output_tokens)
            self.ledger.redeclare_spent((namespace, ref.uid), used)
        held = set(held)
        lost = []
        for lid in sorted(held - s.leases.keys()):
            if self.recovering(now):
                s.leases[lid] = Lease(lid, 0)  # re-declared to a broker that just started
                r = (reserved or {}).get(lid)
                if r is not None and self.ledger is not None:  # and its reservation, granted before
                    self.ledger.reserve(self._reservation(s, r, lid))
            else:
                lost.append(lid)
        for lid, lease in list(s.leases.items()):
            if lid not in held and lease.seq <= seen:
                # Granted before the worker's last grant and not held: never received, or its release
                # was lost (the call may have been made: its worst case is settled).
                del s.leases[lid]
                self._settle(lid, None)
        return lost

    def _reservation(self, s: Session, r: Reserve, lid: str = "") -> Reservation:
        worst = self.prices(s.endpoint).amount(r.input_tokens, r.output_tokens)
        return Reservation(lid, (s.namespace, s.uid), worst, self.prices(s.endpoint), r.input_tokens, r.output_tokens)

    def _settle(self, lid: str, usage: CallUsage | None) -> None:
        if self.ledger is not None:
            if usage is None:
                self.ledger.settle(lid, None, None)
            else:
                self.ledger.settle(lid, usage.input_tokens, usage.output_tokens)

    def enqueue(
        self, endpoint: str, namespace: str, job: str, pod: str, now: float, reserve: Reserve | None = None
    ) -> Waiter:
        self._admitted(endpoint, namespace, job)
        s = self.sessions.get((namespace, pod))
        if s is None or not s.live(now, self.ttl) or s.endpoint != endpoint or s.job != job:
            raise LeaseError(409, "no live session: send a heartbeat first")
        if s.mode != Mode.LEASE:
            raise LeaseError(409, "the session is in fallback mode: send a heartbeat in lease mode first")
        w = Waiter((namespace, pod), endpoint, now, next(self._order))
        if reserve is not None and self.ledger is not None:
            w.reservation = self._reservation(s, reserve)
        self.waiters.append(w)
        return w

    def release(self, namespace: str, pod: str, lease_id: str, usage: CallUsage | None = None) -> bool:
        """A call ended: its lease is free, and its reservation settled to ``usage`` (None: unknown,
        so at its worst case)."""
        s = self.sessions.get((namespace, pod))
        if s is None or s.leases.pop(lease_id, None) is None:
            return False
        self._settle(lease_id, usage)
        return True

    def close(self, namespace: str, pod: str, now: float) -> None:
        s = self.sessions.get((namespace, pod))
        if s is not None:
            s.closed_at = now
            self._drop(s, count=False)
            s.carried = 0

    # -- granting ------------------------------------------------------------------------------
    def _buckets(self, endpoint: str) -> tuple[_Bucket, _Bucket]:
        lim = self.limits(endpoint) or Limits(0)
        b = self.buckets.get(endpoint)
        if b is None or (b[0].per_minute, b[1].per_minute) != (lim.requests_per_minute, lim.tokens_per_minute):
            req = _Bucket(lim.requests_per_minute, REQUEST_BURST_SECONDS)
            tok = _Bucket(lim.tokens_per_minute, TOKEN_BURST_SECONDS)
            for bucket in (req, tok):
                if bucket.per_minute:
                    bucket.level = max(1.0, bucket.per_minute / 60 * bucket.burst_seconds)
            if b is not None:  # keep what was spent
                req.level, tok.level = min(req.level, b[0].level), min(tok.level, b[1].level)
            b = (req, tok)
            self.buckets[endpoint] = b
        return b

    def _drop(self, s: Session, count: bool = True) -> None:
        """The session's leases end with it; their calls may have been made: settled at worst case."""
        if count:
            self.expired[s.endpoint] = self.expired.get(s.endpoint, 0) + len(s.leases)
        if self.ledger is not None:
            self.ledger.settle_all(s.leases)
        s.leases.clear()

    def expire(self, now: float) -> None:
        """Drop the leases of lapsed sessions, and sessions of pods long gone."""
        for key, s in list(self.sessions.items()):
            if not s.live(now, self.ttl) and s.leases:
                self._drop(s)
            if now - s.last_seen > 10 * self.ttl:
                del self.sessions[key]
        self.waiters = [w for w in self.waiters if not w.gone and w.granted is None]

    def _can_take(self, w: Waiter, now: float) -> bool:
        s = self.sessions.get(w.session)
        return (
            not w.gone
            and w.granted is None
            and s is not None
            and s.live(now, self.ttl)
            and s.mode == Mode.LEASE
            and s.endpoint == w.endpoint
        )

    def grant(self, endpoint: str, now: float) -> list[Waiter]:
        """Grant what fits to the waiting requests of ``endpoint``, fairest first."""
        lim = self.limits(endpoint)
        if lim is None or self.recovering(now):
            return []
        req, tok = self._buckets(endpoint)
        used = self.in_use(endpoint, now)
        out: list[Waiter] = []
        held_ns: dict[str, int] = {}
        held_rj: dict[tuple[str, str], int] = {}
        for s in self.sessions.values():
            if s.endpoint == endpoint and s.live(now, self.ttl):
                held_ns[s.namespace] = held_ns.get(s.namespace, 0) + len(s.leases)
                held_rj[(s.namespace, s.research_job)] = held_rj.get((s.namespace, s.research_job), 0) + len(s.leases)

        def fairness(w: Waiter) -> tuple[int, int, float, int]:
            s = self.sessions[w.session]
            return (held_ns.get(s.namespace, 0), held_rj.get((s.namespace, s.research_job), 0), w.since, w.order)

        budgets: dict[tuple[str, str], Budgets] = {}  # the world's view, looked at once per pass

        def verdict(w: Waiter) -> Verdict | None:
            """The budgets' verdict on ``w`` now (None: it reserves nothing)."""
            if w.reservation is None or self.ledger is None or self.budgets is None:
                return None
            s = self.sessions[w.session]
            b = budgets.get((s.namespace, s.uid))
            if b is None:
                b = budgets[(s.namespace, s.uid)] = self.budgets(s.namespace, s.research_job, s.uid, now)
            v = self.ledger.check(b, w.reservation, now)
            w.note = v if v.decision == Decision.WAIT else None
            return v

        # A call that no budget can ever pay is answered at once, whatever the endpoint's capacity.
        for w in self.waiters:
            if w.endpoint == endpoint and self._can_take(w, now) and (v := verdict(w)) is not None:
                if v.decision == Decision.REFUSE:
                    w.refused = v
                    w.gone = True
                    out.append(w)
        while used < lim.max_concurrent and req.ready(now) and tok.ready(now):
            live = sorted((w for w in self.waiters if w.endpoint == endpoint and self._can_take(w, now)), key=fairness)
            found = next((w for w in live if (v := verdict(w)) is None or v.decision == Decision.GRANT), None)
            if found is None:
                break
            w = found
            s = self.sessions[w.session]
            s.seq += 1
            lease = Lease(uuid.uuid4().hex, s.seq)
            s.leases[lease.id] = lease
            w.granted = lease
            if w.reservation is not None and self.ledger is not None:
                w.reservation.id = lease.id
                self.ledger.reserve(w.reservation)
            held_ns[s.namespace] = held_ns.get(s.namespace, 0) + 1
            held_rj[(s.namespace, s.research_job)] = held_rj.get((s.namespace, s.research_job), 0) + 1
            req.take(1, now)
            used += 1
            out.append(w)
        return out


def pod_refs(pods: Iterable[tuple[str, str, str]], shares: Mapping[str, int]) -> list[PodRef]:
    """(namespace, ResearchJob, Job) of the admitted pods, with their ConfigMap shares by Job name."""
    return [PodRef(ns, rj, job, shares.get(job, 0)) for ns, rj, job in pods]
