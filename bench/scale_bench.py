"""The operator on a shared, crowded cluster: memory, CPU, API traffic and reaction time at scale.

    .venv/bin/python bench/scale_bench.py [--foreign 10000 50000] [--waiting 1000 5000] [--running 200]
                                          [--only foreign,waiting,running] [--json results.json]

Runs on the local control plane (started or reused; loopback only) with the operator as a local
process configured as the Helm chart runs it (leader election on, default resync and back-off), and
measures, each step bounded in count and time:

(a) RSS and CPU of the idle operator;
(b) the same after N foreign ConfigMaps (4 KiB each) and N suspended foreign Jobs appear in other
    namespaces, and again after those namespaces are deleted;
(c) RSS with M ResearchJobs waiting on a ResourceQuota that admits no Job (``count/jobs.batch: 0``);
(d) seconds from creating M ResearchJobs at once until every one has a status;
(e) the operator's API requests per second while they wait (its own counter; watches excluded);
(f) with R one-analyst ResearchJobs under ``globalMaxActiveJobs``, the delay from a worker Job's
    Complete condition to the next worker Job's creation (any ResearchJob), p50/p99.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch

from localkube.controlplane import Cluster, apply_crds, free_port

REPO = Path(__file__).resolve().parents[1]
GROUP, VERSION, PLURAL = "researchops.io", "v1alpha1", "researchjobs"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Operator:
    """The operator as a local process, with the chart's settings."""

    def __init__(self, kubeconfig: Path, base_url: str, tmp: Path, log: Path | None = None) -> None:
        self.metrics_port = free_port()
        self.namespace = "research-operator-scale"
        env = {
            "KUBECONFIG": str(kubeconfig),
            "OPERATOR_NAMESPACE": self.namespace,
            "METRICS_PORT": str(self.metrics_port),
            "HEALTH_PORT": str(free_port()),
            "DEFAULT_MODEL_BASE_URL": base_url,
            # No admission policy checks authors here (the chart installs it); the only author is the
            # admin running this, who may read every Secret and ConfigMap named.
            "TRUST_AUTHORS": "true",
            "LEADER_ELECTION": "true",
            "POD_NAME": "scale-bench",
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            **{k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},  # to compare allocator settings
            # Another operator's code, measured in the same run (a worktree of an older commit).
            **({"PYTHONPATH": os.environ["OPERATOR_PYTHONPATH"]} if os.environ.get("OPERATOR_PYTHONPATH") else {}),
        }
        self.log = log or tmp / "operator.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "research_operator"],
            env=env,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                self.api_requests()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"operator did not start:\n{self.log.read_text()[-2000:]}")

    def api_requests_by(self) -> dict[str, float]:
        """The operator's API requests so far, by verb and resource."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        found = re.findall(r"^research_operator_api_requests_total\{([^}]*)\} (\S+)$", text, re.M)
        return {labels: float(n) for labels, n in found}

    def api_requests(self) -> float:
        return sum(self.api_requests_by().values())

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def sample(self, seconds: float) -> dict[str, Any]:
        """RSS and CPU-seconds per minute and API requests per second over ``seconds``."""
        cpu0, by0, t0 = self.cpu_seconds(), self.api_requests_by(), time.monotonic()
        time.sleep(seconds)
        dt = time.monotonic() - t0
        by = {k: n - by0.get(k, 0.0) for k, n in self.api_requests_by().items() if n > by0.get(k, 0.0)}
        out: dict[str, Any] = {
            "rss_mib": round(self.rss_mib(), 1),
            "cpu_s_per_min": round((self.cpu_seconds() - cpu0) * 60 / dt, 2),
            "api_req_per_s": round(sum(by.values()) / dt, 3),
        }
        if by:
            out["api_requests"] = by  # which ones, when there are any
        return out

    def settle(self, quiet: float = 10, limit: float = 600) -> float:
        """Seconds until the operator's own API requests fall below one per ``quiet`` seconds (its
        first passes over a burst of new objects are done), at most ``limit``."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            before = self.api_requests()
            time.sleep(quiet)
            if self.api_requests() - before < 1:
                break
        return time.monotonic() - t0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def parallel(fn: Callable[[Any], Any], items: Iterable[Any], workers: int = 16) -> None:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for f in concurrent.futures.as_completed([pool.submit(fn, i) for i in items]):
            f.result()


def new_namespace(core: client.CoreV1Api, prefix: str) -> str:
    ns = f"{prefix}-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": ns}})
    return ns


def delete_namespaces(core: client.CoreV1Api, names: list[str], timeout: float = 900) -> float:
    t0 = time.monotonic()
    for ns in names:
        core.delete_namespace(ns)
    while time.monotonic() - t0 < timeout:
        left = [ns for ns in names if any(n.metadata.name == ns for n in core.list_namespace().items)]
        if not left:
            break
        time.sleep(2)
    return time.monotonic() - t0


