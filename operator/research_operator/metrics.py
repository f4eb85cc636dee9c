"""Prometheus metrics of the operator (served on settings.metrics_port at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

JOBS_BY_PHASE = Gauge("research_operator_researchjobs", "ResearchJobs by phase.", ["phase"], registry=REGISTRY)
BATCHES_ACTIVE = Gauge("research_operator_batches_active", "Worker batch Jobs running.", registry=REGISTRY)
BATCHES_QUEUED = Gauge("research_operator_batches_queued", "Worker batches waiting for admission.", registry=REGISTRY)
QUOTA_WAITS = Counter(
    "research_operator_quota_waits_total",
    "Times a batch waited for ResourceQuota headroom (computed or a 403 exceeded quota).",
    ["namespace"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "research_operator_reconcile_seconds",
    "Time of one reconcile pass of a ResearchJob.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)
API_REQUESTS = Counter(
    "research_operator_api_requests_total",
    "Kubernetes API requests the reconciler made (watches excluded).",
    ["verb", "resource"],
    registry=REGISTRY,
)
JOBS_CREATED = Counter(
    "research_operator_jobs_created_total", "Worker Jobs created, by step.", ["step"], registry=REGISTRY
)
