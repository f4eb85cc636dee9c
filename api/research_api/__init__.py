"""research_api: the contract between the operator and the worker (pydantic only, no LLM or
Kubernetes imports): the task (``task``), the environment variables (``environment``), the exit
codes (``exitcodes``), the names and labels (``names``) and the stored records (``records``), beside
the ResearchJob API itself (``researchjob``; ``crd`` generates the CRD from it)."""

from research_api.names import configmap_name
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
