"""The operator on the real control plane, with the real worker and the offline model server."""

from __future__ import annotations

import json
import random
import re
import signal
import threading
import time
from collections import defaultdict
from typing import Any

import pytest
from kubernetes import client, watch

from research_api.estimate import estimate
from research_api.names import ANNOTATION_JOB_UID, CHECKPOINT, LABEL_KIND, REPORT_CLAIM, configmap_name
from research_api.researchjob import GROUP, PLURAL, VERSION, ResearchJobSpec
from tests.fixtures.cluster import ClusterHandle
from tests.fixtures.operator import OperatorProcess

pytestmark = pytest.mark.cluster

STEP = f"{GROUP}/step"


class JobWatch(threading.Thread):
    """Watches the namespace's Jobs and records how many ran at once and every Job created."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        super().__init__(daemon=True)
        self.batch = client.BatchV1Api(api)
        self.namespace = namespace
        self.active: dict[str, str] = {}  # name -> step
        self.max_active_interviews = 0
        self.max_active_all = 0
        self.uids: dict[str, set[str]] = defaultdict(set)
        self.labels: dict[str, dict[str, str]] = {}  # every Job seen: its labels
        self.stop_flag = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        w = watch.Watch()
        while not self.stop_flag.is_set():
            self.ready.set()
            for ev in w.stream(self.batch.list_namespaced_job, self.namespace, timeout_seconds=5):
                job = ev["object"]
                name = job.metadata.name
                self.uids[name].add(job.metadata.uid)
                self.labels[name] = dict(job.metadata.labels or {})
                conds = {c.type for c in job.status.conditions or [] if c.status == "True"}
                finished = bool(conds & {"Complete", "Failed"}) or ev["type"] == "DELETED"
                if finished:
                    self.active.pop(name, None)
                else:
                    self.active[name] = (job.metadata.labels or {}).get(STEP, "")
                interviews = sum(1 for s in self.active.values() if s == "interview")
                self.max_active_interviews = max(self.max_active_interviews, interviews)
                self.max_active_all = max(self.max_active_all, len(self.active))
                if self.stop_flag.is_set():
                    break

    def stop(self) -> None:
        self.stop_flag.set()
        self.join(timeout=10)


def watch_jobs(api: client.ApiClient, namespace: str) -> JobWatch:
    """A started JobWatch of the namespace, its first watch open."""
    jobs = JobWatch(api, namespace)
    jobs.start()
    jobs.ready.wait(5)
    return jobs


def researchjob(name: str, corpus: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "topic": "How Kubernetes runs and limits batch workloads",
        "analysts": {"count": 6},
        "interview": {"maxTurns": 1},
        "sources": [{"type": "documents", "configMap": corpus, "maxResults": 2}],
        "parallelism": {"batchSize": 2, "maxActiveJobs": 2},
    }
    body.update(spec)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ResearchJob", "metadata": {"name": name}, "spec": body}


def wait_phase(
    api: client.ApiClient, namespace: str, name: str, phases: set[str], timeout: float = 300
) -> dict[str, Any]:
    custom = client.CustomObjectsApi(api)
    deadline = time.monotonic() + timeout
    obj: dict[str, Any] = {}
    while time.monotonic() < deadline:
        obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        if (obj.get("status") or {}).get("phase") in phases:
            return obj
        time.sleep(0.5)
    raise AssertionError(f"{name} did not reach {phases} in {timeout}s; status: {obj.get('status')}")


def report_text(api: client.ApiClient, namespace: str, obj: dict[str, Any]) -> str:
    ref = obj["status"]["report"]
    cm = client.CoreV1Api(api).read_namespaced_config_map(ref["configMap"], namespace)
    return str(cm.data[ref["key"]])


def sections(api: client.ApiClient, namespace: str) -> list[Any]:
    return client.CoreV1Api(api).list_namespaced_config_map(namespace, label_selector=f"{GROUP}/kind=section").items


def create(api: client.ApiClient, namespace: str, body: dict[str, Any]) -> None:
    client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)


def test_six_analysts_in_batches_of_two_end_with_a_report(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, corpus_configmap: str
) -> None:
    api = cluster.api_client()
    jobs = watch_jobs(api, namespace)
    create(api, namespace, researchjob("panel", corpus_configmap))
    obj = wait_phase(api, namespace, "panel", {"Succeeded", "Failed"})
    jobs.stop()
    status = obj["status"]
    assert status["phase"] == "Succeeded", status
    assert status["progress"] == "6/6"
    assert len(sections(api, namespace)) == 6
    assert jobs.max_active_interviews <= 2
    assert jobs.max_active_interviews == 2, "two batches should have run side by side"
    report = report_text(api, namespace, obj)
    for heading in ("Introduction", "Conclusion", "Sources"):
        assert heading in report
    assert "[1]" in report
    assert {c["type"]: c["status"] for c in status["conditions"]}["Complete"] == "True"
    events = client.CoreV1Api(api).list_namespaced_event(namespace, field_selector="involvedObject.name=panel").items
    reasons = {e.reason for e in events}
    # Writing may pass unseen: the pod that stores the last section writes the report at once.
    assert {"Planning", "Interviewing", "Succeeded"} <= reasons
    out = cluster.kubectl("get", "rj", "-n", namespace).stdout
    assert "Succeeded" in out and "6/6" in out


def test_job_count_quota_of_one_runs_one_job_at_a_time(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, corpus_configmap: str
) -> None:
    api = cluster.api_client()
    core = client.CoreV1Api(api)
    core.create_namespaced_resource_quota(
        namespace, {"metadata": {"name": "one-job"}, "spec": {"hard": {"count/jobs.batch": "1"}}}
    )
    while not (core.read_namespaced_resource_quota("one-job", namespace).status.used or {}):
        time.sleep(0.2)
    jobs = watch_jobs(api, namespace)
    create(api, namespace, researchjob("quota", corpus_configmap, analysts={"count": 4}))
    seen_quota_wait = False
    custom = client.CustomObjectsApi(api)
    deadline = time.monotonic() + 400
    obj: dict[str, Any] = {}
    while time.monotonic() < deadline:
        obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "quota")
        conds = {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}
        if conds.get("QuotaExceeded", {}).get("status") == "True":
            seen_quota_wait = True
        if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            break
        time.sleep(0.3)
    jobs.stop()
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    assert seen_quota_wait, "QuotaExceeded was never visible while batches waited"
    assert jobs.max_active_all <= 1
    assert len(sections(api, namespace)) == 4


def test_killing_the_operator_at_random_points_still_succeeds_without_duplicates(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, corpus_configmap: str
) -> None:
    api = cluster.api_client()
    jobs = watch_jobs(api, namespace)
    create(api, namespace, researchjob("chaos", corpus_configmap))
    rng = random.Random(7)
    custom = client.CustomObjectsApi(api)
    for _ in range(4):
        time.sleep(rng.uniform(0.5, 4.0))
        operator.kill(signal.SIGKILL)
        time.sleep(rng.uniform(0.0, 1.0))
        operator.start()
        phase = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "chaos").get("status") or {}
        if phase.get("phase") in ("Succeeded", "Failed"):
            break
    obj = wait_phase(api, namespace, "chaos", {"Succeeded", "Failed"})
    jobs.stop()
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    assert len(sections(api, namespace)) == 6
    duplicated = {name: uids for name, uids in jobs.uids.items() if len(uids) > 1}
    assert not duplicated, f"Jobs created more than once: {duplicated}"
    assert jobs.max_active_interviews <= 2


def patch_spec(api: client.ApiClient, namespace: str, name: str, spec: dict[str, Any]) -> None:
    client.CustomObjectsApi(api).patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, {"spec": spec})


def test_review_waits_for_a_human_and_feedback_plans_again(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, corpus_configmap: str
) -> None:
    api = cluster.api_client()
    create(api, namespace, researchjob("review", corpus_configmap, analysts={"count": 2, "review": True}))
    obj = wait_phase(api, namespace, "review", {"AwaitingReview", "Failed"})
    status = obj["status"]
    assert status["phase"] == "AwaitingReview"
    first_plan = status["planId"]
    assert len(status["analysts"]) == 2 and all(a["name"] and a["role"] for a in status["analysts"])
    assert not sections(api, namespace), "no interview may start before approval"
    described = cluster.kubectl("describe", "rj", "review", "-n", namespace).stdout
    assert "AwaitingReview" in described

    patch_spec(api, namespace, "review", {"analysts": {"feedback": "Add an analyst focused on cost and quotas"}})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = wait_phase(api, namespace, "review", {"AwaitingReview", "Failed"})["status"]
        if status.get("planId") != first_plan:
            break
        time.sleep(0.5)
    assert status["phase"] == "AwaitingReview" and status["planId"] != first_plan

    patch_spec(api, namespace, "review", {"analysts": {"approved": True}})
    obj = wait_phase(api, namespace, "review", {"Succeeded", "Failed"})
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    assert obj["status"]["planId"] != first_plan


def test_deleting_a_researchjob_removes_everything_it_made(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, corpus_configmap: str
) -> None:
    api = cluster.api_client()
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    create(api, namespace, researchjob("gone", corpus_configmap, analysts={"count": 2}))
    wait_phase(api, namespace, "gone", {"Succeeded", "Failed"})
    owned = f"{GROUP}/job=gone"
    assert core.list_namespaced_config_map(namespace, label_selector=f"{GROUP}/kind").items
    client.CustomObjectsApi(api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "gone")
    deadline = time.monotonic() + 60
    left: list[str] = []
    while time.monotonic() < deadline:
        left = [c.metadata.name for c in core.list_namespaced_config_map(namespace, label_selector=owned).items]
        left += [j.metadata.name for j in batch.list_namespaced_job(namespace, label_selector=owned).items]
        left += [
            s.metadata.name for s in core.list_namespaced_service_account(namespace).items if "gone" in s.metadata.name
        ]
        if not left:
            break
        time.sleep(0.5)
    assert not left, f"left behind: {left}"
    assert core.read_namespaced_config_map(corpus_configmap, namespace), "the user's own ConfigMap stays"


def test_metrics_report_phases_reconciles_and_api_requests(operator: OperatorProcess) -> None:
    text = operator.metrics()
    for metric in (
        "research_operator_researchjobs{",
        "research_operator_batches_active",
        "research_operator_batches_queued",
        "research_operator_reconcile_seconds_bucket",
        "research_operator_api_requests_total{",
    ):
        assert metric in text, metric


def test_a_second_replica_stands_by_until_the_leader_dies(
    cluster: ClusterHandle, operator: OperatorProcess, tmp_path: Any
) -> None:
    coord = client.CoordinationV1Api(cluster.api_client())
    ns = operator.env["OPERATOR_NAMESPACE"]
    holder = coord.read_namespaced_lease("research-operator-leader", ns).spec.holder_identity
    standby = operator.replica("standby", tmp_path / "standby.log")
    standby.start()
    try:
        time.sleep(3)
        assert coord.read_namespaced_lease("research-operator-leader", ns).spec.holder_identity == holder
        assert "acquired leadership" not in standby.log()
        operator.kill(signal.SIGKILL)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and "acquired leadership" not in standby.log():
            time.sleep(0.5)
        assert "acquired leadership" in standby.log()
        assert coord.read_namespaced_lease("research-operator-leader", ns).spec.holder_identity == "standby"
    finally:
        standby.kill()
        operator.start()


def test_budget_exhausted_ends_failed_with_the_reason(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, corpus_configmap: str
) -> None:
    api = cluster.api_client()
    create(api, namespace, researchjob("thrifty", corpus_configmap, analysts={"count": 4}, budget={"maxTokens": 1000}))
    obj = wait_phase(api, namespace, "thrifty", {"Succeeded", "Failed"})
    status = obj["status"]
    assert status["phase"] == "Failed", status
    assert "token" in status["message"], status["message"]
    assert status["tokensUsed"] > 0
    events = client.CoreV1Api(api).list_namespaced_event(namespace, field_selector="involvedObject.name=thrifty").items
    assert any(e.type == "Warning" for e in events)


def test_a_researchjob_above_its_estimate_ceiling_waits_with_the_figures_until_the_ceiling_is_raised(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, corpus_configmap: str
) -> None:
    api = cluster.api_client()
    custom = client.CustomObjectsApi(api)
    body = researchjob("capped", corpus_configmap, analysts={"count": 2}, budget={"maxEstimatedTokens": 1000})
    create(api, namespace, body)
    documents = client.CoreV1Api(api).read_namespaced_config_map(corpus_configmap, namespace).data
    expected = estimate(ResearchJobSpec.model_validate(body["spec"]), documents)
    deadline = time.monotonic() + 60
    status: dict[str, Any] = {}
    while time.monotonic() < deadline and status.get("waitingFor") != "EstimateExceedsCeiling":
        time.sleep(0.5)
        status = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "capped").get("status") or {}
    assert status.get("waitingFor") == "EstimateExceedsCeiling", status
    assert status["phase"] == "Pending"
    assert status["estimate"]["tokens"] == expected.tokens and status["estimate"]["calls"] == expected.calls
    held = {c["type"]: c for c in status["conditions"]}["EstimateAboveCeiling"]
    assert (held["status"], held["reason"]) == ("True", "EstimateExceedsCeiling")
    assert f"estimated {expected.tokens} tokens" in held["message"] and "maxEstimatedTokens 1000" in held["message"]
    time.sleep(2)  # a few passes more: still nothing started
    assert client.BatchV1Api(api).list_namespaced_job(namespace).items == []
    events = client.CoreV1Api(api).list_namespaced_event(namespace, field_selector="involvedObject.name=capped").items
    assert [(e.type, e.reason) for e in events if e.reason == "EstimateExceedsCeiling"] == [
        ("Warning", "EstimateExceedsCeiling")
    ]
    wide = cluster.kubectl("get", "rj", "capped", "-n", namespace, "-o", "wide").stdout
    assert "EstimateExceedsCeiling" in wide and str(expected.tokens) in wide

    raised = {"spec": {"budget": {"maxEstimatedTokens": expected.tokens}}}
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "capped", raised)
    obj = wait_phase(api, namespace, "capped", {"Succeeded", "Failed"})
    status = obj["status"]
    assert status["phase"] == "Succeeded", status
    assert status["estimate"]["tokens"] == expected.tokens, "the estimate made before it started stays"
    assert {c["type"]: c["status"] for c in status["conditions"]}["EstimateAboveCeiling"] == "False"
    assert abs(status["tokensUsed"] - expected.tokens) <= 0.25 * status["tokensUsed"], status["tokensUsed"]


def test_an_endpoint_that_rejects_the_key_fails_fast_with_the_workers_message(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, corpus_configmap: str, modelserver_factory: Any
) -> None:
    locked = modelserver_factory(api_key="the-right-key")
    api = cluster.api_client()
    client.CoreV1Api(api).create_namespaced_secret(
        namespace, {"metadata": {"name": "llm"}, "stringData": {"api-key": "a-wrong-key"}}
    )
    model = {"baseUrl": locked.base_url, "apiKeySecretRef": {"name": "llm", "key": "api-key"}}
    create(api, namespace, researchjob("locked", corpus_configmap, analysts={"count": 2}, model=model))
    start = time.monotonic()
    obj = wait_phase(api, namespace, "locked", {"Succeeded", "Failed"}, timeout=120)
    elapsed = time.monotonic() - start
    status = obj["status"]
    assert status["phase"] == "Failed"
    assert "rejected the API key" in status["message"], status["message"]
    assert "a-wrong-key" not in str(obj)
    # FailJob on the worker's exit code 3: one pod, no retries spent on a key that cannot work.
    planner = f"locked-{status['planId']}-plan"
    pods = client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=f"job-name={planner}").items
    assert len(pods) == 1, [p.metadata.name for p in pods]
    assert elapsed < 90


def test_a_big_researchjob_does_not_starve_a_small_one_under_a_global_cap(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, corpus_configmap: str
) -> None:
    api = cluster.api_client()
    core = client.CoreV1Api(api)
    settings = {
        "metadata": {"name": "fairness-caps", "labels": {f"{GROUP}/kind": "operator-settings"}},
        "data": {"globalMaxActiveJobs": "2"},
    }
    op_ns = operator.env["OPERATOR_NAMESPACE"]
    core.create_namespaced_config_map(op_ns, settings)
    try:
        deadline = time.monotonic() + 30
        while "globalMaxActiveJobs=2" not in operator.log():
            assert time.monotonic() < deadline, "the operator never applied the new cap"
            time.sleep(0.3)
        jobs = watch_jobs(api, namespace)
        big = researchjob(
            "big", corpus_configmap, analysts={"count": 12}, parallelism={"batchSize": 1, "maxActiveJobs": 4}
        )
        create(api, namespace, big)
        wait_phase(api, namespace, "big", {"Interviewing"}, timeout=120)
        small = researchjob(
            "small", corpus_configmap, analysts={"count": 1}, parallelism={"batchSize": 1, "maxActiveJobs": 4}
        )
        create(api, namespace, small)
        small_done = wait_phase(api, namespace, "small", {"Succeeded", "Failed"})
        big_now = client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "big")
        big_done = wait_phase(api, namespace, "big", {"Succeeded", "Failed"})
        jobs.stop()
    finally:
        core.delete_namespaced_config_map("fairness-caps", op_ns)
    assert small_done["status"]["phase"] == "Succeeded" and big_done["status"]["phase"] == "Succeeded"
    # The small job finished while the big one still had work: it was not made to wait behind it.
    assert big_now["status"]["phase"] == "Interviewing", big_now["status"]
    assert big_now["status"]["sectionsDone"] < 12
    assert jobs.max_active_interviews <= 2


def test_a_leader_stopped_gracefully_hands_over_at_once(
    cluster: ClusterHandle, operator: OperatorProcess, tmp_path: Any
) -> None:
    coord = client.CoordinationV1Api(cluster.api_client())
    ns = operator.env["OPERATOR_NAMESPACE"]
    deadline = time.monotonic() + 30  # an earlier test's dead leader may still hold it until it expires
    while coord.read_namespaced_lease("research-operator-leader", ns).spec.holder_identity != operator.env["POD_NAME"]:
        assert time.monotonic() < deadline, "the fixture's operator never became the leader"
        time.sleep(0.3)
    standby = operator.replica("standby-2", tmp_path / "standby.log")
    standby.start()
    try:
        time.sleep(2)
        assert "acquired leadership" not in standby.log()
        operator.kill(signal.SIGTERM)  # what the kubelet sends on a rolling update
        assert "released leadership" in operator.log()
        deadline = time.monotonic() + 8  # well under the 15 s the Lease would take to expire
        while time.monotonic() < deadline and "acquired leadership" not in standby.log():
            time.sleep(0.2)
        assert coord.read_namespaced_lease("research-operator-leader", ns).spec.holder_identity == "standby-2"
    finally:
        standby.kill(signal.SIGTERM)
        operator.start()


def claim_holder(api: client.ApiClient, namespace: str, name: str, plan: str) -> str | None:
    """The pod that claimed writing the report (its ConfigMap), or None while none has."""
    try:
        cm = client.CoreV1Api(api).read_namespaced_config_map(configmap_name(name, plan, REPORT_CLAIM), namespace)
    except client.ApiException as e:
        if e.status == 404:
            return None
        raise
    return str((cm.data or {})["holder"])


def test_the_planner_interviews_the_first_batch_and_the_last_pod_writes_the_report(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, corpus_configmap: str
) -> None:
    api = cluster.api_client()
    jobs = watch_jobs(api, namespace)
    create(api, namespace, researchjob("relay", corpus_configmap, analysts={"count": 4}))
    obj = wait_phase(api, namespace, "relay", {"Succeeded", "Failed"})
    jobs.stop()
    status = obj["status"]
    assert status["phase"] == "Succeeded", status
    assert status["progress"] == "4/4" and len(sections(api, namespace)) == 4
    # Two pods did it all: the planner went on to batch 0, and no writer Job was needed.
    steps = sorted((labels[STEP], labels.get(f"{GROUP}/batch")) for labels in jobs.labels.values())
    assert steps == [("interview", "1"), ("plan", "0")], jobs.labels
    holder = claim_holder(api, namespace, "relay", status["planId"])
    assert holder is not None and any(holder.startswith(f"{job}-") for job in jobs.labels), (holder, jobs.labels)
    report = report_text(api, namespace, obj)
    for heading in ("Introduction", "Conclusion", "Sources"):
        assert heading in report


def test_a_pod_killed_while_writing_the_report_leaves_it_to_a_writer_job(
    cluster: ClusterHandle,
    operator: OperatorProcess,
    namespace: str,
    corpus_configmap: str,
    modelserver_factory: Any,
) -> None:
    api = cluster.api_client()
    core = client.CoreV1Api(api)
    custom = client.CustomObjectsApi(api)
    slow = modelserver_factory(ttft_ms=3000)  # every call takes 3 s: time to kill the writing pod
    jobs = watch_jobs(api, namespace)
    body = researchjob("relay", corpus_configmap, analysts={"count": 2}, model={"baseUrl": slow.base_url})
    create(api, namespace, body)
    deadline = time.monotonic() + 240
    holder = None
    while holder is None:
        assert time.monotonic() < deadline, "no pod ever claimed the report"
        rj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "relay")
        plan = (rj.get("status") or {}).get("planId")
        holder = claim_holder(api, namespace, "relay", plan) if plan else None
        time.sleep(0.1)
    core.delete_namespaced_pod(holder, namespace, grace_period_seconds=0)
    obj = wait_phase(api, namespace, "relay", {"Succeeded", "Failed"})
    jobs.stop()
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    writers = [name for name, labels in jobs.labels.items() if labels.get(STEP) == "write"]
    assert len(writers) == 1, jobs.labels  # the claim's holder died: the operator's writer Job wrote it
    assert "Introduction" in report_text(api, namespace, obj)


def test_a_worker_pod_killed_mid_run_is_replaced_and_the_job_still_succeeds(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, corpus_configmap: str
) -> None:
    api = cluster.api_client()
    core = client.CoreV1Api(api)
    create(api, namespace, researchjob("phoenix", corpus_configmap, analysts={"count": 4}, interview={"maxTurns": 2}))
    deadline = time.monotonic() + 120
    victim = None
    while victim is None:
        assert time.monotonic() < deadline, "no interview pod ever ran"
        for pod in core.list_namespaced_pod(namespace, label_selector=f"{STEP}=interview").items:
            if pod.status.phase == "Running":
                victim = pod
                break
        time.sleep(0.2)
    core.delete_namespaced_pod(victim.metadata.name, namespace, grace_period_seconds=0)
    obj = wait_phase(api, namespace, "phoenix", {"Succeeded", "Failed"})
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    assert len(sections(api, namespace)) == 4


class PodEnds(threading.Thread):
    """Watches the namespace's pods and keeps each one's worker container's terminated state."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        super().__init__(daemon=True)
        self.core = client.CoreV1Api(api)
        self.namespace = namespace
        self.terminated: dict[str, Any] = {}  # pod name -> V1ContainerStateTerminated
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            for ev in watch.Watch().stream(self.core.list_namespaced_pod, self.namespace, timeout_seconds=5):
                for cs in ev["object"].status.container_statuses or []:
                    if cs.name == "worker" and cs.state.terminated is not None:
                        self.terminated[ev["object"].metadata.name] = cs.state.terminated

    def stop(self) -> None:
        self.stop_flag.set()
        self.join(timeout=10)


