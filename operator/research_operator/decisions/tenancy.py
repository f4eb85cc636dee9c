"""Tenancy: what a ResearchJob may hand to its worker pods on a cluster shared by teams.

The operator acts with more power than the people who create ResearchJobs, so two kinds of fields
are checked before any worker Job is created (pure decisions here; the API server's
ValidatingAdmissionPolicy from the Helm chart checks the same at admission, docs/security.md):

- **Scheduling fields are policy.** ``spec.worker.priorityClassName``, ``tolerations`` and
  ``nodeSelector`` are allowed only within the admins' allowlists (operator settings
  ``allowedPriorityClasses``, ``allowedTolerationKeys``, ``allowedNodeSelectorKeys``, which the
  admission policy reads from the same ConfigMap).
- **References are the author's.** Secrets (model key, source keys, the PostgreSQL DSN) and
  ConfigMaps of documents reach the pods, so a ResearchJob may name only what its author may
  ``get``. Only the admission policy knows the author; the operator runs a ResearchJob that names
  any of them only while that policy is in force, or when admins chose to trust authors.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from research_api.researchjob import ResearchJobSpec, WorkerSpec
from research_operator.decisions.endpoints import Endpoint

ANY = "*"  # in an allowlist: every value

# The node labels a worker pod may select by default: where it runs, never which role a node has.
DEFAULT_NODE_SELECTOR_KEYS = (
    "kubernetes.io/arch",
    "kubernetes.io/os",
    "node.kubernetes.io/instance-type",
    "topology.kubernetes.io/region",
    "topology.kubernetes.io/zone",
)

# A PriorityClass name, a taint key or a label key (with its optional DNS prefix), or ANY.
_ENTRY = re.compile(r"^(\*|([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$")


def parse_allowlist(raw: str, key: str) -> tuple[str, ...]:
    """A comma-separated allowlist as the settings ConfigMap holds it (the admission policy splits
    the same string): ``"a,b"`` -> ``("a", "b")``; blanks are dropped."""
    entries = tuple(e.strip() for e in raw.split(",") if e.strip())
    for e in entries:
        if len(e) > 317 or not _ENTRY.match(e):
            raise ValueError(f"{key}: {e!r} is not a name, a label or taint key, or {ANY!r}")
    return entries


@dataclass(frozen=True)
class Allowlists:
    """What admins allow on worker pods (empty: nothing; ``*``: anything)."""

    priority_classes: tuple[str, ...] = ()
    toleration_keys: tuple[str, ...] = ()
    node_selector_keys: tuple[str, ...] = DEFAULT_NODE_SELECTOR_KEYS
    # Kueue mode: the spec.priority names admins mapped (kueue.priorityClasses); None: not Kueue mode
    kueue_priorities: tuple[str, ...] | None = None
    workload_priority_classes: tuple[str, ...] = ()  # named directly in spec.priority ("*": any)


class AuthorChecks(StrEnum):
    """Whether anything checked that a ResearchJob's author may read what it references."""

    ENFORCED = "Enforced"  # the admission policy named in the settings is bound: the API server did
    TRUSTED = "Trusted"  # no policy in force, but admins chose to trust authors (trustAuthors)
    MISSING = "PolicyMissing"  # the settings name a policy binding that is not in the cluster
    OFF = "Off"  # the settings name no policy (tenancy.admissionPolicy.enabled=false)


def author_checks(binding: str, trust: bool, found: tuple[str, list[str], dt.datetime | None] | None) -> AuthorChecks:
    """Whether authors are checked: ``binding`` is the policy binding the settings name ("" none),
    ``found`` what the API server holds under that name (its policy and validationActions; None when
    it or its policy is missing). A binding that only warns or audits checks nothing."""
    if binding and found is not None and "Deny" in found[1]:
        return AuthorChecks.ENFORCED
    if trust:
        return AuthorChecks.TRUSTED
    return AuthorChecks.MISSING if binding else AuthorChecks.OFF


class RefusalReason(StrEnum):
    """Why the operator does not start a ResearchJob's worker Jobs (condition PolicyViolation)."""

    SCHEDULING = "SchedulingNotAllowed"
    AUTHOR_NOT_CHECKED = "AuthorNotChecked"
    BASE_URL = "BaseUrlNotAllowed"
    ENDPOINT = "EndpointNotAllowed"


@dataclass(frozen=True)
class Refusal:
    reason: RefusalReason
    field: str  # the spec field, e.g. spec.worker.priorityClassName
    message: str
    recheck: bool = False  # may end with no watch event (the policy gets installed): look again soon


@dataclass(frozen=True)
class Reference:
    """An object of the ResearchJob's namespace whose content its worker pods receive."""

    kind: str  # Secret | ConfigMap
    name: str
    field: str


