"""The Helm chart (charts/research-operator) and the Dockerfile, checked without a cluster.

helm lint and helm template run the real helm v4 binary (hack/install-kube-tools.sh). What is
asserted is what a user would notice: the rendered objects, the messages of rejected values, and
that the environment and command lines the chart renders mean what the programs read.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from localkube.controlplane import kube_tools_dir
from offline_model.config import settings_from
from research_api.researchjob import ResearchJobSpec
from research_api.task import Step
from research_operator.decisions.manifests import Owner, worker_job, worker_network_policy, worker_rbac
from research_operator.settings import Settings

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "research-operator"
CRD = "researchjobs.researchops.io.yaml"

POD_SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "runAsGroup": 65532,
    "fsGroup": 65532,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}
# Every value that turns on an optional object or branch, for the "everything rendered" cases.
ALL_ON = [
    "--set", "metrics.serviceMonitor.enabled=true",
    "--set", "postgres.createSecret=true",
    "--set", "postgres.existingSecret=research-postgres",
    "--set", "postgres.dsn=postgresql://research:pw@db:5432/research",
    "--set", "modelServer.apiKeySecret.name=modelserver-key",
    "--set", "operator.logLevel=debug",
    "--set", "operator.replicaCount=2",
    "--set", "kueue.queueName=research",
    "--set", "workers.serviceAccountName=research-worker",
    "--set", "operator.priorityClassName=system-cluster-critical",
    "--set", "imagePullSecrets[0].name=regcred",
]  # fmt: skip

# The ClusterRole, rule by rule: (apiGroup, resource) -> verbs. See the chart README for why.
EXPECTED_CLUSTER_RULES = {
    ("authentication.k8s.io", "tokenreviews"): {"create"},  # the lease broker checks worker pods' tokens
    ("researchops.io", "researchjobs"): {"get", "list", "watch", "patch", "delete"},
    ("researchops.io", "researchjobs/status"): {"patch"},
    ("researchops.io", "researchjobs/finalizers"): {"update"},
    ("researchops.io", "modelendpoints"): {"list", "watch"},
    ("researchops.io", "modelendpoints/status"): {"patch"},
    ("batch", "jobs"): {"list", "watch", "create", "delete"},
    ("", "configmaps"): {"get", "list", "watch", "create", "update", "patch"},
    ("", "resourcequotas"): {"list", "watch"},
    ("", "namespaces"): {"get"},  # the labels a ModelEndpoint's namespaceSelector matches
    ("", "pods"): {"list"},
    ("", "serviceaccounts"): {"create"},
    ("rbac.authorization.k8s.io", "roles"): {"create", "update"},  # a new plan's ConfigMap names
    ("rbac.authorization.k8s.io", "rolebindings"): {"create"},
    ("", "events"): {"create", "list", "watch"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
}
# The operator reads the chart's admission policy and its binding, by name only (tenancy).
POLICY_RULE = {
    "apiGroups": ["admissionregistration.k8s.io"],
    "resources": ["validatingadmissionpolicies", "validatingadmissionpolicybindings"],
    "resourceNames": ["research-operator-tenancy"],
    "verbs": ["get"],
}
CLUSTER_SCOPED = ("ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
# In Kueue mode (kueue.queueName set) also: the Workloads and LocalQueues it reads for status.
KUEUE_CLUSTER_RULES = {
    ("kueue.x-k8s.io", "workloads"): {"list", "watch"},
    ("kueue.x-k8s.io", "localqueues"): {"list", "watch"},
}


@pytest.fixture(scope="module")
def helm() -> Path:
    return kube_tools_dir() / "helm"


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120)


def render(
    helm: Path, *args: str, namespace: str = "research-system", release: str = "research-operator"
) -> list[dict[str, Any]]:
    out = run_helm(helm, "template", release, str(CHART), "--namespace", namespace, *args)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in matches]}"
    return matches[0]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield d["metadata"]["name"], d["spec"]["template"]["spec"]
        elif d["kind"] == "Pod":
            yield d["metadata"]["name"], d["spec"]


def env_of(container: dict[str, Any], configmap: dict[str, Any], pod_name: str, namespace: str) -> dict[str, str]:
    """The container's environment as the kubelet would resolve it from the rendered objects."""
    field_values = {"metadata.name": pod_name, "metadata.namespace": namespace, "status.podIP": "10.0.0.7"}
    env: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "configMapKeyRef" in e["valueFrom"]:
            ref = e["valueFrom"]["configMapKeyRef"]
            assert ref["name"] == configmap["metadata"]["name"], ref
            env[e["name"]] = configmap["data"][ref["key"]]
        elif "fieldRef" in e["valueFrom"]:
            env[e["name"]] = field_values[e["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


# ------------------------------------------------------------------------------------------------
# lint and render
# ------------------------------------------------------------------------------------------------


def test_helm_lint_strict_is_clean(helm: Path) -> None:
    out = run_helm(helm, "lint", "--strict", str(CHART))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout
    assert "[WARNING]" not in out.stdout and "[ERROR]" not in out.stdout, out.stdout


def test_lint_strict_with_every_option_on(helm: Path) -> None:
    out = run_helm(helm, "lint", "--strict", str(CHART), *ALL_ON)
    assert out.returncode == 0, out.stdout + out.stderr


def test_defaults_render_the_operator_the_model_server_and_their_plumbing(helm: Path) -> None:
    docs = render(helm)
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == sorted(
        [
            ("ServiceAccount", "research-operator"),
            ("ConfigMap", "research-operator-settings"),
            ("ClusterRole", "research-operator"),
            ("ClusterRoleBinding", "research-operator"),
            # for people: aggregated into view/edit/admin, and the platform team's (bound by admins)
            ("ClusterRole", "research-operator-view"),
            ("ClusterRole", "research-operator-edit"),
            ("ClusterRole", "research-operator-platform-admin"),
            ("Role", "research-operator-platform-admin"),
            ("Lease", "research-operator-leader"),
            ("Role", "research-operator-leader-election"),
            ("RoleBinding", "research-operator-leader-election"),
            ("Role", "research-operator-lease-broker"),
            ("RoleBinding", "research-operator-lease-broker"),
            ("Service", "research-operator-leases"),
            ("Service", "research-operator-metrics"),
            ("Deployment", "research-operator"),
            ("Deployment", "research-operator-modelserver"),
            ("Service", "research-operator-modelserver"),
            ("ValidatingAdmissionPolicy", "research-operator-tenancy"),
            ("ValidatingAdmissionPolicyBinding", "research-operator-tenancy"),
            ("NetworkPolicy", "research-operator"),
            ("NetworkPolicy", "research-operator-modelserver"),
        ]
    )
    for d in docs:
        labels = d["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "research-operator"
        assert labels["app.kubernetes.io/instance"] == "research-operator"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "research-operator-0.1.0"
        if d["kind"] not in CLUSTER_SCOPED:
            assert d["metadata"]["namespace"] == "research-system"

    op = find(docs, "Deployment", "research-operator")
    assert op["spec"]["replicas"] == 1
    # Replaced in place: the new pod takes the Lease the old one releases (no surge pod).
    assert op["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    container = op["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["research-operator"]
    assert container["image"] == "research-operator:0.1.0"
    assert container["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "metrics": 8080,
        "health": 8081,
        "leases": 8090,
    }
    assert op["spec"]["template"]["spec"]["serviceAccountName"] == "research-operator"

    cm = find(docs, "ConfigMap")
    assert cm["metadata"]["labels"]["researchops.io/kind"] == "operator-settings"
    assert cm["data"] == {
        "globalMaxActiveJobs": "0",
        "namespaceMaxActiveJobs": "0",
        "defaultModelBaseUrl": "http://research-operator-modelserver.research-system.svc:8000/v1",
        "workerImage": "research-operator:0.1.0",
        "kueueQueueName": "",
        "kueuePriorityClasses": "{}",
        "kueueDefaultPriorityClass": "",
        "namespaceTokenBudgets": "{}",
        "qualityMinCitationAccuracy": "",  # no report quality floor unless the admins set one
        "qualityMinCoverage": "",
        # Tenancy: the policy is on, authors are not trusted, no system priority or toleration.
        "admissionPolicyBinding": "research-operator-tenancy",
        "trustAuthors": "false",
        "allowedPriorityClasses": "",
        "allowedTolerationKeys": "",
        "allowedNodeSelectorKeys": (
            "kubernetes.io/arch,kubernetes.io/os,node.kubernetes.io/instance-type,"
            "topology.kubernetes.io/region,topology.kubernetes.io/zone"
        ),
        "allowedWorkloadPriorityClasses": "",
        "allowTenantBaseUrls": "true",
    }


def test_a_quality_floor_in_the_values_reaches_the_operators_settings(helm: Path) -> None:
    from research_operator.settings import Settings

    docs = render(helm, "--set", "settings.quality.minCitationAccuracy=95", "--set", "settings.quality.minCoverage=0")
    data = find(docs, "ConfigMap")["data"]
    assert (data["qualityMinCitationAccuracy"], data["qualityMinCoverage"]) == ("95", "0")
    floor = Settings().with_configmap(data).quality_floor
    assert (floor.min_citation_accuracy, floor.min_coverage) == (95, 0)


def test_a_tracing_endpoint_reaches_the_operator_and_through_it_every_worker_pod(helm: Path) -> None:
    from research_api.researchjob import ResearchJobSpec
    from research_api.task import Step
    from research_operator.decisions.manifests import Owner, worker_job
    from research_operator.settings import Settings

    def container_env(*args: str) -> tuple[dict[str, str], dict[str, str]]:
        docs = render(helm, *args)
        container = find(docs, "Deployment", "research-operator")["spec"]["template"]["spec"]["containers"][0]
        operator = env_of(container, find(docs, "ConfigMap"), "pod", "research-system")
        spec = ResearchJobSpec.model_validate({"topic": "t" * 5, "sources": [{"type": "wikipedia"}]})
        job = worker_job(Owner("ns", "rj", "uid"), spec, Settings.from_env(operator), "abc123", Step.PLAN)
        worker = {e["name"]: e.get("value", "") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        return operator, worker

    url = "http://otel-collector.observability.svc:4318"
    operator, worker = container_env(
        "--set", f"tracing.otlpEndpoint={url}", "--set", "tracing.sampler=parentbased_traceidratio",
        "--set", "tracing.samplerArg=0.25",
    )  # fmt: skip
    for env in (operator, worker):
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == url
        assert (env["OTEL_TRACES_SAMPLER"], env["OTEL_TRACES_SAMPLER_ARG"]) == ("parentbased_traceidratio", "0.25")
    operator, worker = container_env()  # the default: off
    assert not [k for k in (*operator, *worker) if k.startswith("OTEL_")]


def test_services_select_only_their_own_pods(helm: Path) -> None:
    docs = render(helm)
    metrics = find(docs, "Service", "research-operator-metrics")
    model = find(docs, "Service", "research-operator-modelserver")
    op_pod = find(docs, "Deployment", "research-operator")["spec"]["template"]["metadata"]["labels"]
    ms_pod = find(docs, "Deployment", "research-operator-modelserver")["spec"]["template"]["metadata"]["labels"]

    def selects(svc: dict[str, Any], labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())

    assert selects(metrics, op_pod) and not selects(metrics, ms_pod)
    assert selects(model, ms_pod) and not selects(model, op_pod)
    for name in ("research-operator", "research-operator-modelserver"):
        selector = find(docs, "Deployment", name)["spec"]["selector"]["matchLabels"]
        assert set(selector) == {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"}
    assert metrics["spec"]["ports"][0]["targetPort"] == "metrics"


def test_model_server_disabled_needs_an_endpoint(helm: Path) -> None:
    out = run_helm(helm, "template", "r", str(CHART), "--set", "modelServer.enabled=false")
    assert out.returncode != 0
    assert "set settings.defaultModelBaseUrl" in out.stderr

    docs = render(
        helm, "--set", "modelServer.enabled=false", "--set", "settings.defaultModelBaseUrl=https://api.openai.com/v1"
    )
    assert not [d for d in docs if "modelserver" in d["metadata"]["name"]]
    assert find(docs, "ConfigMap")["data"]["defaultModelBaseUrl"] == "https://api.openai.com/v1"
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"] == ["research-operator"]


def test_every_option_on_renders_the_optional_objects(helm: Path) -> None:
    docs = render(helm, *ALL_ON)
    monitor = find(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    secret = find(docs, "Secret", "research-postgres")
    assert set(secret["data"]) == {"dsn"}
    op = find(docs, "Deployment", "research-operator")
    assert op["spec"]["replicas"] == 2
    assert op["spec"]["template"]["spec"]["containers"][0]["args"] == ["--verbose"]
    assert op["spec"]["template"]["spec"]["priorityClassName"] == "system-cluster-critical"
    assert find(docs, "ConfigMap")["data"]["kueueQueueName"] == "research"
    ms = find(docs, "Deployment", "research-operator-modelserver")["spec"]["template"]["spec"]["containers"][0]
    key_env = next(e for e in ms["env"] if e["name"] == "MODELSERVER_API_KEY")
    assert key_env["valueFrom"]["secretKeyRef"] == {"name": "modelserver-key", "key": "api-key"}
    # With a key, /v1/models answers 401 to the kubelet; the probes use the open /healthz.
    assert ms["readinessProbe"]["httpGet"]["path"] == "/healthz"


def test_template_guards_explain_themselves(helm: Path) -> None:
    cases = {
        ("operator.replicaCount=2", "operator.leaderElection.enabled=false"): "needs operator.leaderElection.enabled",
        ("postgres.createSecret=true",): "set postgres.dsn",
        ("operator.metricsPort=9000", "operator.healthPort=9000"): "must differ",
        ("metrics.serviceMonitor.enabled=true", "metrics.service.enabled=false"): "needs metrics.service.enabled",
    }
    for sets, message in cases.items():
        args = [a for s in sets for a in ("--set", s)]
        out = run_helm(helm, "template", "r", str(CHART), *args)
        assert out.returncode != 0, sets
        assert message in out.stderr, (sets, out.stderr)


# ------------------------------------------------------------------------------------------------
# the values schema
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("settings.globalMaxActiveJobs=-1", "at '/settings/globalMaxActiveJobs': minimum: got -1, want 0"),
        ("settings.namespaceMaxActiveJobs=-3", "at '/settings/namespaceMaxActiveJobs': minimum: got -3, want 0"),
        ("settings.globalMaxActiveJobs=lots", "at '/settings/globalMaxActiveJobs': got string, want integer"),
        ("operator.metricsPort=70000", "at '/operator/metricsPort': maximum"),
        ("operator.replicaCount=one", "at '/operator/replicaCount': got string, want integer"),
        ("image.repository=", "at '/image/repository': minLength: got 0, want 1"),
        ("image.pullPolicy=Sometimes", "at '/image/pullPolicy': value must be one of"),
        ("operator.logLevel=loud", "at '/operator/logLevel': value must be one of 'info', 'debug'"),
        ("modelServer.maxConcurrency=0", "at '/modelServer/maxConcurrency': minimum: got 0, want 1"),
        ("modelServer.ttftMs=-5", "at '/modelServer/ttftMs': minimum"),
        ("settings.defaultModelBaseUrl=api.openai.com", "at '/settings/defaultModelBaseUrl'"),
        ("kueue.queueName=Research_Queue", "at '/kueue/queueName'"),
        ("kueue.priorityClasses.high=Research_High", "at '/kueue/priorityClasses/high'"),
        ("kueue.priorityClasses.High=research-high", "invalid propertyName 'High'"),
        ("kueue.defaultPriorityClass=-x", "at '/kueue/defaultPriorityClass'"),
        ("settings.globalMaxActivejobs=3", "additional properties 'globalMaxActivejobs' not allowed"),
        ("postgres.dsnKey=a/b", "at '/postgres/dsnKey'"),
        ("settings.quality.minCitationAccuracy=101", "at '/settings/quality/minCitationAccuracy': maximum"),
        ("settings.quality.minCoverage=-1", "at '/settings/quality/minCoverage': minimum"),
        ("tracing.otlpEndpoint=otel-collector:4318", "at '/tracing/otlpEndpoint'"),
        ("tracing.sampler=sometimes", "at '/tracing/sampler': value must be one of"),
    ],
)
def test_schema_rejects_bad_values(helm: Path, value: str, message: str) -> None:
    out = run_helm(helm, "template", "r", str(CHART), "--set", value)
    assert out.returncode != 0, f"{value} was accepted"
    assert "values don't meet the specifications of the schema" in out.stderr
    assert message in out.stderr, out.stderr


def test_schema_requires_an_image_repository(helm: Path, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text("image:\n  repository: null\n")
    out = run_helm(helm, "template", "r", str(CHART), "-f", str(values))
    assert out.returncode != 0
    assert "/image" in out.stderr and "repository" in out.stderr, out.stderr


# ------------------------------------------------------------------------------------------------
# security
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--set", "modelServer.enabled=false", "--set", "settings.defaultModelBaseUrl=https://api.openai.com/v1"],
        ALL_ON,
    ],
    ids=["defaults", "no-modelserver", "all-on"],
)
def test_every_container_is_restricted_and_sets_its_command(helm: Path, args: list[str]) -> None:
    docs = render(helm, *args)
    specs = list(pod_specs(docs))
    assert specs
    for name, spec in specs:
        assert spec["securityContext"] == POD_SECURITY_CONTEXT, name
        tmp_volumes = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert c["securityContext"] == CONTAINER_SECURITY_CONTEXT, (name, c["name"])
            assert c.get("command"), f"{name}/{c['name']} has no explicit command"
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], (name, c["name"])
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert mounts.get("/tmp") in tmp_volumes, f"{name}/{c['name']}: read-only root needs an emptyDir /tmp"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], EXPECTED_CLUSTER_RULES),
        (["--set", "kueue.queueName=research"], EXPECTED_CLUSTER_RULES | KUEUE_CLUSTER_RULES),
    ],
    ids=["defaults", "kueue"],
)
def test_cluster_role_is_exactly_what_the_operator_uses(
    helm: Path, args: list[str], expected: dict[tuple[str, str], set[str]]
) -> None:
    docs = render(helm, *args)
    role = find(docs, "ClusterRole", "research-operator")
    rules: dict[tuple[str, str], set[str]] = {}
    assert role["rules"].count(POLICY_RULE) == 1  # the one rule limited to names
    for rule in role["rules"]:
        if rule == POLICY_RULE:
            continue
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard in {rule}"
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert (group, resource) not in rules, f"{group}/{resource} appears twice"
                rules[(group, resource)] = set(rule["verbs"])
    assert rules == expected
    # Nothing that reads secrets, execs into pods or escalates; of namespaces, one by name (its labels).
    assert not {r for _, r in rules} & {"secrets", "pods/exec", "nodes", "clusterroles"}
    assert rules[("", "namespaces")] == {"get"}
    assert not set().union(*rules.values()) & {"escalate", "bind", "impersonate", "deletecollection"}


