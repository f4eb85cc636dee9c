"""Worker errors. Each carries the process exit code the CLI uses (research_api.exitcodes), so a
Job's podFailurePolicy can tell a retryable failure (1: unexpected, 4: store, 6: search) from one
that retrying cannot fix (2: bad task or config, 3: model key/endpoint/model name, 5: token budget)."""

from __future__ import annotations

from research_api.exitcodes import (
    EXIT_BUDGET,
    EXIT_CONFIG,
    EXIT_MODEL,
    EXIT_SEARCH,
    EXIT_STOPPED,
    EXIT_STORE,
    EXIT_UNEXPECTED,
)


class WorkerError(Exception):
    exit_code = EXIT_UNEXPECTED


class WorkerConfigError(WorkerError):
    """The task or the environment is wrong (bad task, missing variable, missing input)."""

    exit_code = EXIT_CONFIG


class ModelEndpointError(WorkerError):
    """The model endpoint answered something that retrying will not change."""

    exit_code = EXIT_MODEL


class ModelAuthError(ModelEndpointError):
    pass


class ModelEndpointUnreachable(ModelEndpointError):
    pass


class ModelTimeout(ModelEndpointError):
    """No answer within the per-call timeout, retries included."""


class ModelRequestRejected(ModelEndpointError):
    """A 4xx other than 401/404/408/409/429: the same request would be refused again."""


class ModelContextExceeded(ModelRequestRejected):
    """The prompt is longer than the model's context window."""


class ModelAnswerError(ModelEndpointError):
    """The model answered, but not usably: cut off at the output bound, or not the asked-for schema."""


class StoreError(WorkerError):
    exit_code = EXIT_STORE


class ObjectTooLarge(StoreError):
    pass


class BudgetExceeded(WorkerError):
    exit_code = EXIT_BUDGET


class SearchError(WorkerError):
    exit_code = EXIT_SEARCH


class WorkerStopped(WorkerError):
    """SIGTERM came (preemption, eviction, a pod delete): the step stopped calling the model and
    kept what it stored; the retried pod goes on from there (research_worker.stopping)."""

    exit_code = EXIT_STOPPED