def references(spec: ResearchJobSpec) -> list[Reference]:
    """Every Secret and ConfigMap the spec names, with the field naming it (the admission policy
    checks the same fields)."""
    refs: list[Reference] = []
    if spec.model.api_key_secret_ref is not None:
        refs.append(Reference("Secret", spec.model.api_key_secret_ref.name, "spec.model.apiKeySecretRef"))
    for i, s in enumerate(spec.sources):
        if s.api_key_secret_ref is not None:
            refs.append(Reference("Secret", s.api_key_secret_ref.name, f"spec.sources[{i}].apiKeySecretRef"))
        if s.config_map is not None:
            refs.append(Reference("ConfigMap", s.config_map, f"spec.sources[{i}].configMap"))
    if spec.store.dsn_secret_ref is not None:
        refs.append(Reference("Secret", spec.store.dsn_secret_ref.name, "spec.store.dsnSecretRef"))
    return refs


def _allowed(value: str, allowlist: tuple[str, ...]) -> bool:
    return ANY in allowlist or value in allowlist


def _shown(allowlist: tuple[str, ...]) -> str:
    return ", ".join(allowlist) if allowlist else "none"


def scheduling_violations(worker: WorkerSpec, allow: Allowlists) -> list[tuple[str, str]]:
    """(field, message) for each scheduling field outside the allowlists, in spec order. The
    messages are those of the admission policy, so a user reads the same words from either."""
    out: list[tuple[str, str]] = []
    pc = worker.priority_class_name
    if pc and not _allowed(pc, allow.priority_classes):
        out.append(
            (
                "spec.worker.priorityClassName",
                f'spec.worker.priorityClassName: PriorityClass "{pc}" is not allowed for ResearchJobs '
                f"(allowed: {_shown(allow.priority_classes)}; cluster admins set tenancy.allowedPriorityClasses)",
            )
        )
    denied = [
        t.key or "(no key: tolerates every taint)"
        for t in worker.tolerations or []
        if not (ANY in allow.toleration_keys or (t.key and t.key in allow.toleration_keys))
    ]
    if denied:
        out.append(
            (
                "spec.worker.tolerations",
                f"spec.worker.tolerations: toleration of {', '.join(denied)} is not allowed for ResearchJobs "
                f"(allowed keys: {_shown(allow.toleration_keys)}; cluster admins set tenancy.allowedTolerationKeys)",
            )
        )
    keys = [k for k in worker.node_selector or {} if not _allowed(k, allow.node_selector_keys)]
    if keys:
        out.append(
            (
                "spec.worker.nodeSelector",
                f"spec.worker.nodeSelector: node label {', '.join(keys)} is not allowed for ResearchJobs "
                f"(allowed keys: {_shown(allow.node_selector_keys)}; cluster admins set "
                "tenancy.allowedNodeSelectorKeys)",
            )
        )
    return out


def priority_violation(priority: str | None, allow: Allowlists) -> tuple[str, str] | None:
    """Kueue mode: spec.priority picks the WorkloadPriorityClass of the worker Jobs, and a higher one
    may preempt other teams' work. A name admins mapped (kueue.priorityClasses) is allowed; a
    WorkloadPriorityClass named directly only when in tenancy.allowedWorkloadPriorityClasses."""
    if priority is None or allow.kueue_priorities is None:
        return None
    if priority in allow.kueue_priorities or _allowed(priority, allow.workload_priority_classes):
        return None
    return (
        "spec.priority",
        f'spec.priority: "{priority}" is not a priority of this cluster (defined: {_shown(allow.kueue_priorities)}; '
        "cluster admins set kueue.priorityClasses, or tenancy.allowedWorkloadPriorityClasses to allow a "
        "WorkloadPriorityClass by its own name)",
    )


def refusal(spec: ResearchJobSpec, allow: Allowlists, checks: AuthorChecks, binding: str = "") -> Refusal | None:
    """Why the operator must not start worker Jobs for ``spec``, or None. ``checks``: whether the
    author's reads were checked at admission; ``binding``: the policy binding the settings name."""
    violations = scheduling_violations(spec.worker, allow)
    priority = priority_violation(spec.priority, allow)
    if priority is not None:
        violations.append(priority)
    if violations:
        field, message = violations[0]
        return Refusal(RefusalReason.SCHEDULING, field, "; ".join(m for _, m in violations))
    if checks in (AuthorChecks.ENFORCED, AuthorChecks.TRUSTED):
        return None
    refs = references(spec)
    if not refs:
        return None
    named = ", ".join(f'{r.kind} "{r.name}" ({r.field})' for r in refs)
    if checks == AuthorChecks.MISSING:
        why = (
            f"the admission policy binding {binding} that checks authors is not in the cluster "
            "(install or upgrade the Helm chart with tenancy.admissionPolicy.enabled=true)"
        )
    else:
        why = "the Helm chart's admission policy that checks authors is off (tenancy.admissionPolicy.enabled=false)"
    message = (
        f"not started: the ResearchJob names {named}, and nothing checked that its author may read "
        f"{'it' if len(refs) == 1 else 'them'}: {why}. Without that check any author could hand the "
        "namespace's Secrets and ConfigMaps to a model endpoint of their choice. Or cluster admins set "
        "tenancy.trustAuthors=true (unsafe on a shared cluster)"
    )
    return Refusal(RefusalReason.AUTHOR_NOT_CHECKED, refs[0].field, message, recheck=checks == AuthorChecks.MISSING)


