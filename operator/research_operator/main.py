"""``research-operator``: serve metrics, win the leader Lease, then run the kopf handlers."""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import os
import signal
import socket

import kopf
from kubernetes import client, config
from prometheus_client import start_http_server

from research_operator.lease_broker.leader import LeaderElector
from research_operator.metrics import REGISTRY
from research_operator.registration import handlers  # noqa: F401 - registers the kopf handlers
from research_operator.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="research-operator", description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` dumps every thread's stack to stderr
    settings = Settings.from_env()
    start_http_server(settings.metrics_port, registry=REGISTRY)
    # Our own identity, also for kopf: its default asks the passwd database for the user name, which
    # fails for a numeric uid without an entry (65532 in the image and on the local node agent).
    identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    elector: LeaderElector | None = None
    if settings.leader_election:
        config.load_config()  # type: ignore[no-untyped-call]
        elector = LeaderElector(client.ApiClient(), settings.namespace, settings.lease_name, identity)
        elector.acquire()
        elector.keep_renewing()
    try:
        asyncio.run(
            kopf.operator(
                clusterwide=True,
                standalone=True,  # no kopf peering: the Lease above decides who acts
                identity=identity,  # type: ignore[arg-type]  # kopf.Identity: an unexported NewType of str
                liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz",
            )
        )
    finally:
        if elector is not None:
            elector.release()  # kopf has stopped (SIGTERM): let a standby take over at once
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
