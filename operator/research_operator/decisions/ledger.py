"""Budgets of model calls, in tokens and money: reserve, then settle (pure; the lease broker holds one).

Every model call a worker makes under a lease reserves its worst case (an upper bound of its prompt's
tokens plus its output bound, and their cost at the endpoint's prices) against every budget it falls
under *before* it is sent: its ResearchJob's ``spec.budget`` and its namespace's budget for the
current period. When it returns, the reservation is settled to what it really used; a call that
failed after it may have been sent, and the calls of a pod that died holding them, are settled at
their worst case (the endpoint may have done the work: releasing would let later calls spend it
again). So for every budget, at every moment::

    spent + reserved <= limit

and since a settlement never exceeds its reservation (an answer that used more than was reserved,
which a true upper bound rules out, is counted in ``overrun``), spent never exceeds the limit.

*What is spent.* The durable record is the usage workers store with their results (the same usage
as ``status.tokensUsed``), which survives an operator restart. The ledger adds what it settled since
it first saw a ResearchJob: a ResearchJob's spent is ``max(stored now, stored when first seen +
settled since)``: its settled calls are in the second term before their results are stored, in the
first after, never twice. A namespace's spent in a period is what its results stored in the period
used, plus every ResearchJob's settled calls not stored yet. A restarted broker starts from the
stored usage; the reservations in flight are re-declared by the workers' heartbeats with their
leases, and so is what each live pod's calls used that its stored results do not hold yet
(``redeclare_spent``).

*Verdicts.* A call that fits every budget is reserved. One that would fit once other reservations
settle (below their worst case, as most do) waits. One that cannot fit even with nothing else
reserved is refused for its ResearchJob's budget (the worker fails with the budget-exceeded exit
code, the ResearchJob with it) and waits for its namespace's (until the period rolls over or the
admins raise it; meanwhile no worker Job starts in the namespace: ``short``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum

from research_api.apimodel import money as money  # how a cost is shown (status, messages)
from research_api.leases import BudgetKind

ZERO = Decimal(0)
MILLION = Decimal(1_000_000)
SHORT_SECONDS = 60.0  # how long a namespace counts as short after a call last could not fit its budget

RjKey = tuple[str, str]  # (namespace, uid) of a ResearchJob


@dataclass(frozen=True)
class Amount:
    """Tokens and what they cost (in the unit of the endpoints' prices)."""

    tokens: int = 0
    cost: Decimal = ZERO

    def __add__(self, other: Amount) -> Amount:
        return Amount(self.tokens + other.tokens, self.cost + other.cost)

    def __sub__(self, other: Amount) -> Amount:
        return Amount(self.tokens - other.tokens, self.cost - other.cost)

    def top(self, other: Amount) -> Amount:
        """Each component's larger value."""
        return Amount(max(self.tokens, other.tokens), max(self.cost, other.cost))

    def within(self, other: Amount) -> bool:
        return self.tokens <= other.tokens and self.cost <= other.cost


@dataclass(frozen=True)
class Prices:
    """A ModelEndpoint's prices per million tokens (absent: calls cost nothing)."""

    input_per_million: Decimal = ZERO
    output_per_million: Decimal = ZERO

    def amount(self, input_tokens: int, output_tokens: int) -> Amount:
        cost = (input_tokens * self.input_per_million + output_tokens * self.output_per_million) / MILLION
        return Amount(input_tokens + output_tokens, cost)


@dataclass(frozen=True)
class Limit:
    """A budget's limits: tokens, money, or both (None: no limit of that kind)."""

    tokens: int | None = None
    cost: Decimal | None = None

    def admits(self, used: Amount) -> bool:
        return (self.tokens is None or used.tokens <= self.tokens) and (self.cost is None or used.cost <= self.cost)

    def describe(self, spent: Amount) -> str:
        parts = []
        if self.tokens is not None:
            parts.append(f"{spent.tokens} of {self.tokens} tokens")
        if self.cost is not None:
            parts.append(f"{money(spent.cost)} of {money(self.cost)} in cost")
        return " and ".join(parts)


@dataclass(frozen=True)
class Budgets:
    """The budgets one call of a ResearchJob falls under, as the operator's world sees them now."""

    rj: RjKey
    research_job: str  # its name, for messages
    job: Limit | None = None  # spec.budget (maxTokens, maxCost)
    namespace: Limit | None = None  # the namespace's budget for the current period
    namespace_stored: Amount = Amount()  # what the namespace's results stored in the period used
    period: str = ""  # as configured, e.g. "24h"
    resets_in: float | None = None  # seconds until the period rolls over
    resets_at: str = ""  # RFC 3339


class Decision(StrEnum):
    GRANT = "grant"
    WAIT = "wait"
    REFUSE = "refuse"


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    budget: BudgetKind | None = None
    message: str = ""
    until: float | None = None  # seconds until the period rolls over (a namespace waits for it)


GRANT = Verdict(Decision.GRANT)


@dataclass
class Reservation:
    id: str
    rj: RjKey
    worst: Amount
    prices: Prices
    input_tokens: int
    output_tokens: int


@dataclass
class Ledger:
    """Reservations in flight and what was settled, per ResearchJob.

    ``stored(rj)`` is what a ResearchJob's stored results used (durable: from the operator's world)."""

    stored: Callable[[RjKey], Amount]
    reservations: dict[str, Reservation] = field(default_factory=dict)
    floors: dict[RjKey, Amount] = field(default_factory=dict)  # stored when first seen
    settled: dict[RjKey, Amount] = field(default_factory=dict)  # settled here since
    short: dict[str, tuple[float, Amount]] = field(default_factory=dict)  # namespace -> (when, what did not fit)
    # ResearchJob -> (when, why) a call of its last waited for its namespace's budget this period
    waiting: dict[RjKey, tuple[float, str]] = field(default_factory=dict)
    overrun: Amount = Amount()  # used beyond reservations (a prompt bound that was not one): counted, logged

    # -- what is spent and reserved ---------------------------------------------------------------
    def _see(self, rj: RjKey) -> None:
        if rj not in self.floors:
            self.floors[rj] = self.stored(rj)

    def spent(self, rj: RjKey) -> Amount:
        stored = self.stored(rj)
        floor = self.floors.get(rj)
        if floor is None:
            return stored
        return stored.top(floor + self.settled.get(rj, Amount()))

    def unstored(self, rj: RjKey) -> Amount:
        """What settled calls of ``rj`` used that its stored results do not show yet."""
        return self.spent(rj) - self.stored(rj)

    def reserved(self, rj: RjKey) -> Amount:
        return sum((r.worst for r in self.reservations.values() if r.rj == rj), Amount())

    def namespace_reserved(self, namespace: str) -> Amount:
        return sum((r.worst for r in self.reservations.values() if r.rj[0] == namespace), Amount())

    def namespace_spent(self, namespace: str, stored_in_period: Amount) -> Amount:
        """A namespace's spent in the current period: its results stored in the period, and the calls
        its ResearchJobs settled that are not stored yet."""
        return sum((self.unstored(rj) for rj in self.floors if rj[0] == namespace), stored_in_period)

    def waits_for_namespace(self, rj: RjKey, now: float) -> str | None:
        """Why a model call of ``rj`` waits for its namespace's budget this period, if one asked
        within ``SHORT_SECONDS`` (its status says so: the call is in a running pod)."""
        seen = self.waiting.get(rj)
        return seen[1] if seen is not None and now - seen[0] < SHORT_SECONDS else None

    def namespace_short(self, namespace: str, now: float) -> Amount | None:
        """What a call of the namespace needed that its budget could not pay in this period, if one
        asked within ``SHORT_SECONDS``: its worker Jobs should not start meanwhile."""
        seen = self.short.get(namespace)
        return seen[1] if seen is not None and now - seen[0] < SHORT_SECONDS else None

    # -- a call -------------------------------------------------------------------------------------
    def check(self, b: Budgets, r: Reservation, now: float = 0.0) -> Verdict:
        """Whether call ``r`` may be reserved now (GRANT), must wait (WAIT) or can never be paid
        (REFUSE), and why."""
        self._see(b.rj)
        worst, reservation = r.worst, r
        name = f"{b.rj[0]}/{b.research_job}"
        if b.job is not None:
            spent, reserved = self.spent(b.rj), self.reserved(b.rj)
            if not b.job.admits(spent + worst):
                return Verdict(
                    Decision.REFUSE,
                    BudgetKind.RESEARCH_JOB,
                    f"the budget of ResearchJob {name} (spec.budget) cannot pay the next model call: "
                    f"{b.job.describe(spent)} spent, and the call may use up to {_worst(worst, reservation)}",
                )
            if not b.job.admits(spent + reserved + worst):
                return Verdict(
                    Decision.WAIT,
                    BudgetKind.RESEARCH_JOB,
                    f"waiting for calls of ResearchJob {name} in flight to settle: {b.job.describe(spent)} spent, "
                    f"{_amount(reserved)} reserved, and this call may use up to {_worst(worst, reservation)}",
                )
        if b.namespace is not None:
            spent = self.namespace_spent(b.rj[0], b.namespace_stored)
            reserved = self.namespace_reserved(b.rj[0])
            if not b.namespace.admits(spent + worst):
                self.short[b.rj[0]] = (now, worst)
                message = (
                    f"namespace {b.rj[0]} spent {b.namespace.describe(spent)} of its budget per {b.period}, and "
                    f"the next model call may use up to {_worst(worst, reservation)}: it waits until the period "
                    f"rolls over at {b.resets_at} or the budget is raised"
                )
                self.waiting[b.rj] = (now, message)
                return Verdict(Decision.WAIT, BudgetKind.NAMESPACE, message, b.resets_in)
            if not b.namespace.admits(spent + reserved + worst):
                return Verdict(
                    Decision.WAIT,
                    BudgetKind.NAMESPACE,
                    f"waiting for model calls in flight in namespace {b.rj[0]} to settle: "
                    f"{b.namespace.describe(spent)} spent, {_amount(reserved)} reserved for its budget per "
                    f"{b.period}, and this call may use up to {_worst(worst, reservation)}",
                )
        return GRANT

    def reserve(self, r: Reservation) -> None:
        """Reserve ``r`` (after a GRANT verdict, or re-declared to a restarted broker)."""
        self._see(r.rj)
        self.reservations[r.id] = r

    def settle(self, reservation_id: str, input_tokens: int | None, output_tokens: int | None) -> Amount | None:
        """The call of ``reservation_id`` ended: settle it to what it used (None: unknown, so its worst
        case). Returns what was settled (None: no such reservation, e.g. settled already)."""
        r = self.reservations.pop(reservation_id, None)
        if r is None:
            return None
        if input_tokens is None or output_tokens is None:
            used = r.worst
        else:
            used = r.prices.amount(input_tokens, output_tokens)
            if not used.within(r.worst):
                over = (used - r.worst).top(Amount())
                self.overrun = self.overrun + over
        self.settled[r.rj] = self.settled.get(r.rj, Amount()) + used
        return used

    def redeclare_spent(self, rj: RjKey, amount: Amount) -> None:
        """A live pod of ``rj`` says what its calls used that no stored result holds yet (to a broker
        that just started and knows only the stored usage): counted as settled."""
        self._see(rj)
        self.settled[rj] = self.settled.get(rj, Amount()) + amount

    def settle_all(self, reservation_ids: Iterable[str]) -> Amount:
        """Reservations whose pod is gone (a lapsed session): settled at their worst case."""
        return sum((self.settle(i, None, None) or Amount() for i in list(reservation_ids)), Amount())

    def forget(self, alive: Iterable[RjKey]) -> None:
        """Drop what is known of ResearchJobs no longer in the world, unless calls of theirs are in flight
        (their results no longer count either: the namespace budget's rule)."""
        keep = set(alive) | {r.rj for r in self.reservations.values()}
        for rj in [k for k in self.floors if k not in keep]:
            self.floors.pop(rj, None)
            self.settled.pop(rj, None)
        for rj in [k for k in self.waiting if k not in keep]:
            del self.waiting[rj]


def _amount(a: Amount) -> str:
    return f"{a.tokens} tokens" + (f" ({money(a.cost)} in cost)" if a.cost else "")


def _worst(worst: Amount, r: Reservation) -> str:
    return f"{_amount(worst)} (a prompt of at most {r.input_tokens} tokens and an answer of at most {r.output_tokens})"
