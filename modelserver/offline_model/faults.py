"""Deterministic fault injection: the Nth chat completion's fate depends only on the seed and N."""

from __future__ import annotations

import random
import re
import threading

from .config import Settings
from .errors import APIError

FAULTS = ("429", "500", "503", "hang")
# A fault of content, not of transport: a writing answer (a section, the report body, its introduction
# or conclusion) carries one invented sentence with a citation, as a model that makes up a reference does.
INVENT_CITATION = "invent-citation"
WRITING_KINDS = frozenset({"section", "report", "intro", "conclusion"})
# The invented claim: a date, numbers and names no source of a test corpus holds, so a checker that reads
# the cited passage finds it unsupported, whatever the subject.
INVENTED = "A survey in 1642 by the Royal Society recorded 317 such cases in the archives of Uppsala"


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
        self.invent_rate = settings.fault_invent_citation_rate
        self._n = 0
        self._writings = 0
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self._n = 0
            self._writings = 0

    def invents(self, kind: str, forced: str | None = None) -> bool:
        """Whether this answer of ``kind`` gets an invented citation: forced by X-Offline-Fault, or drawn
        for the Nth writing answer from (seed, N) at --fault-invent-citation-rate."""
        if kind not in WRITING_KINDS:
            return False
        if forced is not None:
            return forced == INVENT_CITATION
        if self.invent_rate <= 0:
            return False
        with self._lock:
            n = self._writings
            self._writings += 1
        return random.Random(f"{self.seed}:invent:{n}").random() < self.invent_rate

    def draw(self, forced: str | None = None) -> str | None:
        """The fault for the next request, or None. ``forced`` (from X-Offline-Fault) overrides the draw."""
        with self._lock:
            n = self._n
            self._n += 1
        if forced is not None:
            return None if forced in ("none", INVENT_CITATION) else forced
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


_CITED = re.compile(r"[^.!?\n]*?(\s*\[\d+\])+[.!?]")


def invent_citation(text: str) -> str:
    """``text`` with an invented sentence after its first cited sentence outside a heading or Sources
    list, citing what that sentence cites (a real source that does not say it). Unchanged without one."""
    offset = 0
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if stripped.startswith("#") or re.match(r"^\[\d+\]\s", stripped):
            offset += len(line)
            continue
        m = _CITED.search(line)
        if m:
            marks = "".join(re.findall(r"\[\d+\]", m.group(0)))
            at = offset + m.end()
            return f"{text[:at]} {INVENTED} {marks}.{text[at:]}"
        offset += len(line)
    return text
