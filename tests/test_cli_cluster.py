"""kubectl research on the local control plane, with the real operator, worker and offline model.

The plugin runs as users run it: the installed ``kubectl-research`` script (and once through
kubectl's plugin lookup), as a subprocess with the cluster's kubeconfig.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from research_api.estimate import estimate
from research_api.modelendpoint import ENDPOINT_PLURAL, Prices
from research_api.researchjob import GROUP, PLURAL, VERSION, ResearchJobSpec
from tests.fixtures.cluster import ClusterHandle
from tests.fixtures.operator import CORPUS, OperatorProcess

pytestmark = pytest.mark.cluster

BIN = Path(sys.executable).parent
PLUGIN = BIN / "kubectl-research"
SETTINGS_LABELS = {f"{GROUP}/kind": "operator-settings"}  # as the chart labels it


def plugin_env(cluster: ClusterHandle) -> dict[str, str]:
    return {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "PATH": f"{BIN}:{cluster.tools}:/usr/bin:/bin"}


def research(cluster: ClusterHandle, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PLUGIN), *args], capture_output=True, text=True, timeout=timeout, env=plugin_env(cluster)
    )


def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode != 0, out
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    return out.stderr


@pytest.fixture(scope="session")
def tmux() -> str:
    """tmux, installed from Debian's packages if absent (like the postgres fixture)."""
    found = shutil.which("tmux")
    if found is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], check=True, env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "tmux"], check=True, env=env,
                       capture_output=True, timeout=600)  # fmt: skip
        found = shutil.which("tmux")
    assert found is not None
    return found


class Tmux:
    def __init__(self, binary: str, command: list[str], env: dict[str, str]) -> None:
        self.binary = binary
        self.name = f"rj-{uuid.uuid4().hex[:6]}"
        self.socket = f"kubectl-research-{self.name}"
        shell = " ".join(f"{k}={v!r}" for k, v in env.items() if k in ("KUBECONFIG", "PATH"))
        line = f"env {shell} {' '.join(command)}; echo EXIT=$?; sleep 600"
        self._tmux("new-session", "-d", "-s", self.name, "-x", "160", "-y", "40", line)

    def _tmux(self, *args: str) -> str:
        out = subprocess.run([self.binary, "-L", self.socket, *args], capture_output=True, text=True, timeout=30)
        return out.stdout

    def capture(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", self.name)

    def close(self) -> None:
        self._tmux("kill-server")


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for doc in sorted(CORPUS.glob("*.md"))[:5]:
        shutil.copy(doc, folder / doc.name)
    return folder


def get_rj(cluster: ClusterHandle, namespace: str, name: str) -> dict[str, Any]:
    obj = client.CustomObjectsApi(cluster.api_client()).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name
    )
    return dict(obj)


