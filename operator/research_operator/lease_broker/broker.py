"""The lease broker: an aiohttp server inside the operator process (the leader only: a standby never
reaches kopf's startup), serving ``research_api.leases`` to the worker pods. The decisions are the
pure ``leases.Book``; this module authenticates requests, waits, and keeps the metrics.

Authentication: the pod's ServiceAccount token bound to the broker's audience
(``wire.TOKEN_AUDIENCE``, a projected token), checked with a TokenReview for that audience (cached
for a minute by its SHA-256, never logged); any other token, the pod's API token included, is
refused. The token's namespace must be the Job's, its ServiceAccount the one the operator runs the
ResearchJob's workers as, and its pod (a bound token names it) a pod of the Job.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import ipaddress
import logging
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from kubernetes.client.exceptions import ApiException
from pydantic import BaseModel, ValidationError

from research_api import leases as wire
from research_operator import metrics
from research_operator.actions import kube
from research_operator.cache.world import WORLD, settings
from research_operator.decisions import endpoints as ep
from research_operator.decisions.lease_book import Book, LeaseError, Limits, PodRef, Waiter
from research_operator.decisions.ledger import SHORT_SECONDS, Amount, Budgets, Ledger, Limit, Prices, RjKey
from research_operator.decisions.manifests import Owner, worker_service_account
from research_operator.lease_broker import pki

log = logging.getLogger(__name__)

TICK_SECONDS = 0.25  # expiry, rate buckets and metrics
REVIEW_CACHE_SECONDS = 60.0
REVIEW_CACHE_MAX = 4096
SA_PREFIX = "system:serviceaccount:"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
GENERATED_PREFIX_MAX = 58  # a Job's pod is named <job>- cut to 58 characters, then 5 random ones


@dataclass(frozen=True)
class Identity:
    namespace: str
    service_account: str
    pod: str


class Authenticator:
    """Bearer token -> Identity via a TokenReview for the broker's audience, cached (also refusals,
    briefly). A refusal is the reason, for the log and the 401 (never the token)."""

    def __init__(self, review: Callable[[str, list[str]], Awaitable[dict[str, Any]]] = kube.token_review) -> None:
        self.review = review
        self.cache: dict[str, tuple[float, Identity | str]] = {}

    async def identity(self, token: str) -> Identity | str:
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        hit = self.cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        found = _verdict(await self.review(token, [wire.TOKEN_AUDIENCE]))
        if len(self.cache) >= REVIEW_CACHE_MAX:
            self.cache = {k: v for k, v in self.cache.items() if v[0] > now}
            if len(self.cache) >= REVIEW_CACHE_MAX:
                self.cache.clear()
        self.cache[digest] = (now + (REVIEW_CACHE_SECONDS if isinstance(found, Identity) else 10.0), found)
        return found


def _verdict(status: dict[str, Any]) -> Identity | str:
    """A TokenReview's status -> the pod's Identity, or why the token is refused."""
    audiences = [str(a) for a in status.get("audiences") or []]
    if not status.get("authenticated"):
        error = str(status.get("error") or "")[:300]
        return f"the token is not a valid ServiceAccount token for audience {wire.TOKEN_AUDIENCE}" + (
            f" ({error})" if error else ""
        )
    if wire.TOKEN_AUDIENCE not in audiences:  # an API server that ignored spec.audiences
        return f"the token is not bound to audience {wire.TOKEN_AUDIENCE} (its audiences: {audiences})"
    user = status.get("user") or {}
    name = str(user.get("username") or "")
    pods = (user.get("extra") or {}).get(POD_NAME_EXTRA) or []
    if not name.startswith(SA_PREFIX) or not pods:
        return "the token is not a pod's ServiceAccount token"
    namespace, _, sa = name.removeprefix(SA_PREFIX).partition(":")
    return Identity(namespace, sa, str(pods[0]))


def _pods(endpoint: str) -> list[PodRef]:
    e = WORLD.endpoints.get(endpoint)
    pods = WORLD.endpoint_pods(endpoint)
    table = ep.shares(e, [p for _, p in pods]) if e is not None else {}
    return [
        PodRef(p.namespace, p.research_job, p.job, table[p.job].concurrency if p.job in table else 0, key[1])
        for key, p in pods
    ]


def _prices(endpoint: str) -> Prices:
    e = WORLD.endpoints.get(endpoint)
    return e.prices if e is not None and e.prices is not None else Prices()


def prices_of(key: RjKey) -> Prices | None:
    """The prices of the ModelEndpoint a ResearchJob's Jobs were admitted against (None: no endpoint,
    or one without prices)."""
    for job in WORLD.jobs_of(key).values():
        if job.endpoint:
            e = WORLD.endpoints.get(job.endpoint)
            return e.prices if e is not None else None
    return None


def _stored(key: RjKey, since: dt.datetime | None = None) -> Amount:
    """What a ResearchJob's stored results used (since ``since``), at its endpoint's prices."""
    prices = prices_of(key) or Prices()
    total = Amount()
    for obj in (WORLD.stored_index or {}).get(key, []):
        if since is None or (obj.created is not None and obj.created >= since):
            total = total + Amount(obj.tokens, prices.amount(obj.input_tokens, obj.output_tokens).cost)
    return total


def _budgets(namespace: str, research_job: str, uid: str, now: float) -> Budgets:
    """The budgets a call of ResearchJob ``namespace/research_job`` falls under now: its spec.budget and
    its namespace's budget for the current period (operator settings)."""
    key = (namespace, uid)
    body = WORLD.bodies.get(key) or {}
    spec_budget = (body.get("spec") or {}).get("budget") or {}
    job = ep.spec_limit(spec_budget)
    b = settings().token_budgets.get(namespace)
    if b is None:
        return Budgets(key, research_job, job)
    wall = dt.datetime.now(dt.UTC)
    start, end = ep.window(wall, b.seconds)
    stored = sum((_stored(k, start) for k in (WORLD.stored_index or {}) if k[0] == namespace), Amount())
    return Budgets(
        key,
        research_job,
        job,
        Limit(b.tokens, b.cost),
        stored,
        b.period,
        (end - wall).total_seconds(),
        end.isoformat().replace("+00:00", "Z"),
    )


