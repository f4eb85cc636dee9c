"""The lease broker's TLS: its CA and serving certificates (research_operator.lease_broker.pki), and a worker's
lease client that trusts only that CA, against the real broker served over TLS on loopback."""

from __future__ import annotations

import datetime as dt
import ssl

import httpx
import pytest
from aiohttp import web
from cryptography import x509

from research_api import leases as wire
from research_api.task import EndpointShareRef
from research_operator.decisions.lease_book import PodRef
from research_operator.lease_broker import pki
from research_operator.lease_broker.broker import Authenticator, Broker, Tls
from research_worker.leases import LeaseClient, State, broker_ssl
from research_worker.share import ShareLimiter
from tests.test_leases_unit import api_server, book, token

NOW = dt.datetime(2026, 12, 6, 12, 0, tzinfo=dt.UTC)


def test_serving_certificates_name_the_service_and_pod_and_are_renewed_before_they_expire() -> None:
    ca = pki.new_ca(NOW)
    names = pki.service_names("ro-leases", "ops")
    serving = pki.issue_serving(ca, names, ["10.244.0.7", "127.0.0.1"], NOW)
    cert = x509.load_pem_x509_certificate(serving.cert_pem.encode())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {
        "ro-leases", "ro-leases.ops", "ro-leases.ops.svc", "ro-leases.ops.svc.cluster.local",
    }  # fmt: skip
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"10.244.0.7", "127.0.0.1"}
    assert cert.issuer == x509.load_pem_x509_certificate(ca.cert_pem.encode()).subject
    assert serving.not_after - NOW <= pki.SERVING_VALIDITY  # days, not years
    assert not pki.needs_renewal(serving, NOW)
    assert pki.needs_renewal(serving, NOW + pki.SERVING_VALIDITY - pki.RENEW_WHEN_LEFT + dt.timedelta(minutes=1))


async def test_a_worker_trusting_the_brokers_ca_takes_leases_over_tls_and_one_trusting_another_does_not() -> None:
    ca = pki.new_ca(dt.datetime.now(dt.UTC))
    ctx = Tls.start(ca, ["localhost"], ["127.0.0.1"]).ctx
    broker = Broker(book([PodRef("ns", "a", "a-b0", 1)], capacity=2), Authenticator(api_server()))
    broker._check = lambda ident, endpoint, job: None  # type: ignore[method-assign]  # the world is the test's
    runner = web.AppRunner(broker.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    url = f"https://127.0.0.1:{list(runner.addresses)[0][1]}"
    ref = EndpointShareRef(configMap="cm", key="a-b0", concurrency=1, brokerUrl=url, endpoint="ep")
    try:
        trusting = LeaseClient(ref, ShareLimiter(1, None, None), lambda: token(), ca=ca.cert_pem)
        await trusting.start()
        assert trusting.state == State.LEASE
        await trusting.close()
        # Plain HTTP to the TLS port, or a client trusting another CA, never gets a lease.
        other = pki.new_ca(dt.datetime.now(dt.UTC))
        async with httpx.AsyncClient(verify=broker_ssl(other.cert_pem)) as http:
            with pytest.raises(httpx.ConnectError):
                await http.post(url + wire.PATH_HEARTBEAT, json={}, headers={"Authorization": f"Bearer {token()}"})
        assert isinstance(broker_ssl(ca.cert_pem), ssl.SSLContext)
    finally:
        await runner.cleanup()


def test_the_broker_renews_its_serving_certificate_from_the_same_ca() -> None:
    now = dt.datetime.now(dt.UTC)
    ca = pki.new_ca(now)
    tls = Tls.start(ca, ["localhost"], ["127.0.0.1"])
    first = tls.serving
    assert not tls.renew_if_due(now)
    later = now + pki.SERVING_VALIDITY - pki.RENEW_WHEN_LEFT + dt.timedelta(hours=1)
    assert tls.renew_if_due(later)
    assert tls.serving != first and tls.serving.not_after > first.not_after
    issuer = x509.load_pem_x509_certificate(tls.serving.cert_pem.encode()).issuer
    assert issuer == x509.load_pem_x509_certificate(ca.cert_pem.encode()).subject
