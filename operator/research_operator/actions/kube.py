"""The Kubernetes API calls the operator makes (watches apart, which kopf runs): each one off the
event loop, counted in the metrics, with the answers that are not errors to us turned into values.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import datetime as dt
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from research_api.researchjob import GROUP, PLURAL, VERSION, ResearchJobStatus
from research_operator import metrics
from research_operator.constants import FINALIZER

API_THREADS = 16  # concurrent API requests (the kubernetes client is synchronous)
# (connect, read) seconds of every request: the client waits forever by default, and one request
# left hanging would stall its ResearchJob's pass (and the resync behind it) for good. A timeout is
# an error like any other: the pass backs off and is retried.
REQUEST_TIMEOUT = (10.0, 60.0)
_api: client.ApiClient | None = None
_pool: concurrent.futures.ThreadPoolExecutor | None = None


def api() -> client.ApiClient:
    global _api
    if _api is None:
        cfg = client.Configuration()
        config.load_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        cfg.connection_pool_maxsize = API_THREADS  # one connection per thread, none thrown away
        _api = client.ApiClient(cfg)
    return _api


_slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None


class Skipped(Exception):
    """A request not sent: by the time it had a thread, its ``skip_if`` said it could only fail."""


async def call(
    verb: str, resource: str, fn: Any, *args: Any, skip_if: Callable[[], bool] | None = None, **kwargs: Any
) -> Any:
    """One Kubernetes API request, off the event loop, counted in the metrics. Requests wait for one
    of the ``API_THREADS`` threads here, not in the executor's queue, so ``skip_if`` is asked just
    before this one is sent (thousands queued at once may be moot by then)."""
    global _pool, _slots
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(API_THREADS, thread_name_prefix="kube-api")
    loop = asyncio.get_running_loop()
    if _slots is None or _slots[0] is not loop:
        _slots = (loop, asyncio.Semaphore(API_THREADS))
    async with _slots[1]:
        if skip_if is not None and skip_if():
            raise Skipped(f"{verb} {resource}")
        metrics.API_REQUESTS.labels(verb, resource).inc()
        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
        return await loop.run_in_executor(_pool, lambda: fn(*args, **kwargs))


class Created(StrEnum):
    CREATED = "created"
    EXISTS = "exists"  # 409: a repeat or a race, which is fine
    QUOTA = "quota"  # 403 exceeded quota: another client took the room first
    TERMINATING = "terminating"  # 403: the namespace is being deleted


def server_message(e: ApiException) -> str:
    """The API server's own words for a refusal (its Status ``message``), or "" when it gave none."""
    import json

    try:
        return str(json.loads(e.body or "{}").get("message") or "")
    except (ValueError, AttributeError):
        return ""


def quota_message(e: ApiException) -> str:
    """The API server's own words for a 403 exceeded quota (which quota, which resource)."""
    return server_message(e) or "the API server answered 403 exceeded quota"


async def create(obj: dict[str, Any], terminating: Callable[[], bool] | None = None) -> tuple[Created, str]:
    """Create one child object; the outcome and, for a quota refusal, the server's message.
    ``terminating``: whether its namespace is known to be being deleted (asked just before sending)."""
    ns = obj["metadata"]["namespace"]
    kind = obj["kind"]
    fns = {
        "Job": client.BatchV1Api(api()).create_namespaced_job,
        "ServiceAccount": client.CoreV1Api(api()).create_namespaced_service_account,
        "Role": client.RbacAuthorizationV1Api(api()).create_namespaced_role,
        "RoleBinding": client.RbacAuthorizationV1Api(api()).create_namespaced_role_binding,
        "NetworkPolicy": client.NetworkingV1Api(api()).create_namespaced_network_policy,
    }
    try:
        await call("create", kind.lower(), fns[kind], ns, obj, skip_if=terminating)
    except Skipped:
        return Created.TERMINATING, ""
    except ApiException as e:
        if e.status == 409:
            return Created.EXISTS, ""
        if e.status == 403 and "exceeded quota" in (e.body or ""):
            return Created.QUOTA, quota_message(e)
        if e.status == 403 and "being terminated" in (e.body or ""):
            return Created.TERMINATING, ""
        raise
    return Created.CREATED, ""


