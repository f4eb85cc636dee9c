"""A late small tenant on a busy model endpoint: how much longer its ResearchJob takes than alone.

    .venv/bin/python bench/tenant_fairness_bench.py [--big 6] [--ttft-ms 1500] [--delay 5]
        [--operator-pythonpath DIR ...]

One endpoint takes 4 requests at a time (the offline model server with ``--max-concurrency 4``,
declared as a ModelEndpoint of 4, the operator's lease broker on). First the small tenant's one
ResearchJob runs alone; then the big tenant creates ``--big`` ResearchJobs in its namespace and,
``--delay`` seconds later, the small tenant its one. It reports the small one's time alone and
behind the big tenant, their ratio, and the big tenant's makespan. With ``--operator-pythonpath``
(a checkout's ``operator`` and ``api`` folders, e.g. of an older commit in a git worktree) the
operator runs from there, so old and new code are measured in one run on the same machine.

The cluster must be startable (`make cluster-build`); it is reused if running. Loopback only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from kubernetes import client, config

from localkube.controlplane import Cluster, apply_crds, free_port
from offline_model.launcher import ModelServerProcess

REPO = Path(__file__).resolve().parents[1]
GROUP, VERSION, PLURAL = "researchops.io", "v1alpha1", "researchjobs"
CAPACITY = 4


def researchjob(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ResearchJob",
        "metadata": {"name": name},
        "spec": {
            "topic": "How Kubernetes runs and limits batch workloads",
            "analysts": {"count": 4},
            "interview": {"maxTurns": 1},
            "sources": [{"type": "documents", "configMap": "corpus", "maxResults": 2}],
            "parallelism": {"batchSize": 2, "maxActiveJobs": 2},
            "model": {"maxConcurrency": 4},
        },
    }


def namespace(core: client.CoreV1Api, prefix: str) -> str:
    ns = f"{prefix}-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": ns}})
    while not core.list_namespaced_service_account(ns).items:
        time.sleep(0.1)
    data = {p.name: p.read_text() for p in sorted((REPO / "tests" / "corpus").glob("*.md"))}
    core.create_namespaced_config_map(ns, {"metadata": {"name": "corpus"}, "data": data})
    return ns


def wait_all(custom: client.CustomObjectsApi, names: list[tuple[str, str]], start: float) -> dict[str, float]:
    """Seconds from ``start`` until each (namespace, name) is Succeeded (Failed stops the bench)."""
    ended: dict[str, float] = {}
    while len(ended) < len(names):
        for ns, name in names:
            if name in ended:
                continue
            st = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name).get("status") or {}
            if st.get("phase") == "Failed":
                raise SystemExit(f"{ns}/{name} failed: {st.get('message')}")
            if st.get("phase") == "Succeeded":
                ended[name] = time.monotonic() - start
        if time.monotonic() - start > 1800:
            raise SystemExit(f"timed out; ended {ended}")
        time.sleep(0.3)
    return ended


def run(
    api: client.ApiClient, kubeconfig: Path, args: argparse.Namespace, pythonpath: str, tmp: Path
) -> dict[str, Any]:
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    server = ModelServerProcess(max_concurrency=CAPACITY, ttft_ms=args.ttft_ms).start()
    op_ns = f"tenant-bench-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": op_ns}})
    endpoint = f"bench-{uuid.uuid4().hex[:6]}"
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
    broker = free_port()
    env = {
        "KUBECONFIG": str(kubeconfig),
        "OPERATOR_NAMESPACE": op_ns,
        "METRICS_PORT": str(free_port()),
        "HEALTH_PORT": str(free_port()),
        "DEFAULT_MODEL_BASE_URL": server.base_url,
        "TRUST_AUTHORS": "true",  # no admission policy here; the only author is the admin running this
        "LEADER_ELECTION": "false",
        "LEASE_BROKER_HOST": "127.0.0.1",
        "LEASE_BROKER_PORT": str(broker),
        "LEASE_BROKER_URL": f"https://127.0.0.1:{broker}",
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        **({"PYTHONPATH": pythonpath} if pythonpath else {}),
    }
    log = open(tmp / f"operator-{uuid.uuid4().hex[:4]}.log", "wb")  # noqa: SIM115
    op = subprocess.Popen([sys.executable, "-m", "research_operator"], env=env, stdout=log, stderr=subprocess.STDOUT)
    time.sleep(16)  # the lease broker grants nothing for its first 14 s
    try:
        small_ns = namespace(core, "small")
        start = time.monotonic()
        custom.create_namespaced_custom_object(GROUP, VERSION, small_ns, PLURAL, researchjob("alone"))
        alone = wait_all(custom, [(small_ns, "alone")], start)["alone"]
        big_ns = namespace(core, "big")
        load = os.getloadavg()[0]
        start = time.monotonic()
        bigs = [f"big{i}" for i in range(args.big)]
        for name in bigs:
            custom.create_namespaced_custom_object(GROUP, VERSION, big_ns, PLURAL, researchjob(name))
        time.sleep(args.delay)
        late = time.monotonic()
        custom.create_namespaced_custom_object(GROUP, VERSION, small_ns, PLURAL, researchjob("late"))
        ended = wait_all(custom, [(big_ns, n) for n in bigs] + [(small_ns, "late")], start)
        late_took = ended["late"] - (late - start)
        before = sum(1 for n in bigs if ended[n] < ended["late"])
        for ns in (small_ns, big_ns):
            core.delete_namespace(ns)
        return {
            "alone": alone,
            "late": late_took,
            "ratio": late_took / alone,
            "big_makespan": max(ended[n] for n in bigs),
            "big_before_late": before,
            "load": load,
        }
    finally:
        op.terminate()
        op.wait(timeout=30)
        server.stop()
        custom.delete_cluster_custom_object(GROUP, VERSION, "modelendpoints", endpoint)
        core.delete_namespace(op_ns)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--big", type=int, default=6)
    parser.add_argument("--ttft-ms", type=int, default=1500)
    parser.add_argument("--delay", type=float, default=5.0)
    parser.add_argument(
        "--operator-pythonpath",
        nargs="*",
        default=[""],
        help="one run per entry: a PYTHONPATH for the operator ('' = this checkout)",
    )
    args = parser.parse_args()
    cluster = Cluster()
    cluster.up()
    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    apply_crds(cluster.kubeconfig)  # a new cluster has none
    with tempfile.TemporaryDirectory() as tmp:
        for pythonpath in args.operator_pythonpath:
            r = run(api, cluster.kubeconfig, args, pythonpath, Path(tmp))
            print(
                f"operator {pythonpath or 'this checkout'}: the small tenant's ResearchJob alone {r['alone']:.1f} s, "
                f"{args.delay:.0f} s after {args.big} of the big tenant's {r['late']:.1f} s ({r['ratio']:.2f}x), "
                f"finished after {r['big_before_late']} of them; the big tenant's makespan {r['big_makespan']:.1f} s "
                f"(load {r['load']:.1f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
