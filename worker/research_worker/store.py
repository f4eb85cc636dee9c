"""Where a ResearchJob's results live between steps: analysts, sections, the report and token usage.

``ConfigMapStore`` (default): one ConfigMap per object, owned by the ResearchJob, labelled, with
deterministic names (``research_api.task.configmap_name``); a create answered 409 means the object
is already stored. ``PostgresStore``: tables created and migrated by the worker (``schema_version``),
plus LangGraph's Postgres checkpointer so an interview resumes mid-way after its pod is killed.
``IndexedStore``: a ``PostgresStore`` that, after each commit, also writes a small marker ConfigMap
(same name, labels and owner as the ConfigMap store's object) so the operator, which watches
ConfigMaps and never reads the database, sees the progress. ``delete_job_rows`` removes every row
and checkpoint of a job uid (``research-worker cleanup``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from research_api.task import (
    ANNOTATION_JOB_UID,
    ANNOTATION_POSTGRES_REPORT,
    ANNOTATION_STORE,
    CONFIGMAP_DATA_KEY,
    CONFIGMAP_DATA_LIMIT,
    CONFIGMAP_REPORT_KEY,
    LABEL_ANALYST,
    LABEL_JOB,
    LABEL_KIND,
    LABEL_PLAN,
    PostgresStoreSettings,
    ResearchTask,
    configmap_name,
    label_value,
    markdown_title,
    postgres_report_id,
)
from research_worker.errors import ObjectTooLarge, StoreError, WorkerConfigError
from research_worker.state import Analyst, Report, Section, TokenUsage

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


class AnalystPlan(BaseModel):
    topic: str
    feedback: str | None = None
    analysts: list[Analyst]
    usage: TokenUsage = TokenUsage()


class Store(Protocol):
    """One ResearchJob's results for one plan id."""

    async def save_analysts(self, plan: AnalystPlan) -> bool: ...  # False: already stored
    async def load_analysts(self) -> AnalystPlan | None: ...
    async def save_section(self, section: Section) -> bool: ...  # False: already stored
    async def list_sections(self) -> list[Section]: ...
    async def section_indices(self) -> set[int]: ...
    async def save_report(self, report: Report) -> bool: ...
    async def load_report(self) -> Report | None: ...
    async def usage(self) -> dict[str, TokenUsage]: ...  # by step ("plan", "interview/3", "write")
    def checkpointer(self) -> Any: ...  # a LangGraph checkpointer, or None
    async def close(self) -> None: ...


def usage_of_results(plan: AnalystPlan | None, sections: list[Section], report: Report | None) -> dict[str, TokenUsage]:
    out: dict[str, TokenUsage] = {}
    if plan is not None:
        out["plan"] = plan.usage
    for s in sections:
        out[f"interview/{s.index}"] = s.usage
    if report is not None:
        out["write"] = report.usage
    return out


# ---------------------------------------------------------------- ConfigMaps


DATA_KEY = CONFIGMAP_DATA_KEY
REPORT_KEY = CONFIGMAP_REPORT_KEY