async def replace_role(obj: dict[str, Any]) -> None:
    """Replace a worker Role (ours alone: the names its pods may read change with the plan)."""
    rbac = client.RbacAuthorizationV1Api(api())
    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    await call("update", "role", rbac.replace_namespaced_role, name, ns, obj)


async def delete_job(namespace: str, job: str, uid: str = "", propagation: str = "Background") -> None:
    """Delete a Job; with ``uid``, only that Job (a precondition), never a newer one of the same name."""
    body = client.V1DeleteOptions(
        propagation_policy=propagation, preconditions=client.V1Preconditions(uid=uid) if uid else None
    )
    try:
        await call("delete", "job", client.BatchV1Api(api()).delete_namespaced_job, job, namespace, body=body)
    except ApiException as e:
        if e.status not in (404, 409):  # gone already, or another Job has the name now
            raise


async def delete_researchjob(namespace: str, name: str, uid: str) -> None:
    body = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=uid))
    try:
        await call(
            "delete",
            "researchjob",
            client.CustomObjectsApi(api()).delete_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            body=body,
        )
    except ApiException as e:
        if e.status not in (404, 409):
            raise


def termination_detail(reason: str | None, message: str | None, memory_limit: str | None) -> str:
    """What a failed worker container's termination says, in one line for the status message: an
    OOM kill (whose log, cut off by SIGKILL, says nothing useful) names the limit to raise; otherwise
    the last line of its termination message (the worker's error)."""
    if reason == "OOMKilled":
        limit = f" of {memory_limit}" if memory_limit else ""
        return f"OOMKilled: the worker went over its memory limit{limit}; raise spec.worker.resources.limits.memory"
    lines = [ln for ln in (message or "").strip().splitlines() if ln.strip()]
    return lines[-1][:400] if lines else ""


async def pod_failure_detail(namespace: str, job: str) -> str:
    """The termination message of a failed Job's last pod (its error, for the status message)."""
    pods = await call(
        "list", "pod", client.CoreV1Api(api()).list_namespaced_pod, namespace, label_selector=f"job-name={job}"
    )
    detail = ""
    for pod in sorted(pods.items, key=lambda p: p.metadata.creation_timestamp):
        limits = {
            c.name: ((c.resources and c.resources.limits) or {}).get("memory") for c in (pod.spec.containers or [])
        }
        for cs in (pod.status and pod.status.container_statuses) or []:
            term = cs.state and cs.state.terminated
            if term is not None and term.exit_code != 0:
                detail = termination_detail(term.reason, term.message, limits.get(cs.name)) or detail
    return detail


class Gone(Exception):
    """The ResearchJob a pass works for no longer exists (under this uid)."""


async def researchjob_exists(namespace: str, name: str, uid: str) -> bool:
    """Whether the ResearchJob ``namespace/name`` still exists as this uid (a watch can miss a
    deletion: a DELETED event falls into the gap of a watch restarted after it expired)."""
    try:
        obj = await call(
            "get",
            "researchjob",
            client.CustomObjectsApi(api()).get_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
        )
    except ApiException as e:
        if e.status == 404:
            return False
        raise
    return bool(obj.get("metadata", {}).get("uid") == uid)


