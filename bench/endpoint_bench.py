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
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from kubernetes import client, config

from localkube.controlplane import Cluster, apply_crds, free_port
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
    metrics_port, broker_port = free_port(), free_port()
    env = {
        "KUBECONFIG": str(kubeconfig),
        "OPERATOR_NAMESPACE": op_ns,
        "METRICS_PORT": str(metrics_port),
        "HEALTH_PORT": str(free_port()),
        "DEFAULT_MODEL_BASE_URL": server.base_url,
        # No admission policy checks authors here (the chart installs it); the only author is the
        # admin running this, who may read every Secret and ConfigMap named.
        "TRUST_AUTHORS": "true",
        "LEADER_ELECTION": "false",
        **(
            {
                "LEASE_BROKER_HOST": "127.0.0.1",
                "LEASE_BROKER_PORT": str(broker_port),
                "LEASE_BROKER_URL": f"https://127.0.0.1:{broker_port}",
            }
            if args.leases
            else {}
        ),
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        # Another operator's code, measured in the same run (a worktree of an older commit).
        **({"PYTHONPATH": os.environ["OPERATOR_PYTHONPATH"]} if os.environ.get("OPERATOR_PYTHONPATH") else {}),
    }
    log = open(tmp / f"operator-{declared}.log", "wb")  # noqa: SIM115
    op = subprocess.Popen([sys.executable, "-m", "research_operator"], env=env, stdout=log, stderr=subprocess.STDOUT)
    time.sleep(3)
    server.reset()
    samples: list[tuple[float, ...]] = []  # (time, calls waiting, leases held, admitted pods, pods in touch)
    stop = threading.Event()
    sampler = threading.Thread(
        target=sample_broker, args=(metrics_port, endpoint, samples, stop), daemon=True, name="sampler"
    )
    sampler.start()
    load_before = os.getloadavg()
    wall_start = time.time()
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
    wall_end = wall_start + makespan
    load_after = os.getloadavg()
    stop.set()
    sampler.join(timeout=5)
    stats = server.stats()
    op.terminate()
    op.wait(timeout=30)
    server.stop()
    core.delete_namespace(ns)
    if declared:
        custom.delete_cluster_custom_object(GROUP, VERSION, "modelendpoints", endpoint)
    entries = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    answered = [e for e in entries if e["status"] == 200 and e["kind"] != "invalid"]
    model_time = sum(e["seconds"] for e in answered)
    intervals = [(e["ts"] - e["seconds"], e["ts"]) for e in answered]
    return {
        "gap": idle_breakdown(intervals, samples, wall_start, wall_end) if declared and args.leases else None,
        "load": (load_before[0], load_after[0]),
        "declared": declared,
        "429": int(stats["by_status"].get("429", 0)),
        "max_running": stats["max_running"],
        "makespan": makespan,
        "model_time": model_time,
        "ideal": model_time / CAPACITY,
        "succeeded": sum(1 for p in phases.values() if p == "Succeeded"),
        "n": len(names),
    }


def sample_broker(port: int, endpoint: str, out: list[tuple[float, ...]], stop: threading.Event) -> None:
    """Every 0.25 s: the calls waiting for a lease of ``endpoint``, the leases held and the pods
    admitted against it (operator metrics)."""

    def value(text: str, family: str) -> float:
        m = re.search(rf'^{family}{{endpoint="{endpoint}"}} (\S+)$', text, re.MULTILINE)
        return float(m.group(1)) if m else 0.0

    while not stop.wait(0.25):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            continue
        out.append(
            (
                time.time(),
                value(text, "research_operator_endpoint_lease_requests_waiting"),
                value(text, "research_operator_endpoint_leases_in_flight"),
                value(text, "research_operator_endpoint_pods"),
                value(text, "research_operator_endpoint_pods_in_touch"),
            )
        )


def running_at(intervals: list[tuple[float, float]], t: float) -> int:
    return sum(1 for a, b in intervals if a <= t < b)


