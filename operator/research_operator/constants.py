"""The operator's own labels and annotations, beside the names it shares with the worker
(research_api.names), which it re-exports for its modules."""

from __future__ import annotations

from research_api.names import (
    LABEL_ANALYST,
    LABEL_BATCH,
    LABEL_JOB,
    LABEL_KIND,
    LABEL_PLAN,
    LABEL_STEP,
    SETTINGS_KIND,
    child_name,
    label_value,
)
from research_api.researchjob import GROUP
from research_api.task import plan_id

__all__ = [
    "LABEL_ANALYST",
    "LABEL_BATCH",
    "LABEL_JOB",
    "LABEL_KIND",
    "LABEL_PLAN",
    "LABEL_STEP",
    "SETTINGS_KIND",
    "child_name",
    "label_value",
    "plan_id",
]

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "research-operator"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

FINALIZER = f"{GROUP}/external-store"  # on postgres-store ResearchJobs until their rows are deleted
ANNOTATION_CLEANUP_OF = f"{GROUP}/cleanup-of"  # the ResearchJob an unowned cleanup Job cleans up
ANNOTATION_CLEANUP_OF_UID = f"{GROUP}/cleanup-of-uid"  # and its uid
WORKER_UID = 65532  # non-root uid of the worker image
