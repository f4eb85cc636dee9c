"""Shared pytest configuration: fixtures live in tests/fixtures/, one module per real dependency."""

from collections.abc import Generator
from typing import Any

import pytest

pytest_plugins: list[str] = [
    "tests.fixtures.cluster",
    "tests.fixtures.operator",
    "tests.fixtures.modelserver",
    "tests.fixtures.postgres",
    "tests.fixtures.llamaserver",
    "tests.fixtures.containernode",
    "tests.fixtures.realnode",
]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    """A failing test on the cluster shows what the operator saw and decided, not only its last log
    lines: every ResearchJob's status, the worker Jobs that have not ended, and the operator's
    decision lines (`decision: ...`, one per change of what a ResearchJob does or waits for)."""
    report = yield
    if report.failed and call.when in ("call", "setup") and "cluster" in getattr(item, "fixturenames", ()):
        from tests.fixtures.diagnose import item_state

        report.sections.append(("research-operator state at the failure", item_state(item)))
    return report
