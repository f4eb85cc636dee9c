"""This pod's share of a shared model endpoint: requests in flight, requests and tokens per minute,
all changeable while requests run. The operator keeps the current share in a ConfigMap of the job's
namespace (see ``research_api.task.EndpointShareRef``); ``follow`` polls it through the API the
ConfigMap store already uses (the worker's Role allows ``get`` on ConfigMaps, nothing more).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

from research_api.task import SHARES_KEY, EndpointShareRef, EndpointShares
from research_worker.errors import WorkerError

log = logging.getLogger(__name__)

TOKEN_BURST_SECONDS = 10.0  # a token bucket holds at most this many seconds of its rate


class _Bucket:
    """A token bucket refilled at ``per_minute / 60`` per second (None: unlimited)."""

    def __init__(self, per_minute: int | None, burst_seconds: float) -> None:
        self.burst_seconds = burst_seconds
        self.per_minute: int | None = None
        self.level = 0.0
        self.stamp = time.monotonic()
        self.set(per_minute)

    @property
    def capacity(self) -> float:
        return max(1.0, (self.per_minute or 0) / 60 * self.burst_seconds)

    def set(self, per_minute: int | None) -> None:
        self._refill()
        first = self.per_minute is None
        self.per_minute = per_minute
        if first:
            self.level = self.capacity
        self.level = min(self.level, self.capacity)

    def _refill(self) -> None:
        now = time.monotonic()
        if self.per_minute:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.per_minute / 60)
        self.stamp = now

    def wait_seconds(self, need: float) -> float:
        """0 when ``need`` is available now, else how long until it is."""
        if self.per_minute is None:
            return 0.0
        if self.per_minute == 0:
            return 1.0
        self._refill()
        return 0.0 if self.level >= need else (need - self.level) * 60 / self.per_minute

    def take(self, amount: float) -> None:
        if self.per_minute is not None:
            self._refill()
            self.level -= amount


class ShareLimiter:
    """Bounds what this pod sends to the endpoint; ``update`` applies a new share to requests that
    have not started yet (a lower concurrency lets the running ones finish)."""

    def __init__(self, concurrency: int, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        self.concurrency = concurrency
        self.in_flight = 0
        self._cond = asyncio.Condition()
        self._requests = _Bucket(requests_per_minute, 1.0)
        self._tokens = _Bucket(tokens_per_minute, TOKEN_BURST_SECONDS)

    async def update(self, concurrency: int, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        changed = (concurrency, requests_per_minute, tokens_per_minute) != (
            self.concurrency,
            self._requests.per_minute,
            self._tokens.per_minute,
        )
        if not changed:
            return
        log.info(
            "endpoint share: %d requests in flight, %s requests/min, %s tokens/min",
            concurrency,
            requests_per_minute,
            tokens_per_minute,
        )
        async with self._cond:
            self.concurrency = concurrency
            self._requests.set(requests_per_minute)
            self._tokens.set(tokens_per_minute)
            self._cond.notify_all()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """One request: wait for the rate buckets and a free place in flight."""
        while True:
            wait = max(self._requests.wait_seconds(1), self._tokens.wait_seconds(1))
            if wait <= 0:
                break
            await asyncio.sleep(min(wait, 1.0))
        self._requests.take(1)
        async with self._cond:
            await self._cond.wait_for(lambda: self.in_flight < self.concurrency)
            self.in_flight += 1
        try:
            yield
        finally:
            async with self._cond:
                self.in_flight -= 1
                self._cond.notify_all()

    def spent(self, tokens: int) -> None:
        """Tokens a finished request used (the bucket may go below zero: later requests wait)."""
        self._tokens.take(tokens)


def parse_share(data: Mapping[str, str], key: str) -> tuple[int, int | None, int | None] | None:
    """This Job's entry of the shares ConfigMap's data, or None when it has none (yet)."""
    try:
        entry = EndpointShares.model_validate_json(data.get(SHARES_KEY) or "{}").jobs.get(key)
    except ValueError:  # pydantic's ValidationError: not (yet) what the operator writes
        return None
    return None if entry is None else (entry.concurrency, entry.requests_per_minute, entry.tokens_per_minute)


PAUSED_POLL_SECONDS = 0.5  # a paused pod (share 0) looks more often: its share is idle until it sees it


async def follow(limiter: ShareLimiter, ref: EndpointShareRef, load: Callable[[str], Mapping[str, str]]) -> None:
    """Poll the shares ConfigMap and apply this pod's current share, until cancelled."""
    first = True
    while True:
        if not first:
            paused = limiter.concurrency <= 0
            await asyncio.sleep(min(PAUSED_POLL_SECONDS, ref.poll_seconds) if paused else ref.poll_seconds)
        first = False
        try:
            data = await asyncio.to_thread(load, ref.config_map)
        except WorkerError as exc:
            log.debug("endpoint share not readable now: %s", exc)
            continue
        share = parse_share(data, ref.key)
        if share is not None:
            await limiter.update(*share)
