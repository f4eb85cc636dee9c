"""The plan step's structured answer against llama.cpp's llama-server with Gemma 3 270M: how long the
answer is, whether it ends or is cut off, and how long it takes, with the strings of the schema
bounded (research_worker.bounds, what the worker sends) and without (what OpenAI's endpoints get).

    PYTHONPATH=. .venv/bin/python bench/llamacpp_plan_bench.py [--corpus tests/corpus ...] \
        [--analysts 2 6] [--max-output-tokens 768] [--no-unbounded]

Each run is the worker's own ``create_analysts`` node (the documents' overview in its prompt) with a
fresh model client; a corpus is ``tests/corpus`` or a ``tests/corpora/<name>`` folder (its
``topic.txt`` is the topic, its ``docs/`` the documents). Prints Markdown. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
from langgraph.runtime import Runtime
from pydantic import SecretStr

from research_api.task import ModelSettings
from research_worker.configuration import Configuration
from research_worker.errors import WorkerError
from research_worker.graph import create_analysts
from research_worker.llm import LLMClient
from research_worker.search import DocumentsBackend
from tests.fixtures.llamaserver import LlamaServer, build_llama_server

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TOPIC = "How Kubernetes runs and limits batch workloads"


def corpus_of(path: Path) -> tuple[str, Path]:
    topic = path / "topic.txt"
    if topic.exists():
        return topic.read_text().strip(), path / "docs"
    return DEFAULT_TOPIC, path


async def plan_once(server: LlamaServer, corpus: Path, analysts: int, max_tokens: int, bounded: bool) -> dict[str, Any]:
    answers: list[dict[str, Any]] = []

    async def keep(response: httpx.Response) -> None:
        await response.aread()
        answers.append(response.json())

    http = httpx.AsyncClient(event_hooks={"response": [keep]})
    settings = ModelSettings(
        name=server.model, base_url=server.base_url, max_output_tokens=max_tokens, timeout_seconds=900, max_retries=0
    )
    llm = LLMClient(settings, SecretStr("no-key-configured"), http_async_client=http)
    topic, docs = corpus_of(corpus)
    config = Configuration(llm=llm, backends=[DocumentsBackend.from_folder(docs)], max_analysts=analysts)
    start = time.monotonic()
    error = ""
    # without bounds: the schema as OpenAI's endpoints get it
    with mock.patch("research_worker.llm.strict_subset_only", return_value=not bounded):
        try:
            await create_analysts({"topic": topic, "max_analysts": analysts}, Runtime(context=config))
        except WorkerError as exc:
            error = str(exc)
    wall = time.monotonic() - start
    await http.aclose()
    answer = answers[-1] if answers else {}
    usage, timings = answer.get("usage", {}), answer.get("timings", {})
    return {
        "corpus": corpus.name,
        "analysts": analysts,
        "bounded": bounded,
        "prompt": usage.get("prompt_tokens", 0),
        "output": usage.get("completion_tokens", 0),
        "finish": (answer.get("choices") or [{}])[0].get("finish_reason", "?"),
        "gen_tps": timings.get("predicted_per_second", 0.0),
        "wall": wall,
        "ok": not error,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, nargs="+", default=[REPO / "tests" / "corpus"])
    parser.add_argument("--analysts", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--max-output-tokens", type=int, default=768)
    parser.add_argument("--no-unbounded", action="store_true", help="only the bounded schema")
    args = parser.parse_args()
    binary, model = build_llama_server()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, LlamaServer(binary, model, Path(tmp) / "llama-server.log") as server:
        for corpus in args.corpus:
            for analysts in args.analysts:
                for bounded in (True,) if args.no_unbounded else (True, False):
                    row = asyncio.run(plan_once(server, corpus, analysts, args.max_output_tokens, bounded))
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    print(f"\nmaxOutputTokens {args.max_output_tokens}, llama-server --threads {server.threads}\n")
    print("| corpus | analysts | strings bounded | prompt tokens | output tokens | finish | plan | gen tok/s | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        plan = "stored" if r["ok"] else "cut off"
        print(
            f"| {r['corpus']} | {r['analysts']} | {'yes' if r['bounded'] else 'no'} | {r['prompt']} | {r['output']} "
            f"| {r['finish']} | {plan} | {r['gen_tps']:.1f} | {r['wall']:.0f} |"
        )


if __name__ == "__main__":
    main()
