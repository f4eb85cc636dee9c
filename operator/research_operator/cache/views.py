"""What the operator reads of the objects it watches: the owning ResearchJob of a child, a Job's
state (``JobView``), and what a stored ConfigMap or marker holds (``StoredObject``). Pure parsing."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from research_api.names import ANNOTATION_POSTGRES_REPORT, ANNOTATION_STORE, CONFIGMAP_DATA_KEY, CONFIGMAP_REPORT_KEY
from research_api.records import (
    MARKER_STORE,
    AnalystPlan,
    Report,
    ReportMarker,
    ReportQuality,
    StoredKind,
    markdown_title,
    stored_record,
)
from research_api.researchjob import AnalystStatus
from research_operator.constants import (
    ANNOTATION_CLEANUP_OF,
    ANNOTATION_CLEANUP_OF_UID,
    LABEL_ANALYST,
    LABEL_BATCH,
    LABEL_KIND,
    LABEL_PLAN,
    LABEL_STEP,
)
from research_operator.decisions.admission import PodResources
from research_operator.decisions.endpoints import (
    ANNOTATION_ADMITTED,
    ANNOTATION_CONCURRENCY,
    ANNOTATION_ENDPOINT,
)
from research_operator.decisions.reconcile import JobView

log = logging.getLogger(__name__)


def owner_name(body: Mapping[str, Any]) -> str | None:
    """The ResearchJob that controls this object, from its ownerReferences (or, for a cleanup Job
    made during a foreground deletion, which has none, from its annotation)."""
    meta = body.get("metadata", {})
    refs = [r for r in meta.get("ownerReferences") or [] if r.get("kind") == "ResearchJob"]
    refs.sort(key=lambda r: not r.get("controller"))  # the controller first, if several
    if refs:
        return str(refs[0].get("name"))
    cleanup_of = (meta.get("annotations") or {}).get(ANNOTATION_CLEANUP_OF)
    return str(cleanup_of) if cleanup_of else None


def owner_uid(body: Mapping[str, Any]) -> str | None:
    """The uid of the ResearchJob that controls this object (an unowned cleanup Job names it in an
    annotation). Bookkeeping is keyed by it: a ResearchJob deleted and created again under the same
    name, or one of the same name in another namespace, is another ResearchJob."""
    meta = body.get("metadata", {})
    refs = [r for r in meta.get("ownerReferences") or [] if r.get("kind") == "ResearchJob"]
    refs.sort(key=lambda r: not r.get("controller"))
    if refs:
        return str(refs[0].get("uid")) if refs[0].get("uid") else None
    uid = (meta.get("annotations") or {}).get(ANNOTATION_CLEANUP_OF_UID)
    return str(uid) if uid else None


def _time(value: Any) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")) if value else None
    except ValueError:
        return None


def job_view(body: Mapping[str, Any]) -> JobView:
    meta, spec, status = body.get("metadata", {}), body.get("spec", {}), body.get("status") or {}
    labels = meta.get("labels") or {}
    conds = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    failed = conds.get("Failed")
    finished = failed or conds.get("Complete")
    batch = labels.get(LABEL_BATCH)
    containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    resources = containers[0].get("resources") or {}
    annotations = meta.get("annotations") or {}
    concurrency = str(annotations.get(ANNOTATION_CONCURRENCY) or "")
    return JobView(
        name=str(meta.get("name")),
        uid=str(meta.get("uid") or ""),
        pods=int(status.get("active") or 0),
        pod=PodResources.from_spec(resources.get("requests") or {}, resources.get("limits") or {}),
        step=str(labels.get(LABEL_STEP, "")),
        plan=str(labels.get(LABEL_PLAN, "")),
        batch=int(batch) if batch is not None and str(batch).isdigit() else None,
        succeeded="Complete" in conds,
        failed=failed is not None,
        suspended=bool(spec.get("suspend")) and "Complete" not in conds and failed is None,
        message=str((failed or {}).get("message") or (failed or {}).get("reason") or ""),
        finished=_time((finished or {}).get("lastTransitionTime")),
        endpoint=str(annotations.get(ANNOTATION_ENDPOINT) or ""),
        concurrency=int(concurrency) if concurrency.isdigit() else 0,
        admitted=str(annotations.get(ANNOTATION_ADMITTED) or ""),
    )


@dataclass
class StoredObject:
    kind: str
    plan: str
    analyst: int | None
    name: str
    analysts: list[AnalystStatus] | None = None
    title: str | None = None
    report_key: str | None = None
    postgres_id: str | None = None  # a report marker of the PostgreSQL store
    tokens: int = 0
    input_tokens: int = 0  # of ``tokens``, in prompts (their cost follows the endpoint's prices)
    output_tokens: int = 0
    created: dt.datetime | None = None  # when the worker stored it (token budgets count by it)
    rate_limited: int = 0  # 429 answers the worker saw while making it
    quality: ReportQuality | None = None  # a report's (or report marker's) quality figures


def stored_object(body: Mapping[str, Any]) -> StoredObject | None:
    """What a ConfigMap of the worker's ConfigMap store holds, or a marker of its PostgreSQL store
    (the same names and labels; a marker holds the record of research_api.records for it, and a
    report marker the report's id in PostgreSQL instead of the report)."""
    meta = body.get("metadata", {})
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    data: Mapping[str, str] = body.get("data") or {}
    kind = labels.get(LABEL_KIND)
    if kind not in {k.value for k in StoredKind}:
        return None
    try:
        record = stored_record(StoredKind(kind), data, marker=annotations.get(ANNOTATION_STORE) == MARKER_STORE)
    except ValidationError as e:
        log.warning("unreadable %s in ConfigMap %s: %s", kind, meta.get("name"), e)
        return None
    idx = labels.get(LABEL_ANALYST)
    obj = StoredObject(
        kind=kind,
        plan=str(labels.get(LABEL_PLAN, "")),
        analyst=int(idx) if idx is not None and str(idx).isdigit() else None,
        name=str(meta.get("name")),
        tokens=record.usage.total_tokens,
        input_tokens=record.usage.input_tokens,
        output_tokens=record.usage.output_tokens,
        created=_time(meta.get("creationTimestamp")),
        rate_limited=record.usage.rate_limited,
    )
    if isinstance(record, AnalystPlan):
        obj.analysts = [
            AnalystStatus(name=a.name, role=a.role, affiliation=a.affiliation, description=a.description)
            for a in record.analysts
        ]
    elif isinstance(record, ReportMarker):
        obj.postgres_id = str(annotations.get(ANNOTATION_POSTGRES_REPORT) or record.postgres_id)
        obj.title = record.title or None
        obj.quality = record.quality
    elif isinstance(record, Report):
        obj.report_key = CONFIGMAP_REPORT_KEY if CONFIGMAP_REPORT_KEY in data else CONFIGMAP_DATA_KEY
        obj.title = markdown_title(record.markdown or data.get(CONFIGMAP_REPORT_KEY) or "")
        obj.quality = record.quality
    return obj
