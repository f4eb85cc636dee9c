"""Budgets that cannot be overshot: the ledger (pure) and the lease broker's book with it.

A call reserves its worst case against every budget it falls under before it is sent and is settled
to what it used when it returns; these tests show what a user of a budget sees: calls that fit go,
calls that would overshoot wait or are refused with a reason, and what is spent never passes the limit.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

import httpx
import pytest
from aiohttp import web
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from pydantic import SecretStr

from offline_model.tokens import count_message_tokens
from research_api import leases as wire
from research_api.exitcodes import EXIT_BUDGET
from research_api.modelendpoint import NamespaceSelector
from research_api.researchjob import ResearchJobSpec, ResearchJobStatus
from research_api.task import EndpointShareRef, ModelSettings, StructuredOutput
from research_operator.cache.world import WORLD
from research_operator.constants import plan_id
from research_operator.decisions import endpoints as ep
from research_operator.decisions.admission import BudgetVerdict
from research_operator.decisions.lease_book import Book, Limits, PodRef, Waiter
from research_operator.decisions.ledger import (
    Amount,
    Budgets,
    Decision,
    Ledger,
    Limit,
    Prices,
    Reservation,
    RjKey,
)
from research_operator.decisions.reconcile import Observed, StepTokens, StoreView, decide
from research_operator.lease_broker import broker as broker_module
from research_operator.lease_broker.broker import Authenticator, Broker
from research_worker.errors import BudgetExceeded
from research_worker.leases import LeaseClient, LeaseLost
from research_worker.llm import LLMClient, prompt_bound
from research_worker.share import ShareLimiter
from research_worker.state import SearchQuery
from tests.test_leases_unit import api_server, token

RJ: RjKey = ("team", "uid-a")
T0 = dt.datetime(2026, 12, 6, 9, 0, tzinfo=dt.UTC)
SPEC = ResearchJobSpec.model_validate(
    {"topic": "How Kueue admits", "analysts": {"count": 2}, "sources": [{"type": "documents", "configMap": "c"}]}
)
FREE = Prices()  # an endpoint without prices


def call(rid: str, input_tokens: int, output_tokens: int, prices: Prices = FREE, rj: RjKey = RJ) -> Reservation:
    return Reservation(rid, rj, prices.amount(input_tokens, output_tokens), prices, input_tokens, output_tokens)


def stored_of(table: dict[RjKey, Amount]) -> Ledger:
    return Ledger(lambda rj: table.get(rj, Amount()))


def test_a_call_reserves_its_worst_case_and_settles_to_what_it_used() -> None:
    ledger = stored_of({})
    budgets = Budgets(RJ, "a", job=Limit(tokens=1000))
    first = call("1", 300, 400)  # worst case 700
    assert ledger.check(budgets, first).decision == Decision.GRANT
    ledger.reserve(first)
    # A second call of 700 would fit the 300 left only if the first used less than it may: it waits.
    second = call("2", 300, 400)
    verdict = ledger.check(budgets, second)
    assert verdict.decision == Decision.WAIT and verdict.budget == wire.BudgetKind.RESEARCH_JOB
    assert "700 tokens reserved" in verdict.message
    assert ledger.settle("1", 250, 50) == Amount(300)  # it used 300 of its 700
    assert ledger.spent(RJ) == Amount(300)
    assert ledger.check(budgets, second).decision == Decision.GRANT  # 300 + 700 <= 1000


def test_a_call_no_budget_can_pay_is_refused_and_says_why() -> None:
    ledger = stored_of({RJ: Amount(600)})  # what its stored results used
    verdict = ledger.check(Budgets(RJ, "a", job=Limit(tokens=1000)), call("1", 120, 4096))
    assert verdict.decision == Decision.REFUSE and verdict.budget == wire.BudgetKind.RESEARCH_JOB
    assert verdict.message == (
        "the budget of ResearchJob team/a (spec.budget) cannot pay the next model call: 600 of 1000 tokens spent, "
        "and the call may use up to 4216 tokens (a prompt of at most 120 tokens and an answer of at most 4096)"
    )


def test_a_call_the_namespace_cannot_pay_this_period_waits_for_the_roll_over() -> None:
    ledger = stored_of({})
    budgets = Budgets(
        RJ,
        "a",
        namespace=Limit(tokens=5000),
        namespace_stored=Amount(4500),
        period="24h",
        resets_in=3600.0,
        resets_at="2026-12-07T00:00:00Z",
    )
    verdict = ledger.check(budgets, call("1", 100, 1000), now=10.0)
    assert verdict.decision == Decision.WAIT and verdict.budget == wire.BudgetKind.NAMESPACE
    assert verdict.until == 3600.0 and "rolls over at 2026-12-07T00:00:00Z" in verdict.message
    # so the operator starts no worker Job in the namespace meanwhile
    assert ledger.namespace_short("team", 11.0) == Amount(1100)
    assert ledger.namespace_short("team", 11.0 + 3600) is None  # nobody asked since
    why = ledger.waits_for_namespace(RJ, 11.0)  # what the ResearchJob's status says meanwhile
    assert why is not None and why.startswith("namespace team spent 4500 of 5000 tokens of its budget per 24h")


def test_the_calls_of_a_pod_that_died_are_settled_at_their_worst_case() -> None:
    ledger = stored_of({})
    ledger.reserve(call("1", 100, 900))
    ledger.reserve(call("2", 100, 900))
    assert ledger.settle_all(["1", "2"]) == Amount(2000)  # the endpoint may have done the work
    assert ledger.spent(RJ) == Amount(2000) and ledger.reservations == {}
    assert ledger.settle("1", 10, 10) is None  # a late release changes nothing


def test_settled_calls_count_once_before_and_after_their_results_are_stored() -> None:
    table: dict[RjKey, Amount] = {RJ: Amount(100)}
    ledger = stored_of(table)
    ledger.reserve(call("1", 100, 100))
    ledger.settle("1", 50, 30)
    assert ledger.spent(RJ) == Amount(180)  # not stored yet: the ledger knows
    table[RJ] = Amount(180)  # the worker stored the section with the call's usage
    assert ledger.spent(RJ) == Amount(180)
    assert ledger.namespace_spent("team", Amount(180)) == Amount(180)
    # A restarted operator starts from what is stored; nothing stored is lost.
    assert stored_of(table).spent(RJ) == Amount(180)


def test_a_namespace_counts_its_researchjobs_unstored_calls_once() -> None:
    other: RjKey = ("team", "uid-b")
    table: dict[RjKey, Amount] = {RJ: Amount(0), other: Amount(500)}  # b calls no broker: only stored
    ledger = stored_of(table)
    ledger.reserve(call("1", 100, 200))
    ledger.settle("1", 100, 100)
    assert ledger.namespace_spent("team", Amount(500)) == Amount(700)


def test_money_budgets_use_the_endpoints_prices() -> None:
    prices = Prices(Decimal("2.50"), Decimal("10"))  # per million tokens
    ledger = stored_of({})
    budgets = Budgets(RJ, "a", job=Limit(cost=Decimal("0.05")))
    first = call("1", 1000, 4000, prices)  # worst 0.0025 + 0.04 = 0.0425
    assert first.worst == Amount(5000, Decimal("0.0425"))
    assert ledger.check(budgets, first).decision == Decision.GRANT
    ledger.reserve(first)
    assert ledger.check(budgets, call("2", 1000, 4000, prices)).decision == Decision.WAIT
    ledger.settle("1", 800, 200)  # 0.002 + 0.002
    assert ledger.spent(RJ) == Amount(1000, Decimal("0.004"))
    assert ledger.check(budgets, call("2", 1000, 4000, prices)).decision == Decision.GRANT
    verdict = ledger.check(budgets, call("3", 1000, 40_000, prices))  # 0.4025: never fits
    assert verdict.decision == Decision.REFUSE and "0.004 of 0.05 in cost spent" in verdict.message


def test_the_book_grants_only_what_the_budgets_can_pay_and_settles_at_release() -> None:
    pods = [PodRef("team", "a", "a-b0", 0, "uid-a")]
    ledger = stored_of({})
    book = Book(
        lambda e: pods,
        lambda e: Limits(8),
        started=-100.0,
        ledger=ledger,
        budgets=lambda ns, name, uid, now: Budgets((ns, uid), name, job=Limit(tokens=3000)),
    )
    book.heartbeat("ep", "team", "a-b0", "a-b0-x", 0.0, mode=wire.Mode.LEASE, carried=0, held=[], seen=0)
    reserve = wire.Reserve(input_tokens=200, output_tokens=1000)
    waiters = [book.enqueue("ep", "team", "a-b0", "a-b0-x", 0.0, reserve) for _ in range(4)]
    book.grant("ep", 0.0)
    granted = [w for w in waiters if w.granted is not None]
    assert len(granted) == 2  # 2 x 1200 fit 3000; a third would not, whatever the capacity
    assert all(w.note is not None and w.note.decision == Decision.WAIT for w in waiters if w.granted is None)
    assert granted[0].granted is not None
    book.release("team", "a-b0-x", granted[0].granted.id, wire.CallUsage(input_tokens=150, output_tokens=50))
    book.grant("ep", 0.1)
    assert sum(w.granted is not None for w in waiters) == 3  # 200 spent + 1200 + 1200 reserved
    # The pod dies holding two leases: they lapse with its session, settled at their worst case.
    book.expire(book.ttl + 1)
    assert ledger.spent(("team", "uid-a")) == Amount(200 + 2 * 1200)
    book.heartbeat("ep", "team", "a-b0", "a-b0-y", book.ttl + 2, mode=wire.Mode.LEASE, carried=0, held=[], seen=0)
    refused = book.enqueue("ep", "team", "a-b0", "a-b0-y", book.ttl + 2, reserve)
    book.grant("ep", book.ttl + 2)
    assert refused.granted is None and refused.refused is not None  # 2600 spent: 1200 more never fit 3000


def test_a_restarted_broker_takes_the_redeclared_reservations_against_the_budgets() -> None:
    pods = [PodRef("team", "a", "a-b0", 0, "uid-a")]
    ledger = stored_of({("team", "uid-a"): Amount(1000)})
    book = Book(
        lambda e: pods,
        lambda e: Limits(8),
        started=0.0,
        ledger=ledger,
        budgets=lambda ns, name, uid, now: Budgets((ns, uid), name, job=Limit(tokens=3000)),
    )
    held = {"old": wire.Reserve(input_tokens=500, output_tokens=1000)}
    book.heartbeat(
        "ep", "team", "a-b0", "a-b0-x", 1.0, mode=wire.Mode.LEASE, carried=0, held=["old"], seen=3, reserved=held
    )
    assert ledger.reserved(("team", "uid-a")) == Amount(1500)
    after = book.recovery + 1
    t = 1.0
    while t < after:  # heartbeats every 2 s
        t = min(after, t + wire.HEARTBEAT_SECONDS)
        book.heartbeat(
            "ep", "team", "a-b0", "a-b0-x", t, mode=wire.Mode.LEASE, carried=0, held=["old"], seen=3, reserved=held
        )
    w = book.enqueue("ep", "team", "a-b0", "a-b0-x", after, wire.Reserve(input_tokens=100, output_tokens=500))
    book.grant("ep", after)
    assert w.granted is None and w.note is not None  # 1000 spent + 1500 re-declared + 600 > 3000
    book.release("team", "a-b0-x", "old", wire.CallUsage(input_tokens=400, output_tokens=100))
    book.grant("ep", after)
    assert w.granted is not None
    assert ledger.spent(("team", "uid-a")) == Amount(1500)


# -- property: budgets are never overshot -------------------------------------------------------------


@dataclass
class _Call:
    pod: int
    rj: int
    reserve: wire.Reserve
    used: tuple[int, int]  # what the endpoint would really use (at most the reservation)
    waiter: Waiter | None = None
    sent_at: float | None = None
    duration: float = 0.0
    done: bool = False


def _overshoot_run(seed: int) -> tuple[int, int, bool]:
    """50 calls from 12 pods of 3 ResearchJobs in one namespace, at random moments and durations, with
    random pod deaths; returns (worst overshoot of any budget seen at any moment, calls sent, whether a
    budget held a call back). The truth
    counts a call's real usage from the moment it is sent (the endpoint works on it whether or not its
    pod lives to report it)."""
    rng = random.Random(seed)
    prices = Prices(Decimal(rng.choice(["0", "0.5", "3"])), Decimal(rng.choice(["0", "2", "15"])))
    ns_limit = Limit(
        tokens=rng.randint(8_000, 60_000) if rng.random() < 0.8 else None,
        cost=Decimal(rng.randint(20, 200)) / 1000 if rng.random() < 0.5 else None,
    )
    job_limits = [Limit(tokens=rng.randint(5_000, 30_000)) if rng.random() < 0.7 else None for _ in range(3)]
    uids = [f"uid-{i}" for i in range(3)]
    pods = [PodRef("team", f"rj{i % 3}", f"rj{i % 3}-b{i}", 0, uids[i % 3]) for i in range(12)]
    stored: dict[RjKey, Amount] = {}
    ledger = Ledger(lambda rj: stored.get(rj, Amount()))

    def budgets(ns: str, name: str, uid: str, now: float) -> Budgets:
        ns_stored = sum(stored.values(), Amount())
        return Budgets((ns, uid), name, job_limits[uids.index(uid)], ns_limit, ns_stored, "24h", 3600.0, "later")

    book = Book(lambda e: pods, lambda e: Limits(rng.randint(2, 12)), started=-100.0, ledger=ledger, budgets=budgets)
    book.prices = lambda endpoint: prices
    alive = [True] * len(pods)
    truth_rj = [Amount()] * 3
    calls: list[_Call] = []
    for _ in range(50):
        pod = rng.randrange(len(pods))
        reserve = wire.Reserve(input_tokens=rng.randint(50, 3000), output_tokens=rng.randint(16, 4096))
        used = (rng.randint(0, reserve.input_tokens), rng.randint(0, reserve.output_tokens))
        calls.append(_Call(pod, pod % 3, reserve, used))
    overshoot = 0
    sent = 0
    held = False
    now = 0.0
    for p in range(len(pods)):
        book.heartbeat(
            "ep", "team", pods[p].job, f"{pods[p].job}-x", now, mode=wire.Mode.LEASE, carried=0, held=[], seen=0
        )
    while now < 60.0 and not all(c.done for c in calls):
        now += rng.uniform(0.05, 1.0)
        for p, pod in enumerate(pods):  # live pods' heartbeats (declaring what they hold)
            if alive[p]:
                s = book.sessions[("team", f"{pod.job}-x")]
                book.heartbeat(
                    "ep",
                    "team",
                    pod.job,
                    f"{pod.job}-x",
                    now,
                    mode=wire.Mode.LEASE,
                    carried=0,
                    held=list(s.leases),
                    seen=s.seq,
                )
        if rng.random() < 0.04:  # a pod dies, holding whatever it holds
            alive[rng.randrange(len(pods))] = False
        for c in calls:
            if c.done:
                continue
            if not alive[c.pod]:
                c.done = True  # its calls in flight are never reported; the others are never made
                continue
            session = f"{pods[c.pod].job}-x"
            if c.waiter is None and rng.random() < 0.5:
                c.waiter = book.enqueue("ep", "team", pods[c.pod].job, session, now, c.reserve)
            elif c.sent_at is not None and now - c.sent_at >= c.duration:
                assert c.waiter is not None and c.waiter.granted is not None
                fails = rng.random() < 0.1  # unknown usage: settled at the worst case
                usage = None if fails else wire.CallUsage(input_tokens=c.used[0], output_tokens=c.used[1])
                book.release("team", session, c.waiter.granted.id, usage)
                if usage is not None and rng.random() < 0.7:  # its result is stored with its usage
                    key = ("team", uids[c.rj])
                    stored[key] = stored.get(key, Amount()) + prices.amount(*c.used)
                c.done = True
        book.expire(now)
        book.grant("ep", now)
        for c in calls:
            w = c.waiter
            held = held or (w is not None and (w.refused is not None or w.note is not None))
            if w is not None and w.refused is not None:
                c.done = True
            elif w is not None and w.granted is not None and c.sent_at is None:
                c.sent_at, c.duration = now, rng.uniform(0.1, 8.0)
                truth_rj[c.rj] = truth_rj[c.rj] + prices.amount(*c.used)  # the endpoint works on it now
                sent += 1
            elif w is not None and w.granted is None and w.refused is None and rng.random() < 0.3:
                w.gone, c.waiter = True, None  # the acquire timed out; it asks again later
        for i, limit in enumerate(job_limits):
            if limit is not None:
                overshoot = max(overshoot, _over(truth_rj[i], limit))
        overshoot = max(overshoot, _over(sum(truth_rj, Amount()), ns_limit))
    return overshoot, sent, held


def _over(spent: Amount, limit: Limit) -> int:
    """By how much ``spent`` passes ``limit``: tokens, or millionths of money."""
    tokens = max(0, spent.tokens - limit.tokens) if limit.tokens is not None else 0
    cost = max(Decimal(0), spent.cost - limit.cost) * 1_000_000 if limit.cost is not None else Decimal(0)
    return max(tokens, int(cost.to_integral_value(rounding="ROUND_CEILING")))


def test_fifty_concurrent_calls_never_overshoot_a_budget_over_many_seeds() -> None:
    results = [_overshoot_run(seed) for seed in range(120)]
    assert [seed for seed, (over, _, _) in enumerate(results) if over] == []
    # Calls were sent (most runs), and in most runs a budget, not the endpoint, held calls back.
    assert sum(1 for _, sent, _ in results if sent >= 5) > len(results) * 3 // 4
    assert sum(1 for _, _, held in results if held) > len(results) // 2


# -- the same against the real broker server and many pods' lease clients -------------------------------


def _dead_http() -> httpx.AsyncClient:
    """A killed pod's connection: nothing it sends arrives (no release, no heartbeat)."""

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("the pod is gone", request=request)

    return httpx.AsyncClient(transport=httpx.MockTransport(refuse))


