"""The estimate against the real thing: what ``kubectl research submit --estimate`` predicts for a
ResearchJob, and what the research assistant then spends on it.

    .venv/bin/python bench/estimate_bench.py [--corpora alpine-glaciers miso stained-glass ...]
        [--analysts 3 5] [--turns 2]

For each corpus (tests/corpora) and analyst count, ``research_api.estimate.estimate`` is computed from
the ResearchJob's spec and the corpus (as the CLI and the operator compute it), then the whole research
assistant runs in this process (``research_worker.steps.run``, the documents source, as
bench/budget_bench.py does) against the offline model server, and the model calls and tokens it
reports are counted. Prints estimate / real and the error of the total tokens per run, and the
largest error. Loopback only; no cluster.
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


def spec_for(corpus: str, analysts: int, turns: int) -> ResearchJobSpec:
    return ResearchJobSpec.model_validate(
        {
            "topic": (CORPORA / corpus / "topic.txt").read_text().strip(),
            "analysts": {"count": analysts},
            "interview": {"maxTurns": turns},
            "sources": [{"type": "documents", "configMap": f"{corpus}-documents"}],
            "model": {"maxOutputTokens": MAX_OUTPUT_TOKENS},
        }
    )


async def spend(corpus: str, spec: ResearchJobSpec, base_url: str) -> TokenUsage:
    """Run the research assistant over ``corpus`` as ``spec`` says; what the model server reported."""
    task = ResearchTask.model_validate(
        {
            "job": {"namespace": "bench", "name": f"rj-{corpus}", "uid": str(uuid.uuid4())},
            "topic": spec.topic,
            "maxAnalysts": spec.analysts.count,
            "maxTurns": spec.interview.max_turns,
            "model": {
                "name": spec.model.name,
                "baseUrl": base_url,
                "maxConcurrency": 4,
                "maxOutputTokens": spec.model.max_output_tokens,
            },
            "sources": [{"type": "documents", "path": str(CORPORA / corpus / "docs")}],
        }
    )
    rt = await steps.prepare(task)
    await steps.run(rt)
    return rt.llm.usage


def measure(corpus: str, analysts: int, turns: int, base_url: str) -> Run:
    spec = spec_for(corpus, analysts, turns)
    predicted = estimate(spec, read_folder(CORPORA / corpus / "docs"))
    return Run(corpus, analysts, predicted, asyncio.run(spend(corpus, spec, base_url)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpora", nargs="+", default=sorted(d.name for d in CORPORA.iterdir() if d.is_dir()))
    p.add_argument("--analysts", type=int, nargs="+", default=[3, 5])
    p.add_argument("--turns", type=int, default=2)
    args = p.parse_args()
    runs: list[Run] = []
    print(f"maxTurns {args.turns}, maxOutputTokens {MAX_OUTPUT_TOKENS}, the offline model\n")
    print(
        "| corpus | analysts | calls est. / real | prompt est. / real | completion est. / real | total est. / real ",
        end="",
    )
    print("| error |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with ModelServerProcess(log_level="warning", max_concurrency=64) as server:
        for corpus in args.corpora:
            for analysts in args.analysts:
                r = measure(corpus, analysts, args.turns, server.base_url)
                runs.append(r)
                e, u = r.estimated, r.real
                print(
                    f"| {corpus} | {analysts} | {e.calls} / {u.calls} | {e.input_tokens} / {u.input_tokens} "
                    f"| {e.output_tokens} / {u.output_tokens} | {e.tokens} / {u.total_tokens} | {r.error:+.1f}% |",
                    flush=True,
                )
    worst = max(runs, key=lambda r: abs(r.error))
    mean = sum(abs(r.error) for r in runs) / len(runs)
    print(f"\nmean |error| {mean:.1f}%, largest {worst.error:+.1f}% ({worst.corpus}, {worst.analysts} analysts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
