"""kopf registration: what the operator watches and how each watch feeds the world and wakes the
reconcile loops (``loop``). Nothing here decides anything.

Only objects that are ours reach the process: Jobs and ConfigMaps are label-selected on the server
(``settings.watching.label_selectors``), so ten thousand foreign ones cost nothing, and Events only
with the server-side field selector for the Job controller's FailedCreate. ResourceQuotas are not
ours and carry no label of ours; they are few and small, and every one is indexed.

Only watch-style handlers (``kopf.on.event``) are used: they add no finalizer, so a ResearchJob
(or its namespace) can always be deleted, even while the operator is not running.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from research_api import tracing
from research_api.modelendpoint import ENDPOINT_PLURAL
from research_api.researchjob import GROUP, PLURAL, VERSION
from research_operator import metrics
from research_operator.actions import deletion, kube, loop, shares
from research_operator.cache.views import StoredObject, job_view, owner_uid, stored_object
from research_operator.cache.world import BASE_SETTINGS, WORLD, Key, settings
from research_operator.constants import LABEL_JOB, LABEL_KIND, SETTINGS_KIND
from research_operator.decisions import kueue
from research_operator.decisions.admission import QuotaUsage
from research_operator.decisions.endpoints import Endpoint, calls, describe_budget, endpoint_from
from research_operator.decisions.reconcile import JobView
from research_operator.lease_broker import broker

log = logging.getLogger(__name__)

JOBS = ("batch", "v1", "jobs")
CONFIGMAPS = ("", "v1", "configmaps")
EVENTS = ("", "v1", "events")
FAILED_CREATE = "involvedObject.kind=Job,reason=FailedCreate"


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    configure_watching(settings)
    tracing.start("research-operator")  # only when OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_TRACES_EXPORTER say so
    kube.api()
    if BASE_SETTINGS.lease_broker_port:
        cfg = BASE_SETTINGS
        await broker.start(
            cfg.lease_broker_host, cfg.lease_broker_port, cfg.namespace, cfg.lease_broker_service, cfg.pod_ip
        )


@kopf.on.cleanup()
async def shutdown(**_: Any) -> None:
    await broker.stop()
    tracing.shutdown()  # the last spans out before the process ends


def configure_watching(settings: kopf.OperatorSettings) -> None:
    # Keep kopf's own bookkeeping out of .status, which belongs to the reconciler.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.posting.level = logging.WARNING  # only our own Events, not kopf's handler chatter
    settings.watching.server_timeout = 300
    # A watch connection that dies without a word (no FIN, no RST) would look alive but empty for
    # good, and every wake-up it carries would be lost: the client gives up a little after the
    # server would have ended the watch, and kopf lists and watches again (kopf #204, #585, #847).
    settings.watching.client_timeout = 360
    settings.watching.connect_timeout = 30
    # kopf serves each object's events in a worker that holds one of ``worker_limit`` slots until it
    # has been idle ``idle_timeout`` s (default 5 s), and a full set blocks the whole watch stream:
    # 200 slots held 5 s after a ResearchJob's own status write capped a burst of new ResearchJobs at
    # well under 40 a second. Our handlers return at once (the loops do the work), so a short idle
    # time loses nothing: a later event starts a new worker.
    settings.queueing.worker_limit = 200
    settings.queueing.idle_timeout = 0.5
    # Server-side filters: the API server sends only our objects (the handlers' labels= filters
    # below would otherwise be applied here, after every foreign object was listed and parsed).
    settings.watching.label_selectors[JOBS] = LABEL_JOB
    settings.watching.label_selectors[CONFIGMAPS] = LABEL_KIND
    settings.watching.field_selectors[EVENTS] = FAILED_CREATE


# ------------------------------------------------------------------------------------------
# indices (complete before any handler runs) and the watches that wake the loops
# ------------------------------------------------------------------------------------------


@kopf.index(*JOBS, labels={LABEL_JOB: kopf.PRESENT})
def rj_jobs(body: kopf.Body, namespace: str | None, **_: Any) -> dict[Key, JobView] | None:
    uid = owner_uid(body)
    return {(namespace, uid): job_view(body)} if uid and namespace else None


@kopf.index(*CONFIGMAPS, labels={LABEL_KIND: kopf.PRESENT})
def rj_stored(body: kopf.Body, namespace: str | None, **_: Any) -> dict[Key, StoredObject] | None:
    uid = owner_uid(body)
    obj = stored_object(body) if uid and namespace else None
    return {(namespace, uid): obj} if obj is not None and uid and namespace else None


@kopf.index("", "v1", "resourcequotas")
def ns_quotas(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[str, QuotaUsage] | None:
    # spec.hard is the limit in force from the moment the quota exists; status.hard follows only once
    # the quota controller has synced it (a ResearchJob created right after the quota must see it).
    status, spec = body.get("status") or {}, body.get("spec") or {}
    hard = dict(spec.get("hard") or status.get("hard") or {})
    selector = tuple(
        (str(e.get("scopeName")), str(e.get("operator")), tuple(str(v) for v in e.get("values") or []))
        for e in (spec.get("scopeSelector") or {}).get("matchExpressions") or []
    )
    usage = QuotaUsage(name, hard, dict(status.get("used") or {}), tuple(spec.get("scopes") or []), selector)
    return {namespace: usage} if namespace else None


@kopf.on.event(*JOBS, labels={LABEL_JOB: kopf.PRESENT})
async def job_event(type: str, body: kopf.Body, namespace: str | None, **_: Any) -> None:
    uid = owner_uid(body)
    if uid is None or namespace is None:
        return
    key = (namespace, uid)
    view = job_view(body)
    WORLD.bump()
    if type == "DELETED":
        WORLD.job_deleted(key, view.uid)
    elif view.pods or not view.active:
        WORLD.create_failures.pop(view.uid, None)  # its pods exist now, or it is done
    WORLD.wake(key)
    if type == "DELETED" or not view.active:
        # A slot may have freed up: let the ResearchJobs waiting in its scope compete for it.
        WORLD.wake_waiting(None if settings().global_max_active else namespace)
        if view.endpoint:
            # Its share of the endpoint is free: the waiting ResearchJobs anywhere may take it, and the
            # running pods get their new shares.
            WORLD.wake_endpoint_waiters(view.endpoint)
            shares.request_share_sync(view.endpoint)


@kopf.index(*CONFIGMAPS, labels={LABEL_KIND: SETTINGS_KIND})
def operator_settings(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[str, Any] | None:
    """The settings ConfigMap as an index: complete before any handler runs, so a restarted operator
    never admits a Job under the environment's defaults before it has read the admins' caps."""
    return {name: dict(body.get("data") or {})} if namespace == BASE_SETTINGS.namespace else None


@kopf.on.event(*CONFIGMAPS, labels={LABEL_KIND: kopf.PRESENT})
async def configmap_event(
    type: str, body: kopf.Body, namespace: str | None, name: str, logger: kopf.Logger, **_: Any
) -> None:
    if (body.get("metadata", {}).get("labels") or {}).get(LABEL_KIND) == SETTINGS_KIND:
        settings_changed(type, body, namespace, name, logger)
        return
    uid = owner_uid(body)
    if uid is not None and namespace is not None:
        WORLD.wake((namespace, uid))
        if type == "ADDED":
            _count_rate_limited((namespace, uid), body)


def _count_rate_limited(key: Key, body: kopf.Body) -> None:
    """429s a worker reports with a stored result, counted against the endpoint its ResearchJob calls."""
    obj = stored_object(body)
    rj = WORLD.bodies.get(key)
    if obj is None or not obj.rate_limited or rj is None:
        return
    model = (rj.get("spec") or {}).get("model") or {}
    cfg = settings()
    base_url = str(model.get("baseUrl") or cfg.default_model_base_url)
    named = str(model["endpoint"]) if model.get("endpoint") else None
    endpoint = calls(WORLD.endpoints, named, base_url, str(model.get("name") or "offline-research-1"))
    metrics.ENDPOINT_429.labels(endpoint.name if endpoint is not None else "").inc(obj.rate_limited)


def settings_changed(type: str, body: kopf.Body, namespace: str | None, name: str, logger: kopf.Logger) -> None:
    """The operator's settings ConfigMap (labelled ``researchops.io/kind: operator-settings`` in the
    operator's namespace): apply the caps and the default endpoint at once, or refuse it whole."""
    if namespace != BASE_SETTINGS.namespace:
        return
    data = {} if type == "DELETED" else dict(body.get("data") or {})
    try:
        new = BASE_SETTINGS.with_configmap(data)
    except ValueError as e:
        logger.error(f"ignoring invalid operator settings in ConfigMap {name}: {e}")
        return
    if data != WORLD.settings_data:
        WORLD.settings_data = data
        budgets = ",".join(f"{ns}:{describe_budget(b)}" for ns, b in sorted(new.token_budgets.items()))
        logger.info(
            f"operator settings: globalMaxActiveJobs={new.global_max_active} "
            f"namespaceMaxActiveJobs={new.namespace_max_active} "
            f"namespaceTokenBudgets={budgets} admissionPolicyBinding={new.admission_policy_binding} "
            f"trustAuthors={str(new.trust_authors).lower()} "
            f"allowedPriorityClasses={','.join(new.allowed_priority_classes)} "
            f"allowedTolerationKeys={','.join(new.allowed_toleration_keys)} "
            f"allowedNodeSelectorKeys={','.join(new.allowed_node_selector_keys)} "
            f"allowTenantBaseUrls={str(new.tenant_base_urls).lower()} "
            f"allowedWorkloadPriorityClasses={','.join(new.allowed_workload_priority_classes)}"
        )
        WORLD.policy_probe = None  # look at the admission policy afresh (it may just have been installed)
        WORLD.wake_waiting()
        WORLD.wake_refused()


