"""Report quality through the operator on the local control plane: status.quality, the Grounded condition,
the wide columns, and a quality floor that fails a ResearchJob whose writer invents citations.

The figures in status are compared with a count made here from the report itself (its Sources list, its
cited sentences and the corpus), not with what the worker computed.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from research_api.researchjob import GROUP, PLURAL, VERSION
from tests.fixtures.cluster import ClusterHandle
from tests.fixtures.operator import OperatorProcess

pytestmark = pytest.mark.cluster

CORPORA = Path(__file__).parent / "corpora"


def corpus(cluster: ClusterHandle, namespace: str, name: str) -> tuple[str, dict[str, str]]:
    docs = {p.name: p.read_text() for p in sorted((CORPORA / name / "docs").iterdir()) if p.is_file()}
    client.CoreV1Api(cluster.api_client()).create_namespaced_config_map(
        namespace, {"metadata": {"name": name}, "data": docs}
    )
    return (CORPORA / name / "topic.txt").read_text().strip(), docs


def create(cluster: ClusterHandle, namespace: str, name: str, **spec: Any) -> None:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ResearchJob", "metadata": {"name": name}, "spec": spec}
    client.CustomObjectsApi(cluster.api_client()).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body
    )


def finished(cluster: ClusterHandle, namespace: str, name: str, timeout: float = 300) -> dict[str, Any]:
    custom = client.CustomObjectsApi(cluster.api_client())
    deadline = time.monotonic() + timeout
    obj: dict[str, Any] = {}
    while time.monotonic() < deadline:
        obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return obj
        time.sleep(0.5)
    raise AssertionError(f"{name} did not finish in {timeout}s; status: {obj.get('status')}")


def report_of(cluster: ClusterHandle, namespace: str, obj: dict[str, Any]) -> str:
    ref = obj["status"]["report"]
    cm = client.CoreV1Api(cluster.api_client()).read_namespaced_config_map(ref["configMap"], namespace)
    return str(cm.data[ref["key"]])


def listed(report: str) -> list[str]:
    return re.findall(r"^\[\d+\] (.+?)\s*$", report.split("\n## Sources\n", 1)[1], re.M)


def cited_sentences(report: str) -> list[tuple[str, list[int]]]:
    out = []
    for line in report.split("\n## Sources\n", 1)[0].splitlines():
        if line.strip() and not line.startswith(("#", "---")):
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])", line.strip()):
                numbers = [int(n) for n in re.findall(r"\[(\d+)\]", s)]
                if numbers:
                    out.append((re.sub(r"\s*\[\d+\]", "", s).strip(), numbers))
    return out


def norm(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"\s*\[\d+\]", "", text)).strip().lower()


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in obj["status"].get("conditions") or []}


def spec_for(topic: str, configmap: str, **over: Any) -> dict[str, Any]:
    return {
        "topic": topic,
        "analysts": {"count": 3},
        "interview": {"maxTurns": 2},
        "sources": [{"type": "documents", "configMap": configmap}],
        "parallelism": {"batchSize": 3, "maxActiveJobs": 1},
        **over,
    }


def test_the_status_and_kubectl_show_how_well_the_report_is_supported(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str
) -> None:
    topic, docs = corpus(cluster, namespace, "swarm-nest-site")
    create(cluster, namespace, "nest", **spec_for(topic, "swarm-nest-site"))
    obj = finished(cluster, namespace, "nest")
    status = obj["status"]
    assert status["phase"] == "Succeeded", status
    q = status["quality"]
    report = report_of(cluster, namespace, obj)
    names = listed(report)
    cited = cited_sentences(report)
    # every cited sentence is in a document it cites; every document is cited; the figures agree
    assert all(any(norm(s).rstrip(".") in norm(docs[names[n - 1]]) for n in ns) for s, ns in cited)
    assert set(names) == set(docs)
    assert (q["sourcesCited"], q["relevantDocuments"], q["relevantCited"], q["coverage"]) == (6, 6, 6, 100)
    assert q["citationAccuracy"] == 100 and q["sentencesSupported"] == q["sentencesChecked"] == len(cited)
    assert q["sourcesRetrieved"] == 6 and "unreachedDocuments" not in q
    grounded = conditions(obj)["Grounded"]
    assert (grounded["status"], grounded["reason"]) == ("True", "CitationsSupported")
    wide = cluster.kubectl("get", "rj", "nest", "-n", namespace, "-o", "wide").stdout.splitlines()
    header, row = wide[0], wide[1]  # columns by position: an empty one (WAITING) has no word
    start, end = header.index("CITED"), header.index("MESSAGE")
    assert header[start:end].split() == ["CITED", "COVERAGE", "SOURCES"]
    assert row[start:end].split() == ["100", "100", "6"]


def test_invented_citations_are_caught_and_below_the_floor_the_researchjob_fails_with_the_figures(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, modelserver_factory: Any
) -> None:
    liar = modelserver_factory(fault_invent_citation_rate=1.0)  # every writing invents one cited sentence
    topic, docs = corpus(cluster, namespace, "roman-aqueducts")
    model = {"baseUrl": liar.base_url}
    create(cluster, namespace, "caught", **spec_for(topic, "roman-aqueducts", model=model))
    create(
        cluster,
        namespace,
        "floored",
        **spec_for(topic, "roman-aqueducts", model=model, quality={"minCitationAccuracy": 95}),
    )

    obj = finished(cluster, namespace, "caught")
    status, q = obj["status"], obj["status"]["quality"]
    assert status["phase"] == "Succeeded", status  # no floor: delivered, with what was caught in status
    # one invented sentence in each of the report's introduction, body and conclusion, and in each section
    assert q["sentencesDropped"] == 3 and q["sentencesSupported"] == q["sentencesChecked"] - 3
    assert q["citationAccuracy"] == 100 * (q["sentencesChecked"] - 3) // q["sentencesChecked"] < 100
    assert q["sectionSentencesDropped"] == 3
    assert any("1642" in f for f in q["failures"])
    report = report_of(cluster, namespace, obj)
    assert "1642" not in report
    names = listed(report)
    assert all(any(norm(s).rstrip(".") in norm(docs[names[n - 1]]) for n in ns) for s, ns in cited_sentences(report))
    grounded = conditions(obj)["Grounded"]
    assert (grounded["status"], grounded["reason"]) == ("False", "UnsupportedCitations")

    obj = finished(cluster, namespace, "floored")
    status, q = obj["status"], obj["status"]["quality"]
    assert status["phase"] == "Failed", status
    assert q["rewrites"] == 3 + 1  # each section writer and the report writers ran once more
    figures = (
        f"citation accuracy {q['citationAccuracy']}% ({q['sentencesSupported']} of {q['sentencesChecked']} cited "
        f"sentences supported; {q['sentencesRecited']} re-cited, {q['sentencesDropped']} dropped) is below 95%"
    )
    assert status["message"] == f"the report misses the quality floor: {figures}"
    failed = conditions(obj)["Failed"]
    assert (failed["status"], failed["reason"]) == ("True", "BelowQualityFloor")
    assert status["report"]["configMap"]  # the report is still there to read
