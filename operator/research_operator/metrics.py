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
ENDPOINT_CAPACITY = Gauge(
    "research_operator_endpoint_max_concurrent_requests",
    "A ModelEndpoint's declared maxConcurrentRequests.",
    ["endpoint"],
    registry=REGISTRY,
)
ENDPOINT_IN_FLIGHT = Gauge(
    "research_operator_endpoint_requests_in_flight_limit",
    "Requests the worker pods admitted against a ModelEndpoint may have in flight (sum of their shares).",
    ["endpoint"],
    registry=REGISTRY,
)
ENDPOINT_PODS = Gauge(
    "research_operator_endpoint_pods", "Worker pods admitted against a ModelEndpoint.", ["endpoint"], registry=REGISTRY
)
ENDPOINT_WAITING = Gauge(
    "research_operator_endpoint_waiting_researchjobs",
    "ResearchJobs whose worker Jobs wait for a ModelEndpoint's capacity.",
    ["endpoint"],
    registry=REGISTRY,
)
ENDPOINT_SHARE = Gauge(
    "research_operator_endpoint_share_per_pod",
    "Mean share of one admitted pod: concurrency, requests_per_minute or tokens_per_minute.",
    ["endpoint", "resource"],
    registry=REGISTRY,
)
NAMESPACE_TOKENS = Gauge(
    "research_operator_namespace_tokens_spent",
    "Tokens a namespace with a budget spent in the current period (stored results, and calls settled by "
    "the lease broker not stored yet).",
    ["namespace"],
    registry=REGISTRY,
)
NAMESPACE_COST = Gauge(
    "research_operator_namespace_cost_spent",
    "What a namespace with a budget spent in the current period, at the ModelEndpoints' prices.",
    ["namespace"],
    registry=REGISTRY,
)
BUDGET_REFUSED = Counter(
    "research_operator_budget_refused_total",
    "Model calls the lease broker refused because a ResearchJob's budget cannot pay their worst case.",
    ["namespace"],
    registry=REGISTRY,
)
BUDGET_OVERRUN_TOKENS = Gauge(
    "research_operator_budget_overrun_tokens",
    "Tokens calls used beyond their reservation (a prompt bound that was not one); 0 when budgets hold.",
    registry=REGISTRY,
)
ENDPOINT_429 = Counter(
    "research_operator_endpoint_rate_limited_total",
    "429 answers workers reported with their stored results, by ModelEndpoint ('' for none declared).",
    ["endpoint"],
    registry=REGISTRY,
)
ENDPOINT_TOKENS_PER_MINUTE = Gauge(
    "research_operator_endpoint_tokens_per_minute",
    "Tokens per minute used at a ModelEndpoint over the last minute, from what workers stored.",
    ["endpoint"],
    registry=REGISTRY,
)
ENDPOINT_LEASES = Gauge(
    "research_operator_endpoint_leases_in_flight",
    "Leases held now at a ModelEndpoint (one per model call in flight under the lease broker).",
    ["endpoint"],
    registry=REGISTRY,
)
ENDPOINT_IN_USE = Gauge(
    "research_operator_endpoint_requests_in_use",
    "What the lease broker counts as possibly in flight at a ModelEndpoint: the leases of pods in touch "
    "with it plus the shares of admitted pods that are not.",
    ["endpoint"],
    registry=REGISTRY,
)
ENDPOINT_LEASE_WAITING = Gauge(
    "research_operator_endpoint_lease_requests_waiting",
    "Model calls waiting for a lease at a ModelEndpoint.",
    ["endpoint"],
    registry=REGISTRY,
)
LEASES_GRANTED = Counter(
    "research_operator_endpoint_leases_granted_total",
    "Leases granted, by ModelEndpoint.",
    ["endpoint"],
    registry=REGISTRY,
)
LEASES_EXPIRED = Counter(
    "research_operator_endpoint_leases_expired_total",
    "Leases dropped because their pod stopped sending heartbeats (a dead or unreachable pod).",
    ["endpoint"],
    registry=REGISTRY,
)
LEASE_WAIT_SECONDS = Histogram(
    "research_operator_endpoint_lease_wait_seconds",
    "Time a model call waited for its lease.",
    ["endpoint"],
    buckets=(0.005, 0.02, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    registry=REGISTRY,
)
BROKER_REQUESTS = Counter(
    "research_operator_lease_broker_requests_total",
    "Requests to the lease broker, by path and HTTP status.",
    ["path", "code"],
    registry=REGISTRY,
)
ENDPOINT_PODS_IN_TOUCH = Gauge(
    "research_operator_endpoint_pods_in_touch",
    "Worker pods with a live session at the lease broker, by ModelEndpoint (admitted pods not in touch are "
    "starting, done, or cannot reach it).",
    ["endpoint"],
    registry=REGISTRY,
)
