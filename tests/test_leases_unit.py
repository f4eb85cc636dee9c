"""The lease broker's book (pure) and the worker's lease client against the real broker server
(aiohttp on loopback; only the TokenReview is answered by the test)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from kubernetes.client.exceptions import ApiException

from localkube.controlplane import free_port
from research_api import leases as wire
from research_api.task import EndpointShareRef
from research_operator.decisions.lease_book import Book, LeaseError, Limits, PodRef
from research_operator.decisions.manifests import broker_endpoint_slice
from research_operator.lease_broker import broker as broker_module
from research_operator.lease_broker.broker import Authenticator, Broker
from research_worker.errors import WorkerConfigError
from research_worker.leases import DEV_VOLUME_ROOT_ENV, LeaseClient, LeaseLost, State, broker_token
from research_worker.share import ShareLimiter
from tests.fixtures.inflight import peak_in_flight

TTL = wire.SESSION_TTL_SECONDS


def book(pods: list[PodRef], capacity: int = 4, rpm: int | None = None, started: float = -100.0) -> Book:
    return Book(lambda e: pods, lambda e: Limits(capacity, rpm) if e == "ep" else None, started=started)


def beat(b: Book, job: str, pod: str, now: float, held: list[str] | None = None, **kw: Any) -> list[str]:
    return b.heartbeat(
        "ep", "ns", job, pod, now, mode=kw.pop("mode", wire.Mode.LEASE), carried=0, held=held or [], seen=0, **kw
    )


def take(b: Book, job: str, pod: str, now: float) -> str | None:
    w = b.enqueue("ep", "ns", job, pod, now)
    b.grant("ep", now)
    w.gone = w.granted is None  # the request is answered "none yet" (the worker asks again)
    return w.granted.id if w.granted else None


def test_leases_and_the_shares_of_pods_without_a_session_never_exceed_the_capacity() -> None:
    pods = [PodRef("ns", "a", "a-b0", 2), PodRef("ns", "b", "b-b0", 2)]
    b = book(pods, capacity=4)
    beat(b, "a-b0", "a-b0-x", 0.0)
    # b-b0's pod has no session: it may be calling under its share of 2, so only 2 are lent
    got = [take(b, "a-b0", "a-b0-x", 0.0) for _ in range(4)]
    assert sum(g is not None for g in got) == 2
    assert b.in_use("ep", 0.0) == 4
    beat(b, "b-b0", "b-b0-y", 0.1)  # once it is in touch, its idle share is lent
    assert take(b, "a-b0", "a-b0-x", 0.2) is not None
    assert b.in_use("ep", 0.2) == 3


def test_a_dead_pods_leases_lapse_and_its_share_counts_until_the_job_ends() -> None:
    pods = [PodRef("ns", "a", "a-b0", 1), PodRef("ns", "b", "b-b0", 1)]
    b = book(pods, capacity=2)
    beat(b, "a-b0", "a-b0-x", 0.0)
    beat(b, "b-b0", "b-b0-y", 0.0)
    assert take(b, "a-b0", "a-b0-x", 0.0) and take(b, "a-b0", "a-b0-x", 0.0)
    assert take(b, "b-b0", "b-b0-y", 0.0) is None  # full
    beat(b, "b-b0", "b-b0-y", TTL + 1)  # a-b0's pod died holding 2 leases; b-b0 lives on
    b.expire(TTL + 1)
    assert b.expired == {"ep": 2} and b.leases_in_flight("ep", TTL + 1) == 0
    assert b.in_use("ep", TTL + 1) == 1  # a-b0 (retried pod not yet in touch) counted by its share
    assert take(b, "b-b0", "b-b0-y", TTL + 1) is not None


def test_a_starting_broker_grants_nothing_until_live_workers_redeclared_their_leases() -> None:
    pods = [PodRef("ns", "a", "a-b0", 0), PodRef("ns", "b", "b-b0", 0)]
    b = book(pods, capacity=2, started=0.0)
    assert b.recovering(1.0)
    assert beat(b, "a-b0", "a-b0-x", 1.0, held=["old1", "old2"]) == []  # re-declared
    beat(b, "b-b0", "b-b0-y", 1.0)
    assert take(b, "b-b0", "b-b0-y", 1.0) is None
    after = b.recovery + 0.1
    t = 1.0
    while t < after:  # heartbeats every 2 s
        t = min(after, t + wire.HEARTBEAT_SECONDS)
        beat(b, "a-b0", "a-b0-x", t, held=["old1", "old2"])
        beat(b, "b-b0", "b-b0-y", t)
    assert b.grant("ep", after) == []  # the two re-declared leases fill it
    assert beat(b, "a-b0", "a-b0-x", after, held=["old1", "old2", "unknown"]) == ["unknown"]


def test_a_grant_on_its_way_survives_a_heartbeat_that_does_not_list_it_yet() -> None:
    b = book([PodRef("ns", "a", "a-b0", 0)], capacity=2, started=0.0)
    after = b.recovery + 1
    b.heartbeat(
        "ep", "ns", "a-b0", "a-b0-x", 1.0, mode=wire.Mode.LEASE, carried=0, held=[], seen=15
    )  # restarted broker
    b.heartbeat("ep", "ns", "a-b0", "a-b0-x", after - 1, mode=wire.Mode.LEASE, carried=0, held=[], seen=15)
    lease = take(b, "a-b0", "a-b0-x", after)
    assert lease is not None
    # The worker's heartbeat was sent before the grant reached it: the lease is kept.
    b.heartbeat("ep", "ns", "a-b0", "a-b0-x", after, mode=wire.Mode.LEASE, carried=0, held=[], seen=15)
    assert b.leases_in_flight("ep", after) == 1
    # Once the worker has seen it and no longer holds it (its release was lost), it is dropped.
    b.heartbeat("ep", "ns", "a-b0", "a-b0-x", after, mode=wire.Mode.LEASE, carried=0, held=[], seen=16)
    assert b.leases_in_flight("ep", after) == 0


def test_waiting_calls_go_to_the_researchjob_holding_fewest() -> None:
    pods = [PodRef("ns", "big", "big-b0", 0), PodRef("ns", "big", "big-b1", 0), PodRef("ns", "small", "small-b0", 0)]
    b = book(pods, capacity=3)
    for job in ("big-b0", "big-b1", "small-b0"):
        beat(b, job, f"{job}-p", 0.0)
    assert take(b, "big-b0", "big-b0-p", 0.0) and take(b, "big-b1", "big-b1-p", 0.0)
    first = b.enqueue("ep", "ns", "big-b0", "big-b0-p", 1.0)  # waited longer, but big holds 2
    second = b.enqueue("ep", "ns", "small-b0", "small-b0-p", 2.0)
    b.grant("ep", 2.0)
    assert second.granted is not None and first.granted is None


def test_requests_per_minute_bound_the_grants() -> None:
    b = book([PodRef("ns", "a", "a-b0", 0)], capacity=100, rpm=60)  # one per second, burst 1
    beat(b, "a-b0", "a-b0-x", 0.0)
    assert take(b, "a-b0", "a-b0-x", 0.0) is not None
    waiting = b.enqueue("ep", "ns", "a-b0", "a-b0-x", 0.5)
    assert b.grant("ep", 0.5) == []
    assert b.grant("ep", 1.1) == [waiting]  # a second after the first


def test_a_closed_session_counts_nothing_then_its_share_again() -> None:
    b = book([PodRef("ns", "a", "a-b0", 3)], capacity=3)
    beat(b, "a-b0", "a-b0-x", 0.0)
    b.close("ns", "a-b0-x", 1.0)
    assert b.in_use("ep", 1.0) == 0
    assert b.in_use("ep", 1.0 + TTL + 1) == 3  # a retried pod could be under its share by then


def test_refusals() -> None:
    b = book([PodRef("ns", "a", "a-b0", 1)])
    with pytest.raises(LeaseError) as e:
        beat(b, "other", "other-x", 0.0)
    assert e.value.status == 404
    with pytest.raises(LeaseError) as e:
        b.enqueue("ep", "ns", "a-b0", "a-b0-x", 0.0)  # no session yet
    assert e.value.status == 409


# ------------------------------------------------------------------------------------------
# the worker's client against the broker server
# ------------------------------------------------------------------------------------------


class Served:
    def __init__(self, broker: Broker, runner: web.AppRunner, url: str) -> None:
        self.broker, self.runner, self.url = broker, runner, url


API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"  # a pod's ordinary API token


def token(pod: str = "a-b0-x", audience: str = wire.TOKEN_AUDIENCE) -> str:
    return f"ns/sa/{pod}/{audience}"  # what the test's TokenReview reads back


def api_server(ignores_audiences: bool = False) -> Any:
    """A TokenReview answered as the API server does: a token is authenticated only for the audiences
    it is bound to, which the status lists (``ignores_audiences``: an authenticator that does not
    check the review's audiences, so the broker must check ``status.audiences`` itself)."""

    async def review(tok: str, audiences: list[str]) -> dict[str, Any]:
        ns, sa, pod, bound = tok.split("/", 3)
        if bound not in audiences and not ignores_audiences:
            return {
                "authenticated": False,
                "error": f'[invalid bearer token, token audiences ["{bound}"] is invalid for the target audiences '
                f"{audiences}]",
            }
        return {
            "authenticated": True,
            "audiences": [bound],
            "user": {
                "username": f"system:serviceaccount:{ns}:{sa}",
                "extra": {"authentication.kubernetes.io/pod-name": [pod]},
            },
        }

    return review


async def serve(b: Book, port: int = 0, review: Any = None) -> Served:
    broker = Broker(b, Authenticator(review or api_server()))
    broker._check = lambda ident, endpoint, job: None  # type: ignore[method-assign]  # the world is the test's
    runner = web.AppRunner(broker.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    sock = list(runner.addresses)[0]
    return Served(broker, runner, f"http://127.0.0.1:{sock[1]}")


@contextlib.asynccontextmanager
async def served() -> AsyncIterator[Served]:
    s = await serve(book([PodRef("ns", "a", "a-b0", 1)], capacity=2))
    try:
        yield s
    finally:
        await s.runner.cleanup()


def client(url: str, share: int = 1) -> LeaseClient:
    ref = EndpointShareRef(configMap="cm", key="a-b0", concurrency=share, brokerUrl=url, endpoint="ep")
    return LeaseClient(ref, ShareLimiter(share, None, None), lambda: token())


async def test_calls_take_leases_and_never_more_than_the_capacity() -> None:
    async with served() as s:
        await _calls_take_leases(s)


async def _calls_take_leases(served: Served) -> None:
    c = client(served.url)
    await c.start()
    assert c.state == State.LEASE
    peak = await peak_in_flight(c.slot, 10, 0.05)
    assert peak == 2  # the capacity, above the pod's share of 1: its peers' idle slots are lent
    assert served.broker.book.leases_in_flight("ep", 0.0) == 0
    await c.close()


async def test_an_unreachable_broker_falls_back_to_the_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "SESSION_TTL_SECONDS", 0.6)
    monkeypatch.setattr(wire, "QUIET_MARGIN_SECONDS", 0.2)
    c = client("http://127.0.0.1:9", share=1)  # nothing listens: connection refused
    await c.start()
    assert c.state == State.FALLBACK  # nothing ever arrived: its share is counted by the broker already
    assert await peak_in_flight(c.slot, 4, 0.02) == 1
    await c.close()


async def test_a_lost_lease_stops_its_call() -> None:
    async with served() as s:
        c = client(s.url)
        await c.start()
        with pytest.raises(LeaseLost):
            async with c.slot():
                lid = next(iter(c.held))
                c._lose(lid, "test")
                await asyncio.sleep(5)
        assert s.broker.book.leases_in_flight("ep", 0.0) == 0  # given back
        await c.close()


async def test_a_broker_gone_mid_call_stops_the_call_then_the_share_then_leases_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(wire, "SESSION_TTL_SECONDS", 0.8)
    monkeypatch.setattr(wire, "HEARTBEAT_SECONDS", 0.1)
    monkeypatch.setattr(wire, "QUIET_MARGIN_SECONDS", 0.2)
    b = Book(lambda e: [PodRef("ns", "a", "a-b0", 1)], lambda e: Limits(2), started=-100.0, ttl=0.8, recovery=0.0)
    s = await serve(b)
    port = int(s.url.rsplit(":", 1)[1])
    c = client(s.url)
    await c.start()
    assert c.state == State.LEASE
    with pytest.raises(LeaseLost):
        async with c.slot():
            await s.runner.cleanup()  # the broker goes away while the call holds its lease
            await asyncio.sleep(5)  # the call is stopped once no heartbeat was answered for a TTL
    assert c.state == State.QUIET  # no call until the broker has surely lapsed the session
    async with c.slot():  # then under the share
        assert c.state == State.FALLBACK and c.carried == 1
        s2 = await serve(Book(lambda e: [PodRef("ns", "a", "a-b0", 1)], lambda e: Limits(2), started=-100.0), port)
        for _ in range(50):
            if c.state == State.LEASE:
                break
            await asyncio.sleep(0.1)
        assert c.state == State.LEASE  # back to leases; the call under the share is declared
        session = next(iter(s2.broker.book.sessions.values()))
        assert session.carried == 1
    async with c.slot():
        assert len(c.held) == 1
    await c.close()
    await s2.runner.cleanup()


@pytest.mark.parametrize("ignores_audiences", [False, True])
async def test_the_pods_api_token_is_refused(ignores_audiences: bool, caplog: pytest.LogCaptureFixture) -> None:
    """Only a token bound to the broker's audience is accepted: the pod's API-server token (a real
    credential for the Kubernetes API) is refused with 401, and the log says why without the token."""
    s = await serve(book([PodRef("ns", "a", "a-b0", 1)], capacity=2), review=api_server(ignores_audiences))
    body = wire.Heartbeat(endpoint="ep", job="a-b0", mode=wire.Mode.LEASE).model_dump(by_alias=True)
    api_token = token(audience=API_AUDIENCE)
    try:
        async with httpx.AsyncClient() as http:
            with caplog.at_level(logging.WARNING, logger="research_operator.lease_broker.broker"):
                refused = await http.post(
                    s.url + wire.PATH_HEARTBEAT, json=body, headers={"Authorization": f"Bearer {api_token}"}
                )
            accepted = await http.post(
                s.url + wire.PATH_HEARTBEAT, json=body, headers={"Authorization": f"Bearer {token()}"}
            )
    finally:
        await s.runner.cleanup()
    assert refused.status_code == 401
    assert wire.TOKEN_AUDIENCE in refused.json()["error"]
    assert accepted.status_code == 200
    assert s.broker.book.sessions.keys() == {("ns", "a-b0-x")}  # only the accepted one has a session
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert lines and wire.TOKEN_AUDIENCE in lines[0]
    assert api_token not in caplog.text


async def test_the_worker_reads_its_broker_token_from_the_projected_file_at_each_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DEV_VOLUME_ROOT_ENV, str(tmp_path))
    path = tmp_path / wire.TOKEN_PATH.lstrip("/")
    with pytest.raises(WorkerConfigError) as e:
        broker_token()
    assert str(path) in str(e.value) and wire.TOKEN_AUDIENCE in str(e.value)
    path.parent.mkdir(parents=True)
    path.write_text(token(pod="a-b0-old") + "\n")
    assert broker_token() == token(pod="a-b0-old")
    path.write_text(token())  # the kubelet rotated it
    assert broker_token() == token()
    async with served() as s:
        ref = EndpointShareRef(configMap="cm", key="a-b0", concurrency=1, brokerUrl=s.url, endpoint="ep")
        c = LeaseClient(ref, ShareLimiter(1, None, None), broker_token)
        await c.start()
        assert c.state == State.LEASE
        assert s.broker.book.sessions.keys() == {("ns", "a-b0-x")}
        await c.close()


