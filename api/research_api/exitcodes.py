"""The exit codes of ``research-worker``. A worker Job's podFailurePolicy fails the Job at once on
the codes a retry cannot fix (``NON_RETRYABLE_EXIT_CODES``) instead of spending its backoff."""

from __future__ import annotations

EXIT_OK = 0
EXIT_UNEXPECTED = 1  # a bug or an unforeseen failure: retried
EXIT_CONFIG = 2  # a bad task, a missing variable or input
EXIT_MODEL = 3  # the model endpoint refused the key, the model name or the request
EXIT_STORE = 4  # the store (Kubernetes API, PostgreSQL) failed: retried
EXIT_BUDGET = 5  # the token budget is spent
EXIT_SEARCH = 6  # a search backend failed: retried
EXIT_STOPPED = 143  # stopped by SIGTERM (128 + 15) before the step was done: retried, resumes

NON_RETRYABLE_EXIT_CODES = (EXIT_CONFIG, EXIT_MODEL, EXIT_BUDGET)