def idle_breakdown(
    intervals: list[tuple[float, float]], samples: list[tuple[float, ...]], start: float, end: float
) -> dict[str, Any]:
    """Where the endpoint's idle slot-seconds (CAPACITY x makespan - model time) went, from the
    server's request log (exact requests in flight) and the sampled broker state: idle while calls
    waited for a lease (split into leases held but no request at the server, and slots not lent),
    and idle while no call waited (the workers were between calls, starting, or done)."""
    out: dict[str, Any] = {
        "queued_not_lent": 0.0,
        "queued_lease_not_at_server": 0.0,
        "nothing_queued": 0.0,
        "nothing_queued_pods_starting": 0.0,
        "seconds": 0.0,
        "timeline": [],
    }
    if not samples:
        return out
    window: list[tuple[float, ...]] = []
    for i, (t, waiting, leases, pods, touch) in enumerate(samples):
        if t < start or t > end:
            continue
        dt = (samples[i + 1][0] if i + 1 < len(samples) else end) - t
        running = running_at(intervals, t)
        idle = max(0, CAPACITY - running) * dt
        if waiting > 0:
            not_lent = max(0.0, CAPACITY - leases) * dt
            out["queued_not_lent"] += min(idle, not_lent)
            out["queued_lease_not_at_server"] += max(0.0, idle - not_lent)
        else:
            out["nothing_queued"] += idle
            if touch < pods:  # some admitted pods have not reached the broker yet: starting (or ending)
                out["nothing_queued_pods_starting"] += idle
        out["seconds"] += dt
        window.append((running, waiting, leases, pods, touch))
        if len(window) * 0.25 >= 10 or i + 1 == len(samples) or samples[i + 1][0] > end:
            n = len(window)
            out["timeline"].append((t - start, *(sum(w[k] for w in window) / n for k in range(5))))
            window = []
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--researchjobs", type=int, default=10)
    parser.add_argument("--analysts", type=int, default=4)
    parser.add_argument("--ttft-ms", type=int, default=2000)
    parser.add_argument("--modes", nargs="+", choices=["with", "without"], default=["with", "without"])
    parser.add_argument(
        "--no-leases", dest="leases", action="store_false", help="the operator without its lease broker (shares only)"
    )
    args = parser.parse_args()
    cluster = Cluster()
    cluster.up()
    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    apply_crds(cluster.kubeconfig)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            run_mode(api, cluster.kubeconfig, args, declared, Path(tmp))
            for declared in [m == "with" for m in args.modes]
        ]
    print(
        "| capacity declared | 429s | most in flight | makespan | total model time | ideal (/8) | makespan / ideal "
        "| Succeeded | load average (start, end) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        declared = (
            ("yes (ModelEndpoint, 8, leases)" if args.leases else "yes (ModelEndpoint, 8)") if r["declared"] else "no"
        )
        print(
            f"| {declared} | {r['429']} | {r['max_running']} "
            f"| {r['makespan']:.0f} s | {r['model_time']:.0f} s | {r['ideal']:.0f} s "
            f"| {r['makespan'] / r['ideal']:.2f}x | {r['succeeded']}/{r['n']} "
            f"| {r['load'][0]:.1f}, {r['load'][1]:.1f} |"
        )
    for r in rows:
        if r["gap"]:
            g = r["gap"]
            idle = CAPACITY * r["makespan"] - r["model_time"]
            print(
                f"\nidle slot-seconds {idle:.0f} (of {CAPACITY * r['makespan']:.0f}): while calls waited for a lease "
                f"{g['queued_not_lent'] + g['queued_lease_not_at_server']:.0f} (slots not lent "
                f"{g['queued_not_lent']:.0f}, leases held with no request at the server "
                f"{g['queued_lease_not_at_server']:.0f}); while no call waited {g['nothing_queued']:.0f} (of which "
                f"{g['nothing_queued_pods_starting']:.0f} while admitted pods were not yet in touch with the broker) "
                f"(sampled over {g['seconds']:.0f} s)"
            )
            print(
                "\n| until (s) | requests at the server | calls waiting | leases held | pods admitted "
                "| pods in touch with the broker |"
            )
            print("| --- | --- | --- | --- | --- | --- |")
            for t, running, waiting, leases, pods, touch in g["timeline"]:
                print(f"| {t:.0f} | {running:.1f} | {waiting:.1f} | {leases:.1f} | {pods:.1f} | {touch:.1f} |")


if __name__ == "__main__":
    main()
