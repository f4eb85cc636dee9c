"""The chat model: one pooled ChatOpenAI per process, bounded concurrency, a request-rate limit,
retries that honour Retry-After, a fail-fast preflight, and token accounting with a budget.

Retries are the openai SDK's (``max_retries``): it retries 408/409/429/5xx and connection
errors with exponential backoff (0.5 s doubling to 8 s, jittered), waits what a ``Retry-After``
/ ``retry-after-ms`` header says when it is at most 120 s, and never retries 401/403/404.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextvars import ContextVar
from typing import Any, TypeVar

import httpx
import openai
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.rate_limiters import InMemoryRateLimiter
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, SecretStr

from research_api.task import ModelSettings
from research_worker.errors import (
    BudgetExceeded,
    ModelAuthError,
    ModelEndpointError,
    ModelEndpointUnreachable,
    WorkerConfigError,
)
from research_worker.share import ShareLimiter
from research_worker.state import TokenUsage

log = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)

PREFLIGHT_TIMEOUT = 5.0
PREFLIGHT_ATTEMPTS = 4


def usage_of(message: BaseMessage | None) -> TokenUsage:
    meta = getattr(message, "usage_metadata", None) or {}
    return TokenUsage(
        input_tokens=int(meta.get("input_tokens", 0)),
        output_tokens=int(meta.get("output_tokens", 0)),
        total_tokens=int(meta.get("total_tokens", 0)),
        calls=1,
    )


# Sent when no key is configured for a self-hosted endpoint (the offline model server, vLLM, Ollama):
# the OpenAI client needs some bearer value; an endpoint that does check keys answers 401 to it.
NO_KEY = "no-key-configured"


def api_key_from_env(var: str, base_url: str | None = None) -> SecretStr:
    """The model API key from ``var``. Without one, a self-hosted ``base_url`` is called with no
    real key (it may not need one); OpenAI's own endpoint always needs one."""
    value = os.environ.get(var)
    if value:
        return SecretStr(value)
    if base_url:
        log.info("no API key in $%s; calling %s without one", var, base_url)
        return SecretStr(NO_KEY)
    raise WorkerConfigError(f"the model API key variable {var} is not set (feed it from a Secret)")


def _retry_after(resp: httpx.Response, attempt: int) -> float:
    for header, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = resp.headers.get(header)
        if value:
            try:
                return min(float(value) / divisor, 10.0)
            except ValueError:
                pass
    return float(min(0.25 * 2**attempt, 4.0))


async def preflight(settings: ModelSettings, api_key: SecretStr) -> list[str]:
    """``GET {base_url}/models`` with a short timeout: a wrong key or an unreachable endpoint fails
    here in seconds, with a clear message, instead of in a long retry loop. Returns the model ids."""
    base = (settings.base_url or "https://api.openai.com/v1").rstrip("/")
    url = f"{base}/models"
    headers = {"Authorization": f"Bearer {api_key.get_secret_value()}"}
    async with httpx.AsyncClient(timeout=PREFLIGHT_TIMEOUT) as client:
        for attempt in range(PREFLIGHT_ATTEMPTS):
            try:
                resp = await client.get(url, headers=headers)
            except httpx.TimeoutException as exc:
                raise ModelEndpointUnreachable(
                    f"model endpoint {base} did not answer within {PREFLIGHT_TIMEOUT:.0f}s ({type(exc).__name__})"
                ) from None
            except httpx.HTTPError as exc:
                raise ModelEndpointUnreachable(f"model endpoint {base} is unreachable: {exc}") from None
            if resp.status_code in (401, 403) and api_key.get_secret_value() == NO_KEY:
                raise ModelAuthError(
                    f"model endpoint {base} requires an API key (HTTP {resp.status_code}): "
                    f"set ${settings.api_key_env} from a Secret (spec.model.apiKeySecretRef)"
                )
            if resp.status_code in (401, 403):
                raise ModelAuthError(
                    f"model endpoint {base} rejected the API key from ${settings.api_key_env} (HTTP {resp.status_code})"
                )
            if resp.status_code == 429 or resp.status_code >= 500:
                await asyncio.sleep(_retry_after(resp, attempt))
                continue
            if resp.status_code == 404:
                log.warning("model endpoint %s has no /models; skipping the model check", base)
                return []
            if resp.status_code != 200:
                raise ModelEndpointError(f"model endpoint {base}/models answered HTTP {resp.status_code}")
            try:
                ids = [str(m["id"]) for m in resp.json().get("data", [])]
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ModelEndpointError(f"model endpoint {base}/models did not answer a model list") from None
            if ids and settings.name not in ids:
                raise ModelEndpointError(
                    f"model {settings.name!r} is not served by {base} (it serves: {', '.join(ids[:10])})"
                )
            return ids
    raise ModelEndpointUnreachable(f"model endpoint {base} kept answering 429/5xx to the preflight")


