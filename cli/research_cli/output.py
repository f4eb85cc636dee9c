"""Printing as kubectl does: aligned tables with upper-case headers, or the objects as YAML/JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import yaml


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell, three spaces apart (kubectl's layout)."""
    cells = [[str(h) for h in headers], *[[("" if c is None else str(c)) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines) + "\n"


def dump(obj: Any, fmt: str) -> str:
    """``-o json`` (indented, like kubectl) or ``-o yaml``."""
    if fmt == "json":
        return json.dumps(obj, indent=4) + "\n"
    return str(yaml.safe_dump(obj, sort_keys=False, allow_unicode=True))


def dump_list(objs: list[dict[str, Any]], fmt: str) -> str:
    """Several objects: a v1 List in JSON, YAML documents separated by ``---``."""
    if fmt == "json":
        return dump({"apiVersion": "v1", "kind": "List", "items": objs}, "json")
    return "---\n".join(dump(o, "yaml") for o in objs)
