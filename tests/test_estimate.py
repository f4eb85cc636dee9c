"""The estimate of a ResearchJob before it spends (research_api.estimate): its arithmetic, the
operator's ceiling decision, ``kubectl research submit --estimate``, and the estimate against what the
research assistant really spends on a corpus with the offline model."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from offline_model.launcher import ModelServerProcess
from research_api.estimate import ANSWERS, Corpus, count_tokens, estimate
from research_api.modelendpoint import Prices
from research_api.researchjob import EstimateStatus, Phase, ResearchJobSpec, ResearchJobStatus
from research_api.task import ResearchTask
from research_cli import progress
from research_operator.actions.estimating import estimate_of
from research_operator.decisions import endpoints as ep
from research_operator.decisions.ledger import Prices as LedgerPrices
from research_operator.decisions.reconcile import (
    ESTIMATE_RECHECK,
    CeilingReason,
    Estimated,
    JobView,
    Observed,
    StoreView,
    Waiting,
    decide,
    has_started,
)
from research_operator.decisions.status import apply_waiting
from research_worker import steps
from research_worker.search import DocumentsBackend, read_folder

CORPORA = Path(__file__).parent / "corpora"
PLUGIN = Path(sys.executable).parent / "kubectl-research"
T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def corpus(name: str) -> dict[str, str]:
    return read_folder(CORPORA / name / "docs")


def topic(name: str) -> str:
    return (CORPORA / name / "topic.txt").read_text().strip()


def spec(**over: Any) -> ResearchJobSpec:
    base: dict[str, Any] = {
        "topic": topic("miso"),
        "analysts": {"count": 3},
        "sources": [{"type": "documents", "configMap": "miso-documents"}],
    }
    base.update(over)
    return ResearchJobSpec.model_validate(base)


# -- the arithmetic --------------------------------------------------------------------------------


def test_the_calls_are_those_the_worker_makes() -> None:
    """A plan, then per analyst and turn a question, a query and an answer, then a section; then the
    body, introduction and conclusion of the report."""
    for analysts, turns in ((1, 1), (3, 2), (5, 4)):
        e = estimate(spec(analysts={"count": analysts}, interview={"maxTurns": turns}), corpus("miso"))
        assert e.calls == 1 + analysts * (3 * turns + 1) + 3
        assert [(s.step, s.calls) for s in e.steps or []] == [
            ("plan", 1),
            ("interview", analysts * (3 * turns + 1)),
            ("write", 3),
        ]
        assert e.tokens == e.input_tokens + e.output_tokens
        assert e.input_tokens == sum(s.input_tokens for s in e.steps or [])


def test_more_analysts_turns_results_and_documents_cost_more() -> None:
    base = estimate(spec(), corpus("miso")).tokens
    assert estimate(spec(analysts={"count": 6}), corpus("miso")).tokens > base
    assert estimate(spec(interview={"maxTurns": 4}), corpus("miso")).tokens > base
    more_results = [{"type": "documents", "configMap": "m", "maxResults": 6}]
    assert estimate(spec(sources=more_results), corpus("miso")).tokens > base
    doubled = {**corpus("miso"), **{f"copy-{k}": v for k, v in corpus("stained-glass").items()}}
    assert estimate(spec(), doubled).tokens > base


def test_the_answers_are_bounded_by_max_output_tokens() -> None:
    e = estimate(spec(model={"maxOutputTokens": 16}), corpus("miso"))
    queries = 3 * 2  # analysts x turns: a search query (15 tokens) is the one answer assumed shorter
    assert e.output_tokens == 16 * (e.calls - queries) + queries * ANSWERS.query
    assert e.tokens < estimate(spec(), corpus("miso")).tokens


def test_the_passages_are_the_workers() -> None:
    for name in ("miso", "stained-glass", "roman-aqueducts"):
        docs = corpus(name)
        c = Corpus.of(docs)
        backend = DocumentsBackend(docs)
        assert c.documents == len(docs) and len(c.passages) == len(backend.passages)
        assert c.passages == [
            count_tokens(f"{p.title}\n{p.content}" if p.title else p.content) for p in backend.passages
        ]


def test_cost_is_exact_at_the_endpoints_prices_and_unknown_without_them() -> None:
    e = estimate(spec(), corpus("miso"), Prices(input_per_million="2.50", output_per_million="10"))
    expected = (e.input_tokens * Decimal("2.50") + e.output_tokens * Decimal(10)) / Decimal(1_000_000)
    assert Decimal(e.cost or "") == expected.quantize(Decimal("0.000001"))
    assert estimate(spec(), corpus("miso")).cost is None


def test_what_cannot_be_counted_is_said() -> None:
    unknown = estimate(spec(), None)
    assert "documents unknown" in unknown.basis
    assert unknown.calls == 1, "a documents source without documents: nothing to search, no interviews"
    web = estimate(spec(sources=[{"type": "wikipedia", "maxResults": 2}]), None)
    assert web.calls == 1 + 3 * 7 + 3 and "500 tokens (wikipedia)" in web.basis
    floor = estimate(spec(quality={"minCitationAccuracy": 90}), corpus("miso"))
    assert "rewrites below the quality floor not counted" in floor.basis
    review = estimate(spec(analysts={"count": 3, "review": True}), corpus("miso"))
    assert review.basis == "7 documents, 7 passages; plans again after review feedback not counted"


def test_the_persona_assumed_is_what_the_plan_writes_for_it() -> None:
    # the persona shown to the interview prompts is the plan's JSON without its keys and punctuation
    assert ANSWERS.persona < ANSWERS.analysts_json(1) < ANSWERS.analysts_json(2)


# -- the ceiling: the operator's decision ----------------------------------------------------------


def figures(tokens: int, cost: str | None = None) -> EstimateStatus:
    return EstimateStatus(calls=25, input_tokens=tokens - 1000, output_tokens=1000, tokens=tokens, cost=cost)


def observe(
    est: Estimated | None, prev: ResearchJobStatus | None = None, jobs: list[JobView] | None = None
) -> Observed:
    return Observed(
        generation=1,
        created=T0,
        now=T0,
        jobs=jobs or [],
        store=StoreView(),
        previous=prev or ResearchJobStatus(),
        estimate=est,
    )


def conditions(d: Any) -> dict[str, tuple[str, str, str]]:
    return {c.type: (c.status, c.reason, c.message) for c in d.status.conditions or []}


def test_a_job_over_its_token_ceiling_waits_in_pending_with_the_figures() -> None:
    d = decide(spec(budget={"maxEstimatedTokens": 20000}), observe(Estimated(figures(25845))))
    assert d.status.phase == Phase.Pending and not d.create_plan
    assert d.status.waiting_for == "EstimateExceedsCeiling"
    assert d.status.estimate is not None and d.status.estimate.tokens == 25845
    status, reason, message = conditions(d)["EstimateAboveCeiling"]
    assert (status, reason) == ("True", "EstimateExceedsCeiling")
    assert "25845 tokens" in message and "maxEstimatedTokens 20000" in message
    assert ("Warning", "EstimateExceedsCeiling", message) in d.notices
    assert conditions(d)["Failed"][0] == "False", "held, not failed: raise the ceiling and it starts"
    # apply_waiting (admission found nothing to wait for) keeps what decide() said
    apply_waiting(d.status, ResearchJobStatus(), Waiting(), 1, T0)
    assert d.status.waiting_for == "EstimateExceedsCeiling"

    # kubectl research watch and top say why it waits, in the operator's words
    obj = {"metadata": {"name": "miso"}, "spec": {}, "status": d.status.wire()}
    assert progress.waiting_for(obj) == f"EstimateAboveCeiling: {message}"

    # the next pass: the same message posts no second Event
    again = decide(spec(budget={"maxEstimatedTokens": 20000}), observe(Estimated(figures(25845)), prev=d.status))
    assert again.status.phase == Phase.Pending and not again.notices

    # the ceiling raised: it plans, and the estimate stays in status
    raised = decide(spec(budget={"maxEstimatedTokens": 30000}), observe(Estimated(figures(25845)), prev=d.status))
    assert raised.status.phase == Phase.Planning and raised.create_plan and raised.status.waiting_for is None
    assert conditions(raised)["EstimateAboveCeiling"][:2] == ("False", "WithinCeiling")


def test_a_cost_ceiling_compares_money_and_needs_prices() -> None:
    budget = {"maxEstimatedCost": "0.05"}
    over = decide(spec(budget=budget), observe(Estimated(figures(25845, cost="0.0646"), endpoint="gpt")))
    assert over.status.phase == Phase.Pending and over.status.waiting_for == "EstimateExceedsCeiling"
    assert "estimated cost 0.0646" in (over.status.message or "")
    under = decide(spec(budget=budget), observe(Estimated(figures(25845, cost="0.049"), endpoint="gpt")))
    assert under.create_plan
    unknown = decide(spec(budget=budget), observe(Estimated(figures(25845), endpoint="gpt")))
    assert unknown.status.waiting_for == CeilingReason.UNKNOWN.value and not unknown.create_plan
    assert "ModelEndpoint gpt has no prices" in (unknown.status.message or "")
    assert unknown.wake_at == T0 + ESTIMATE_RECHECK


def test_without_documents_to_estimate_from_a_job_with_a_ceiling_waits_and_one_without_starts() -> None:
    missing = Estimated(None, 'spec.sources[0]: ConfigMap "miso-documents" does not exist')
    held = decide(spec(budget={"maxEstimatedTokens": 20000}), observe(missing))
    assert held.status.phase == Phase.Pending and held.status.waiting_for == "EstimateUnknown"
    assert 'ConfigMap "miso-documents" does not exist' in (held.status.message or "")
    assert decide(spec(), observe(missing)).create_plan


def test_once_started_the_estimate_is_kept_and_the_ceiling_no_longer_applies() -> None:
    prev = ResearchJobStatus(phase=Phase.Planning, estimate=figures(25845))
    planner = JobView("rj-plan", "plan", "p")
    assert has_started(prev, 1, 0) and has_started(ResearchJobStatus(), 1, 0) and has_started(ResearchJobStatus(), 0, 1)
    assert not has_started(ResearchJobStatus(), 0, 0)
    d = decide(spec(budget={"maxEstimatedTokens": 20000}), observe(None, prev=prev, jobs=[planner]))
    assert d.status.phase == Phase.Planning and d.status.estimate == prev.estimate
    assert conditions(d)["EstimateAboveCeiling"][0] == "False"


async def test_the_operator_estimates_from_the_documents_configmaps_at_the_endpoints_prices() -> None:
    docs = corpus("miso")
    read: list[tuple[str, str]] = []

    async def read_configmap(namespace: str, name: str) -> dict[str, str] | None:
        read.append((namespace, name))
        return docs if name == "miso-documents" else None

    endpoint = ep.Endpoint(
        name="gpt",
        base_url="https://llm.example/v1",
        max_concurrent=4,
        prices=LedgerPrices(Decimal("2.5"), Decimal("10")),
    )
    s = spec(model={"endpoint": "gpt"})
    got = await estimate_of("team-a", s, read_configmap, {"gpt": endpoint}, "http://offline/v1")
    assert read == [("team-a", "miso-documents")]
    assert got.figures == estimate(s, docs, Prices(input_per_million="2.5", output_per_million="10"))
    assert got.endpoint == "gpt" and got.figures is not None and got.figures.cost is not None

    gone = await estimate_of("team-a", spec(sources=[{"type": "documents", "configMap": "x"}]), read_configmap, {}, "")
    assert gone.figures is None and 'ConfigMap "x" does not exist' in gone.problem


# -- kubectl research submit --estimate ------------------------------------------------------------


def plugin(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": "/nonexistent/kubeconfig"}
    return subprocess.run([str(PLUGIN), *args], capture_output=True, text=True, timeout=60, env=env)


def test_submit_estimate_prints_the_figures_and_creates_nothing() -> None:
    args = ["submit", "miso", "--topic", topic("miso"), "--documents", str(CORPORA / "miso" / "docs"), "--estimate"]
    expected = estimate(spec(sources=[{"type": "documents", "configMap": "miso-documents"}]), corpus("miso"))
    out = plugin(*args, "-o", "json")
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["researchJob"] == "default/miso"
    assert (body["calls"], body["tokens"]) == (expected.calls, expected.tokens)
    assert [s["step"] for s in body["steps"]] == ["plan", "interview", "write"]
    assert "cost" not in body and body["costBasis"].startswith("cost unknown: the job names no ModelEndpoint")

    table = plugin(*args, "--analysts", "5", "--endpoint", "gpt")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == "estimate of researchjob/miso (nothing was created)"
    assert lines[1].split() == ["STEP", "CALLS", "PROMPT", "COMPLETION", "TOKENS"]
    five = estimate(spec(analysts={"count": 5}, model={"endpoint": "gpt"}), corpus("miso"))
    assert lines[5].split() == [
        "total",
        str(five.calls),
        str(five.input_tokens),
        str(five.output_tokens),
        str(five.tokens),
    ]
    assert 'cost unknown: ModelEndpoint "gpt" cannot be read without a cluster' in table.stdout
    assert "basis: 7 documents, 7 passages" in table.stdout

    bad = plugin(*args, "--wait")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --estimate creates nothing")
    cm = plugin("submit", "x", "--topic", "abc def", "--documents-configmap", "corpus", "--estimate")
    assert cm.returncode == 1 and "--documents-configmap corpus: the estimate needs to read it" in cm.stderr


# -- against the real thing ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["miso", "polynesian-wayfinding"])
def test_the_estimate_is_within_25_percent_of_what_the_research_assistant_spends(
    name: str, modelserver: ModelServerProcess
) -> None:
    """The whole research assistant over a corpus with the offline model (bench/estimate_bench.py runs
    every corpus): the tokens it spends are within 25% of the estimate made before."""
    s = spec(topic=topic(name), analysts={"count": 4})
    predicted = estimate(s, corpus(name))
    task = ResearchTask.model_validate(
        {
            "job": {"namespace": "t", "name": "rj", "uid": str(uuid.uuid4())},
            "topic": s.topic,
            "maxAnalysts": 4,
            "maxTurns": s.interview.max_turns,
            "model": {"baseUrl": modelserver.base_url, "maxOutputTokens": s.model.max_output_tokens},
            "sources": [{"type": "documents", "path": str(CORPORA / name / "docs")}],
        }
    )

    async def spend() -> tuple[int, int]:
        rt = await steps.prepare(task)
        await steps.run(rt)
        return rt.llm.usage.total_tokens, rt.llm.usage.calls

    real, calls = asyncio.run(spend())
    assert calls == predicted.calls
    assert abs(predicted.tokens - real) <= 0.25 * real, f"estimated {predicted.tokens}, spent {real}"