async def test_without_its_broker_token_a_worker_says_so_and_calls_under_its_share(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(DEV_VOLUME_ROOT_ENV, str(tmp_path))  # no token file there
    monkeypatch.setattr(wire, "SESSION_TTL_SECONDS", 0.6)
    monkeypatch.setattr(wire, "QUIET_MARGIN_SECONDS", 0.2)
    async with served() as s:
        ref = EndpointShareRef(configMap="cm", key="a-b0", concurrency=1, brokerUrl=s.url, endpoint="ep")
        c = LeaseClient(ref, ShareLimiter(1, None, None), broker_token)
        with caplog.at_level(logging.WARNING, logger="research_worker.leases"):
            await c.start()
        assert c.state == State.FALLBACK
        assert not s.broker.book.sessions  # nothing was sent without the token
        async with c.slot():
            assert c.carried == 1
        await c.close()
    assert "no token for the lease broker" in caplog.text and wire.TOKEN_AUDIENCE in caplog.text


def test_the_broker_services_slice_is_the_leaders_address_owned_by_the_service() -> None:
    """Owned by the Service, so the garbage collector deletes it with the Service (helm uninstall)."""
    s = broker_endpoint_slice("ops", "ro-leases", "uid-1", "10.1.2.3", 8090)
    assert s["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Service", "name": "ro-leases", "uid": "uid-1"}
    ]
    assert s["metadata"]["labels"]["kubernetes.io/service-name"] == "ro-leases"
    assert (s["addressType"], s["endpoints"][0]["addresses"], s["ports"][0]["port"]) == ("IPv4", ["10.1.2.3"], 8090)
    assert broker_endpoint_slice("ops", "ro-leases", "uid-1", "fd00::7", 8090)["addressType"] == "IPv6"


