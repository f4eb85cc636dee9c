"""Shared model endpoints and namespace token budgets: pure decisions.

A ``ModelEndpoint`` (cluster-scoped) declares what an endpoint can take. Every worker Job that calls
it is stamped at admission with the endpoint's name and the requests its pod can have in flight
(annotations), so what is admitted against an endpoint is read from the Jobs themselves (complete
after a restart). From those Jobs, ``shares`` gives each running pod its concurrency and its part
of the endpoint's requests and tokens per minute; the operator writes them to one ConfigMap per
ResearchJob, which the pods poll, so a pod that starts or ends, or a capacity change, reaches the
running pods without a restart.

Token budgets: a namespace may spend ``tokens`` per ``period`` (fixed windows from the Unix epoch,
so every replica and restart agrees on them); what it spent is the token usage its workers stored
in the period.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from research_api.environment import TASK_ENV
from research_api.modelendpoint import NamespaceSelector, normalize_url
from research_api.researchjob import GROUP
from research_api.task import SHARES_KEY, EndpointShareRef, EndpointShares, ResearchTask, ShareEntry, Step
from research_operator.constants import child_name
from research_operator.decisions.ledger import Limit, Prices

ANNOTATION_ENDPOINT = f"{GROUP}/model-endpoint"  # the ModelEndpoint a worker Job is admitted against
ANNOTATION_CONCURRENCY = f"{GROUP}/endpoint-concurrency"  # requests in flight its pod may need
ANNOTATION_ADMITTED = f"{GROUP}/endpoint-admitted"  # when (order of admission: earlier pods go first)
LABEL_SHARES = f"{GROUP}/endpoint-shares"  # on the shares ConfigMap (not researchops.io/kind: unwatched)
SHARE_POLL_SECONDS = 2.0
WRITER_CALLS = 3  # the writer writes the body, introduction and conclusion at once


@dataclass(frozen=True)
class Endpoint:
    """One ModelEndpoint, as the operator needs it."""

    name: str
    base_url: str
    max_concurrent: int
    models: tuple[str, ...] = ()
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    generation: int = 0
    key_secret: tuple[str, str] | None = None  # (Secret, key) in the operator's namespace
    namespace_selector: NamespaceSelector | None = None  # who may name it; None: nobody
    prices: Prices | None = None  # per million tokens (spec.prices); None: calls cost nothing

    def serves(self, base_url: str, model: str) -> bool:
        return normalize_url(self.base_url) == normalize_url(base_url) and (not self.models or model in self.models)

    def selects(self, labels: Mapping[str, str]) -> bool:
        """Whether a namespace with these labels may name this endpoint (spec.model.endpoint)."""
        return self.namespace_selector is not None and selector_matches(self.namespace_selector, labels)


def selector_matches(selector: NamespaceSelector, labels: Mapping[str, str]) -> bool:
    """Kubernetes label selector semantics: every matchLabels pair and every requirement holds; an
    empty selector matches everything."""
    if any(labels.get(k) != v for k, v in (selector.match_labels or {}).items()):
        return False
    for req in selector.match_expressions or []:
        present = req.key in labels
        values = req.values or []
        held = {
            "In": present and labels.get(req.key) in values,
            "NotIn": not present or labels.get(req.key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[req.operator]
        if not held:
            return False
    return True


def endpoint_from(body: Mapping[str, Any]) -> Endpoint | None:
    """A ModelEndpoint object as an ``Endpoint``, or None when its spec is unusable."""
    spec = body.get("spec") or {}
    meta = body.get("metadata") or {}
    try:
        key = spec.get("apiKeySecretRef")
        selector = spec.get("namespaceSelector")
        prices = spec.get("prices")
        return Endpoint(
            name=str(meta.get("name")),
            base_url=str(spec["baseUrl"]),
            max_concurrent=int(spec["maxConcurrentRequests"]),
            models=tuple(str(m) for m in spec.get("models") or []),
            requests_per_minute=int(spec["requestsPerMinute"]) if spec.get("requestsPerMinute") else None,
            tokens_per_minute=int(spec["tokensPerMinute"]) if spec.get("tokensPerMinute") else None,
            generation=int(meta.get("generation") or 0),
            key_secret=(str(key["name"]), str(key["key"])) if key else None,
            namespace_selector=NamespaceSelector.model_validate(selector) if selector is not None else None,
            prices=(
                Prices(_decimal(prices.get("inputPerMillion", "0")), _decimal(prices.get("outputPerMillion", "0")))
                if prices
                else None
            ),
        )
    except (KeyError, TypeError, ValueError, ArithmeticError):  # pydantic's ValidationError is a ValueError
        return None


def calls(endpoints: Mapping[str, Endpoint], named: str | None, base_url: str, model: str) -> Endpoint | None:
    """The endpoint a ResearchJob calls: the one it names (spec.model.endpoint), else ``match``."""
    return endpoints.get(named) if named else match(endpoints.values(), base_url, model)


def match(endpoints: Iterable[Endpoint], base_url: str, model: str) -> Endpoint | None:
    """The endpoint a ResearchJob calls: one naming its model wins over one for every model; then by name."""
    found = [e for e in endpoints if e.serves(base_url, model)]
    found.sort(key=lambda e: (not e.models, e.name))
    return found[0] if found else None


def demand(step: str, analysts: int, max_concurrency: int, endpoint: Endpoint) -> int:
    """Requests in flight one worker pod can have: an interview makes one call at a time per analyst,
    the planner one (a planner that goes on to interview ``analysts``: one per analyst), the writer
    three at once; never more than the pod's own ``maxConcurrency``, nor than the endpoint can take
    at all (so every pod can start once the endpoint is free). A pod that writes the report after its
    interviews does so within its share."""
    if step in (Step.INTERVIEW.value, Step.PLAN.value):
        calls = max(1, analysts)
    elif step == Step.WRITE.value:
        calls = WRITER_CALLS
    else:
        calls = 1
    return max(1, min(calls, max_concurrency, endpoint.max_concurrent))


@dataclass(frozen=True)
class PodUse:
    """A running worker Job admitted against an endpoint."""

    namespace: str
    research_job: str
    job: str
    demand: int
    admitted: str = ""  # sortable admission time


@dataclass(frozen=True)
class Share:
    concurrency: int
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def entry(self) -> ShareEntry:
        """As the wire has it (research_api.task.ShareEntry)."""
        return ShareEntry(
            concurrency=self.concurrency,
            requests_per_minute=self.requests_per_minute,
            tokens_per_minute=self.tokens_per_minute,
        )


def _split(total: int, weights: list[int]) -> list[int]:
    """``total`` split in proportion to ``weights`` (largest remainders; whole numbers)."""
    wsum = sum(weights)
    if wsum <= 0:
        return [0 for _ in weights]
    raw = [total * w / wsum for w in weights]
    out = [int(r) for r in raw]
    rest = total - sum(out)
    for i in sorted(range(len(raw)), key=lambda i: (out[i] - raw[i], i))[:rest]:
        out[i] += 1
    return out


LEASED_STANDBY_FACTOR = 4  # with the lease broker: demand admitted beyond the capacity, in capacities


def standby(endpoint: Endpoint, leased: bool = False) -> int:
    """Demand admitted beyond the capacity. Without the lease broker: as much again as the capacity,
    pods that start (image, interpreter, model preflight) while the endpoint is full and wait paused
    for their share, so a freed share is used at once instead of after a pod start-up. With it, an
    admitted pod holds no slot while it does not call, so every admitted pod takes part and the next
    ones must already be starting while they run: four capacities more (the broker's queue, not the
    pod count, bounds the requests in flight; this bounds the calls waiting in it)."""
    return endpoint.max_concurrent * (LEASED_STANDBY_FACTOR if leased else 1)


def shares(endpoint: Endpoint, pods: list[PodUse]) -> dict[str, Share]:
    """Each admitted pod's share, by Job name. Concurrency: in order of admission, each pod its
    demand while the capacity lasts, the next one what is left, the rest 0 (paused: standing by, or
    beyond a capacity an admin lowered) until pods before them end. Requests and tokens per minute:
    split in proportion to the concurrency."""
    ordered = sorted(pods, key=lambda p: (p.admitted, p.namespace, p.job))
    left = endpoint.max_concurrent
    conc = []
    for p in ordered:
        grant = max(0, min(p.demand, left))
        conc.append(grant)
        left -= grant
    rpm = _split(endpoint.requests_per_minute, conc) if endpoint.requests_per_minute else None
    tpm = _split(endpoint.tokens_per_minute, conc) if endpoint.tokens_per_minute else None
    return {p.job: Share(conc[i], rpm[i] if rpm else None, tpm[i] if tpm else None) for i, p in enumerate(ordered)}


def share_configmap_name(research_job: str) -> str:
    return child_name(research_job, "endpoint-share")


def shares_configmap(
    namespace: str, research_job: str, owner_ref: dict[str, Any], endpoint: str, mine: Mapping[str, Share]
) -> dict[str, Any]:
    """The ConfigMap the pods of one ResearchJob poll for their shares (owned by the ResearchJob)."""
    data = EndpointShares(endpoint=endpoint, jobs={job: s.entry() for job, s in sorted(mine.items())})
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": share_configmap_name(research_job),
            "namespace": namespace,
            "labels": {LABEL_SHARES: "true"},
            "ownerReferences": [owner_ref],
        },
        "data": {SHARES_KEY: data.to_json()},
    }


def stamp(
    job: dict[str, Any],
    task: ResearchTask | None,
    endpoint: Endpoint,
    need: int,
    share: Share,
    configmap: str,
    admitted: str = "",
    broker_url: str = "",
) -> ResearchTask | None:
    """The worker Job admitted against ``endpoint``: annotated with the endpoint, its pod's demand
    and when it was admitted, and its task (``task``, as built; the one returned is written into the
    Job) told its first share, where to poll for the next ones and, with a lease broker, where to
    take a lease for each call (``manifests.add_lease_broker_token`` then gives its pod the token
    the broker accepts)."""
    meta = job["metadata"]
    meta["annotations"] = {
        **(meta.get("annotations") or {}),
        ANNOTATION_ENDPOINT: endpoint.name,
        ANNOTATION_CONCURRENCY: str(need),
        ANNOTATION_ADMITTED: admitted,
    }
    ref = EndpointShareRef(
        config_map=configmap,
        key=meta["name"],
        poll_seconds=SHARE_POLL_SECONDS,
        concurrency=share.concurrency,
        requests_per_minute=share.requests_per_minute,
        tokens_per_minute=share.tokens_per_minute,
        broker_url=broker_url or None,
        endpoint=endpoint.name if broker_url else None,
    )
    if task is None:
        return None
    task = task.model_copy(update={"model": task.model.model_copy(update={"share": ref})})
    set_task(job, task)
    return task


def set_task(job: dict[str, Any], task: ResearchTask) -> None:
    """Write ``task`` into the worker Job (the environment its worker reads it from)."""
    for env in job["spec"]["template"]["spec"]["containers"][0]["env"]:
        if env["name"] == TASK_ENV:
            env["value"] = task.to_json()


# ------------------------------------------------------------------------------------------
# namespace token budgets
# ------------------------------------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_period(text: str) -> int:
    """A period such as ``30m``, ``1h``, ``24h``, ``7d``, in seconds."""
    m = re.fullmatch(r"\s*([0-9]+)\s*([smhdw])\s*", text)
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"a period is a whole number and a unit (s, m, h, d, w), e.g. 24h; got {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _decimal(value: object) -> Decimal:
    """A money amount as configured (a string such as "0.15", or a number), exactly; never negative."""
    out = Decimal(str(value).strip())
    if not out.is_finite() or out < 0:
        raise ValueError(f"not an amount of money: {value!r}")
    return out


def spec_limit(budget: Mapping[str, Any]) -> Limit | None:
    """A ResearchJob's spec.budget (maxTokens, maxCost) as a ledger limit (None: neither is set)."""
    tokens, cost = budget.get("maxTokens"), budget.get("maxCost")
    if tokens is None and cost is None:
        return None
    return Limit(int(tokens) if tokens is not None else None, _decimal(cost) if cost is not None else None)


