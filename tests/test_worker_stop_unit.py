"""SIGTERM stops the worker's model calls at once (research_worker.stopping): the call in flight is
cancelled (or, with a checkpointer, may finish within the drain), no new call reaches the endpoint,
and the step ends with exit code 143 (retried)."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import pytest
from langchain_core.messages import HumanMessage
from pydantic import SecretStr

from research_api.exitcodes import EXIT_STOPPED, NON_RETRYABLE_EXIT_CODES
from research_api.task import ModelSettings
from research_worker.errors import WorkerStopped
from research_worker.llm import LLMClient
from research_worker.state import Perspectives
from research_worker.stopping import Stop

ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 0,
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


class SlowEndpoint:
    """Answers only when ``release`` is set; counts the requests that reached it and those that ended
    without an answer (the client went away)."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.requests = 0
        self.abandoned = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        self.arrived.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.abandoned += 1
            raise
        return httpx.Response(200, json=ANSWER)

    def client(self, stop: Stop) -> LLMClient:
        http = httpx.AsyncClient(transport=httpx.MockTransport(self))
        llm = LLMClient(ModelSettings(name="m", base_url="http://llm.test/v1"), SecretStr("k"), http_async_client=http)
        llm.stop = stop
        return llm


async def test_sigterm_cancels_the_call_in_flight_and_no_further_call_is_made() -> None:
    stop = Stop()
    stop.install()
    endpoint = SlowEndpoint()
    llm = endpoint.client(stop)
    call = asyncio.create_task(llm.chat([HumanMessage(content="q")]))
    await asyncio.wait_for(endpoint.arrived.wait(), 10)
    os.kill(os.getpid(), signal.SIGTERM)  # the handler, not the default action: this test goes on
    with pytest.raises(WorkerStopped, match="SIGTERM: a model call in flight was cancelled"):
        await asyncio.wait_for(call, 10)
    assert endpoint.abandoned == 1
    with pytest.raises(WorkerStopped, match="SIGTERM: stopped before the next model call"):
        await llm.structured(Perspectives, [HumanMessage(content="q")])
    assert endpoint.requests == 1, "no call reaches the endpoint after SIGTERM"
    asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)


async def test_without_a_stop_calls_are_answered_and_a_late_stop_leaves_a_finished_answer_alone() -> None:
    stop = Stop()
    endpoint = SlowEndpoint()
    endpoint.release.set()
    llm = endpoint.client(stop)
    msg, usage = await llm.chat([HumanMessage(content="q")])
    assert msg.content == "ok" and usage.total_tokens == 4
    stop.set("SIGTERM")
    assert endpoint.abandoned == 0


async def test_with_a_drain_the_call_in_flight_finishes_and_no_further_call_is_made() -> None:
    """With a checkpointer (the PostgreSQL store) the call in flight is worth finishing: its node is
    checkpointed and the retried pod does not pay for it again. No new call starts."""
    stop = Stop(drain_seconds=5.0)
    endpoint = SlowEndpoint()
    llm = endpoint.client(stop)
    call = asyncio.create_task(llm.chat([HumanMessage(content="q")]))
    await asyncio.wait_for(endpoint.arrived.wait(), 10)
    stop.set("SIGTERM")
    await asyncio.sleep(0.1)
    assert not call.done(), "the call in flight is not cancelled while the drain lasts"
    endpoint.release.set()
    msg, usage = await asyncio.wait_for(call, 10)
    assert msg.content == "ok" and usage.total_tokens == 4 and endpoint.abandoned == 0
    with pytest.raises(WorkerStopped, match="SIGTERM: stopped before the next model call"):
        await llm.chat([HumanMessage(content="q")])
    assert endpoint.requests == 1, "no call reaches the endpoint after SIGTERM"


async def test_with_a_drain_a_call_still_waiting_for_its_slot_is_cancelled_not_sent() -> None:
    """The drain is for requests already sent: a call that waits for a slot (here the endpoint share
    of one request in flight, held by the first call) would be a new call after the SIGTERM."""
    from research_worker.share import ShareLimiter

    stop = Stop(drain_seconds=5.0)
    endpoint = SlowEndpoint()
    llm = endpoint.client(stop)
    llm.share = ShareLimiter(1, None, None)
    first = asyncio.create_task(llm.chat([HumanMessage(content="q1")]))
    await asyncio.wait_for(endpoint.arrived.wait(), 10)
    second = asyncio.create_task(llm.chat([HumanMessage(content="q2")]))  # waits for the one slot
    await asyncio.sleep(0.1)
    stop.set("SIGTERM")
    with pytest.raises(WorkerStopped, match="a model call in flight was cancelled"):
        await asyncio.wait_for(second, 10)
    endpoint.release.set()
    msg, _ = await asyncio.wait_for(first, 10)  # the one sent is drained
    assert msg.content == "ok" and endpoint.requests == 1


async def test_a_call_that_outlasts_the_drain_is_cancelled() -> None:
    stop = Stop(drain_seconds=0.2)
    endpoint = SlowEndpoint()
    llm = endpoint.client(stop)
    call = asyncio.create_task(llm.chat([HumanMessage(content="q")]))
    await asyncio.wait_for(endpoint.arrived.wait(), 10)
    stop.set("SIGTERM")
    with pytest.raises(WorkerStopped, match="SIGTERM: a model call in flight was cancelled"):
        await asyncio.wait_for(call, 10)
    assert endpoint.abandoned == 1


def test_a_stopped_step_is_retried_with_the_conventional_sigterm_exit_code() -> None:
    assert WorkerStopped("x").exit_code == EXIT_STOPPED == 128 + signal.SIGTERM
    assert EXIT_STOPPED not in NON_RETRYABLE_EXIT_CODES
