"""``top`` and ``caps``: what admins see and set, read from the cluster's state (never the operator's memory).

``top`` gathers ResearchJobs, their worker Jobs, ResourceQuotas and the operator's settings
ConfigMap, and :func:`build_top` (pure) turns them into the view: per namespace and cluster-wide,
worker Jobs running and queued, the caps in force, each quota's headroom counted in worker pods
(with the operator's own quota arithmetic, ``research_operator.decisions.admission``), and why each waiting
ResearchJob waits.

``caps`` shows and sets ``globalMaxActiveJobs`` and ``namespaceMaxActiveJobs`` in the settings
ConfigMap the operator watches (label ``researchops.io/kind=operator-settings`` in its namespace);
the operator applies a change on its next reconcile. Every value is checked first, so an invalid
one changes nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from research_api.names import LABEL_JOB, LABEL_KIND, SETTINGS_KIND
from research_api.researchjob import TERMINAL_PHASES, ResourcesSpec
from research_cli.errors import CliError, UsageError
from research_cli.kube import Kube
from research_cli.progress import waiting_for
from research_operator.cache.views import job_view
from research_operator.decisions.admission import Caps, PodResources, QuotaUsage, quota_headroom
from research_operator.settings import Settings

DEFAULT_OPERATOR_NAMESPACE = "research-operator-system"
DEFAULT_SETTINGS_CONFIGMAP = "research-operator-settings"
CAPS = {
    "globalMaxActiveJobs": "worker Jobs running at once in the whole cluster (0 = unlimited)",
    "namespaceMaxActiveJobs": "worker Jobs running at once in any one namespace (0 = unlimited)",
}
ALIASES = {"global": "globalMaxActiveJobs", "namespace": "namespaceMaxActiveJobs"}
MAX_CAP = 100_000


# ------------------------------------------------------------------------------------------------
# the settings ConfigMap
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SettingsRef:
    namespace: str
    name: str
    data: dict[str, str]
    resource_version: str
    helm_release: str | None  # rendered by this Helm release: its next `helm upgrade` writes its values again


def find_settings(kube: Kube, namespace: str | None, name: str | None) -> SettingsRef:
    """The operator's settings ConfigMap: by name in ``namespace``, else the one labelled as such
    there (or, with no namespace given, anywhere in the cluster)."""
    if namespace and name:
        cm = kube.call(f"get configmap {namespace}/{name}", kube.core.read_namespaced_config_map, name, namespace)
        return _ref(kube.plain(cm))
    selector = f"{LABEL_KIND}={SETTINGS_KIND}"  # as the chart and the operator label it
    if namespace:
        items = kube.items(
            f"list configmaps in {namespace}", kube.core.list_namespaced_config_map, namespace, label_selector=selector
        )
    else:
        items = kube.items(
            "list the operator's settings ConfigMaps (or give --operator-namespace)",
            kube.core.list_config_map_for_all_namespaces,
            label_selector=selector,
        )
    if name:
        items = [i for i in items if i["metadata"]["name"] == name]
    if not items:
        where = f"namespace {namespace}" if namespace else "the cluster"
        raise CliError(
            f"no operator settings ConfigMap (label {selector}) in {where}: is research-operator installed? "
            f"Name its namespace with --operator-namespace (the chart's default is {DEFAULT_OPERATOR_NAMESPACE})"
        )
    if len(items) > 1:
        preferred = [i for i in items if i["metadata"]["name"] == DEFAULT_SETTINGS_CONFIGMAP]
        if len(preferred) != 1:
            found = ", ".join(f"{i['metadata']['namespace']}/{i['metadata']['name']}" for i in items)
            raise CliError(
                f"several operator settings ConfigMaps ({found}): choose one with --operator-namespace "
                "and --settings-configmap"
            )
        items = preferred
    return _ref(items[0])


def _ref(cm: dict[str, Any]) -> SettingsRef:
    meta = cm["metadata"]
    return SettingsRef(
        meta["namespace"],
        meta["name"],
        dict(cm.get("data") or {}),
        str(meta.get("resourceVersion")),
        (meta.get("annotations") or {}).get("meta.helm.sh/release-name")
        if (meta.get("labels") or {}).get("app.kubernetes.io/managed-by") == "Helm"
        else None,
    )


def caps_in_force(data: Mapping[str, str]) -> Caps | None:
    """The caps the operator takes from its settings ConfigMap's data, by the operator's own parsing
    (``research_operator.settings.Settings.with_configmap``); None when the operator refuses the
    ConfigMap (a value that does not parse: it then keeps its previous settings)."""
    try:
        return Settings().with_configmap(data).caps
    except ValueError:
        return None


def cap_value(caps: Caps | None, key: str) -> int | None:
    """One cap (``CAPS`` key) of ``caps_in_force``; None when unknown."""
    if caps is None:
        return None
    return caps.global_max_active if key == "globalMaxActiveJobs" else caps.namespace_max_active


def parse_assignments(pairs: list[str]) -> dict[str, int]:
    """``KEY=VALUE`` pairs, every one checked; the first invalid one raises and nothing is set."""
    out: dict[str, int] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = ALIASES.get(key.strip(), key.strip())
        if not sep:
            raise UsageError(f"{pair!r} is not KEY=VALUE (keys: {', '.join(CAPS)}); nothing was changed")
        if key not in CAPS:
            raise UsageError(f"unknown cap {key!r}: the caps are {', '.join(CAPS)}; nothing was changed")
        value = raw.strip()
        if not value.isdigit() or int(value) > MAX_CAP:
            raise UsageError(
                f"{key} must be a whole number from 0 to {MAX_CAP} (0 = unlimited), not {raw!r}; nothing was changed"
            )
        out[key] = int(value)
    if not out:
        raise UsageError(f"nothing to set: give KEY=VALUE, e.g. globalMaxActiveJobs=10 (keys: {', '.join(CAPS)})")
    return out


def set_caps(kube: Kube, ref: SettingsRef, values: dict[str, int]) -> dict[str, tuple[str, str]]:
    """Write the caps in one patch, guarded by the resourceVersion read; returns key -> (old, new)."""
    changes = {k: (ref.data.get(k, "0"), str(v)) for k, v in values.items()}
    patch = {"metadata": {"resourceVersion": ref.resource_version}, "data": {k: str(v) for k, v in values.items()}}
    kube.call(
        f"update configmap {ref.namespace}/{ref.name}",
        kube.core.patch_namespaced_config_map,
        ref.name,
        ref.namespace,
        patch,
    )
    return changes


# ------------------------------------------------------------------------------------------------
# top
# ------------------------------------------------------------------------------------------------


@dataclass
class QuotaRow:
    namespace: str
    name: str
    headroom: int | None  # worker pods that still fit; None: the quota limits nothing a worker uses
    binding: str | None  # "resource used/hard" that binds first


@dataclass
class NamespaceRow:
    namespace: str
    running: int
    queued: int
    cap: int | None  # namespaceMaxActiveJobs in force (0 = unlimited), None if unknown
    researchjobs: int


@dataclass
class WaitingRow:
    namespace: str
    name: str
    phase: str
    running: int
    queued: int
    waiting_for: str


@dataclass
class TopView:
    scope: str  # a namespace, or "all namespaces"
    running: int
    queued: int
    global_cap: int | None
    namespace_cap: int | None
    settings: str | None  # namespace/name of the settings ConfigMap read, or why not
    namespaces: list[NamespaceRow] = field(default_factory=list)
    quotas: list[QuotaRow] = field(default_factory=list)
    waiting: list[WaitingRow] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def job_running(job: dict[str, Any]) -> bool:
    """Whether a worker Job holds a slot under the caps, decided as the operator decides it
    (``JobView.unfinished``): until it completes or fails, also while suspended in Kueue mode (the
    caps bound what is handed to Kueue). ``top`` used to leave suspended Jobs out and so disagreed
    with the operator about what runs."""
    return job_view(job).unfinished


def worker_pod(rj: dict[str, Any]) -> PodResources:
    """What one worker pod of this ResearchJob requests and limits (the API defaults if unset)."""
    raw = ((rj.get("spec") or {}).get("worker") or {}).get("resources") or {}
    res = ResourcesSpec.model_validate(raw)
    return PodResources.from_spec(res.requests.wire(), res.limits.wire())


def _caps_note(rj: dict[str, Any], ns_running: int, cluster_running: int, gcap: int | None, ncap: int | None) -> str:
    if gcap and cluster_running >= gcap:
        return f"a running slot: globalMaxActiveJobs is {gcap} and {cluster_running} worker Jobs run cluster-wide"
    if ncap and ns_running >= ncap:
        ns = rj["metadata"]["namespace"]
        return f"a running slot: namespaceMaxActiveJobs is {ncap} and {ns_running} worker Jobs run in {ns}"
    if gcap or ncap:
        return "its fair share of the caps: other ResearchJobs below their share are served first"
    return "the next reconcile"


def build_top(
    scope: str | None,
    researchjobs: list[dict[str, Any]],
    jobs: list[dict[str, Any]],
    quotas: list[dict[str, Any]],
    settings: SettingsRef | None,
    settings_problem: str | None = None,
) -> TopView:
    """The view ``top`` prints. ``researchjobs`` and ``jobs`` (worker Jobs, label researchops.io/job)
    are those of the whole cluster when the caller may list them (the global cap counts them all),
    else of ``scope``; the namespace, quota and waiting rows are those of ``scope`` (None: all)."""
    data = settings.data if settings else {}
    caps = caps_in_force(data) if settings else None
    gcap = cap_value(caps, "globalMaxActiveJobs")
    ncap = cap_value(caps, "namespaceMaxActiveJobs")
    running_by_ns: dict[str, int] = defaultdict(int)
    for job in jobs:
        if job_running(job):
            running_by_ns[job["metadata"]["namespace"]] += 1
    live = [rj for rj in researchjobs if (rj.get("status") or {}).get("phase") not in TERMINAL_PHASES]
    queued_by_ns: dict[str, int] = defaultdict(int)
    rjs_by_ns: dict[str, int] = defaultdict(int)
    for rj in live:
        ns = rj["metadata"]["namespace"]
        queued_by_ns[ns] += int(((rj.get("status") or {}).get("batches") or {}).get("queued") or 0)
        rjs_by_ns[ns] += 1
    in_scope = (lambda ns: True) if scope is None else (lambda ns: ns == scope)
    namespaces = sorted(
        {ns for ns in (*running_by_ns, *queued_by_ns, *rjs_by_ns, *(q["metadata"]["namespace"] for q in quotas))}
        | ({scope} if scope else set())
    )
    view = TopView(
        scope=scope or "all namespaces",
        running=sum(running_by_ns.values()),
        queued=sum(queued_by_ns.values()),
        global_cap=gcap,
        namespace_cap=ncap,
        settings=f"{settings.namespace}/{settings.name}" if settings else settings_problem,
    )
    for ns in namespaces:
        if in_scope(ns):
            view.namespaces.append(NamespaceRow(ns, running_by_ns[ns], queued_by_ns[ns], ncap, rjs_by_ns[ns]))
    pods_by_ns: dict[str, list[PodResources]] = defaultdict(list)
    for rj in live:
        pods_by_ns[rj["metadata"]["namespace"]].append(worker_pod(rj))
    for q in sorted(quotas, key=lambda q: (q["metadata"]["namespace"], q["metadata"]["name"])):
        ns = q["metadata"]["namespace"]
        if not in_scope(ns):
            continue
        status = q.get("status") or {}
        usage = QuotaUsage(q["metadata"]["name"], dict(status.get("hard") or {}), dict(status.get("used") or {}))
        # Counted for the largest worker pod waiting there (the default size when none waits).
        sizes = pods_by_ns.get(ns) or [worker_pod({})]
        verdicts = [quota_headroom([usage], pod) for pod in sizes]
        verdict = min(verdicts, key=lambda v: v.jobs if v.jobs is not None else 1 << 62)
        binding = verdict.binding.split(": ", 1)[-1] if verdict.binding else None
        view.quotas.append(QuotaRow(ns, usage.name, verdict.jobs, binding))
    for rj in sorted(live, key=lambda r: (r["metadata"]["namespace"], r["metadata"]["name"])):
        ns = rj["metadata"]["namespace"]
        if not in_scope(ns):
            continue
        note = _caps_note(rj, running_by_ns[ns], view.running, gcap, ncap)
        why = waiting_for(rj, note)
        if why is None:
            continue
        status = rj.get("status") or {}
        batches = status.get("batches") or {}
        view.waiting.append(
            WaitingRow(
                ns,
                rj["metadata"]["name"],
                str(status.get("phase") or "Pending"),
                int(batches.get("active") or 0),
                int(batches.get("queued") or 0),
                why,
            )
        )
    return view


def gather_top(kube: Kube, namespace: str | None, operator_namespace: str | None, settings_name: str | None) -> TopView:
    selector = LABEL_JOB
    try:
        jobs = kube.items("list worker Jobs", kube.batch.list_job_for_all_namespaces, label_selector=selector)
    except CliError:
        if namespace is None:
            raise
        # Not allowed cluster-wide: this namespace's Jobs only (the global cap's count is then partial).
        jobs = kube.items(
            f"list worker Jobs in {namespace}", kube.batch.list_namespaced_job, namespace, label_selector=selector
        )
    if namespace is None:
        quotas = kube.items("list resourcequotas", kube.core.list_resource_quota_for_all_namespaces)
    else:
        quotas = kube.items(f"list resourcequotas in {namespace}", kube.core.list_namespaced_resource_quota, namespace)
    settings: SettingsRef | None
    problem: str | None = None
    try:
        settings = find_settings(kube, operator_namespace, settings_name)
    except CliError as exc:
        settings, problem = None, f"unknown ({exc})"
    try:
        researchjobs = kube.list_researchjobs(None)  # the cluster row counts every namespace
    except CliError:
        if namespace is None:
            raise
        researchjobs = kube.list_researchjobs(namespace)
    return build_top(
        namespace,
        researchjobs,
        jobs,
        quotas,
        settings,
        problem,
    )


def cap_text(cap: int | None, running: int | None = None) -> str:
    if cap is None:
        return "unknown"
    if cap == 0:
        return "0 (unlimited)"
    return f"{cap}" + (f" ({max(0, cap - running)} free)" if running is not None else "")