# 429 answers seen during the current call (the openai SDK retries them inside one call).
_RATE_LIMITED: ContextVar[list[int] | None] = ContextVar("rate_limited", default=None)


async def _count_429(response: httpx.Response) -> None:
    if response.status_code == 429:
        box = _RATE_LIMITED.get()
        if box is not None:
            box[0] += 1


class LLMClient:
    """What the graph nodes call. One per process; safe to share between concurrent interviews.

    With a shared endpoint (``settings.share``), the requests in flight and the requests and tokens
    per minute follow this pod's share, which ``research_worker.share.follow`` keeps current."""

    def __init__(
        self,
        settings: ModelSettings,
        api_key: SecretStr,
        *,
        max_tokens_budget: int | None = None,
        tokens_used_before: int = 0,
    ) -> None:
        self.settings = settings
        limiter = (
            InMemoryRateLimiter(
                requests_per_second=settings.requests_per_second,
                check_every_n_seconds=min(0.05, 0.5 / settings.requests_per_second),
                max_bucket_size=max(1.0, settings.requests_per_second),
            )
            if settings.requests_per_second
            else None
        )
        self.model = ChatOpenAI(
            model=settings.name,
            base_url=settings.base_url,
            api_key=api_key,
            temperature=settings.temperature,
            max_retries=settings.max_retries,
            timeout=settings.timeout_seconds,
            rate_limiter=limiter,
            http_async_client=httpx.AsyncClient(
                timeout=settings.timeout_seconds, event_hooks={"response": [_count_429]}
            ),
        )
        self._structured: dict[type[BaseModel], Any] = {}
        self._sem = asyncio.Semaphore(settings.max_concurrency)
        share = settings.share
        self.share: ShareLimiter | None = (
            ShareLimiter(
                min(share.concurrency, settings.max_concurrency), share.requests_per_minute, share.tokens_per_minute
            )
            if share is not None
            else None
        )
        self.rate_limited = 0  # 429 answers seen by this process
        self.budget = max_tokens_budget
        self.used_before = tokens_used_before
        self.usage = TokenUsage()

    def _check_budget(self) -> None:
        used = self.used_before + self.usage.total_tokens
        if self.budget is not None and used >= self.budget:
            raise BudgetExceeded(f"token budget exhausted: {used} of {self.budget} tokens used")

    def _account(self, usage: TokenUsage) -> None:
        self.usage = self.usage + usage

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        if self.share is not None:
            async with self.share.slot():
                yield
        else:
            async with self._sem:
                yield

    def _tally(self, usage: TokenUsage, box: list[int]) -> TokenUsage:
        self.rate_limited += box[0]
        if self.share is not None:
            self.share.spent(usage.total_tokens)
        return usage.model_copy(update={"rate_limited": box[0]}) if box[0] else usage

    async def _call(self, runnable: Any, messages: Sequence[BaseMessage], box: list[int]) -> Any:
        self._check_budget()
        async with self._slot():
            _RATE_LIMITED.set(box)
            try:
                return await runnable.ainvoke(list(messages))
            except openai.AuthenticationError:
                raise ModelAuthError(
                    f"model endpoint rejected the API key from ${self.settings.api_key_env} (HTTP 401)"
                ) from None
            except openai.NotFoundError as exc:
                raise ModelEndpointError(f"model {self.settings.name!r} not found: {exc.message}") from None
            except openai.APIConnectionError as exc:
                raise ModelEndpointUnreachable(
                    f"model endpoint {self.settings.base_url} unreachable after retries: {exc}"
                ) from None
            except openai.APIStatusError as exc:
                raise ModelEndpointError(
                    f"model endpoint answered HTTP {exc.status_code} after "
                    f"{self.settings.max_retries} retries: {exc.message}"
                ) from None

    async def chat(self, messages: Sequence[BaseMessage]) -> tuple[AIMessage, TokenUsage]:
        box = [0]
        msg = await self._call(self.model, messages, box)
        assert isinstance(msg, AIMessage)
        usage = self._tally(usage_of(msg), box)
        self._account(usage)
        return msg, usage

    async def structured(self, schema: type[T], messages: Sequence[BaseMessage]) -> tuple[T, TokenUsage]:
        runnable = self._structured.get(schema)
        if runnable is None:
            runnable = self.model.with_structured_output(schema, method="json_schema", include_raw=True)
            self._structured[schema] = runnable
        box = [0]
        out = await self._call(runnable, messages, box)
        usage = self._tally(usage_of(out.get("raw")), box)
        self._account(usage)
        parsed = out.get("parsed")
        if not isinstance(parsed, schema):
            err = out.get("parsing_error")
            raise ModelEndpointError(f"the model's answer did not match {schema.__name__}: {err}")
        return parsed, usage
