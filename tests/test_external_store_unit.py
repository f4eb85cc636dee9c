"""The PostgreSQL store through the operator, without a cluster: the markers the worker writes and
what the operator reads from them, the cleanup Job and the external-store finalizer decision."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from research_api.names import ANNOTATION_POSTGRES_REPORT, parse_postgres_report_id, postgres_report_id
from research_api.researchjob import Phase, ResearchJobSpec, SecretKeyRef
from research_api.task import PostgresStoreSettings, ResearchTask, Step
from research_operator.cache.views import job_view, owner_name, stored_object
from research_operator.cache.world import World
from research_operator.constants import ANNOTATION_CLEANUP_OF, plan_id
from research_operator.decisions.finalizer import CLEANUP_RETRY_AFTER, CleanupState, decide_cleanup
from research_operator.decisions.manifests import Owner, cleanup_job, worker_job
from research_operator.decisions.reconcile import JobView, Observed, decide
from research_operator.settings import Settings
from research_worker.state import Analyst, Report, Section, TokenUsage
from research_worker.store import AnalystPlan, IndexedStore, MarkerWriter

T0 = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
PID = plan_id(None)
OWNER = Owner("ns", "rj", "uid-1")
DSN_REF = {"name": "pg", "key": "dsn"}


def pg_spec(**over: Any) -> ResearchJobSpec:
    base: dict[str, Any] = {
        "topic": "How Kubernetes schedules batch work",
        "analysts": {"count": 2},
        "sources": [{"type": "documents", "configMap": "corpus"}],
        "store": {"type": "postgres", "dsnSecretRef": DSN_REF},
    }
    base.update(over)
    return ResearchJobSpec.model_validate(base)


def task_of(job: dict[str, Any]) -> ResearchTask:
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    return ResearchTask.model_validate(json.loads(next(e["value"] for e in env if e["name"] == "RESEARCH_TASK")))


class FakeCore:
    """The ConfigMap calls the marker writer makes: create (409 on a repeat) and read by name (404)."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.creates = 0

    def create_namespaced_config_map(self, namespace: str, body: dict[str, Any]) -> None:
        self.creates += 1
        name = body["metadata"]["name"]
        if name in self.objects:
            raise ApiException(status=409, reason="AlreadyExists")
        self.objects[name] = body

    def read_namespaced_config_map(self, name: str, namespace: str) -> Any:
        if name not in self.objects:
            raise ApiException(status=404, reason="NotFound")
        return self.objects[name]


class FakePostgres:
    """The PostgresStore's interface, in memory (ON CONFLICT DO NOTHING semantics)."""

    def __init__(self) -> None:
        self.plan: AnalystPlan | None = None
        self.sections: dict[int, Section] = {}
        self.report: Report | None = None

    async def save_analysts(self, plan: AnalystPlan) -> bool:
        if self.plan is not None:
            return False
        self.plan = plan
        return True

    async def load_analysts(self) -> AnalystPlan | None:
        return self.plan

    async def save_section(self, section: Section) -> bool:
        if section.index in self.sections:
            return False
        self.sections[section.index] = section
        return True

    async def list_sections(self) -> list[Section]:
        return [self.sections[i] for i in sorted(self.sections)]

    async def section_indices(self) -> set[int]:
        return set(self.sections)

    async def save_report(self, report: Report) -> bool:
        if self.report is not None:
            return False
        self.report = report
        return True

    async def load_report(self) -> Report | None:
        return self.report

    async def close(self) -> None:
        return None


PEOPLE = [Analyst(name=f"A{i}", role="r", affiliation="a", description="d" * 50) for i in range(2)]


def section(i: int) -> Section:
    return Section(
        index=i,
        analyst=PEOPLE[i],
        title=f"T{i}",
        content="## T\n" + "long content " * 5000,
        summary="s",
        sources=["a.md", "b.md"],
        found_sources=True,
        usage=TokenUsage(total_tokens=1000),
    )


REPORT = Report(
    topic="t",
    markdown="# The Title\n\nbody " * 100,
    sources=["a.md"],
    sections=[0, 1],
    usage=TokenUsage(total_tokens=50),
)


def indexed(core: FakeCore, inner: FakePostgres) -> IndexedStore:
    task = task_of(worker_job(OWNER, pg_spec(), Settings(), PID, Step.INTERVIEW, [0, 1], 0))
    assert isinstance(task.store, PostgresStoreSettings) and task.store.markers, "the operator asks for markers"
    markers = MarkerWriter(task, api_client=None)
    markers.core = core
    return IndexedStore(inner, markers)  # type: ignore[arg-type]


