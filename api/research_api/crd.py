"""The ResearchJob CustomResourceDefinition, generated from the pydantic models in ``researchjob``.

The models are the one source of truth. This module turns their JSON schema into the structural
OpenAPI v3 schema the API server wants: every ``$ref`` inlined, ``Optional[X]`` (``anyOf`` with
``null``) reduced to ``X`` (and left out of ``required``), pydantic's ``title``s dropped, defaults
that pydantic keeps in a ``default_factory`` written out (so the API server fills them in), JSON
Schema 2020 ``exclusiveMinimum: x`` rewritten as OpenAPI's ``minimum: x, exclusiveMinimum: true``,
quantities as ``x-kubernetes-int-or-string``. On top it adds the rules that only make sense on the
whole object: the fields that cannot change once the job has started, and the length of
``metadata.name``.

Command line (run from the repository root)::

    python -m research_api.crd                  # write crds/researchjobs.researchops.io.yaml
                                                # and crds/modelendpoints.researchops.io.yaml
    python -m research_api.crd --docs docs/api.md  # ... and the field reference in docs/api.md
    python -m research_api.crd --check --docs docs/api.md  # exit 1 when a committed file is stale
    python -m research_api.crd --markdown       # print the field reference
"""

from __future__ import annotations

import argparse
import copy
import difflib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, NoDefault
from pydantic_core import core_schema

from research_api.crd_docs import DOCS_BEGIN, field_reference, splice_docs
from research_api.modelendpoint import (
    ENDPOINT_KIND,
    ENDPOINT_PLURAL,
    ENDPOINT_SHORT_NAMES,
    ENDPOINT_SINGULAR,
    ModelEndpointSpec,
    ModelEndpointStatus,
)
from research_api.researchjob import (
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    ResearchJobSpec,
    ResearchJobStatus,
)

CRD_NAME = f"{PLURAL}.{GROUP}"
DEFAULT_OUTPUT = Path("crds") / f"{CRD_NAME}.yaml"
ENDPOINT_CRD_NAME = f"{ENDPOINT_PLURAL}.{GROUP}"
ENDPOINT_OUTPUT = Path("crds") / f"{ENDPOINT_CRD_NAME}.yaml"
CATEGORIES = ["research"]

# metadata.name of a ResearchJob is the prefix of the names of the Jobs, ConfigMaps and pods made
# for it (e.g. "<name>-b12-<hash>"); 40 leaves room for those suffixes within 63 characters.
MAX_NAME_LENGTH = 40

# The job has started once the operator moved it out of Pending.
STARTED = "has(oldSelf.status) && has(oldSelf.status.phase) && oldSelf.status.phase != 'Pending'"

