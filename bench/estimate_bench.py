"""The estimate against the real thing: what ``kubectl research submit --estimate`` predicts for a
ResearchJob, and what the research assistant then spends on it.

    .venv/bin/python bench/estimate_bench.py [--corpora alpine-glaciers miso stained-glass ...]
        [--analysts 3 5] [--turns 2] [--max-results 3] [--documents DIR --topic TEXT]

For each corpus (tests/corpora, or a folder of documents and a topic) and analyst count,
``research_api.estimate.estimate`` is computed from the ResearchJob's spec and the corpus (as the
CLI and the operator compute it), then the whole research assistant runs in this process
(``research_worker.steps.run``, the documents source, as bench/budget_bench.py does) against the
offline model server, and the model calls and tokens it reports are counted. Prints estimate / real
and the error of the total tokens per run, and the largest error. Loopback only; no cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from offline_model.launcher import ModelServerProcess
from research_api.estimate import estimate
from research_api.researchjob import ResearchJobSpec
from research_api.status import EstimateStatus
from research_api.task import ResearchTask
from research_worker import steps
from research_worker.search import read_folder
from research_worker.state import TokenUsage

REPO = Path(__file__).resolve().parents[1]
CORPORA = REPO / "tests" / "corpora"
MAX_OUTPUT_TOKENS = 4096  # the ResearchJob CRD's default spec.model.maxOutputTokens


@dataclass(frozen=True)
class Run:
    corpus: str
    analysts: int
    estimated: EstimateStatus
    real: TokenUsage

    @property
    def error(self) -> float:
        """The estimate's error on the total tokens, in percent of the real total (+ is over)."""
        return (self.estimated.tokens - self.real.total_tokens) / self.real.total_tokens * 100


@dataclass(frozen=True)
class Corpus:
    name: str
    folder: Path
    topic: str

    @classmethod
    def named(cls, name: str) -> Corpus:
        return cls(name, CORPORA / name / "docs", (CORPORA / name / "topic.txt").read_text().strip())


def spec_for(corpus: Corpus, analysts: int, turns: int, max_results: int) -> ResearchJobSpec:
    return ResearchJobSpec.model_validate(
        {
            "topic": corpus.topic,
            "analysts": {"count": analysts},
            "interview": {"maxTurns": turns},
            "sources": [{"type": "documents", "configMap": "documents", "maxResults": max_results}],
            "model": {"maxOutputTokens": MAX_OUTPUT_TOKENS},
        }
    )


async def spend(corpus: Corpus, spec: ResearchJobSpec, base_url: str) -> TokenUsage:
    """Run the research assistant over ``corpus`` as ``spec`` says; what the model server reported."""
    task = ResearchTask.model_validate(
        {
            "job": {"namespace": "bench", "name": "rj", "uid": str(uuid.uuid4())},
            "topic": spec.topic,
            "maxAnalysts": spec.analysts.count,
            "maxTurns": spec.interview.max_turns,
            "model": {
                "name": spec.model.name,
                "baseUrl": base_url,
                "maxConcurrency": 4,
                "maxOutputTokens": spec.model.max_output_tokens,
            },
            "sources": [{"type": "documents", "path": str(corpus.folder), "topK": spec.sources[0].max_results}],
        }
    )
    rt = await steps.prepare(task)
    await steps.run(rt)
    return rt.llm.usage


def measure(corpus: Corpus, analysts: int, turns: int, max_results: int, base_url: str) -> Run:
    spec = spec_for(corpus, analysts, turns, max_results)
    predicted = estimate(spec, read_folder(corpus.folder))
    return Run(corpus.name, analysts, predicted, asyncio.run(spend(corpus, spec, base_url)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpora", nargs="*", default=sorted(d.name for d in CORPORA.iterdir() if d.is_dir()))
    p.add_argument("--analysts", type=int, nargs="+", default=[3, 5])
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--max-results", type=int, default=3, help="the documents source's maxResults")
    p.add_argument("--documents", type=Path, help="also this folder of documents (with --topic)")
    p.add_argument("--topic", help="the topic of --documents")
    args = p.parse_args()
    if (args.documents is None) != (args.topic is None):
        p.error("--documents and --topic go together")
    corpora = [Corpus.named(c) for c in args.corpora]
    if args.documents is not None:
        corpora.append(Corpus(str(args.documents), args.documents, args.topic))
    runs: list[Run] = []
    print(f"maxTurns {args.turns}, maxResults {args.max_results}, maxOutputTokens {MAX_OUTPUT_TOKENS}, offline model\n")
    print(
        "| corpus | analysts | calls est. / real | prompt est. / real | completion est. / real | total est. / real ",
        end="",
    )
    print("| error |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with ModelServerProcess(log_level="warning", max_concurrency=64) as server:
        for corpus in corpora:
            for analysts in args.analysts:
                r = measure(corpus, analysts, args.turns, args.max_results, server.base_url)
                runs.append(r)
                e, u = r.estimated, r.real
                print(
                    f"| {r.corpus} | {analysts} | {e.calls} / {u.calls} | {e.input_tokens} / {u.input_tokens} "
                    f"| {e.output_tokens} / {u.output_tokens} | {e.tokens} / {u.total_tokens} | {r.error:+.1f}% |",
                    flush=True,
                )
    worst = max(runs, key=lambda r: abs(r.error))
    mean = sum(abs(r.error) for r in runs) / len(runs)
    print(f"\nmean |error| {mean:.1f}%, largest {worst.error:+.1f}% ({worst.corpus}, {worst.analysts} analysts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
