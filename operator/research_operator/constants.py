"""Names, labels and annotations shared by the operator's modules (and the worker's stores)."""

from __future__ import annotations

import hashlib

from research_api.researchjob import GROUP
from research_api.task import LABEL_ANALYST, LABEL_JOB, LABEL_KIND, LABEL_PLAN, label_value, plan_id

__all__ = ["LABEL_ANALYST", "LABEL_JOB", "LABEL_KIND", "LABEL_PLAN", "label_value", "plan_id"]

LABEL_STEP = f"{GROUP}/step"  # plan | interview | write
LABEL_BATCH = f"{GROUP}/batch"  # batch index of an interview Job
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "research-operator"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"  # names a Kueue WorkloadPriorityClass

FINALIZER = f"{GROUP}/external-store"  # on postgres-store ResearchJobs until their rows are deleted
ANNOTATION_CLEANUP_OF = f"{GROUP}/cleanup-of"  # the ResearchJob an unowned cleanup Job cleans up
WORKER_UID = 65532  # non-root uid of the worker image

MAX_NAME = 63


def child_name(rj: str, *parts: str) -> str:
    """A deterministic DNS-1123 name for a child object, at most 63 characters."""
    name = "-".join((rj, *parts))
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: MAX_NAME - 9]}-{digest}"