async def patch_status(
    namespace: str, name: str, uid: str, st: ResearchJobStatus, prev: ResearchJobStatus | None = None
) -> None:
    """Write status (a JSON patch that first tests the uid, so a pass of a deleted ResearchJob never
    writes onto a new one of the same name). Nothing is sent when nothing changed."""
    new = st.model_dump(by_alias=True, mode="json")  # None values delete stale keys
    if prev is not None and new == prev.model_dump(by_alias=True, mode="json"):
        return
    patch = [
        {"op": "test", "path": "/metadata/uid", "value": uid},
        {"op": "add", "path": "/status", "value": new},  # add replaces a status that exists
    ]
    try:
        await call(
            "patch",
            "researchjob/status",
            client.CustomObjectsApi(api()).patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            patch,
            _content_type="application/json-patch+json",
        )
    except ApiException as e:
        if e.status in (404, 422):  # gone, or another ResearchJob of that name now (the uid test failed)
            raise Gone(f"{namespace}/{name}: {e.status} {server_message(e) or e.reason}") from e
        if e.status != 409:
            raise


async def set_finalizer(namespace: str, name: str, uid: str, *, present: bool) -> bool:
    """Add or remove our finalizer with an optimistic-concurrency merge patch (resourceVersion), so
    finalizers others add at the same time are kept. False if the ResearchJob (this uid) is gone."""
    custom = client.CustomObjectsApi(api())
    for _ in range(5):
        try:
            obj = await call(
                "get", "researchjob", custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name
            )
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        meta = obj.get("metadata", {})
        if meta.get("uid") != uid:
            return False
        current = list(meta.get("finalizers") or [])
        if (FINALIZER in current) == present:
            return True
        wanted = [*current, FINALIZER] if present else [f for f in current if f != FINALIZER]
        patch = {"metadata": {"finalizers": wanted, "resourceVersion": meta.get("resourceVersion")}}
        try:
            await call(
                "patch",
                "researchjob",
                custom.patch_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                patch,
            )
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            if e.status != 409:
                raise
    raise ApiException(status=409, reason=f"the finalizers of {namespace}/{name} kept changing")


async def _create_or_replace(
    resource: str, create: Callable[..., Any], replace: Callable[..., Any], obj: dict[str, Any]
) -> None:
    """Create ``obj``, or replace the one of its name (objects only the operator writes)."""
    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    try:
        await call("create", resource, create, ns, obj)
    except ApiException as e:
        if e.status != 409:
            raise
        await call("update", resource, replace, name, ns, obj)


async def put_configmap(obj: dict[str, Any]) -> None:
    """Create a ConfigMap, or replace the one of that name (the operator's own shares ConfigMap)."""
    core = client.CoreV1Api(api())
    await _create_or_replace("configmap", core.create_namespaced_config_map, core.replace_namespaced_config_map, obj)


async def patch_endpoint_status(name: str, status: dict[str, Any]) -> None:
    """Write a ModelEndpoint's status (merge patch on the status subresource); a gone one is fine."""
    from research_api.modelendpoint import ENDPOINT_PLURAL

    try:
        await call(
            "patch",
            "modelendpoint/status",
            client.CustomObjectsApi(api()).patch_cluster_custom_object_status,
            GROUP,
            VERSION,
            ENDPOINT_PLURAL,
            name,
            {"status": status},
        )
    except ApiException as e:
        if e.status != 404:
            raise


async def token_review(token: str, audiences: list[str] | None = None) -> dict[str, Any]:
    """The API server's verdict on a bearer token (TokenReview) for ``audiences`` (None: the API
    server's own): ``status`` with ``authenticated``, ``audiences``, ``user.username``, ``user.extra``
    and ``error``. The token is never logged."""
    spec: dict[str, Any] = {"token": token}
    if audiences is not None:
        spec["audiences"] = list(audiences)
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec}
    review = await call(
        "create",
        "tokenreview",
        client.AuthenticationV1Api(api()).create_token_review,
        body,
        _preload_content=False,
    )
    import json

    status: dict[str, Any] = json.loads(review.data).get("status") or {}
    return status