def test_operator_holds_every_permission_it_grants_to_workers(helm: Path) -> None:
    """The API server lets the operator create the worker Role only if it holds those rules."""
    docs = render(helm)
    rules = {
        (g, r): set(rule["verbs"])
        for rule in find(docs, "ClusterRole", "research-operator")["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    owner = Owner("team-a", "demo", "0d5c6f3c-1111-2222-3333-444455556666")
    spec = ResearchJobSpec.model_validate({"topic": "tea", "sources": [{"type": "wikipedia"}]})
    role = next(o for o in worker_rbac(owner, spec, "p1") if o["kind"] == "Role")
    for rule in role["rules"]:
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                assert set(rule["verbs"]) <= rules.get((g, r), set()), f"worker Role grants {g}/{r} {rule['verbs']}"
    for obj in worker_rbac(owner, spec, "p1"):
        group = obj["apiVersion"].rpartition("/")[0]
        assert "create" in rules[(group, obj["kind"].lower() + "s")], obj["kind"]


def test_lease_broker_role_is_limited_to_its_endpointslice(helm: Path) -> None:
    docs = render(helm)
    role = find(docs, "Role", "research-operator-lease-broker")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["services"], "resourceNames": ["research-operator-leases"], "verbs": ["get"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["create"]},
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "resourceNames": ["research-operator-leases"],
            "verbs": ["update"],
        },
        # TLS: its CA, in one Secret of its own namespace, read by name (made by the first leader)
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["research-operator-broker-ca"],
            "verbs": ["get"],
        },
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
    ]
    plain = find(render(helm, "--set", "operator.leaseBroker.tls=false"), "Role", "research-operator-lease-broker")
    assert not [r for r in plain["rules"] if "secrets" in r["resources"]]
    off = render(helm, "--set", "operator.leaseBroker.enabled=false")
    assert not [d for d in off if d["metadata"]["name"].endswith(("-lease-broker", "-leases"))]
    assert not [r for r in find(off, "ClusterRole", "research-operator")["rules"] if "tokenreviews" in r["resources"]]
    env = {
        e["name"]
        for e in find(off, "Deployment", "research-operator")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert "LEASE_BROKER_PORT" not in env


def test_leader_election_role_is_limited_to_the_lease(helm: Path) -> None:
    docs = render(helm)
    role = find(docs, "Role", "research-operator-leader-election")
    assert role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": ["research-operator-leader"],
            "verbs": ["get", "update"],
        },
    ]
    binding = find(docs, "RoleBinding", "research-operator-leader-election")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "research-operator", "namespace": "research-system"}
    ]
    docs = render(helm, "--set", "operator.leaderElection.enabled=false", "--set", "operator.leaseBroker.enabled=false")
    operators = [
        d
        for d in docs
        if d["kind"] in ("Role", "RoleBinding") and d["metadata"]["name"] != "research-operator-platform-admin"
    ]
    assert not operators
    assert find(docs, "Deployment", "research-operator")["spec"]["strategy"] == {"type": "Recreate"}


