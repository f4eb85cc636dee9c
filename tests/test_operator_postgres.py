"""The PostgreSQL store end to end through the operator, on the real control plane: progress seen
through the worker's marker ConfigMaps, the report readable as documented, and deleting the
ResearchJob deletes its rows (a cleanup Job) before the ResearchJob goes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kubernetes import client

from research_api.researchjob import GROUP, PLURAL, VERSION
from tests.fixtures.cluster import ClusterHandle
from tests.fixtures.operator import OperatorProcess
from tests.test_operator_cluster import JobWatch

pytestmark = [pytest.mark.cluster, pytest.mark.postgres]

FINALIZER = f"{GROUP}/external-store"
RESULT_TABLES = ("research_analysts", "research_sections", "research_reports", "research_usage")


def researchjob(name: str, corpus: str, secret: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "topic": "How Kubernetes runs and limits batch workloads",
        "analysts": {"count": 4},
        "interview": {"maxTurns": 1},
        "sources": [{"type": "documents", "configMap": corpus, "maxResults": 2}],
        "parallelism": {"batchSize": 2, "maxActiveJobs": 2},
        "store": {"type": "postgres", "dsnSecretRef": {"name": secret, "key": "dsn"}},
    }
    body.update(spec)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ResearchJob", "metadata": {"name": name}, "spec": body}


def dsn_secret(api: client.ApiClient, namespace: str, name: str, dsn: str) -> None:
    client.CoreV1Api(api).create_namespaced_secret(
        namespace, {"metadata": {"name": name}, "stringData": {"dsn": dsn}, "type": "Opaque"}
    )


def get_rj(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        obj: dict[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name
        )
        return obj
    except client.ApiException as e:
        if e.status == 404:
            return None
        raise


def wait_for(what: str, check: Any, timeout: float, operator: OperatorProcess) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {timeout}s (last: {last})\noperator log:\n{operator.log()[-3000:]}")


def rows(dsn: str, uid: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        out: dict[str, int] = {}
        for table in RESULT_TABLES:
            row = conn.execute(f"SELECT count(*) FROM {table} WHERE job_uid = %s", (uid,)).fetchone()  # noqa: S608
            out[table] = int(row[0]) if row else 0
        row = conn.execute(
            "SELECT count(DISTINCT thread_id) FROM checkpoints WHERE starts_with(thread_id, %s)", (f"{uid}:",)
        ).fetchone()
        out["checkpoint_threads"] = int(row[0]) if row else 0
        return out


def left_behind(api: client.ApiClient, namespace: str, name: str) -> list[str]:
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    owned = f"{GROUP}/job={name}"
    left = [f"cm/{c.metadata.name}" for c in core.list_namespaced_config_map(namespace, label_selector=owned).items]
    left += [f"job/{j.metadata.name}" for j in batch.list_namespaced_job(namespace, label_selector=owned).items]
    return left


def events(api: client.ApiClient, namespace: str, name: str) -> dict[str, str]:
    items = client.CoreV1Api(api).list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
    return {e.reason: e.message for e in items}


def research_worker(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("research-worker")
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, timeout=120, env={**os.environ, **env}, check=False
    )


def test_postgres_store_end_to_end_and_deletion_removes_the_rows(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, corpus_configmap: str, postgres_dsn: str
) -> None:
    api = cluster.api_client()
    dsn_secret(api, namespace, "pg", postgres_dsn)
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, researchjob("pg", corpus_configmap, "pg")
    )

    # The finalizer is on before any worker can write a row.
    obj = wait_for(
        "the external-store finalizer",
        lambda: (o := get_rj(api, namespace, "pg")) and FINALIZER in (o["metadata"].get("finalizers") or []) and o,
        30,
        operator,
    )
    uid = obj["metadata"]["uid"]

    obj = wait_for(
        "a finished ResearchJob",
        lambda: (
            (o := get_rj(api, namespace, "pg"))
            and (o.get("status") or {}).get("phase") in ("Succeeded", "Failed")
            and o
        ),
        400,
        operator,
    )
    status = obj["status"]
    assert status["phase"] == "Succeeded", status
    assert status["progress"] == "4/4" and status["sectionsDone"] == 4
    assert len(status["analysts"]) == 4, "the analysts marker holds the whole plan"
    assert status["tokensUsed"] > 0
    plan = status["planId"]
    report_id = f"{uid}/{plan}"
    assert status["report"]["postgresId"] == report_id and status["report"]["title"]
    assert "configMap" not in status["report"]
    assert f"show-report --postgres-id {report_id}" in status["message"]

    # The rows are in PostgreSQL; the ConfigMaps are small markers, the content is not in them.
    stored = rows(postgres_dsn, uid)
    assert stored == {
        "research_analysts": 1,
        "research_sections": 4,
        "research_reports": 1,
        "research_usage": 6,
        "checkpoint_threads": 4,
    }, stored
    markers = client.CoreV1Api(api).list_namespaced_config_map(namespace, label_selector=f"{GROUP}/job=pg").items
    kinds = sorted(m.metadata.labels[f"{GROUP}/kind"] for m in markers)
    assert kinds == ["analysts", "report", "section", "section", "section", "section"]
    for m in markers:
        assert m.metadata.annotations[f"{GROUP}/store"] == "postgres"
        assert sum(len(v) for v in m.data.values()) < 8192
        assert "report.md" not in m.data
    with psycopg.connect(postgres_dsn) as conn:
        row = conn.execute(
            "SELECT record->>'markdown' FROM research_reports WHERE job_uid = %s AND plan = %s", (uid, plan)
        ).fetchone()
    assert row is not None
    markdown = str(row[0])
    for heading in ("Introduction", "Conclusion", "Sources"):
        assert heading in markdown

    # Readable as status.report and the docs say.
    env = {"KUBECONFIG": str(cluster.kubeconfig), "RESEARCH_PG_DSN": postgres_dsn}
    shown = research_worker("show-report", "--job", f"{namespace}/pg", env=env)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == markdown.strip()
    shown = research_worker("show-report", "--postgres-id", report_id, env={"RESEARCH_PG_DSN": postgres_dsn})
    assert shown.returncode == 0 and shown.stdout.strip() == markdown.strip(), shown.stderr
    # kubectl research report: the DSN from the Secret the ResearchJob names, or from a variable.
    plugin = [str(Path(sys.executable).with_name("kubectl-research")), "report", "pg", "-n", namespace]
    kube_env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    shown = subprocess.run(plugin, capture_output=True, text=True, timeout=120, env=kube_env)
    assert shown.returncode == 0 and shown.stdout.strip() == markdown.strip(), shown.stderr
    shown = subprocess.run(
        [*plugin, "--dsn-env", "MY_DSN", "-o", "html"],
        capture_output=True, text=True, timeout=120, env={**kube_env, "MY_DSN": postgres_dsn},
    )  # fmt: skip
    assert shown.returncode == 0 and shown.stdout.startswith("<!DOCTYPE html>") and "<h2>Sources</h2>" in shown.stdout

    # kubectl delete: the cleanup Job deletes the rows, then the ResearchJob goes.
    deleted = cluster.kubectl("delete", "rj", "pg", "-n", namespace, "--timeout=110s")
    assert deleted.returncode == 0, deleted.stderr
    assert get_rj(api, namespace, "pg") is None
    assert rows(postgres_dsn, uid) == dict.fromkeys(stored, 0)
    assert "CleanupStarted" in events(api, namespace, "pg")
    wait_for("garbage collection", lambda: not left_behind(api, namespace, "pg"), 60, operator)


def test_a_failing_cleanup_is_reported_and_an_admin_can_let_the_researchjob_go(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, corpus_configmap: str
) -> None:
    api = cluster.api_client()
    dsn_secret(api, namespace, "empty", "")  # the worker exits 2 at once: no DSN
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, researchjob("bad", corpus_configmap, "empty", analysts={"count": 1})
    )
    wait_for(
        "a failed plan",
        lambda: ((get_rj(api, namespace, "bad") or {}).get("status") or {}).get("phase") == "Failed",
        120,
        operator,
    )
    client.CustomObjectsApi(api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "bad")
    obj = wait_for(
        "the CleanupFailed condition",
        lambda: (
            (o := get_rj(api, namespace, "bad"))
            and any(
                c["type"] == "CleanupFailed" and c["status"] == "True"
                for c in (o.get("status") or {}).get("conditions", [])
            )
            and o
        ),
        120,
        operator,
    )
    cond = next(c for c in obj["status"]["conditions"] if c["type"] == "CleanupFailed")
    assert "RESEARCH_PG_DSN" in cond["message"], cond
    assert FINALIZER in obj["metadata"]["finalizers"], "the rows may exist: it waits"
    reasons = wait_for(
        "the CleanupFailed event", lambda: (e := events(api, namespace, "bad")).get("CleanupFailed") and e, 30, operator
    )
    assert FINALIZER in reasons["CleanupFailed"], "the Event says how to force it"

    # The documented way out: remove the finalizer.
    cluster.kubectl(
        "patch", "rj", "bad", "-n", namespace, "--type=json", "-p", '[{"op":"remove","path":"/metadata/finalizers"}]'
    )
    wait_for("the ResearchJob to go", lambda: get_rj(api, namespace, "bad") is None, 30, operator)
    wait_for("garbage collection", lambda: not left_behind(api, namespace, "bad"), 60, operator)


def test_deleting_mid_interview_stops_the_workers_before_the_rows_are_deleted(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, corpus_configmap: str, postgres_dsn: str
) -> None:
    api = cluster.api_client()
    jobs = JobWatch(api, namespace)
    jobs.start()
    jobs.ready.wait(5)
    dsn_secret(api, namespace, "pg", postgres_dsn)
    body = researchjob("mid", corpus_configmap, "pg", parallelism={"batchSize": 1, "maxActiveJobs": 1})
    client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    obj = wait_for(
        "a first section",
        lambda: (o := get_rj(api, namespace, "mid")) and (o.get("status") or {}).get("sectionsDone", 0) >= 1 and o,
        300,
        operator,
    )
    uid = obj["metadata"]["uid"]
    assert obj["status"]["phase"] == "Interviewing", obj["status"]
    assert rows(postgres_dsn, uid)["research_sections"] >= 1
    client.CustomObjectsApi(api).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "mid")
    wait_for("the ResearchJob to go", lambda: get_rj(api, namespace, "mid") is None, 180, operator)
    assert set(rows(postgres_dsn, uid).values()) == {0}
    pods = client.CoreV1Api(api).list_namespaced_pod(namespace).items
    assert not [
        p.metadata.name for p in pods if p.metadata.name.startswith("mid-") and "cleanup" not in p.metadata.name
    ]
    time.sleep(5)
    assert set(rows(postgres_dsn, uid).values()) == {0}, "no worker wrote after the cleanup"
    wait_for("garbage collection", lambda: not left_behind(api, namespace, "mid"), 60, operator)
    jobs.stop()
    assert len(jobs.uids["mid-cleanup"]) == 1, "one cleanup Job, none started after the finalizer went"