def test_a_worker_pod_deleted_mid_interview_stops_on_sigterm_and_its_retry_redoes_no_stored_section(
    cluster: ClusterHandle,
    operator: OperatorProcess,
    namespace: str,
    corpus_configmap: str,
    modelserver_factory: Any,
) -> None:
    api = cluster.api_client()
    core = client.CoreV1Api(api)
    # One request at a time, 0.7 s each: the four interviews take turns, so their sections are
    # stored one by one at the end and the pod can be deleted between the first and the last.
    slow = modelserver_factory(ttft_ms=700)
    ends = PodEnds(api, namespace)
    ends.start()
    body = researchjob(
        "sigterm",
        corpus_configmap,
        analysts={"count": 4},
        interview={"maxTurns": 2},
        parallelism={"batchSize": 4, "maxActiveJobs": 1},
        model={"baseUrl": slow.base_url, "maxConcurrency": 1},
    )
    create(api, namespace, body)
    deadline = time.monotonic() + 240
    while not sections(api, namespace):
        assert time.monotonic() < deadline, "no section was ever stored"
        time.sleep(0.1)
    running = [p for p in core.list_namespaced_pod(namespace).items if p.status.phase == "Running"]
    assert len(running) == 1, [p.metadata.name for p in running]
    victim = running[0].metadata.name
    stored_before = {cm.metadata.name for cm in sections(api, namespace)}
    assert len(stored_before) < 4, "the pod was deleted only after every section was stored"
    core.delete_namespaced_pod(victim, namespace)  # the pod's grace period: 30 s, then SIGKILL
    obj = wait_phase(api, namespace, "sigterm", {"Succeeded", "Failed"})
    ends.stop()
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    assert ends.terminated[victim].exit_code == 143, ends.terminated[victim]  # its own exit, not a SIGKILL (137)
    # The deleted pod is gone from the API; the others may still be ending when the report is stored.
    pods = set(ends.terminated) | {p.metadata.name for p in core.list_namespaced_pod(namespace).items}
    logs = {pod: cluster.pod_log(namespace, pod) for pod in pods}
    assert "SIGTERM: stopping; no further model calls, what is stored stays stored" in logs[victim]
    stored_by = [
        (pod, int(m)) for pod, text in logs.items() for m in re.findall(r"analyst (\d+) \(.*?\): section stored", text)
    ]
    assert sorted(i for _, i in stored_by) == [0, 1, 2, 3], stored_by  # each section computed and stored once
    first = sorted(i for pod, i in stored_by if pod == victim)
    skipped = f"analysts {first} already have sections; skipping them"  # by the retried pod
    assert any(skipped in text for pod, text in logs.items() if pod != victim), {p: t[-2000:] for p, t in logs.items()}
    # The interviews the deleted pod had under way go on from their checkpoints (ConfigMaps the
    # worker wrote through its Role, which the operator's watch does not see), not from the start.
    resumed = {
        int(m) for pod, text in logs.items() if pod != victim for m in re.findall(r"analyst (\d+): resuming", text)
    }
    assert resumed and not resumed & set(first), {p: t[-2000:] for p, t in logs.items()}
    for i in range(4):
        ckpt = core.read_namespaced_config_map(
            configmap_name("sigterm", obj["status"]["planId"], CHECKPOINT, i), namespace
        )
        assert ckpt.metadata.annotations[ANNOTATION_JOB_UID] == obj["metadata"]["uid"]
        assert LABEL_KIND not in (ckpt.metadata.labels or {})
    assert len(sections(api, namespace)) == 4
    assert "Introduction" in report_text(api, namespace, obj)


