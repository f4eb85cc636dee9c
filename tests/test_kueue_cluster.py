"""The operator in Kueue mode against the real Kueue (built from the Go module proxy, see
localkube.kueue) on the local control plane, with the real worker and the offline model server.

The module starts Kueue on the session's cluster (unless it already runs: `localkube up
--with-kueue`) and stops it at the end, and restarts the session's operator in Kueue mode for its
duration. Every test gets its own ResourceFlavor and ClusterQueue, selecting only its namespace.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch

from localkube import kueue as localkueue
from research_api.names import LABEL_ANALYST
from research_api.researchjob import GROUP, PLURAL, VERSION
from tests.fixtures.cluster import ClusterHandle
from tests.fixtures.containernode import ContainerNodeHandle
from tests.fixtures.operator import OperatorProcess
from tests.fixtures.realnode import RealNodeHandle
from tests.test_container_node import model_server, placement_allowed, worker_placement
from tests.test_operator_cluster import PodEnds, create, researchjob, sections, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.kueue]

KUEUE = ("kueue.x-k8s.io", "v1beta2")
QUEUE = "research"
PRIORITIES = {"high": ("research-high", 1000), "low": ("research-low", 100)}
# One worker pod's requests (the ResearchJob default, spec.worker.resources.requests).
ONE_POD = {"cpu": "100m", "memory": "256Mi"}


@pytest.fixture(scope="module")
def kueue(cluster: ClusterHandle) -> Iterator[Path]:
    started = not localkueue.running(cluster.cluster)
    localkueue.start(cluster.cluster)
    custom = client.CustomObjectsApi(cluster.api_client())
    for wpc, value in PRIORITIES.values():
        body = {
            "apiVersion": "/".join(KUEUE),
            "kind": "WorkloadPriorityClass",
            "metadata": {"name": wpc},
            "value": value,
            "description": f"test priority {value}",
        }
        try:
            custom.create_cluster_custom_object(*KUEUE, "workloadpriorityclasses", body)
        except client.ApiException as e:
            if e.status != 409:
                raise
    yield localkueue.state_dir(cluster.cluster)
    if started:
        localkueue.stop(cluster.cluster)


@pytest.fixture(scope="module")
def kueue_operator(operator: OperatorProcess, kueue: Path) -> Iterator[OperatorProcess]:
    """The session's operator, restarted in Kueue mode for this module."""
    operator.extra_env = {
        "KUEUE_QUEUE_NAME": QUEUE,
        "KUEUE_PRIORITY_CLASSES": json.dumps({k: v[0] for k, v in PRIORITIES.items()}),
        # ResearchJobs here may also name a WorkloadPriorityClass directly (spec.priority)
        "ALLOWED_WORKLOAD_PRIORITY_CLASSES": "*",
    }
    operator.restart()
    yield operator
    operator.extra_env = {}
    operator.restart()


@dataclass
class Queue:
    cluster_queue: str
    local_queue: str = QUEUE


@pytest.fixture
def one_pod_queue(cluster: ClusterHandle, kueue: Path, namespace: str) -> Iterator[Queue]:
    """A ClusterQueue whose nominal quota admits one worker pod at a time (lower priorities are
    preempted), and the LocalQueue the operator uses, in the test's namespace."""
    custom = client.CustomObjectsApi(cluster.api_client())
    flavor, cq = f"flavor-{namespace}", f"cq-{namespace}"
    custom.create_cluster_custom_object(
        *KUEUE,
        "resourceflavors",
        {"apiVersion": "/".join(KUEUE), "kind": "ResourceFlavor", "metadata": {"name": flavor}},
    )
    custom.create_cluster_custom_object(
        *KUEUE,
        "clusterqueues",
        {
            "apiVersion": "/".join(KUEUE),
            "kind": "ClusterQueue",
            "metadata": {"name": cq},
            "spec": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "preemption": {"withinClusterQueue": "LowerPriority"},
                "resourceGroups": [
                    {
                        "coveredResources": ["cpu", "memory"],
                        "flavors": [
                            {
                                "name": flavor,
                                "resources": [{"name": r, "nominalQuota": q} for r, q in ONE_POD.items()],
                            }
                        ],
                    }
                ],
            },
        },
    )
    custom.create_namespaced_custom_object(
        *KUEUE,
        namespace,
        "localqueues",
        {
            "apiVersion": "/".join(KUEUE),
            "kind": "LocalQueue",
            "metadata": {"name": QUEUE},
            "spec": {"clusterQueue": cq},
        },
    )
    yield Queue(cq)
    for plural, name in (("clusterqueues", cq), ("resourceflavors", flavor)):
        try:
            custom.delete_cluster_custom_object(*KUEUE, plural, name)
        except client.ApiException as e:
            if e.status != 404:
                raise


