"""One chat completion: validate the request, decide text / tool call / structured output, count tokens."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from . import roles
from .conversation import Conversation
from .errors import APIError, invalid
from .schema_fill import UnsatisfiableSchema, fill
from .tokens import count_message_tokens, count_tokens, pieces, terms

ROLES = ("system", "developer", "user", "assistant", "tool", "function")


@dataclass
class Completion:
    kind: str
    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    digest: str = ""

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def with_content(self, content: str) -> Completion:
        """This completion with other text (its token count follows)."""
        return dataclasses.replace(self, content=content, completion_tokens=count_tokens(content))

    def message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content, "refusal": None}
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


@dataclass
class Request:
    body: dict[str, Any]
    model: str
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    n: int
    conv: Conversation
    schema: dict[str, Any] | None
    schema_param: str
    tool: dict[str, Any] | None
    kind: str


def validate(body: Any, served: tuple[str, ...]) -> Request:
    """Check a request body the way the OpenAI API does, then work out what it asks for."""
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.")
    model = body.get("model")
    if not model:
        raise invalid("you must provide a model parameter", param="model", code="missing_required_parameter")
    if not isinstance(model, str) or model not in served:
        raise APIError(
            404, f"The model `{model}` does not exist or you do not have access to it.", code="model_not_found"
        )
    if "messages" not in body:
        raise invalid("Missing required parameter: 'messages'.", param="messages", code="missing_required_parameter")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise invalid(
            f"Invalid type for 'messages': expected an array, but got {type(messages).__name__} instead.",
            param="messages",
            code="invalid_type",
        )
    if not messages:
        raise invalid(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            param="messages",
            code="empty_array",
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(f"Invalid type for 'messages[{i}]': expected an object.", param=f"messages[{i}]",
                          code="invalid_type")
        if m.get("role") not in ROLES:
            raise invalid(
                f"Invalid value: '{m.get('role')}'. Supported values are: {', '.join(repr(r) for r in ROLES)}.",
                param=f"messages[{i}].role",
                code="invalid_value",
            )
        if m["role"] in ("user", "system", "developer") and m.get("content") is None:
            raise invalid(f"Missing required parameter: 'messages[{i}].content'.", param=f"messages[{i}].content",
                          code="missing_required_parameter")
    n = body.get("n") or 1
    if not isinstance(n, int) or not 1 <= n <= 128:
        raise invalid("Invalid 'n': expected an integer between 1 and 128.", param="n", code="invalid_value")
    stream = bool(body.get("stream"))
    options = body.get("stream_options") or {}
    if options and not stream:
        raise invalid("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                      param="stream_options", code="invalid_value")
    conv = Conversation(messages)
    tool = _chosen_tool(body, conv)
    schema, schema_param = _schema(body, conv, tool)
    kind = roles.classify(conv, schema)
    return Request(body, model, messages, stream, bool(options.get("include_usage")), n, conv, schema,
                   schema_param, tool, kind)


def _tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise invalid("Invalid type for 'tools': expected an array.", param="tools", code="invalid_type")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise invalid(f"Missing required parameter: 'tools[{i}].function.name'.",
                          param=f"tools[{i}].function.name", code="missing_required_parameter")
        out.append(fn)
    return out


def _chosen_tool(body: dict[str, Any], conv: Conversation) -> dict[str, Any] | None:
    tools = _tools(body)
    choice = body.get("tool_choice")
    if choice is not None and not tools:
        raise invalid("Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
                      param="tool_choice")
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        for fn in tools:
            if fn["name"] == name:
                return fn
        raise invalid(f"Invalid value for 'tool_choice': no function named '{name}' was specified in the 'tools' "
                      "parameter.", param="tool_choice")
    if choice not in (None, "auto", "required"):
        raise invalid(f"Invalid value: '{choice}'. Supported values are: 'none', 'auto', and 'required'.",
                      param="tool_choice", code="invalid_value")
    last = conv.turns[-1] if conv.turns else None
    question = set(terms(conv.question))

    def relevance(fn: dict[str, Any]) -> int:
        params = (fn.get("parameters") or {}).get("properties") or {}
        text = " ".join([fn["name"].replace("_", " "), str(fn.get("description", "")), *params])
        return len(question & set(terms(text)))

    best = max(tools, key=lambda fn: (relevance(fn), -tools.index(fn)))
    if choice == "required":
        return best
    # auto: answer in text once a tool has answered, otherwise call the tool the question is about
    if last is not None and last.role in ("tool", "function"):
        return None
    return best if relevance(best) > 0 else None


def _schema(body: dict[str, Any], conv: Conversation, tool: dict[str, Any] | None) -> tuple[dict[str, Any] | None, str]:
    if tool is not None:
        params = tool.get("parameters") or {"type": "object", "properties": {}}
        return params, "tools"
    fmt = body.get("response_format")
    if fmt is None:
        return None, ""
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise invalid("Invalid value for 'response_format.type': supported values are 'text', 'json_object' and "
                      "'json_schema'.", param="response_format.type", code="invalid_value")
    if fmt["type"] == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise invalid("Missing required parameter: 'response_format.json_schema.name'.",
                          param="response_format.json_schema.name", code="missing_required_parameter")
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            schema = {"type": "object", "properties": {}}
        return schema, "response_format"
    if fmt["type"] == "json_object":
        if "json" not in conv.lower:
            raise invalid("'messages' must contain the word 'json' in some form, to use 'response_format' of type "
                          "'json_object'.", param="messages")
        return schema_in_messages(conv) or {"type": "object", "properties": {"answer": {"type": "string"}},
                                            "required": ["answer"]}, "response_format"
    return None, ""


def schema_in_messages(conv: Conversation) -> dict[str, Any] | None:
    """The last JSON schema written into the prompt (json_mode callers describe the output there)."""
    decoder = json.JSONDecoder()
    text = conv.all_text
    found: dict[str, Any] | None = None
    i = text.find("{")
    while i != -1:
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        if isinstance(value, dict) and ("properties" in value or value.get("type") == "object"):
            found = value
        i = text.find("{", end)
    return found


def complete(req: Request) -> Completion:
    """The completion for a validated request (raises APIError 400 for a schema it cannot satisfy)."""
    conv = req.conv
    prompt_tokens = count_message_tokens(
        req.messages, [json.dumps(t) for t in req.body.get("tools") or []]
        + ([json.dumps(req.body["response_format"])] if req.body.get("response_format") else [])
    )
    digest = hashlib.sha256(json.dumps(req.body, sort_keys=True, default=str).encode()).hexdigest()
    if req.schema is not None:
        try:
            value = fill(req.schema, conv, kind=req.kind)
        except UnsatisfiableSchema as exc:
            raise invalid(str(exc), param=req.schema_param, code="invalid_json_schema") from exc
        arguments = json.dumps(value, ensure_ascii=False)
        if req.tool is not None:
            call = {
                "id": "call_" + digest[:24],
                "type": "function",
                "function": {"name": req.tool["name"], "arguments": arguments},
            }
            return Completion(req.kind, None, [call], "tool_calls", prompt_tokens, count_tokens(arguments) + 3,
                              digest)
        return Completion(req.kind, arguments, [], "stop", prompt_tokens, count_tokens(arguments), digest)
    text = roles.write(req.kind, conv)
    text, finish = _apply_limits(text, req.body)
    return Completion(req.kind, text, [], finish, prompt_tokens, count_tokens(text), digest)


def _apply_limits(text: str, body: dict[str, Any]) -> tuple[str, str]:
    finish = "stop"
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if isinstance(s, str) and s]
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    if cut >= 0:
        text = text[:cut]
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and limit > 0 and count_tokens(text) > limit:
        kept: list[str] = []
        for piece in pieces(text):
            if count_tokens("".join(kept) + piece) > limit:
                break
            kept.append(piece)
        text = "".join(kept)
        finish = "length"
    return text, finish


def sse_pieces(completion: Completion, token_ms: float) -> list[str]:
    """How the content is cut into stream chunks: one token each when tokens are paced, else a few."""
    parts = pieces(completion.content or "")
    if token_ms > 0:
        return parts
    return ["".join(parts[i : i + 8]) for i in range(0, len(parts), 8)]


def is_blank(text: str) -> bool:
    return not re.search(r"\S", text)
