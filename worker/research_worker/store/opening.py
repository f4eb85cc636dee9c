"""Opening the store a task names."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from research_api.task import PostgresStoreSettings, ResearchTask
from research_worker.errors import WorkerConfigError
from research_worker.store.base import Store
from research_worker.store.configmaps import ConfigMapStore
from research_worker.store.kube import kube_api_client
from research_worker.store.markers import IndexedStore
from research_worker.store.postgres import PostgresStore


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