def test_kueue_webhooks_are_served_on_loopback_and_jobs_without_a_queue_run_at_once(
    cluster: ClusterHandle, kueue: Path, namespace: str
) -> None:
    api = cluster.api_client()
    admission = client.AdmissionregistrationV1Api(api)
    ca = base64.b64encode((cluster.state_dir / "pki" / "ca.crt").read_bytes()).decode()
    hooks = [
        *admission.read_mutating_webhook_configuration("kueue-mutating-webhook-configuration").webhooks,
        *admission.read_validating_webhook_configuration("kueue-validating-webhook-configuration").webhooks,
    ]
    assert {"mjob.kb.io", "vjob.kb.io", "mworkload.kb.io", "vclusterqueue.kb.io"} <= {h.name for h in hooks}
    for hook in hooks:
        assert hook.client_config.service is None and hook.client_config.url.startswith("https://127.0.0.1:")
        assert hook.client_config.ca_bundle == ca, hook.name
        groups = {g for rule in hook.rules for g in rule.api_groups}
        assert groups <= {"kueue.x-k8s.io", "batch"}, (hook.name, groups)  # nothing blocks Pods or Deployments

    # A Job without kueue.x-k8s.io/queue-name passes Kueue's webhooks untouched and runs at once.
    batch = client.BatchV1Api(api)
    sc = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}
    pod = {
        "restartPolicy": "Never",
        "securityContext": {"runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [
            {"name": "main", "image": "python", "command": ["python", "-c", "print(1)"], "securityContext": sc}
        ],
    }
    batch.create_namespaced_job(namespace, {"metadata": {"name": "plain"}, "spec": {"template": {"spec": pod}}})
    assert not batch.read_namespaced_job("plain", namespace).spec.suspend
    deadline = time.monotonic() + 60
    while not any(c.type == "Complete" for c in batch.read_namespaced_job("plain", namespace).status.conditions or []):
        assert time.monotonic() < deadline, "a Job without a queue name did not run"
        time.sleep(0.2)


