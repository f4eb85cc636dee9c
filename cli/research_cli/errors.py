"""The one error type of the plugin: a message for the user and an exit code."""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1  # the request failed (API error, unknown object, failed ResearchJob, timeout)
EXIT_USAGE = 2  # bad flags or arguments


class CliError(Exception):
    """Printed as one ``error: ...`` line on stderr; never a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(CliError):
    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)