@pytest.mark.parametrize(
    ("pod_ip", "refusal", "pointed", "logged"),
    [
        ("10.1.2.3", None, True, "now leads to this pod (10.1.2.3:"),
        ("127.0.0.1", None, False, "127.0.0.1 is a loopback address, which an EndpointSlice cannot hold"),
        ("10.1.2.3", '{"message": "endpoints[0].addresses[0]: Invalid value"}', True, "422 Unprocessable Entity: "
         "endpoints[0].addresses[0]: Invalid value); workers will use their shares"),
    ],
    ids=["pod-ip", "loopback", "refused"],
)  # fmt: skip
async def test_the_leader_points_the_brokers_service_at_itself(
    pod_ip: str,
    refusal: str | None,
    pointed: bool,
    logged: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The local cluster's pods have IP 127.0.0.1, which the API server refuses in an EndpointSlice:
    the leader says so instead of failing; any other refusal is logged with the API server's words."""
    calls: list[tuple[str, str, str, int]] = []

    async def point(namespace: str, service: str, ip: str, port: int) -> None:
        calls.append((namespace, service, ip, port))
        if refusal is not None:
            e = ApiException(status=422, reason="Unprocessable Entity")
            e.body = refusal
            raise e

    monkeypatch.setattr(broker_module.kube, "point_service_at", point)
    port = free_port()
    with caplog.at_level(logging.INFO, logger="research_operator.lease_broker.broker"):
        await broker_module.start("127.0.0.1", port, "ops", "ro-leases", pod_ip)
    try:
        assert calls == ([("ops", "ro-leases", pod_ip, port)] if pointed else [])
        assert logged in caplog.text
        async with httpx.AsyncClient() as http:  # it serves in every case
            assert (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
    finally:
        await broker_module.stop()