@kopf.index(GROUP, VERSION, ENDPOINT_PLURAL)
def model_endpoints(body: kopf.Body, name: str, **_: Any) -> dict[str, Endpoint] | None:
    endpoint = endpoint_from(body)
    return {name: endpoint} if endpoint is not None else None


@kopf.on.event(GROUP, VERSION, ENDPOINT_PLURAL)
async def endpoint_event(type: str, body: kopf.Body, name: str, logger: kopf.Logger, **kwargs: Any) -> None:
    """A ModelEndpoint (ours, cluster-scoped, few): admission and the running pods' shares follow a
    change of its capacity at once."""
    WORLD.endpoint_index = kwargs["model_endpoints"]
    old = WORLD.endpoints_seen.get(name)
    new = None if type == "DELETED" else endpoint_from(body)
    if type != "DELETED" and new is None:
        logger.error(f"ignoring ModelEndpoint {name}: its spec is not usable")
    if new == old and name in WORLD.endpoint_status:
        return  # a status write of ours, or nothing that matters
    if new is None:
        WORLD.endpoints_seen.pop(name, None)
    else:
        WORLD.endpoints_seen[name] = new
    WORLD.endpoint_status.pop(name, None)
    WORLD.wake_waiting()  # ResearchJobs may now match another endpoint, or none
    WORLD.wake_refused()  # one that names it may now find it, or be selected by it
    shares.request_share_sync(name)