class Recorder(threading.Thread):
    """Watches the namespace's pods and Jobs: how many worker pods ran at once, every pod of every
    Job, how each Job was created and when Kueue suspended a Job that had been running."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        super().__init__(daemon=True)
        self.core, self.batch = client.CoreV1Api(api), client.BatchV1Api(api)
        self.namespace = namespace
        self.live: dict[str, str] = {}  # pod -> phase, while it may run (not terminal, not deleted)
        self.max_live = 0
        self.max_live_at: list[str] = []
        self.pods_of_job: dict[str, set[str]] = defaultdict(set)
        self.created: dict[str, Any] = {}  # Job name -> its first observed object
        self.ran: set[str] = set()  # Jobs seen unsuspended
        self.preemptions: Counter[str] = Counter()  # Job -> times suspended again after running
        self.unfinished: dict[str, set[str]] = defaultdict(set)  # ResearchJob -> its unfinished batch Jobs
        self.max_unfinished: Counter[str] = Counter()
        self.running_now: set[str] = set()
        self.stop_flag = threading.Event()
        self.threads = [
            threading.Thread(target=self._pods, daemon=True),
            threading.Thread(target=self._jobs, daemon=True),
        ]
        self.lock = threading.Lock()

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _pods(self) -> None:
        w = watch.Watch()
        while not self.stop_flag.is_set():
            for ev in w.stream(self.core.list_namespaced_pod, self.namespace, timeout_seconds=5):
                pod = ev["object"]
                name, phase = pod.metadata.name, pod.status.phase
                with self.lock:
                    job = (pod.metadata.labels or {}).get("job-name")
                    if job:
                        self.pods_of_job[job].add(name)
                    if ev["type"] == "DELETED" or phase in ("Succeeded", "Failed"):
                        self.live.pop(name, None)
                    else:
                        self.live[name] = phase
                    if len(self.live) > self.max_live:
                        self.max_live, self.max_live_at = len(self.live), sorted(self.live)
                if self.stop_flag.is_set():
                    break

    def _jobs(self) -> None:
        w = watch.Watch()
        while not self.stop_flag.is_set():
            for ev in w.stream(self.batch.list_namespaced_job, self.namespace, timeout_seconds=5):
                job = ev["object"]
                name = job.metadata.name
                with self.lock:
                    self.created.setdefault(name, job)
                    labels = job.metadata.labels or {}
                    if labels.get(f"{GROUP}/step") == "interview":
                        rj, done = labels.get(f"{GROUP}/job", ""), ev["type"] == "DELETED"
                        conds = {c.type for c in job.status.conditions or [] if c.status == "True"}
                        if done or conds & {"Complete", "Failed"}:
                            self.unfinished[rj].discard(name)
                        else:
                            self.unfinished[rj].add(name)
                        self.max_unfinished[rj] = max(self.max_unfinished[rj], len(self.unfinished[rj]))
                    if not job.spec.suspend:
                        self.ran.add(name)
                        self.running_now.add(name)
                    elif name in self.running_now:
                        self.running_now.discard(name)
                        self.preemptions[name] += 1
                if self.stop_flag.is_set():
                    break

    def stop(self) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=10)


@dataclass
class StatusLog:
    """Every distinct (phase, WaitingForKueue, message, active Jobs) a ResearchJob showed."""

    seen: list[dict[str, Any]] = field(default_factory=list)

    def add(self, status: dict[str, Any]) -> None:
        conds = {c["type"]: c for c in status.get("conditions") or []}
        entry = {
            "phase": status.get("phase"),
            "waiting": conds.get("WaitingForKueue", {}).get("status"),
            "reason": conds.get("WaitingForKueue", {}).get("reason"),
            "cond_message": conds.get("WaitingForKueue", {}).get("message", ""),
            "message": status.get("message", ""),
            "active": tuple(status.get("activeJobs") or ()),
            "queued": (status.get("batches") or {}).get("queued", 0),
        }
        if not self.seen or self.seen[-1] != entry:
            self.seen.append(entry)


def follow(api: client.ApiClient, namespace: str, names: list[str], stop: threading.Event) -> dict[str, StatusLog]:
    """Poll the ResearchJobs' status until ``stop`` is set (in a thread); returns the logs."""
    logs = {n: StatusLog() for n in names}
    custom = client.CustomObjectsApi(api)

    def run() -> None:
        while not stop.is_set():
            for n in names:
                try:
                    obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, n)
                except client.ApiException:
                    continue
                logs[n].add(obj.get("status") or {})
            time.sleep(0.3)

    threading.Thread(target=run, daemon=True).start()
    return logs


def worker_logs(cluster: ClusterHandle, namespace: str, pods: set[str]) -> dict[str, str]:
    return {p: cluster.pod_log(namespace, p) for p in sorted(pods)}


