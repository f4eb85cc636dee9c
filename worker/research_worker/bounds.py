"""Length bounds on the strings of a structured answer, so that a schema-constrained answer ends
within ``maxOutputTokens``.

A small model asked for JSON often never closes a free-text string: Gemma 3 270M repeats one
sentence in an analyst's ``description`` until the output bound cuts the answer off, and a cut-off
structured answer is lost. An endpoint that compiles the schema into a grammar (llama.cpp's
``llama-server``, vLLM, Ollama, SGLang) honours ``maxLength``: the grammar then forces each string,
and so the whole answer, to end. The bounds share the output budget between the strings: the
strings together may take ``(maxOutputTokens - the empty JSON's tokens) x TEXT_CHARS_PER_TOKEN``
characters, equally (every ``maxItems`` of an array counted), each at least ``MIN_STRING_CHARS``
and at most ``MAX_STRING_CHARS`` or the schema's own ``max_string_chars`` class attribute (a search
query needs no essay). At ~4 characters a token for English that spends about 40% of the
budget on text and leaves the rest for keys, punctuation and the whitespace a JSON grammar allows.

OpenAI's strict structured outputs (what the openai SDK sends for a pydantic schema) refuse
``maxLength`` ("'maxLength' is not permitted"), so OpenAI's own endpoints get the schema as it is.
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel

T = TypeVar("T", bound=BaseModel)

TEXT_CHARS_PER_TOKEN = 1.5
MIN_STRING_CHARS = 16
MAX_STRING_CHARS = 1000
# Tokens per character of the JSON around the strings (keys and punctuation tokenize poorly).
SKELETON_TOKENS_PER_CHAR = 0.5
# Arrays without maxItems count this many items when the budget is shared.
UNBOUNDED_ITEMS = 3


def strict_subset_only(base_url: str | None) -> bool:
    """Whether the endpoint is OpenAI's own (the default, or Azure OpenAI), whose strict structured
    outputs accept only a subset of JSON Schema without ``maxLength``."""
    if not base_url:
        return True
    host = (urlsplit(base_url).hostname or "").lower()
    return host == "api.openai.com" or host.endswith(".openai.azure.com")


def _resolve(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        target = root.get("$defs", {}).get(ref.removeprefix("#/$defs/"))
        if isinstance(target, dict):
            return target
    for key in ("anyOf", "oneOf", "allOf"):
        options = node.get(key)
        if isinstance(options, list) and options and isinstance(options[0], dict):
            return _resolve(options[0], root)
    return node


def skeleton(node: dict[str, Any], root: dict[str, Any], depth: int = 0) -> tuple[Any, int]:
    """The answer with every string empty (arrays at their largest size), and its string count."""
    node = _resolve(node, root)
    kind = node.get("type")
    if depth > 16:
        return None, 0
    if kind == "object" or "properties" in node:
        out: dict[str, Any] = {}
        strings = 0
        for key, sub in (node.get("properties") or {}).items():
            if isinstance(sub, dict):
                out[key], n = skeleton(sub, root, depth + 1)
                strings += n
        return out, strings
    if kind == "array":
        items = node.get("items")
        count = int(node.get("maxItems", max(int(node.get("minItems", 0)), UNBOUNDED_ITEMS)))
        if not isinstance(items, dict) or count == 0:
            return [], 0
        item, n = skeleton(items, root, depth + 1)
        return [item] * count, n * count
    if kind == "string" and "enum" not in node and "const" not in node and "maxLength" not in node:
        return "", 1
    if kind == "string":
        return "", 0
    return 0, 0


def string_limit(schema: dict[str, Any], max_output_tokens: int, cap: int = MAX_STRING_CHARS) -> int:
    """The maxLength each free string of ``schema`` gets from an output budget of ``max_output_tokens``."""
    empty, strings = skeleton(schema, schema)
    if strings == 0:
        return cap
    skeleton_tokens = len(json.dumps(empty, separators=(",", ":"))) * SKELETON_TOKENS_PER_CHAR
    text_chars = max(0.0, max_output_tokens - skeleton_tokens) * TEXT_CHARS_PER_TOKEN
    return max(MIN_STRING_CHARS, min(cap, int(text_chars / strings)))


def bound_strings(schema: dict[str, Any], max_output_tokens: int, cap: int = MAX_STRING_CHARS) -> dict[str, Any]:
    """A copy of ``schema`` whose free strings (no enum, const or maxLength of their own) have a
    ``maxLength`` from the output budget, at most ``cap``."""
    out = copy.deepcopy(schema)
    limit = string_limit(out, max_output_tokens, cap)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "string" and not ({"enum", "const", "maxLength"} & node.keys()):
                node["maxLength"] = limit
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(out)
    return out


@functools.cache
def bounded(schema: type[T], max_output_tokens: int) -> type[T]:
    """``schema`` with the same name and fields, whose JSON schema bounds its strings. Parsing is
    unchanged: the bounds shape what a grammar lets the model write, they do not reject answers."""

    cap = int(getattr(schema, "max_string_chars", MAX_STRING_CHARS))

    def model_json_schema(cls: type[BaseModel], *args: Any, **kwargs: Any) -> dict[str, Any]:
        return bound_strings(schema.model_json_schema(*args, **kwargs), max_output_tokens, cap)

    namespace = {"__module__": schema.__module__, "model_json_schema": classmethod(model_json_schema)}
    return type(schema.__name__, (schema,), namespace)
