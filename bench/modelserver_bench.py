"""Benchmark the offline model server on loopback: does the latency model hold, and what throughput?

    .venv/bin/python bench/modelserver_bench.py [--requests 200] [--concurrency 16] [--budget 60]

Part 1 (latency model): for a few (TTFT, per-token) settings, stream completions and compare the measured
time to first content token and mean inter-token gap with the configured values.
Part 2 (throughput): with no artificial latency, send ``--requests`` research-style chat completions
(a cited answer over three documents) from ``--concurrency`` concurrent clients and report requests/s and
latency percentiles. Everything is bounded by ``--budget`` seconds and the request counts; prints Markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import sys
import time

import httpx

from offline_model.launcher import ModelServerProcess

DOCS = "\n\n---\n\n".join(
    f'<Document source="docs/{name}.md" page=""/>\n{text}\n</Document>'
    for name, text in (
        (
            "checkpointing",
            "LangGraph persists graph state with checkpointers. A PostgreSQL checkpointer lets an "
            "interview resume on another pod after a crash. Each thread id keys one conversation's checkpoints.",
        ),
        (
            "quotas",
            "A ResourceQuota caps the CPU, memory and number of Jobs in a namespace. When the quota is "
            "exhausted, the operator keeps interview Jobs pending instead of failing them.",
        ),
        (
            "cost",
            "Model calls dominate the cost of a research job. Caching answers and limiting interview turns "
            "cut token usage by half in the reported experiment.",
        ),
    )
)
BODY = {
    "model": "offline-research-1",
    "messages": [
        {
            "role": "system",
            "content": "You are an expert being interviewed by an analyst. Use this context and "
            "cite sources as [1]:\n\n" + DOCS,
        },
        {
            "role": "user",
            "content": "How do checkpointers let an interview survive a pod crash, and what does "
            "the quota do to pending Jobs?",
        },
    ],
}


async def stream_once(client: httpx.AsyncClient, headers: dict[str, str]) -> tuple[float, list[float]]:
    started = time.perf_counter()
    arrivals: list[float] = []
    async with client.stream("POST", "/chat/completions", json={**BODY, "stream": True}, headers=headers) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            delta = json.loads(line[6:])["choices"]
            if delta and delta[0]["delta"].get("content"):
                arrivals.append(time.perf_counter() - started)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return arrivals[0], gaps


async def latency_model(base_url: str, settings: list[tuple[int, int]], repeats: int) -> list[str]:
    rows = [
        "| configured TTFT ms | measured TTFT ms (median) | configured ms/token | measured ms/token (median gap) "
        "| tokens/stream |",
        "| --- | --- | --- | --- | --- |",
    ]
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        for ttft, per_token in settings:
            headers = {"X-Offline-Latency-TTFT-Ms": str(ttft), "X-Offline-Latency-Token-Ms": str(per_token)}
            firsts, gaps, n_tokens = [], [], 0
            for _ in range(repeats):
                first, g = await stream_once(client, headers)
                firsts.append(first * 1000)
                gaps.extend(x * 1000 for x in g)
                n_tokens = len(g) + 1
            rows.append(
                f"| {ttft} | {statistics.median(firsts):.1f} | {per_token} | {statistics.median(gaps):.2f} "
                f"| {n_tokens} |"
            )
    return rows


async def throughput(base_url: str, requests: int, concurrency: int, deadline: float) -> list[str]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty() and time.monotonic() < deadline:
            queue.get_nowait()
            t = time.perf_counter()
            r = await client.post("/chat/completions", json=BODY)
            latencies.append(time.perf_counter() - t)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        await client.post("/chat/completions", json=BODY)  # warm up
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    return [
        "| requests | concurrency | seconds | requests/s | p50 ms | p95 ms | statuses |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {len(latencies)} | {concurrency} | {elapsed:.2f} | {len(latencies) / elapsed:.1f} | {p(0.5):.1f} "
        f"| {p(0.95):.1f} | {statuses} |",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=200, help="throughput requests (bounded)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="streams per latency setting")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds, hard bound on the throughput part")
    args = parser.parse_args()
    args.requests = min(args.requests, 2000)
    settings = [(0, 0), (100, 5), (250, 20)]
    out = [f"Run {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')} with `{' '.join(['python', *sys.argv])}`"]
    with ModelServerProcess(log_level="warning", max_concurrency=max(64, args.concurrency)) as server:
        out += ["", "**Latency model** (streamed, per-request headers):", ""]
        out += asyncio.run(latency_model(server.base_url, settings, args.repeats))
        out += ["", "**Throughput** (no artificial latency, cited answer over 3 documents):", ""]
        out += asyncio.run(throughput(server.base_url, args.requests, args.concurrency, time.monotonic() + args.budget))
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
