"""The ResearchJob field reference in docs/api.md, rendered from the CRD's OpenAPI schema
(``python -m research_api.crd --docs docs/api.md`` writes it between the markers below)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

DOCS_BEGIN = "<!-- BEGIN GENERATED FIELD REFERENCE (python -m research_api.crd --docs docs/api.md) -->"
DOCS_END = "<!-- END GENERATED FIELD REFERENCE -->"


def _type_name(node: dict[str, Any]) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "quantity"
    kind = str(node.get("type", ""))
    if kind == "array":
        return f"[]{_type_name(node['items'])}"
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map[string]{_type_name(node['additionalProperties'])}"
    return kind


def _constraints(node: dict[str, Any]) -> str:
    parts: list[str] = []
    if "enum" in node:
        parts.append("one of " + ", ".join(f"`{v}`" for v in node["enum"]))
    low, high = node.get("minimum"), node.get("maximum")
    if low is not None:
        parts.append(f"{'>' if node.get('exclusiveMinimum') else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if node.get('exclusiveMaximum') else '<='} {high:g}")
    for key, label in (
        ("minLength", "length >="),
        ("maxLength", "length <="),
        ("minItems", "items >="),
        ("maxItems", "items <="),
    ):
        if key in node:
            parts.append(f"{label} {node[key]}")
    if "pattern" in node:
        parts.append(f"matches `{node['pattern']}`")
    return "; ".join(parts)


def _cell(value: str) -> str:
    return value.replace("|", "\\|").replace("\n", " ")


def _walk(node: dict[str, Any], path: str, required: bool) -> Iterator[tuple[str, dict[str, Any], bool]]:
    yield path, node, required
    target = node["items"] if node.get("type") == "array" else node
    sub = "[]" if target is not node else ""
    needed = set(target.get("required", []))
    for name, prop in target.get("properties", {}).items():
        yield from _walk(prop, f"{path}{sub}.{name}", name in needed)


def _table(root: dict[str, Any], prefix: str) -> list[str]:
    lines = ["| Field | Type | Default | Validation | Description |", "|---|---|---|---|---|"]
    for path, node, required in list(_walk(root, prefix, True))[1:]:
        default = node.get("default")
        shown = "" if default is None else f"`{json.dumps(default, separators=(', ', ': '))}`"
        if required:
            shown = "required"
        lines.append(
            f"| `{path}` | {_type_name(node)} | {_cell(shown)} | {_cell(_constraints(node))} "
            f"| {_cell(str(node.get('description', '')))} |"
        )
    return lines


def field_reference(schema: dict[str, Any]) -> str:
    """The field reference of spec and status, with the cross-field rules, as Markdown, from the
    CRD's OpenAPI schema (research_api.crd.openapi_schema)."""
    spec, status = schema["properties"]["spec"], schema["properties"]["status"]
    rules = [*spec.get("x-kubernetes-validations", []), *schema.get("x-kubernetes-validations", [])]
    lines = [
        DOCS_BEGIN,
        "",
        "### spec",
        "",
        *_table(spec, "spec"),
        "",
        "### Rules across fields",
        "",
        "The API server also checks these rules; the message is what `kubectl` prints when one fails.",
        "",
        "| Rule (CEL) | Message |",
        "|---|---|",
        *(f"| `{_cell(r['rule'])}` | {_cell(r['message'])} |" for r in rules),
        "",
        "### status",
        "",
        "Written by the operator only (through the status subresource).",
        "",
        *_table(status, "status"),
        "",
        DOCS_END,
    ]
    return "\n".join(lines) + "\n"


def splice_docs(document: str, reference: str) -> str:
    """``document`` with the text between the generated-reference markers replaced."""
    begin, end = document.find(DOCS_BEGIN), document.find(DOCS_END)
    if begin < 0 or end < begin:
        raise ValueError(f"the document has no {DOCS_BEGIN!r} ... {DOCS_END!r} section")
    return document[:begin] + reference.rstrip("\n") + document[end + len(DOCS_END) :]
