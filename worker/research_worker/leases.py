"""Per-request leases of a shared model endpoint, from the operator's lease broker
(``research_api.leases``): each model call takes a lease and returns it when it ends, so the
endpoint's slots follow the calls, not the pods.

The pod keeps a session with the broker (a heartbeat every 2 s). Without the broker it falls back
to its ConfigMap share (``research_worker.share``), never to more:

- while heartbeats succeed, calls take leases (one request waits at most 25 s, then asks again);
- when no heartbeat has succeeded for a TTL, the leases are dropped and the calls holding them are
  stopped and made again later (the broker has lapsed the session by then and may have lent them);
- the pod then sends nothing for a further TTL and calls under its share, which the broker counts
  as in use for any pod whose session is not live; heartbeats resume in fallback mode, and once one
  succeeds, new calls take leases again (the calls still running under the share are declared).

No wait is unbounded: a call that gets neither a lease nor a share slot within ``MAX_SLOT_WAIT``
fails with an error that says so.

Budgets: a call's lease request carries its worst case (``wire.Reserve``), which the broker reserves
against the ResearchJob's and the namespace's budgets before it grants the lease; the release carries
what the call used (``Ticket.usage``; unknown: settled at the worst case). A call no budget can ever pay
is refused (``BudgetExceeded``, the budget exit code); one waiting for a namespace's budget waits until
its period rolls over (the broker says when), saying so in the log.

Each request carries the pod's token for the broker's audience (``broker_token``: the projected
token file, read at each request since the kubelet rotates it), never the pod's API token. Without
that file the pod cannot be served by the broker: it says so and calls under its share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import httpx

from research_api import leases as wire
from research_api.task import EndpointShareRef
from research_worker.errors import BudgetExceeded, ModelEndpointError, WorkerConfigError
from research_worker.share import ShareLimiter

log = logging.getLogger(__name__)

MAX_SLOT_WAIT = 1800.0  # a call waits at most this long for a lease or a share slot
REQUEST_TIMEOUT = 5.0  # heartbeat, release, close
RETRY_SECONDS = 1.0


# Set by the local dev cluster's node agent only (docs/node-agent.md): its pods are local processes
# without mounts, so it writes a pod's projected token files below this directory at their
# mountPath. In a real pod it is unset and the token is at its mountPath.
DEV_VOLUME_ROOT_ENV = "LOCALKUBE_VOLUME_ROOT"


def token_path() -> Path:
    root = os.environ.get(DEV_VOLUME_ROOT_ENV)
    return Path(root, wire.TOKEN_PATH.lstrip("/")) if root else Path(wire.TOKEN_PATH)


def broker_ssl(ca_pem: str) -> ssl.SSLContext:
    """A TLS client context that trusts the lease broker's own CA (from the task) and nothing else."""
    return ssl.create_default_context(cadata=ca_pem)


def broker_token() -> str:
    """This pod's current token for the lease broker (bound to its audience; rotated by the kubelet)."""
    path = token_path()
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise WorkerConfigError(
            f"no token for the lease broker at {path} ({exc.strerror or exc}): the pod needs a projected "
            f"ServiceAccount token volume for audience {wire.TOKEN_AUDIENCE} mounted at {wire.TOKEN_DIR}"
        ) from None
    if not token:
        raise WorkerConfigError(f"the lease broker token file {path} is empty")
    return token


class State(StrEnum):
    CONNECTING = "connecting"  # no heartbeat answered yet
    LEASE = "lease"
    QUIET = "quiet"  # leases dropped; waiting until the broker has surely lapsed the session
    FALLBACK = "fallback"  # calls under the ConfigMap share


class LeaseLost(Exception):
    """The lease of a call in flight was lost (the broker was unreachable for a TTL, or forgot it)."""


@dataclass
class _Hold:
    lease: str
    task: asyncio.Task[object] | None
    active: bool = True
    lost: bool = False
    reserve: wire.Reserve | None = None


@dataclass
class Ticket:
    """One call's place in flight; the caller sets ``usage`` to what the call used, when it is known
    (an answer's usage, or none at all when the endpoint refused the request), so its reservation is
    settled to it. Left None, the reservation is settled at its worst case."""

    usage: wire.CallUsage | None = None
    lease: str | None = None  # the lease it holds (None: under the share, or no broker)