def budget_wait(key: RjKey) -> str | None:
    """Why a model call of a running pod of ResearchJob ``key`` waits for its namespace's budget (None:
    none does), for its status."""
    ledger = BROKER.book.ledger if BROKER is not None else None
    return ledger.waits_for_namespace(key, time.monotonic()) if ledger is not None else None


def namespace_use(namespace: str, since: dt.datetime) -> tuple[Amount, Amount | None]:
    """What ``namespace`` spent since ``since``: what its results stored since then used, plus (with the
    lease broker) the model calls settled that are not stored yet; and what a model call of the
    namespace that its budget cannot pay this period needs (None: no call waits so)."""
    stored = sum((_stored(k, since) for k in (WORLD.stored_index or {}) if k[0] == namespace), Amount())
    ledger = BROKER.book.ledger if BROKER is not None else None
    if ledger is None:
        return stored, None
    return ledger.namespace_spent(namespace, stored), ledger.namespace_short(namespace, time.monotonic())


def _limits(endpoint: str) -> Limits | None:
    e = WORLD.endpoints.get(endpoint)
    return None if e is None else Limits(e.max_concurrent, e.requests_per_minute, e.tokens_per_minute)


def expected_service_account(endpoint: str, namespace: str, job: str) -> str | None:
    for key, p in WORLD.endpoint_pods(endpoint):
        if (p.namespace, p.job) == (namespace, job):
            return worker_service_account(Owner(namespace, p.research_job, key[1]), settings())
    return None