def configmap_body(
    name: str,
    namespace: str,
    data: Mapping[str, str],
    labels: dict[str, str],
    owner: dict[str, Any],
    uid: str,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The ConfigMap manifest, refused (never truncated) if its data would exceed 1 MiB."""
    size = sum(len(k.encode()) + len(v.encode()) for k, v in data.items())
    if size > CONFIGMAP_DATA_LIMIT:
        raise ObjectTooLarge(
            f"ConfigMap {namespace}/{name} would hold {size} bytes, more than the "
            f"{CONFIGMAP_DATA_LIMIT} bytes a ConfigMap may hold; use the postgres store for results this large"
        )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": {ANNOTATION_JOB_UID: uid, **(annotations or {})},
            "ownerReferences": [owner],
        },
        "data": dict(data),
    }


class _ConfigMaps:
    """The ConfigMaps of one ResearchJob's plan: deterministic names, labels, ownerReference."""

    def __init__(self, task: ResearchTask, api_client: Any) -> None:
        from kubernetes import client

        self.core: Any = client.CoreV1Api(api_client)
        self.ns = task.job.namespace
        self.job = task.job.name
        self.uid = task.job.uid
        self.plan = task.plan_id
        self.owner = task.job.owner_reference()
        self.base_labels = {LABEL_JOB: label_value(self.job), LABEL_PLAN: self.plan}

    def _name(self, kind: str, index: int | None = None) -> str:
        return configmap_name(self.job, self.plan, kind, index)

    async def _create(
        self,
        kind: str,
        obj: BaseModel,
        index: int | None = None,
        extra: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> bool:
        from kubernetes.client.exceptions import ApiException

        labels = {**self.base_labels, LABEL_KIND: kind}
        if index is not None:
            labels[LABEL_ANALYST] = str(index)
        name = self._name(kind, index)
        data = {DATA_KEY: obj.model_dump_json(), **(extra or {})}
        body = configmap_body(name, self.ns, data, labels, self.owner, self.uid, annotations)
        try:
            await asyncio.to_thread(self.core.create_namespaced_config_map, self.ns, body)
            return True
        except ApiException as exc:
            if exc.status == 409:
                log.info("%s already stored as ConfigMap %s/%s", kind, self.ns, name)
                return False
            raise StoreError(
                f"cannot store {kind} as ConfigMap {self.ns}/{name}: HTTP {exc.status} {exc.reason}"
            ) from None
        except OSError as exc:
            raise StoreError(f"cannot reach the Kubernetes API to store {kind}: {exc}") from None

    async def _read(self, kind: str, model: type[M], index: int | None = None) -> M | None:
        from kubernetes.client.exceptions import ApiException

        name = self._name(kind, index)
        try:
            cm = await asyncio.to_thread(self.core.read_namespaced_config_map, name, self.ns)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise StoreError(f"cannot read ConfigMap {self.ns}/{name}: HTTP {exc.status} {exc.reason}") from None
        return model.model_validate_json((cm.data or {})[DATA_KEY])

    async def _list(self, kind: str | None) -> list[Any]:
        """This plan's ConfigMaps of one kind (None: of every kind), of this job uid only."""
        from kubernetes.client.exceptions import ApiException

        selector = ",".join(f"{k}={v}" for k, v in self.base_labels.items())
        selector += f",{LABEL_KIND}" + (f"={kind}" if kind is not None else "")

        try:
            resp = await asyncio.to_thread(self.core.list_namespaced_config_map, self.ns, label_selector=selector)
        except ApiException as exc:
            raise StoreError(f"cannot list ConfigMaps in {self.ns}: HTTP {exc.status} {exc.reason}") from None
        return [
            cm
            for cm in resp.items
            if ((cm.metadata and cm.metadata.annotations) or {}).get(ANNOTATION_JOB_UID) == self.uid
        ]


class ConfigMapStore(_ConfigMaps):
    async def save_analysts(self, plan: AnalystPlan) -> bool:
        return await self._create("analysts", plan)

    async def load_analysts(self) -> AnalystPlan | None:
        return await self._read("analysts", AnalystPlan)

    async def save_section(self, section: Section) -> bool:
        return await self._create("section", section, section.index)

    async def list_sections(self) -> list[Section]:
        items = await self._list("section")
        return sorted((Section.model_validate_json(cm.data[DATA_KEY]) for cm in items), key=lambda s: s.index)

    async def section_indices(self) -> set[int]:
        return {int(cm.metadata.labels[LABEL_ANALYST]) for cm in await self._list("section")}

    async def save_report(self, report: Report) -> bool:
        # The Markdown also under its own key, so people can read it with kubectl.
        return await self._create("report", report, extra={REPORT_KEY: report.markdown})

    async def load_report(self) -> Report | None:
        return await self._read("report", Report)

    async def usage(self) -> dict[str, TokenUsage]:
        return usage_of_results(await self.load_analysts(), await self.list_sections(), await self.load_report())

    def checkpointer(self) -> Any:
        return None

    async def close(self) -> None:
        return None


# ---------------------------------------------------------------- PostgreSQL

SCHEMA_LOCK = 0x7265736561726368  # pg_advisory_xact_lock key ("research")

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE research_analysts (
            job_uid text NOT NULL, plan text NOT NULL, namespace text NOT NULL, job_name text NOT NULL,
            record jsonb NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (job_uid, plan));
        CREATE TABLE research_sections (
            job_uid text NOT NULL, plan text NOT NULL, analyst_index int NOT NULL,
            record jsonb NOT NULL, created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (job_uid, plan, analyst_index));
        CREATE TABLE research_reports (
            job_uid text NOT NULL, plan text NOT NULL, record jsonb NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (job_uid, plan));
        """,
    ),
    (
        2,
        """
        CREATE TABLE research_usage (
            job_uid text NOT NULL, plan text NOT NULL, step text NOT NULL,
            input_tokens bigint NOT NULL, output_tokens bigint NOT NULL, total_tokens bigint NOT NULL,
            calls int NOT NULL, PRIMARY KEY (job_uid, plan, step));
        """,
    ),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


class PostgresStore:
    def __init__(self, task: ResearchTask, pool: Any, saver: Any) -> None:
        self.pool = pool
        self.saver = saver
        self.uid = task.job.uid
        self.plan = task.plan_id
        self.ns = task.job.namespace
        self.job = task.job.name

    @classmethod
    async def open(cls, task: ResearchTask, dsn: str) -> PostgresStore:
        import psycopg
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
        from psycopg.rows import dict_row
        from psycopg_pool import AsyncConnectionPool

        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            dsn,
            min_size=1,
            max_size=max(2, task.model.max_concurrency + 1),
            kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
            open=False,
        )
        try:
            await pool.open(wait=True, timeout=10)
        except (psycopg.Error, Exception) as exc:
            await pool.close()
            raise StoreError(f"cannot connect to PostgreSQL: {type(exc).__name__}: {exc}") from None
        try:
            await migrate(pool)
            saver = AsyncPostgresSaver(pool)
            await saver.setup()
        except psycopg.Error as exc:
            await pool.close()
            raise StoreError(f"cannot prepare the PostgreSQL schema: {exc}") from None
        return cls(task, pool, saver)

    async def _insert(self, sql: str, params: tuple[Any, ...], step: str, usage: TokenUsage) -> bool:
        """Insert a result row and, in the same transaction, its usage row; False if already stored."""
        import psycopg

        try:
            async with self.pool.connection() as conn, conn.transaction():
                cur = await conn.execute(sql, params)
                if not cur.rowcount:
                    return False
                u = usage
                await conn.execute(
                    "INSERT INTO research_usage VALUES (%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
                    (self.uid, self.plan, step, u.input_tokens, u.output_tokens, u.total_tokens, u.calls),
                )
                return True
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL write failed: {exc}") from None

    async def _fetch(self, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        import psycopg

        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(sql, params)
                return list(await cur.fetchall())
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL read failed: {exc}") from None

    async def save_analysts(self, plan: AnalystPlan) -> bool:
        return await self._insert(
            "INSERT INTO research_analysts VALUES (%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
            (self.uid, self.plan, self.ns, self.job, plan.model_dump_json()),
            "plan",
            plan.usage,
        )

    async def load_analysts(self) -> AnalystPlan | None:
        rows = await self._fetch(
            "SELECT record FROM research_analysts WHERE job_uid=%s AND plan=%s", (self.uid, self.plan)
        )
        return AnalystPlan.model_validate(rows[0]["record"]) if rows else None

    async def save_section(self, section: Section) -> bool:
        return await self._insert(
            "INSERT INTO research_sections VALUES (%s,%s,%s,%s) ON CONFLICT DO NOTHING",
            (self.uid, self.plan, section.index, section.model_dump_json()),
            f"interview/{section.index}",
            section.usage,
        )

    async def list_sections(self) -> list[Section]:
        rows = await self._fetch(
            "SELECT record FROM research_sections WHERE job_uid=%s AND plan=%s ORDER BY analyst_index",
            (self.uid, self.plan),
        )
        return [Section.model_validate(r["record"]) for r in rows]

    async def section_indices(self) -> set[int]:
        rows = await self._fetch(
            "SELECT analyst_index FROM research_sections WHERE job_uid=%s AND plan=%s", (self.uid, self.plan)
        )
        return {int(r["analyst_index"]) for r in rows}

    async def save_report(self, report: Report) -> bool:
        return await self._insert(
            "INSERT INTO research_reports VALUES (%s,%s,%s) ON CONFLICT DO NOTHING",
            (self.uid, self.plan, report.model_dump_json()),
            "write",
            report.usage,
        )

    async def load_report(self) -> Report | None:
        rows = await self._fetch(
            "SELECT record FROM research_reports WHERE job_uid=%s AND plan=%s", (self.uid, self.plan)
        )
        return Report.model_validate(rows[0]["record"]) if rows else None

    async def usage(self) -> dict[str, TokenUsage]:
        rows = await self._fetch(
            "SELECT step, input_tokens, output_tokens, total_tokens, calls FROM research_usage "
            "WHERE job_uid=%s AND plan=%s",
            (self.uid, self.plan),
        )
        return {r.pop("step"): TokenUsage.model_validate(r) for r in rows}

    def checkpointer(self) -> Any:
        return self.saver

    async def close(self) -> None:
        await self.pool.close()


async def migrate(pool: Any) -> int:
    """Apply the migrations not yet recorded in ``research_schema_version``, under an advisory lock
    so that pods starting together do not race. Returns the schema version."""
    async with pool.connection() as conn:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS research_schema_version ("
                "version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cur = await conn.execute("SELECT coalesce(max(version), 0) AS v FROM research_schema_version")
            row = await cur.fetchone()
            current = int(row["v"])
            for version, sql in MIGRATIONS:
                if version > current:
                    for statement in (x.strip() for x in sql.split(";")):
                        if statement:
                            await conn.execute(statement)
                    await conn.execute("INSERT INTO research_schema_version (version) VALUES (%s)", (version,))
                    log.info("applied schema migration %d", version)
    return SCHEMA_VERSION


# ---------------------------------------------------------------- markers for the operator


class SectionMarker(BaseModel):
    """What a section marker holds: enough for progress and token accounting, not the content."""

    index: int
    analyst: str
    title: str
    found_sources: bool
    sources: int
    usage: TokenUsage


class ReportMarker(BaseModel):
    """What the report marker holds; the report itself is read from PostgreSQL by ``postgres_id``."""

    title: str | None
    postgres_id: str
    sections: list[int]
    sources: int
    usage: TokenUsage


class MarkerWriter(_ConfigMaps):
    """Writes the marker ConfigMaps of the PostgreSQL store. A marker is written only after its row
    is committed, so a marker always means the row exists; writing one twice is a 409, fine."""

    STORE = "postgres"

    def _annotations(self, **extra: str) -> dict[str, str]:
        return {ANNOTATION_STORE: self.STORE, **extra}

    async def analysts(self, plan: AnalystPlan) -> bool:
        # The whole plan (a few kB even for 50 analysts): the operator shows it in status for review.
        return await self._create("analysts", plan, annotations=self._annotations())

    async def section(self, section: Section) -> bool:
        marker = SectionMarker(
            index=section.index,
            analyst=section.analyst.name,
            title=section.title,
            found_sources=section.found_sources,
            sources=len(section.sources),
            usage=section.usage,
        )
        return await self._create("section", marker, section.index, annotations=self._annotations())

    async def report(self, report: Report) -> bool:
        report_id = postgres_report_id(self.uid, self.plan)
        marker = ReportMarker(
            title=markdown_title(report.markdown),
            postgres_id=report_id,
            sections=report.sections,
            sources=len(report.sources),
            usage=report.usage,
        )
        annotations = self._annotations(**{ANNOTATION_POSTGRES_REPORT: report_id})
        return await self._create("report", marker, annotations=annotations)

    async def existing(self) -> set[tuple[str, int | None]]:
        """(kind, analyst index) of every marker of this plan and job uid."""
        out: set[tuple[str, int | None]] = set()
        for cm in await self._list(None):
            labels = (cm.metadata and cm.metadata.labels) or {}
            idx = labels.get(LABEL_ANALYST)
            out.add((str(labels.get(LABEL_KIND)), int(idx) if idx is not None and idx.isdigit() else None))
        return out


class IndexedStore:
    """The PostgreSQL store plus marker ConfigMaps for the operator (see ``MarkerWriter``).

    Reads go to PostgreSQL. Each save writes its marker after the commit, also when the row was
    already there (a pod retried between commit and marker). ``open`` first writes the markers of
    rows that have none, since a step that finds its work already stored does not save again."""

    def __init__(self, inner: PostgresStore, markers: MarkerWriter) -> None:
        self.inner = inner
        self.markers = markers

    @classmethod
    async def open(cls, task: ResearchTask, dsn: str, api_client: Any) -> IndexedStore:
        store = cls(await PostgresStore.open(task, dsn), MarkerWriter(task, api_client))
        try:
            await store.sync_markers()
        except BaseException:
            await store.close()
            raise
        return store

    async def sync_markers(self) -> int:
        """Write the missing markers of this plan's stored rows; returns how many were written."""
        have = await self.markers.existing()
        written = 0
        plan = await self.inner.load_analysts()
        if plan is not None and ("analysts", None) not in have:
            written += await self.markers.analysts(plan)
        indices = await self.inner.section_indices()
        if any(("section", i) not in have for i in indices):
            for section in await self.inner.list_sections():
                if ("section", section.index) not in have:
                    written += await self.markers.section(section)
        if ("report", None) not in have:
            report = await self.inner.load_report()
            if report is not None:
                written += await self.markers.report(report)
        if written:
            log.info("wrote %d missing marker ConfigMaps for rows already in PostgreSQL", written)
        return written

    async def save_analysts(self, plan: AnalystPlan) -> bool:
        ok = await self.inner.save_analysts(plan)
        stored = plan if ok else await self.inner.load_analysts()
        if stored is not None:
            await self.markers.analysts(stored)  # the stored plan, which may be another pod's
        return ok

    async def load_analysts(self) -> AnalystPlan | None:
        return await self.inner.load_analysts()

    async def save_section(self, section: Section) -> bool:
        ok = await self.inner.save_section(section)
        if ok:
            stored: Section | None = section
        else:
            stored = next((s for s in await self.inner.list_sections() if s.index == section.index), None)
        if stored is not None:
            await self.markers.section(stored)
        return ok

    async def list_sections(self) -> list[Section]:
        return await self.inner.list_sections()

    async def section_indices(self) -> set[int]:
        return await self.inner.section_indices()

    async def save_report(self, report: Report) -> bool:
        ok = await self.inner.save_report(report)
        stored = report if ok else await self.inner.load_report()
        if stored is not None:
            await self.markers.report(stored)
        return ok

    async def load_report(self) -> Report | None:
        return await self.inner.load_report()

    async def usage(self) -> dict[str, TokenUsage]:
        return await self.inner.usage()

    def checkpointer(self) -> Any:
        return self.inner.checkpointer()

    async def close(self) -> None:
        await self.inner.close()


# ---------------------------------------------------------------- cleanup

RESULT_TABLES = ("research_analysts", "research_sections", "research_reports", "research_usage")
CHECKPOINT_TABLES = ("checkpoints", "checkpoint_blobs", "checkpoint_writes")


async def delete_job_rows(dsn: str, job_uid: str) -> dict[str, int]:
    """Delete every row of one ResearchJob (all plans) and the LangGraph checkpoints of its
    interview threads (``<job uid>:<plan>:<analyst>``). Idempotent: a second run deletes nothing.
    Returns the rows deleted by table, plus ``threads``."""
    import psycopg
    from psycopg.rows import dict_row

    if not job_uid.strip():
        raise WorkerConfigError("cleanup needs the ResearchJob's uid")
    deleted: dict[str, int] = {}
    try:
        async with await psycopg.AsyncConnection.connect(dsn, connect_timeout=10, row_factory=dict_row) as conn:
            async with conn.transaction():
                cur = await conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
                tables = {str(r["tablename"]) for r in await cur.fetchall()}
                threads: set[str] = set()
                for table in (t for t in CHECKPOINT_TABLES if t in tables):
                    cur = await conn.execute(
                        f"SELECT DISTINCT thread_id FROM {table} WHERE starts_with(thread_id, %s)",  # noqa: S608
                        (f"{job_uid}:",),
                    )
                    threads |= {str(r["thread_id"]) for r in await cur.fetchall()}
                for table in (t for t in CHECKPOINT_TABLES if t in tables):
                    cur = await conn.execute(
                        f"DELETE FROM {table} WHERE thread_id = ANY(%s)",  # noqa: S608 - a fixed table name
                        (sorted(threads),),
                    )
                    deleted[table] = cur.rowcount
                for table in (t for t in RESULT_TABLES if t in tables):
                    cur = await conn.execute(f"DELETE FROM {table} WHERE job_uid = %s", (job_uid,))  # noqa: S608
                    deleted[table] = cur.rowcount
                deleted["threads"] = len(threads)
    except psycopg.OperationalError as exc:
        raise StoreError(f"cannot connect to PostgreSQL: {exc}") from None
    except psycopg.Error as exc:
        raise StoreError(f"PostgreSQL cleanup failed: {exc}") from None
    return deleted


async def read_postgres_report(dsn: str, job_uid: str, plan: str) -> Report | None:
    """The stored report of one plan of a ResearchJob, read without touching the schema."""
    import psycopg
    from psycopg.rows import dict_row

    try:
        async with await psycopg.AsyncConnection.connect(dsn, connect_timeout=10, row_factory=dict_row) as conn:
            cur = await conn.execute(
                "SELECT record FROM research_reports WHERE job_uid=%s AND plan=%s", (job_uid, plan)
            )
            row = await cur.fetchone()
    except psycopg.errors.UndefinedTable:
        return None
    except psycopg.Error as exc:
        raise StoreError(f"cannot read the report from PostgreSQL: {exc}") from None
    return Report.model_validate(row["record"]) if row else None


# ---------------------------------------------------------------- opening


def kube_api_client() -> Any:
    """In-cluster credentials in a pod, else the kubeconfig ($KUBECONFIG or ~/.kube/config)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
        return client.ApiClient()
    except config.ConfigException:
        pass
    try:
        return config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"))  # type: ignore[no-untyped-call]
    except (config.ConfigException, OSError) as exc:
        raise WorkerConfigError(f"no Kubernetes credentials (in-cluster or kubeconfig): {exc}") from None


def load_configmap_data(api_client: Any, namespace: str) -> Callable[[str], dict[str, str]]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    def load(name: str) -> dict[str, str]:
        try:
            cm = client.CoreV1Api(api_client).read_namespaced_config_map(name, namespace)
        except ApiException as exc:
            raise WorkerConfigError(
                f"cannot read ConfigMap {namespace}/{name}: HTTP {exc.status} {exc.reason}"
            ) from None
        return dict(cm.data or {})

    return load


async def open_store(task: ResearchTask, api_client: Any = None) -> Store:
    """The task's store: ConfigMaps, PostgreSQL, or PostgreSQL with markers (``store.markers``)."""
    if isinstance(task.store, PostgresStoreSettings):
        dsn = os.environ.get(task.store.dsn_env)
        if not dsn:
            raise WorkerConfigError(
                f"the PostgreSQL DSN variable {task.store.dsn_env} is not set (feed it from a Secret)"
            )
        if task.store.markers:
            return await IndexedStore.open(task, dsn, api_client if api_client is not None else kube_api_client())
        return await PostgresStore.open(task, dsn)
    return ConfigMapStore(task, api_client if api_client is not None else kube_api_client())


@asynccontextmanager
async def opened(task: ResearchTask, api_client: Any = None) -> AsyncIterator[Store]:
    store = await open_store(task, api_client)
    try:
        yield store
    finally:
        await store.close()


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