async def test_operator_reads_the_markers_the_postgres_store_writes() -> None:
    core, inner = FakeCore(), FakePostgres()
    store = indexed(core, inner)
    assert await store.save_analysts(AnalystPlan(topic="t", analysts=PEOPLE, usage=TokenUsage(total_tokens=100)))
    for i in range(2):
        assert await store.save_section(section(i))
    assert await store.save_report(REPORT)

    bodies = list(core.objects.values())
    assert len(bodies) == 4
    for b in bodies:
        assert b["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
        assert sum(len(v) for v in b["data"].values()) < 4096, "markers are tiny"
    section_marker = json.loads(core.objects[f"rj-{PID}-section-000"]["data"]["data.json"])
    assert "content" not in section_marker and section_marker["title"] == "T0"
    assert section_marker["found_sources"] is True and section_marker["sources"] == 2

    objs = [stored_object(b) for b in bodies]
    assert all(o is not None for o in objs)
    view = World(stored_index={("ns", "rj"): objs}).store_view(("ns", "rj"))
    assert [a.name for a in view.analysts[PID]] == ["A0", "A1"]
    assert view.sections[PID] == frozenset({0, 1})
    assert view.tokens == 2150
    ref = view.reports[PID]
    assert ref.postgres_id == postgres_report_id("uid-1", PID) == f"uid-1/{PID}"
    assert parse_postgres_report_id(ref.postgres_id) == ("uid-1", PID)
    assert ref.title == "The Title" and ref.config_map is None and ref.key is None

    from research_api.researchjob import ResearchJobStatus

    obs = Observed(generation=1, created=T0, now=T0, jobs=[], store=view, previous=ResearchJobStatus())
    st = decide(pg_spec(), obs).status
    assert st.phase == Phase.Succeeded and st.progress == "2/2" and st.tokens_used == 2150
    assert st.report == ref
    assert st.message is not None and f"show-report --postgres-id uid-1/{PID}" in st.message


async def test_a_retried_pod_writes_the_markers_of_rows_stored_before_it_died() -> None:
    core, inner = FakeCore(), FakePostgres()
    # Rows committed by a pod that died before writing its markers:
    inner.plan = AnalystPlan(topic="t", analysts=PEOPLE)
    inner.sections[1] = section(1)
    store = indexed(core, inner)
    assert await store.sync_markers() == 2
    assert sorted(core.objects) == [f"rj-{PID}-analysts", f"rj-{PID}-section-001"]
    assert await store.sync_markers() == 0, "nothing missing: nothing written"
    # A save that finds the row already there still writes the missing marker (409 is fine).
    del core.objects[f"rj-{PID}-section-001"]
    assert not await store.save_section(section(1))
    assert f"rj-{PID}-section-001" in core.objects
    assert not await store.save_section(section(1))  # marker exists: 409, no error
    inner.report = REPORT
    assert not await store.save_report(REPORT)
    report_marker = core.objects[f"rj-{PID}-report"]
    assert report_marker["metadata"]["annotations"][ANNOTATION_POSTGRES_REPORT] == f"uid-1/{PID}"


async def test_a_marker_is_written_only_after_the_row_commits() -> None:
    class FailingPostgres(FakePostgres):
        async def save_section(self, section: Section) -> bool:
            from research_worker.errors import StoreError

            raise StoreError("PostgreSQL write failed: connection lost")

    core = FakeCore()
    store = indexed(core, FailingPostgres())
    with pytest.raises(Exception, match="connection lost"):
        await store.save_section(section(0))
    assert core.objects == {}


def test_the_configmap_store_report_still_points_at_its_configmap() -> None:
    body = {
        "metadata": {
            "name": f"rj-{PID}-report",
            "labels": {"researchops.io/kind": "report", "researchops.io/plan": PID},
        },
        "data": {"data.json": REPORT.model_dump_json(), "report.md": REPORT.markdown},
    }
    obj = stored_object(body)
    assert obj is not None and obj.postgres_id is None and obj.report_key == "report.md" and obj.title == "The Title"


# ---------------------------------------------------------------- finalizer decision


def state(**over: Any) -> CleanupState:
    base: dict[str, Any] = {
        "postgres": True,
        "has_finalizer": True,
        "deleting": True,
        "workers": [],
        "cleanup": None,
        "now": T0,
    }
    base.update(over)
    return CleanupState(**base)


def test_the_finalizer_goes_on_postgres_researchjobs_only() -> None:
    assert decide_cleanup(state(deleting=False, has_finalizer=False)).add_finalizer
    assert not decide_cleanup(state(deleting=False, has_finalizer=True)).add_finalizer
    assert not decide_cleanup(state(deleting=False, has_finalizer=False, postgres=False)).add_finalizer
    live = decide_cleanup(state(deleting=False))
    assert not (live.create_cleanup or live.remove_finalizer or live.delete_workers)


def test_deletion_without_our_finalizer_is_left_alone() -> None:
    d = decide_cleanup(state(has_finalizer=False))
    assert not (d.create_cleanup or d.remove_finalizer or d.delete_workers or d.add_finalizer)


def test_workers_are_stopped_before_the_cleanup_job_starts() -> None:
    d = decide_cleanup(state(workers=["rj-abc-b0", "rj-abc-write"]))
    assert d.delete_workers == ["rj-abc-b0", "rj-abc-write"] and not d.create_cleanup and not d.remove_finalizer


def test_cleanup_job_lifecycle() -> None:
    assert decide_cleanup(state()).create_cleanup
    running = decide_cleanup(state(cleanup=JobView("rj-cleanup", "cleanup", "")))
    assert not (running.create_cleanup or running.remove_finalizer or running.delete_cleanup)
    assert running.message is not None and "rj-cleanup" in running.message
    done = decide_cleanup(state(cleanup=JobView("rj-cleanup", "cleanup", "", succeeded=True)))
    assert done.remove_finalizer and done.delete_cleanup and done.failure is None


def test_a_failed_cleanup_is_reported_kept_a_while_then_replaced() -> None:
    failed = JobView("rj-cleanup", "cleanup", "", failed=True, message="BackoffLimitExceeded", finished=T0)
    d = decide_cleanup(state(cleanup=failed, now=T0 + dt.timedelta(seconds=5)))
    assert d.failure is not None and "BackoffLimitExceeded" in d.failure
    assert not d.delete_cleanup and not d.remove_finalizer and not d.create_cleanup
    later = decide_cleanup(state(cleanup=failed, now=T0 + CLEANUP_RETRY_AFTER))
    assert later.delete_cleanup and not later.remove_finalizer and later.failure is not None


def test_a_finalizer_without_a_dsn_is_removed_with_a_warning() -> None:
    d = decide_cleanup(state(postgres=False))
    assert d.remove_finalizer and d.skipped and not d.create_cleanup


# ---------------------------------------------------------------- the cleanup Job


def test_cleanup_job_needs_only_the_dsn_and_no_api_access() -> None:
    job = cleanup_job(OWNER, SecretKeyRef.model_validate(DSN_REF), Settings(), pg_spec().worker)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["research-worker", "cleanup", "--job-uid", "uid-1"]
    assert container["env"] == [
        {"name": "RESEARCH_PG_DSN", "valueFrom": {"secretKeyRef": {"name": "pg", "key": "dsn"}}}
    ]
    assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert job["metadata"]["labels"]["researchops.io/step"] == "cleanup"
    assert job["spec"]["activeDeadlineSeconds"] > 0 and job["spec"]["backoffLimit"] >= 1
    view = job_view(job)
    assert view.step == "cleanup" and view.active
    assert owner_name(job) == "rj"


def test_a_foreground_deletion_gets_an_unowned_cleanup_job_found_by_its_annotation() -> None:
    job = cleanup_job(OWNER, SecretKeyRef.model_validate(DSN_REF), Settings(), owned=False)
    assert "ownerReferences" not in job["metadata"]
    assert job["metadata"]["annotations"][ANNOTATION_CLEANUP_OF] == "rj"
    assert owner_name(job) == "rj"


def test_failed_job_view_has_its_finish_time() -> None:
    body = {
        "metadata": {"name": "rj-cleanup", "labels": {"researchops.io/step": "cleanup"}},
        "spec": {},
        "status": {
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "BackoffLimitExceeded",
                    "lastTransitionTime": "2026-11-23T12:00:00Z",
                }
            ]
        },
    }
    v = job_view(body)
    assert v.failed and v.finished == T0 and v.message == "BackoffLimitExceeded"