NAMESPACE_LABELS_SECONDS = 10.0  # how long one look at a namespace's labels serves
KEY_CACHE_SECONDS = 60.0  # how long a ModelEndpoint's key serves (a rotated key is used within this)
# Request headers passed on to the endpoint, and answer headers passed back (never Authorization,
# cookies or the endpoint's own hop-by-hop headers).
GATEWAY_REQUEST_HEADERS = ("content-type", "accept", "user-agent", "openai-beta")
GATEWAY_ANSWER_HEADERS = ("content-type", "retry-after", "retry-after-ms", "x-request-id")
GATEWAY_MAX_BODY = 32 * 1024 * 1024  # bytes of one request to the broker (a lease request is tiny)
# The endpoint must answer (or stream a chunk) within this; the worker's own timeout
# (spec.model.timeoutSeconds, at most 3600 s) normally hangs up first.
GATEWAY_READ_TIMEOUT = 3600.0


async def namespace_labels(namespace: str) -> dict[str, str] | None:
    """A namespace's labels, to match a ModelEndpoint's namespaceSelector (None: unreadable now).
    Namespaces are not watched (there are many, and few ResearchJobs name an endpoint): one look
    serves ``NAMESPACE_LABELS_SECONDS`` in this process."""
    seen = WORLD.namespace_labels.get(namespace)
    if seen is not None and time.monotonic() - seen[0] < NAMESPACE_LABELS_SECONDS:
        return seen[1]
    try:
        labels = await kube.namespace_labels(namespace)
    except ApiException as e:
        log.warning(f"cannot read namespace {namespace} ({e.status} {e.reason}) to match a namespaceSelector")
        labels = None
    WORLD.namespace_labels[namespace] = (time.monotonic(), labels)
    return labels


def worker_of(ident: Identity, endpoint: str) -> tuple[RjKey, str] | None:
    """The ResearchJob (its key and name) of a worker pod admitted against ``endpoint``."""
    for key, p in WORLD.endpoint_pods(endpoint):
        if p.namespace == ident.namespace and ident.pod.startswith(f"{p.job}-"[:GENERATED_PREFIX_MAX]):
            return key, p.research_job
    return None


def names_endpoint(ident: Identity, endpoint: str) -> bool:
    """Whether the pod is a worker pod of a ResearchJob that names ``endpoint`` (spec.model.endpoint):
    one of the Jobs admitted against it, run as its ResearchJob's worker ServiceAccount. A pod whose
    ResearchJob only calls the same base URL (with a key of its own) does not get the endpoint's key."""
    for key, p in WORLD.endpoint_pods(endpoint):
        if p.namespace != ident.namespace or not ident.pod.startswith(f"{p.job}-"[:GENERATED_PREFIX_MAX]):
            continue
        body = WORLD.bodies.get(key)
        named = (((body or {}).get("spec") or {}).get("model") or {}).get("endpoint")
        if named == endpoint and ident.service_account == worker_service_account(
            Owner(p.namespace, p.research_job, key[1]), settings()
        ):
            return True
    return False


class Keys:
    """ModelEndpoint API keys, read from their Secrets in the operator's namespace, cached a minute."""

    def __init__(self) -> None:
        self.cache: dict[tuple[str, str], tuple[float, str | None]] = {}

    async def get(self, endpoint: ep.Endpoint) -> str | None:
        if endpoint.key_secret is None:
            return None
        hit = self.cache.get(endpoint.key_secret)
        if hit is not None and time.monotonic() - hit[0] < KEY_CACHE_SECONDS:
            value = hit[1]
        else:
            name, key = endpoint.key_secret
            try:
                value = await kube.endpoint_key(settings().namespace, name, key)
            except ApiException as e:
                hint = (
                    ": the operator may read only the Secrets named in operator.leaseBroker.endpointKeySecrets"
                    if e.status == 403
                    else ""
                )
                raise LeaseError(
                    503, f"cannot read the API key of ModelEndpoint {endpoint.name} (HTTP {e.status}){hint}"
                ) from None
            self.cache[endpoint.key_secret] = (time.monotonic(), value)
        if value is None:
            raise LeaseError(
                503,
                f"the API key of ModelEndpoint {endpoint.name} is missing: Secret {settings().namespace}/"
                f"{endpoint.key_secret[0]} with key {endpoint.key_secret[1]} does not exist",
            )
        return value

    def forget(self, endpoint: ep.Endpoint) -> None:
        if endpoint.key_secret is not None:
            self.cache.pop(endpoint.key_secret, None)