def test_ttl_after_finished_deletes_the_researchjob_and_what_it_made(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, corpus_configmap: str
) -> None:
    api = cluster.api_client()
    custom = client.CustomObjectsApi(api)
    create(api, namespace, researchjob("brief", corpus_configmap, analysts={"count": 1}, ttlSecondsAfterFinished=2))
    deadline = time.monotonic() + 180
    while True:
        try:
            custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "brief")
        except client.ApiException as e:
            assert e.status == 404
            break
        assert time.monotonic() < deadline, "the finished ResearchJob was never deleted"
        time.sleep(0.5)
    events = client.CoreV1Api(api).list_namespaced_event(namespace, field_selector="involvedObject.name=brief").items
    assert {"Succeeded", "TTLExpired"} <= {e.reason for e in events}
    deadline = time.monotonic() + 60
    while sections(api, namespace):
        assert time.monotonic() < deadline, "the deleted ResearchJob's sections were not garbage-collected"
        time.sleep(0.5)


def test_a_workers_token_reads_only_its_own_researchjobs_configmaps(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, corpus_configmap: str
) -> None:
    """Two ResearchJobs in one namespace: each one's workers (which store and read by name only)
    finish, and neither's ServiceAccount may read the other's stored ConfigMaps or list any."""
    from research_operator.decisions.manifests import Owner, worker_rbac_name

    api = cluster.api_client()
    for name in ("alpha", "beta"):
        create(api, namespace, researchjob(name, corpus_configmap, analysts={"count": 2}))
    objs = {name: wait_phase(api, namespace, name, {"Succeeded", "Failed"}) for name in ("alpha", "beta")}
    for obj in objs.values():
        assert obj["status"]["phase"] == "Succeeded", obj["status"]
    report = {name: obj["status"]["report"]["configMap"] for name, obj in objs.items()}
    sa = {
        name: "system:serviceaccount:{}:{}".format(
            namespace, worker_rbac_name(Owner(namespace, name, obj["metadata"]["uid"]))
        )
        for name, obj in objs.items()
    }

    def can(user: str, *args: str) -> bool:
        out = cluster.kubectl("auth", "can-i", f"--as={user}", "-n", namespace, *args, check=False)
        return out.stdout.strip() == "yes"

    assert can(sa["alpha"], "get", f"configmaps/{report['alpha']}")  # its own
    assert can(sa["alpha"], "get", f"configmaps/{corpus_configmap}")  # the documents it names
    assert not can(sa["alpha"], "get", f"configmaps/{report['beta']}")
    assert not can(sa["beta"], "get", f"configmaps/{report['alpha']}")
    assert not can(sa["alpha"], "list", "configmaps")
    assert not can(sa["alpha"], "get", "researchjobs.researchops.io/beta")


