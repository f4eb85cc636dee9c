"""Ten ResearchJobs at once against one model endpoint that takes 8 requests at a time (429 beyond),
with and without its capacity declared as a ModelEndpoint.

    .venv/bin/python bench/endpoint_bench.py [--researchjobs 10] [--analysts 4] [--ttft-ms 2000] [--modes with without]

For each mode it starts the offline model server (``--max-concurrency 8``: a 9th concurrent request is
answered 429 with Retry-After; ``--ttft-ms``: the model time of every request; a request log) and the
operator (local processes, like the tests), declares (or not) ``ModelEndpoint`` with
``maxConcurrentRequests: 8`` for the server's URL, creates the ResearchJobs at once and waits until
every one is Succeeded or Failed. It reports

- the 429s the server answered (its own stats);
- the makespan, from the first create to the last ResearchJob finished;
- the ideal: total model time (the server's time on every answered chat completion, from its request
  log) divided by 8, and the makespan's ratio to it;
- how many ResearchJobs succeeded.

The cluster must be startable (`make cluster-build`); it is reused if running. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from kubernetes import client, config

from localkube.controlplane import Cluster, free_port, kube_tools_dir
from offline_model.launcher import ModelServerProcess

REPO = Path(__file__).resolve().parents[1]
GROUP, VERSION, PLURAL = "researchops.io", "v1alpha1", "researchjobs"
CAPACITY = 8


def run_mode(
    api: client.ApiClient, kubeconfig: Path, args: argparse.Namespace, declared: bool, tmp: Path
) -> dict[str, Any]:
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    log_path = tmp / f"requests-{declared}.jsonl"
    server = ModelServerProcess(max_concurrency=CAPACITY, ttft_ms=args.ttft_ms, request_log=str(log_path)).start()
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": ns}})
    while not core.list_namespaced_service_account(ns).items:
        time.sleep(0.1)
    data = {p.name: p.read_text() for p in sorted((REPO / "tests" / "corpus").glob("*.md"))}
    core.create_namespaced_config_map(ns, {"metadata": {"name": "corpus"}, "data": data})
    op_ns = "research-operator-bench"
    try:
        core.create_namespace({"metadata": {"name": op_ns}})
    except client.ApiException:
        pass
    endpoint = f"bench-{uuid.uuid4().hex[:6]}"
    if declared:
        custom.create_cluster_custom_object(
            GROUP,
            VERSION,
            "modelendpoints",
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "ModelEndpoint",
                "metadata": {"name": endpoint},
                "spec": {"baseUrl": server.base_url, "maxConcurrentRequests": CAPACITY},
            },
        )
    env = {
        "KUBECONFIG": str(kubeconfig),
        "OPERATOR_NAMESPACE": op_ns,
        "METRICS_PORT": str(free_port()),
        "HEALTH_PORT": str(free_port()),
        "DEFAULT_MODEL_BASE_URL": server.base_url,
        "LEADER_ELECTION": "false",
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
    }
    log = open(tmp / f"operator-{declared}.log", "wb")  # noqa: SIM115
    op = subprocess.Popen([sys.executable, "-m", "research_operator"], env=env, stdout=log, stderr=subprocess.STDOUT)
    time.sleep(3)
    server.reset()
    start = time.monotonic()
    names = [f"rj{i}" for i in range(args.researchjobs)]
    for name in names:
        custom.create_namespaced_custom_object(
            GROUP,
            VERSION,
            ns,
            PLURAL,
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "ResearchJob",
                "metadata": {"name": name},
                "spec": {
                    "topic": "How Kubernetes runs and limits batch workloads",
                    "analysts": {"count": args.analysts},
                    "interview": {"maxTurns": 1},
                    "sources": [{"type": "documents", "configMap": "corpus", "maxResults": 2}],
                    "parallelism": {"batchSize": 2, "maxActiveJobs": 2},
                    "model": {"maxConcurrency": 4},
                },
            },
        )
    ended: dict[str, float] = {}
    phases: dict[str, str] = {}
    while len(ended) < len(names):
        for x in names:
            if x in ended:
                continue
            phase = (custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, x).get("status") or {}).get(
                "phase"
            )
            if phase in ("Succeeded", "Failed"):
                ended[x] = time.monotonic()
                phases[x] = str(phase)
        if time.monotonic() - start > 1800:
            raise SystemExit(f"timed out; ended {phases}")
        time.sleep(0.5)
    makespan = max(ended.values()) - start
    stats = server.stats()
    op.terminate()
    op.wait(timeout=30)
    server.stop()
    core.delete_namespace(ns)
    if declared:
        custom.delete_cluster_custom_object(GROUP, VERSION, "modelendpoints", endpoint)
    entries = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    model_time = sum(e["seconds"] for e in entries if e["status"] == 200 and e["kind"] != "invalid")
    return {
        "declared": declared,
        "429": int(stats["by_status"].get("429", 0)),
        "max_running": stats["max_running"],
        "makespan": makespan,
        "model_time": model_time,
        "ideal": model_time / CAPACITY,
        "succeeded": sum(1 for p in phases.values() if p == "Succeeded"),
        "n": len(names),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--researchjobs", type=int, default=10)
    parser.add_argument("--analysts", type=int, default=4)
    parser.add_argument("--ttft-ms", type=int, default=2000)
    parser.add_argument("--modes", nargs="+", choices=["with", "without"], default=["with", "without"])
    args = parser.parse_args()
    cluster = Cluster()
    cluster.up()
    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    kubectl = str(kube_tools_dir() / "kubectl")
    for crd in ("researchjobs.researchops.io.yaml", "modelendpoints.researchops.io.yaml"):
        subprocess.run(
            [
                kubectl,
                f"--kubeconfig={cluster.kubeconfig}",
                "apply",
                "--server-side",
                "--force-conflicts",
                "-f",
                str(REPO / "crds" / crd),
            ],
            check=True,
        )
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            run_mode(api, cluster.kubeconfig, args, declared, Path(tmp))
            for declared in [m == "with" for m in args.modes]
        ]
    print(
        "| capacity declared | 429s | most in flight | makespan | total model time | ideal (/8) | makespan / ideal "
        "| Succeeded |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {'yes (ModelEndpoint, 8)' if r['declared'] else 'no'} | {r['429']} | {r['max_running']} "
            f"| {r['makespan']:.0f} s | {r['model_time']:.0f} s | {r['ideal']:.0f} s "
            f"| {r['makespan'] / r['ideal']:.2f}x | {r['succeeded']}/{r['n']} |"
        )


if __name__ == "__main__":
    main()