def test_one_pod_quota_runs_every_step_through_kueue_one_pod_at_a_time(
    cluster: ClusterHandle,
    kueue_operator: OperatorProcess,
    namespace: str,
    corpus_configmap: str,
    one_pod_queue: Queue,
) -> None:
    api = cluster.api_client()
    rec = Recorder(api, namespace)
    rec.start()
    stop = threading.Event()
    logs = follow(api, namespace, ["queued"], stop)
    # Four batches, maxActiveJobs 2: the operator hands two batch Jobs at a time to Kueue (the caps
    # apply on top of Kueue), and the ClusterQueue's quota runs one of them.
    body = researchjob(
        "queued", corpus_configmap, analysts={"count": 4}, parallelism={"batchSize": 1, "maxActiveJobs": 2}
    )
    create(api, namespace, body)
    obj = wait_phase(api, namespace, "queued", {"Succeeded", "Failed"}, timeout=400)
    stop.set()
    rec.stop()
    status = obj["status"]
    assert status["phase"] == "Succeeded", status
    assert status["progress"] == "4/4" and len(sections(api, namespace)) == 4

    # Every worker Job was created suspended in the LocalQueue: the planner (which goes on to
    # interview batch 0), the 3 other batches, and a writer only if no batch pod wrote the report.
    steps = Counter(job.metadata.labels[f"{GROUP}/step"] for job in rec.created.values())
    assert steps["plan"] == 1 and steps["interview"] == 3 and steps["write"] <= 1, sorted(rec.created)
    for name, job in rec.created.items():
        assert job.spec.suspend is True, name
        assert job.metadata.labels["kueue.x-k8s.io/queue-name"] == QUEUE, name
        assert "kueue.x-k8s.io/priority-class" not in job.metadata.labels  # no spec.priority
    assert rec.ran == set(rec.created)  # Kueue admitted each
    # Never more than one worker pod at a time, and never more than maxActiveJobs batch Jobs handed
    # to Kueue, though that many were (one running, one waiting in the queue).
    assert rec.max_live == 1, rec.max_live_at
    assert rec.max_unfinished["queued"] == 2, rec.max_unfinished
    seen = logs["queued"].seen
    assert max(e["queued"] for e in seen) >= 2, seen
    # While Jobs waited, the status said so, naming the LocalQueue and the ClusterQueue.
    where = f"LocalQueue {QUEUE} (ClusterQueue {one_pod_queue.cluster_queue})"
    waits = [e for e in seen if e["waiting"] == "True"]
    assert waits, seen
    assert any(e["reason"] == "Pending" and where in e["cond_message"] for e in waits), waits
    assert any(e["phase"] == "Interviewing" and where in e["message"] and e["active"] for e in seen), seen
    final = {c["type"]: c for c in status["conditions"]}["WaitingForKueue"]
    assert (final["status"], final["reason"]) == ("False", "NotWaiting")


def interviews_by_analyst(logs: dict[str, str], pods_of_batch: dict[int, set[str]]) -> dict[int, int]:
    """How many pods of each batch (one analyst each) interviewed rather than skipped it."""
    return {
        batch: sum(1 for p in pods if "already have sections; skipping" not in logs.get(p, ""))
        for batch, pods in pods_of_batch.items()
    }


def test_higher_priority_preempts_a_running_batch_and_both_finish(
    cluster: ClusterHandle,
    kueue_operator: OperatorProcess,
    namespace: str,
    corpus_configmap: str,
    one_pod_queue: Queue,
    modelserver_factory: Any,
) -> None:
    api = cluster.api_client()
    custom = client.CustomObjectsApi(api)
    # The low-priority job talks to a slow model, so its interviews are in flight long enough to
    # be preempted; the high-priority one uses the session's fast server.
    slow = modelserver_factory(ttft_ms=1200)
    rec = Recorder(api, namespace)
    rec.start()
    stop = threading.Event()
    logs = follow(api, namespace, ["low", "high"], stop)
    low = researchjob(
        "low",
        corpus_configmap,
        analysts={"count": 3},
        parallelism={"batchSize": 1, "maxActiveJobs": 3},
        model={"baseUrl": slow.base_url},
        priority="low",
    )
    create(api, namespace, low)

    # Wait until a low batch runs mid-interview after at least one section is stored.
    deadline = time.monotonic() + 300
    while True:
        assert time.monotonic() < deadline, logs["low"].seen[-3:]
        st = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "low").get("status") or {}
        # A model call in flight while a batch pod runs: an interview is under way.
        if st.get("sectionsDone", 0) >= 1 and st.get("activeJobs") and slow.stats()["running"] > 0:
            break
        time.sleep(0.2)
    create(api, namespace, researchjob("high", corpus_configmap, analysts={"count": 2}, priority="high"))

    objs = {n: wait_phase(api, namespace, n, {"Succeeded", "Failed"}, timeout=600) for n in ("high", "low")}
    stop.set()
    rec.stop()
    for n, o in objs.items():
        assert o["status"]["phase"] == "Succeeded", (n, o["status"])

    # Kueue preempted a running low batch: suspended again, not replaced by a second Job.
    low_jobs = sorted(j for j in rec.created if j.startswith("low-"))
    batches = {j for j in low_jobs if rec.created[j].metadata.labels[f"{GROUP}/step"] == "interview"}
    assert {j for j in batches if rec.preemptions[j]}, (rec.preemptions, low_jobs)
    # One Job each, whatever happened: the planner (with batch 0), 2 batches, a writer at most.
    steps = Counter(rec.created[j].metadata.labels[f"{GROUP}/step"] for j in low_jobs)
    assert steps["plan"] == 1 and steps["interview"] == 2 and steps["write"] <= 1, low_jobs
    assert not [j for j in rec.created if j.startswith("high-") and rec.preemptions[j]]
    assert any(e["reason"] == "Evicted" for e in logs["low"].seen), logs["low"].seen
    for name, job in rec.created.items():
        want = "research-high" if name.startswith("high-") else "research-low"
        assert job.metadata.labels["kueue.x-k8s.io/priority-class"] == want, name

    # No section lost or written twice: each analyst's section was stored by exactly one pod.
    pods_low = {p for j in low_jobs for p in rec.pods_of_job[j]}
    texts = worker_logs(cluster, namespace, pods_low)
    stored = Counter(
        int(m.group(1)) for text in texts.values() for m in re.finditer(r"analyst (\d+) \(.*?\): section stored", text)
    )
    assert stored == Counter({0: 1, 1: 1, 2: 1}), stored
    assert len(sections(api, namespace)) == 3 + 2
    assert objs["low"]["status"]["progress"] == "3/3" and objs["high"]["status"]["progress"] == "2/2"
    # No analyst interviewed again beyond the preempted in-flight one: a batch's analyst was
    # interviewed once, plus once more per time its Job was preempted.
    batch_of = {j: int(rec.created[j].metadata.labels[f"{GROUP}/batch"]) for j in batches}
    counts = interviews_by_analyst(texts, {b: rec.pods_of_job[j] for j, b in batch_of.items()})
    for job_name, b in batch_of.items():
        assert 1 <= counts[b] <= 1 + rec.preemptions[job_name], (counts, rec.preemptions)
    extra = sum(counts.values()) - len(counts)
    assert slow.stats()["by_kind"]["section"] <= 3 + extra