def _load(ctx: ssl.SSLContext, serving: pki.KeyPair) -> None:
    """Load a serving certificate into ``ctx`` (new handshakes use it); the files live only as long
    as the load takes, in a private directory."""
    with tempfile.TemporaryDirectory(prefix="broker-tls-") as tmp:
        cert, key = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
        cert.write_text(serving.cert_pem)
        key.touch(mode=0o600)
        key.write_text(serving.key_pem)
        ctx.load_cert_chain(cert, key)


@dataclass
class Tls:
    """The broker's TLS: its CA, the names it serves under, the current serving certificate."""

    ca: pki.KeyPair
    dns_names: list[str]
    ips: list[str]
    ctx: ssl.SSLContext
    serving: pki.KeyPair

    @classmethod
    def start(cls, ca: pki.KeyPair, dns_names: list[str], ips: list[str]) -> Tls:
        serving = pki.issue_serving(ca, dns_names, ips, dt.datetime.now(dt.UTC))
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        _load(ctx, serving)
        return cls(ca, dns_names, ips, ctx, serving)

    def renew_if_due(self, now: dt.datetime) -> bool:
        if not pki.needs_renewal(self.serving, now):
            return False
        self.serving = pki.issue_serving(self.ca, self.dns_names, self.ips, now)
        _load(self.ctx, self.serving)
        return True


