"""research_api: types shared by the operator and the worker (no LLM imports)."""

from research_api.task import (
    Budget,
    ConfigMapStoreSettings,
    DocumentsSource,
    JobRef,
    ModelSettings,
    PostgresStoreSettings,
    ResearchTask,
    Step,
    TavilySource,
    WikipediaSource,
    configmap_name,
    plan_id,
)

__all__ = [
    "Budget",
    "ConfigMapStoreSettings",
    "DocumentsSource",
    "JobRef",
    "ModelSettings",
    "PostgresStoreSettings",
    "ResearchTask",
    "Step",
    "TavilySource",
    "WikipediaSource",
    "configmap_name",
    "plan_id",
]