@kopf.on.event("", "v1", "resourcequotas")
async def quota_event(namespace: str | None, **_: Any) -> None:
    if namespace is not None:
        WORLD.wake_waiting(namespace)


# Kueue mode: Kueue's Workloads (one per worker Job, owned by it) and LocalQueues, for the status.
# Only with KUEUE_WATCH (fixed at start): watching needs Kueue's CRDs and the RBAC the chart adds.
# Workloads carry no label of ours, so in Kueue mode every Workload of the cluster is indexed (as a
# small view); without Kueue mode none is watched.
if BASE_SETTINGS.kueue_watch:

    @kopf.index(kueue.GROUP, kueue.VERSION, "workloads")
    def kueue_workloads(body: kopf.Body, namespace: str | None, **_: Any) -> dict[tuple[str, str], Any] | None:
        wl = kueue.workload_view(body)
        return {(namespace, wl.job): wl} if wl is not None and namespace else None

    @kopf.index(kueue.GROUP, kueue.VERSION, "localqueues")
    def kueue_localqueues(
        body: kopf.Body, namespace: str | None, name: str, **_: Any
    ) -> dict[tuple[str, str], Any] | None:
        return {(namespace, name): kueue.localqueue_view(body)} if namespace else None

    @kopf.on.event(kueue.GROUP, kueue.VERSION, "workloads")
    async def workload_event(body: kopf.Body, namespace: str | None, **_: Any) -> None:
        wl = kueue.workload_view(body)
        if wl is not None and namespace is not None:
            for key, views in list((WORLD.job_index or {}).items()):
                if key[0] == namespace and any(j.name == wl.job for j in views):
                    WORLD.wake(key)

    @kopf.on.event(kueue.GROUP, kueue.VERSION, "localqueues")
    async def localqueue_event(namespace: str | None, **_: Any) -> None:
        for key in list(WORLD.bodies):
            if key[0] == namespace:
                WORLD.wake(key)