def test_a_missing_workload_priority_class_is_named_in_the_status_and_nothing_is_lost(
    cluster: ClusterHandle,
    kueue_operator: OperatorProcess,
    namespace: str,
    corpus_configmap: str,
    one_pod_queue: Queue,
) -> None:
    api = cluster.api_client()
    custom = client.CustomObjectsApi(api)
    wpc = f"missing-{namespace}"  # spec.priority not in the mapping: the class of that name
    create(api, namespace, researchjob("urgent", corpus_configmap, analysts={"count": 1}, priority=wpc))
    deadline = time.monotonic() + 60
    while True:
        st = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "urgent").get("status") or {}
        cond = {c["type"]: c for c in st.get("conditions") or []}.get("WaitingForKueue", {})
        if cond.get("reason") == "NoWorkload":
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.5)
    assert f"WorkloadPriorityClass {wpc} exists" in cond["message"] and st["phase"] == "Planning"
    assert f"WorkloadPriorityClass {wpc} exists" in st["message"]
    # The admin creates the class: Kueue makes the Workload, the job runs to the end.
    body = {"apiVersion": "/".join(KUEUE), "kind": "WorkloadPriorityClass", "metadata": {"name": wpc}, "value": 10}
    custom.create_cluster_custom_object(*KUEUE, "workloadpriorityclasses", body)
    try:
        obj = wait_phase(api, namespace, "urgent", {"Succeeded", "Failed"}, timeout=300)
        assert obj["status"]["phase"] == "Succeeded", obj["status"]
    finally:
        custom.delete_cluster_custom_object(*KUEUE, "workloadpriorityclasses", wpc)


