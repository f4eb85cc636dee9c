"""Structured output: a valid instance of any satisfiable JSON schema, with content from the conversation.

The filler walks the schema ($ref/$defs, allOf/anyOf/oneOf, enums, nested objects and arrays), fills
strings by what their field name and description ask for (persona fields, a search query, titles,
sentences relevant to the field), sizes arrays from the count the prompt asks for within
minItems/maxItems, and validates the result with ``jsonschema`` before returning it.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from typing import Any, cast

import exrex
import jsonschema
from jsonschema.exceptions import SchemaError
from referencing import Registry, Resource
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

from . import roles
from .conversation import Conversation
from .documents import Passage
from .extractive import focus_phrase, phrase, rank, title_case
from .personas import PersonaPlanner, PersonaSpec, requested_count
from .tokens import key_words, terms

ROOT_URI = "urn:offline-model:schema"
MAX_DEPTH = 12


class UnsatisfiableSchema(ValueError):
    """The schema is invalid, or no instance the filler can build satisfies it."""


class _Dead(Exception):
    """A branch of the schema admits no value (``false``, ``not: {}``...)."""


def _first_type(schema: dict[str, Any]) -> str | None:
    t = schema.get("type")
    if isinstance(t, list):
        non_null = [x for x in t if x != "null"]
        return non_null[0] if non_null else "null"
    if isinstance(t, str):
        return t
    if "properties" in schema or "additionalProperties" in schema or "required" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return None


class SchemaFiller:
    def __init__(self, root: dict[str, Any], conv: Conversation, *, kind: str = "other") -> None:
        self.root = root
        self.conv = conv
        self.kind = kind
        self.count = requested_count(conv.system + "\n" + "\n".join(m.text for m in conv.turns if m.role == "user"))
        self.planner = PersonaPlanner(conv)
        self._personas: list[PersonaSpec] = []
        self._used: set[str] = set()
        self._last: Passage | None = None
        registry: Registry[Any] = Registry().with_resource(
            ROOT_URI, Resource.from_contents(root, default_specification=DRAFT202012)
        )
        self.resolver = registry.resolver(base_uri=ROOT_URI)

    # ---------------------------------------------------------------------------------------------
    def instance(self) -> Any:
        try:
            validator_cls = jsonschema.validators.validator_for(self.root, default=jsonschema.Draft202012Validator)
            validator_cls.check_schema(self.root)
        except SchemaError as exc:
            raise UnsatisfiableSchema(f"Invalid schema: {exc.message}") from exc
        validator = validator_cls(self.root, format_checker=validator_cls.FORMAT_CHECKER)
        last_error = "no instance could be generated"
        for minimal in (False, True):
            self._used.clear()
            try:
                value = self.fill(self.root, "", self.resolver, 0, 0, minimal=minimal)
            except (_Dead, Unresolvable, RecursionError) as exc:
                last_error = str(exc) or type(exc).__name__
                continue
            errors = sorted(validator.iter_errors(value), key=lambda e: list(e.path))
            if not errors:
                return value
            last_error = errors[0].message
        raise UnsatisfiableSchema(f"The schema cannot be satisfied: {last_error}")

    # ---------------------------------------------------------------------------------------------
    def fill(self, schema: Any, name: str, resolver: Any, depth: int, index: int, *, minimal: bool) -> Any:
        if schema is True or schema == {}:
            return self.string(name, {}, index, minimal=minimal)
        if schema is False:
            raise _Dead(f"'{name or 'value'}' admits no value")
        if not isinstance(schema, dict):
            raise _Dead(f"unsupported schema at '{name}'")
        if depth > MAX_DEPTH:
            raise _Dead("schema nests too deeply (recursive without a base case)")
        if "$ref" in schema:
            resolved = resolver.lookup(schema["$ref"])
            merged = dict(resolved.contents) if isinstance(resolved.contents, dict) else {}
            merged.update({k: v for k, v in schema.items() if k != "$ref"})
            return self.fill(merged, name, resolved.resolver, depth + 1, index, minimal=minimal)
        if "not" in schema and schema["not"] in ({}, True):
            raise _Dead(f"'{name or 'value'}' is 'not' everything")
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return self.choose_enum(list(schema["enum"]), name, schema, index)
        if "allOf" in schema:
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                if isinstance(part, dict) and "$ref" in part:
                    part = resolver.lookup(part["$ref"]).contents
                if not isinstance(part, dict):
                    continue
                for key, val in part.items():
                    if key == "properties":
                        merged.setdefault("properties", {}).update(val)
                    elif key == "required":
                        merged["required"] = sorted(set(merged.get("required", [])) | set(val))
                    else:
                        merged.setdefault(key, val)
            return self.fill(merged, name, resolver, depth + 1, index, minimal=minimal)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self.fill_union(schema, key, name, resolver, depth, index, minimal=minimal)
        kind = _first_type(schema)
        if kind == "object":
            return self.object(schema, name, resolver, depth, index, minimal=minimal)
        if kind == "array":
            return self.array(schema, name, resolver, depth, minimal=minimal)
        if kind in ("integer", "number"):
            return self.number(schema, name, integer=kind == "integer", index=index)
        if kind == "boolean":
            return True
        if kind == "null":
            return None
        return self.string(name, schema, index, minimal=minimal)

    def fill_union(
        self, schema: dict[str, Any], key: str, name: str, resolver: Any, depth: int, index: int, *, minimal: bool
    ) -> Any:
        base = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
        options = list(schema[key])
        nulls = [o for o in options if isinstance(o, dict) and o.get("type") == "null"]
        others = [o for o in options if o not in nulls]
        if minimal and nulls:
            others = []
        for option in [*others, *nulls]:
            candidate_schema = {**base, **option} if isinstance(option, dict) else option
            try:
                value = self.fill(candidate_schema, name, resolver, depth + 1, index, minimal=minimal)
            except _Dead:
                continue
            sub = {**schema, "$defs": self.root.get("$defs", {}), "definitions": self.root.get("definitions", {})}
            try:
                jsonschema.validate(value, sub)
            except (jsonschema.ValidationError, jsonschema.SchemaError, Unresolvable):
                continue
            return value
        raise _Dead(f"no branch of '{name or 'value'}' {key} can be satisfied")

    # ---------------------------------------------------------------------------------------------
    def _persona_for(self, index: int) -> PersonaSpec:
        while len(self._personas) <= index:
            self._personas = self.planner.plan(max(index + 1, self.count or 3))
        return self._personas[index]

    def object(
        self, schema: dict[str, Any], name: str, resolver: Any, depth: int, index: int, *, minimal: bool
    ) -> dict[str, Any]:
        props: dict[str, Any] = schema.get("properties") or {}
        required = set(schema.get("required") or [])
        persona = roles.is_persona_schema({"properties": props})
        out: dict[str, Any] = {}
        for prop, sub in props.items():
            if minimal and prop not in required:
                continue
            if persona and prop.lower() in ("name", "role", "affiliation", "description"):
                spec = self._persona_for(index)
                sub_resolved = sub
                if isinstance(sub, dict) and "$ref" in sub:
                    sub_resolved = resolver.lookup(sub["$ref"]).contents
                if isinstance(sub_resolved, dict) and _first_type(sub_resolved) in (None, "string"):
                    value = getattr(spec, prop.lower())
                    out[prop] = self.fit_string(value, sub_resolved)
                    continue
            out[prop] = self.fill(sub, prop, resolver, depth + 1, index, minimal=minimal)
        extra = schema.get("additionalProperties")
        need = int(schema.get("minProperties", 0)) - len(out)
        if need > 0 and extra is not False:
            sub = extra if isinstance(extra, dict) else {"type": "string"}
            for i, word in enumerate(self.keyword_pool()):
                key = word.lower()
                if key in out:
                    continue
                out[key] = self.fill(sub, key, resolver, depth + 1, i, minimal=minimal)
                need -= 1
                if need <= 0:
                    break
            while need > 0:
                key = f"item_{len(out) + 1}"
                out[key] = self.fill(sub, key, resolver, depth + 1, len(out), minimal=minimal)
                need -= 1
        return out

    def array(self, schema: dict[str, Any], name: str, resolver: Any, depth: int, *, minimal: bool) -> list[Any]:
        items = schema.get("items", {})
        prefix = schema.get("prefixItems") or []
        lo = int(schema.get("minItems", 0))
        hi = schema.get("maxItems")
        item_schema = items
        if isinstance(item_schema, dict) and "$ref" in item_schema:
            item_schema = resolver.lookup(item_schema["$ref"]).contents
        is_persona = isinstance(item_schema, dict) and roles.is_persona_schema(item_schema)
        if minimal:
            n = max(lo, len(prefix) if items is False else 0, 1 if is_persona else 0)
        elif is_persona or (self.count and isinstance(item_schema, dict) and _first_type(item_schema) == "object"):
            n = self.count or 3
        else:
            n = 3
        n = max(n, lo)
        if hi is not None:
            n = min(n, int(hi))
        if items is False:
            n = min(n, len(prefix))
        out: list[Any] = []
        for i in range(n):
            sub = prefix[i] if i < len(prefix) else items
            value = self.fill(sub, name, resolver, depth + 1, i, minimal=minimal)
            if schema.get("uniqueItems") and value in out:
                value = self.fill(sub, name, resolver, depth + 1, i + n, minimal=minimal)
                if value in out:
                    break
            out.append(value)
        if len(out) < lo:
            raise _Dead(f"'{name}' needs {lo} distinct items")
        return out

    # ---------------------------------------------------------------------------------------------
    def choose_enum(self, values: list[Any], name: str, schema: dict[str, Any], index: int) -> Any:
        if not values:
            raise _Dead(f"'{name}' has an empty enum")
        text_terms = terms(self.conv.question + " " + " ".join(p.text for p in self.conv.corpus.passages[:200]))
        counts = {t: text_terms.count(t) for t in set(text_terms)}

        def score(v: Any) -> int:
            return sum(counts.get(t, 0) for t in terms(str(v)))

        ranked = sorted(range(len(values)), key=lambda i: (-score(values[i]), i))
        return values[ranked[index % len(ranked)]]

    def keyword_pool(self) -> list[str]:
        text = self.conv.question + " " + " ".join(p.text for p in self.conv.content.passages[:100])
        return key_words(text) or ["item"]

    def string(self, name: str, schema: dict[str, Any], index: int, *, minimal: bool) -> str:
        return self.fit_string(self.raw_string(name, schema, index, minimal=minimal), schema)

    def raw_string(self, name: str, schema: dict[str, Any], index: int, *, minimal: bool) -> str:
        key = name.lower()
        fmt = schema.get("format")
        seed = hashlib.sha256((self.conv.all_text + name + str(index)).encode()).hexdigest()
        if fmt == "date-time":
            return "2025-01-01T00:00:00Z"
        if fmt == "date":
            m = re.search(r"\b(19|20)\d\d-[01]\d-[0-3]\d\b", self.conv.all_text)
            return m.group(0) if m else "2025-01-01"
        if fmt == "time":
            return "12:00:00Z"
        if fmt == "email":
            return f"{(key_words(name) or ['contact'])[0].lower()}@example.org"
        if fmt in ("uri", "url", "iri"):
            urls = [s for s in self.conv.corpus.sources if re.match(r"https?://", s)]
            return urls[index % len(urls)] if urls else "https://example.org/"
        if fmt == "uuid":
            return str(uuid.UUID(seed[:32]))
        if fmt in ("ipv4",):
            return "127.0.0.1"
        described = f"{name} {schema.get('description', '')} {schema.get('title', '')}".lower()
        question = self.conv.question
        if re.search(r"search_?query|\bquery\b|\bsearch\b|keyword", key) or "search query" in described:
            query = roles.search_query(self.conv)
            if index:
                extra = key_words(query)
                return " ".join(extra[index % max(1, len(extra)) :] + extra[: index % max(1, len(extra))])
            return query
        if re.search(r"(^|_)(name|title|heading|topic|subject|label|theme)s?$", key):
            if key.endswith("name") and self.kind == "analysts":
                return self._persona_for(index).name
            pool = [t.phrase for t in self.planner.themes] or key_words(question) or ["Overview"]
            base = self.planner.topic if self.kind == "analysts" else (question or self.planner.topic)
            if index == 0:
                return title_case(focus_phrase(base, 8)) or "Overview"
            return title_case(pool[(index - 1) % len(pool)])
        if re.search(r"(^|_)(url|link|source|citation|reference)s?$", key):
            if self._last is not None and self._last.sources:  # where the sentence just written came from
                return self._last.sources[0]
            sources = self.conv.content.sources
            if sources:
                return sources[index % len(sources)]
            return self._title_of_material() or "the text provided in the request"
        if re.search(r"(^|_)(tag|keyword|term|entity|concept)s?$", key):
            pool = self.keyword_pool()
            return pool[index % len(pool)]
        if minimal:
            return phrase(question, 6) or "unknown"
        return self.sentence_for(described, index)

    def _title_of_material(self) -> str:
        """A title the material gives itself: a heading or a short first line of a turn that is not the
        question."""
        for m in self.conv.turns:
            if m.text.strip() == self.conv.question.strip():
                continue
            head = re.search(r"^\s*#{1,6}\s+(.+?)\s*$", m.text, re.M)
            if head:
                return head.group(1)
            first = m.text.strip().splitlines()[0] if m.text.strip() else ""
            if 0 < len(first.split()) <= 10 and not re.search(r"[.!?:]$", first):
                return first
        return ""

    def sentence_for(self, described: str, index: int) -> str:
        query = f"{described} {self.conv.question}"
        material = self.conv.content.passages
        candidates = rank(query, material, k=12) or rank(self.conv.question + " " + self.conv.question, material, k=12)
        fresh = [p for p in candidates if p.text not in self._used]
        if not fresh and (candidates or not self.conv.question.strip()):
            # relevant sentences used up, or no question but the material itself: the material in order
            fresh = [p for p in material if p.text not in self._used]
        pick = fresh[0] if fresh else (candidates[index % len(candidates)] if candidates else None)
        if pick is None:
            subject = phrase(self.conv.question, 8)
            return f"{roles.NOTHING_RELEVANT} {subject}." if subject else "No information available."
        self._used.add(pick.text)
        self._last = pick
        return pick.text

    def fit_string(self, value: str, schema: dict[str, Any]) -> str:
        lo = int(schema.get("minLength", 0))
        hi = schema.get("maxLength")
        if hi is not None and len(value) > int(hi):
            cut = value[: int(hi)]
            # a description of sentences and clauses ends where one does, never mid-phrase
            ends = [m.start() for m in re.finditer(r"[.;](?=\s)", cut)]
            whole = cut[: ends[-1]].rstrip(" ;,") + "." if ends else ""
            if len(whole) >= max(lo, int(hi) // 2):
                value = whole
            else:
                value = cut.rsplit(" ", 1)[0] if " " in cut and len(cut.rsplit(" ", 1)[0]) >= lo else cut
        if len(value) < lo:
            filler = " ".join(p.text for p in self.conv.content.passages) or value or "x"
            while len(value) < lo:
                value = (value + " " + filler).strip() if value else filler
            if hi is not None:
                value = value[: int(hi)]
        pattern = schema.get("pattern")
        if pattern and not re.search(pattern, value):
            value = self._pattern_value(pattern, lo, hi, value)
        return value

    def _pattern_value(self, pattern: str, lo: int, hi: Any, current: str) -> str:
        for candidate in key_words(current) + [w.lower() for w in key_words(current)]:
            if re.search(pattern, candidate) and len(candidate) >= lo and (hi is None or len(candidate) <= int(hi)):
                return candidate
        try:
            generated = exrex.generate(pattern, limit=20)
            for i, candidate in enumerate(generated):
                candidate = cast(str, candidate)
                if len(candidate) >= lo and (hi is None or len(candidate) <= int(hi)) and re.search(pattern, candidate):
                    return candidate
                if i > 200:
                    break
        except Exception as exc:  # exrex raises assorted errors on regexes it cannot expand
            raise _Dead(f"cannot generate a string matching {pattern!r}") from exc
        raise _Dead(f"cannot generate a string matching {pattern!r}")

    def number(self, schema: dict[str, Any], name: str, *, integer: bool, index: int) -> int | float:
        key = name.lower()
        lo = schema.get("minimum")
        hi = schema.get("maximum")
        xlo = schema.get("exclusiveMinimum")
        xhi = schema.get("exclusiveMaximum")
        if re.search(r"count|^num|number|^max_|total|^n_|quantity|amount", key):
            value: float = float(self.count or 3)
        elif re.search(r"score|confidence|probability|rating|relevance|weight", key):
            top = hi if hi is not None else (xhi if xhi is not None else 1.0)
            bottom = lo if lo is not None else (xlo if xlo is not None else 0.0)
            value = bottom + (top - bottom) * 0.8
        elif "year" in key:
            years = re.findall(r"\b(?:19|20)\d\d\b", self.conv.all_text)
            value = float(years[0]) if years else 2025.0
        else:
            value = float(index + 1)
        if lo is not None:
            value = max(value, float(lo))
        if xlo is not None and value <= float(xlo):
            value = float(xlo) + (1 if integer else 0.5)
        if hi is not None:
            value = min(value, float(hi))
        if xhi is not None and value >= float(xhi):
            value = float(xhi) - (1 if integer else 0.5)
        step = schema.get("multipleOf")
        if step:
            value = round(value / float(step)) * float(step)
            if lo is not None and value < float(lo):
                value += float(step)
            if hi is not None and value > float(hi):
                value -= float(step)
        if integer:
            return int(round(value))
        return round(value, 6)


def fill(schema: dict[str, Any], conv: Conversation, *, kind: str = "other") -> Any:
    """A valid instance of ``schema`` built from ``conv`` (raises UnsatisfiableSchema)."""
    return SchemaFiller(schema, conv, kind=kind).instance()
