"""Where a ResearchJob's results live between steps: analysts, sections, the report and token usage.

``ConfigMapStore`` (default): one ConfigMap per object, owned by the ResearchJob, labelled, with
deterministic names (``research_api.task.configmap_name``); a create answered 409 means the object
is already stored. ``PostgresStore``: tables created and migrated by the worker (``schema_version``),
plus LangGraph's Postgres checkpointer so an interview resumes mid-way after its pod is killed.
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
    name: str, namespace: str, data: Mapping[str, str], labels: dict[str, str], owner: dict[str, Any], uid: str
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
            "annotations": {ANNOTATION_JOB_UID: uid},
            "ownerReferences": [owner],
        },
        "data": dict(data),
    }


class ConfigMapStore:
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
        self, kind: str, obj: BaseModel, index: int | None = None, extra: Mapping[str, str] | None = None
    ) -> bool:
        from kubernetes.client.exceptions import ApiException

        labels = {**self.base_labels, LABEL_KIND: kind}
        if index is not None:
            labels[LABEL_ANALYST] = str(index)
        name = self._name(kind, index)
        data = {DATA_KEY: obj.model_dump_json(), **(extra or {})}
        body = configmap_body(name, self.ns, data, labels, self.owner, self.uid)
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

    async def _list(self, kind: str) -> list[Any]:
        selector = ",".join(f"{k}={v}" for k, v in {**self.base_labels, LABEL_KIND: kind}.items())
        from kubernetes.client.exceptions import ApiException

        try:
            resp = await asyncio.to_thread(self.core.list_namespaced_config_map, self.ns, label_selector=selector)
        except ApiException as exc:
            raise StoreError(f"cannot list ConfigMaps in {self.ns}: HTTP {exc.status} {exc.reason}") from None
        return [
            cm
            for cm in resp.items
            if ((cm.metadata and cm.metadata.annotations) or {}).get(ANNOTATION_JOB_UID) == self.uid
        ]

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

    async def _insert(self, sql: str, params: tuple[Any, ...]) -> bool:
        import psycopg

        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(sql, params)
                return bool(cur.rowcount)
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

    async def _save_usage(self, step: str, u: TokenUsage) -> None:
        await self._insert(
            "INSERT INTO research_usage VALUES (%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
            (self.uid, self.plan, step, u.input_tokens, u.output_tokens, u.total_tokens, u.calls),
        )

    async def save_analysts(self, plan: AnalystPlan) -> bool:
        ok = await self._insert(
            "INSERT INTO research_analysts VALUES (%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING",
            (self.uid, self.plan, self.ns, self.job, plan.model_dump_json()),
        )
        if ok:
            await self._save_usage("plan", plan.usage)
        return ok

    async def load_analysts(self) -> AnalystPlan | None:
        rows = await self._fetch(
            "SELECT record FROM research_analysts WHERE job_uid=%s AND plan=%s", (self.uid, self.plan)
        )
        return AnalystPlan.model_validate(rows[0]["record"]) if rows else None

    async def save_section(self, section: Section) -> bool:
        ok = await self._insert(
            "INSERT INTO research_sections VALUES (%s,%s,%s,%s) ON CONFLICT DO NOTHING",
            (self.uid, self.plan, section.index, section.model_dump_json()),
        )
        if ok:
            await self._save_usage(f"interview/{section.index}", section.usage)
        return ok

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
        ok = await self._insert(
            "INSERT INTO research_reports VALUES (%s,%s,%s) ON CONFLICT DO NOTHING",
            (self.uid, self.plan, report.model_dump_json()),
        )
        if ok:
            await self._save_usage("write", report.usage)
        return ok

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
    if isinstance(task.store, PostgresStoreSettings):
        dsn = os.environ.get(task.store.dsn_env)
        if not dsn:
            raise WorkerConfigError(
                f"the PostgreSQL DSN variable {task.store.dsn_env} is not set (feed it from a Secret)"
            )
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
