"""Operations on the PostgreSQL store outside a step: delete a ResearchJob's rows and checkpoints
(``research-worker cleanup``), read a report back (``show-report``, ``kubectl research report``)."""

from __future__ import annotations

from research_api.records import Report
from research_worker.errors import StoreError, WorkerConfigError

RESULT_TABLES = ("research_analysts", "research_sections", "research_reports", "research_usage", "research_claims")
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