def test_model_server_does_not_get_an_api_token(helm: Path) -> None:
    spec = find(render(helm), "Deployment", "research-operator-modelserver")["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False


# ------------------------------------------------------------------------------------------------
# the rendered environment and command lines mean what the programs read
# ------------------------------------------------------------------------------------------------


def test_operator_environment_is_what_settings_read(helm: Path) -> None:
    docs = render(
        helm,
        "--set", "settings.globalMaxActiveJobs=12",
        "--set", "settings.namespaceMaxActiveJobs=4",
        "--set", "settings.workerImage=registry.example.com/ro:1.2",
        "--set", "kueue.queueName=research",
        "--set", "kueue.priorityClasses.high=research-high",
        "--set", "kueue.defaultPriorityClass=research-normal",
        "--set", "workers.serviceAccountName=research-worker",
        "--set", "operator.metricsPort=18080",
        "--set", "operator.healthPort=18081",
        "--set", "operator.resyncSeconds=12.5",
        "--set", "operator.quotaBackoffSeconds=2",
        "--set", "modelServer.baseUrl=http://127.0.0.1:18000/v1",
        namespace="ops",
        release="ro",
    )  # fmt: skip
    op = find(docs, "Deployment", "ro-research-operator")
    container = op["spec"]["template"]["spec"]["containers"][0]
    env = env_of(container, find(docs, "ConfigMap"), "ro-research-operator-abc", "ops")
    s = Settings.from_env(env)
    assert s == Settings(
        namespace="ops",
        settings_configmap="ro-research-operator-settings",
        worker_image="registry.example.com/ro:1.2",
        worker_service_account="research-worker",
        default_model_base_url="http://127.0.0.1:18000/v1",
        global_max_active=12,
        namespace_max_active=4,
        kueue_queue="research",
        kueue_priority_classes=(("high", "research-high"),),
        kueue_default_priority_class="research-normal",
        kueue_watch=True,
        resync_seconds=12.5,
        quota_backoff_seconds=2.0,
        metrics_port=18080,
        health_port=18081,
        leader_election=True,
        lease_name="ro-research-operator-leader",
        lease_broker_port=8090,
        lease_broker_url="https://ro-research-operator-leases.ops.svc:8090",
        lease_broker_service="ro-research-operator-leases",
        lease_broker_ca_secret="ro-research-operator-broker-ca",
        pod_ip="10.0.0.7",
        admission_policy_binding="ro-research-operator-tenancy",
    )
    assert env["POD_NAME"] == "ro-research-operator-abc"  # the Lease holder identity
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "metrics": 18080,
        "health": 18081,
        "leases": 8090,
    }
    # The broker's Service has no selector: its one endpoint is the leader, which writes the slice.
    leases = find(docs, "Service", "ro-research-operator-leases")
    assert "selector" not in leases["spec"] and leases["spec"]["ports"][0]["port"] == 8090
    # The watched ConfigMap gives the same settings as the environment.
    from_cm = Settings.from_env({}).with_configmap(find(docs, "ConfigMap")["data"])
    assert from_cm.caps == s.caps
    assert (from_cm.kueue_queue, from_cm.kueue_priority_classes, from_cm.kueue_default_priority_class) == (
        s.kueue_queue,
        s.kueue_priority_classes,
        s.kueue_default_priority_class,
    )