def test_submit_watch_report_with_a_documents_folder(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, corpus_dir: Path, tmux: str
) -> None:
    name = "gpu-sharing"
    out = research(
        cluster, "submit", name, "-n", namespace, "--topic", "How Kubernetes shares a cluster between batch jobs",
        "--documents", str(corpus_dir), "--analysts", "4", "--batch-size", "1", "--max-active-jobs", "2",
        "--max-turns", "1", "--max-tokens", "500000",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"researchjob.researchops.io/{name} created" in out.stdout
    assert "configmap/gpu-sharing-documents created: 5 documents" in out.stdout
    rj = get_rj(cluster, namespace, name)
    cm = client.CoreV1Api(cluster.api_client()).read_namespaced_config_map(f"{name}-documents", namespace)
    assert sorted(cm.data) == sorted(p.name for p in corpus_dir.iterdir())
    assert [r.uid for r in cm.metadata.owner_references] == [rj["metadata"]["uid"]]

    # The same job, followed in a terminal (tmux) and through a pipe at once.
    term = Tmux(tmux, [str(PLUGIN), "watch", name, "-n", namespace], plugin_env(cluster))
    try:
        piped = subprocess.Popen(
            [str(PLUGIN), "watch", name, "-n", namespace],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=plugin_env(cluster),
        )
        screens: list[str] = []
        deadline = time.monotonic() + 600
        while piped.poll() is None and time.monotonic() < deadline:
            screen = term.capture()
            if not screens or screen != screens[-1]:
                screens.append(screen)
            time.sleep(0.5)
        stdout, stderr = piped.communicate(timeout=60)
        time.sleep(1.5)
        screens.append(term.capture())
    finally:
        term.close()
        if piped.poll() is None:
            piped.kill()
    assert piped.returncode == 0, stderr

    # Piped: one line per change, never the same line twice in a row, from the start to Succeeded.
    lines = stdout.splitlines()
    progress_lines = lines[:-1]
    assert lines[-1] == f"report: kubectl research report {name} -n {namespace}"
    assert len(progress_lines) >= 3, stdout
    states = [ln.split(None, 1)[1] for ln in progress_lines]  # without the elapsed time
    assert all(a != b for a, b in zip(states, states[1:], strict=False)), stdout
    assert "Succeeded" in progress_lines[-1] and "sections 4/4" in progress_lines[-1]
    assert any("Interviewing" in ln for ln in progress_lines)
    assert any("tokens" in ln and "/500000" in ln for ln in progress_lines)

    # Terminal: the view is redrawn in place (one header on screen at any time) and it moved.
    header = f"ResearchJob {namespace}/{name}"
    assert all(s.count(header) <= 1 for s in screens), screens[-1]
    section_counts = {ln.split("]")[-1].strip() for s in screens for ln in s.splitlines() if "sections" in ln}
    assert len(section_counts) >= 2, screens
    assert "Succeeded" in screens[-1] and "EXIT=0" in screens[-1], screens[-1]
    assert "4/4" in screens[-1]

    # The report printed is the stored one.
    rj = get_rj(cluster, namespace, name)
    ref = rj["status"]["report"]
    stored = client.CoreV1Api(cluster.api_client()).read_namespaced_config_map(ref["configMap"], namespace).data
    out = research(cluster, "report", name, "-n", namespace)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n") == stored[ref["key"]].rstrip("\n") and out.stdout.startswith("# ")
    page = corpus_dir.parent / "report.html"
    out = research(cluster, "report", name, "-n", namespace, "-o", "html", "--output", str(page))
    assert out.returncode == 0, out.stderr
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and "<h1>" in html and "<script" not in html
    # The analysts and the worker logs of one analyst (local cluster: from the node agent's files).
    out = research(cluster, "analysts", name, "-n", namespace, "-o", "json")
    assert out.returncode == 0 and len(json.loads(out.stdout)) == 4
    out = research(cluster, "logs", name, "-n", namespace, "--analyst", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("==> pod gpu-sharing-") and "(interview, analysts 2)" in out.stdout
    assert out.stdout.count("==> pod") >= 1 and "analysts 0" not in out.stdout


@pytest.fixture
def settings_configmap(cluster: ClusterHandle, operator: OperatorProcess) -> Iterator[str]:
    """The operator's settings ConfigMap as the chart makes it (caps 0), removed afterwards."""
    core = client.CoreV1Api(cluster.api_client())
    op_ns = operator.env["OPERATOR_NAMESPACE"]
    body = {
        "metadata": {"name": "research-operator-settings", "labels": SETTINGS_LABELS},
        "data": {"globalMaxActiveJobs": "0", "namespaceMaxActiveJobs": "0"},
    }
    core.create_namespaced_config_map(op_ns, body)
    yield op_ns
    core.delete_namespaced_config_map("research-operator-settings", op_ns)


def top(cluster: ClusterHandle, namespace: str, op_ns: str) -> dict[str, Any]:
    out = research(cluster, "top", "-n", namespace, "--operator-namespace", op_ns, "-o", "json")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_top_follows_a_quota_and_a_cap_change_and_caps_refuse_bad_values(
    cluster: ClusterHandle, operator: OperatorProcess, namespace: str, corpus_dir: Path, settings_configmap: str
) -> None:
    op_ns = settings_configmap
    core = client.CoreV1Api(cluster.api_client())
    core.create_namespaced_resource_quota(
        namespace, {"metadata": {"name": "workers"}, "spec": {"hard": {"pods": "6", "requests.memory": "1Gi"}}}
    )
    deadline = time.monotonic() + 30
    while not (core.read_namespaced_resource_quota("workers", namespace).status.used or {}):
        assert time.monotonic() < deadline, "the quota controller never filled in status.used"
        time.sleep(0.2)
    view = top(cluster, namespace, op_ns)
    # 1Gi of memory requests at 256Mi per default worker pod is 4 pods, fewer than the 6 pods allowed.
    assert view["quotas"] == [
        {"namespace": namespace, "name": "workers", "headroom": 4, "binding": "requests.memory 0/1Gi"}
    ]
    assert (view["global_cap"], view["namespace_cap"]) == (0, 0)

    # An invalid cap is refused with the reason, and nothing changes.
    before = core.read_namespaced_config_map("research-operator-settings", op_ns)
    for bad in ("globalMaxActiveJobs=-1", "globalMaxActiveJobs=two", "maxJobs=3"):
        err = one_line_error(research(cluster, "caps", "set", bad, "--operator-namespace", op_ns))
        assert "nothing was changed" in err
    out = research(
        cluster, "caps", "set", "globalMaxActiveJobs=1", "namespaceMaxActiveJobs=x", "--operator-namespace", op_ns
    )
    assert "namespaceMaxActiveJobs must be a whole number" in one_line_error(out)
    after = core.read_namespaced_config_map("research-operator-settings", op_ns)
    assert after.metadata.resource_version == before.metadata.resource_version and after.data == before.data

    out = research(cluster, "caps", "set", "globalMaxActiveJobs=1", "--operator-namespace", op_ns)
    assert out.returncode == 0, out.stderr
    assert "globalMaxActiveJobs: 0 -> 1" in out.stdout
    assert top(cluster, namespace, op_ns)["global_cap"] == 1
    shown = research(cluster, "caps", "--operator-namespace", op_ns, "-o", "json")
    assert json.loads(shown.stdout)["globalMaxActiveJobs"] == "1"
    deadline = time.monotonic() + 30
    while "globalMaxActiveJobs=1" not in operator.log():
        assert time.monotonic() < deadline, "the operator never applied the cap"
        time.sleep(0.3)

    out = research(
        cluster, "submit", "capped", "-n", namespace, "--topic", "How Kubernetes limits batch workloads",
        "--documents", str(corpus_dir), "--analysts", "5", "--batch-size", "1", "--max-active-jobs", "5",
        "--max-turns", "1",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr

    # Under the cap: one worker Job runs, the rest wait, and top says for what; the quota shrinks.
    deadline = time.monotonic() + 300
    while True:
        view = top(cluster, namespace, op_ns)
        waiting = {w["name"]: w for w in view["waiting"]}
        if view["running"] == 1 and waiting.get("capped", {}).get("queued", 0) >= 2:
            break
        assert time.monotonic() < deadline, view
        time.sleep(0.5)
    assert "globalMaxActiveJobs" in waiting["capped"]["waiting_for"], waiting
    assert view["namespaces"][0]["running"] == 1
    # The running worker's pod holds 256Mi of the 1Gi (counted when the Job controller creates it).
    deadline = time.monotonic() + 30
    while view["quotas"][0]["headroom"] > 3:
        assert time.monotonic() < deadline, view["quotas"]
        time.sleep(0.5)
        view = top(cluster, namespace, op_ns)
    binding = view["quotas"][0]["binding"]
    assert binding.startswith("requests.memory ") and binding.endswith("/1Gi"), binding

    # Raising the cap lets more run at once within one reconcile, and top shows it.
    out = research(cluster, "caps", "set", "global=3", "--operator-namespace", op_ns)
    assert out.returncode == 0, out.stderr
    raised = time.monotonic()
    seen = 0
    while time.monotonic() - raised < 20:
        view = top(cluster, namespace, op_ns)
        seen = max(seen, view["running"])
        if seen >= 2:
            break
        time.sleep(0.3)
    assert view["global_cap"] == 3
    assert seen >= 2, f"top never showed more than one worker Job running after the cap was raised: {view}"
    out = research(cluster, "watch", "capped", "-n", namespace, "--timeout", "400")
    assert out.returncode == 0, out.stderr


def test_bad_input_gets_one_line_and_a_non_zero_exit(
    cluster: ClusterHandle, researchjob_crd: Path, namespace: str, tmp_path: Path
) -> None:
    for args in (["watch", "nope"], ["report", "nope"], ["analysts", "nope"], ["approve", "nope"], ["logs", "nope"]):
        err = one_line_error(research(cluster, *args, "-n", namespace))
        assert f'researchjob "nope" not found in namespace "{namespace}"' in err

    empty = tmp_path / "empty"
    empty.mkdir()
    err = one_line_error(
        research(cluster, "submit", "x", "-n", namespace, "--topic", "Quotas in practice", "--documents", str(empty))
    )
    assert "no documents in" in err
    big = tmp_path / "big"
    big.mkdir()
    (big / "a.md").write_text("word " * 250_000)
    err = one_line_error(
        research(cluster, "submit", "x", "-n", namespace, "--topic", "Quotas in practice", "--documents", str(big))
    )
    assert "more than the 1048576 bytes (1 MiB) a ConfigMap can hold" in err
    out = research(cluster, "submit", "x", "-n", namespace, "--documents", str(big))
    assert one_line_error(out) and out.returncode == 2 and "--topic" in out.stderr
    # Nothing was created by the refused submits.
    assert (
        client.CustomObjectsApi(cluster.api_client()).list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)[
            "items"
        ]
        == []
    )
    assert not [
        c.metadata.name
        for c in client.CoreV1Api(cluster.api_client()).list_namespaced_config_map(namespace).items
        if c.metadata.name.startswith("x-")
    ]

    # Server-side dry run: the API server admits it (schema, CEL) and stores nothing.
    out = research(
        cluster, "submit", "y", "-n", namespace, "--topic", "Quotas in practice", "--wikipedia", "--dry-run=server"
    )
    assert out.returncode == 0 and "created (server dry run)" in out.stdout, out.stderr
    out = research(
        cluster, "submit", "y", "-n", namespace, "--topic", "Quotas in practice", "--wikipedia", "--dry-run=client",
        "-o", "yaml",
    )  # fmt: skip
    assert out.returncode == 0 and "kind: ResearchJob" in out.stdout
    with pytest.raises(client.ApiException):
        get_rj(cluster, namespace, "y")

    # kubectl finds the plugin on PATH.
    out = subprocess.run(
        [str(cluster.tools / "kubectl"), "research", "caps", "--help"],
        capture_output=True, text=True, timeout=60, env=plugin_env(cluster),
    )  # fmt: skip
    assert out.returncode == 0 and "usage: kubectl research caps" in out.stdout, out.stderr


def test_submit_estimate_prices_at_the_named_endpoint_reads_a_documents_configmap_and_creates_nothing(
    cluster: ClusterHandle, researchjob_crd: Path, namespace: str, corpus_configmap: str
) -> None:
    custom = client.CustomObjectsApi(cluster.api_client())
    endpoint = f"priced-{uuid.uuid4().hex[:8]}"
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ModelEndpoint",
        "metadata": {"name": endpoint},
        "spec": {
            "baseUrl": "https://llm.example/v1",
            "maxConcurrentRequests": 4,
            "prices": {"inputPerMillion": "2.50", "outputPerMillion": "10"},
        },
    }
    custom.create_cluster_custom_object(GROUP, VERSION, ENDPOINT_PLURAL, body)
    try:
        topic = "How Kubernetes runs and limits batch workloads"
        args = ["submit", "est", "-n", namespace, "--topic", topic, "--documents-configmap", corpus_configmap]
        out = research(cluster, *args, "--endpoint", endpoint, "--estimate", "-o", "json")
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        spec = {
            "topic": topic,
            "analysts": {"count": 3},
            "sources": [{"type": "documents", "configMap": corpus_configmap}],
            "model": {"endpoint": endpoint},
        }
        documents = {p.name: p.read_text() for p in sorted(CORPUS.glob("*.md"))}
        expected = estimate(
            ResearchJobSpec.model_validate(spec), documents, Prices(input_per_million="2.50", output_per_million="10")
        )
        assert (got["tokens"], got["cost"]) == (expected.tokens, expected.cost)
        assert got["costBasis"] == f"ModelEndpoint {endpoint}: 2.50 in, 10 out per million tokens"
        assert got["basis"].startswith(f"{len(documents)} documents")

        missing = research(cluster, *args, "--endpoint", "no-such-endpoint", "--estimate")
        assert missing.returncode == 0, missing.stderr
        assert 'cost unknown: ModelEndpoint "no-such-endpoint" does not exist' in missing.stdout
        err = one_line_error(research(cluster, "submit", "est", "-n", namespace, "--topic", topic,
                                      "--documents-configmap", "nope", "--estimate"))  # fmt: skip
        assert f"cannot get configmap {namespace}/nope" in err
    finally:
        custom.delete_cluster_custom_object(GROUP, VERSION, ENDPOINT_PLURAL, endpoint)
    assert custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"] == []
