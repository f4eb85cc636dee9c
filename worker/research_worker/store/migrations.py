"""The PostgreSQL store's schema: numbered migrations, applied once each by whichever worker pod
comes first (``research_schema_version`` records them)."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

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
    (
        3,
        """
        CREATE TABLE research_claims (
            job_uid text NOT NULL, plan text NOT NULL, what text NOT NULL, holder text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (job_uid, plan, what));
        """,
    ),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


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