def test_changing_caps_changes_the_configmap_but_does_not_restart_the_operator(helm: Path) -> None:
    before = render(helm, "--set", "settings.globalMaxActiveJobs=3")
    after = render(helm, "--set", "settings.globalMaxActiveJobs=7", "--set", "settings.namespaceMaxActiveJobs=2")
    assert find(before, "ConfigMap")["data"]["globalMaxActiveJobs"] == "3"
    assert find(after, "ConfigMap")["data"]["globalMaxActiveJobs"] == "7"
    assert find(after, "ConfigMap")["data"]["namespaceMaxActiveJobs"] == "2"
    # An unchanged pod template means `helm upgrade` rolls out nothing: the operator's watch on
    # the ConfigMap applies the new caps.
    for name in ("research-operator", "research-operator-modelserver"):
        assert (
            find(before, "Deployment", name)["spec"]["template"] == find(after, "Deployment", name)["spec"]["template"]
        )


def test_turning_kueue_mode_on_restarts_the_operator_but_changing_its_mapping_does_not(helm: Path) -> None:
    off = render(helm)
    on = render(helm, "--set", "kueue.queueName=research")
    remapped = render(helm, "--set", "kueue.queueName=research", "--set", "kueue.priorityClasses.high=research-high")
    template = {
        name: find(docs, "Deployment", "research-operator")["spec"]["template"]
        for name, docs in (("off", off), ("on", on), ("remapped", remapped))
    }
    # The Workload watch and its RBAC come and go with Kueue mode: a new pod template rolls out.
    assert template["off"] != template["on"]
    assert template["on"] == template["remapped"]  # the mapping arrives through the ConfigMap watch
    assert find(remapped, "ConfigMap")["data"]["kueuePriorityClasses"] == '{"high":"research-high"}'


