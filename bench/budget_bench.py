"""Budgets: what a model call reserves against what it uses, and post-hoc counting against
reserve-then-settle under concurrency.

    .venv/bin/python bench/budget_bench.py [--corpora alpine-glaciers miso stained-glass] [--analysts 4]
        [--concurrency 8] [--budget-calls 20] [--seeds 200]

1. *Reservations against usage.* For each corpus (tests/corpora), the whole research assistant runs
   in this process (``research_worker.steps.run``, the documents source) against the offline model
   server, and every model call's reservation (the prompt bound of ``research_api.leases.prompt_bound``
   and ``maxOutputTokens``, 4096 as the CRD's default) is recorded with the usage the server reported.
2. *Overshoot.* The recorded calls, drawn at random, are made ``--concurrency`` at a time against a
   budget of ``--budget-calls`` times the mean real call, over ``--seeds`` seeds: once counted after
   each call returns (a call starts while what was spent is below the budget: the rule before issue
   24), once with ``research_operator.decisions.ledger`` (a call starts only if its worst case fits what is
   neither spent nor reserved). It reports the overshoot of the first and, for the second, how much
   of the budget was spent when no further call could start (what never overshooting costs).

Loopback only; no cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import random
import statistics
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from offline_model.launcher import ModelServerProcess
from research_api import leases as wire
from research_api.task import ResearchTask
from research_operator.decisions.ledger import Amount, Budgets, Decision, Ledger, Limit, Prices, Reservation
from research_worker import steps
from research_worker.leases import Ticket
from research_worker.llm import LLMClient

REPO = Path(__file__).resolve().parents[1]
CORPORA = REPO / "tests" / "corpora"
MAX_OUTPUT_TOKENS = 4096  # the ResearchJob CRD's default spec.model.maxOutputTokens

Call = tuple[int, int, int, int]  # reserved input, reserved output, used input, used output


async def record(corpus: str, analysts: int, server: ModelServerProcess) -> list[Call]:
    """Run the research assistant over ``corpus``; each call's reservation and usage."""
    folder = CORPORA / corpus
    task = ResearchTask.model_validate(
        {
            "job": {"namespace": "bench", "name": f"rj-{corpus}", "uid": str(uuid.uuid4())},
            "topic": (folder / "topic.txt").read_text().strip(),
            "maxAnalysts": analysts,
            "maxTurns": 2,
            "model": {
                "name": "offline-research-1",
                "baseUrl": server.base_url,
                "maxConcurrency": 4,
                "maxOutputTokens": MAX_OUTPUT_TOKENS,
            },
            "sources": [{"type": "documents", "path": str(folder / "docs")}],
        }
    )
    calls: list[Call] = []
    original = LLMClient._slot

    @contextlib.asynccontextmanager
    async def recording(self: LLMClient, reserve: wire.Reserve) -> AsyncIterator[Ticket]:
        async with original(self, reserve) as ticket:
            yield ticket
        if ticket.usage is not None:
            calls.append(
                (reserve.input_tokens, reserve.output_tokens, ticket.usage.input_tokens, ticket.usage.output_tokens)
            )

    LLMClient._slot = recording  # type: ignore[method-assign]
    try:
        rt = await steps.prepare(task)
        await steps.run(rt)
    finally:
        LLMClient._slot = original  # type: ignore[method-assign]
    return calls


def overshoot_run(
    calls: list[Call], budget: int, concurrency: int, seed: int, reserve: bool, output_bound: int
) -> tuple[int, int]:
    """Calls drawn from ``calls`` made ``concurrency`` at a time until none may start, each reserving
    ``output_bound`` for its answer; (spent, calls made)."""
    rng = random.Random(seed)
    rj = ("bench", "rj")
    ledger = Ledger(lambda key: Amount())
    budgets = Budgets(rj, "rj", job=Limit(tokens=budget))
    spent, made, now, n = 0, 0, 0.0, 0
    running: list[tuple[float, int, str, int]] = []  # (ends at, order, reservation id, tokens used)
    while True:
        while len(running) < concurrency:
            c = rng.choice(calls)
            used = c[2] + c[3]
            if reserve:
                r = Reservation(str(n), rj, Amount(c[0] + output_bound), Prices(), c[0], output_bound)
                if ledger.check(budgets, r).decision != Decision.GRANT:
                    break
                ledger.reserve(r)
            elif spent >= budget:
                break
            n += 1
            made += 1
            heapq.heappush(running, (now + rng.uniform(0.5, 3.0), n, str(n - 1), used))
        if not running:
            return spent, made
        now, _, rid, used = heapq.heappop(running)
        spent += used
        if reserve:
            ledger.settle(rid, used, 0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpora", nargs="+", default=["alpine-glaciers", "miso", "stained-glass"])
    p.add_argument("--analysts", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--budget-calls", type=int, default=20)
    p.add_argument("--seeds", type=int, default=200)
    p.add_argument(
        "--output-bounds", type=int, nargs="+", default=[4096, 1024, 512], help="maxOutputTokens to reserve with"
    )
    args = p.parse_args()
    calls: list[Call] = []
    with tempfile.TemporaryDirectory(), ModelServerProcess(log_level="warning", max_concurrency=64) as server:
        print("| corpus | calls | prompt reserved / used | output reserved / used | worst case / used |")
        print("|---|---:|---:|---:|---:|")
        for corpus in args.corpora:
            got = asyncio.run(record(corpus, args.analysts, server))
            calls += got
            ri, ro, ui, uo = (sum(c[i] for c in got) for i in range(4))
            print(
                f"| {corpus} | {len(got)} | {ri / len(got):.0f} / {ui / len(got):.0f} ({ri / ui:.1f}x) "
                f"| {ro / len(got):.0f} / {uo / len(got):.0f} ({ro / uo:.1f}x) | {(ri + ro) / (ui + uo):.1f}x |"
            )
    mean_call = statistics.mean(c[2] + c[3] for c in calls)
    budget = int(args.budget_calls * mean_call)
    print(
        f"\nbudget {budget} tokens ({args.budget_calls} mean calls of {mean_call:.0f}), "
        f"{args.concurrency} calls at a time, {args.seeds} seeds"
    )
    print("| counting | overshoot: mean / max (% of the budget) | spent when stopped: mean / min (% of the budget) |")
    print("|---|---:|---:|")
    top = max(c[3] for c in calls)
    for reserve, bound in [(False, MAX_OUTPUT_TOKENS), *((True, b) for b in args.output_bounds if b >= top)]:
        spent = [overshoot_run(calls, budget, args.concurrency, s, reserve, bound)[0] for s in range(args.seeds)]
        over = [max(0, x - budget) / budget * 100 for x in spent]
        used = [x / budget * 100 for x in spent]
        name = f"reserve, then settle (maxOutputTokens {bound})" if reserve else "after each call (before)"
        print(
            f"| {name} | {statistics.mean(over):.1f} / {max(over):.1f} "
            f"| {statistics.mean(used):.1f} / {min(used):.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