POLICY_SETTLE = dt.timedelta(seconds=1)


def predates_policy(
    spec: ResearchJobSpec, created: dt.datetime, started: bool, since: dt.datetime | None
) -> Refusal | None:
    """A ResearchJob that names Secrets or ConfigMaps, created before the admission policy came into
    force (``since``), was never checked: the policy sees creates and updates, not what exists.
    One that already started keeps running (a ``helm upgrade`` that installs the policy must not
    stop the work of a cluster; its pods already had what it names); one that has not is held
    until it is created again, so that the API server checks it."""
    refs = references(spec)
    # creationTimestamps have a resolution of a second, and the API server takes a moment to load a
    # new policy: what was created within POLICY_SETTLE of it may not have been checked either.
    if started or since is None or created > since + POLICY_SETTLE or not refs:
        return None
    named = ", ".join(f'{r.kind} "{r.name}" ({r.field})' for r in refs)
    message = (
        f"not started: the ResearchJob names {named} and was created at {created.isoformat()}, before the "
        f"admission policy that checks authors came into force (created at {since.isoformat()}; what is created "
        f"within {int(POLICY_SETTLE.total_seconds())} s of it counts as before), so nothing checked "
        "that its author may read them: delete it and create it again"
    )
    return Refusal(RefusalReason.AUTHOR_NOT_CHECKED, refs[0].field, message)


def endpoint_refusal(
    spec: ResearchJobSpec,
    namespace: str,
    endpoints: Mapping[str, Endpoint],
    labels: Mapping[str, str] | None,
    broker_url: str,
    tenant_base_urls: bool,
) -> Refusal | None:
    """Whether the model endpoint a ResearchJob calls is one it may call. Admins may forbid
    tenants' own base URLs (``tenant_base_urls`` False: only the default and declared endpoints);
    an endpoint named in spec.model.endpoint must exist, select the namespace (``labels``: its
    labels, None when they could not be read) and serve the model; it is called through the lease
    broker's gateway (which adds its key), so the broker must be on."""
    if spec.model.base_url and not tenant_base_urls:
        return Refusal(
            RefusalReason.BASE_URL,
            "spec.model.baseUrl",
            "spec.model.baseUrl: ResearchJobs may not name their own model endpoint on this cluster (cluster "
            "admins set tenancy.allowTenantBaseUrls=false); leave it out for the default endpoint, or name a "
            "ModelEndpoint declared for this namespace in spec.model.endpoint",
        )
    name = spec.model.endpoint
    if not name:
        return None
    field = "spec.model.endpoint"
    endpoint = endpoints.get(name)
    if endpoint is None:
        return Refusal(
            RefusalReason.ENDPOINT,
            field,
            f'spec.model.endpoint: ModelEndpoint "{name}" does not exist (kubectl get modelendpoints lists those '
            "the admins declared); the ResearchJob starts when it is created",
        )
    if labels is None:
        return Refusal(
            RefusalReason.ENDPOINT,
            field,
            f'spec.model.endpoint: cannot read the labels of namespace "{namespace}" to match ModelEndpoint '
            f'"{name}"\'s namespaceSelector; looking again shortly',
            recheck=True,
        )
    if not endpoint.selects(labels):
        why = "selects no namespace" if endpoint.namespace_selector is None else "does not select it"
        return Refusal(
            RefusalReason.ENDPOINT,
            field,
            f'spec.model.endpoint: namespace "{namespace}" may not use ModelEndpoint "{name}": its namespaceSelector '
            f"{why} (cluster admins set spec.namespaceSelector of the ModelEndpoint, or label the namespace)",
            recheck=True,  # namespace labels are not watched: a label added later is seen on the next look
        )
    if endpoint.models and spec.model.name not in endpoint.models:
        return Refusal(
            RefusalReason.ENDPOINT,
            "spec.model.name",
            f'spec.model.name: ModelEndpoint "{name}" serves {", ".join(endpoint.models)}, not "{spec.model.name}"',
        )
    if not broker_url:
        return Refusal(
            RefusalReason.ENDPOINT,
            field,
            f'spec.model.endpoint: ModelEndpoint "{name}" is called through the operator\'s lease broker, which adds '
            "its API key, and the lease broker is off (cluster admins set operator.leaseBroker.enabled=true)",
        )
    return None