@kopf.on.event(*EVENTS)
async def failed_create_event(body: kopf.Body, namespace: str | None, **_: Any) -> None:
    """The Job controller could not create a pod of one of our Jobs (a quota it cannot fit, a
    LimitRange, a missing ServiceAccount): remember why, so the ResearchJob says it."""
    involved = body.get("involvedObject") or {}
    job_uid = str(involved.get("uid") or "")
    if not namespace or not job_uid:
        return
    for key, jobs in (WORLD.job_index or {}).items():
        if key[0] == namespace and any(j.uid == job_uid and j.active and not j.pods for j in jobs):
            WORLD.create_failures[job_uid] = str(body.get("message") or "FailedCreate")[:400]
            WORLD.wake(key)
            return


@kopf.on.event(GROUP, VERSION, PLURAL)
async def researchjob_event(
    type: str, body: kopf.Body, namespace: str | None, logger: kopf.Logger, **kwargs: Any
) -> None:
    uid = body.get("metadata", {}).get("uid")
    if namespace is None or not uid:
        return
    # kopf passes each index by its function's name; they are complete before this first runs.
    WORLD.attach(kwargs["rj_jobs"], kwargs["rj_stored"], kwargs["ns_quotas"], kwargs["model_endpoints"])
    if not WORLD.settings_loaded:
        WORLD.settings_loaded = True
        for datas in kwargs["operator_settings"].values():
            for data in datas:
                try:
                    BASE_SETTINGS.with_configmap(data)
                except ValueError:
                    continue
                WORLD.settings_data = dict(data)
        caps = settings()
        logger.info(
            f"operator settings: globalMaxActiveJobs={caps.global_max_active} "
            f"namespaceMaxActiveJobs={caps.namespace_max_active}"
        )
    WORLD.kueue_indexes.update({k: kwargs[k] for k in ("kueue_workloads", "kueue_localqueues") if k in kwargs})
    key: Key = (namespace, str(uid))
    if type == "DELETED":
        deletion.FINALIZED.discard(str(uid))
        loop.stop_loop(key)
        return
    if type == "ADDED":  # created while we watch (the initial listing has no type)
        if namespace in WORLD.terminating:
            WORLD.namespace_accepts_creates(namespace)
            WORLD.wake_namespace(namespace)
    WORLD.bodies[key] = loop.slim(body)
    loop.ensure_loop(key, logger)
