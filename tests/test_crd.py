"""The generated CRD: committed copy up to date, structural, described, and defaults == the models'."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import BaseModel, Field

from research_api import crd, crd_docs
from research_api.researchjob import (
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    ResearchJobSpec,
    ResearchJobStatus,
    ResourceList,
)

ROOT = Path(__file__).resolve().parents[1]
CRD_FILE = ROOT / "crds" / "researchjobs.researchops.io.yaml"
ENDPOINT_CRD_FILE = ROOT / "crds" / "modelendpoints.researchops.io.yaml"
DOCS_FILE = ROOT / "docs" / "api.md"

MINIMAL_SPEC: dict[str, Any] = {"topic": "Quantum error correction", "sources": [{"type": "wikipedia"}]}


def schema() -> dict[str, Any]:
    return crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


def nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node below ``node`` with its field path."""
    yield path, node
    for name, prop in node.get("properties", {}).items():
        yield from nodes(prop, f"{path}.{name}".lstrip("."))
    if isinstance(node.get("items"), dict):
        yield from nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from nodes(node["additionalProperties"], f"{path}{{}}")


def apply_defaults(obj: Any, node: dict[str, Any]) -> Any:
    """Structural defaulting as the API server does it: set missing defaulted fields, then descend."""
    obj = copy.deepcopy(obj)
    if isinstance(obj, dict):
        for name, prop in node.get("properties", {}).items():
            if name not in obj and "default" in prop:
                obj[name] = copy.deepcopy(prop["default"])
        for name, value in obj.items():
            if name in node.get("properties", {}):
                obj[name] = apply_defaults(value, node["properties"][name])
    elif isinstance(obj, list) and "items" in node:
        obj = [apply_defaults(item, node["items"]) for item in obj]
    return obj


def docs_examples() -> list[dict[str, Any]]:
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS_FILE.read_text(), flags=re.S)
    return [doc for block in blocks if (doc := yaml.safe_load(block)).get("kind") == KIND]


# ---- generated files are up to date -----------------------------------------------------------


def test_committed_crd_is_the_generated_one() -> None:
    assert CRD_FILE.read_text() == crd.render_crd(), "crds/ is stale: run `make crds` and commit it"


def test_committed_endpoint_crd_is_the_generated_one() -> None:
    assert ENDPOINT_CRD_FILE.read_text() == crd.render_endpoint_crd(), "crds/ is stale: run `make crds` and commit it"


def test_chart_carries_both_generated_crds() -> None:
    chart = ROOT / "charts" / "research-operator" / "crds"
    for f in (CRD_FILE, ENDPOINT_CRD_FILE):
        assert (chart / f.name).read_text() == f.read_text(), "the chart's CRDs are stale: run `make chart-crds`"


