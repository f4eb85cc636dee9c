"""The generated CRD on a real API server: what a user sees from kubectl.

The CRD is applied once (server-side apply) and left installed for the rest of the session.
Every manifest goes through kubectl, and the assertions are on the text kubectl prints.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from research_api.crd import CRD_NAME
from research_api.researchjob import GROUP, KIND, VERSION, ResearchJobSpec
from tests.fixtures.cluster import ClusterHandle

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
CRD_FILE = ROOT / "crds" / "researchjobs.researchops.io.yaml"
DOCS_FILE = ROOT / "docs" / "api.md"

TOPIC = "The benefits of adopting LangGraph as an agent framework"


def manifest(name: str = "demo", **spec: Any) -> dict[str, Any]:
    """A ResearchJob; ``spec`` overrides the minimal valid spec (a value of None removes the key)."""
    body: dict[str, Any] = {"topic": TOPIC, "sources": [{"type": "wikipedia"}]}
    body.update(spec)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name},
        "spec": {k: v for k, v in body.items() if v is not None},
    }


def until(check: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def crd(cluster: ClusterHandle, no_test_operator: None) -> ClusterHandle:
    """The cluster with the committed CRD applied and Established."""
    cluster.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=research-operator-tests",
        "-f",
        str(CRD_FILE),
    )
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    # Established means served; discovery (for `rj` and `research`) can lag a moment behind.
    until(lambda: cluster.kubectl("get", "rj", "-A", check=False).returncode == 0, what="rj in discovery")
    return cluster


def kubectl_in(c: ClusterHandle, ns: str, *args: str, body: dict[str, Any] | None = None) -> tuple[int, str]:
    """Run kubectl in ``ns`` (``body`` on stdin); returns (exit code, stdout + stderr)."""
    done = c.kubectl("-n", ns, *args, check=False, input=json.dumps(body) if body is not None else None)
    return done.returncode, done.stdout + done.stderr


def rejected(c: ClusterHandle, ns: str, body: dict[str, Any]) -> str:
    """kubectl create --dry-run=server must fail; returns what kubectl printed."""
    code, out = kubectl_in(c, ns, "create", "--dry-run=server", "-f", "-", body=body)
    assert code != 0, f"accepted but should be rejected:\n{out}"
    return out


def get(c: ClusterHandle, ns: str, name: str) -> dict[str, Any]:
    return json.loads(c.kubectl("-n", ns, "get", "rj", name, "-o", "json").stdout)  # type: ignore[no-any-return]


def patch(c: ClusterHandle, ns: str, name: str, body: dict[str, Any], status: bool = False) -> tuple[int, str]:
    extra = ["--subresource=status"] if status else []
    return kubectl_in(c, ns, "patch", "rj", name, *extra, "--type=merge", "-p", json.dumps(body))


# ---- accepted, with defaults ------------------------------------------------------------------


def test_crd_is_structural_and_established(crd: ClusterHandle) -> None:
    got = json.loads(crd.kubectl("get", "crd", CRD_NAME, "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in got["status"]["conditions"]}
    assert conditions["Established"] == "True" and conditions["NamesAccepted"] == "True"
    assert "NonStructuralSchema" not in conditions
    assert got["status"]["acceptedNames"]["shortNames"] == ["rj"]


def test_minimal_manifest_is_accepted_and_defaulted_by_the_api_server(crd: ClusterHandle, namespace: str) -> None:
    code, out = kubectl_in(crd, namespace, "create", "-f", "-", body=manifest())
    assert code == 0, out
    assert "researchjob.researchops.io/demo created" in out

    spec = get(crd, namespace, "demo")["spec"]
    assert spec["parallelism"]["batchSize"] == 2
    assert spec["analysts"] == {"count": 3, "review": False, "approved": False}
    assert spec["worker"]["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    assert spec["sources"] == [{"type": "wikipedia", "maxResults": 3}]
    # Exactly the defaults the operator's models would fill in.
    assert spec == ResearchJobSpec.model_validate(manifest()["spec"]).wire()


def test_status_cannot_be_set_on_create(crd: ClusterHandle, namespace: str) -> None:
    body = manifest() | {"status": {"phase": "Succeeded"}}
    code, out = kubectl_in(crd, namespace, "create", "-f", "-", body=body)
    assert code == 0, out
    assert "status" not in get(crd, namespace, "demo")


def test_whole_number_quantities_are_accepted(crd: ClusterHandle, namespace: str) -> None:
    body = manifest(worker={"resources": {"limits": {"cpu": 2, "memory": "2Gi"}}})
    code, out = kubectl_in(crd, namespace, "create", "-f", "-", body=body)
    assert code == 0, out
    spec = get(crd, namespace, "demo")["spec"]
    assert spec["worker"]["resources"]["limits"] == {"cpu": 2, "memory": "2Gi"}
    assert ResearchJobSpec.model_validate(spec).worker.resources.limits.cpu == "2"


# ---- rejected, with a message that says what to fix --------------------------------------------

INVALID: dict[str, tuple[dict[str, Any], list[str]]] = {
    "no topic": (manifest(topic=None), ["spec.topic: Required value"]),
    "short topic": (manifest(topic="AI"), ["spec.topic", "should be at least 3 chars long"]),
    "no sources": (manifest(sources=None), ["spec.sources: Required value"]),
    "empty sources": (manifest(sources=[]), ["spec.sources", "should have at least 1 items"]),
    "zero analysts": (
        manifest(analysts={"count": 0}),
        ["spec.analysts.count: Invalid value: 0", "should be greater than or equal to 1"],
    ),
    "too many analysts": (manifest(analysts={"count": 51}), ["should be less than or equal to 50"]),
    "batchSize 11": (
        manifest(parallelism={"batchSize": 11}),
        ["spec.parallelism.batchSize: Invalid value: 11", "should be less than or equal to 10"],
    ),
    "unknown source type": (
        manifest(sources=[{"type": "foo"}]),
        ['spec.sources[0].type: Unsupported value: "foo"', 'supported values: "documents", "tavily", "wikipedia"'],
    ),
    "documents without configMap": (
        manifest(sources=[{"type": "wikipedia"}, {"type": "documents"}]),
        [
            "spec.sources: Invalid value",
            "a source of type documents needs configMap: the ConfigMap holding the documents",
        ],
    ),
    "tavily without key": (
        manifest(sources=[{"type": "tavily"}]),
        ["a source of type tavily needs apiKeySecretRef: the Secret key holding the Tavily key"],
    ),
    "postgres without DSN": (
        manifest(store={"type": "postgres"}),
        [
            "spec.store.dsnSecretRef: Required value",
            "store type postgres needs store.dsnSecretRef: the Secret key holding the DSN",
        ],
    ),
    "zero requests per second": (manifest(model={"requestsPerSecond": 0}), ["should be greater than 0"]),
    "base URL without scheme": (manifest(model={"baseUrl": "api.openai.com/v1"}), ["should match '^https?://'"]),
    "bad quantity": (
        manifest(worker={"resources": {"requests": {"memory": "lots"}}}),
        ["spec.worker.resources.requests.memory", "should match"],
    ),
    "negative quantity": (
        manifest(worker={"resources": {"requests": {"cpu": -1}}}),
        ["should be greater than or equal to 0"],
    ),
    "unknown field": (
        manifest(parallelism={"batchSize": 2, "workers": 3}),
        ['unknown field "spec.parallelism.workers"'],
    ),
    "name too long": (
        manifest(name="a-research-job-name-of-more-than-forty-chars"),
        [
            "metadata.name: Invalid value",
            "metadata.name must be at most 40 characters, so that the names of the Jobs and ConfigMaps made "
            "for the ResearchJob fit; choose a shorter name",
        ],
    ),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_manifest_is_rejected_with_what_to_fix(crd: ClusterHandle, namespace: str, case: str) -> None:
    body, messages = INVALID[case]
    out = rejected(crd, namespace, body)
    for message in messages:
        assert message in out, f"{message!r} not in:\n{out}"
    assert crd.kubectl("-n", namespace, "get", "rj", "-o", "name").stdout == ""


def test_a_one_analyst_job_with_default_batch_size_is_accepted(crd: ClusterHandle, namespace: str) -> None:
    code, out = kubectl_in(
        crd, namespace, "create", "--dry-run=server", "-f", "-", body=manifest(analysts={"count": 1})
    )
    assert code == 0, out


def test_docs_examples_are_accepted(crd: ClusterHandle, namespace: str) -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS_FILE.read_text(), flags=re.S)
    examples = [doc for block in blocks if (doc := yaml.safe_load(block)).get("kind") == KIND]
    assert len(examples) == 3
    for doc in examples:
        code, out = kubectl_in(crd, namespace, "create", "--dry-run=server", "-f", "-", body=doc)
        assert code == 0, f"{doc['metadata']['name']}: {out}"


# ---- fields frozen once the job has started -----------------------------------------------------


def test_spec_is_editable_while_pending_and_frozen_once_started(crd: ClusterHandle, namespace: str) -> None:
    assert kubectl_in(crd, namespace, "create", "-f", "-", body=manifest())[0] == 0

    # Pending (no status yet, then an explicit Pending): everything may change.
    code, out = patch(crd, namespace, "demo", {"spec": {"topic": "Retrieval-augmented generation in practice"}})
    assert code == 0, out
    code, out = patch(crd, namespace, "demo", {"status": {"phase": "Pending"}}, status=True)
    assert code == 0, out
    code, out = patch(crd, namespace, "demo", {"spec": {"analysts": {"count": 4}, "store": {"type": "configmap"}}})
    assert code == 0, out
    assert get(crd, namespace, "demo")["spec"]["topic"] == "Retrieval-augmented generation in practice"

    # The operator starts the job (only the status subresource can set the phase).
    code, out = patch(crd, namespace, "demo", {"status": {"phase": "Interviewing"}}, status=True)
    assert code == 0, out
    assert get(crd, namespace, "demo")["status"]["phase"] == "Interviewing"

    frozen = {
        "spec.topic": {"topic": "Something else entirely"},
        "spec.analysts.count": {"analysts": {"count": 5}},
        "spec.sources": {"sources": [{"type": "documents", "configMap": "notes"}]},
        "spec.store": {"store": {"type": "postgres", "dsnSecretRef": {"name": "db", "key": "dsn"}}},
    }
    for field, change in frozen.items():
        code, out = patch(crd, namespace, "demo", {"spec": change})
        assert code != 0, f"{field} changed after start:\n{out}"
        assert f"{field}: Forbidden: {field} cannot change once the job has started; create a new ResearchJob" in out

    # Nothing changed, and the fields that steer a running job still can.
    assert get(crd, namespace, "demo")["spec"]["topic"] == "Retrieval-augmented generation in practice"
    code, out = patch(
        crd, namespace, "demo", {"spec": {"parallelism": {"maxActiveJobs": 4}, "analysts": {"approved": True}}}
    )
    assert code == 0, out
    spec = get(crd, namespace, "demo")["spec"]
    assert spec["parallelism"]["maxActiveJobs"] == 4 and spec["analysts"] == {
        "count": 4,
        "review": False,
        "approved": True,
    }


# ---- what kubectl shows ------------------------------------------------------------------------


def test_kubectl_explain_shows_the_descriptions(crd: ClusterHandle) -> None:
    out = ""

    def explained() -> bool:
        nonlocal out
        done = crd.kubectl("explain", "researchjob.spec.parallelism", check=False)
        out = done.stdout + done.stderr
        return done.returncode == 0 and "batchSize" in out

    # The OpenAPI document of a new CRD is published a few seconds after it is Established.
    until(explained, timeout=60, what="kubectl explain researchjob.spec.parallelism")
    text = " ".join(out.split())
    assert "KIND: ResearchJob" in text and "VERSION: v1alpha1" in text
    assert "How analysts are batched into worker Jobs and how many run at once." in text
    assert "batchSize <integer> Analysts per worker Job (1-10); they run concurrently in the pod." in text
    assert "maxActiveJobs <integer> Most worker Jobs of this ResearchJob running at once (1-50)." in text

    top = " ".join(crd.kubectl("explain", "rj").stdout.split())
    assert "A ResearchJob researches a topic with a panel of LLM analyst personas" in top


def test_kubectl_get_shows_the_printer_columns(crd: ClusterHandle, namespace: str) -> None:
    assert kubectl_in(crd, namespace, "create", "-f", "-", body=manifest())[0] == 0
    status = {
        "phase": "Interviewing",
        "progress": "1/3",
        "batches": {"total": 2, "active": 1},
        "tokensUsed": 12345,
        "estimate": {"calls": 25, "inputTokens": 20000, "outputTokens": 3000, "tokens": 23000},
        "message": "interviewing 2 analysts",
        "waitingFor": "EndpointCapacity",
        "quality": {"citationAccuracy": 95, "coverage": 80, "sourcesCited": 6},
    }
    code, out = patch(crd, namespace, "demo", {"status": status}, status=True)
    assert code == 0, out

    def table(*args: str) -> list[list[str]]:
        lines = crd.kubectl("-n", namespace, "get", *args).stdout.splitlines()
        return [re.split(r"\s{2,}", line.strip()) for line in lines]

    header, row = table("rj")
    assert header == ["NAME", "PHASE", "PROGRESS", "ACTIVE", "WAITING", "AGE"]
    assert row[:5] == ["demo", "Interviewing", "1/3", "1", "EndpointCapacity"]

    header, row = table("rj", "-o", "wide")
    assert header == [
        "NAME", "PHASE", "PROGRESS", "ACTIVE", "WAITING", "TOKENS", "ESTIMATE", "CITED", "COVERAGE", "SOURCES",
        "MESSAGE", "AGE",
    ]  # fmt: skip
    assert row[:11] == [
        "demo", "Interviewing", "1/3", "1", "EndpointCapacity", "12345", "23000", "95", "80", "6",
        "interviewing 2 analysts",
    ]  # fmt: skip

    # The category: `kubectl get research` lists ResearchJobs too.
    assert "researchjob.researchops.io/demo" in crd.kubectl("-n", namespace, "get", "research", "-o", "name").stdout