def test_model_server_command_line_is_what_the_server_parses(helm: Path) -> None:
    docs = render(
        helm,
        "--set", "modelServer.port=18000",
        "--set", "modelServer.ttftMs=200",
        "--set", "modelServer.tokenMs=5",
        "--set", "modelServer.maxConcurrency=8",
        "--set", "modelServer.retryAfterMs=250",
    )  # fmt: skip
    c = find(docs, "Deployment", "research-operator-modelserver")["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["research-modelserver", "--host", "0.0.0.0", "--port", "18000"]
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    s = settings_from(c["command"][1:], env)
    assert (s.host, s.port, s.ttft_ms, s.token_ms, s.max_concurrency, s.retry_after_ms) == (
        "0.0.0.0",
        18000,
        200.0,
        5.0,
        8,
        250,
    )
    assert s.model == "offline-research-1" and "gpt-4o-mini" in s.aliases
    assert c["ports"][0]["containerPort"] == 18000
    assert c["readinessProbe"]["httpGet"] == {"path": "/v1/models", "port": "http"}
    svc = find(docs, "Service", "research-operator-modelserver")
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert find(docs, "ConfigMap")["data"]["defaultModelBaseUrl"] == (
        "http://research-operator-modelserver.research-system.svc:8000/v1"
    )


def test_image_digest_wins_over_the_tag(helm: Path) -> None:
    digest = "sha256:" + "ab" * 32
    docs = render(helm, "--set", "image.repository=registry.example.com/ro", "--set", f"image.digest={digest}")
    images = {c["image"] for _, spec in pod_specs(docs) for c in spec["containers"]}
    assert images == {f"registry.example.com/ro@{digest}"}
    assert find(docs, "ConfigMap")["data"]["workerImage"] == f"registry.example.com/ro@{digest}"


def test_notes_tell_the_user_what_to_do_next(helm: Path) -> None:
    out = run_helm(helm, "install", "research-operator", str(CHART), "--dry-run=client", "-n", "research-system")
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    for expected in (
        "kind: ResearchJob",
        "kubectl get rj -w",
        "status.report",
        "research-system/research-operator-settings",
        "globalMaxActiveJobs=0",
        "--set settings.globalMaxActiveJobs=",
    ):
        assert expected in notes, expected


# ------------------------------------------------------------------------------------------------
# the CRD and the Dockerfile
# ------------------------------------------------------------------------------------------------


def test_chart_crd_is_the_generated_crd() -> None:
    chart_crd = CHART / "crds" / CRD
    assert chart_crd.read_bytes() == (REPO / "crds" / CRD).read_bytes(), (
        "charts/research-operator/crds/ drifted from crds/: run `make chart-crds`"
    )
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == sorted([CRD, "modelendpoints.researchops.io.yaml"])


def test_dockerfile_builds_what_the_project_declares() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    scripts = project["project"]["scripts"]
    for command in ("research-operator", "research-worker", "research-modelserver", "kubectl-research"):
        assert command in scripts, command
        assert f"/opt/venv/bin/{command} --help" in dockerfile, f"the build does not check {command}"
    # Every package directory of the wheel is copied into the build, and allowed by .dockerignore.
    package_dirs = project["tool"]["setuptools"]["packages"]["find"]["where"]
    copied = re.findall(r"^COPY (\S+) \./\1$", dockerfile, re.MULTILINE)
    assert sorted(copied) == sorted(package_dirs)
    ignore = (REPO / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") :].count("*") == 1
    for d in [*package_dirs, "pyproject.toml"]:
        assert f"!{d}/" in ignore or f"!{d}" in ignore, f".dockerignore excludes {d}"
    # The product only: the local control plane (devcluster/) is neither in the build context nor copied.
    assert "devcluster" not in package_dirs and "localkube" not in scripts
    assert not re.search(r"^(COPY|ADD)\b.*devcluster", dockerfile, re.MULTILINE)
    assert "!devcluster/" not in ignore and "!devcluster" not in ignore
    # Non-root, numeric (so runAsNonRoot can verify it), the same uid the chart and workers run as.
    assert re.search(r"^USER 65532:65532$", dockerfile, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["research-operator"\]$', dockerfile, re.MULTILINE)
    # The base image is pinned to a full Python version of the minor version the tests run on.
    base = re.search(r"^ARG PYTHON_IMAGE=python:(\d+)\.(\d+)\.\d+-slim-bookworm$", dockerfile, re.MULTILINE)
    assert base, "pin the base image by its full tag"
    assert (int(base.group(1)), int(base.group(2))) == sys.version_info[:2]
    # No credentials baked in: no ENV/ARG that looks like a key, token, password or DSN.
    assert not re.search(r"^(ENV|ARG)\b.*(KEY|TOKEN|PASSWORD|DSN|SECRET)", dockerfile, re.MULTILINE | re.IGNORECASE)


PRODUCT_PACKAGES = {"research_api", "research_operator", "research_worker", "research_cli", "offline_model"}
IMAGE_COMMANDS = {"research-operator", "research-worker", "research-modelserver", "kubectl-research"}


def test_the_image_wheel_holds_the_product_and_not_the_local_cluster(tmp_path: Path) -> None:
    """Build the wheel as the Dockerfile's builder stage does, from only what it copies: it must hold
    the product's packages and commands, and nothing of the local control plane (localkube)."""
    dockerfile = (REPO / "Dockerfile").read_text()
    context = tmp_path / "src"
    context.mkdir()
    for source in re.findall(r"^COPY (\S+) \./\S*$", dockerfile, re.MULTILINE):
        src = REPO / source
        if src.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
            shutil.copytree(src, context / source, ignore=ignore)
        else:
            shutil.copy(src, context / source)
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels),
         str(context)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("research_operator-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
        metadata = zf.read(f"{info}/METADATA").decode()
    packages = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert packages == PRODUCT_PACKAGES
    assert not any("localkube" in n for n in names)
    commands = set(re.findall(r"^(\S+) = ", entry_points.split("[console_scripts]")[1], re.MULTILINE))
    assert commands == IMAGE_COMMANDS
    # Every command the image checks with --help is one the wheel installs.
    assert set(re.findall(r"/opt/venv/bin/(\S+) --help", dockerfile)) == IMAGE_COMMANDS
    # The local cluster's distribution is not a dependency of the product (cryptography is, since
    # the lease broker signs its own serving certificates).
    required = re.findall(r"^Requires-Dist: ([A-Za-z0-9_.-]+)(?!.*extra ==)", metadata, re.MULTILINE)
    assert "research-operator-devcluster" not in required and {"kopf", "cryptography"} <= set(required)


def test_no_product_module_imports_the_local_cluster() -> None:
    product = [REPO / d for d in ("api", "operator", "worker", "modelserver", "cli")]
    offenders = [
        str(path.relative_to(REPO))
        for root in product
        for path in root.rglob("*.py")
        if re.search(r"^\s*(from|import) localkube\b", path.read_text(), re.MULTILINE)
    ]
    assert offenders == []


# ------------------------------------------------------------------------------------------------
# tenancy: the admission policy (what it does is shown on the API server, tests/test_tenancy_cluster.py)
# ------------------------------------------------------------------------------------------------


def test_admission_policy_checks_every_source_the_crd_allows(helm: Path) -> None:
    """A message expression cannot see the authorizer's answer, so the policy has one Secret and one
    ConfigMap validation per source index: as many as the CRD allows sources, or one would go unchecked."""
    crd = yaml.safe_load((CHART / "crds" / "researchjobs.researchops.io.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    max_sources = schema["properties"]["sources"]["maxItems"]
    policy = find(render(helm), "ValidatingAdmissionPolicy")
    fields = [v["messageExpression"].split(":")[0].strip("'") for v in policy["spec"]["validations"]]
    for i in range(max_sources):
        assert f"spec.sources[{i}].apiKeySecretRef" in fields
        assert f"spec.sources[{i}].configMap" in fields
    assert f"spec.sources[{max_sources}].apiKeySecretRef" not in fields
    for f in ("spec.model.apiKeySecretRef", "spec.store.dsnSecretRef", "spec.worker.priorityClassName"):
        assert f in fields


def test_admission_policy_binding_denies_and_reads_the_settings(helm: Path) -> None:
    docs = render(helm, namespace="ops", release="ro")
    binding = find(docs, "ValidatingAdmissionPolicyBinding", "ro-research-operator-tenancy")
    assert binding["spec"]["policyName"] == "ro-research-operator-tenancy"
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert binding["spec"]["paramRef"] == {
        "name": "ro-research-operator-settings",
        "namespace": "ops",
        "parameterNotFoundAction": "Deny",
    }
    policy = find(docs, "ValidatingAdmissionPolicy", "ro-research-operator-tenancy")
    assert policy["spec"]["failurePolicy"] == "Fail"
    assert policy["spec"]["matchConstraints"]["resourceRules"][0]["operations"] == ["CREATE", "UPDATE"]


def test_admission_policy_off_leaves_authors_unchecked_and_says_so(helm: Path) -> None:
    docs = render(helm, "--set", "tenancy.admissionPolicy.enabled=false")
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
    assert find(docs, "ConfigMap")["data"]["admissionPolicyBinding"] == ""
    rules = find(docs, "ClusterRole", "research-operator")["rules"]
    assert not [r for r in rules if "admissionregistration.k8s.io" in r["apiGroups"]]


def test_tenancy_allowlists_reach_the_operator_and_bad_ones_fail_install(helm: Path) -> None:
    docs = render(
        helm,
        "--set", "tenancy.allowedPriorityClasses={research-low,research-high}",
        "--set", "tenancy.allowedTolerationKeys={nvidia.com/gpu}",
        "--set", "tenancy.trustAuthors=true",
    )  # fmt: skip
    cm = find(docs, "ConfigMap")
    container = find(docs, "Deployment", "research-operator")["spec"]["template"]["spec"]["containers"][0]
    s = Settings.from_env(env_of(container, cm, "pod", "research-system"))
    assert s.allowed_priority_classes == ("research-low", "research-high")
    assert s.allowed_toleration_keys == ("nvidia.com/gpu",)
    assert s.trust_authors is True
    bad = run_helm(helm, "template", "r", str(CHART), "--set", "tenancy.allowedPriorityClasses={a b}")
    assert bad.returncode != 0 and "allowedPriorityClasses" in bad.stderr


def test_network_policies_let_only_workers_reach_the_broker_and_the_model_server(helm: Path) -> None:
    docs = render(helm)
    workers = {
        "namespaceSelector": {},
        "podSelector": {"matchExpressions": [{"key": "researchops.io/job", "operator": "Exists"}]},
    }
    operator = find(docs, "NetworkPolicy", "research-operator")
    op_pods = find(docs, "Deployment", "research-operator")["spec"]["template"]["metadata"]["labels"]
    assert operator["spec"]["podSelector"]["matchLabels"].items() <= op_pods.items()
    assert operator["spec"]["policyTypes"] == ["Ingress"]
    broker, metrics = operator["spec"]["ingress"]
    assert broker == {"from": [workers], "ports": [{"port": 8090, "protocol": "TCP"}]}
    assert {p["port"] for p in metrics["ports"]} == {8080, 8081}
    model = find(docs, "NetworkPolicy", "research-operator-modelserver")
    ms_pods = find(docs, "Deployment", "research-operator-modelserver")["spec"]["template"]["metadata"]["labels"]
    assert model["spec"]["podSelector"]["matchLabels"].items() <= ms_pods.items()
    [rule] = model["spec"]["ingress"]
    assert rule["from"][0] == workers and rule["from"][1]["podSelector"]["matchLabels"].items() <= op_pods.items()
    assert rule["ports"] == [{"port": 8000, "protocol": "TCP"}]
    # The worker pods the operator makes carry the label the policies select.
    owner = Owner("team-a", "demo", "0d5c6f3c-1111-2222-3333-444455556666")
    spec = ResearchJobSpec.model_validate({"topic": "tea", "sources": [{"type": "wikipedia"}]})
    pod_labels = worker_job(owner, spec, Settings(), "p1", Step.PLAN)["spec"]["template"]["metadata"]["labels"]
    assert "researchops.io/job" in pod_labels
    off = render(helm, "--set", "networkPolicy.enabled=false")
    assert not [d for d in off if d["kind"] == "NetworkPolicy"]


def test_worker_network_policies_are_off_by_default_and_when_on_allow_dns_broker_model_server_and_what_admins_add(
    helm: Path,
) -> None:
    docs = render(helm)
    container = find(docs, "Deployment", "research-operator")["spec"]["template"]["spec"]["containers"][0]
    assert Settings.from_env(env_of(container, find(docs, "ConfigMap"), "pod", "research-system")).worker_egress is None
    api_server = {"to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}], "ports": [{"port": 6443, "protocol": "TCP"}]}
    docs = render(
        helm,
        "--set", "networkPolicy.workers.enabled=true",
        "--set-json", f"networkPolicy.workers.egress=[{json.dumps(api_server)}]",
    )  # fmt: skip
    container = find(docs, "Deployment", "research-operator")["spec"]["template"]["spec"]["containers"][0]
    egress = Settings.from_env(env_of(container, find(docs, "ConfigMap"), "pod", "research-system")).worker_egress
    assert egress is not None
    dns, broker, model, extra = egress
    assert dns["ports"] == [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
    assert dns["to"] == [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]
    op_pods = find(docs, "Deployment", "research-operator")["spec"]["template"]["metadata"]["labels"]
    ms_pods = find(docs, "Deployment", "research-operator-modelserver")["spec"]["template"]["metadata"]["labels"]
    release = {"kubernetes.io/metadata.name": "research-system"}
    assert broker["to"][0]["namespaceSelector"]["matchLabels"] == release
    assert broker["to"][0]["podSelector"]["matchLabels"].items() <= op_pods.items()
    assert broker["ports"] == [{"port": 8090, "protocol": "TCP"}]
    assert model["to"][0]["podSelector"]["matchLabels"].items() <= ms_pods.items()
    assert model["ports"] == [{"port": 8000, "protocol": "TCP"}]
    assert extra == api_server
    rules = find(docs, "ClusterRole", "research-operator")["rules"]
    assert {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["create"]} in rules
    # The policy the operator makes from them selects exactly the ResearchJob's worker pods.
    owner = Owner("team-a", "demo", "0d5c6f3c-1111-2222-3333-444455556666")
    policy = worker_network_policy(owner, egress)
    spec = ResearchJobSpec.model_validate({"topic": "tea", "sources": [{"type": "wikipedia"}]})
    pod_labels = worker_job(owner, spec, Settings(), "p1", Step.PLAN)["spec"]["template"]["metadata"]["labels"]
    other = worker_job(Owner("team-a", "other", "u2"), spec, Settings(), "p1", Step.PLAN)
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert not selector.items() <= other["spec"]["template"]["metadata"]["labels"].items()
    assert policy["spec"]["ingress"] == [] and policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["metadata"]["ownerReferences"][0]["name"] == "demo"
