"""HTTP routes: the OpenAI-compatible endpoints, the latency model, admission control and faults."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .completions import Completion, complete, sse_pieces, validate
from .config import Settings
from .errors import APIError, invalid, mask_key
from .faults import FAULTS, INVENT_CITATION, FaultInjector, invent_citation
from .metrics import Metrics
from .tokens import count_tokens, pieces

log = logging.getLogger("offline_model")
CREATED = 1_700_000_000  # models' fixed creation time


class Server:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics(settings.request_log)
        self.faults = FaultInjector(settings)
        self.running = 0
        self.started = time.time()

    # --------------------------------------------------------------------------------------------- helpers
    def check_auth(self, request: Request) -> None:
        key = self.settings.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise APIError(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header using "
                "Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code="invalid_api_key",
            )
        if not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise APIError(401, f"Incorrect API key provided: {mask_key(given.strip())}.", code="invalid_api_key")

    def knob(self, request: Request, header: str, default: float) -> float:
        raw = request.headers.get(header)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise invalid(f"Invalid header {header}: expected milliseconds, got {raw!r}.") from None
        if value < 0:
            raise invalid(f"Invalid header {header}: must not be negative.")
        return value

    def model_card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": CREATED, "owned_by": "offline-model"}

    # --------------------------------------------------------------------------------------------- routes
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "models": list(self.settings.served_models)})

    async def models(self, request: Request) -> Response:
        self.check_auth(request)
        return JSONResponse({"object": "list", "data": [self.model_card(m) for m in self.settings.served_models]})

    async def model(self, request: Request) -> Response:
        self.check_auth(request)
        name = request.path_params["model"]
        if name not in self.settings.served_models:
            raise APIError(404, f"The model `{name}` does not exist or you do not have access to it.",
                           code="model_not_found")
        return JSONResponse(self.model_card(name))

    async def stats(self, request: Request) -> Response:
        self.check_auth(request)
        return JSONResponse(self.metrics.stats())

    async def reset(self, request: Request) -> Response:
        self.check_auth(request)
        self.metrics.reset()
        self.faults.reset()
        return JSONResponse(self.metrics.stats())

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def chat(self, request: Request) -> Response:
        t0 = time.perf_counter()
        kind = "invalid"
        model = ""
        try:
            self.check_auth(request)
            raw = await request.body()
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise invalid(
                    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
                    "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not "
                    "valid JSON.)"
                ) from None
            req = validate(body, self.settings.served_models)
            kind, model = req.kind, req.model
            ttft = self.knob(request, "x-offline-latency-ttft-ms", self.settings.ttft_ms) / 1000
            per_token = self.knob(request, "x-offline-latency-token-ms", self.settings.token_ms) / 1000
            forced = request.headers.get("x-offline-fault")
            if forced is not None and forced not in (*FAULTS, INVENT_CITATION, "none"):
                raise invalid(
                    f"Invalid header X-Offline-Fault: {forced!r} (one of {', '.join(FAULTS)}, {INVENT_CITATION}, none)."
                )
        except APIError as exc:
            self.metrics.record(kind=kind, status=exc.status, model=model, seconds=time.perf_counter() - t0)
            return exc.response()

        if self.running >= self.settings.max_concurrency:
            busy = APIError(
                429,
                f"Too many concurrent requests: this server runs at most {self.settings.max_concurrency} at once. "
                "Please retry after the delay in the Retry-After header.",
                type="requests",
                code="rate_limit_exceeded",
                headers=self.faults.retry_headers(),
            )
            self.metrics.record(kind=kind, status=429, model=model, seconds=time.perf_counter() - t0, rejected=True)
            return busy.response()
        self.running += 1
        self.metrics.started(kind)
        release = True
        try:
            fault = self.faults.draw(forced)
            if fault == "hang":
                await self._hang(request)
                timeout = APIError(504, "The request timed out (injected hang).", type="server_error", code="timeout")
                self.metrics.record(kind=kind, status=504, model=model, seconds=time.perf_counter() - t0,
                                    fault=fault)
                return timeout.response()
            if fault is not None:
                injected = self.faults.error(fault)
                self.metrics.record(kind=kind, status=injected.status, model=model,
                                    seconds=time.perf_counter() - t0, fault=fault)
                return injected.response()
            try:
                completion = await run_in_threadpool(complete, req)
            except APIError as exc:
                self.metrics.record(kind=kind, status=exc.status, model=model, seconds=time.perf_counter() - t0)
                return exc.response()
            invented = completion.content is not None and self.faults.invents(kind, forced)
            if invented:
                completion = completion.with_content(invent_citation(completion.content or ""))
            created = int(time.time())
            cid = "chatcmpl-" + completion.digest[:29]
            if req.stream:
                release = False  # the stream releases its slot when it ends
                return StreamingResponse(
                    self._stream(req.model, completion, req.n, req.include_usage, cid, created, ttft, per_token, t0),
                    media_type="text/event-stream",
                    headers={"x-request-id": cid, "cache-control": "no-cache"},
                )
            await self._pace(t0, ttft, per_token, completion.completion_tokens)
            body_out = {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": req.model,
                "system_fingerprint": "fp_offline",
                "choices": [
                    {"index": i, "message": completion.message(), "logprobs": None,
                     "finish_reason": completion.finish_reason}
                    for i in range(req.n)
                ],
                "usage": _usage(completion, req.n),
            }
            self.metrics.record(kind=kind, status=200, model=model, seconds=time.perf_counter() - t0,
                                fault=INVENT_CITATION if invented else None,
                                prompt_tokens=completion.prompt_tokens,
                                completion_tokens=completion.completion_tokens * req.n)
            return JSONResponse(body_out, headers={"x-request-id": cid})
        finally:
            if release:
                self.running -= 1
                self.metrics.finished(kind)

    # --------------------------------------------------------------------------------------------- timing
    async def _hang(self, request: Request) -> None:
        deadline = time.monotonic() + self.settings.hang_seconds
        while time.monotonic() < deadline:
            if await request.is_disconnected():
                return
            await asyncio.sleep(0.05)

    @staticmethod
    async def _until(t0: float, offset: float) -> None:
        delay = t0 + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _pace(self, t0: float, ttft: float, per_token: float, tokens: int) -> None:
        await self._until(t0, ttft + per_token * max(0, tokens - 1))

    async def _stream(
        self, model: str, completion: Completion, n: int, include_usage: bool, cid: str, created: int,
        ttft: float, per_token: float, t0: float,
    ) -> AsyncIterator[bytes]:
        status = 200
        try:
            def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
                payload: dict[str, Any] = {
                    "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "system_fingerprint": "fp_offline", "choices": choices,
                }
                if include_usage:
                    payload["usage"] = usage
                return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"

            def delta(d: dict[str, Any], finish: str | None = None) -> bytes:
                return chunk([{"index": i, "delta": d, "logprobs": None, "finish_reason": finish} for i in range(n)])

            await self._until(t0, ttft)
            emitted = 0  # tokens emitted so far; token k (0-based) is due at ttft + k * per_token
            if completion.tool_calls:
                yield delta({"role": "assistant", "content": None, "refusal": None})
                for index, call in enumerate(completion.tool_calls):
                    yield delta({"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                                 "function": {"name": call["function"]["name"], "arguments": ""}}]})
                    args = call["function"]["arguments"]
                    parts = pieces(args) if per_token > 0 else [args]
                    for part in parts:
                        await self._until(t0, ttft + per_token * emitted)
                        emitted += max(1, count_tokens(part))
                        yield delta({"tool_calls": [{"index": index, "function": {"arguments": part}}]})
            else:
                yield delta({"role": "assistant", "content": "", "refusal": None})
                for part in sse_pieces(completion, per_token):
                    await self._until(t0, ttft + per_token * emitted)
                    emitted += max(1, count_tokens(part))
                    yield delta({"content": part})
            yield delta({}, completion.finish_reason)
            if include_usage:
                yield chunk([], _usage(completion, n))
            yield b"data: [DONE]\n\n"
        except asyncio.CancelledError:
            status = 499  # the client went away mid-stream
            raise
        finally:
            self.running -= 1
            self.metrics.finished(completion.kind)
            self.metrics.record(kind=completion.kind, status=status, model=model, stream=True,
                                seconds=time.perf_counter() - t0, prompt_tokens=completion.prompt_tokens,
                                completion_tokens=completion.completion_tokens * n)


def _usage(completion: Completion, n: int) -> dict[str, int]:
    usage = completion.usage
    usage["completion_tokens"] *= n
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return usage


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.response()


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return APIError(500, "The server had an error while processing your request.", type="server_error").response()


async def _not_found(request: Request, exc: Exception) -> Response:
    return APIError(404, f"Invalid URL ({request.method} {request.url.path})", code="unknown_url").response()


def create_app(settings: Settings | None = None) -> Starlette:
    server = Server(settings or Settings())
    routes = [
        Route("/health", server.health, methods=["GET"]),
        Route("/healthz", server.health, methods=["GET"]),
        Route("/metrics", server.prometheus, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{model:path}", server.model, methods=["GET"]),
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
        Route("/v1/offline/stats", server.stats, methods=["GET"]),
        Route("/v1/offline/stats/reset", server.reset, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={APIError: _api_error, 404: _not_found, Exception: _server_error},
    )
    app.state.server = server
    return app
