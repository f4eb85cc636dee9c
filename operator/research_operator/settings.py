"""Operator settings: static ones from the environment, admin caps also from a ConfigMap.

The caps (``globalMaxActiveJobs``, ``namespaceMaxActiveJobs``), the namespace token budgets
(``namespaceTokenBudgets``), the default model endpoint, the Kueue queue and priority mapping and the
tenancy settings (the admission policy binding, ``trustAuthors``, the scheduling allowlists) can
change at run time: the operator watches the settings ConfigMap (rendered by the Helm chart from
values.yaml) and applies a change on the next reconcile, with no restart. Whether it watches Kueue's
Workloads and LocalQueues (``KUEUE_WATCH``) is fixed at start, as that needs their CRDs and RBAC.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from research_api.task import QualityFloor
from research_api.tracing import worker_env
from research_operator.decisions.admission import Caps
from research_operator.decisions.endpoints import TokenBudget, parse_budgets
from research_operator.decisions.tenancy import Allowlists, parse_allowlist


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key, "")
    try:
        return int(raw) if raw.strip() else default
    except ValueError as e:
        raise ValueError(f"{key} must be an integer, got {raw!r}") from e


# A Kueue WorkloadPriorityClass name as a label value, and a ResearchJob's spec.priority.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


PriorityClasses = tuple[tuple[str, str], ...]


def _priority_classes(env: Mapping[str, str], key: str, default: PriorityClasses) -> PriorityClasses:
    """A JSON object {spec.priority: WorkloadPriorityClass name}, e.g. {"high": "research-high"}."""
    raw = env.get(key, "")
    if not raw.strip():
        return default
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{key} must be a JSON object of priority -> WorkloadPriorityClass, got {raw!r}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{key} must be a JSON object of priority -> WorkloadPriorityClass, got {raw!r}")
    for k, v in data.items():
        if not (isinstance(v, str) and _NAME.match(k) and _NAME.match(v) and len(k) <= 63 and len(v) <= 63):
            raise ValueError(f"{key}: {k!r}: {v!r} is not a priority name and a WorkloadPriorityClass name")
    return tuple(sorted(data.items()))


def _class_name(env: Mapping[str, str], key: str, default: str) -> str:
    raw = env.get(key, default).strip()
    if raw and not (_NAME.match(raw) and len(raw) <= 63):
        raise ValueError(f"{key} must be a WorkloadPriorityClass name, got {raw!r}")
    return raw


def _bool(env: Mapping[str, str], key: str, default: bool) -> bool:
    raw = env.get(key, "").strip().lower()
    if not raw:
        return default
    if raw not in ("true", "false"):
        raise ValueError(f"{key} must be true or false, got {raw!r}")
    return raw == "true"


def _percent(env: Mapping[str, str], key: str, default: int | None) -> int | None:
    """A whole percent 0-100, or none when the key is empty ("": no floor)."""
    if key not in env:
        return default
    raw = env[key].strip()
    if not raw or raw.lower() in ("null", "none"):
        return None
    if not raw.isdigit() or int(raw) > 100:
        raise ValueError(f"{key} must be a whole percent 0-100 or empty, got {raw!r}")
    return int(raw)


def _floor(env: Mapping[str, str], prefix: str, default: QualityFloor) -> QualityFloor:
    accuracy, coverage = (f"{prefix}MinCitationAccuracy", f"{prefix}MinCoverage")
    if prefix.isupper():
        accuracy, coverage = (f"{prefix}_MIN_CITATION_ACCURACY", f"{prefix}_MIN_COVERAGE")
    return QualityFloor(
        min_citation_accuracy=_percent(env, accuracy, default.min_citation_accuracy),
        min_coverage=_percent(env, coverage, default.min_coverage),
    )


def _allowlist(env: Mapping[str, str], key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    return parse_allowlist(env[key], key) if key in env else default


def _egress(raw: str | None) -> tuple[dict[str, Any], ...] | None:
    """WORKER_NETWORK_POLICY_EGRESS: a JSON list of NetworkPolicy egress rules (unset: no policy)."""
    if raw is None or not raw.strip():
        return None
    try:
        rules = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"WORKER_NETWORK_POLICY_EGRESS is not JSON: {e}") from None
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise ValueError("WORKER_NETWORK_POLICY_EGRESS must be a JSON list of NetworkPolicy egress rules")
    return tuple(rules)


def _broker_url(env: Mapping[str, str]) -> str:
    url = env.get("LEASE_BROKER_URL", "").strip().rstrip("/")
    if url and not re.match(r"^https?://[^/\s]+", url):
        raise ValueError(f"LEASE_BROKER_URL must be an http(s) URL, got {url!r}")
    if url and not _int(env, "LEASE_BROKER_PORT", 0):
        raise ValueError("LEASE_BROKER_URL is set but LEASE_BROKER_PORT is not: the broker would not run")
    return url


@dataclass(frozen=True)
class Settings:
    namespace: str = "research-operator"  # where the operator runs (Lease, settings ConfigMap)
    settings_configmap: str = "research-operator-settings"
    worker_image: str = "research-operator:0.1.0"
    worker_service_account: str = ""  # empty: one ServiceAccount per ResearchJob, owned by it
    default_model_base_url: str = "http://research-operator-modelserver:8080/v1"
    global_max_active: int = 0  # 0 = unlimited
    namespace_max_active: int = 0
    kueue_queue: str = ""  # non-empty: create worker Jobs suspended for this Kueue LocalQueue
    # spec.priority -> Kueue WorkloadPriorityClass (an unmapped priority names the class itself)
    kueue_priority_classes: PriorityClasses = ()
    kueue_default_priority_class: str = ""  # for ResearchJobs without spec.priority; "" = none
    # Watch Kueue Workloads and LocalQueues for status (needs their CRDs and RBAC; fixed at start).
    kueue_watch: bool = False
    resync_seconds: float = 300.0  # a safety net: watches, deadlines and TTLs wake a ResearchJob
    quota_backoff_seconds: float = 5.0
    metrics_port: int = 8080
    health_port: int = 8081
    leader_election: bool = True
    lease_name: str = "research-operator-leader"
    # namespace -> tokens per period its ResearchJobs may spend (namespaceTokenBudgets, JSON)
    token_budgets: dict[str, TokenBudget] = field(default_factory=dict)
    # The lease broker (per-request leases of ModelEndpoints): where it listens (port 0: off) and the
    # URL worker pods reach it at (the chart's Service; on the local cluster, loopback).
    lease_broker_host: str = "0.0.0.0"
    lease_broker_port: int = 0
    lease_broker_url: str = ""
    # In a cluster: the broker's Service (no selector) whose EndpointSlice the leader points at its
    # own pod IP when it starts serving.
    lease_broker_service: str = ""
    # TLS (an https lease_broker_url): the Secret of the operator's namespace holding the broker's CA,
    # and, at run time, that CA's certificate (PEM), which worker tasks carry.
    lease_broker_ca_secret: str = "research-operator-broker-ca"
    lease_broker_ca: str = ""
    pod_ip: str = ""
    # Tenancy (research_operator.decisions.tenancy, docs/security.md). The ValidatingAdmissionPolicyBinding
    # that checks authors at admission ("": none, tenancy.admissionPolicy.enabled=false); while it
    # is not in force, a ResearchJob naming a Secret or ConfigMap is not run unless trust_authors.
    admission_policy_binding: str = ""
    trust_authors: bool = False  # unsafe on a shared cluster: any author may use any Secret
    # What worker pods may carry from a spec (comma-separated in the settings ConfigMap).
    allowed_priority_classes: tuple[str, ...] = Allowlists().priority_classes
    allowed_toleration_keys: tuple[str, ...] = Allowlists().toleration_keys
    allowed_node_selector_keys: tuple[str, ...] = Allowlists().node_selector_keys
    allowed_workload_priority_classes: tuple[str, ...] = ()
    # Whether a ResearchJob may name its own spec.model.baseUrl (False: the default endpoint and
    # ModelEndpoints declared by admins only).
    tenant_base_urls: bool = True
    # The report quality floor of ResearchJobs whose spec.quality leaves it unset (chart value
    # settings.quality; QUALITY_MIN_* / qualityMin* keys); none by default.
    quality_floor: QualityFloor = field(default_factory=QualityFloor)
    # A NetworkPolicy for each ResearchJob's worker pods (networkPolicy.workers): no ingress, and
    # egress only by these rules (NetworkPolicyEgressRule objects, as the chart renders them: DNS,
    # the lease broker, the model server, and what admins add); None: no policy.
    worker_egress: tuple[dict[str, Any], ...] | None = None
    # The OpenTelemetry variables worker containers get (research_api.tracing.WORKER_ENV, from the
    # operator's own environment: the chart's tracing values), so they export where the operator does.
    worker_tracing_env: tuple[tuple[str, str], ...] = ()

    @property
    def allowlists(self) -> Allowlists:
        return Allowlists(
            self.allowed_priority_classes,
            self.allowed_toleration_keys,
            self.allowed_node_selector_keys,
            kueue_priorities=tuple(name for name, _ in self.kueue_priority_classes) if self.kueue_queue else None,
            workload_priority_classes=self.allowed_workload_priority_classes,
        )

    @property
    def lease_broker_tls(self) -> bool:
        return self.lease_broker_url.startswith("https://")

    @property
    def caps(self) -> Caps:
        return Caps(self.global_max_active, self.namespace_max_active)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        d = cls()
        return cls(
            namespace=e.get("OPERATOR_NAMESPACE", d.namespace),
            settings_configmap=e.get("SETTINGS_CONFIGMAP", d.settings_configmap),
            worker_image=e.get("WORKER_IMAGE", d.worker_image),
            worker_service_account=e.get("WORKER_SERVICE_ACCOUNT", d.worker_service_account),
            default_model_base_url=e.get("DEFAULT_MODEL_BASE_URL", d.default_model_base_url),
            global_max_active=_int(e, "GLOBAL_MAX_ACTIVE_JOBS", d.global_max_active),
            namespace_max_active=_int(e, "NAMESPACE_MAX_ACTIVE_JOBS", d.namespace_max_active),
            kueue_queue=e.get("KUEUE_QUEUE_NAME", d.kueue_queue),
            kueue_priority_classes=_priority_classes(e, "KUEUE_PRIORITY_CLASSES", d.kueue_priority_classes),
            kueue_default_priority_class=_class_name(e, "KUEUE_DEFAULT_PRIORITY_CLASS", d.kueue_default_priority_class),
            kueue_watch=e.get("KUEUE_WATCH", "true" if e.get("KUEUE_QUEUE_NAME") else "false").lower() == "true",
            resync_seconds=float(e.get("RESYNC_SECONDS", d.resync_seconds)),
            quota_backoff_seconds=float(e.get("QUOTA_BACKOFF_SECONDS", d.quota_backoff_seconds)),
            metrics_port=_int(e, "METRICS_PORT", d.metrics_port),
            health_port=_int(e, "HEALTH_PORT", d.health_port),
            leader_election=e.get("LEADER_ELECTION", "true").lower() != "false",
            lease_name=e.get("LEASE_NAME", d.lease_name),
            token_budgets=parse_budgets(e.get("NAMESPACE_TOKEN_BUDGETS", "")),
            lease_broker_host=e.get("LEASE_BROKER_HOST", d.lease_broker_host),
            lease_broker_port=_int(e, "LEASE_BROKER_PORT", d.lease_broker_port),
            lease_broker_url=_broker_url(e),
            lease_broker_service=e.get("LEASE_BROKER_SERVICE", d.lease_broker_service),
            lease_broker_ca_secret=e.get("LEASE_BROKER_CA_SECRET", d.lease_broker_ca_secret),
            pod_ip=e.get("POD_IP", d.pod_ip),
            admission_policy_binding=e.get("ADMISSION_POLICY_BINDING", d.admission_policy_binding).strip(),
            trust_authors=_bool(e, "TRUST_AUTHORS", d.trust_authors),
            allowed_priority_classes=_allowlist(e, "ALLOWED_PRIORITY_CLASSES", d.allowed_priority_classes),
            allowed_toleration_keys=_allowlist(e, "ALLOWED_TOLERATION_KEYS", d.allowed_toleration_keys),
            allowed_node_selector_keys=_allowlist(e, "ALLOWED_NODE_SELECTOR_KEYS", d.allowed_node_selector_keys),
            tenant_base_urls=_bool(e, "ALLOW_TENANT_BASE_URLS", d.tenant_base_urls),
            allowed_workload_priority_classes=_allowlist(
                e, "ALLOWED_WORKLOAD_PRIORITY_CLASSES", d.allowed_workload_priority_classes
            ),
            quality_floor=_floor(e, "QUALITY", d.quality_floor),
            worker_egress=_egress(e.get("WORKER_NETWORK_POLICY_EGRESS")),
            worker_tracing_env=worker_env(e),
        )

    def with_configmap(self, data: Mapping[str, str]) -> Settings:
        """Settings overridden by the runtime ConfigMap's keys (camelCase, as in values.yaml)."""
        return replace(
            self,
            global_max_active=_int(data, "globalMaxActiveJobs", self.global_max_active),
            namespace_max_active=_int(data, "namespaceMaxActiveJobs", self.namespace_max_active),
            default_model_base_url=data.get("defaultModelBaseUrl") or self.default_model_base_url,
            worker_image=data.get("workerImage") or self.worker_image,
            kueue_queue=data.get("kueueQueueName", self.kueue_queue),
            kueue_priority_classes=_priority_classes(data, "kueuePriorityClasses", self.kueue_priority_classes),
            kueue_default_priority_class=_class_name(
                data, "kueueDefaultPriorityClass", self.kueue_default_priority_class
            ),
            token_budgets=(
                parse_budgets(data["namespaceTokenBudgets"]) if "namespaceTokenBudgets" in data else self.token_budgets
            ),
            admission_policy_binding=data.get("admissionPolicyBinding", self.admission_policy_binding).strip(),
            trust_authors=_bool(data, "trustAuthors", self.trust_authors),
            allowed_priority_classes=_allowlist(data, "allowedPriorityClasses", self.allowed_priority_classes),
            allowed_toleration_keys=_allowlist(data, "allowedTolerationKeys", self.allowed_toleration_keys),
            allowed_node_selector_keys=_allowlist(data, "allowedNodeSelectorKeys", self.allowed_node_selector_keys),
            tenant_base_urls=_bool(data, "allowTenantBaseUrls", self.tenant_base_urls),
            allowed_workload_priority_classes=_allowlist(
                data, "allowedWorkloadPriorityClasses", self.allowed_workload_priority_classes
            ),
            quality_floor=_floor(data, "quality", self.quality_floor),
        )