@pytest.mark.image
def test_on_a_container_or_real_node_a_preempted_worker_stops_on_sigterm_and_its_readmitted_pod_resumes(
    cluster: ClusterHandle,
    kueue_operator: OperatorProcess,
    container_or_real_node: ContainerNodeHandle | RealNodeHandle,
    namespace: str,
    corpus_configmap: str,
    one_pod_queue: Queue,
) -> None:
    """Kueue preempts a running low-priority batch whose worker is a container on the container node
    or the real node (its pid 1): Kueue suspends the Job, the Job controller deletes the pod, the
    node sends SIGTERM (through runc, or the kubelet through containerd). The worker stops by itself
    (exit 143, not the SIGKILL at the end of the grace period), keeps what it stored; the Job
    readmitted later runs a new pod that resumes the interrupted interview from its checkpoint, and
    every analyst's section is stored exactly once."""
    api, node = cluster.api_client(), container_or_real_node
    core = client.CoreV1Api(api)
    # One request at a time, 0.7 s each: an interview of three turns is under way for seconds.
    model_server(core, namespace, node, "--ttft-ms", "700")
    model = {"baseUrl": f"http://model.{namespace}.svc/v1", "maxConcurrency": 1}
    rec = Recorder(api, namespace)
    rec.start()
    ends = PodEnds(api, namespace)
    ends.start()
    placement = worker_placement(node)
    low = researchjob(
        "low",
        corpus_configmap,
        analysts={"count": 2},
        interview={"maxTurns": 3},
        parallelism={"batchSize": 1, "maxActiveJobs": 2},
        model=model,
        priority="low",
        worker=placement,
    )
    with placement_allowed(kueue_operator):
        create(api, namespace, low)
        # Wait until an interview is under way: a checkpoint of an analyst whose section is not
        # stored yet, while a low worker pod runs.
        deadline = time.monotonic() + 300
        while True:
            assert time.monotonic() < deadline, "no interview was ever under way"
            cms = core.list_namespaced_config_map(namespace).items
            stored = {
                (c.metadata.labels or {}).get(LABEL_ANALYST)
                for c in cms
                if (c.metadata.labels or {}).get(f"{GROUP}/kind") == "section"
            }
            under_way = {
                str(int(m.group(1)))
                for c in cms
                if (m := re.match(r"low-[0-9a-f]+-checkpoint-(\d+)$", c.metadata.name))
            } - stored
            running = [
                p
                for p in core.list_namespaced_pod(namespace, label_selector=f"{GROUP}/job=low").items
                if p.status.phase == "Running"
            ]
            if under_way and running:
                break
            time.sleep(0.2)
        victim = running[0].metadata.name
        high = researchjob("high", corpus_configmap, analysts={"count": 1}, model=model, priority="high")
        high["spec"]["worker"] = placement
        create(api, namespace, high)
        objs = {n: wait_phase(api, namespace, n, {"Succeeded", "Failed"}, timeout=400) for n in ("high", "low")}
    rec.stop()
    ends.stop()
    for n, o in objs.items():
        assert o["status"]["phase"] == "Succeeded", (n, o["status"])

    # Kueue preempted the running low Job: suspended again, not replaced by a second Job.
    low_jobs = sorted(j for j in rec.created if j.startswith("low-"))
    preempted = [j for j in low_jobs if rec.preemptions[j]]
    assert preempted, (rec.preemptions, low_jobs)
    assert victim in {p for j in preempted for p in rec.pods_of_job[j]}, (victim, dict(rec.pods_of_job))
    # Its worker, the container's pid 1, stopped on SIGTERM by itself.
    assert ends.terminated[victim].exit_code == 143, ends.terminated[victim]
    pods_low = {p for j in low_jobs for p in rec.pods_of_job[j]}
    logs = {p: node.pod_log(namespace, p) for p in sorted(pods_low)}
    assert "SIGTERM: stopping; no further model calls, what is stored stays stored" in logs[victim]
    # Every pod of both ResearchJobs was a container there, with its own IP.
    for p in core.list_namespaced_pod(namespace).items:
        assert p.spec.node_name == node.name, p.metadata.name
        assert p.status.pod_ip and p.status.pod_ip.startswith("10.244."), (p.metadata.name, p.status.pod_ip)

    # Nothing lost, nothing done twice: the plan stored once, each analyst's section stored by
    # exactly one pod, and the readmitted pod resumed the interrupted interview mid-way.
    text = "".join(logs.values())
    assert text.count("stored 2 analysts") == 1, text[-3000:]
    stored_by = Counter(int(m) for m in re.findall(r"analyst (\d+) \(.*?\): section stored", text))
    assert stored_by == Counter({0: 1, 1: 1}), stored_by
    later = [t for p, t in logs.items() if p != victim and p in {q for j in preempted for q in rec.pods_of_job[j]}]
    assert any(re.search(r"analyst \d+: resuming the interview at \S+", t) for t in later), later
    assert len(sections(api, namespace)) == 2 + 1
    assert objs["low"]["status"]["progress"] == "2/2" and objs["high"]["status"]["progress"] == "1/1"