async def point_service_at(namespace: str, service: str, ip: str, port: int) -> None:
    """Make ``ip:port`` the one endpoint of the selector-less Service ``service``: its EndpointSlice
    of the same name (``builders.broker_endpoint_slice``), owned by the Service, so it goes with it."""
    from research_operator.decisions.manifests import broker_endpoint_slice

    svc = await call("get", "service", client.CoreV1Api(api()).read_namespaced_service, service, namespace)
    body = broker_endpoint_slice(namespace, service, str(svc.metadata.uid), ip, port)
    discovery = client.DiscoveryV1Api(api())
    create, replace = discovery.create_namespaced_endpoint_slice, discovery.replace_namespaced_endpoint_slice
    await _create_or_replace("endpointslice", create, replace, body)


async def namespace_labels(name: str) -> dict[str, str] | None:
    """The labels of namespace ``name``; None when it does not exist."""
    try:
        ns = await call("get", "namespace", client.CoreV1Api(api()).read_namespace, name)
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    return dict(ns.metadata.labels or {})


async def configmap_data(namespace: str, name: str) -> dict[str, str] | None:
    """The data of ConfigMap ``namespace/name`` (a documents source's); None when it does not exist."""
    try:
        cm = await call("get", "configmap", client.CoreV1Api(api()).read_namespaced_config_map, name, namespace)
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    return dict(cm.data or {})


async def endpoint_key(namespace: str, name: str, key: str) -> str | None:
    """The value of key ``key`` of Secret ``namespace/name`` (a ModelEndpoint's API key); None when
    the Secret or the key does not exist. Never logged."""
    try:
        secret = await call("get", "secret", client.CoreV1Api(api()).read_namespaced_secret, name, namespace)
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    raw = (secret.data or {}).get(key)
    return base64.b64decode(raw).decode() if raw is not None else None


async def broker_ca(
    namespace: str, name: str, make: Callable[[], tuple[str, str]], service: str = ""
) -> tuple[str, str]:
    """The lease broker's CA (certificate and key, PEM) from Secret ``namespace/name``; made with
    ``make`` and stored there when missing (a leader racing another gets theirs: 409, read again).
    Owned by the broker's Service when there is one, so ``helm uninstall`` takes it too."""
    core = client.CoreV1Api(api())
    owners: list[dict[str, Any]] = []
    if service:
        svc = await call("get", "service", core.read_namespaced_service, service, namespace)
        owners = [{"apiVersion": "v1", "kind": "Service", "name": service, "uid": str(svc.metadata.uid)}]
    for _ in range(3):
        try:
            secret = await call("get", "secret", core.read_namespaced_secret, name, namespace)
            data = secret.data or {}
            return base64.b64decode(data["tls.crt"]).decode(), base64.b64decode(data["tls.key"]).decode()
        except ApiException as e:
            if e.status != 404:
                raise
        cert, key = make()
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {"app.kubernetes.io/component": "operator"},
                "ownerReferences": owners,
            },
            "stringData": {"tls.crt": cert, "tls.key": key},
        }
        try:
            await call("create", "secret", core.create_namespaced_secret, namespace, body)
            return cert, key
        except ApiException as e:
            if e.status != 409:
                raise
    raise RuntimeError(f"Secret {namespace}/{name} kept appearing and vanishing")


async def admission_policy_binding(name: str) -> tuple[str, list[str], dt.datetime | None] | None:
    """The ValidatingAdmissionPolicyBinding ``name``: the policy it binds, its validationActions and
    since when both exist (the later creationTimestamp: what was created before was not checked);
    None: it does not exist, or the binding it names has no policy."""
    adm = client.AdmissionregistrationV1Api(api())
    try:
        binding = await call(
            "get", "validatingadmissionpolicybinding", adm.read_validating_admission_policy_binding, name
        )
        policy = str(binding.spec.policy_name or "")
        if not policy:
            return None
        pol = await call("get", "validatingadmissionpolicy", adm.read_validating_admission_policy, policy)
    except ApiException as e:
        if e.status == 404:
            return None
        raise
    created = [t for t in (binding.metadata.creation_timestamp, pol.metadata.creation_timestamp) if t is not None]
    return policy, list(binding.spec.validation_actions or []), max(created) if created else None