def test_endpoint_crd_is_cluster_scoped_structural_described_and_shows_use() -> None:
    doc = yaml.safe_load(ENDPOINT_CRD_FILE.read_text())
    spec = doc["spec"]
    assert doc["metadata"]["name"] == f"modelendpoints.{GROUP}"
    assert spec["scope"] == "Cluster" and spec["names"]["kind"] == "ModelEndpoint"
    (version,) = spec["versions"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["InFlight"] == ".status.requestsInFlightLimit" and columns["Max"] == ".spec.maxConcurrentRequests"
    root = version["schema"]["openAPIV3Schema"]
    assert set(root["properties"]["spec"]["required"]) == {"baseUrl", "maxConcurrentRequests"}
    assert root["properties"]["spec"]["properties"]["maxConcurrentRequests"]["minimum"] == 1
    spec_nodes = nodes(root["properties"]["spec"])
    missing = [p for p, n in spec_nodes if p and not p.endswith(("[]", "{}")) and not n.get("description")]
    assert not missing, f"fields without a description: {missing}"
    for path, node in nodes(root):
        assert "$ref" not in node and "anyOf" not in node and "title" not in node, path
    jsonschema.Draft7Validator.check_schema(root["properties"]["spec"])


def test_docs_field_reference_is_the_generated_one() -> None:
    text = DOCS_FILE.read_text()
    assert crd_docs.splice_docs(text, crd.render_markdown()) == text, "docs/api.md is stale: run `make crds`"


def test_check_mode_reports_a_stale_file_and_leaves_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "crd.yaml"
    out.write_text(crd.render_crd().replace("batchSize", "batchsize"))
    assert crd.main(["--check", "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "is out of date: run `make crds`" in err
    assert "-                  batchsize:" in err and "+                  batchSize:" in err
    assert "batchsize" in out.read_text()

    assert crd.main(["--output", str(out)]) == 0
    assert out.read_text() == crd.render_crd()
    assert crd.main(["--check", "--output", str(out)]) == 0


def test_check_mode_reports_stale_docs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, docs = tmp_path / "crd.yaml", tmp_path / "api.md"
    out.write_text(crd.render_crd())
    docs.write_text(f"# intro\n\n{crd_docs.DOCS_BEGIN}\nold table\n{crd_docs.DOCS_END}\n\nafter\n")
    assert crd.main(["--check", "--output", str(out), "--docs", str(docs)]) == 1
    assert "api.md is out of date" in capsys.readouterr().err
    assert crd.main(["--output", str(out), "--docs", str(docs)]) == 0
    text = docs.read_text()
    assert text.startswith("# intro\n\n") and text.endswith("\n\nafter\n") and "old table" not in text
    assert "| `spec.parallelism.batchSize` | integer | `2` | >= 1; <= 10 |" in text


def test_markdown_flag_prints_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    assert crd.main(["--markdown"]) == 0
    out = capsys.readouterr().out
    assert out == crd.render_markdown()
    assert "| `spec.topic` | string | required | length >= 3; length <= 2000 | The research topic. |" in out


# ---- the CRD's shape --------------------------------------------------------------------------


def test_names_scope_subresources_and_columns() -> None:
    doc = yaml.safe_load(CRD_FILE.read_text())
    assert doc["apiVersion"] == "apiextensions.k8s.io/v1"
    assert doc["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    spec = doc["spec"]
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == ["rj"] and spec["names"]["categories"] == ["research"]
    (version,) = spec["versions"]
    assert version["name"] == VERSION and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: (c["jsonPath"], c.get("priority", 0)) for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Phase": (".status.phase", 0),
        "Progress": (".status.progress", 0),
        "Active": (".status.batches.active", 0),
        "Waiting": (".status.waitingFor", 0),
        "Tokens": (".status.tokensUsed", 1),
        "Estimate": (".status.estimate.tokens", 1),
        "Cited": (".status.quality.citationAccuracy", 1),
        "Coverage": (".status.quality.coverage", 1),
        "Sources": (".status.quality.sourcesCited", 1),
        "Message": (".status.message", 1),
        "Age": (".metadata.creationTimestamp", 0),
    }
    assert "&id" not in CRD_FILE.read_text(), "no YAML anchors/aliases in a CRD"


def test_every_property_has_a_description() -> None:
    missing = [
        path
        for path, node in nodes(schema())
        if path and path != "metadata" and not path.endswith(("[]", "{}")) and not node.get("description")
    ]
    assert missing == []


def test_schema_is_structural() -> None:
    for path, node in nodes(schema()):
        assert "$ref" not in node and "title" not in node, path
        assert not {"oneOf", "allOf", "not", "nullable", "const"} & node.keys(), path
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}] and "type" not in node, path
        else:
            assert "anyOf" not in node, path
            assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, path
        assert node.get("additionalProperties", True) is not False, path
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            assert isinstance(node.get(key, False), bool), path
        assert node.get("default", "") is not None, path
        assert set(node.get("required", [])) <= set(node.get("properties", {})), path


def test_optional_fields_are_plain_and_not_required() -> None:
    spec = schema()["properties"]["spec"]
    assert spec["required"] == ["topic", "sources"]
    feedback = spec["properties"]["analysts"]["properties"]["feedback"]
    assert feedback == {
        "description": "Human feedback on the planned analysts; a new value plans the panel again with it.",
        "type": "string",
        "maxLength": 4000,
    }
    ref = spec["properties"]["store"]["properties"]["dsnSecretRef"]
    assert ref["type"] == "object" and ref["required"] == ["name", "key"]
    assert ref["description"].startswith("For postgres: the Secret key holding the connection string (DSN).")


def test_ranges_lengths_patterns_enums_and_maps() -> None:
    props = schema()["properties"]["spec"]["properties"]
    assert props["parallelism"]["properties"]["batchSize"] | {"description": ""} == {
        "description": "",
        "type": "integer",
        "default": 2,
        "minimum": 1,
        "maximum": 10,
    }
    rps = props["model"]["properties"]["requestsPerSecond"]
    assert (rps["minimum"], rps["exclusiveMinimum"], rps["maximum"]) == (0, True, 1000)
    assert props["topic"]["minLength"] == 3 and props["topic"]["maxLength"] == 2000
    assert (props["sources"]["minItems"], props["sources"]["maxItems"]) == (1, 5)
    assert props["sources"]["items"]["properties"]["type"]["enum"] == ["documents", "tavily", "wikipedia"]
    assert props["model"]["properties"]["baseUrl"]["pattern"] == "^https?://"
    assert props["worker"]["properties"]["nodeSelector"]["additionalProperties"] == {"type": "string"}
    cpu = props["worker"]["properties"]["resources"]["properties"]["requests"]["properties"]["cpu"]
    assert cpu["x-kubernetes-int-or-string"] is True and cpu["minimum"] == 0
    phase = schema()["properties"]["status"]["properties"]["phase"]
    assert phase["enum"][0] == "Pending" and phase["default"] == "Pending"


def test_cel_rules_carry_over_and_guard_started_jobs() -> None:
    root = schema()
    spec_rules = {r["message"]: r["rule"] for r in root["properties"]["spec"]["x-kubernetes-validations"]}
    extra: Any = ResearchJobSpec.model_config.get("json_schema_extra")
    assert spec_rules == {r["message"]: r["rule"] for r in extra["x-kubernetes-validations"]}

    by_path = {r["fieldPath"]: r for r in root["x-kubernetes-validations"]}
    assert set(by_path) == {".spec.topic", ".spec.analysts.count", ".spec.sources", ".spec.store", ".metadata.name"}
    for field in ("spec.topic", "spec.analysts.count", "spec.sources", "spec.store"):
        rule = by_path["." + field]
        assert rule["rule"] == (
            "!(has(oldSelf.status) && has(oldSelf.status.phase) && oldSelf.status.phase != 'Pending') "
            f"|| self.{field} == oldSelf.{field}"
        )
        assert rule["message"].startswith(f"{field} cannot change once the job has started; create a new ResearchJob")
    assert by_path[".metadata.name"]["rule"] == "size(self.metadata.name) <= 40"


# ---- defaults: what the API server fills in is what the models default to ---------------------


def test_server_defaults_equal_the_model_defaults() -> None:
    root = schema()
    defaulted = apply_defaults(MINIMAL_SPEC, root["properties"]["spec"])
    assert defaulted == ResearchJobSpec.model_validate(MINIMAL_SPEC).wire()
    assert defaulted["parallelism"] == {"batchSize": 2, "maxActiveJobs": 2}
    assert defaulted["worker"]["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    assert defaulted["sources"] == [{"type": "wikipedia", "maxResults": 3}]

    # A partly given object gets the rest of its fields from the nested defaults.
    partial = apply_defaults(
        {**MINIMAL_SPEC, "worker": {"resources": {"limits": {"cpu": "2"}}}}, root["properties"]["spec"]
    )
    assert partial["worker"]["resources"] == {"limits": {"cpu": "2"}, "requests": {"cpu": "100m", "memory": "256Mi"}}

    status = apply_defaults({}, root["properties"]["status"])
    assert status == ResearchJobStatus().wire()


def test_every_default_validates_against_its_model_and_its_schema() -> None:
    spec_schema = schema()["properties"]["spec"]
    for path, node in nodes(schema()):
        if "default" in node:
            jsonschema.Draft4Validator(node).validate(node["default"])
            # The same default, put into a minimal spec, parses with the pydantic model.
            if path.startswith("spec.") and "[]" not in path:
                doc: dict[str, Any] = copy.deepcopy(MINIMAL_SPEC)
                *parents, leaf = path.split(".")[1:]
                target = doc
                for p in parents:
                    target = target.setdefault(p, {})
                target[leaf] = node["default"]
                ResearchJobSpec.model_validate(doc)
                jsonschema.Draft4Validator(spec_schema).validate(doc)


def test_docs_examples_are_valid() -> None:
    examples = docs_examples()
    assert len(examples) == 3
    root = schema()
    for doc in examples:
        assert doc["apiVersion"] == f"{GROUP}/{VERSION}"
        assert len(doc["metadata"]["name"]) <= crd.MAX_NAME_LENGTH
        jsonschema.Draft4Validator(root["properties"]["spec"]).validate(doc["spec"])
        ResearchJobSpec.model_validate(doc["spec"])


# ---- the generator fails loudly on what it cannot express -------------------------------------


def test_unsupported_unions_are_refused() -> None:
    class Mixed(BaseModel):
        value: int | str = Field(description="Either.")

    with pytest.raises(crd.UnsupportedSchema, match=r"mixed\.value: anyOf other than Optional"):
        crd.model_schema(Mixed, "mixed")


def test_quantities_accept_whole_numbers_like_the_api_server() -> None:
    # The API server stores `cpu: 1` as an integer; the model must parse it back.
    assert ResourceList.model_validate({"cpu": 1, "memory": "1Gi"}).cpu == "1"
    with pytest.raises(ValueError, match="should match pattern"):
        ResourceList.model_validate({"cpu": -1})
