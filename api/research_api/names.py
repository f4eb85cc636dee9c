"""The names, labels and annotations of the objects the operator and the worker share.

A ResearchJob's children (worker Jobs, the workers' ServiceAccount) and the objects its worker
stores (ConfigMaps, markers) have deterministic names, so a repeated create is a 409 and either
side finds an object without listing. Every name or label value that could be too long goes
through one helper, ``bounded_name``.
"""

from __future__ import annotations

import hashlib

from research_api.researchjob import GROUP

LABEL_JOB = f"{GROUP}/job"  # the owning ResearchJob's name (hashed when longer than 63)
LABEL_PLAN = f"{GROUP}/plan"  # the plan id
LABEL_KIND = f"{GROUP}/kind"  # analysts | section | report (research_api.records.StoredKind)
LABEL_ANALYST = f"{GROUP}/analyst"  # the analyst index of a section
LABEL_STEP = f"{GROUP}/step"  # on worker Jobs and pods: plan | interview | write | cleanup
LABEL_BATCH = f"{GROUP}/batch"  # on interview Jobs and pods: the batch index (a planner's: the batch it goes on to)
SETTINGS_KIND = "operator-settings"  # the LABEL_KIND of the operator's settings ConfigMap
ANNOTATION_JOB_UID = f"{GROUP}/job-uid"
# On the marker ConfigMaps the PostgreSQL store writes for the operator (the rows themselves live
# in PostgreSQL): ANNOTATION_STORE says which store holds the full object, and the report marker
# carries the report's id in that store.
ANNOTATION_STORE = f"{GROUP}/store"
ANNOTATION_POSTGRES_REPORT = f"{GROUP}/postgres-report"

MAX_OBJECT_NAME = 253  # DNS subdomain (ConfigMap names)
MAX_CHILD_NAME = 63  # DNS label (Job names end up in pod labels)
MAX_LABEL_VALUE = 63
CONFIGMAP_DATA_LIMIT = 1024 * 1024  # bytes of data a ConfigMap may hold
CONFIGMAP_DATA_KEY = "data.json"  # each stored object, as JSON
CONFIGMAP_REPORT_KEY = "report.md"  # the report also as Markdown, for people


def bounded_name(head: str, limit: int, tail: str = "") -> str:
    """``head + tail`` if it fits in ``limit`` characters; else ``head`` cut short and ended by a hash
    of the whole of it, then ``tail`` kept whole. Distinct heads keep distinct names."""
    if len(head) + len(tail) <= limit:
        return head + tail
    digest = hashlib.sha256(head.encode()).hexdigest()[:8]
    return f"{head[: limit - len(tail) - 9].rstrip('-.')}-{digest}{tail}"


def label_value(value: str) -> str:
    """A label value of at most 63 characters (long values end in a hash)."""
    return bounded_name(value, MAX_LABEL_VALUE)


REPORT_CLAIM = "report-claim"  # the ConfigMap whose creator writes the report (the worker's ``claim_report``)
STORED_KINDS = ("analysts", "section", "report")  # research_api.records.StoredKind, in plan order
# An interview's latest LangGraph checkpoint (the ConfigMap store's checkpointer). Not a stored kind:
# its ConfigMaps carry no kind label, so the operator's ConfigMap watch never sees them.
CHECKPOINT = "checkpoint"


def plan_configmap_names(job: str, plan: str, max_analysts: int, kind: str | None = None) -> list[str]:
    """The names of every ConfigMap a plan's workers may store (``kind``: of that kind only): the
    worker reads them by name, never by listing, and its Role allows ``get`` on these names alone."""
    names: list[str] = []
    for k in STORED_KINDS if kind is None else (kind,):
        if k == "section":
            names.extend(configmap_name(job, plan, k, i) for i in range(max_analysts))
        else:
            names.append(configmap_name(job, plan, k))
    return names


def checkpoint_configmap_names(job: str, plan: str, max_analysts: int) -> list[str]:
    """The ConfigMaps of a plan's interview checkpoints, one per analyst: the worker's Role allows
    ``get`` and ``update`` on these names alone."""
    return [configmap_name(job, plan, CHECKPOINT, i) for i in range(max_analysts)]


def configmap_name(job: str, plan: str, kind: str, index: int | None = None) -> str:
    """The deterministic name of a stored object: ``<job>-<plan>-analysts``, ``<job>-<plan>-section-007``."""
    suffix = f"{plan}-{kind}" if index is None else f"{plan}-{kind}-{index:03d}"
    return bounded_name(job, MAX_OBJECT_NAME, f"-{suffix}")


def child_name(rj: str, *parts: str) -> str:
    """A deterministic DNS-1123 name for a child object of a ResearchJob, at most 63 characters."""
    return bounded_name("-".join((rj, *parts)), MAX_CHILD_NAME)


def postgres_report_id(job_uid: str, plan: str) -> str:
    """The id of a report in the PostgreSQL store: ``<job uid>/<plan id>`` (the table's key)."""
    return f"{job_uid}/{plan}"


def parse_postgres_report_id(report_id: str) -> tuple[str, str]:
    uid, sep, plan = report_id.rpartition("/")
    if not sep or not uid or not plan:
        raise ValueError(f"a PostgreSQL report id is <job uid>/<plan id>, not {report_id!r}")
    return uid, plan