# (field path from the root, what the user should do instead) for each field frozen once started.
IMMUTABLE_AFTER_START: list[tuple[str, str]] = [
    ("spec.topic", "create a new ResearchJob for another topic"),
    ("spec.analysts.count", "create a new ResearchJob for another panel size"),
    ("spec.sources", "create a new ResearchJob with the other sources"),
    ("spec.store", "create a new ResearchJob to use another store (this one's results are kept in the current store)"),
]

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Where the job is."},
    {
        "name": "Progress",
        "type": "string",
        "jsonPath": ".status.progress",
        "description": "Sections written over analysts planned.",
    },
    {"name": "Active", "type": "integer", "jsonPath": ".status.batches.active", "description": "Worker Jobs running."},
    {
        "name": "Waiting",
        "type": "string",
        "jsonPath": ".status.waitingFor",
        "description": "What its next worker Jobs wait for (EndpointCapacity, TokenBudget, ExceededQuota, ...).",
    },
    {
        "name": "Tokens",
        "type": "integer",
        "jsonPath": ".status.tokensUsed",
        "priority": 1,
        "description": "LLM tokens used so far.",
    },
    {
        "name": "Estimate",
        "type": "integer",
        "jsonPath": ".status.estimate.tokens",
        "priority": 1,
        "description": "LLM tokens estimated before it started.",
    },
    {
        "name": "Cited",
        "type": "integer",
        "jsonPath": ".status.quality.citationAccuracy",
        "priority": 1,
        "description": "Percent of cited sentences supported by the passage they cite.",
    },
    {
        "name": "Coverage",
        "type": "integer",
        "jsonPath": ".status.quality.coverage",
        "priority": 1,
        "description": "Percent of the documents relevant to the topic that the report cites.",
    },
    {
        "name": "Sources",
        "type": "integer",
        "jsonPath": ".status.quality.sourcesCited",
        "priority": 1,
        "description": "Sources the report cites.",
    },
    {
        "name": "Message",
        "type": "string",
        "jsonPath": ".status.message",
        "priority": 1,
        "description": "What is happening now.",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

ROOT_DESCRIPTION = (
    "A ResearchJob researches a topic with a panel of LLM analyst personas: the operator plans the "
    "analysts, runs their interviews with an expert (who answers from the configured sources) in "
    "worker Jobs, and writes a report from the interviews."
)

# Key order in every emitted schema node: what a reader looks for first comes first.
_KEY_ORDER = [
    "description",
    "type",
    "format",
    "anyOf",
    "x-kubernetes-int-or-string",
    "enum",
    "default",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "x-kubernetes-validations",
]


class _Dumper(yaml.SafeDumper):
    """Writes repeated sub-schemas out in full: no YAML anchors and aliases in a CRD."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


class UnsupportedSchema(ValueError):
    """The models use a JSON schema construct that has no structural OpenAPI equivalent here."""


class _WithFactoryDefaults(GenerateJsonSchema):
    """Emits the defaults that pydantic keeps in a ``default_factory``, in their wire form.

    A factory's value is a model instance (``ResourcesSpec()``) or a plain value; models are
    dumped the way the API server stores them: camelCase, without unset optionals.
    """

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is None or schema.get("default_factory_takes_data"):
            return super().get_default_value(schema)
        value = factory()  # type: ignore[call-arg]
        return _wire(value)

    def encode_default(self, dft: Any) -> Any:
        return super().encode_default(_wire(dft))


def _wire(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(by_alias=True, exclude_none=True, mode="json")
    return value


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    rank = {k: i for i, k in enumerate(_KEY_ORDER)}
    return dict(sorted(node.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def _structural(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    """One pydantic JSON schema node as a structural OpenAPI v3 schema node."""
    node = dict(node)
    while "$ref" in node or ("anyOf" in node and not node.get("x-kubernetes-int-or-string")):
        if "$ref" in node:
            target = defs[node.pop("$ref").removeprefix("#/$defs/")]
            node = {**target, **node}  # the property's own default and description win ...
            if target.get("description") and node.get("description") != target["description"]:
                # ... and the model's docstring follows, so `kubectl explain` says what the object is.
                node["description"] = f"{node['description']} {target['description']}"
            continue
        options = [o for o in node["anyOf"] if o != {"type": "null"}]
        if len(options) != 1 or len(options) == len(node["anyOf"]):
            raise UnsupportedSchema(f"{path}: anyOf other than Optional[...] is not supported: {node['anyOf']}")
        del node["anyOf"]
        node = {**options[0], **node}
    for key in ("oneOf", "allOf", "not", "const", "$defs"):
        if key in node:
            raise UnsupportedSchema(f"{path}: {key} has no structural equivalent here")

    node.pop("title", None)
    if node.get("default", NoDefault) is None:
        del node["default"]
    if node.get("additionalProperties") is False:
        # Structural schemas prune unknown fields (and kubectl rejects them with field validation).
        del node["additionalProperties"]
    for bound in ("Minimum", "Maximum"):
        exclusive = node.get(f"exclusive{bound}")
        if exclusive is not None and not isinstance(exclusive, bool):
            node[bound.lower()] = exclusive
            node[f"exclusive{bound}"] = True
    if node.pop("x-kubernetes-int-or-string", False):
        if node.pop("type", "string") != "string":
            raise UnsupportedSchema(f"{path}: x-kubernetes-int-or-string on a non-string type")
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        node["x-kubernetes-int-or-string"] = True

    if "properties" in node:
        node["properties"] = {
            name: _structural(prop, defs, f"{path}.{name}") for name, prop in node["properties"].items()
        }
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _structural(node["additionalProperties"], defs, f"{path}.*")
    if "items" in node:
        node["items"] = _structural(node["items"], defs, f"{path}[*]")
    if "type" not in node and not node.get("x-kubernetes-int-or-string"):
        raise UnsupportedSchema(f"{path}: no type")
    return _ordered(node)


def model_schema(model: type[BaseModel], path: str) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of one pydantic model (as the wire form, camelCase)."""
    raw = model.model_json_schema(by_alias=True, mode="validation", schema_generator=_WithFactoryDefaults)
    defs = raw.pop("$defs", {})
    return _structural(raw, defs, path)


def _immutable_rule(field_path: str, advice: str) -> dict[str, str]:
    expr = "self." + field_path
    return {
        "rule": f"!({STARTED}) || {expr} == old{expr[0].upper()}{expr[1:]}",
        "message": f"{field_path} cannot change once the job has started; {advice}",
        "fieldPath": "." + field_path,
        "reason": "FieldValueForbidden",
    }


def openapi_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the ResearchJob resource."""
    spec = model_schema(ResearchJobSpec, "spec")
    status = model_schema(ResearchJobStatus, "status")
    root_rules = [_immutable_rule(p, advice) for p, advice in IMMUTABLE_AFTER_START]
    root_rules.append(
        {
            "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH}",
            "message": (
                f"metadata.name must be at most {MAX_NAME_LENGTH} characters, so that the names of the Jobs "
                "and ConfigMaps made for the ResearchJob fit; choose a shorter name"
            ),
            "fieldPath": ".metadata.name",
            "reason": "FieldValueInvalid",
        }
    )
    return _ordered(
        {
            "description": ROOT_DESCRIPTION,
            "type": "object",
            "required": ["spec"],
            "properties": {
                "apiVersion": {
                    "description": "Versioned schema of this object: researchops.io/v1alpha1.",
                    "type": "string",
                },
                "kind": {"description": "Kind of this object: ResearchJob.", "type": "string"},
                # The API server allows no description here, only rules on name and generateName.
                "metadata": {
                    "type": "object",
                    "properties": {
                        "name": {
                            "description": f"Name of the ResearchJob (at most {MAX_NAME_LENGTH} characters).",
                            "type": "string",
                        }
                    },
                },
                "spec": spec,
                "status": status,
            },
            "x-kubernetes-validations": root_rules,
        }
    )


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition of ResearchJob (apiextensions.k8s.io/v1)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": copy.deepcopy(PRINTER_COLUMNS),
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


ENDPOINT_PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "URL", "type": "string", "jsonPath": ".spec.baseUrl", "description": "The endpoint's base URL."},
    {
        "name": "Max",
        "type": "integer",
        "jsonPath": ".spec.maxConcurrentRequests",
        "description": "Most requests in flight at once.",
    },
    {
        "name": "InFlight",
        "type": "integer",
        "jsonPath": ".status.requestsInFlightLimit",
        "description": "Requests the admitted pods can have in flight.",
    },
    {"name": "Pods", "type": "integer", "jsonPath": ".status.pods", "description": "Worker pods admitted."},
    {
        "name": "Waiting",
        "type": "integer",
        "jsonPath": ".status.waitingResearchJobs",
        "description": "ResearchJobs waiting for capacity.",
    },
    {"name": "RPM", "type": "integer", "jsonPath": ".spec.requestsPerMinute", "priority": 1},
    {"name": "TPM", "type": "integer", "jsonPath": ".spec.tokensPerMinute", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

ENDPOINT_DESCRIPTION = (
    "A ModelEndpoint declares what a shared model endpoint can take (requests in flight, requests and tokens "
    "per minute). The operator admits the worker pods of every ResearchJob that calls it against that capacity "
    "and gives each pod its share; status shows the admitted use and the shares."
)


def endpoint_openapi_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the ModelEndpoint resource."""
    return _ordered(
        {
            "description": ENDPOINT_DESCRIPTION,
            "type": "object",
            "required": ["spec"],
            "properties": {
                "apiVersion": {
                    "description": "Versioned schema of this object: researchops.io/v1alpha1.",
                    "type": "string",
                },
                "kind": {"description": "Kind of this object: ModelEndpoint.", "type": "string"},
                "metadata": {"type": "object"},
                "spec": model_schema(ModelEndpointSpec, "spec"),
                "status": model_schema(ModelEndpointStatus, "status"),
            },
        }
    )


def build_endpoint_crd() -> dict[str, Any]:
    """The CustomResourceDefinition of ModelEndpoint (cluster-scoped)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": ENDPOINT_CRD_NAME},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": ENDPOINT_KIND,
                "listKind": f"{ENDPOINT_KIND}List",
                "plural": ENDPOINT_PLURAL,
                "singular": ENDPOINT_SINGULAR,
                "shortNames": list(ENDPOINT_SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "scope": "Cluster",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": copy.deepcopy(ENDPOINT_PRINTER_COLUMNS),
                    "schema": {"openAPIV3Schema": endpoint_openapi_schema()},
                }
            ],
        },
    }


def render_endpoint_crd() -> str:
    """The ModelEndpoint CRD as the YAML committed in crds/."""
    header = (
        "# Generated by `python -m research_api.crd` (make crds) from api/research_api/modelendpoint.py.\n"
        "# Do not edit by hand: change the pydantic models and regenerate.\n"
    )
    return header + yaml.dump(build_endpoint_crd(), Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


def render_crd() -> str:
    """The CRD as the YAML committed in crds/."""
    header = (
        "# Generated by `python -m research_api.crd` (make crds) from api/research_api/researchjob.py.\n"
        "# Do not edit by hand: change the pydantic models and regenerate.\n"
    )
    return header + yaml.dump(build_crd(), Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


def render_markdown() -> str:
    """The field reference of spec and status, with the cross-field rules, as Markdown."""
    return field_reference(openapi_schema())


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def _sync(path: Path, want: Callable[[str], str], check: bool) -> bool:
    """Write (or with ``check`` compare) one generated file; True when it is up to date."""
    have = path.read_text() if path.exists() else ""
    wanted = want(have)
    if have == wanted:
        return True
    if check:
        diff = difflib.unified_diff(
            have.splitlines(keepends=True), wanted.splitlines(keepends=True), f"{path} (on disk)", f"{path} (generated)"
        )
        sys.stderr.writelines(diff)
        sys.stderr.write(f"\n{path} is out of date: run `make crds` (python -m research_api.crd) and commit it.\n")
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(wanted)
    sys.stdout.write(f"wrote {path}\n")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m research_api.crd", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="CRD YAML file (default: %(default)s)")
    parser.add_argument(
        "--endpoint-output", type=Path, default=ENDPOINT_OUTPUT, help="ModelEndpoint CRD file (default: %(default)s)"
    )
    parser.add_argument("--docs", type=Path, help="Markdown file whose generated field reference to update")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 with a diff when a file differs")
    parser.add_argument("--markdown", action="store_true", help="print the field reference and exit")
    args = parser.parse_args(argv)

    if args.markdown:
        sys.stdout.write(render_markdown())
        return 0
    crd_text = render_crd()
    ok = _sync(args.output, lambda _: crd_text, args.check)
    endpoint_text = render_endpoint_crd()
    ok = _sync(args.endpoint_output, lambda _: endpoint_text, args.check) and ok
    if args.docs is not None:
        reference = render_markdown()
        if not args.docs.exists():
            parser.error(f"{args.docs} does not exist (it needs the {DOCS_BEGIN!r} markers)")
        ok = _sync(args.docs, lambda have: splice_docs(have, reference), args.check) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