@dataclass(frozen=True)
class TokenBudget:
    """A namespace's budget per period: in tokens, in money (at the endpoints' prices), or both."""

    tokens: int | None
    period: str  # as configured, e.g. "24h"
    cost: Decimal | None = None

    @property
    def seconds(self) -> int:
        return parse_period(self.period)


def describe_budget(b: TokenBudget) -> str:
    """A budget as the operator logs it: ``5000/24h``, ``cost 25/24h`` or ``5000,cost 25/24h``."""
    parts = ([str(b.tokens)] if b.tokens is not None else []) + ([f"cost {b.cost}"] if b.cost is not None else [])
    return f"{','.join(parts)}/{b.period}"


def parse_budgets(raw: str) -> dict[str, TokenBudget]:
    """``namespaceTokenBudgets``: a JSON (or YAML flow) map of namespace to ``{tokens, cost, period}``
    (tokens, cost or both; cost a decimal string such as ``"25.00"``, in the unit of the endpoints'
    prices)."""
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"namespaceTokenBudgets is not JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError("namespaceTokenBudgets must map each namespace to {tokens, period}")
    out: dict[str, TokenBudget] = {}
    for ns, b in data.items():
        tokens = b.get("tokens") if isinstance(b, dict) else None
        cost_text = b.get("cost") if isinstance(b, dict) else None
        if isinstance(tokens, float) and tokens.is_integer():
            tokens = int(tokens)  # 2e+06 from a templating tool
        if (tokens is not None or cost_text is None) and (
            not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1
        ):
            raise ValueError(f'namespaceTokenBudgets[{ns}] needs tokens (a whole number >= 1) or cost (e.g. "25.00")')
        try:
            cost = _decimal(cost_text) if cost_text is not None else None
        except (ValueError, ArithmeticError):
            raise ValueError(f"namespaceTokenBudgets[{ns}].cost is not an amount of money: {cost_text!r}") from None
        assert isinstance(b, dict)
        budget = TokenBudget(tokens, str(b.get("period", "24h")), cost)
        budget.seconds  # noqa: B018 - validates the period
        out[str(ns)] = budget
    return out


def window(now: dt.datetime, seconds: int) -> tuple[dt.datetime, dt.datetime]:
    """The current budget period: fixed windows of ``seconds`` from the Unix epoch."""
    epoch = now.timestamp()
    start = epoch - epoch % seconds
    return dt.datetime.fromtimestamp(start, dt.UTC), dt.datetime.fromtimestamp(start + seconds, dt.UTC)


def spent(usage: Iterable[tuple[dt.datetime | None, int]], start: dt.datetime) -> int:
    """Tokens stored by workers within the period that began at ``start``."""
    return sum(tokens for when, tokens in usage if when is not None and when >= start)
