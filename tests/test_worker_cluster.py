"""The ConfigMap store on the real control plane: plan, interview in two batches, write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from offline_model.launcher import ModelServerProcess
from research_api.names import LABEL_ANALYST, LABEL_JOB, LABEL_KIND
from research_api.task import plan_id
from tests.test_worker_e2e import KEY, assert_report_structure, make_task, sections_of

pytestmark = pytest.mark.cluster


def worker(step: str, task: Path, kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OPENAI_API_KEY": KEY, "KUBECONFIG": str(kubeconfig)}
    return subprocess.run(
        [sys.executable, "-m", "research_worker.cli", step, "--task", str(task), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )


def owner_configmap(core: client.CoreV1Api, namespace: str) -> tuple[Any, dict[str, str]]:
    """A ConfigMap "rj" that stands in for the ResearchJob owning what the worker stores, and the
    task's job reference to it."""
    owner = core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="rj"), data={"x": "y"})
    )
    uid = owner.metadata.uid
    return owner, {"namespace": namespace, "name": "rj", "uid": uid, "apiVersion": "v1", "kind": "ConfigMap"}


def test_steps_through_configmaps_owned_by_the_job(
    cluster: Any, namespace: str, modelserver: ModelServerProcess, tmp_path: Path
) -> None:
    core = client.CoreV1Api(cluster.api_client())
    owner, job = owner_configmap(core, namespace)
    task = make_task(tmp_path, modelserver.base_url, job=job, feedback="focus on quotas")
    kc = cluster.kubeconfig

    r = worker("plan", task, kc)
    assert r.returncode == 0, r.stderr
    r = worker("interview", task, kc, "--analysts", "0,1")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"written": [0, 1], "skipped": []}
    modelserver.reset()
    r = worker("interview", task, kc, "--analysts", "1,2")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"written": [2], "skipped": [1]}
    assert modelserver.stats()["by_kind"]["section"] == 1, "analyst 1 was not interviewed again"
    out, secs = tmp_path / "report.md", tmp_path / "sections"
    r = worker("write", task, kc, "-o", str(out), "--sections-dir", str(secs))
    assert r.returncode == 0, r.stderr
    assert_report_structure(out.read_text(), 3, sections_of(secs))

    pid = plan_id("focus on quotas", owner.metadata.uid)  # the task's plan id: its feedback and job uid
    cms = core.list_namespaced_config_map(namespace, label_selector=f"{LABEL_JOB}=rj").items
    stored = [cm for cm in cms if LABEL_KIND in (cm.metadata.labels or {})]  # what the operator watches
    by_name = {cm.metadata.name: cm for cm in stored}
    assert set(by_name) == {
        f"rj-{pid}-analysts",
        f"rj-{pid}-section-000",
        f"rj-{pid}-section-001",
        f"rj-{pid}-section-002",
        f"rj-{pid}-report",
    }
    # The rest are the interviews' checkpoints (no kind label: the operator's watch never sees them).
    checkpoints = {cm.metadata.name for cm in cms} - set(by_name)
    assert checkpoints and checkpoints <= {f"rj-{pid}-checkpoint-{i:03d}" for i in range(3)}, checkpoints
    for cm in cms:
        refs = cm.metadata.owner_references
        assert [(r.kind, r.name, r.uid) for r in refs] == [("ConfigMap", "rj", owner.metadata.uid)]
    section = by_name[f"rj-{pid}-section-002"]
    assert section.metadata.labels[LABEL_KIND] == "section" and section.metadata.labels[LABEL_ANALYST] == "2"
    assert json.loads(section.data["data.json"])["index"] == 2
    report = json.loads(by_name[f"rj-{pid}-report"].data["data.json"])
    assert report["markdown"] == out.read_text()


def test_pods_that_continue_plan_then_interview_and_the_last_one_writes_the_report(
    cluster: Any, namespace: str, modelserver: ModelServerProcess, tmp_path: Path
) -> None:
    core = client.CoreV1Api(cluster.api_client())
    owner, job = owner_configmap(core, namespace)
    kc = cluster.kubeconfig
    pid = plan_id(None, owner.metadata.uid)

    # The planner goes on to interview its batch; not every section is stored yet, so no report.
    modelserver.reset()
    first = make_task(tmp_path, modelserver.base_url, job=job, analysts=[0, 1], continueSteps=True)
    r = worker("plan", first, kc)
    assert r.returncode == 0, r.stderr
    outputs = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(outputs[0]["analysts"]) == 3 and outputs[1] == {"written": [0, 1], "skipped": []}
    assert modelserver.stats()["by_kind"].get("report", 0) == 0
    with pytest.raises(client.ApiException):
        core.read_namespaced_config_map(f"rj-{pid}-report", namespace)

    # The pod that stores the last section claims the report and writes it, in the same process.
    last = make_task(tmp_path, modelserver.base_url, job=job, analysts=[2], continueSteps=True)
    r = worker("interview", last, kc)
    assert r.returncode == 0, r.stderr
    written = [json.loads(line) for line in r.stdout.splitlines()]
    assert written[0] == {"written": [2], "skipped": []} and written[1]["sections"] == [0, 1, 2]
    report = json.loads(core.read_namespaced_config_map(f"rj-{pid}-report", namespace).data["data.json"])
    assert "Conclusion" in report["markdown"] and modelserver.stats()["by_kind"]["report"] == 1
    claim = core.read_namespaced_config_map(f"rj-{pid}-report-claim", namespace)
    assert claim.data["holder"] and claim.metadata.owner_references[0].uid == owner.metadata.uid

    # Another pod finishing later finds the report there and writes nothing.
    modelserver.reset()
    r = worker("interview", last, kc)
    assert r.returncode == 0, r.stderr
    assert [json.loads(line) for line in r.stdout.splitlines()] == [{"written": [], "skipped": [2]}]
    assert not modelserver.stats()["by_kind"], "no model call: nothing was left to do"