def foreign_objects(api: client.ApiClient, n: int, spread: int = 10) -> list[str]:
    """N ConfigMaps of 4 KiB and N suspended Jobs, in ``spread`` namespaces, with no label of ours."""
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    names = [new_namespace(core, "foreign") for _ in range(spread)]
    payload = "x" * 4096

    def make(i: int) -> None:
        ns = names[i % spread]
        core.create_namespaced_config_map(
            ns, {"metadata": {"name": f"cm-{i}", "labels": {"app": "other"}}, "data": {"blob": payload}}
        )
        batch.create_namespaced_job(
            ns,
            {
                "metadata": {"name": f"job-{i}", "labels": {"app": "other"}},
                "spec": {
                    "suspend": True,
                    "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}},
                },
            },
        )

    parallel(make, range(n))
    return names


def researchjob(name: str, analysts: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ResearchJob",
        "metadata": {"name": name},
        "spec": {
            "topic": "How batch schedulers share a cluster fairly",
            "analysts": {"count": analysts},
            "interview": {"maxTurns": 1},
            "sources": [{"type": "documents", "configMap": "corpus", "maxResults": 2}],
            "parallelism": {"batchSize": 1, "maxActiveJobs": 1},
        },
    }


def waiting_researchjobs(api: client.ApiClient, op: Operator, m: int) -> dict[str, Any]:
    """(c)-(e): M ResearchJobs in a namespace whose quota admits no Job."""
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    ns = new_namespace(core, "waiting")
    core.create_namespaced_resource_quota(
        ns, {"metadata": {"name": "none"}, "spec": {"hard": {"count/jobs.batch": "0"}}}
    )
    created_at: dict[str, float] = {}
    status_at: dict[str, float] = {}
    stop = threading.Event()

    def watch_status() -> None:
        # One watch, resumed from its last resourceVersion each round (a fresh one replays every
        # object, which at thousands of ResearchJobs delays this very measurement); a new one only
        # after an error.
        w, since = watch.Watch(), {}
        while not stop.is_set():
            try:
                for ev in w.stream(
                    custom.list_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, timeout_seconds=5, **since
                ):
                    obj = ev["object"]
                    name = obj["metadata"]["name"]
                    if (obj.get("status") or {}).get("phase") and name not in status_at:
                        status_at[name] = time.monotonic()
                    if stop.is_set():
                        break
                since = {"resource_version": w.resource_version} if w.resource_version else {}
            except client.ApiException as e:  # 504 "too large resource version", 410 expired
                print(f"status watch: {e.status} {e.reason}; watching again", flush=True)
                w, since = watch.Watch(), {}
                time.sleep(0.5)

    watcher = threading.Thread(target=watch_status, daemon=True)
    watcher.start()
    time.sleep(1)

    def make(i: int) -> None:
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, researchjob(f"rj-{i}"))
        created_at[f"rj-{i}"] = time.monotonic()

    t0 = time.monotonic()
    parallel(make, range(m))
    created = time.monotonic() - t0
    deadline = t0 + 900
    while time.monotonic() < deadline and len(status_at) < m:
        time.sleep(0.5)
    stop.set()
    all_status = max(status_at.values(), default=t0) - t0
    lags = sorted(status_at[n] - created_at[n] for n in status_at if n in created_at)
    with_status = len(status_at)
    settled = op.settle()
    waiting = op.sample(60)
    return {
        "M": m,
        "create_s": round(created, 1),
        "until_all_have_status_s": round(all_status, 1),
        "after_last_create_s": round(all_status - created, 1),
        "status_lag_p50_s": round(lags[len(lags) // 2], 2) if lags else None,
        "status_lag_p99_s": round(lags[min(len(lags) - 1, int(0.99 * len(lags)))], 2) if lags else None,
        "with_status": with_status,
        "settled_after_s": round(settled, 1),
        **{f"waiting_{k}": v for k, v in waiting.items()},
        "namespace": ns,
    }


def reaction_under_cap(api: client.ApiClient, op: Operator, r: int, cap: int, budget: float) -> dict[str, Any]:
    """(f): R one-analyst ResearchJobs under globalMaxActiveJobs=cap; Complete -> next Job created."""
    core, custom, batch = client.CoreV1Api(api), client.CustomObjectsApi(api), client.BatchV1Api(api)
    ns = new_namespace(core, "running")
    data = {p.name: p.read_text() for p in sorted((REPO / "tests" / "corpus").glob("*.md"))}
    core.create_namespaced_config_map(ns, {"metadata": {"name": "corpus"}, "data": data})
    settings = {
        "metadata": {"name": "scale-caps", "labels": {f"{GROUP}/kind": "operator-settings"}},
        "data": {"globalMaxActiveJobs": str(cap)},
    }
    try:
        core.create_namespaced_config_map(op.namespace, settings)
    except client.ApiException:
        core.replace_namespaced_config_map("scale-caps", op.namespace, settings)
    completes: list[float] = []
    creations: list[float] = []
    stop = threading.Event()

    def record(ev: dict[str, Any], seen: set[str]) -> None:
        job = ev["object"]
        if ev["type"] == "ADDED" and job.metadata.uid not in seen:
            seen.add(job.metadata.uid)
            creations.append(time.monotonic())
        done = any(c.type == "Complete" and c.status == "True" for c in job.status.conditions or [])
        if done and job.metadata.uid + "/done" not in seen:
            seen.add(job.metadata.uid + "/done")
            completes.append(time.monotonic())

    def watch_jobs() -> None:
        seen: set[str] = set()
        while not stop.is_set():
            w = watch.Watch()  # a new watch each round: a lagging API server may refuse a resourceVersion
            try:
                for ev in w.stream(batch.list_namespaced_job, ns, timeout_seconds=5):
                    record(ev, seen)
                    if stop.is_set():
                        break
            except client.ApiException:
                continue

    t = threading.Thread(target=watch_jobs, daemon=True)
    t.start()
    time.sleep(1)
    parallel(
        lambda i: custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, researchjob(f"rj-{i}")), range(r)
    )
    t0 = time.monotonic()
    while time.monotonic() - t0 < budget and len(completes) < 3 * r:
        time.sleep(2)
    stop.set()
    t.join(timeout=10)
    core.delete_namespaced_config_map("scale-caps", op.namespace)
    delays = []
    for done in completes:
        after = [c for c in creations if c >= done]
        if after:
            delays.append(min(after) - done)
    delays.sort()

    def pct(p: float) -> float:
        return round(delays[min(len(delays) - 1, int(p * len(delays)))] * 1000, 1) if delays else float("nan")

    return {
        "R": r,
        "cap": cap,
        "completions": len(completes),
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "mean_ms": round(statistics.mean(delays) * 1000, 1) if delays else None,
        "namespace": ns,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--foreign", type=int, nargs="*", default=[10000, 50000])
    parser.add_argument("--waiting", type=int, nargs="*", default=[1000, 5000])
    parser.add_argument("--running", type=int, default=200)
    parser.add_argument("--cap", type=int, default=8)
    parser.add_argument("--running-budget", type=float, default=600)
    parser.add_argument("--only", default="foreign,waiting,running")
    parser.add_argument("--sample", type=float, default=30, help="seconds per RSS/CPU sample")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--operator-log", type=Path, help="keep the operator's log here")
    args = parser.parse_args()
    only = set(args.only.split(","))

    cluster = Cluster()
    cluster.up()
    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    core = client.CoreV1Api(api)
    subprocess.run([str(REPO / ".venv/bin/python"), "-m", "localkube.cli", "env"], check=False, capture_output=True)
    apply_crds(cluster.kubeconfig)
    try:
        core.create_namespace({"metadata": {"name": "research-operator-scale"}})
    except client.ApiException:
        pass
    model = subprocess.Popen(
        [sys.executable, "-m", "offline_model", "--port", str(port := free_port())],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        op = Operator(cluster.kubeconfig, f"http://127.0.0.1:{port}/v1", Path(tmp), args.operator_log)
        try:
            time.sleep(5)
            results["idle"] = op.sample(args.sample)
            print("idle", results["idle"], flush=True)
            if "foreign" in only:
                for n in args.foreign:
                    t0 = time.monotonic()
                    names = foreign_objects(api, n)
                    created = time.monotonic() - t0
                    time.sleep(10)
                    loaded = op.sample(args.sample)
                    gone_s = delete_namespaces(core, names)
                    time.sleep(10)
                    after = op.sample(args.sample)
                    results[f"foreign_{n}"] = {
                        "create_s": round(created, 1),
                        "with": loaded,
                        "delete_s": round(gone_s, 1),
                        "after_delete": after,
                    }
                    print(f"foreign {n}", results[f"foreign_{n}"], flush=True)
            if "waiting" in only:
                for m in args.waiting:
                    r = waiting_researchjobs(api, op, m)
                    results[f"waiting_{m}"] = r
                    print(f"waiting {m}", r, flush=True)
                    delete_namespaces(core, [r["namespace"]])
                    time.sleep(10)
                    results[f"after_waiting_{m}"] = op.sample(args.sample)
            if "running" in only:
                r = reaction_under_cap(api, op, args.running, args.cap, args.running_budget)
                results["running"] = r
                print("running", r, flush=True)
                delete_namespaces(core, [r["namespace"]])
        finally:
            op.stop()
            model.terminate()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
