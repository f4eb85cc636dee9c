"""What checking a report's citations and coverage costs per ResearchJob.

    .venv/bin/python bench/quality_bench.py [--corpora swarm-nest-site,roman-aqueducts,...] [--analysts 4]
    PYTHONPATH=. .venv/bin/python bench/quality_bench.py --llamacpp roman-aqueducts   # a real model (slow)

For each corpus of tests/corpora, the whole ``research-worker run`` (documents only) runs in this process
against the offline model server, four times:

* ``plain``: the model writes honestly, no quality floor (what every ResearchJob now pays);
* ``floor``: the same with ``minCitationAccuracy: 100`` (nothing is written again: every sentence holds);
* ``invented``: the server's fault injection gives every writing one invented cited sentence, no floor;
* ``invented+floor``: the same with the floor: each writer runs once more with its failures as feedback.

It reports the wall time of the run, the time spent checking citations (research_worker.grounding.check)
and finding and assigning the relevant documents (research_worker.coverage), the tokens of the run and the
sentences checked. The checking itself calls no model: its token cost is that of the writings a floor makes
the writers do again. Then, for each honest report, its body's citations are each moved to another of
its sources (true sentences, wrong document: what a model that mixes up its references writes) and checked
again, to see how many the lexical check catches. Prints Markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from offline_model.launcher import ModelServerProcess
from research_api.task import QualityFloor, ResearchTask
from research_worker import citations, graph, steps, writing

CORPORA = Path(__file__).resolve().parent.parent / "tests" / "corpora"


class Timer:
    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

        return timed


def instrument() -> tuple[Timer, Timer]:
    """Time every call of the checker and of the coverage functions, wherever they are called from."""
    check, coverage = Timer(), Timer()
    citations.check = check.wrap(citations.check)  # type: ignore[assignment]
    writing.check = check.wrap(writing.check)  # type: ignore[assignment]
    graph.relevant_documents = coverage.wrap(graph.relevant_documents)  # type: ignore[assignment]
    graph.assign = coverage.wrap(graph.assign)  # type: ignore[assignment]
    writing.relevant_documents = coverage.wrap(writing.relevant_documents)  # type: ignore[assignment]
    return check, coverage


def miscited(result: steps.RunResult) -> tuple[int, int]:
    """The report body with every citation moved to another of its sources (a model that cites the wrong
    document for a true sentence), checked again: (sentences checked, sentences caught)."""
    md = result.report.markdown
    body = md.split("## Insights\n", 1)[1].split("\n---\n", 1)[0]
    k = len(result.report.sources)
    rotated = re.sub(r"\[(\d+)\]", lambda m: f"[{int(m.group(1)) % k + 1}]", body)
    listing = "\n".join(f"[{i}] {src}" for i, src in enumerate(result.report.sources, start=1))
    state: Any = {
        "topic": result.report.topic,
        "sections": result.sections,
        "introduction": "## Introduction\nMoved citations.",
        "content": f"## Insights\n{rotated}\n\n## Sources\n{listing}\n",
        "conclusion": "## Conclusion\nDone.",
    }
    q = writing.finalize_report(state).get("report").quality
    assert q is not None
    return q.report.checked, q.report.recited + q.report.dropped


async def one(
    base_url: str, corpus: str, analysts: int, floor: bool, model: dict[str, Any] | None = None, **over: Any
) -> dict[str, Any]:
    folder = CORPORA / corpus
    task = ResearchTask.model_validate(
        {
            "job": {"namespace": "bench", "name": corpus, "uid": str(uuid.uuid4())},
            "topic": (folder / "topic.txt").read_text().strip(),
            "maxAnalysts": analysts,
            "model": {"name": "offline-research-1", "baseUrl": base_url, "maxConcurrency": 4, **(model or {})},
            "sources": [{"type": "documents", "path": str(folder / "docs"), "topK": over.pop("top_k", 3)}],
            **({"quality": {"minCitationAccuracy": 100 if model is None else 50}} if floor else {}),
            **over,
        }
    )
    t0 = time.perf_counter()
    rt = await steps.prepare(task)
    result = await steps.run(rt)
    seconds = time.perf_counter() - t0
    q = result.report.quality
    assert q is not None
    return {"seconds": seconds, "tokens": result.report.usage.total_tokens, "quality": q, "result": result}


def llamacpp(corpus: str) -> int:
    """The same with a real model: Gemma 3 270M on llama.cpp's llama-server (CPU), without and with a
    floor of 50% (2 analysts, 1 turn, 200 output tokens a call)."""
    from tests.fixtures.llamaserver import LlamaServer, build_llama_server

    binary, gguf = build_llama_server()
    print(f"# Report quality with Gemma 3 270M on llama-server ({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC)\n")
    print(
        "| corpus | run | wall s | tokens | report's cited sentences (supported / checked) "
        "| cited / retrieved | coverage | rewrites |"
    )
    print("| --- | --- | ---: | ---: | --- | --- | --- | ---: |")
    with tempfile.TemporaryDirectory() as tmp, LlamaServer(binary, gguf, Path(tmp) / "llama.log") as server:
        model = {"name": server.model, "maxOutputTokens": 200, "timeoutSeconds": 600, "maxConcurrency": 2}
        for label, floor in (("plain", False), ("floor 50%", True)):
            r = asyncio.run(one(server.base_url, corpus, 2, floor, model, maxTurns=1, top_k=2))
            q = r["quality"]
            print(
                f"| {corpus} | {label} | {r['seconds']:.0f} | {r['tokens']} | {q.report.supported} / "
                f"{q.report.checked} ({q.accuracy_percent}%) | {q.sources_cited} / {q.sources_retrieved} | "
                f"{q.relevant_cited}/{len(q.relevant)} | {q.total.revised} |"
            )
            if floor:
                print(f"\nBelow the floor: {'; '.join(q.misses(QualityFloor(min_citation_accuracy=50)))}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpora", default="swarm-nest-site,violin-making,monarch-migration,roman-aqueducts")
    p.add_argument("--analysts", type=int, default=4)
    p.add_argument("--llamacpp", metavar="CORPUS", help="run with Gemma 3 270M on llama-server instead (slow)")
    args = p.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench")
    if args.llamacpp:
        return llamacpp(args.llamacpp)
    check, coverage = instrument()
    rows = []
    swaps: list[tuple[str, int, int]] = []
    with ModelServerProcess() as honest, ModelServerProcess(fault_invent_citation_rate=1.0) as liar:
        for corpus in args.corpora.split(","):
            for label, server, floor in (
                ("plain", honest, False),
                ("floor", honest, True),
                ("invented", liar, False),
                ("invented+floor", liar, True),
            ):
                check.seconds = coverage.seconds = 0.0
                check.calls = coverage.calls = 0
                r = asyncio.run(one(server.base_url, corpus, args.analysts, floor))
                q = r["quality"]
                t = q.total
                rows.append(
                    (corpus, label, r["seconds"], check.seconds, check.calls, coverage.seconds, r["tokens"], t, q)
                )
                if label == "plain":  # after the timings were taken: its checks are not the run's
                    swaps.append((corpus, *miscited(r["result"])))
    print(f"# Report quality checking ({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {args.analysts} analysts)\n")
    print(
        "| corpus | run | wall s | checking ms (calls) | coverage ms | tokens | cited sentences "
        "(supported / checked, dropped) | rewrites | coverage |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- |")
    for corpus, label, secs, chk, calls, cov, tokens, t, q in rows:
        print(
            f"| {corpus} | {label} | {secs:.2f} | {chk * 1000:.1f} ({calls}) | {cov * 1000:.1f} | {tokens} | "
            f"{t.supported} / {t.checked}, {t.dropped} | {t.revised} | {q.relevant_cited}/{len(q.relevant)} |"
        )
    by = {label: [r for r in rows if r[1] == label] for label in ("plain", "floor", "invented", "invented+floor")}
    plain_tokens = statistics.mean(r[6] for r in by["plain"])
    print()
    print(
        f"Checking per ResearchJob (plain): {statistics.mean(r[3] for r in by['plain']) * 1000:.1f} ms of "
        f"{statistics.mean(r[2] for r in by['plain']):.2f} s, coverage "
        f"{statistics.mean(r[5] for r in by['plain']) * 1000:.1f} ms, 0 tokens."
    )
    extra = statistics.mean(r[6] for r in by["invented+floor"]) - statistics.mean(r[6] for r in by["invented"])
    print(
        f"A floor the writers miss costs one more writing each: {extra:.0f} tokens more per ResearchJob "
        f"({100 * extra / plain_tokens:.0f}% of a plain run's {plain_tokens:.0f})."
    )
    print()
    print("Citations moved to another source of the report (true sentences, wrong document), checked again:\n")
    print("| corpus | cited sentences | caught (re-cited or dropped) |")
    print("| --- | ---: | ---: |")
    for corpus, checked, caught in swaps:
        print(f"| {corpus} | {checked} | {caught} ({100 * caught // max(1, checked)}%) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
