"""The PostgreSQL store: one row per object in tables the worker migrates (``migrations``), token
usage committed with each result, and LangGraph's Postgres checkpointer, so an interview resumes
mid-way after its pod is killed."""

from __future__ import annotations

from typing import Any

from research_api.records import AnalystPlan, Report, Section, TokenUsage
from research_api.task import ResearchTask
from research_worker.errors import StoreError
from research_worker.store.migrations import migrate


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

    async def claim_report(self, holder: str) -> bool:
        import psycopg

        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(
                    "INSERT INTO research_claims VALUES (%s,%s,'report',%s) ON CONFLICT DO NOTHING",
                    (self.uid, self.plan, holder),
                )
                return bool(cur.rowcount)
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL write failed: {exc}") from None

    def checkpointer(self) -> Any:
        return self.saver

    async def close(self) -> None:
        await self.pool.close()
