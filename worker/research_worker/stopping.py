"""Stopping on SIGTERM (preemption, eviction, scale-down, a pod delete) within the grace period.

The kubelet sends SIGTERM, waits the pod's ``terminationGracePeriodSeconds`` and then SIGKILLs. A
Python program that is a container's pid 1 ignores SIGTERM unless it handles it (the kernel
delivers only handled signals to a pid namespace's init), so without a handler every stop costs
the whole grace period and ends in SIGKILL, which may cut a store write in half.

With the handler the worker stops calling the model: no new call starts. The calls in flight are
cancelled when nothing would keep their answers (a step without a checkpointer: an answer would only
lead to further calls); with a checkpointer (both stores record every finished node of an interview:
LangGraph's Postgres saver, ``research_worker.store.checkpoints`` for ConfigMaps) they are
*drained*: each may finish within
``drain_seconds`` of the SIGTERM, its node completes and is checkpointed, and the retried pod resumes
after it instead of paying for the call again (a preemption or eviction then re-spends nothing). What
is computed and being stored is stored: a store write is never cancelled. The step then ends with
``WorkerStopped`` (exit code 143, retried by the Job) and the retried pod skips whatever is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

from research_worker.errors import WorkerStopped

log = logging.getLogger(__name__)

T = TypeVar("T")

# How long the calls in flight may go on after SIGTERM when a checkpointer keeps their nodes. The
# operator leaves worker pods Kubernetes' default grace period of 30 s: 20 s to finish the calls,
# the rest to checkpoint, store and exit before the SIGKILL.
DRAIN_SECONDS = 20.0


class Stop:
    """Set once, by SIGTERM (``install``) or by hand; model calls check it (``LLMClient.stop``)."""

    def __init__(self, drain_seconds: float = 0.0) -> None:
        self._event = asyncio.Event()
        self.reason = ""
        self.drain_seconds = drain_seconds  # how long a call in flight may go on after the stop (0: cancelled)
        self._deadline = 0.0  # the loop's time when the calls in flight are cancelled

    def set(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._deadline = asyncio.get_running_loop().time() + self.drain_seconds
            drain = f"; the calls in flight may finish within {self.drain_seconds:g} s" if self.drain_seconds else ""
            log.warning("%s: stopping; no further model calls, what is stored stays stored%s", reason, drain)
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise ``WorkerStopped`` if stopping."""
        if self._event.is_set():
            raise WorkerStopped(f"{self.reason}: stopped before the next model call")

    async def race(self, work: Coroutine[Any, Any, T], sent: asyncio.Event | None = None) -> T:
        """Await ``work`` (a call that starts now) unless the stop comes first; then let it finish
        within the drain if its request was already ``sent`` (a call still waiting for a slot or a
        lease would be a new call), else cancel it and raise ``WorkerStopped``."""
        if self._event.is_set():
            work.close()
            self.check()
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(self._event.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done() and self.drain_seconds > 0 and (sent is None or sent.is_set()):
                left = self._deadline - asyncio.get_running_loop().time()
                await asyncio.wait({task}, timeout=max(0.0, left))
        finally:
            stopped.cancel()
            if not task.done():
                task.cancel()
        if not task.done() or task.cancelled():
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise WorkerStopped(f"{self.reason}: a model call in flight was cancelled")
        return task.result()

    def install(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Make SIGTERM set this stop (the loop's signal handler; main thread only)."""
        (loop or asyncio.get_running_loop()).add_signal_handler(signal.SIGTERM, self.set, "SIGTERM")
