"""The operator's folders are its roles (docs/architecture.md, Reconciliation): what each may import.

A decision that starts doing IO, or a cache that starts calling the API server, would still pass
every other test; this one names the module and the import that broke the layout."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "operator" / "research_operator"

# What a pure decision may use: the standard library's data and arithmetic (no sockets, files,
# processes, threads or event loop), the API models, pydantic, and the quantity parser.
PURE_STDLIB = {
    "__future__", "base64", "bisect", "collections", "dataclasses", "datetime", "decimal", "enum",
    "fractions", "functools", "hashlib", "heapq", "ipaddress", "itertools", "json", "math", "re",
    "string", "typing", "uuid",
}  # fmt: skip
PURE_THIRD_PARTY = {"pydantic", "kubernetes.utils"}
PURE_OWN = ("research_api", "research_operator.constants", "research_operator.settings", "research_operator.decisions")


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "research_operator":
                found += [f"research_operator.{a.name}" for a in node.names]
            else:
                found.append(node.module)
    return found


def _modules(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).glob("*.py"))


def _within(name: str, prefixes: tuple[str, ...] | set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("path", _modules("decisions"), ids=lambda p: p.name)
def test_a_decision_imports_nothing_that_does_io(path: Path) -> None:
    bad = [
        name
        for name in _imports(path)
        if not (name.split(".")[0] in PURE_STDLIB or _within(name, PURE_THIRD_PARTY) or _within(name, PURE_OWN))
    ]
    assert not bad, f"decisions/{path.name} imports {bad}: a decision is a pure function; IO goes in actions/"


@pytest.mark.parametrize("path", _modules("cache"), ids=lambda p: p.name)
def test_the_cache_reads_only_decisions_and_settings(path: Path) -> None:
    own = [n for n in _imports(path) if n.startswith("research_operator")]
    bad = [n for n in own if not _within(n, PURE_OWN) and not n.startswith("research_operator.cache")]
    assert not bad, f"cache/{path.name} imports {bad}: the cache holds what the watches show, it does not act"
    assert "kopf" not in _imports(path) and not any(n.startswith("kubernetes.client") for n in _imports(path))


def test_only_main_imports_the_registration() -> None:
    importers = sorted(
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if "registration" not in p.parts and any(n.startswith("research_operator.registration") for n in _imports(p))
    )
    assert importers == ["main.py"], importers


def test_every_folder_is_a_package_and_every_module_has_a_role() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "constants.py", "main.py", "metrics.py", "settings.py"], top
    for folder in ("registration", "cache", "decisions", "actions", "lease_broker"):
        assert (PACKAGE / folder / "__init__.py").is_file(), folder