@pytest.mark.parametrize(("seed", "money"), [(seed, seed % 2 == 1) for seed in range(10)])
async def test_fifty_calls_of_many_pods_through_the_broker_never_overshoot(
    seed: int, money: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """50 concurrent model calls from 10 worker pods of one ResearchJob, over the real broker server
    (aiohttp on loopback, a fake TokenReview) and the workers' LeaseClients, against a budget of N
    tokens (or of money at the endpoint's prices); 3 pods are killed while their calls hold
    reservations. What the endpoint was asked to do never passes the budget."""
    monkeypatch.setattr(wire, "HEARTBEAT_SECONDS", 0.2)
    monkeypatch.setattr(wire, "SESSION_TTL_SECONDS", 1.0)
    monkeypatch.setattr(wire, "QUIET_MARGIN_SECONDS", 0.2)
    rng = random.Random(seed)
    prices = Prices(Decimal("3"), Decimal("15")) if money else FREE
    limit = Limit(cost=Decimal(rng.randint(200, 500)) / 1000) if money else Limit(tokens=rng.randint(15_000, 40_000))
    pods = [PodRef("ns", "rj", f"rj-b{i}", 0, "uid-rj") for i in range(10)]
    ledger = Ledger(lambda rj: Amount())
    b = Book(
        lambda e: pods,
        lambda e: Limits(16),
        started=-100.0,
        ttl=1.0,
        recovery=0.0,
        ledger=ledger,
        budgets=lambda ns, name, uid, now: Budgets((ns, uid), name, job=limit),
        prices=lambda endpoint: prices,
    )
    broker = Broker(b, Authenticator(api_server()))
    broker._check = lambda ident, endpoint, job: None  # type: ignore[method-assign]  # the world is the test's
    runner = web.AppRunner(broker.app(), handler_cancellation=True)  # as the operator serves it
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{list(runner.addresses)[0][1]}"
    ticker = asyncio.create_task(_tick(broker))
    clients = []
    for p in pods:
        ref = EndpointShareRef(configMap="cm", key=p.job, concurrency=0, brokerUrl=url, endpoint="ep")
        c = LeaseClient(ref, ShareLimiter(1, None, None), lambda pod=f"{p.job}-x": token(pod))
        await c.start()
        clients.append(c)
    truth = Amount()  # what the endpoint was asked to do, counted when a call is sent
    outcome = {"settled": 0, "refused": 0, "killed": 0, "lost": 0}
    sending: dict[int, list[asyncio.Task[None]]] = {i: [] for i in range(len(pods))}

    victims: set[int] = set()

    async def one(pod: int) -> None:
        nonlocal truth
        reserve = wire.Reserve(input_tokens=rng.randint(100, 2500), output_tokens=rng.randint(16, 4096))
        used = (rng.randint(0, reserve.input_tokens), rng.randint(0, reserve.output_tokens))
        try:
            async with clients[pod].slot(reserve) as ticket:
                truth = truth + prices.amount(*used)  # sent: the endpoint works on it
                if pod in victims:
                    kill(pod)  # the pod dies while this call holds its reservation
                await asyncio.sleep(rng.uniform(0.0, 0.3))
                ticket.usage = wire.CallUsage(input_tokens=used[0], output_tokens=used[1])
            outcome["settled"] += 1
        except BudgetExceeded:
            outcome["refused"] += 1
        except asyncio.CancelledError:
            outcome["killed"] += 1
        except LeaseLost:
            # A live pod whose heartbeats came late (a loaded machine) lost its session: its call is
            # cut off as a killed pod's is (the model client retries it), and the budget holds the same.
            outcome["lost"] += 1

    def kill(pod: int) -> None:
        """Its heartbeats and releases stop arriving, and its calls stop."""
        victims.discard(pod)
        c = clients[pod]
        c.http = _dead_http()
        if c.loop_task is not None:
            c.loop_task.cancel()
        for t in sending[pod]:
            t.cancel()

    for _ in range(50):
        pod = rng.randrange(len(pods))
        sending[pod].append(asyncio.create_task(one(pod)))
    dead = rng.sample([p for p in sending if sending[p]], 3)
    victims.update(dead)
    await asyncio.wait_for(asyncio.gather(*(t for ts in sending.values() for t in ts)), 60)
    for _ in range(30):  # the dead pods' sessions lapse: their reservations are settled at worst case
        if not ledger.reservations:
            break
        await asyncio.sleep(0.1)
    ticker.cancel()
    for i, c in enumerate(clients):
        if i not in dead:
            await c.close()
    await runner.cleanup()

    assert outcome["settled"] + outcome["refused"] + outcome["killed"] + outcome["lost"] == 50
    assert outcome["killed"] > 0 and outcome["settled"] > 0 and len(victims) < len(dead)  # pods died holding some
    assert limit.admits(truth), (truth, limit)  # overshoot 0
    assert ledger.reservations == {}
    spent = ledger.spent(("ns", "uid-rj"))
    assert truth.within(spent) and limit.admits(spent)  # what the ledger counts covers what was used


async def _tick(broker: Broker) -> None:
    while True:
        await asyncio.sleep(0.1)
        broker.tick_once()


# -- the worker's side: what a model call reserves, and what it settles ---------------------------------


def test_the_prompt_bound_is_above_what_a_tokenizer_counts() -> None:
    messages = [
        SystemMessage(content="You are an expert on queues. Answer with sources."),
        HumanMessage(content="Wie lässt Kueue einen Job zu? 日本語のテキスト、絵文字 🚀🚀 and code: f(x)=x**2;"),
        AIMessage(content="It admits a workload when its quota fits. " * 50),
    ]
    wire_messages = [{"role": m.type, "content": str(m.content)} for m in messages]
    assert prompt_bound(messages) >= count_message_tokens(wire_messages)
    schema = '{"type": "object", "properties": {"query": {"type": "string", "maxLength": 400}}}'
    assert prompt_bound(messages, schema) >= count_message_tokens(wire_messages, [schema])


async def _worker_against_a_broker(limit: Limit, answer: httpx.Response) -> tuple[Ledger, Any, list[Any]]:
    """One chat call of a worker whose pod takes leases from a served broker (with a ledger and the
    ResearchJob's budget ``limit``); the model endpoint answers ``answer``. Returns the ledger, the
    call's result or exception, and the requests the endpoint got."""
    pods = [PodRef("ns", "rj", "rj-b0", 1, "uid-rj")]
    ledger = Ledger(lambda rj: Amount())
    book = Book(
        lambda e: pods,
        lambda e: Limits(4),
        started=-100.0,
        ledger=ledger,
        budgets=lambda ns, name, uid, now: Budgets((ns, uid), name, job=limit),
    )
    broker = Broker(book, Authenticator(api_server()))
    broker._check = lambda ident, endpoint, job: None  # type: ignore[method-assign]  # the world is the test's
    runner = web.AppRunner(broker.app(), handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{list(runner.addresses)[0][1]}"
    sent: list[Any] = []

    def endpoint(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return answer

    settings = ModelSettings(name="m", base_url="http://llm.test/v1", max_retries=0, max_output_tokens=300)
    llm = LLMClient(
        settings, SecretStr("k"), http_async_client=httpx.AsyncClient(transport=httpx.MockTransport(endpoint))
    )
    ref = EndpointShareRef(configMap="cm", key="rj-b0", concurrency=1, brokerUrl=url, endpoint="ep")
    llm.leases = LeaseClient(ref, ShareLimiter(1, None, None), lambda: token("rj-b0-x"))
    await llm.leases.start()
    result: Any
    try:
        result = await llm.chat([HumanMessage(content="How does Kueue admit a Job?")])
    except Exception as exc:  # noqa: BLE001 - the test looks at what the worker raised
        result = exc
    await llm.leases.close()
    await runner.cleanup()
    return ledger, result, sent


def _answer(usage: dict[str, int] | None, status: int = 200) -> httpx.Response:
    body: dict[str, Any] = {
        "id": "c",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}],
    }
    if usage is not None:
        body["usage"] = usage
    if status != 200:
        body = {"error": {"message": "unsupported parameter", "type": "invalid_request_error"}}
    return httpx.Response(status, json=body)


async def test_a_calls_reservation_is_settled_to_the_usage_the_endpoint_reported() -> None:
    usage = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    ledger, result, sent = await _worker_against_a_broker(Limit(tokens=10_000), _answer(usage))
    assert len(sent) == 1 and result[1].total_tokens == 18
    assert ledger.spent(("ns", "uid-rj")) == Amount(18) and ledger.reservations == {}


async def test_an_answer_without_usage_is_settled_at_the_worst_case_and_a_refused_request_at_nothing() -> None:
    ledger, _, _ = await _worker_against_a_broker(Limit(tokens=10_000), _answer(None))
    spent = ledger.spent(("ns", "uid-rj")).tokens
    assert spent > 300  # the prompt bound and maxOutputTokens (300): the endpoint said nothing
    ledger, result, sent = await _worker_against_a_broker(Limit(tokens=10_000), _answer(None, status=400))
    assert len(sent) == 1 and "refused the request with HTTP 400" in str(result)
    assert ledger.spent(("ns", "uid-rj")) == Amount()


async def test_a_call_the_researchjobs_budget_cannot_pay_is_never_sent_and_fails_the_step() -> None:
    _, result, sent = await _worker_against_a_broker(Limit(tokens=200), _answer({"prompt_tokens": 1}))
    assert sent == []  # the endpoint never saw it
    assert isinstance(result, BudgetExceeded) and result.exit_code == EXIT_BUDGET
    assert "the budget of ResearchJob ns/rj (spec.budget) cannot pay the next model call: 0 of 200 tokens" in str(
        result
    )


# -- money: prices, money budgets, status ------------------------------------------------------------


def test_an_endpoint_declares_its_prices_and_a_namespace_budget_may_be_in_money() -> None:
    endpoint = ep.endpoint_from(
        {
            "metadata": {"name": "gpt"},
            "spec": {
                "baseUrl": "https://api.example.com/v1",
                "maxConcurrentRequests": 4,
                "prices": {"inputPerMillion": "2.50", "outputPerMillion": "10"},
            },
        }
    )
    assert endpoint is not None and endpoint.prices == Prices(Decimal("2.50"), Decimal("10"))
    budgets = ep.parse_budgets(
        '{"a": {"tokens": 5000, "period": "1h"}, "b": {"cost": "25.00", "period": "7d"},'
        ' "c": {"tokens": 100000, "cost": "3"}}'
    )
    assert budgets["a"] == ep.TokenBudget(5000, "1h")  # the existing format, unchanged
    assert budgets["b"] == ep.TokenBudget(None, "7d", Decimal("25.00"))
    assert budgets["c"] == ep.TokenBudget(100000, "24h", Decimal("3"))
    assert [ep.describe_budget(budgets[n]) for n in "abc"] == ["5000/1h", "cost 25.00/7d", "100000,cost 3/24h"]
    for bad in ('{"x": {"period": "1h"}}', '{"x": {"cost": "lots"}}', '{"x": {"cost": "-1"}}'):
        with pytest.raises(ValueError, match=r"namespaceTokenBudgets\[x\]"):
            ep.parse_budgets(bad)
    assert ep.spec_limit({"maxTokens": 20000, "maxCost": "1.5"}) == Limit(20000, Decimal("1.5"))
    assert ep.spec_limit({"deadlineSeconds": 600}) is None


def test_a_namespace_money_budget_holds_its_worker_jobs_and_says_what_was_spent() -> None:
    spent = BudgetVerdict("team", None, 90_000, "7d", "2026-12-14T00:00:00Z", Decimal("25"), Decimal("25.0012"))
    assert spent.exhausted
    assert spent.message == (
        "namespace team spent 25.0012 of 25 in cost per 7d; no new worker Job starts before the period rolls over "
        "at 2026-12-14T00:00:00Z"
    )
    short = BudgetVerdict("team", 100_000, 90_000, "24h", "2026-12-07T00:00:00Z", short=Amount(12_000))
    assert short.exhausted and "(a model call waits that may use up to 12000 tokens)" in short.message
    assert not BudgetVerdict("team", 100_000, 90_000, "24h", "2026-12-07T00:00:00Z").exhausted


def test_status_shows_tokens_and_cost_per_researchjob_and_per_step() -> None:
    pid = plan_id(None)
    steps = [
        StepTokens("interview", 1, 3000, 1000, 4000),
        StepTokens("plan", None, 800, 200, 1000),
        StepTokens("interview", 0, 2000, 500, 2500),
    ]
    store = StoreView(tokens=7500, input_tokens=5800, output_tokens=1700, steps={pid: steps})
    obs = Observed(1, T0, T0, [], store, ResearchJobStatus(), prices=Prices(Decimal("2.50"), Decimal("10")))
    st = decide(SPEC, obs).status
    assert st.tokens_used == 7500 and st.cost == "0.0315"  # 5800 x 2.50 + 1700 x 10, per million
    assert [(u.step, u.analyst, u.tokens, u.cost) for u in st.usage or []] == [
        ("plan", None, 1000, "0.004"),
        ("interview", 0, 2500, "0.01"),
        ("interview", 1, 4000, "0.0175"),
    ]
    free = decide(SPEC, replace(obs, prices=None)).status
    assert free.cost is None and [u.cost for u in free.usage or []] == [None, None, None]


# -- the model gateway forwards only what a reservation covers --------------------------------------------


@pytest.mark.parametrize("method", list(StructuredOutput))
async def test_the_gateway_forwards_a_budgeted_pods_calls_only_under_a_lease_that_covers_them(
    monkeypatch: pytest.MonkeyPatch, method: StructuredOutput
) -> None:
    """A worker of a ResearchJob with a budget calls an admin endpoint through the gateway: its chat and
    structured calls (each way of asking for structure) name their lease and fit its reservation, so
    they are forwarded; a request that names no lease, or asks for more than its lease reserved (a
    modified worker calling the gateway directly), is refused before it reaches the endpoint."""
    seen: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        if body.get("tools"):
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {
                            "name": body["tools"][0]["function"]["name"],
                            "arguments": '{"search_query": "kueue"}',
                        },
                    }
                ],
            }
        else:
            message = {"role": "assistant", "content": '{"search_query": "kueue"}'}
        usage = {"prompt_tokens": 40, "completion_tokens": 9, "total_tokens": 49}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return web.json_response(
            {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [choice], "usage": usage}
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    model_runner = web.AppRunner(app)
    await model_runner.setup()
    await web.TCPSite(model_runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{list(model_runner.addresses)[0][1]}/v1"

    endpoint = ep.Endpoint("team-llm", base, 4, namespace_selector=NamespaceSelector())
    monkeypatch.setattr(WORLD, "endpoint_index", {"team-llm": [endpoint]})
    monkeypatch.setattr(WORLD, "job_index", {})
    monkeypatch.setattr(WORLD, "namespace_labels", {"ns": (1e18, {})})
    monkeypatch.setattr(broker_module, "names_endpoint", lambda ident, name: True)
    monkeypatch.setattr(broker_module, "worker_of", lambda ident, name: (("ns", "uid-rj"), "rj"))
    pods = [PodRef("ns", "rj", "rj-b0", 1, "uid-rj")]
    ledger = Ledger(lambda rj: Amount())
    book = Book(
        lambda e: pods,
        lambda e: Limits(4),
        started=-100.0,
        ledger=ledger,
        budgets=lambda ns, name, uid, now: Budgets((ns, uid), name, job=Limit(tokens=100_000)),
    )
    broker = Broker(book, Authenticator(api_server()))
    broker._check = lambda ident, endpoint, job: None  # type: ignore[method-assign]  # the world is the test's
    runner = web.AppRunner(broker.app(), handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{list(runner.addresses)[0][1]}"
    settings = ModelSettings(
        name="m",
        base_url=wire.gateway_url(url, "team-llm"),
        gateway=True,
        max_retries=0,
        max_output_tokens=300,
        structured_output=method,
    )
    llm = LLMClient(settings, SecretStr(token("rj-b0-x")))
    ref = EndpointShareRef(configMap="cm", key="rj-b0", concurrency=1, brokerUrl=url, endpoint="team-llm")
    llm.leases = LeaseClient(ref, ShareLimiter(1, None, None), lambda: token("rj-b0-x"))
    await llm.leases.start()
    try:
        _, usage = await llm.chat([SystemMessage(content="Be brief."), HumanMessage(content="What is Kueue?")])
        query, _ = await llm.structured(SearchQuery, [HumanMessage(content="Ask about Kueue " + "ü" * 500)])
        assert usage.total_tokens == 49 and query.search_query == "kueue" and len(seen) == 2
        assert ledger.spent(("ns", "uid-rj")) == Amount(98)  # both settled to what the endpoint reported
        async with httpx.AsyncClient() as http:
            direct = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5}
            bare = await http.post(
                f"{settings.base_url}/chat/completions",
                json=direct,
                headers={"Authorization": f"Bearer {token('rj-b0-x')}"},
            )
            assert bare.status_code == 403 and wire.LEASE_HEADER in bare.json()["error"]["message"]
            async with llm.leases.slot(wire.Reserve(input_tokens=100, output_tokens=10)) as ticket:
                big = await http.post(
                    f"{settings.base_url}/chat/completions",
                    json={**direct, "max_completion_tokens": 4096},
                    headers={"Authorization": f"Bearer {token('rj-b0-x')}", wire.LEASE_HEADER: str(ticket.lease)},
                )
                ticket.usage = wire.CallUsage()
            assert (
                big.status_code == 403 and "larger than the reservation of its lease" in big.json()["error"]["message"]
            )
        assert len(seen) == 2  # neither reached the endpoint
    finally:
        await llm.leases.close()
        if broker.session is not None:
            await broker.session.close()
        await runner.cleanup()
        await model_runner.cleanup()


def test_a_restarted_broker_counts_what_live_pods_spent_and_did_not_store_yet() -> None:
    """The operator restarts mid-interview: the new broker knows only the stored usage; each live pod
    declares, once, what its calls used that it has not stored (an interview in progress), so the
    budget still sees it (a restart loses nothing of what was spent)."""
    table: dict[RjKey, Amount] = {("team", "uid-a"): Amount(1000)}  # the plan, stored
    ledger = stored_of(table)
    book = Book(
        lambda e: [PodRef("team", "a", "a-b0", 0, "uid-a")],
        lambda e: Limits(8),
        started=0.0,
        ledger=ledger,
        budgets=lambda ns, name, uid, now: Budgets((ns, uid), name, job=Limit(tokens=5000)),
    )
    unstored = wire.CallUsage(input_tokens=1500, output_tokens=500)
    for t in (1.0, 3.0):  # declared once, however many heartbeats say it during the recovery
        book.heartbeat(
            "ep", "team", "a-b0", "a-b0-x", t, mode=wire.Mode.LEASE, carried=0, held=[], seen=0, unstored=unstored
        )
    assert ledger.spent(("team", "uid-a")) == Amount(3000)
    table[("team", "uid-a")] = Amount(3000)  # the section is stored with that usage: counted once
    assert ledger.spent(("team", "uid-a")) == Amount(3000)
    after = book.recovery + 1
    book.heartbeat("ep", "team", "a-b0", "a-b0-x", after - 1, mode=wire.Mode.LEASE, carried=0, held=[], seen=0)
    w = book.enqueue("ep", "team", "a-b0", "a-b0-x", after, wire.Reserve(input_tokens=1000, output_tokens=1000))
    more = book.enqueue("ep", "team", "a-b0", "a-b0-x", after, wire.Reserve(input_tokens=0, output_tokens=1))
    book.grant("ep", after)
    assert w.granted is not None  # 3000 spent + 2000 reserved: exactly the budget
    assert more.granted is None and more.note is not None and "2000 tokens reserved" in more.note.message


async def test_a_worker_declares_what_it_used_and_has_not_stored_yet() -> None:
    usage = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    http = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: _answer(usage)))
    llm = LLMClient(ModelSettings(name="m", base_url="http://llm.test/v1"), SecretStr("k"), http_async_client=http)
    _, first = await llm.chat([HumanMessage(content="one")])
    await llm.chat([HumanMessage(content="two")])
    assert llm.unstored() == wire.CallUsage(input_tokens=22, output_tokens=14)
    llm.stored(first)  # the section holding the first call's usage is stored
    assert llm.unstored() == wire.CallUsage(input_tokens=11, output_tokens=7)
    ref = EndpointShareRef(configMap="cm", key="a-b0", concurrency=1, brokerUrl="http://127.0.0.1:9", endpoint="ep")
    leases = LeaseClient(ref, ShareLimiter(1, None, None), lambda: token())
    leases.unstored = llm.unstored
    sent: list[dict[str, Any]] = []

    def broker(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(200, json={})

    leases.http = httpx.AsyncClient(transport=httpx.MockTransport(broker))
    await leases._beat()
    assert wire.Heartbeat.model_validate(sent[0]).unstored == wire.CallUsage(input_tokens=11, output_tokens=7)
