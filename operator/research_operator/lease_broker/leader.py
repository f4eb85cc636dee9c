"""Leader election with a coordination.k8s.io Lease, so two replicas never both act.

The standby blocks in ``acquire`` until the Lease is free or expired. The leader renews it in a
thread; if it cannot renew before the Lease would expire, it exits the process at once (crash-only:
the Deployment restarts it as a standby) rather than risk two active operators.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time

from kubernetes import client
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class LeaderElector:
    def __init__(
        self, api: client.ApiClient, namespace: str, name: str, identity: str, lease_seconds: int = 15
    ) -> None:
        self.coord = client.CoordinationV1Api(api)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_seconds = lease_seconds
        self.stopping = threading.Event()

    def _try(self) -> bool:
        now = _now()
        try:
            lease = self.coord.read_namespaced_lease(self.name, self.namespace)
        except ApiException as e:
            if e.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=client.V1LeaseSpec(
                    holder_identity=self.identity,
                    lease_duration_seconds=self.lease_seconds,
                    acquire_time=now,
                    renew_time=now,
                    lease_transitions=0,
                ),
            )
            try:
                self.coord.create_namespaced_lease(self.namespace, body)
                return True
            except ApiException as e2:
                if e2.status == 409:
                    return False
                raise
        if lease.spec is None:
            lease.spec = client.V1LeaseSpec()
        spec = lease.spec
        held_by_other = spec.holder_identity not in (None, "", self.identity)
        renew = spec.renew_time or spec.acquire_time
        expired = renew is None or renew + dt.timedelta(seconds=spec.lease_duration_seconds or 0) < now
        if held_by_other and not expired:
            return False
        if spec.holder_identity != self.identity:
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
            spec.acquire_time = now
        spec.holder_identity = self.identity
        spec.lease_duration_seconds = self.lease_seconds
        spec.renew_time = now
        try:
            # resourceVersion in the body makes this a compare-and-swap: a racing replica gets 409.
            self.coord.replace_namespaced_lease(self.name, self.namespace, lease)
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            raise

    def acquire(self) -> None:
        while True:
            try:
                if self._try():
                    log.info("acquired leadership (Lease %s/%s) as %s", self.namespace, self.name, self.identity)
                    return
            except ApiException as e:
                log.warning("leader election: API error %s", e.status)
            time.sleep(2)

    def keep_renewing(self) -> threading.Thread:
        def loop() -> None:
            last_ok = time.monotonic()
            while not self.stopping.wait(self.lease_seconds / 3):
                try:
                    if self._try():
                        last_ok = time.monotonic()
                        continue
                    log.error("lost leadership to another replica; exiting")
                except Exception as e:  # noqa: BLE001 - any failure counts as a missed renewal
                    log.warning("lease renewal failed: %s", e)
                    if time.monotonic() - last_ok < self.lease_seconds * 2 / 3:
                        continue
                    log.error("could not renew the Lease in time; exiting")
                os._exit(1)

        t = threading.Thread(target=loop, name="lease-renewal", daemon=True)
        t.start()
        return t

    def release(self) -> None:
        """On a graceful exit, hand the Lease over at once instead of letting it expire."""
        self.stopping.set()
        try:
            lease = self.coord.read_namespaced_lease(self.name, self.namespace)
            if lease.spec is None or lease.spec.holder_identity != self.identity:
                return
            lease.spec.holder_identity = None
            lease.spec.lease_duration_seconds = 1
            lease.spec.renew_time = _now()
            self.coord.replace_namespaced_lease(self.name, self.namespace, lease)
            log.info("released leadership (Lease %s/%s)", self.namespace, self.name)
        except ApiException as e:
            log.warning("could not release the Lease: API error %s", e.status)
