"""Where a ResearchJob's results live between steps: analysts, sections, the report and token usage.

``ConfigMapStore`` (default, ``configmaps``): one ConfigMap per object, owned by the ResearchJob,
labelled, with deterministic names (``research_api.names.configmap_name``); a create answered 409
means the object is already stored. ``PostgresStore`` (``postgres``): tables created and migrated by
the worker (``migrations``), plus LangGraph's Postgres checkpointer so an interview resumes mid-way
after its pod is killed. ``IndexedStore`` (``markers``): a ``PostgresStore`` that, after each
commit, also writes a small marker ConfigMap (same name, labels and owner as the ConfigMap store's
object) so the operator, which watches ConfigMaps and never reads the database, sees the progress.
``admin``: ``delete_job_rows`` removes every row and checkpoint of a job uid (``research-worker
cleanup``), ``read_postgres_report`` reads a report back. The records themselves are the
operator's too: ``research_api.records``.
"""

from research_api.records import AnalystPlan
from research_worker.store.admin import CHECKPOINT_TABLES, RESULT_TABLES, delete_job_rows, read_postgres_report
from research_worker.store.base import Store, usage_of_results
from research_worker.store.configmaps import ConfigMapStore, configmap_body
from research_worker.store.kube import kube_api_client, load_configmap_data
from research_worker.store.markers import IndexedStore, MarkerWriter
from research_worker.store.migrations import MIGRATIONS, SCHEMA_VERSION, migrate
from research_worker.store.opening import open_store, opened
from research_worker.store.postgres import PostgresStore

__all__ = [
    "CHECKPOINT_TABLES",
    "MIGRATIONS",
    "RESULT_TABLES",
    "SCHEMA_VERSION",
    "AnalystPlan",
    "ConfigMapStore",
    "IndexedStore",
    "MarkerWriter",
    "PostgresStore",
    "Store",
    "configmap_body",
    "delete_job_rows",
    "kube_api_client",
    "load_configmap_data",
    "migrate",
    "open_store",
    "opened",
    "read_postgres_report",
    "usage_of_results",
]
