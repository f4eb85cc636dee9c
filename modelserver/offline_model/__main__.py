"""Entry point: ``python -m offline_model`` / ``research-modelserver``.

Flags and ``MODELSERVER_*`` environment variables are listed by ``--help``. Logs go to stderr; SIGTERM and
SIGINT stop the server cleanly (in-flight requests get a few seconds to finish).
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType

import uvicorn

from .app import create_app
from .config import settings_from


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = settings_from(argv)
    except ValueError as exc:
        print(f"research-modelserver: {exc}", file=sys.stderr)
        return 2
    level = settings.log_level.upper()
    logging.basicConfig(stream=sys.stderr, level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("offline_model")
    log.info(
        "serving %s on http://%s:%d (latency ttft=%sms token=%sms, max concurrency %d, api key %s)",
        ", ".join(settings.served_models), settings.host, settings.port, settings.ttft_ms, settings.token_ms,
        settings.max_concurrency, "required" if settings.api_key else "not required",
    )
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=settings.log_level.lower() == "debug",
        timeout_graceful_shutdown=3,
        log_config=None,
    )
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal for the previous handler:
    # make that handler a clean exit, as a container entry point should
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    uvicorn.Server(config).run()
    log.info("stopped")
    return 0


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    sys.exit(main())