def test_worker_tasks_of_a_configmap_researchjob_have_no_markers() -> None:
    spec = pg_spec(store={"type": "configmap"})
    task = task_of(worker_job(OWNER, spec, Settings(), PID, Step.PLAN))
    assert task.store.type == "configmap"


# ---------------------------------------------------------------- against a real PostgreSQL


@pytest.mark.postgres
async def test_indexed_store_and_cleanup_on_a_real_postgres(
    postgres_dsn: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import psycopg
    from langgraph.checkpoint.base import empty_checkpoint

    from research_worker import cli
    from research_worker.store import delete_job_rows, open_store, read_postgres_report

    uid = f"uid-{uuid.uuid4().hex[:8]}"
    other = f"uid-{uuid.uuid4().hex[:8]}"
    core = FakeCore()
    monkeypatch.setenv("RESEARCH_PG_DSN", postgres_dsn)
    monkeypatch.setattr("research_worker.store.configmaps.ConfigMaps", lambda api_client=None: core)
    for job_uid in (uid, other):
        owner = Owner("ns", f"rj-{job_uid}", job_uid)
        task = task_of(worker_job(owner, pg_spec(), Settings(), PID, Step.INTERVIEW, [0, 1], 0))
        store = await open_store(task, api_client=object())
        assert isinstance(store, IndexedStore)
        try:
            await store.save_analysts(AnalystPlan(topic="t", analysts=PEOPLE, usage=TokenUsage(total_tokens=10)))
            for i in range(2):
                await store.save_section(section(i))
            # Two pods that stored the last sections at once: one wins the report.
            won = await asyncio.gather(store.claim_report("pod-a"), store.claim_report("pod-b"))
            assert sorted(won) == [False, True]
            await store.save_report(REPORT)
            saver = store.checkpointer()
            for i in range(2):
                config: Any = {"configurable": {"thread_id": f"{job_uid}:{PID}:{i}", "checkpoint_ns": ""}}
                await saver.aput(config, empty_checkpoint(), {"source": "input", "step": -1}, {})
        finally:
            await store.close()
    assert len(core.objects) == 8, "4 markers for each job"
    report = await read_postgres_report(postgres_dsn, uid, PID)
    assert report is not None and report.markdown == REPORT.markdown

    def count(job_uid: str) -> dict[str, int]:
        with psycopg.connect(postgres_dsn) as conn:
            out = {
                t: conn.execute(f"SELECT count(*) FROM {t} WHERE job_uid = %s", (job_uid,)).fetchone()[0]  # type: ignore[index]
                for t in (
                    "research_analysts",
                    "research_sections",
                    "research_reports",
                    "research_usage",
                    "research_claims",
                )
            }
            out["checkpoints"] = conn.execute(
                "SELECT count(*) FROM checkpoints WHERE starts_with(thread_id, %s)", (f"{job_uid}:",)
            ).fetchone()[0]  # type: ignore[index]
            return out

    assert count(uid) == {
        "research_analysts": 1,
        "research_sections": 2,
        "research_reports": 1,
        "research_usage": 4,
        "research_claims": 1,
        "checkpoints": 2,
    }
    # What status.report's message tells a user to run:
    out = tmp_path / "report.md"
    rc = await asyncio.to_thread(cli.main, ["show-report", "--postgres-id", f"{uid}/{PID}", "-o", str(out)])
    assert rc == 0 and out.read_text().startswith("# The Title")
    rc = await asyncio.to_thread(cli.main, ["show-report", "--postgres-id", "nonsense"])
    assert rc == 2

    deleted = await delete_job_rows(postgres_dsn, uid)
    assert deleted["threads"] == 2 and deleted["research_sections"] == 2 and deleted["checkpoints"] == 2
    assert set(count(uid).values()) == {0}
    assert count(other)["research_sections"] == 2 and count(other)["checkpoints"] == 2, "other jobs untouched"
    rc = await asyncio.to_thread(cli.main, ["cleanup", "--job-uid", uid])  # what the cleanup Job runs
    assert rc == 0, "idempotent"
    assert await read_postgres_report(postgres_dsn, uid, PID) is None
    rc = await asyncio.to_thread(cli.main, ["show-report", "--postgres-id", f"{uid}/{PID}"])
    assert rc == 2, "a clear error once the report is gone"


def test_show_report_of_a_configmap_store_researchjob(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from research_worker import cli, store

    rjs = {
        "done": {"status": {"phase": "Succeeded", "report": {"configMap": "done-r", "key": "report.md"}}},
        "busy": {"status": {"phase": "Interviewing"}},
    }

    class FakeCustom:
        def __init__(self, api_client: Any = None) -> None: ...

        def get_namespaced_custom_object(self, group: str, version: str, ns: str, plural: str, name: str) -> Any:
            if name not in rjs:
                raise ApiException(status=404, reason="Not Found")
            return rjs[name]

    monkeypatch.setattr("kubernetes.client.CustomObjectsApi", FakeCustom)
    monkeypatch.setattr(store, "kube_api_client", lambda: object())
    monkeypatch.setattr(store, "load_configmap_data", lambda api, ns: lambda name: {"report.md": "# R\n\nbody"})
    out = tmp_path / "r.md"
    assert cli.main(["show-report", "--job", "ns/done", "-o", str(out)]) == 0
    assert out.read_text() == "# R\n\nbody\n"
    assert cli.main(["show-report", "--job", "ns/busy"]) == 2
    assert "no report yet (phase Interviewing)" in capsys.readouterr().err
    assert cli.main(["show-report", "--job", "ns/missing"]) == 2
    assert "HTTP 404" in capsys.readouterr().err
