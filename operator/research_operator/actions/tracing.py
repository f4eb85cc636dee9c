"""The operator's spans (research_api.tracing says when tracing is on and how it is exported).

One trace per ResearchJob. Its root, ``ResearchJob <namespace>/<name>``, is begun by the first pass
that reconciles the ResearchJob (and ended at once: it marks when the operator took it up); its
W3C traceparent goes into ``status.traceparent``, so the passes of a restarted operator, or of a
new leader, continue the same trace. Each worker Job admitted gets a child span ``admit <step>``
around its create request, and its task carries that span's traceparent: the worker's spans
(its step, each interview, each model call) are the admission's children.

Off (no span, no status field, no task field) unless ``research_api.tracing.start`` installed a
provider in this process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from research_api import tracing
from research_api.status import TERMINAL_PHASES, ResearchJobStatus
from research_api.task import ResearchTask
from research_operator.cache.world import WORLD, Key
from research_operator.constants import LABEL_BATCH
from research_operator.decisions.manifests import Owner, with_traceparent

SCOPE = "research_operator"


def _tracer() -> Any:
    return tracing.tracer(SCOPE)


def research_job_trace(key: Key, owner: Owner, prev: ResearchJobStatus) -> str | None:
    """The traceparent of the ResearchJob's trace: the one its status names, else the one this
    process began, else a new one (its root span begun and ended now). None when tracing is off, and
    for a ResearchJob that had finished before any trace was begun for it."""
    if not tracing.enabled():
        return None
    if tracing.valid_traceparent(prev.traceparent):
        assert prev.traceparent is not None
        WORLD.traces[key] = prev.traceparent
        return prev.traceparent
    known = WORLD.traces.get(key)
    if known is not None:
        return known
    if prev.phase in TERMINAL_PHASES:
        return None
    from opentelemetry.context import Context

    span = _tracer().start_span(
        f"ResearchJob {owner.namespace}/{owner.name}",
        context=Context(),  # a root: a new trace
        attributes={
            tracing.K8S_NAMESPACE: owner.namespace,
            tracing.RJ_NAME: owner.name,
            tracing.RJ_UID: owner.uid,
        },
    )
    span.end()
    begun = tracing.traceparent_of(span)
    if begun is not None:
        WORLD.traces[key] = begun
    return begun


@contextlib.contextmanager
def admission(
    traceparent: str | None, job: dict[str, Any], step: str, task: ResearchTask | None = None
) -> Iterator[Any]:
    """The span ``admit <step>`` of one worker Job (its create request), a child of the ResearchJob's
    trace; the Job's task (``task``, as admission left it; None: a Job without one) is given its
    traceparent. Yields None, and changes nothing, when tracing is off or the ResearchJob has no trace."""
    if traceparent is None or not tracing.enabled():
        yield None
        return
    meta = job["metadata"]
    attributes = {
        tracing.K8S_NAMESPACE: meta["namespace"],
        tracing.K8S_JOB: meta["name"],
        tracing.RJ_STEP: step,
    }
    batch = (meta.get("labels") or {}).get(LABEL_BATCH)
    if batch is not None:
        attributes[tracing.RJ_BATCH] = batch
    with _tracer().start_as_current_span(
        f"admit {step}", context=tracing.context_of(traceparent), attributes=attributes
    ) as span:
        mine = tracing.traceparent_of(span)
        if mine is not None and task is not None:
            with_traceparent(job, task, mine)
        yield span


def refused(span: Any, why: str) -> None:
    """The create of an admitted Job was refused (quota taken meanwhile, namespace being deleted)."""
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, why))
