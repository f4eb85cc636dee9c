"""Operator reaction time and API cost, for N concurrent ResearchJobs on the local control plane.

    .venv/bin/python bench/operator_bench.py --researchjobs 1 3 5 [--analysts 4]

For each N: starts the offline model server and the operator (as local processes, like the tests),
creates N ResearchJobs at once (each: ``--analysts`` analysts, batchSize 1, maxActiveJobs 1, so
every batch waits for the previous one), and watches the namespace's Jobs. It reports

- the delay from a batch Job finishing (its Complete condition arriving on a watch) to the next
  batch Job of the same ResearchJob being created (its ADDED event), median and p95;
- the Kubernetes API requests the operator made per ResearchJob (its own counter
  ``research_operator_api_requests_total``, watches excluded);
- wall time until all N Succeeded.

The cluster must be startable (`make cluster-build`); it is reused if running. Loopback only.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch

from localkube.controlplane import Cluster, apply_crds, free_port

REPO = Path(__file__).resolve().parents[1]
GROUP, VERSION, PLURAL = "researchops.io", "v1alpha1", "researchjobs"


def api_requests(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return sum(float(m) for m in re.findall(r"^research_operator_api_requests_total\{[^}]*\} (\S+)$", text, re.M))


def run_round(
    api: client.ApiClient, kubeconfig: Path, n: int, analysts: int, base_url: str, tmp: Path
) -> dict[str, Any]:
    core, batch, custom = client.CoreV1Api(api), client.BatchV1Api(api), client.CustomObjectsApi(api)
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": ns}})
    while not core.list_namespaced_service_account(ns).items:
        time.sleep(0.1)
    data = {p.name: p.read_text() for p in sorted((REPO / "tests" / "corpus").glob("*.md"))}
    core.create_namespaced_config_map(ns, {"metadata": {"name": "corpus"}, "data": data})
    metrics_port = free_port()
    op_ns = "research-operator-bench"
    try:
        core.create_namespace({"metadata": {"name": op_ns}})
    except client.ApiException:
        pass
    env = {
        "KUBECONFIG": str(kubeconfig),
        "OPERATOR_NAMESPACE": op_ns,
        "METRICS_PORT": str(metrics_port),
        "HEALTH_PORT": str(free_port()),
        "DEFAULT_MODEL_BASE_URL": base_url,
        # No admission policy checks authors here (the chart installs it); the only author is the
        # admin running this, who may read every Secret and ConfigMap named.
        "TRUST_AUTHORS": "true",
        "LEADER_ELECTION": "false",
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
    }
    log = open(tmp / f"operator-{n}.log", "wb")  # noqa: SIM115
    op = subprocess.Popen([sys.executable, "-m", "research_operator"], env=env, stdout=log, stderr=subprocess.STDOUT)
    while True:
        try:
            before = api_requests(metrics_port)
            break
        except OSError:
            time.sleep(0.2)

    finished: dict[str, float] = {}
    added: dict[str, float] = {}
    meta: dict[str, tuple[str, int]] = {}
    stop = threading.Event()

    def watch_jobs() -> None:
        w = watch.Watch()
        while not stop.is_set():
            for ev in w.stream(batch.list_namespaced_job, ns, timeout_seconds=2):
                j = ev["object"]
                labels = j.metadata.labels or {}
                if labels.get(f"{GROUP}/step") != "interview":
                    continue
                name = j.metadata.name
                meta[name] = (labels[f"{GROUP}/job"], int(labels[f"{GROUP}/batch"]))
                now = time.monotonic()
                added.setdefault(name, now)
                if any(c.type == "Complete" and c.status == "True" for c in j.status.conditions or []):
                    finished.setdefault(name, now)

    t = threading.Thread(target=watch_jobs, daemon=True)
    t.start()
    time.sleep(0.5)
    start = time.monotonic()
    names = [f"rj{i}" for i in range(n)]
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
                    "analysts": {"count": analysts},
                    "interview": {"maxTurns": 1},
                    "sources": [{"type": "documents", "configMap": "corpus", "maxResults": 2}],
                    "parallelism": {"batchSize": 1, "maxActiveJobs": 1},
                },
            },
        )
    while True:
        phases = [
            (custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, x).get("status") or {}).get("phase")
            for x in names
        ]
        if all(p in ("Succeeded", "Failed") for p in phases):
            break
        if time.monotonic() - start > 900:
            raise SystemExit(f"timed out; phases {phases}")
        time.sleep(0.5)
    wall = time.monotonic() - start
    stop.set()
    requests = api_requests(metrics_port) - before
    op.terminate()
    op.wait(timeout=30)
    core.delete_namespace(ns)

    by_rj: dict[str, dict[int, str]] = defaultdict(dict)
    for name, (rj, b) in meta.items():
        by_rj[rj][b] = name
    delays = []
    for batches in by_rj.values():
        for b, name in batches.items():
            nxt = batches.get(b + 1)
            if nxt and name in finished and nxt in added:
                delays.append(added[nxt] - finished[name])
    delays.sort()
    return {
        "n": n,
        "phases": phases,
        "delay_median": statistics.median(delays) if delays else float("nan"),
        "delay_p95": delays[int(0.95 * (len(delays) - 1))] if delays else float("nan"),
        "samples": len(delays),
        "requests_per_rj": requests / n,
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--researchjobs", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--analysts", type=int, default=4)
    args = parser.parse_args()
    cluster = Cluster()
    cluster.up()
    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    apply_crds(cluster.kubeconfig)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        ms = subprocess.Popen(
            [sys.executable, "-m", "offline_model", "--host", "127.0.0.1", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(2)
            rows = [
                run_round(api, cluster.kubeconfig, n, args.analysts, f"http://127.0.0.1:{port}/v1", Path(tmp))
                for n in args.researchjobs
            ]
        finally:
            ms.terminate()
    print(
        "| ResearchJobs | batches measured | Job done -> next Job created, median | p95 "
        "| API requests per ResearchJob | wall |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['n']} | {r['samples']} | {r['delay_median'] * 1000:.0f} ms | {r['delay_p95'] * 1000:.0f} ms "
            f"| {r['requests_per_rj']:.1f} | {r['wall']:.0f} s |"
        )
        if any(p != "Succeeded" for p in r["phases"]):
            print(f"  (not all Succeeded: {r['phases']})")


if __name__ == "__main__":
    main()
