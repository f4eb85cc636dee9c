"""Shared pytest configuration: fixtures live in tests/fixtures/, one module per real dependency."""

pytest_plugins: list[str] = [
    "tests.fixtures.cluster",
    "tests.fixtures.operator",
    "tests.fixtures.modelserver",
    "tests.fixtures.postgres",
    "tests.fixtures.llamaserver",
]