class LeaseClient:
    """One per pod. ``slot()`` is where a model call waits for its lease (or, in fallback, its share)."""

    def __init__(
        self,
        ref: EndpointShareRef,
        share: ShareLimiter,
        token: Callable[[], str],
        http: httpx.AsyncClient | None = None,
        ca: str | None = None,
    ) -> None:
        assert ref.broker_url and ref.endpoint
        self.url = ref.broker_url.rstrip("/")
        self.endpoint = ref.endpoint
        self.job = ref.key
        self.share = share
        self.token = token
        self.http = http or httpx.AsyncClient(timeout=REQUEST_TIMEOUT, verify=broker_ssl(ca) if ca else True)
        self.state = State.CONNECTING
        self.changed = asyncio.Event()
        self.held: dict[str, _Hold] = {}
        self.seen = 0
        self.carried = 0  # calls in flight under the share
        self.tokens = 0  # tokens used since the last heartbeat the broker answered
        self.last_ok = float("-inf")  # when the last answered heartbeat was sent
        self.last_maybe = float("-inf")  # when the last heartbeat that may have arrived was sent
        self.last_error = ""
        self.loop_task: asyncio.Task[None] | None = None
        # What this pod's calls used that no result it stored holds yet (declared in heartbeats).
        self.unstored: Callable[[], wire.CallUsage] | None = None

    # -- the session ------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}"}

    def _set(self, state: State) -> None:
        if state != self.state:
            self.state = state
            self.changed.set()
            self.changed = asyncio.Event()

    async def start(self) -> None:
        """The first heartbeat (so the first call already knows the mode), then one every 2 s."""
        try:
            self.token()
        except WorkerConfigError as exc:
            log.error("%s; this pod calls under its share of ModelEndpoint %s only", exc, self.endpoint)
        await self._beat()
        if self.state == State.LEASE:
            await self._beat()  # declare lease mode: the broker grants only then
        else:
            self._check_lapse(time.monotonic())
        self.loop_task = asyncio.create_task(self._run(), name="lease heartbeats")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(wire.HEARTBEAT_SECONDS if self.state != State.QUIET else 0.5)
            now = time.monotonic()
            if self.state == State.QUIET:
                self._check_lapse(now)
                continue
            before = self.state
            await self._beat()
            if before != State.LEASE and self.state == State.LEASE:
                await self._beat()  # declare lease mode at once: the broker grants only then
            self._check_lapse(time.monotonic())

    async def _beat(self) -> None:
        mode = wire.Mode.LEASE if self.state == State.LEASE else wire.Mode.FALLBACK
        body = wire.Heartbeat(
            endpoint=self.endpoint,
            job=self.job,
            mode=mode,
            carried=self.carried,
            held=[lid for lid, h in self.held.items() if not h.lost],
            seen=self.seen,
            tokens=self.tokens,
            reserved={lid: h.reserve for lid, h in self.held.items() if not h.lost and h.reserve is not None},
            unstored=self.unstored() if self.unstored is not None else None,
        )
        sent = time.monotonic()
        tokens = self.tokens
        try:
            headers = self._headers()
        except WorkerConfigError as exc:
            self.last_error = str(exc)  # never sent
            return
        try:
            resp = await self.http.post(
                self.url + wire.PATH_HEARTBEAT, json=body.model_dump(by_alias=True), headers=headers
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"  # never arrived
            return
        except httpx.HTTPError as exc:
            self.last_maybe = sent  # it may have arrived
            self.last_error = f"{type(exc).__name__}: {exc}"
            return
        if resp.status_code != 200:
            if resp.status_code >= 500 and resp.status_code != 503:
                self.last_maybe = sent
            self.last_error = f"HTTP {resp.status_code}: {_error_of(resp)}"
            return
        self.last_ok = self.last_maybe = sent
        self.tokens -= tokens
        if self.state != State.LEASE:
            log.info(
                "lease broker %s answers: each model call takes a lease of ModelEndpoint %s (%d calls under the "
                "share still running)",
                self.url,
                self.endpoint,
                self.carried,
            )
            self._set(State.LEASE)
        for lid in wire.HeartbeatReply.model_validate(resp.json()).lost:
            self._lose(lid, "the broker does not know it")

    def _lose(self, lid: str, why: str) -> None:
        hold = self.held.get(lid)
        if hold is None or hold.lost:
            return
        hold.lost = True
        if hold.active and hold.task is not None:
            log.warning("lease of a model call lost (%s): stopping the call; it is made again", why)
            hold.task.cancel()

    def _check_lapse(self, now: float) -> None:
        """Drop the leases once no heartbeat succeeded for a TTL; fall back once the broker has surely
        lapsed the session (a further TTL after the last heartbeat that may have arrived)."""
        early = min(1.0, wire.SESSION_TTL_SECONDS / 4)  # before the broker's TTL ends, for the network's delay
        if self.state == State.LEASE and now - self.last_ok >= wire.SESSION_TTL_SECONDS - early:
            for lid in list(self.held):
                self._lose(lid, f"no heartbeat answered for {now - self.last_ok:.0f}s")
            log.warning(
                "lease broker %s unreachable (%s); leases dropped; calls wait %.0fs, then use this pod's share "
                "of ModelEndpoint %s (%d requests in flight, ConfigMap %s)",
                self.url,
                self.last_error,
                max(0.0, self.last_maybe + wire.SESSION_TTL_SECONDS + wire.QUIET_MARGIN_SECONDS - now),
                self.endpoint,
                self.share.concurrency,
                self.job,
            )
            self._set(State.QUIET)
        if self.state in (State.QUIET, State.CONNECTING) and (
            now >= self.last_maybe + wire.SESSION_TTL_SECONDS + wire.QUIET_MARGIN_SECONDS
        ):
            log.warning(
                "lease broker %s unreachable (%s): falling back to this pod's share of ModelEndpoint %s "
                "(%d requests in flight, from its shares ConfigMap); asking the broker again every %.0fs",
                self.url,
                self.last_error,
                self.endpoint,
                self.share.concurrency,
                wire.HEARTBEAT_SECONDS,
            )
            self._set(State.FALLBACK)

    async def close(self) -> None:
        """No more calls: end the session, so the broker lends this pod's slots at once."""
        if self.loop_task is not None:
            self.loop_task.cancel()
        if self.state == State.LEASE:
            with contextlib.suppress(httpx.HTTPError, WorkerConfigError):
                await self.http.post(self.url + wire.PATH_CLOSE, json={}, headers=self._headers())
        await self.http.aclose()

    # -- one call ---------------------------------------------------------------------------------
    def spent(self, tokens: int) -> None:
        self.tokens += max(0, tokens)

    async def _acquire(self, deadline: float, reserve: wire.Reserve | None = None) -> wire.AcquireReply | None:
        wait = min(wire.MAX_WAIT_SECONDS, max(0.1, deadline - time.monotonic()))
        body = wire.Acquire(endpoint=self.endpoint, job=self.job, wait_seconds=wait, reserve=reserve)
        try:
            resp = await self.http.post(
                self.url + wire.PATH_ACQUIRE,
                json=body.model_dump(by_alias=True),
                headers=self._headers(),
                timeout=wait + REQUEST_TIMEOUT,
            )
        except (httpx.HTTPError, WorkerConfigError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(RETRY_SECONDS)
            return None
        if resp.status_code != 200:
            self.last_error = f"HTTP {resp.status_code}: {_error_of(resp)}"
            await asyncio.sleep(RETRY_SECONDS if resp.status_code != 409 else 0.2)
            return None
        reply = wire.AcquireReply.model_validate(resp.json())
        if reply.lease is not None:
            self.seen = max(self.seen, reply.seq)
        return reply

    async def _release(self, lid: str, usage: wire.CallUsage | None = None) -> None:
        self.held.pop(lid, None)  # not held: a later heartbeat tells the broker, if this is lost
        with contextlib.suppress(httpx.HTTPError, WorkerConfigError):
            await self.http.post(
                self.url + wire.PATH_RELEASE,
                json=wire.Release(lease=lid, usage=usage).model_dump(by_alias=True),
                headers=self._headers(),
            )

    @contextlib.asynccontextmanager
    async def slot(self, reserve: wire.Reserve | None = None) -> AsyncIterator[Ticket]:
        """A place in flight for one call: a lease (for which the broker reserves ``reserve``, the
        call's worst case, against its budgets), or in fallback a slot of the share. Raises
        ``LeaseLost`` from the call when its lease is lost (the caller makes the call again) and
        ``BudgetExceeded`` when no budget of the call can ever pay it."""
        deadline = time.monotonic() + MAX_SLOT_WAIT
        said = ""
        ticket = Ticket()
        while True:
            if time.monotonic() > deadline:
                raise ModelEndpointError(
                    f"no request slot at ModelEndpoint {self.endpoint} within {MAX_SLOT_WAIT:.0f}s "
                    f"(lease broker {self.url}, state {self.state.value}: {self.last_error or 'busy'})"
                )
            if self.state == State.FALLBACK:
                async with self.share.slot():
                    self.carried += 1
                    try:
                        yield ticket
                    finally:
                        self.carried -= 1
                return
            if self.state == State.LEASE:
                reply = await self._acquire(deadline, reserve)
                if reply is not None and reply.refused is not None:
                    raise BudgetExceeded(reply.refused.message)
                if reply is not None and reply.waiting is not None and reply.waiting.message != said:
                    said = reply.waiting.message
                    log.info("a model call waits for a budget: %s", said)
                    if reply.waiting.until is not None:  # a namespace's period: it ends then
                        deadline = max(deadline, time.monotonic() + reply.waiting.until + MAX_SLOT_WAIT)
                lid = reply.lease if reply is not None else None
                if lid is None:
                    continue
                if self.state != State.LEASE:  # dropped while the answer was on its way
                    await self._release(lid)
                    continue
                hold = _Hold(lid, asyncio.current_task(), reserve=reserve)
                self.held[lid] = hold
                ticket.lease = lid
                try:
                    yield ticket
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if hold.lost and task is not None:
                        task.uncancel()
                        raise LeaseLost(f"the lease of ModelEndpoint {self.endpoint} was lost") from None
                    raise
                finally:
                    hold.active = False
                    await self._release(lid, ticket.usage)
                return
            changed = self.changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), max(0.1, deadline - time.monotonic()))


def _error_of(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("error"))[:300]
    except ValueError:
        return resp.text[:300]
