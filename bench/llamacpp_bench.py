"""llama.cpp's llama-server with Gemma 3 270M on this machine: build time, tokens per second, and
the wall time of a ResearchJob against it on the local cluster.

    PYTHONPATH=. .venv/bin/python bench/llamacpp_bench.py [--requests 6] [--analysts 2] [--turns 1] [--no-researchjob]

- Build: the seconds ``hack/build-llama-server.sh`` took (recorded in the cache when it built).
- Tokens/s: ``--requests`` chat completions (a ~600-token research prompt, 128 tokens out), one at a
  time and then two at once (the server's two slots), read from llama-server's own ``timings``
  (prompt_per_second, predicted_per_second).
- ResearchJob: starts the cluster (reused if running), applies the CRD, runs the operator as a local
  process with its default endpoint at llama-server, creates one ResearchJob (``--analysts``,
  ``--turns``, maxOutputTokens 256) over tests/corpus and reports its wall time per phase, its LLM
  calls and tokens. Prints Markdown. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from kubernetes import client, config

from localkube.controlplane import Cluster, apply_crds, free_port
from tests.fixtures.llamaserver import LlamaServer, build_llama_server

REPO = Path(__file__).resolve().parents[1]
GROUP, VERSION, PLURAL = "researchops.io", "v1alpha1", "researchjobs"
CORPUS = REPO / "tests" / "corpus"


def research_prompt() -> list[dict[str, str]]:
    files = sorted(CORPUS.glob("*.md"))
    docs = "\n\n".join(f'<Document source="{p.name}">\n{p.read_text()}\n</Document>' for p in files)
    system = f"You are an expert. Answer only from this context, citing it as [n].\n<context>\n{docs}\n</context>"
    return [
        {"role": "system", "content": system[:2400]},
        {"role": "user", "content": "How does a Job's backoffLimit interact with its podFailurePolicy?"},
    ]


async def one(http: httpx.AsyncClient, server: LlamaServer) -> dict[str, Any]:
    # cache_prompt off (a llama.cpp extension): every request processes its whole prompt
    body = {
        "model": server.model,
        "messages": research_prompt(),
        "max_tokens": 128,
        "temperature": 0,
        "cache_prompt": False,
    }
    r = await http.post(f"{server.base_url}/chat/completions", json=body)
    r.raise_for_status()
    return dict(r.json()["timings"])


async def tokens_per_second(server: LlamaServer, requests: int) -> list[dict[str, Any]]:
    rows = []
    async with httpx.AsyncClient(timeout=300) as http:
        await one(http, server)  # warm-up (page cache, first allocation)
        for concurrency in (1, 2):
            timings: list[dict[str, Any]] = []
            start = time.monotonic()
            for _ in range(max(1, requests // concurrency)):
                timings += await asyncio.gather(*(one(http, server) for _ in range(concurrency)))
            wall = time.monotonic() - start
            rows.append(
                {
                    "concurrency": concurrency,
                    "requests": len(timings),
                    "prompt_tokens": statistics.median(t["prompt_n"] for t in timings),
                    "prompt_tps": statistics.median(t["prompt_per_second"] for t in timings),
                    "gen_tokens": statistics.median(t["predicted_n"] for t in timings),
                    "gen_tps": statistics.median(t["predicted_per_second"] for t in timings),
                    "aggregate_gen_tps": sum(t["predicted_n"] for t in timings) / wall,
                }
            )
    return rows


def researchjob_wall(server: LlamaServer, analysts: int, turns: int, tmp: Path) -> dict[str, Any]:
    cluster = Cluster()
    cluster.up()
    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    apply_crds(cluster.kubeconfig)
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": ns}})
    while not core.list_namespaced_service_account(ns).items:
        time.sleep(0.1)
    data = {p.name: p.read_text() for p in sorted(CORPUS.glob("*.md"))}
    core.create_namespaced_config_map(ns, {"metadata": {"name": "corpus"}, "data": data})
    op_ns = "research-operator-bench"
    try:
        core.create_namespace({"metadata": {"name": op_ns}})
    except client.ApiException:
        pass
    env = {
        "KUBECONFIG": str(cluster.kubeconfig),
        "OPERATOR_NAMESPACE": op_ns,
        "METRICS_PORT": str(free_port()),
        "HEALTH_PORT": str(free_port()),
        "DEFAULT_MODEL_BASE_URL": server.base_url,
        # No admission policy checks authors here (the chart installs it); the only author is the
        # admin running this, who may read every Secret and ConfigMap named.
        "TRUST_AUTHORS": "true",
        "LEADER_ELECTION": "false",
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
    }
    log = open(tmp / "operator.log", "wb")  # noqa: SIM115
    op = subprocess.Popen([sys.executable, "-m", "research_operator"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        time.sleep(3)
        spec = {
            "topic": "How Kubernetes runs and limits batch workloads",
            "analysts": {"count": analysts},
            "interview": {"maxTurns": turns},
            "sources": [{"type": "documents", "configMap": "corpus", "maxResults": 2}],
            "parallelism": {"batchSize": analysts, "maxActiveJobs": 1},
            "model": {"name": server.model, "maxOutputTokens": 256, "timeoutSeconds": 180},
        }
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ResearchJob", "metadata": {"name": "gemma"}, "spec": spec}
        start = time.monotonic()
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
        phases: dict[str, float] = {}
        status: dict[str, Any] = {}
        while time.monotonic() - start < 1800:
            status = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "gemma").get("status") or {}
            phase = status.get("phase", "Pending")
            phases.setdefault(phase, time.monotonic() - start)
            if phase in ("Succeeded", "Failed"):
                break
            time.sleep(0.5)
        wall = time.monotonic() - start
        stored = core.list_namespaced_config_map(ns, label_selector=f"{GROUP}/kind").items
        calls = sum(_calls(cm.data.get("data.json", "{}")) for cm in stored)
        return {"phase": status.get("phase"), "message": status.get("message"), "wall": wall, "phases": phases,
                "tokens": status.get("tokensUsed", 0), "calls": calls}  # fmt: skip
    finally:
        op.terminate()
        op.wait(timeout=30)
        core.delete_namespace(ns)


def _calls(text: str) -> int:
    usage = json.loads(text).get("usage") or {}
    return int(usage.get("calls", 0))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--analysts", type=int, default=2)
    parser.add_argument("--turns", type=int, default=1)
    parser.add_argument("--no-researchjob", action="store_true")
    args = parser.parse_args()
    binary, model = build_llama_server()
    built = binary.parents[3] / "build-seconds"
    print(f"# llama.cpp bench, {dt.date.today()}\n")
    if built.exists():
        print(f"llama-server build (cached at {binary.parents[3]}): {int(built.read_text())} s\n")
    with tempfile.TemporaryDirectory() as tmp, LlamaServer(binary, model, Path(tmp) / "llama.log") as server:
        rows = asyncio.run(tokens_per_second(server, args.requests))
        print("| concurrent requests | requests | prompt tokens | prompt tok/s (median) | generated tokens "
              "| generation tok/s per request (median) | generation tok/s, all requests |")  # fmt: skip
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            print(f"| {r['concurrency']} | {r['requests']} | {r['prompt_tokens']:.0f} | {r['prompt_tps']:.0f} "
                  f"| {r['gen_tokens']:.0f} | {r['gen_tps']:.1f} | {r['aggregate_gen_tps']:.1f} |")  # fmt: skip
        if not args.no_researchjob:
            r = researchjob_wall(server, args.analysts, args.turns, Path(tmp))
            marks = ", ".join(f"{p} at {t:.0f} s" for p, t in r["phases"].items())
            print(f"\nResearchJob ({args.analysts} analysts, {args.turns} turn): {r['phase']} in {r['wall']:.0f} s "
                  f"({marks}); {r['calls']} LLM calls, {r['tokens']} tokens")  # fmt: skip
            if r["phase"] != "Succeeded":
                print(f"  message: {r['message']}")


if __name__ == "__main__":
    main()
