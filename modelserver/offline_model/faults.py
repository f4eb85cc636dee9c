"""Deterministic fault injection: the Nth chat completion's fate depends only on the seed and N."""

from __future__ import annotations

import random
import threading

from .config import Settings
from .errors import APIError

FAULTS = ("429", "500", "503", "hang")


class FaultInjector:
    def __init__(self, settings: Settings) -> None:
        self.seed = settings.fault_seed
        self.rates = (
            ("429", settings.fault_429_rate),
            ("500", settings.fault_500_rate),
            ("503", settings.fault_503_rate),
            ("hang", settings.fault_hang_rate),
        )
        self.retry_after_ms = settings.retry_after_ms
        self._n = 0
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self._n = 0

    def draw(self, forced: str | None = None) -> str | None:
        """The fault for the next request, or None. ``forced`` (from X-Offline-Fault) overrides the draw."""
        with self._lock:
            n = self._n
            self._n += 1
        if forced is not None:
            return None if forced == "none" else forced
        r = random.Random(f"{self.seed}:{n}").random()
        edge = 0.0
        for fault, rate in self.rates:
            edge += rate
            if r < edge:
                return fault
        return None

    def retry_headers(self) -> dict[str, str]:
        seconds = max(1, -(-self.retry_after_ms // 1000))
        return {"retry-after": str(seconds), "retry-after-ms": str(self.retry_after_ms)}

    def error(self, fault: str) -> APIError:
        if fault == "429":
            return APIError(
                429,
                "Rate limit reached for requests (injected by the offline model server). Please try again later.",
                type="requests",
                code="rate_limit_exceeded",
                headers=self.retry_headers(),
            )
        if fault == "503":
            return APIError(
                503,
                "The server is overloaded or not ready yet (injected by the offline model server).",
                type="server_error",
                code="service_unavailable",
                headers=self.retry_headers(),
            )
        return APIError(
            500,
            "The server had an error while processing your request (injected by the offline model server).",
            type="server_error",
            code="internal_error",
        )