def test_with_worker_network_policies_each_researchjob_gets_one_for_its_pods(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, corpus_configmap: str
) -> None:
    """networkPolicy.workers on: the operator makes one NetworkPolicy per ResearchJob, owned by it,
    selecting its worker pods (no ingress; egress by the chart's rules). The local node enforces no
    NetworkPolicy, so this shows what is made, not what it blocks."""
    dns = {"to": [{"namespaceSelector": {}}], "ports": [{"port": 53, "protocol": "UDP"}]}
    operator.extra_env["WORKER_NETWORK_POLICY_EGRESS"] = json.dumps([dns])
    operator.restart()
    try:
        api = cluster.api_client()
        create(api, namespace, researchjob("fenced", corpus_configmap, analysts={"count": 1}))
        obj = wait_phase(api, namespace, "fenced", {"Succeeded", "Failed"})
    finally:
        operator.extra_env.pop("WORKER_NETWORK_POLICY_EGRESS")
        operator.restart()
    assert obj["status"]["phase"] == "Succeeded", obj["status"]
    [policy] = client.NetworkingV1Api(api).list_namespaced_network_policy(namespace).items
    assert policy.metadata.owner_references[0].uid == obj["metadata"]["uid"]
    assert policy.spec.pod_selector.match_labels["researchops.io/job"] == "fenced"
    assert policy.spec.policy_types == ["Ingress", "Egress"] and not policy.spec.ingress
    assert policy.spec.egress[0].ports[0].port == 53
