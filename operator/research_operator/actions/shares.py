"""The shares of the shared model endpoints: written for the running pods whenever what is admitted
against an endpoint changes (one ConfigMap per ResearchJob, ``research_api.task.EndpointShares``),
with the ModelEndpoint's status and metrics. Coalesced in one background task."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

from kubernetes.client.exceptions import ApiException

from research_api.task import SHARES_KEY
from research_operator import metrics
from research_operator.actions import kube
from research_operator.cache.world import WORLD, Key
from research_operator.decisions import endpoints as ep
from research_operator.decisions.manifests import Owner
from research_operator.lease_broker import broker

log = logging.getLogger(__name__)


_SYNC_WANTED: set[str] = set()
_SYNC_LOCK: asyncio.Lock | None = None
_SYNC_EVENT: asyncio.Event | None = None
_SYNC_TASK: asyncio.Task[None] | None = None


def request_share_sync(endpoint: str) -> None:
    """Rewrite the shares of ``endpoint``'s pods soon (coalesced, in one background task)."""
    global _SYNC_EVENT, _SYNC_TASK
    _SYNC_WANTED.add(endpoint)
    if _SYNC_EVENT is None:
        _SYNC_EVENT = asyncio.Event()
    if _SYNC_TASK is None or _SYNC_TASK.done():
        _SYNC_TASK = asyncio.create_task(_share_syncer(_SYNC_EVENT), name="endpoint shares")
    _SYNC_EVENT.set()


async def _share_syncer(event: asyncio.Event) -> None:
    while True:
        await event.wait()
        event.clear()
        await asyncio.sleep(0.05)  # one rewrite for a burst of changes
        for name in sorted(_SYNC_WANTED):
            _SYNC_WANTED.discard(name)
            try:
                await sync_endpoint(name)
            except ApiException as e:
                log.warning(f"writing the shares of ModelEndpoint {name} hit an API error {e.status}: {e.reason}")
                _SYNC_WANTED.add(name)
                await asyncio.sleep(1.0)
                event.set()
            except Exception:  # noqa: BLE001 - keep syncing the other endpoints; logged with its traceback
                log.exception(f"writing the shares of ModelEndpoint {name} failed")


async def sync_endpoint(name: str) -> None:
    """Give every running pod admitted against ``name`` its current share (one ConfigMap per
    ResearchJob, written only when it changed), and show the use in the ModelEndpoint's status and
    metrics. A deleted ModelEndpoint leaves its pods their full demand, with no per-minute limits.
    One at a time, so a slower write never replaces a newer one."""
    global _SYNC_LOCK
    if _SYNC_LOCK is None:
        _SYNC_LOCK = asyncio.Lock()
    async with _SYNC_LOCK:
        await _sync_endpoint(name)


async def _sync_endpoint(name: str) -> None:
    broker.world_changed(name)  # calls waiting for a lease may fit now
    endpoint = WORLD.endpoints.get(name)
    pods = WORLD.endpoint_pods(name)
    if endpoint is not None:
        table = ep.shares(endpoint, [p for _, p in pods])
    else:
        table = {p.job: ep.Share(p.demand) for _, p in pods}
    by_key: dict[Key, dict[str, ep.Share]] = {}
    for key, p in pods:
        by_key.setdefault(key, {})[p.job] = table[p.job]
    for key, mine in by_key.items():
        body = WORLD.bodies.get(key)
        if body is None:
            continue
        rj = str(body.get("metadata", {}).get("name"))
        owner = Owner(key[0], rj, key[1])
        cm = ep.shares_configmap(key[0], rj, owner.reference(), name, mine)
        data = cm["data"][SHARES_KEY]
        if WORLD.shares_written.get(key) != data:
            await kube.put_configmap(cm)
            WORLD.shares_written[key] = data
    in_flight = sum(s.concurrency for s in table.values())
    waiting = WORLD.endpoint_waiters(name)
    minute_ago = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    recent = sum(
        obj.tokens
        for key in by_key
        for obj in (WORLD.stored_index or {}).get(key, [])
        if obj.created is not None and obj.created >= minute_ago
    )
    metrics.ENDPOINT_TOKENS_PER_MINUTE.labels(name).set(recent)
    metrics.ENDPOINT_IN_FLIGHT.labels(name).set(in_flight)
    metrics.ENDPOINT_PODS.labels(name).set(len(pods))
    metrics.ENDPOINT_WAITING.labels(name).set(waiting)
    if endpoint is not None:
        metrics.ENDPOINT_CAPACITY.labels(name).set(endpoint.max_concurrent)
        n = max(1, len(table))
        metrics.ENDPOINT_SHARE.labels(name, "concurrency").set(in_flight / n if table else 0)
        for resource, total in (
            ("requests_per_minute", endpoint.requests_per_minute),
            ("tokens_per_minute", endpoint.tokens_per_minute),
        ):
            metrics.ENDPOINT_SHARE.labels(name, resource).set((total or 0) / n if table else 0)
        status = {
            "observedGeneration": endpoint.generation,
            "requestsInFlightLimit": in_flight,
            "pods": len(pods),
            "waitingResearchJobs": waiting,
            "shares": [
                {
                    "namespace": p.namespace,
                    "researchJob": p.research_job,
                    "job": p.job,
                    **table[p.job].entry().model_dump(by_alias=True, exclude_none=True),
                }
                for _, p in sorted(pods, key=lambda kp: (kp[1].namespace, kp[1].job))
            ]
            or None,
        }
        if WORLD.endpoint_status.get(name) != status:
            await kube.patch_endpoint_status(name, status)
            WORLD.endpoint_status[name] = status