class Broker:
    def __init__(self, book: Book | None = None, auth: Authenticator | None = None) -> None:
        self.book = book or Book(
            _pods,
            _limits,
            started=time.monotonic(),
            ledger=Ledger(_stored),
            budgets=_budgets,
            prices=_prices,
        )
        self.auth = auth or Authenticator()
        self.events: dict[int, asyncio.Event] = {}
        self.ticker: asyncio.Task[None] | None = None
        self.keys = Keys()
        self.session: aiohttp.ClientSession | None = None
        self.tls: Tls | None = None

    def app(self) -> web.Application:
        # A model request through the gateway carries its whole prompt (retrieved passages included).
        app = web.Application(client_max_size=GATEWAY_MAX_BODY)
        app.router.add_post(wire.PATH_HEARTBEAT, self._route(wire.PATH_HEARTBEAT, self.heartbeat))
        app.router.add_post(wire.PATH_ACQUIRE, self._route(wire.PATH_ACQUIRE, self.acquire))
        app.router.add_post(wire.PATH_RELEASE, self._route(wire.PATH_RELEASE, self.release))
        app.router.add_post(wire.PATH_CLOSE, self._route(wire.PATH_CLOSE, self.close))
        app.router.add_get("/healthz", self.health)
        app.router.add_route("*", wire.PATH_GATEWAY + "/{endpoint}/{path:.*}", self.gateway)
        return app

    async def _identify(self, request: web.Request) -> Identity:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise LeaseError(401, "a ServiceAccount token is required (Authorization: Bearer)")
        ident = await self.auth.identity(token.strip())
        if isinstance(ident, str):
            raise LeaseError(401, ident)
        return ident

    async def gateway(self, request: web.Request) -> web.StreamResponse:
        """``{broker}/gateway/{endpoint}/{path}``: the request, as sent, to ``{baseUrl}/{path}`` of
        ModelEndpoint ``endpoint`` with its API key, and its answer back as it comes (streamed). Only
        for a worker pod of a ResearchJob that names the endpoint, in a namespace it selects."""
        name = request.match_info["endpoint"]
        code = 200
        try:
            ident = await self._identify(request)
            endpoint = WORLD.endpoints.get(name)
            if endpoint is None:
                raise LeaseError(404, f"ModelEndpoint {name} does not exist")
            labels = await namespace_labels(ident.namespace)
            if labels is None or not endpoint.selects(labels):
                raise LeaseError(403, f"namespace {ident.namespace} may not use ModelEndpoint {name}")
            if WORLD.job_index is None:
                raise LeaseError(503, "the operator is starting: its view of the admitted Jobs is not complete yet")
            if not names_endpoint(ident, name):
                pod = f"{ident.namespace}/{ident.pod}"
                raise LeaseError(403, f"pod {pod} is not a worker of a ResearchJob that names ModelEndpoint {name}")
            body = await request.read()
            self._covered(ident, name, request.headers.get(wire.LEASE_HEADER), body)
            key = await self.keys.get(endpoint)
            headers = {k: v for k, v in request.headers.items() if k.lower() in GATEWAY_REQUEST_HEADERS}
            if key is not None:
                headers["Authorization"] = f"Bearer {key}"
            url = f"{endpoint.base_url.rstrip('/')}/{request.match_info['path']}"
            if self.session is None:
                # No total timeout: the worker bounds each call (spec.model.timeoutSeconds) and hangs up.
                timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=GATEWAY_READ_TIMEOUT)
                self.session = aiohttp.ClientSession(timeout=timeout)
            async with self.session.request(
                request.method,
                url,
                params=request.query,
                data=body,
                headers=headers,
                allow_redirects=False,
            ) as upstream:
                code = upstream.status
                if code == 401:
                    self.keys.forget(endpoint)  # rotated: read it again on the next request
                answer = web.StreamResponse(
                    status=upstream.status,
                    headers={k: v for k, v in upstream.headers.items() if k.lower() in GATEWAY_ANSWER_HEADERS},
                )
                await answer.prepare(request)
                try:
                    async for chunk in upstream.content.iter_any():
                        await answer.write(chunk)
                    await answer.write_eof()
                except ConnectionResetError:  # the worker hung up (its own timeout): stop reading too
                    log.info(f"model gateway: {ident.namespace}/{ident.pod} hung up during the answer of {name}")
                return answer
        except LeaseError as e:
            code = e.status
            if e.status in (401, 403):
                log.warning(f"model gateway: refused a request for ModelEndpoint {name} from {request.remote}: {e}")
            return web.json_response({"error": {"message": str(e), "type": "gateway"}}, status=e.status)
        except ApiException as e:
            code = 503
            log.warning(f"model gateway: a TokenReview failed (HTTP {e.status} {e.reason})")
            return web.json_response(
                {"error": {"message": f"cannot verify the token now (HTTP {e.status})", "type": "gateway"}}, status=503
            )
        except (aiohttp.ClientError, TimeoutError) as e:
            code = 502
            log.warning(f"model gateway: ModelEndpoint {name} did not answer: {type(e).__name__}: {e}")
            return web.json_response(
                {"error": {"message": f"ModelEndpoint {name} did not answer ({type(e).__name__})", "type": "gateway"}},
                status=502,
            )
        finally:
            metrics.BROKER_REQUESTS.labels(wire.PATH_GATEWAY, str(code)).inc()

    def _covered(self, ident: Identity, endpoint: str, lease: str | None, body: bytes) -> None:
        """A pod of a ResearchJob under a budget may send through the gateway only what a reservation
        covers: the request names a lease the pod holds, and its worst case (prompt bound and output
        bound, ``wire.request_bound``) is within that lease's reservation. Raises LeaseError (403)."""
        ledger = self.book.ledger
        found = worker_of(ident, endpoint) if ledger is not None and self.book.budgets is not None else None
        if ledger is None or self.book.budgets is None or found is None:
            return
        (namespace, uid), research_job = found
        b = self.book.budgets(namespace, research_job, uid, time.monotonic())
        if b.job is None and b.namespace is None:
            return
        session = self.book.sessions.get((ident.namespace, ident.pod))
        r = ledger.reservations.get(lease or "")
        if r is None or session is None or lease not in session.leases:
            raise LeaseError(
                403,
                f"ResearchJob {namespace}/{research_job} has a budget: a request through the gateway must name a "
                f"lease this pod holds ({wire.LEASE_HEADER}), whose reservation covers it",
            )
        need = wire.request_bound(body)
        if need is None or need[1] is None or need[0] > r.input_tokens or need[1] > r.output_tokens:
            asked = "no output bound" if need is not None and need[1] is None else f"worst case {need}"
            raise LeaseError(
                403,
                f"the request ({asked if need is not None else 'not a chat request'}) is larger than the "
                f"reservation of its lease (a prompt of {r.input_tokens} tokens, an answer of {r.output_tokens})",
            )

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"recovering": self.book.recovering(time.monotonic())})

    def _route(
        self, path: str, handler: Callable[[web.Request, Identity], Awaitable[BaseModel | None]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def serve(request: web.Request) -> web.Response:
            code = 200
            try:
                reply = await handler(request, await self._identify(request))
                return web.json_response(reply.model_dump(by_alias=True) if reply is not None else {})
            except LeaseError as e:
                code = e.status
                if e.status in (401, 403):
                    log.warning(f"lease broker: refused a request to {path} from {request.remote}: {e}")
                return web.json_response({"error": str(e)}, status=e.status)
            except ApiException as e:
                code = 503  # the TokenReview failed: nothing was recorded, the worker asks again
                log.warning(f"lease broker: a TokenReview failed (HTTP {e.status} {e.reason})")
                return web.json_response({"error": f"cannot verify the token now (HTTP {e.status})"}, status=503)
            except ValidationError as e:
                code = 400
                return web.json_response({"error": str(e).splitlines()[0]}, status=400)
            except ValueError:
                code = 400
                return web.json_response({"error": "the body is not JSON"}, status=400)
            finally:
                metrics.BROKER_REQUESTS.labels(path, str(code)).inc()

        return serve

    def _check(self, ident: Identity, endpoint: str, job: str) -> None:
        if WORLD.job_index is None:
            raise LeaseError(503, "the operator is starting: its view of the admitted Jobs is not complete yet")
        expected = expected_service_account(endpoint, ident.namespace, job)
        if expected is None:
            raise LeaseError(404, f"Job {ident.namespace}/{job} is not admitted against ModelEndpoint {endpoint}")
        if ident.service_account != expected or not ident.pod.startswith(f"{job}-"[:GENERATED_PREFIX_MAX]):
            raise LeaseError(
                403,
                f"pod {ident.namespace}/{ident.pod} (ServiceAccount {ident.service_account}) is not a pod of Job {job}",
            )

    async def heartbeat(self, request: web.Request, ident: Identity) -> BaseModel:
        body = wire.Heartbeat.model_validate(await request.json())
        self._check(ident, body.endpoint, body.job)
        now = time.monotonic()
        lost = self.book.heartbeat(
            body.endpoint,
            ident.namespace,
            body.job,
            ident.pod,
            now,
            mode=body.mode,
            carried=body.carried,
            held=body.held,
            seen=body.seen,
            tokens=body.tokens,
            reserved=body.reserved,
            unstored=body.unstored,
        )
        if lost:
            log.info(f"lease broker: {ident.namespace}/{ident.pod} holds {len(lost)} leases it does not know: lost")
        self.kick(body.endpoint)
        return wire.HeartbeatReply(lost=lost)

    async def acquire(self, request: web.Request, ident: Identity) -> BaseModel:
        body = wire.Acquire.model_validate(await request.json())
        self._check(ident, body.endpoint, body.job)
        start = time.monotonic()
        w = self.book.enqueue(body.endpoint, ident.namespace, body.job, ident.pod, start, body.reserve)
        event = self.events.setdefault(w.order, asyncio.Event())
        try:
            self._grant(body.endpoint)
            try:
                await asyncio.wait_for(event.wait(), body.wait_seconds)
            except TimeoutError:
                pass
        except asyncio.CancelledError:
            # The worker hung up (the server cancels the handler): a lease granted meanwhile is not
            # received, and its call is not made.
            if w.granted is not None:
                self.book.release(ident.namespace, ident.pod, w.granted.id, wire.CallUsage())
                self.kick(body.endpoint)
            raise
        finally:
            self.events.pop(w.order, None)
            if w.granted is None:
                w.gone = True
        lease = w.granted
        if w.refused is not None and w.refused.budget is not None:
            log.info(f"lease broker: refused a model call of {ident.namespace}/{ident.pod}: {w.refused.message}")
            metrics.BUDGET_REFUSED.labels(ident.namespace).inc()
            return wire.AcquireReply(refused=wire.BudgetNote(budget=w.refused.budget, message=w.refused.message))
        if lease is None:
            note = w.note
            if note is not None and note.budget is not None:
                return wire.AcquireReply(
                    waiting=wire.BudgetNote(budget=note.budget, message=note.message, until=note.until)
                )
            return wire.AcquireReply()
        if request.transport is None or request.transport.is_closing():
            # the worker is no longer listening: the call is not made
            self.book.release(ident.namespace, ident.pod, lease.id, wire.CallUsage())
            self.kick(body.endpoint)
            return wire.AcquireReply()
        metrics.LEASE_WAIT_SECONDS.labels(body.endpoint).observe(time.monotonic() - start)
        return wire.AcquireReply(lease=lease.id, seq=lease.seq)

    async def release(self, request: web.Request, ident: Identity) -> BaseModel | None:
        body = wire.Release.model_validate(await request.json())
        s = self.book.sessions.get((ident.namespace, ident.pod))
        if self.book.release(ident.namespace, ident.pod, body.lease, body.usage) and s is not None:
            self.kick(s.endpoint)
        return None

    async def close(self, request: web.Request, ident: Identity) -> BaseModel | None:
        s = self.book.sessions.get((ident.namespace, ident.pod))
        self.book.close(ident.namespace, ident.pod, time.monotonic())
        if s is not None:
            self.kick(s.endpoint)
        return None

    # -- granting -------------------------------------------------------------------------------
    def _grant(self, endpoint: str) -> None:
        ledger = self.book.ledger
        before = {k: v[0] for k, v in ledger.waiting.items()} if ledger is not None else {}
        now = time.monotonic()
        for w in self.book.grant(endpoint, now):
            if w.granted is not None:
                metrics.LEASES_GRANTED.labels(endpoint).inc()
            self._wake(w)
        if ledger is not None:  # a ResearchJob whose call began to wait for its namespace's budget says so
            for rj, (seen, _) in ledger.waiting.items():
                if seen == now and (rj not in before or now - before[rj] >= SHORT_SECONDS):
                    WORLD.wake(rj)

    def _wake(self, w: Waiter) -> None:
        event = self.events.get(w.order)
        if event is not None:
            event.set()
        else:  # the request is gone: give the lease back
            w.gone = True
            if w.granted is not None:  # never sent: nothing was used
                self.book.release(w.session[0], w.session[1], w.granted.id, wire.CallUsage())

    def kick(self, endpoint: str) -> None:
        """Something changed at ``endpoint`` (a lease returned, a session came or went): grant now."""
        self._grant(endpoint)

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                self.tick_once()
            except Exception:  # noqa: BLE001 - the broker must outlive a bad tick; logged with its traceback
                log.exception("lease broker tick failed")

    def tick_once(self) -> None:
        if self.tls is not None and self.tls.renew_if_due(dt.datetime.now(dt.UTC)):
            log.info(f"lease broker: new serving certificate, valid until {self.tls.serving.not_after.isoformat()}")
        now = time.monotonic()
        self.book.expire(now)
        for endpoint, n in self.book.expired.items():
            if n:
                metrics.LEASES_EXPIRED.labels(endpoint).inc(n)
                log.info(f"lease broker: {n} leases of ModelEndpoint {endpoint} expired (their pods stopped)")
        self.book.expired.clear()
        if self.book.ledger is not None:
            if WORLD.job_index is not None:
                self.book.ledger.forget(WORLD.bodies)
            metrics.BUDGET_OVERRUN_TOKENS.set(self.book.ledger.overrun.tokens)
        for endpoint in {w.endpoint for w in self.book.waiters}:
            self._grant(endpoint)
        for endpoint in WORLD.endpoints:
            metrics.ENDPOINT_LEASES.labels(endpoint).set(self.book.leases_in_flight(endpoint, now))
            metrics.ENDPOINT_IN_USE.labels(endpoint).set(self.book.in_use(endpoint, now))
            metrics.ENDPOINT_LEASE_WAITING.labels(endpoint).set(self.book.waiting(endpoint))
            metrics.ENDPOINT_PODS_IN_TOUCH.labels(endpoint).set(self.book.in_touch(endpoint, now))


BROKER: Broker | None = None
_RUNNER: web.AppRunner | None = None


async def start(host: str, port: int, namespace: str = "", service: str = "", pod_ip: str = "") -> Broker:
    """Serve the broker on ``host:port`` in this event loop (kopf's startup, so the leader only), and
    point the broker's Service at this pod (in a cluster: ``service`` and ``pod_ip`` set)."""
    global BROKER, _RUNNER
    broker = Broker()
    cfg = settings()
    if cfg.lease_broker_tls:
        try:
            cert, key = await kube.broker_ca(namespace, cfg.lease_broker_ca_secret, _new_ca, service)
        except ApiException as e:
            # Without its CA the broker cannot serve TLS, and workers trust nothing else: they keep
            # to their shares, and ResearchJobs that name a ModelEndpoint cannot call it.
            log.error(
                f"lease broker: cannot read or create its CA in Secret {namespace}/{cfg.lease_broker_ca_secret} "
                f"(HTTP {e.status} {e.reason}); not serving"
            )
            return broker
        names = ["localhost", *(pki.service_names(service, namespace) if service else [])]
        ips = sorted({"127.0.0.1", *([pod_ip] if pod_ip else [])})
        broker.tls = Tls.start(pki.KeyPair(cert, key), names, ips)
        WORLD.broker_ca = cert
    # handler_cancellation: an acquire whose worker hung up (a pod killed mid-wait) stops waiting at once.
    runner = web.AppRunner(broker.app(), access_log=None, handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=broker.tls.ctx if broker.tls else None).start()
    except OSError as e:
        # The operator still works: every worker keeps to its ConfigMap share (and logs why).
        log.error(f"lease broker cannot listen on {host}:{port} ({e}); workers will use their shares only")
        await runner.cleanup()
        return broker
    broker.ticker = asyncio.create_task(broker.tick(), name="lease broker")
    BROKER, _RUNNER = broker, runner
    if service and pod_ip and _loopback(pod_ip):
        # The local development cluster: its pods are host processes whose IP is 127.0.0.1, which no
        # EndpointSlice may hold; its workers are told a loopback URL for the broker instead.
        log.info(
            f"lease broker: this pod's IP {pod_ip} is a loopback address, which an EndpointSlice cannot hold: "
            f"Service {namespace}/{service} is not pointed at it (workers reach the broker at the URL they are told)"
        )
    elif service and pod_ip:
        try:
            await kube.point_service_at(namespace, service, pod_ip, port)
            log.info(f"lease broker: Service {namespace}/{service} now leads to this pod ({pod_ip}:{port})")
        except ApiException as e:
            # Workers that cannot reach the broker keep to their shares; the operator works on.
            why = kube.server_message(e)
            log.error(
                f"lease broker: could not point Service {namespace}/{service} at this pod "
                f"(HTTP {e.status} {e.reason}{': ' + why if why else ''}); workers will use their shares until "
                "it is fixed"
            )
    log.info(
        f"lease broker listening on {host}:{port}; it grants leases after {broker.book.recovery:.0f}s "
        "(workers re-declare the leases they hold first)"
    )
    return broker


async def stop() -> None:
    global BROKER, _RUNNER
    if BROKER is not None and BROKER.ticker is not None:
        BROKER.ticker.cancel()
    if BROKER is not None and BROKER.session is not None:
        await BROKER.session.close()
    if _RUNNER is not None:
        await _RUNNER.cleanup()
    BROKER, _RUNNER = None, None


def _new_ca() -> tuple[str, str]:
    ca = pki.new_ca(dt.datetime.now(dt.UTC))
    return ca.cert_pem, ca.key_pem


def _loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def world_changed(endpoint: str) -> None:
    """Pods admitted against ``endpoint``, or its capacity, changed: what waits may fit now."""
    if BROKER is not None:
        BROKER.kick(endpoint)
